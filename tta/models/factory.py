"""One factory for vision-language models: open_clip names, tags, files, local dirs, shipped models."""

from __future__ import annotations

import difflib
from pathlib import Path

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
#: Models shipped inside the package, by name: each an open_clip ``local-dir``.
SHIPPED_MODELS: dict[str, Path] = {"tta-world-clip": ASSET_DIR / "tta-world-clip"}
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


def create_vlm(
    name: str, pretrained: str | None = None, device: str | torch.device = "cpu", precision: str = "fp32"
) -> VisionLanguageModel:
    """Build a :class:`VisionLanguageModel` from a model name plus weights.

    ``name``: an open_clip architecture ("ViT-B-16", "RN50", "ViT-B-16-SigLIP", the tiny test
    configs "tta-tiny-clip" ...), a shipped model ("tta-world-clip") or "local-dir:/path".
    ``pretrained``: an open_clip tag ("openai"), a checkpoint file, or None for random weights
    (ignored for shipped and local-dir models, whose folder holds the weights).
    """
    register_model_configs()
    model_name, weights = _resolve(name, pretrained)
    try:
        model = open_clip.create_model(model_name, pretrained=weights, device=device, precision=precision)
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
