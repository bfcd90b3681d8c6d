"""TPT on the CPU: our batched implementation against a straightforward per-image loop.

    python benchmarks/tpt_speed_cpu.py [--images 64] [--batch 16] [--repeats 3]

All run in the same process on the same images and the same per-sample views, in fp32, with
the shipped tiny CLIP (30 classes, 64 views). The straightforward loop is written the way the
reference code works: one image at a time, full-length text sequences (the whole context
length), one forward with gradients whose output serves both the view selection and the loss,
then a fresh forward for the prediction. Ours: several images at once, one context each,
sequences cut after the last end-of-text token, and the start token and context computed once
per context instead of once per class (the shared prefix); ours is also timed without the
shared prefix, to measure what it saves. The script checks that all give the same predictions
and prints ms per image for the whole method and for the adaptation alone (each the best of
``--repeats`` interleaved rounds, since the machine may be shared).
"""

from __future__ import annotations

import argparse
import time

import torch

from tta.augment import make_views
from tta.callbacks.base import sample_seed
from tta.methods.entropy import marginal_entropy, select_confident
from tta.methods.tpt import tpt_adapt
from tta.models import PromptLearner, create_vlm
from tta.world import CLASS_NAMES, render_domain


def straightforward_tpt(vlm, prompt, image, seed, n_views=64, lr=5e-3):
    """One image, reference style: fwd with grad (selection + loss), step, fwd for the prediction."""
    with torch.no_grad():
        views = make_views([image], image.unsqueeze(0), n_views, [seed])[0]
        features = vlm.encode_image(views)  # V x D
    context = prompt.initial_context.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([context], lr=lr)
    logits = vlm.logits(features, prompt.text_features(context))  # V x C
    selected = select_confident(logits.detach().unsqueeze(0), 0.1)[0]
    loss = marginal_entropy(logits[selected].unsqueeze(0)).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        return vlm.logits(features[:1], prompt.text_features(context))[0]


def ours(vlm, prompt, images, seeds, n_views=64, batch=16):
    out = []
    for i in range(0, len(seeds), batch):
        with torch.no_grad():
            views = make_views(list(images[i : i + batch]), images[i : i + batch], n_views, seeds[i : i + batch])
            features = vlm.encode_image(views.flatten(0, 1), batch_size=64).view(len(seeds[i : i + batch]), n_views, -1)
        out.append(tpt_adapt(prompt, features, vlm.logits).logits)
    return torch.cat(out)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    vlm = create_vlm("tta-world-resnet")
    images = render_domain("blur", 3, args.images, seed=10_000).images
    seeds = [sample_seed(0, i) for i in range(args.images)]
    n, batch = args.images, args.batch
    full_prompt = PromptLearner(vlm, CLASS_NAMES, truncate=False, share_prefix=False)
    prompts = {  # ours, with and without the shared prefix
        "shared": PromptLearner(vlm, CLASS_NAMES),
        "whole": PromptLearner(vlm, CLASS_NAMES, share_prefix=False),
    }
    n_shared = prompts["shared"].ctx_start + prompts["shared"].n_ctx

    for prompt in prompts.values():  # warm-up
        ours(vlm, prompt, images[:4], seeds[:4], batch=4)
    straightforward_tpt(vlm, full_prompt, images[0], seeds[0])

    # the views + image tower (the same for all), then the adaptation alone, interleaved rounds
    with torch.no_grad():
        feats, enc_s = timed(
            lambda: torch.stack(
                [vlm.encode_image(make_views([images[i]], images[i : i + 1], 64, [seeds[i]])[0]) for i in range(n)]
            )
        )
    adapt_s = {"straightforward": [], "shared": [], "whole": []}
    adapted = {}
    for _ in range(args.repeats):
        for name, prompt in prompts.items():
            chunks, seconds = timed(
                lambda prompt=prompt: [tpt_adapt(prompt, feats[i : i + batch], vlm.logits) for i in range(0, n, batch)]
            )
            adapt_s[name].append(seconds)
            adapted[name] = torch.cat([c.logits for c in chunks])
        adapt_s["straightforward"].append(
            timed(lambda: [tpt_adapt(full_prompt, feats[i : i + 1], vlm.logits) for i in range(n)])[1]
        )
    # the whole method (views, image tower, adaptation), interleaved rounds too
    whole_method_s = {"straightforward": [], "shared": [], "whole": []}
    for _ in range(args.repeats):
        ref_logits, seconds = timed(
            lambda: torch.stack([straightforward_tpt(vlm, full_prompt, im, s) for im, s in zip(images, seeds)])
        )
        whole_method_s["straightforward"].append(seconds)
        whole_logits, seconds = timed(ours, vlm, prompts["whole"], images, seeds, batch=batch)
        whole_method_s["whole"].append(seconds)
        ours_logits, seconds = timed(ours, vlm, prompts["shared"], images, seeds, batch=batch)
        whole_method_s["shared"].append(seconds)
    ref_s, whole_s, ours_s = (min(whole_method_s[name]) for name in ("straightforward", "whole", "shared"))

    def ms(seconds: float) -> str:
        return f"{1000 * seconds / n:.1f}"

    best = {name: min(times) for name, times in adapt_s.items()}
    print(
        f"tiny CLIP, {len(CLASS_NAMES)} classes, 64 views, {n} images, {torch.get_num_threads()} CPU threads; "
        f"text sequence {prompts['shared'].seq_len} vs {full_prompt.seq_len} tokens, the first {n_shared} "
        f"(start + context) shared by all classes; best of {args.repeats} interleaved rounds"
    )
    print("| implementation | ms / image (whole TPT) | ms / image (adaptation only) |")
    print("|---|---|---|")
    print(f"| straightforward: one image at a time, full-length text | {ms(ref_s)} | {ms(best['straightforward'])} |")
    print(
        f"| ours without the shared prefix: {batch} images at once, text cut at the last end-of-text | "
        f"{ms(whole_s)} | {ms(best['whole'])} |"
    )
    print(f"| ours: the same, start token + context once per image | {ms(ours_s)} | {ms(best['shared'])} |")
    print(
        f"| speed-up of ours over straightforward | {ref_s / ours_s:.2f}x | "
        f"{best['straightforward'] / best['shared']:.2f}x |"
    )
    print(f"| speed-up of the shared prefix | {whole_s / ours_s:.2f}x | {best['whole'] / best['shared']:.2f}x |")
    print(f"views + image tower alone (shared by all): {1000 * enc_s / n:.1f} ms / image")
    for label, a, b in (
        ("ours vs straightforward", ours_logits, ref_logits),
        ("shared prefix vs without", ours_logits, whole_logits),
        ("shared prefix vs without (adaptation alone)", adapted["shared"], adapted["whole"]),
    ):
        same = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        diff = (a - b).abs().max().item()
        print(f"{label}: same predictions on {100 * same:.1f}% of images; max |logit difference| {diff:.2e}")


if __name__ == "__main__":
    main()
