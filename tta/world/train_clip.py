"""Recipe: train the tiny CLIP of the offline world and ship it as an open_clip ``local-dir``.

    python -m tta.world.train_clip --out tta/assets/tta-world-clip
    python -m tta.world.train_clip --out tta/assets/tta-world-sigmoid --loss sigmoid

Seeded end to end (scenes, initialisation, batch order). Every step draws a fresh batch of
clean scenes (75% one object, 25% two objects with a relation) with captions from seven
templates, and minimises the symmetric InfoNCE loss with soft targets: captions that describe
the same scene content (same class, or same pair and relation) are positives of each other,
so the many same-class pairs of a 256 batch are not pushed apart. ``--loss sigmoid`` trains the
SigLIP-style twin instead (same towers plus a learned logit bias, SigLIP's pairwise sigmoid
loss with the same soft positives). A ResNet image tower learns
shapes on two CPU cores in minutes, a tiny ViT does not. Weights are stored in fp16 (the
49408-row token embedding dominates the size); the shipped model is evaluated after reloading,
so the reported accuracy is that of the file. Run it with ``--help`` for the settings.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tta.models.factory import MODEL_CONFIG_DIR, register_model_configs
from tta.world.scenes import Scenes, render_pairs, render_single

ARCHITECTURE = "tta-tiny-clip"
#: Architecture per loss: the CLIP-style model (InfoNCE) and the SigLIP-style one (sigmoid loss,
#: learned logit bias; same towers).
ARCHITECTURES = {"infonce": ARCHITECTURE, "sigmoid": "tta-tiny-resnet-sigmoid"}


def make_batch(step: int, seed: int, batch_size: int, pair_fraction: float) -> Scenes:
    n_pairs = int(batch_size * pair_fraction)
    base = seed * 1_000_003 + step * 2
    single = render_single(batch_size - n_pairs, base)
    pairs = render_pairs(n_pairs, base + 1)
    return Scenes(
        images=torch.cat([single.images, pairs.images]),
        labels=torch.cat([single.labels, pairs.labels]),
        captions=single.captions + pairs.captions,
        canonical=single.canonical + pairs.canonical,
    )


def soft_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, canonical: list[str]
) -> torch.Tensor:
    """Symmetric InfoNCE where every caption with the same content is a positive."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(canonical))}
    content = torch.tensor([ids[c] for c in canonical])
    target = (content[:, None] == content[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def soft_sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    canonical: list[str],
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss where every caption with the same content is a positive."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(canonical))}
    content = torch.tensor([ids[c] for c in canonical])
    signs = 2 * (content[:, None] == content[None, :]).float() - 1
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    return -F.logsigmoid(signs * (logits + logit_bias)).sum() / len(logits)


def train(
    steps: int = 350,
    batch_size: int = 256,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    warmup: int = 20,
    pair_fraction: float = 0.25,
    seed: int = 0,
    log_every: int = 25,
    loss: str = "infonce",
) -> tuple[torch.nn.Module, dict]:
    """Train from scratch with the ``loss`` ("infonce": CLIP-style, "sigmoid": SigLIP-style, on
    the ``ARCHITECTURES[loss]`` towers); returns the model (eval mode) and the run's log."""
    if loss not in ARCHITECTURES:
        raise ValueError(f"loss must be one of {list(ARCHITECTURES)}, got {loss!r}")
    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(ARCHITECTURES[loss])
    tokenizer = open_clip.get_tokenizer(ARCHITECTURES[loss])
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    model.train()
    start = time.perf_counter()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = make_batch(step, seed, batch_size, pair_fraction)
        image_features = model.encode_image((batch.images - mean) / std)
        text_features = model.encode_text(tokenizer(batch.captions))
        if loss == "sigmoid":
            value = soft_sigmoid_loss(
                image_features, text_features, model.logit_scale, model.logit_bias, batch.canonical
            )
        else:
            value = soft_clip_loss(image_features, text_features, model.logit_scale, batch.canonical)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(value.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(
                f"step {step:4d}  loss {value.item():.4f}  lr {lr_at(step):.2e}  {time.perf_counter() - start:6.1f}s",
                flush=True,
            )
    model.eval()
    log = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "pair_fraction": pair_fraction,
        "seed": seed,
        "loss": loss,
        "train_seconds": time.perf_counter() - start,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
    }
    return model, log


def save_local_dir(model: torch.nn.Module, out_dir: Path, architecture: str = ARCHITECTURE) -> Path:
    """Write ``open_clip_config.json`` + fp16 ``open_clip_model.safetensors``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = json.loads((MODEL_CONFIG_DIR / f"{architecture}.json").read_text())
    preprocess = dict(model.visual.preprocess_cfg)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {k: preprocess[k] for k in ("size", "mean", "std", "interpolation", "resize_mode")},
    }
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {
        k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items() if v.is_floating_point()
    }
    state.update({k: v.contiguous() for k, v in model.state_dict().items() if not v.is_floating_point()})
    save_file(state, str(out_dir / "open_clip_model.safetensors"))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="local-dir to write the model into")
    parser.add_argument("--steps", type=int, default=350)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--loss",
        choices=sorted(ARCHITECTURES),
        default="infonce",
        help="infonce: the CLIP-style model; sigmoid: the SigLIP-style one (logit bias)",
    )
    parser.add_argument("--eval-n", type=int, default=1000, help="scenes per domain for the accuracy table")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, log = train(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, loss=args.loss)
    save_local_dir(model, args.out, ARCHITECTURES[args.loss])
    from tta.world.evaluate import accuracy_table  # evaluates the saved file, not the live model

    log["accuracy_severity_3"] = accuracy_table(f"local-dir:{args.out}", n=args.eval_n, severities=(3,))
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
