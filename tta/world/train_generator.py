"""Recipe: train DiffTPT's image-variation generator for the offline world and save it as a diffusers folder.

    python -m tta.world.train_generator --out tta/assets/tta-world-image-variation

The model is a ``StableDiffusionImageVariationPipeline``, the class of DiffTPT's Stable Diffusion
image variations, made tiny: 32 px images, a KL autoencoder (``AutoencoderKL``, two levels: 16 x 16
x 4 latents), a three-level ``UNet2DConditionModel`` whose cross-attention reads one token, the
image embedding of a ``CLIPVisionModelWithProjection`` (a 2-layer ViT on 4 px patches), and SD's
PNDM scheduler and noise schedule (scaled-linear betas 0.00085-0.012, 1,000 steps). As for the
real pipeline, the generator is conditioned on the CLIP image embedding of the picture it varies,
classifier-free guidance contrasts it with a zero embedding, and ``vae.decode`` turns the latents
into pixels; the real pipeline's embedding comes from a frozen CLIP, here the tiny encoder is
trained with the UNet (no world CLIP has this input size, and the UNet learns what it needs).

Two stages, seeded end to end (scenes, noise, initialisation, batch order: the same command gives
the same weights on the CPU):

1. the autoencoder reconstructs scenes (L1 + a small KL term), then its latent scale is set so the
   latents have unit standard deviation (SD's ``scaling_factor``);
2. the UNet and the image encoder learn to denoise the latents of a scene given the scene's own
   embedding (epsilon prediction, uniform timesteps; the embedding is zeroed for 10% of the
   samples, so classifier-free guidance has an unconditional model), with an exponential moving
   average of the weights, which is what is saved.

Every step draws a fresh batch of clean single-object scenes, rendered as originals
(``ORIGINAL_SIZE`` px, uint8) and squashed to 32 px as DiffTPT squashes a test image for its
generator (bicubic, antialiased); seeds are disjoint from the evaluation's. The folder is written by
``save_pretrained`` (fp16 weights, the hub repository's layout, so ``DiffusionViewGenerator`` loads
it as a local folder) with ``training_log.json`` beside it: the training curve (losses; share of
generated views that the world model classifies as the scene's class), CPU and wall seconds, and the
final share measured on the saved folder after reloading it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tta.validation import check_number
from tta.world.scenes import ORIGINAL_SIZE, render_single

#: Pixels of a generated image and of the encoder's input.
IMAGE_SIZE = 32
#: First scene seed of the training batches (evaluations use seeds below 1,000,000).
TRAIN_SEED_BASE = 7_000_000
#: The evaluation's scenes: seed and zero-shot template of the world model.
EVAL_SEED = 10_000
#: CLIP's pixel mean and std, the feature extractor's defaults (the conditioning is normalised with them).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_pipeline(seed: int = 0, embed_dim: int = 64):
    """A fresh (randomly initialised, seeded) tiny ``StableDiffusionImageVariationPipeline`` of 32 px images."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImageVariationPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            mid_block_add_attention=False,
            sample_size=IMAGE_SIZE,
        )
        unet = UNet2DConditionModel(
            sample_size=IMAGE_SIZE // 2,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64, 64),
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=embed_dim,
            attention_head_dim=8,
        )
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=64,
                projection_dim=embed_dim,
                intermediate_size=128,
                num_attention_heads=4,
                num_hidden_layers=2,
                image_size=IMAGE_SIZE,
                patch_size=4,
            )
        )
    # Stable Diffusion's scheduler settings (the image-variation repository's scheduler_config.json)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return StableDiffusionImageVariationPipeline(
        vae=vae,
        image_encoder=encoder,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=processor,
        requires_safety_checker=False,
    )


def squash(originals: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 originals to ``[0, 1]`` float at ``size`` px, as ``DiffusionViewGenerator.squash`` does."""
    images = originals.float() / 255
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def scene_batch(step: int, seed: int, n: int) -> torch.Tensor:
    """The ``step``-th training batch: ``n`` fresh clean scenes, ``[0, 1]`` at 32 px."""
    scenes = render_single(n, seed=TRAIN_SEED_BASE + 100_000 * seed + step, size=ORIGINAL_SIZE)
    return squash(scenes.originals())


def clip_normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def cosine_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def in_memory_generator(pipeline, n_views: int = 4, num_inference_steps: int = 10, output_size: int = 64):
    """A ``DiffusionViewGenerator`` (no cache) around a pipeline held in memory, e.g. during training."""
    from tta.augment.diffusion import DiffusionViewGenerator

    generator = DiffusionViewGenerator(
        pretrained="in-memory",
        n_views=n_views,
        num_inference_steps=num_inference_steps,
        output_size=output_size,
        cache_dir=None,
    )
    pipeline.set_progress_bar_config(disable=True)
    generator.pipeline = pipeline
    return generator


@torch.no_grad()
def view_class_share(
    generator,
    vlm,
    n_scenes: int = 50,
    domain: str = "clean",
    severity: int = 3,
    seed: int = EVAL_SEED,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """How well the generated views of ``n_scenes`` unseen scenes of ``domain`` (each conditioned on the
    whole scene as loaded, squashed to the pipeline's input, as DiffTPT conditions) depict the scene's
    object, by ``vlm``'s zero-shot prediction ("a photo of a {}.") on the views resized to the model
    input as DiffTPT resizes them (bilinear, antialiased). Shares of the views predicted as the scene's
    ``class``, as its ``colour`` (any shape) and as its ``shape`` (any colour); ``autoencoder``: share
    of the scenes whose autoencoder round trip (encode + decode, no diffusion) is predicted as their
    class, the best the decoder allows; ``source``: the model's accuracy on the scenes themselves.
    ``generator``: a ``DiffusionViewGenerator`` (its ``n_views`` per scene), loaded on ``device``,
    where ``vlm`` is too."""
    from tta.world import CLASS_NAMES, COLOUR_NAMES, render_domain
    from tta.world.evaluate import _model_inputs

    scenes = render_domain(domain, severity, n_scenes, seed, size=ORIGINAL_SIZE)
    conditions = generator.squash(list(scenes.originals()), device)
    views = generator.views(conditions, list(range(seed, seed + n_scenes)))  # B x V x 3 x S x S uint8
    vae = generator.pipeline.vae
    latents = vae.encode((conditions * 2 - 1).to(vae.dtype)).latent_dist.mean
    round_trip = ((vae.decode(latents).sample.float() + 1) / 2).clamp(0, 1)
    text = vlm.class_text_features(CLASS_NAMES, ("a photo of a {}.",))

    def predict(pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != tuple(vlm.image_size):
            pixels = F.interpolate(pixels, size=vlm.image_size, mode="bilinear", antialias=True, align_corners=False)
        return vlm.logits(vlm.encode_image(pixels, batch_size=256), text).argmax(-1)

    predictions = predict(views.flatten(0, 1).float() / 255).view(n_scenes, -1)
    labels = scenes.labels.to(device)
    colours = len(COLOUR_NAMES)  # class i is colour i % 5, shape i // 5

    def share(hit: torch.Tensor) -> float:
        return hit.float().mean().item()

    return {
        "class": share(predictions == labels[:, None]),
        "colour": share(predictions % colours == labels[:, None] % colours),
        "shape": share(predictions // colours == labels[:, None] // colours),
        "autoencoder": share(predict(round_trip) == labels),
        "source": share(predict(_model_inputs(vlm, scenes.originals()).to(device)) == labels),
    }


def train(
    steps: int = 1100,
    vae_steps: int = 250,
    batch_size: int = 64,
    lr: float = 1e-3,
    vae_lr: float = 2e-3,
    kl_weight: float = 1e-6,
    uncond_fraction: float = 0.1,
    ema_decay: float = 0.995,
    warmup: int = 100,
    seed: int = 0,
    log_every: int = 100,
    eval_every: int = 200,
    scale_scenes: int = 256,
    vlm=None,
):
    """Train a pipeline (see the module doc); returns it (EMA weights, eval mode) and the run's log.
    With ``vlm`` (the world model), every ``eval_every`` steps the curve records the share of 30
    clean scenes' generated views (one each, 10 denoising steps) that it classifies correctly. The
    latent scale is measured on ``scale_scenes`` held-out scenes."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    pipeline = build_pipeline(seed)
    vae, unet, encoder = pipeline.vae, pipeline.unet, pipeline.image_encoder
    noise = torch.Generator().manual_seed(seed * 1_000_003 + 1)
    start, start_cpu = time.perf_counter(), time.process_time()
    curve: list[dict] = []

    def record(row: dict) -> None:
        row.update(wall_s=round(time.perf_counter() - start, 1), cpu_s=round(time.process_time() - start_cpu, 1))
        curve.append(row)
        print(json.dumps(row), flush=True)

    # 1. the autoencoder
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=vae_lr, weight_decay=0.0)
    recent = []
    for step in range(vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, vae_steps, vae_lr, warmup=min(warmup, vae_steps // 5 + 1))
        x = scene_batch(step, seed, batch_size) * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=noise)
        reconstruction = vae.decode(z).sample
        loss = (reconstruction - x).abs().mean() + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent.append(loss.item())
        if (step + 1) % log_every == 0 or step == vae_steps - 1:
            record({"stage": "vae", "step": step + 1, "loss": sum(recent) / len(recent)})
            recent = []
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        held_out = scene_batch(99_999, seed, scale_scenes) * 2 - 1
        latents = vae.encode(held_out).latent_dist.mean
        scaling_factor = 1.0 / latents.std().item()
        reconstruction_l1 = (vae.decode(latents).sample - held_out).abs().mean().item() / 2  # in [0, 1] units
    vae.register_to_config(scaling_factor=scaling_factor)

    # 2. UNet + image encoder, epsilon prediction on SD's noise schedule
    schedule = DDPMScheduler.from_config(pipeline.scheduler.config)
    unet.train()
    encoder.train()
    parameters = [p for m in (unet, encoder) for p in m.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    ema_unet, ema_encoder = copy.deepcopy(unet).eval(), copy.deepcopy(encoder).eval()
    ema_pairs = [
        (e, p)
        for ema_model, model in ((ema_unet, unet), (ema_encoder, encoder))
        for e, p in zip(ema_model.parameters(), model.parameters())
    ]
    recent = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        images = scene_batch(vae_steps + step, seed, batch_size)
        with torch.no_grad():
            latents = vae.encode(images * 2 - 1).latent_dist.mean * scaling_factor
        eps = torch.randn(latents.shape, generator=noise)
        t = torch.randint(0, schedule.config.num_train_timesteps, (len(images),), generator=noise)
        keep = (torch.rand(len(images), generator=noise) >= uncond_fraction).float()[:, None]
        # the pipeline's unconditional embedding is zeros: train it as such for classifier-free guidance
        embedding = encoder(clip_normalise(images)).image_embeds * keep
        prediction = unet(schedule.add_noise(latents, eps, t), t, embedding[:, None]).sample
        loss = F.mse_loss(prediction, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))  # a short warm-up of the average
            for e, p in ema_pairs:
                e.lerp_(p, 1 - decay)
        recent.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            row = {"stage": "unet", "step": step + 1, "loss": sum(recent) / len(recent)}
            recent = []
            if vlm is not None and ((step + 1) % eval_every == 0 or step == steps - 1):
                pipeline.unet, pipeline.image_encoder = ema_unet, ema_encoder
                generator = in_memory_generator(pipeline, n_views=1)
                row["clean_view_share"] = view_class_share(generator, vlm, n_scenes=30, seed=EVAL_SEED + 7)["class"]
                pipeline.unet, pipeline.image_encoder = unet, encoder
            record(row)
    pipeline.unet, pipeline.image_encoder = ema_unet, ema_encoder
    pipeline.set_progress_bar_config(disable=True)
    log = {
        "steps": steps,
        "vae_steps": vae_steps,
        "batch_size": batch_size,
        "lr": lr,
        "vae_lr": vae_lr,
        "kl_weight": kl_weight,
        "uncond_fraction": uncond_fraction,
        "ema_decay": ema_decay,
        "warmup": warmup,
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "vae_scaling_factor": scaling_factor,
        "vae_reconstruction_l1": reconstruction_l1,
        "threads": torch.get_num_threads(),
        "train_wall_s": round(time.perf_counter() - start, 1),
        "train_cpu_s": round(time.process_time() - start_cpu, 1),
        "curve": curve,
    }
    return pipeline, log


def save(pipeline, out: Path) -> None:
    """``save_pretrained`` in fp16 (the hub layout; ``from_pretrained(dtype=torch.float32)`` loads it)."""
    half = copy.deepcopy(pipeline).to(dtype=torch.float16)
    half.save_pretrained(str(out), safe_serialization=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the pipeline into")
    parser.add_argument("--steps", type=int, default=1100, help="UNet + encoder training steps")
    parser.add_argument("--vae-steps", type=int, default=250, help="autoencoder training steps")
    parser.add_argument("--batch-size", type=int, default=64, help="scenes per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate of the UNet and encoder")
    parser.add_argument("--seed", type=int, default=0, help="seed of scenes, noise and initialisation")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=100, help="steps between training-curve rows")
    parser.add_argument("--eval-every", type=int, default=200, help="steps between view-share rows (0: none)")
    parser.add_argument(
        "--eval-scenes", type=int, default=100, help="clean scenes of the final view share (4 views each; 0: none)"
    )
    args = parser.parse_args(argv)
    check_number("--steps", args.steps, 1, integer=True)
    check_number("--vae-steps", args.vae_steps, 1, integer=True)
    check_number("--batch-size", args.batch_size, 2, integer=True)
    check_number("--lr", args.lr, 0, low_open=True)
    check_number("--threads", args.threads, 1, integer=True)
    check_number("--log-every", args.log_every, 1, integer=True)
    check_number("--eval-every", args.eval_every, 0, integer=True)
    check_number("--eval-scenes", args.eval_scenes, 0, integer=True)
    torch.set_num_threads(args.threads)
    vlm = None
    if args.eval_every or args.eval_scenes:
        from tta.models.factory import create_vlm

        vlm = create_vlm("tta-world-resnet")
    pipeline, log = train(
        steps=args.steps,
        vae_steps=args.vae_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        log_every=args.log_every,
        eval_every=args.eval_every if args.eval_every else args.steps + 1,
        vlm=vlm if args.eval_every else None,
    )
    save(pipeline, args.out)
    if args.eval_scenes:
        from tta.augment.diffusion import DiffusionViewGenerator

        # the figure of the file: the saved fp16 folder reloaded as DiffTPT loads it (fp32 on the CPU)
        generator = DiffusionViewGenerator(
            pretrained=str(args.out), n_views=4, num_inference_steps=10, output_size=64, cache_dir=None
        ).load("cpu")
        shares = view_class_share(generator, vlm, n_scenes=args.eval_scenes)
        log["final_clean_view_share"] = {
            "share": shares["class"],
            **{f"{key}_share": shares[key] for key in ("colour", "shape", "autoencoder", "source")},
            "scenes": args.eval_scenes,
            "views_per_scene": 4,
            "num_inference_steps": 10,
            "guidance_scale": 3.0,
            "scene_seed": EVAL_SEED,
            "model": "tta-world-resnet",
        }
        print(json.dumps(log["final_clean_view_share"]), flush=True)
    log["command"] = "python -m tta.world.train_generator " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()
