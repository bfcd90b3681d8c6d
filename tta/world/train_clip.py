"""Recipe: train a world CLIP from scratch and ship it as an open_clip ``local-dir``.

    python -m tta.world.train_clip --out tta/assets/tta-world-resnet
    python -m tta.world.train_clip --out tta/assets/tta-world-resnet-siglip --loss sigmoid
    python -m tta.world.train_clip --out tta/assets/tta-world-vit --tower vit --teacher tta-world-resnet
    python -m tta.world.train_clip --out tta/assets/tta-world-pairs --diversity 0.3 --pair-fraction 0.5 \
        --pair-crops keep --hard-negatives 0.1 --eval-n 300

Seeded end to end (scenes, crops, caption noise, initialisation, batch order). Every step draws
a fresh batch of clean scenes (75% object-centric single objects, 25% two objects with a
relation) rendered at ``render_size`` and cut to the model input by a random-resized crop +
flip, as CLIP's own training does, over a wide range of scales: a crop may cut the object, and
its caption still names it, so the model sees genuinely ambiguous pictures. A fraction
``caption_noise`` of the captions name a random other class (web captions are noisy). Both
keep the learned logit scale finite: a clean, unambiguous training set drives it to CLIP's cap
of 100 and the model to overconfidence under shift. Captions come from seven templates; the
loss is the symmetric InfoNCE with soft targets (captions that describe the same content are
positives of each other, so the many same-class pairs of a batch are not pushed apart), or
with ``--loss sigmoid`` SigLIP's pairwise sigmoid loss with a learned logit bias and the same
positives (the SigLIP-style twin). ``--tower`` picks the image tower: a small ViT (patch
tokens on an 8 x 8 grid) or a small ResNet. Weights are stored in fp16 (the 49408-row token
embedding dominates the size); the shipped model is evaluated after reloading, so the reported
figures are those of the file. Run it with ``--help`` for the settings.

The compositional options (off by default, so the shipped object-centric models reproduce bit
for bit) train a model that binds colours to shapes, for the compositional groups:
``pair_fraction`` raises the share of two-object scenes, ``pair_crops="keep"`` enlarges and
places each pair scene's crop so that both objects stay in view (a crop that cuts one out leaves
a caption that names something absent), and ``hard_negatives`` adds, for that fraction of the
pair scenes, its caption with one swap (relation, colour or shape, as the groups swap) as an
extra negative caption: NegCLIP's recipe (Yuksekgonul et al., "When and why vision-language models behave like
bags-of-words", ICLR 2023), which makes word order matter to the loss.

``style_captions`` (off by default; a diagnostic of docs/world.md, "What limits TPT, STS and
LAME") makes the context of a caption carry information, as web captions do: a single-object
caption names the camera variation its image shows ("a blurry photo of a red circle.").
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

from tta.models.factory import MODEL_CONFIG_DIR, create_vlm, register_model_configs
from tta.validation import check_number
from tta.world.groups import SWAP_KINDS, _swapped
from tta.world.scenes import (
    _SHAPE_REACH,
    CAPTION_TEMPLATES,
    CLASS_NAMES,
    REFERENCE_SIZE,
    RELATIONS,
    Scenes,
    pair_caption,
    render_pairs,
    render_single,
)
from tta.world.shifts import gaussian_blur

#: open_clip architecture per (image tower, loss): the CLIP-style models (InfoNCE) and the
#: SigLIP-style ones (sigmoid loss, learned logit bias; same towers).
ARCHITECTURES: dict[tuple[str, str], str] = {
    ("vit", "infonce"): "tta-tiny-vit",
    ("vit", "sigmoid"): "tta-tiny-vit-sigmoid",
    ("resnet", "infonce"): "tta-tiny-clip",
    ("resnet", "sigmoid"): "tta-tiny-resnet-sigmoid",
}
TOWERS = ("resnet", "vit")
#: Steps per tower when not given: where each tower's clean accuracy levels off on the 2-core CPU
#: (the ResNet from ~500 steps; the ViT is still rising at 1200, the CPU budget's end).
DEFAULT_STEPS = {"resnet": 600, "vit": 1200}
LOSSES = ("infonce", "sigmoid")
#: How pair scenes are cropped: "any" like single scenes (a crop may cut an object out), "keep"
#: enlarged and placed so that both objects stay in view.
PAIR_CROPS = ("any", "keep")
#: Every two-object caption and its content (first class, relation, second class).
PAIR_CONTENT: dict[str, tuple[int, int, int]] = {
    pair_caption(a, r, b): (a, r, b)
    for a in range(len(CLASS_NAMES))
    for b in range(len(CLASS_NAMES))
    for r in range(len(RELATIONS))
    if a != b
}


def random_resized_crops(
    images: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    g: torch.Generator,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """One random-resized crop (area fraction in ``scale``, aspect ratio 3/4-4/3) + random
    horizontal flip per image, resampled to ``size`` x ``size`` (bilinear, antialiased).

    ``keep`` (N x 4: x0, y0, x1, y1 as fractions of the side): each crop is enlarged to hold
    its box and placed at random among the positions that do; a box with x0 > x1 and
    y0 > y1 (e.g. 1, 1, 0, 0) constrains nothing."""
    n, _, height, width = images.shape
    area = torch.empty(n).uniform_(*scale, generator=g)
    aspect = torch.exp(torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g))
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the side
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    if keep is None:
        x0 = torch.rand(n, generator=g) * (1 - w)
        y0 = torch.rand(n, generator=g) * (1 - h)
    else:
        w = torch.maximum(w, keep[:, 2] - keep[:, 0]).clamp(max=1.0)
        h = torch.maximum(h, keep[:, 3] - keep[:, 1]).clamp(max=1.0)
        # the crop's left edge lies between (box's right edge - w) and the box's left edge
        low_x, high_x = (keep[:, 2] - w).clamp(min=0), torch.minimum(keep[:, 0], 1 - w)
        low_y, high_y = (keep[:, 3] - h).clamp(min=0), torch.minimum(keep[:, 1], 1 - h)
        x0 = low_x + torch.rand(n, generator=g) * (high_x - low_x)
        y0 = low_y + torch.rand(n, generator=g) * (high_y - low_y)
    flip = torch.rand(n, generator=g) < 0.5
    crops = []
    for i in range(n):
        top, left = int(y0[i] * height), int(x0[i] * width)
        crop = images[i : i + 1, :, top : top + max(1, int(h[i] * height)), left : left + max(1, int(w[i] * width))]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        crops.append(crop.flip(-1) if flip[i] else crop)
    return torch.cat(crops).clamp(0, 1)


def pair_boxes(n: int, seed: int, size: int) -> torch.Tensor:
    """N x 4 box (x0, y0, x1, y1, fractions of the side) around both objects of
    ``render_pairs(n, seed, size)``'s scenes: the layout replayed from the same random stream
    (``render_pairs`` then ``draw_pairs``), each object within ``_SHAPE_REACH`` radii of its
    centre plus a pixel of anti-aliasing."""
    g = torch.Generator().manual_seed(seed)
    torch.randint(0, len(CLASS_NAMES), (n,), generator=g)  # first
    torch.randint(1, len(CLASS_NAMES), (n,), generator=g)  # offset of the second
    relation = torch.randint(0, len(RELATIONS), (n,), generator=g)
    radius = (torch.rand(n, 2, generator=g) * 0.05 + 0.11) * size
    half = size / 2
    along = radius + torch.rand(n, 2, generator=g) * (half - 2 * radius)
    across = radius + torch.rand(n, 2, generator=g) * (size - 2 * radius)
    sign = torch.tensor([0.0, 1.0, 0.0, 1.0])[relation]
    along = torch.stack([along[:, 0] + sign * half, along[:, 1] + (1 - sign) * half], 1)
    horizontal = (relation < 2).unsqueeze(1)
    cx, cy = torch.where(horizontal, along, across), torch.where(horizontal, across, along)
    reach = _SHAPE_REACH * radius + 1
    boxes = torch.stack([(cx - reach).amin(1), (cy - reach).amin(1), (cx + reach).amax(1), (cy + reach).amax(1)], 1)
    return (boxes / size).clamp(0, 1)


def hard_negative(canonical: str, kind: str) -> str | None:
    """NegCLIP's hard negative of a two-object caption: the caption of the scene with one swap
    ("relation", "colour" or "shape", as :mod:`tta.world.groups` swaps); None for a
    caption that is not a two-object one."""
    if canonical not in PAIR_CONTENT:
        return None
    first, relation, second = PAIR_CONTENT[canonical]
    other_first, other_second = _swapped(torch.tensor([first]), torch.tensor([second]), kind)
    negative = pair_caption(int(other_first), relation, int(other_second))
    # a swap of two objects that share the swapped attribute changes nothing: no negative
    return None if negative == canonical else negative


def camera_diversity(images: torch.Tensor, p: float, g: torch.Generator) -> tuple[torch.Tensor, list[str | None]]:
    """Photographs vary: each of brightness/contrast/saturation jitter (±15%, x0.6-1.4, x0.5-1.5),
    a slight blur (sigma 0.3-1.2 px) and sensor noise (sigma up to 0.04) hits an image with
    probability ``p``, at a random strength. Hue never changes: colour is half of every label.

    Also returns each image's style word, as a web caption would name what it sees ("a blurry photo
    of ..."): the first of ``STYLE_WORDS`` that applies, or None (no variation, or one too weak to
    name)."""
    n = len(images)
    hit = torch.rand(n, 3, generator=g) < p
    brightness = torch.where(hit[:, 0], torch.empty(n).uniform_(-0.15, 0.15, generator=g), 0.0).view(n, 1, 1, 1)
    contrast = torch.where(hit[:, 0], torch.empty(n).uniform_(0.6, 1.4, generator=g), 1.0).view(n, 1, 1, 1)
    saturation = torch.where(hit[:, 0], torch.empty(n).uniform_(0.5, 1.5, generator=g), 1.0).view(n, 1, 1, 1)
    grey = images.mean(1, keepdim=True)
    images = grey + (images - grey) * saturation
    mean = images.mean((1, 2, 3), keepdim=True)
    images = (images - mean) * contrast + mean + brightness
    sigma = float(torch.empty(()).uniform_(0.3, 1.2, generator=g))  # one blur strength per batch
    images = torch.where(hit[:, 1].view(n, 1, 1, 1), gaussian_blur(images, sigma, g), images)
    noise = torch.randn(images.shape, generator=g)
    noise_sigma = torch.empty(n, 1, 1, 1).uniform_(0, 0.04, generator=g)  # drawn after the noise, as always
    noise = noise * noise_sigma
    images = images + noise * hit[:, 2].view(n, 1, 1, 1)
    shown = {
        "blurry": hit[:, 1],
        "noisy": hit[:, 2] & (noise_sigma.flatten() > 0.02),
        "dark": brightness.flatten() < -0.08,
        "bright": brightness.flatten() > 0.08,
        "low contrast": contrast.flatten() < 0.8,
    }
    styles = [next((word for word in STYLE_WORDS if shown[word][i]), None) for i in range(n)]
    return images.clamp(0, 1), styles


#: the camera variations a caption names with ``style_captions`` ("a blurry photo of a red circle."),
#: in the order of precedence when an image shows several
STYLE_WORDS = ("blurry", "noisy", "dark", "bright", "low contrast")


def make_batch(
    step: int,
    seed: int,
    batch_size: int,
    pair_fraction: float,
    render_size: int,
    image_size: int,
    crop_scale: tuple[float, float],
    caption_noise: float,
    diversity: float = 0.0,
    mixup: float = 0.0,
    pair_crops: str = "any",
    hard_negatives: float = 0.0,
    style_captions: bool = False,
) -> tuple[Scenes, torch.Tensor]:
    """Step ``step``'s batch (scenes, crops, camera diversity, caption noise and mixup drawn
    from ``seed`` and ``step``) and its ``B x T`` image-caption affinity: 1 where caption j
    describes the content of image i, fractions for mixed images.

    ``T = B`` unless ``hard_negatives`` > 0: then the batch's ``captions`` and ``canonical``
    hold the B captions of the images followed by one hard negative (:func:`hard_negative`, its
    swap kind drawn at random) for each two-object caption drawn with probability
    ``hard_negatives``: texts without an image of their own."""
    if pair_crops not in PAIR_CROPS:
        raise ValueError(f"pair_crops must be one of {PAIR_CROPS}, got {pair_crops!r}")
    n_pairs = int(batch_size * pair_fraction)
    base = seed * 1_000_003 + step * 2
    single = render_single(batch_size - n_pairs, base, render_size)
    pairs = render_pairs(n_pairs, base + 1, render_size)
    g = torch.Generator().manual_seed(base + 7)
    keep = None
    if pair_crops == "keep":  # single scenes' crops stay unconstrained
        free = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(batch_size - n_pairs, 4)
        keep = torch.cat([free, pair_boxes(n_pairs, base + 1, render_size)])
    images = random_resized_crops(torch.cat([single.images, pairs.images]), image_size, crop_scale, g, keep)
    captions, canonical = single.captions + pairs.captions, single.canonical + pairs.canonical
    noisy = (torch.rand(batch_size, generator=g) < caption_noise).nonzero().flatten().tolist()
    other = torch.randint(0, len(CLASS_NAMES), (batch_size,), generator=g).tolist()
    template = torch.randint(0, len(CAPTION_TEMPLATES), (batch_size,), generator=g).tolist()
    for i in noisy:  # the caption of another class: its content, not the image's, sets its positives
        captions[i] = CAPTION_TEMPLATES[template[i]].format(CLASS_NAMES[other[i]])
        canonical[i] = f"a {CLASS_NAMES[other[i]]}."
    labels = torch.cat([single.labels, pairs.labels])
    if diversity > 0:
        images, styles = camera_diversity(images, diversity, g)
        if style_captions:  # single-object captions name the picture's style; it joins their content
            for i, style in enumerate(styles[: batch_size - n_pairs]):
                if style is not None:
                    name = CLASS_NAMES[other[i]] if i in noisy else CLASS_NAMES[int(labels[i])]
                    captions[i] = f"a {style} photo of a {name}."
                    canonical[i] = f"a {style} {name}."
    texts = list(canonical)
    if hard_negatives > 0:  # drawn after every other draw: the batch without them is unchanged
        kinds = torch.randint(0, len(SWAP_KINDS), (batch_size,), generator=g).tolist()
        chosen = (torch.rand(batch_size, generator=g) < hard_negatives).tolist()
        negatives = [hard_negative(c, SWAP_KINDS[k]) for c, k, pick in zip(canonical, kinds, chosen) if pick]
        negatives = [c for c in negatives if c is not None]
        captions += negatives
        texts += negatives
    ids = {c: i for i, c in enumerate(dict.fromkeys(texts))}
    content = torch.tensor([ids[c] for c in texts])
    same = (content[:batch_size, None] == content[None, :]).float()
    # mixup: a fraction of the images blended with another image of the batch, weight 0.5-1 on its own
    mixed = torch.rand(batch_size, generator=g) < mixup
    partner = torch.randperm(batch_size, generator=g)
    weight = torch.where(mixed, torch.empty(batch_size).uniform_(0.5, 1.0, generator=g), 1.0)
    images = weight.view(-1, 1, 1, 1) * images + (1 - weight.view(-1, 1, 1, 1)) * images[partner]
    affinity = weight[:, None] * same + (1 - weight[:, None]) * same[partner]
    return Scenes(images, labels, captions, texts, torch.cat([single.boxes, pairs.boxes])), affinity


def soft_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, affinity: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: image i's targets are the captions in proportion to
    ``affinity[i]`` (every caption with the same content is a positive), caption j's the images
    in proportion to ``affinity[:, j]``. Texts beyond the first B (hard negatives, which have no
    image of their own) join the image-to-text direction only, as in NegCLIP."""
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    n = len(image_features)
    image_to_text = affinity / affinity.sum(1, keepdim=True)
    text_to_image = affinity.T[:n] / affinity.T[:n].sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, image_to_text) + F.cross_entropy(logits.T[:n], text_to_image))


def soft_sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    affinity: torch.Tensor,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss with the affinity as the pair's label (1: every caption
    with the same content is a positive; fractions for mixed images); hard negatives are more
    columns, each pair of image and text one binary term."""
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    return F.binary_cross_entropy_with_logits(logits + logit_bias, affinity, reduction="sum") / len(logits)


@torch.no_grad()
def clean_accuracy(model: torch.nn.Module, tokenizer, mean: torch.Tensor, std: torch.Tensor, n: int = 300) -> float:
    """Zero-shot accuracy ("a photo of a {}.") on ``n`` unseen clean scenes at the model input
    size: the training curve's check (the recipe's evaluation measures the saved file)."""
    scenes = render_single(n, seed=99_991, size=REFERENCE_SIZE)
    text = F.normalize(model.encode_text(tokenizer([f"a photo of a {c}." for c in CLASS_NAMES])), dim=-1)
    image = F.normalize(model.encode_image((scenes.images - mean) / std), dim=-1)
    return ((image @ text.T).argmax(-1) == scenes.labels).float().mean().item()


def train(
    tower: str = "resnet",
    loss: str = "infonce",
    steps: int | None = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    warmup: int = 50,
    pair_fraction: float = 0.25,
    render_size: int = 96,
    crop_scale: tuple[float, float] = (0.3, 1.0),
    caption_noise: float = 0.05,
    diversity: float = 0.0,
    mixup: float = 0.0,
    pair_crops: str = "any",
    hard_negatives: float = 0.0,
    style_captions: bool = False,
    teacher: str | None = None,
    distill_weight: float = 1.0,
    seed: int = 0,
    log_every: int = 50,
    curve_n: int = 300,
) -> tuple[torch.nn.Module, dict]:
    """Train the ``tower`` ("vit" or "resnet") world CLIP from scratch with ``loss`` ("infonce":
    CLIP-style, "sigmoid": SigLIP-style); returns the model (eval mode) and the run's log,
    whose ``curve`` holds one row per ``log_every`` steps (0: only the final row), with the
    clean accuracy on ``curve_n`` unseen scenes.

    ``diversity``: probability of each camera variation (:func:`camera_diversity`); ``mixup``:
    fraction of images blended with another one, their targets in proportion. ``pair_fraction``,
    ``pair_crops`` and ``hard_negatives``: the compositional options (module docstring). ``teacher`` (a
    model name for ``create_vlm``): distil its image embeddings into this model (DeiT's remedy
    for a ViT's hunger for data): the text tower and logit scale start from the teacher's, and
    ``distill_weight`` x (1 - cosine to the teacher's embedding of the same picture) joins the loss.
    """
    if (tower, loss) not in ARCHITECTURES:
        raise ValueError(f"tower must be one of {TOWERS} and loss one of {LOSSES}, got {tower!r}, {loss!r}")
    steps = DEFAULT_STEPS[tower] if steps is None else steps
    for name, value in (("caption_noise", caption_noise), ("diversity", diversity), ("mixup", mixup)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} is a probability in [0, 1), got {value}")
    check_number("pair_fraction", pair_fraction, 0, 1)  # the fraction of a batch that is two-object scenes
    if style_captions and diversity == 0:
        raise ValueError("style_captions names the camera variations of --diversity: give --diversity > 0 with it")
    check_number("hard_negatives", hard_negatives, 0, 1)  # the fraction of two-object captions given one
    if pair_crops not in PAIR_CROPS:
        raise ValueError(f"pair_crops must be one of {PAIR_CROPS}, got {pair_crops!r}")
    architecture = ARCHITECTURES[tower, loss]
    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(architecture)
    tokenizer = open_clip.get_tokenizer(architecture)
    teacher_vlm = None
    if teacher is not None:
        teacher_vlm = create_vlm(teacher)
        own = model.state_dict()
        shared = {
            k: v
            for k, v in teacher_vlm.model.state_dict().items()
            if not k.startswith("visual.") and k in own and own[k].shape == v.shape
        }
        model.load_state_dict(shared, strict=False)
    image_size = model.visual.preprocess_cfg["size"]
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    start, start_cpu = time.perf_counter(), time.process_time()
    curve, recent = [], []
    for step in range(steps):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch, affinity = make_batch(
            step,
            seed,
            batch_size,
            pair_fraction,
            render_size,
            image_size,
            crop_scale,
            caption_noise,
            diversity,
            mixup,
            pair_crops,
            hard_negatives,
            style_captions,
        )
        image_features = model.encode_image((batch.images - mean) / std)
        text_features = model.encode_text(tokenizer(batch.captions))
        if loss == "sigmoid":
            value = soft_sigmoid_loss(image_features, text_features, model.logit_scale, model.logit_bias, affinity)
        else:
            value = soft_clip_loss(image_features, text_features, model.logit_scale, affinity)
        if teacher_vlm is not None:
            with torch.no_grad():
                target = teacher_vlm.encode_image(batch.images)
            value = value + distill_weight * (1 - (F.normalize(image_features, dim=-1) * target).sum(-1)).mean()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap
        recent.append(value.item())
        if (log_every and (step + 1) % log_every == 0) or step == steps - 1:
            model.eval()
            row = {
                "step": step + 1,
                "loss": sum(recent) / len(recent),
                "logit_scale": model.logit_scale.exp().item(),
                "clean_accuracy": clean_accuracy(model, tokenizer, mean, std, curve_n),
                "wall_s": time.perf_counter() - start,
                "cpu_s": time.process_time() - start_cpu,
            }
            if loss == "sigmoid":
                row["logit_bias"] = model.logit_bias.item()
            curve.append(row)
            recent = []
            print(json.dumps(row), flush=True)
    model.eval()
    log = {
        "tower": tower,
        "loss": loss,
        "architecture": architecture,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "warmup": warmup,
        "pair_fraction": pair_fraction,
        "render_size": render_size,
        "crop_scale": list(crop_scale),
        "caption_noise": caption_noise,
        "diversity": diversity,
        "mixup": mixup,
        "pair_crops": pair_crops,
        "hard_negatives": hard_negatives,
        "style_captions": style_captions,
        "teacher": teacher,
        "distill_weight": distill_weight if teacher is not None else None,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "train_wall_s": time.perf_counter() - start,
        "train_cpu_s": time.process_time() - start_cpu,
        "curve": curve,
    }
    return model, log


def save_local_dir(model: torch.nn.Module, out_dir: Path, architecture: str) -> Path:
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
    parser.add_argument("--tower", choices=TOWERS, default="resnet", help="the image tower: a small ResNet or ViT")
    parser.add_argument(
        "--loss", choices=LOSSES, default="infonce", help="infonce: CLIP-style; sigmoid: SigLIP-style (logit bias)"
    )
    parser.add_argument("--steps", type=int, help=f"default: {DEFAULT_STEPS}")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=(0.3, 1.0), help="training crops' area range")
    parser.add_argument("--caption-noise", type=float, default=0.05, help="fraction of captions naming another class")
    parser.add_argument("--diversity", type=float, default=0.0, help="probability of each camera variation")
    parser.add_argument("--mixup", type=float, default=0.0, help="fraction of images blended with another")
    parser.add_argument(
        "--pair-fraction", type=float, default=0.25, help="fraction of each batch that is two-object scenes"
    )
    parser.add_argument(
        "--pair-crops", choices=PAIR_CROPS, default="any", help="keep: pair scenes' crops keep both objects in view"
    )
    parser.add_argument(
        "--hard-negatives",
        type=float,
        default=0.0,
        help="NegCLIP: this fraction of the two-object captions, each with one swap (relation, colour or shape), "
        "as extra negative captions",
    )
    parser.add_argument(
        "--style-captions",
        action="store_true",
        help="single-object captions name the camera variation an image shows ('a blurry photo of a ...'); "
        "needs --diversity",
    )
    parser.add_argument("--teacher", help="a model to distil image embeddings from (e.g. tta-world-resnet)")
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-n", type=int, default=1000, help="scenes per domain for the evaluation table")
    args = parser.parse_args(argv)
    model, log = train(
        tower=args.tower,
        loss=args.loss,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        crop_scale=tuple(args.crop_scale),
        caption_noise=args.caption_noise,
        diversity=args.diversity,
        mixup=args.mixup,
        pair_fraction=args.pair_fraction,
        pair_crops=args.pair_crops,
        hard_negatives=args.hard_negatives,
        style_captions=args.style_captions,
        teacher=args.teacher,
        distill_weight=args.distill_weight,
        seed=args.seed,
        log_every=args.log_every,
    )
    save_local_dir(model, args.out, log["architecture"])
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    from tta.world.evaluate import print_properties, world_properties  # evaluates the saved file

    properties = world_properties(f"local-dir:{args.out}", n=args.eval_n)
    log["properties"] = properties
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print_properties(properties)


if __name__ == "__main__":
    main()
