"""The tiny-CLIP training recipe: a few steps run, the saved local-dir reloads, the asset is small."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from tta.models import create_vlm
from tta.models.factory import SHIPPED_MODELS
from tta.world import render_pairs, render_single
from tta.world.train_clip import save_local_dir, train


@pytest.fixture(scope="module")
def trained():
    return train(steps=3, batch_size=16, log_every=0)


def test_a_few_training_steps_give_an_open_clip_model(trained):
    model, log = trained
    assert isinstance(model, open_clip.CLIP)
    assert not model.training
    assert log["steps"] == 3 and log["batch_size"] == 16
    assert math.isfinite(log["final_loss"]) and log["final_loss"] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_is_seeded():
    _, log_a = train(steps=2, batch_size=8, log_every=0, seed=1)
    _, log_b = train(steps=2, batch_size=8, log_every=0, seed=1)
    assert log_a["final_loss"] == log_b["final_loss"]


def test_saved_local_dir_reloads_with_the_same_features(trained, tmp_path):
    model, _ = trained
    out = save_local_dir(model, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    config = json.loads((out / "open_clip_config.json").read_text())
    assert {"model_cfg", "preprocess_cfg"} <= set(config)

    vlm = create_vlm(f"local-dir:{out}")
    scenes = render_single(8, seed=123)
    captions = scenes.captions + render_pairs(4, seed=123).captions
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    tokenizer = open_clip.get_tokenizer("tta-tiny-clip")
    with torch.no_grad():
        image_expected = F.normalize(model.encode_image((scenes.images - mean) / std), dim=-1)
        text_expected = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        image_features = vlm.encode_image(scenes.images)
        text_features = vlm.encode_text(vlm.tokenize(captions))
    # weights are stored in fp16
    torch.testing.assert_close(image_features, image_expected, atol=5e-3, rtol=0)
    torch.testing.assert_close(text_features, text_expected, atol=5e-3, rtol=0)
    torch.testing.assert_close(vlm.logit_scale, model.logit_scale.exp().detach(), atol=0, rtol=1e-3)


def test_shipped_model_is_small():
    weights = Path(__file__).parents[1] / "tta/assets/tta-world-clip/open_clip_model.safetensors"
    assert SHIPPED_MODELS["tta-world-clip"] == weights.parent.resolve()
    assert weights.stat().st_size <= 16_000_000


def test_sigmoid_recipe_trains_the_siglip_style_twin(tmp_path):
    model, log = train(steps=2, batch_size=8, log_every=0, loss="sigmoid")
    assert log["loss"] == "sigmoid" and math.isfinite(log["final_loss"])
    assert model.logit_bias is not None and float(model.logit_bias) != -10.0  # trained, from SigLIP's init
    vlm = create_vlm(f"local-dir:{save_local_dir(model, tmp_path / 'model', 'tta-tiny-resnet-sigmoid')}")
    assert vlm.logit_bias is not None
    with pytest.raises(ValueError, match="loss"):
        train(steps=1, batch_size=4, loss="hinge")
