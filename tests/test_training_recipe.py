"""The world-CLIP training recipe and its evaluation: a few steps run, the saved local-dir
reloads, the shipped models are the towers their names say and are small."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer

from tta.models import create_vlm
from tta.models.factory import SHIPPED_MODELS
from tta.world import render_pairs, render_single
from tta.world.evaluate import calibrate_levels, knn_agreement, print_properties, world_properties
from tta.world.train_clip import (
    ARCHITECTURES,
    STYLE_WORDS,
    camera_diversity,
    make_batch,
    random_resized_crops,
    save_local_dir,
    train,
)

TINY = {"batch_size": 8, "render_size": 64, "log_every": 0, "curve_n": 8}
TINY_LR_STEP = 3e-3  # one AdamW step at the default peak lr, warm-up's first step included


@pytest.fixture(scope="module")
def trained():
    return train(tower="vit", steps=3, **TINY)


def test_a_few_training_steps_give_an_open_clip_vit(trained):
    model, log = trained
    assert isinstance(model, open_clip.CLIP) and isinstance(model.visual, VisionTransformer)
    assert model.visual.grid_size == (8, 8)  # patch tokens on a grid
    assert not model.training
    assert log["steps"] == 3 and log["batch_size"] == 8 and log["tower"] == "vit"
    (row,) = log["curve"]  # log_every=0: the final row only
    assert row["step"] == 3 and math.isfinite(row["loss"]) and row["loss"] > 0
    assert 0 <= row["clean_accuracy"] <= 1 and row["cpu_s"] > 0 and row["wall_s"] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_is_seeded():
    _, log_a = train(steps=2, seed=1, **TINY)
    _, log_b = train(steps=2, seed=1, **TINY)
    assert log_a["curve"][-1]["loss"] == log_b["curve"][-1]["loss"]


def test_batches_crop_the_originals_and_noise_some_captions():
    batch, affinity = make_batch(3, 0, 64, 0.25, 96, 64, (0.3, 1.0), caption_noise=0.5)
    assert batch.images.shape == (64, 3, 64, 64) and batch.images.min() >= 0 and batch.images.max() <= 1
    clean, _ = make_batch(3, 0, 64, 0.25, 96, 64, (0.3, 1.0), caption_noise=0.0)
    assert torch.equal(batch.images, clean.images)  # the noise draws come after the crops'
    changed = [a != b for a, b in zip(batch.canonical, clean.canonical)]
    assert 0.25 < sum(changed) / len(changed) < 0.6  # half redrawn, a 30th of those to the same class
    for caption, canonical in zip(batch.captions, batch.canonical):
        assert canonical.removeprefix("a ").removesuffix(".") in caption
    # without mixup the affinity is "same content": symmetric, ones on the diagonal
    same = torch.tensor([[a == b for b in batch.canonical] for a in batch.canonical]).float()
    assert torch.equal(affinity, same)
    again, _ = make_batch(3, 0, 64, 0.25, 96, 64, (0.3, 1.0), caption_noise=0.5)
    assert torch.equal(again.images, batch.images) and again.captions == batch.captions


def test_mixup_blends_images_and_their_targets():
    plain, same = make_batch(1, 0, 32, 0.25, 64, 64, (1.0, 1.0), 0.0)
    mixed, affinity = make_batch(1, 0, 32, 0.25, 64, 64, (1.0, 1.0), 0.0, mixup=0.5)
    blended = (mixed.images != plain.images).flatten(1).any(1)
    assert 0 < blended.sum() < 32
    retargeted = (affinity != same).any(1)
    assert retargeted.sum() > 0 and not (retargeted & ~blended).any()  # (a partner may share the content)
    # a blended image weighs 0.5-1 on its own content and the rest on its partner's
    own = (affinity * same).amax(1)[retargeted]
    assert (own >= 0.5).all() and (own < 1).all()


def test_camera_diversity_varies_pictures_but_never_their_hue():
    images = torch.rand(64, 3, 16, 16)
    varied, styles = camera_diversity(images, 0.5, torch.Generator().manual_seed(0))
    assert varied.shape == images.shape and varied.min() >= 0 and varied.max() <= 1
    changed = (varied - images).abs().flatten(1).amax(1) > 1e-6
    assert 0.5 < changed.float().mean() < 1.0
    assert len(styles) == 64 and {s for s in styles if s is not None} <= set(STYLE_WORDS)
    unvaried, no_styles = camera_diversity(images, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(unvaried, images)
    assert no_styles == [None] * 64


def test_distillation_starts_from_the_teachers_text_tower(trained, tmp_path):
    model, log = trained
    teacher = f"local-dir:{save_local_dir(model, tmp_path / 'teacher', log['architecture'])}"
    student, student_log = train(tower="resnet", steps=1, teacher=teacher, **{**TINY, "log_every": 0})
    assert student_log["teacher"] == teacher and isinstance(student.visual, ModifiedResNet)
    # one step from the teacher's text tower (fp16 on disk): still close to it
    torch.testing.assert_close(student.token_embedding.weight, model.token_embedding.weight, atol=TINY_LR_STEP, rtol=0)


def test_random_resized_crops_take_a_part_of_each_image():
    images = torch.zeros(2, 3, 40, 40)
    images[:, :, :20] = 1.0  # top half white
    g = torch.Generator().manual_seed(0)
    crops = random_resized_crops(images, 16, (0.1, 0.2), g)
    assert crops.shape == (2, 3, 16, 16)
    full = random_resized_crops(images, 16, (1.0, 1.0), torch.Generator().manual_seed(0))
    assert (full[:, :, :6] > 0.9).all() and (full[:, :, -6:] < 0.1).all()  # the whole image, maybe flipped


def test_saved_local_dir_reloads_with_the_same_features(trained, tmp_path):
    model, log = trained
    out = save_local_dir(model, tmp_path / "model", log["architecture"])
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    config = json.loads((out / "open_clip_config.json").read_text())
    assert {"model_cfg", "preprocess_cfg"} <= set(config)

    vlm = create_vlm(f"local-dir:{out}")
    scenes = render_single(8, seed=123)
    captions = scenes.captions + render_pairs(4, seed=123).captions
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    tokenizer = open_clip.get_tokenizer(log["architecture"])
    with torch.no_grad():
        image_expected = F.normalize(model.encode_image((scenes.images - mean) / std), dim=-1)
        text_expected = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        image_features = vlm.encode_image(scenes.images)
        text_features = vlm.encode_text(vlm.tokenize(captions))
    # weights are stored in fp16
    torch.testing.assert_close(image_features, image_expected, atol=5e-3, rtol=0)
    torch.testing.assert_close(text_features, text_expected, atol=5e-3, rtol=0)
    torch.testing.assert_close(vlm.logit_scale, model.logit_scale.exp().detach(), atol=0, rtol=1e-3)


@pytest.mark.parametrize(("tower", "visual"), [("vit", VisionTransformer), ("resnet", ModifiedResNet)])
def test_sigmoid_recipe_trains_the_siglip_style_twin(tmp_path, tower, visual):
    model, log = train(tower=tower, loss="sigmoid", steps=2, **TINY)
    assert log["loss"] == "sigmoid" and math.isfinite(log["curve"][-1]["loss"])
    assert isinstance(model.visual, visual)
    assert model.logit_bias is not None and model.logit_bias.item() != -10.0  # trained, from SigLIP's init
    vlm = create_vlm(f"local-dir:{save_local_dir(model, tmp_path / 'model', ARCHITECTURES[tower, 'sigmoid'])}")
    assert vlm.logit_bias is not None


def test_bad_recipe_settings_name_the_choices():
    with pytest.raises(ValueError, match="loss"):
        train(steps=1, loss="hinge", **TINY)
    with pytest.raises(ValueError, match="tower"):
        train(steps=1, tower="mlp", **TINY)
    with pytest.raises(ValueError, match="caption_noise"):
        train(steps=1, caption_noise=1.5, **TINY)


@pytest.mark.parametrize(
    ("name", "visual", "sigmoid"),
    [
        ("tta-world-vit", VisionTransformer, False),
        ("tta-world-resnet", ModifiedResNet, False),
        ("tta-world-resnet-siglip", ModifiedResNet, True),
    ],
)
def test_shipped_models_are_the_towers_their_names_say_and_small(name, visual, sigmoid):
    folder = Path(__file__).parents[1] / "tta/assets" / name
    assert SHIPPED_MODELS[name] == folder.resolve()
    assert (folder / "open_clip_model.safetensors").stat().st_size <= 10_000_000
    vlm = create_vlm(name)
    assert isinstance(vlm.model, open_clip.CLIP) and isinstance(vlm.model.visual, visual)
    assert (vlm.logit_bias is not None) == sigmoid
    assert vlm.image_size == (64, 64)
    log = json.loads((folder / "training_log.json").read_text())
    assert log["tower"] == ("resnet" if visual is ModifiedResNet else "vit")
    assert log["loss"] == ("sigmoid" if sigmoid else "infonce")


def test_knn_agreement_counts_same_label_neighbours():
    features = F.normalize(
        torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, -0.1], [0.0, 1.0], [0.1, 0.99], [-0.1, 0.98]]), dim=-1
    )
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert knn_agreement(features, labels, k=2) == 1.0
    assert knn_agreement(features, torch.tensor([0, 1, 0, 1, 0, 1]), k=2) < 0.5


def test_world_properties_measure_every_domain(trained, tmp_path, capsys):
    model, log = trained
    out = save_local_dir(model, tmp_path / "model", log["architecture"])
    properties = world_properties(f"local-dir:{out}", n=12, views_n=2, n_views=8)
    assert set(properties["domains"]) == {"clean", "noise", "blur", "contrast", "sketch", "texture", "hue"}
    for row in properties["domains"].values():
        assert row["n"] == 12 and 0 <= row["accuracy"] <= 1 and 0 <= row["ece"] <= 1 and 0 <= row["knn_agreement"] <= 1
    assert properties["views"]["n"] == 2 and 0 <= properties["views"]["crops_in_view"] <= 1
    assert 0.15 <= properties["object_box_fraction"]["min"] <= properties["object_box_fraction"]["max"] <= 0.6
    print_properties(properties)
    table = capsys.readouterr().out
    assert all(domain in table for domain in properties["domains"]) and "shifted mean" in table


def test_calibration_picks_levels_between_the_trials(trained, tmp_path):
    model, log = trained
    out = save_local_dir(model, tmp_path / "model", log["architecture"])
    grid = {"blur": (0.5, 4.0), "hue": (0.05, 0.25)}
    result = calibrate_levels(f"local-dir:{out}", n=8, grid=grid)
    assert set(result) == set(grid)
    for name, row in result.items():
        assert len(row["accuracy"]) == 2 and len(row["levels"]) == 5
        low, high = sorted(grid[name])
        assert all(low <= level <= high for level in row["levels"])


def test_style_captions_name_the_camera_variation_and_change_nothing_else():
    args = (3, 0, 64, 0.25, 96, 64, (0.3, 1.0), 0.05)
    plain, plain_affinity = make_batch(*args, diversity=0.3)
    styled, styled_affinity = make_batch(*args, diversity=0.3, style_captions=True)
    torch.testing.assert_close(styled.images, plain.images, rtol=0, atol=0)  # the same pictures
    n_single = 64 - int(64 * 0.25)
    named = [i for i, c in enumerate(styled.captions) if c != plain.captions[i]]
    assert named and all(i < n_single for i in named)  # single-object captions only
    for i in named:
        word = next(w for w in STYLE_WORDS if f"a {w} photo of a " in styled.captions[i])
        assert styled.canonical[i].startswith(f"a {word} ")  # the style is part of the caption's content
    # a styled caption is a positive of its own image, not of an unstyled picture of the same class
    assert not torch.equal(styled_affinity, plain_affinity)
    blurred = [i for i in named if "blurry" in styled.captions[i]]
    assert blurred, "seed 0 step 3 blurs some single-object image at diversity 0.3"


def test_style_captions_need_camera_variations():
    with pytest.raises(ValueError, match="--diversity"):
        train(steps=1, style_captions=True, **TINY)
