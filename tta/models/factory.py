"""One factory for vision-language models: open_clip names, tags, files, local dirs, shipped models."""

from __future__ import annotations

import difflib
import warnings
import zipfile
from pathlib import Path
from typing import Any

import open_clip
import torch

from tta.models.vlm import VisionLanguageModel

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Make the tiny architectures in ``model_configs/`` known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
#: Models shipped inside the package, by name: each an open_clip ``local-dir`` trained on the
#: offline world (``tta.world.train_clip``). ``tta-world-resnet`` is the default model; the
#: ``tta-world-pairs`` models (trained on two-object scenes whose crops keep both objects) serve
#: the compositional groups (``model=tta_world_groups``); the InfoNCE one binds colours to shapes.
SHIPPED_MODELS: dict[str, Path] = {
    name: ASSET_DIR / name
    for name in (
        "tta-world-resnet",
        "tta-world-resnet-siglip",
        "tta-world-vit",
        "tta-world-pairs",
        "tta-world-pairs-siglip",
    )
}
LOCAL_DIR = "local-dir:"


def _resolve(name: str, pretrained: str | None) -> tuple[str, str | None]:
    """Validate ``name``/``pretrained`` before any weights load; return open_clip's arguments."""
    if name in SHIPPED_MODELS:
        return LOCAL_DIR + str(SHIPPED_MODELS[name]), None
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR) :]).expanduser()
        weights = [p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".pth")]
        if not (folder / "open_clip_config.json").is_file() or not weights:
            raise FileNotFoundError(
                f"model folder {folder} needs open_clip_config.json and its weights "
                "(open_clip_model.safetensors) side by side: found "
                f"{sorted(p.name for p in folder.iterdir()) if folder.is_dir() else 'no such folder'}"
            )
        return LOCAL_DIR + str(folder), None
    available = open_clip.list_models()
    if name.replace("/", "-") not in available:
        close = difflib.get_close_matches(name, available + list(SHIPPED_MODELS), n=5)
        raise ValueError(
            f"unknown model name {name!r}; close matches: {close}. Use an open_clip name "
            f"(open_clip.list_models()), a shipped model {list(SHIPPED_MODELS)}, "
            "or 'local-dir:/path/to/folder'"
        )
    if pretrained is None:
        return name, None
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        return name, pretrained
    if not Path(pretrained).expanduser().is_file():
        raise FileNotFoundError(
            f"pretrained={pretrained!r} for {name} is neither an open_clip tag ({tags}) nor an existing "
            "checkpoint file: fix the path, or pass one of the tags"
        )
    return name, str(Path(pretrained).expanduser())


OPENAI_TAG = "openai"


def is_openai_file(path: str | Path) -> bool:
    """Whether a checkpoint file looks like OpenAI's CLIP weights: a TorchScript archive (the format
    OpenAI publishes, e.g. ``ViT-B-16.pt``), a file named so (``ViT-B-16-openai.pt``), or a file of
    the Hugging Face cache of such a repository (``models--timm--vit_base_patch16_clip_224.openai``)."""
    path = Path(path)
    if "openai" in path.name.lower() or any(p.startswith("models--") and "openai" in p.lower() for p in path.parts):
        return True
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def _uses_quick_gelu(model_name: str) -> bool:
    config = open_clip.get_model_config(model_name) or {}
    return bool(config.get("quick_gelu", False))


def create_vlm(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    load_weights: bool = True,
) -> VisionLanguageModel:
    """Build a :class:`VisionLanguageModel` from a model name plus weights.

    ``name``: an open_clip architecture ("ViT-B-16-quickgelu", "RN50-quickgelu",
    "ViT-B-16-SigLIP", the tiny test configs "tta-tiny-clip" ...), a shipped model
    ("tta-world-resnet") or "local-dir:/path".
    ``pretrained``: an open_clip tag ("openai"), a checkpoint file, or None for random weights
    (ignored for shipped and local-dir models, whose folder holds the weights).
    ``load_weights``: False builds the architecture exactly as ``pretrained`` would (activation,
    the tag's preprocessing: size, resize mode, interpolation, mean/std) with random weights and
    no download: for tests of the real architecture offline.

    OpenAI's CLIP weights were trained with QuickGELU. open_clip's plain names ("ViT-B-16",
    "RN50") use GELU, and loading OpenAI's weights into them only warns (for a tag) or says
    nothing (for a file): a silent accuracy loss. Here OpenAI weights (the "openai" tag, or a file
    :func:`is_openai_file` recognises) are always given QuickGELU, with a warning that says so
    when the name did not ask for it.
    """
    register_model_configs()
    model_name, weights = _resolve(name, pretrained)
    tag_config = open_clip.get_pretrained_cfg(model_name, weights) if weights is not None else {}
    openai = weights == OPENAI_TAG or (weights is not None and not tag_config and is_openai_file(weights))
    options: dict[str, Any] = {}
    if openai and not _uses_quick_gelu(model_name):
        warnings.warn(
            f"{pretrained!r} holds OpenAI CLIP weights, trained with QuickGELU, but {name} uses GELU: building it "
            f"with QuickGELU (name the model {name}-quickgelu to say so)",
            stacklevel=2,
        )
        options["force_quick_gelu"] = True
    if not load_weights:
        if tag_config:
            keys = ("mean", "std", "interpolation", "resize_mode")
            options["force_preprocess_cfg"] = {k: tag_config[k] for k in keys if k in tag_config}
            options["force_quick_gelu"] = bool(tag_config.get("quick_gelu", False)) or options.get(
                "force_quick_gelu", False
            )
        weights = None
    try:
        model = open_clip.create_model(model_name, pretrained=weights, device=device, precision=precision, **options)
    except RuntimeError as error:
        if weights is not None and not Path(weights).is_file():
            raise RuntimeError(
                f"could not fetch the {weights!r} weights of {name} ({error}); on a machine without "
                "network, download the checkpoint elsewhere and pass pretrained=/path/to/file"
            ) from error
        raise
    model.eval().requires_grad_(False)
    try:
        tokenizer = open_clip.get_tokenizer(model_name)
    except ImportError as error:  # Hugging Face tokenizers (SigLIP) need transformers, an extra
        raise ImportError(
            f"{name}'s tokenizer needs transformers ({error}): install the extra with pip install 'tta[siglip]'"
        ) from error
    return VisionLanguageModel(model, tokenizer, dict(model.visual.preprocess_cfg), name).to(device)
