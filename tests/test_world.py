"""The offline world: seeded scenes, class names, captions and domain shifts."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from tta.world import (
    CLASS_NAMES,
    COLOUR_NAMES,
    DOMAINS,
    ORIGINAL_SIZE,
    REFERENCE_SIZE,
    RELATIONS,
    SHAPES,
    SHIFTS,
    render_domain,
    render_pairs,
    render_single,
)

N = 16
SHIFTED = [d for d in DOMAINS if d != "clean"]


def assert_same_scenes(a, b):
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)
    assert a.captions == b.captions
    assert a.canonical == b.canonical
    assert torch.equal(a.boxes, b.boxes)


def test_domains_are_clean_plus_every_shift():
    assert DOMAINS[0] == "clean"
    assert set(DOMAINS[1:]) == set(SHIFTS)
    assert set(SHIFTED) == {"noise", "blur", "contrast", "sketch", "texture", "hue"}


def test_class_names_are_every_colour_shape_pair():
    assert len(SHAPES) == 6 and len(COLOUR_NAMES) == 5
    assert len(CLASS_NAMES) == 30 == len(set(CLASS_NAMES))
    assert set(CLASS_NAMES) == {f"{c} {s}" for s in SHAPES for c in COLOUR_NAMES}


@pytest.mark.parametrize("render", [render_single, render_pairs])
def test_scenes_are_deterministic(render):
    assert_same_scenes(render(N, seed=3), render(N, seed=3))


@pytest.mark.parametrize("render", [render_single, render_pairs])
def test_seeds_give_different_scenes(render):
    a, b = render(N, seed=3), render(N, seed=4)
    assert not torch.equal(a.images, b.images)
    assert not torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("domain", DOMAINS)
def test_domains_are_deterministic(domain):
    assert_same_scenes(render_domain(domain, 3, N, seed=7), render_domain(domain, 3, N, seed=7))
    assert not torch.equal(render_domain(domain, 3, N, seed=8).images, render_domain(domain, 3, N, seed=7).images)


@pytest.mark.parametrize("size", [REFERENCE_SIZE, ORIGINAL_SIZE, 160])
@pytest.mark.parametrize("domain", DOMAINS)
def test_images_are_rgb_at_the_size_asked_in_unit_range(domain, size):
    scenes = render_domain(domain, 5, N, seed=0, size=size)
    assert scenes.images.shape == (N, 3, size, size)
    assert scenes.images.dtype == torch.float32
    assert scenes.images.min() >= 0 and scenes.images.max() <= 1
    assert scenes.labels.dtype == torch.long
    assert scenes.labels.min() >= 0 and scenes.labels.max() < len(CLASS_NAMES)
    assert len(scenes.captions) == len(scenes.canonical) == N
    assert scenes.boxes.shape == (N, 4)
    assert (scenes.boxes[:, :2] >= 0).all() and (scenes.boxes[:, 2:] <= size).all()
    assert (scenes.boxes[:, 2:] > scenes.boxes[:, :2]).all()


@pytest.mark.parametrize("render", [render_single, render_pairs])
def test_a_scene_is_the_same_at_any_size(render):
    """Geometry, colours and clutter are drawn in units of the image side: the original resized
    to the model input is the scene rendered at the model input, up to resampling."""
    large = render(64, seed=2, size=ORIGINAL_SIZE)
    small = render(64, seed=2, size=REFERENCE_SIZE)
    assert large.captions == small.captions and torch.equal(large.labels, small.labels)
    resized = TF.resize(large.images, REFERENCE_SIZE, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    difference = (resized.clamp(0, 1) - small.images).abs()
    assert difference.mean() < 0.02, difference.mean()
    torch.testing.assert_close(
        large.boxes / ORIGINAL_SIZE, small.boxes / REFERENCE_SIZE, atol=2 / REFERENCE_SIZE, rtol=0
    )


def test_the_main_object_covers_15_to_60_percent_near_the_centre():
    scenes = render_single(2000, seed=4, size=ORIGINAL_SIZE)
    x0, y0, x1, y1 = (scenes.boxes / ORIGINAL_SIZE).unbind(1)
    fraction = (x1 - x0) * (y1 - y0)
    assert fraction.min() >= 0.15 and fraction.max() <= 0.60, (fraction.min(), fraction.max())
    assert 0.3 < fraction.mean() < 0.45
    centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
    assert ((centre_x - 0.5).abs().max() < 0.2) and ((centre_y - 0.5).abs().max() < 0.2)
    # every class appears, at every size
    assert set(scenes.labels.tolist()) == set(range(len(CLASS_NAMES)))


def test_backgrounds_carry_clutter_and_context():
    """Outside the object's box the background is not flat: a horizon, gradient and clutter items."""
    scenes = render_single(32, seed=6, size=ORIGINAL_SIZE)
    corner = scenes.images[:, :, :24, :24]  # the object's box never reaches a corner this far
    spread = corner.flatten(1).std(1)
    assert (spread > 0.01).float().mean() > 0.8


def test_single_captions_name_the_class():
    scenes = render_single(N, seed=1)
    for caption, label in zip(scenes.captions, scenes.labels.tolist()):
        assert CLASS_NAMES[label] in caption


def test_pair_scenes_show_two_classes_in_a_relation():
    scenes = render_pairs(N, seed=1)
    assert scenes.images.shape == (N, 3, 64, 64)
    assert scenes.images.min() >= 0 and scenes.images.max() <= 1
    for caption, label in zip(scenes.captions, scenes.labels.tolist()):
        relations = [r for r in RELATIONS if f" {r} " in caption]
        assert len(relations) == 1, caption
        first, second = caption.removeprefix("a ").removesuffix(".").split(f" {relations[0]} a ")
        assert first == CLASS_NAMES[label]
        assert second in CLASS_NAMES and second != first


@pytest.mark.parametrize("domain", SHIFTED)
def test_shifted_domain_shows_the_clean_scenes_changed(domain):
    clean = render_domain("clean", 1, N, seed=5)
    shifted = render_domain(domain, 3, N, seed=5)
    assert torch.equal(shifted.labels, clean.labels)
    assert shifted.captions == clean.captions
    assert (shifted.images - clean.images).abs().mean() > 1e-3


@pytest.mark.parametrize("severity", [0, 6, -1])
@pytest.mark.parametrize("domain", SHIFTED)
def test_severity_outside_1_to_5_is_rejected(domain, severity):
    with pytest.raises(ValueError, match=r"1\.\.5"):
        render_domain(domain, severity, 2, seed=0)


def test_unknown_domain_names_the_choices():
    with pytest.raises(ValueError) as info:
        render_domain("fog", 3, 2, seed=0)
    message = str(info.value)
    assert "fog" in message
    assert all(domain in message for domain in DOMAINS)


def difference_from_clean(domain: str, severity: int, size: int = REFERENCE_SIZE) -> torch.Tensor:
    """Per-pixel max absolute channel difference between ``domain`` and clean (N x H x W)."""
    clean = render_domain("clean", 1, 32, seed=11, size=size).images
    return (render_domain(domain, severity, 32, seed=11, size=size).images - clean).abs().amax(1)


@pytest.mark.parametrize("domain", ["noise", "blur", "contrast", "hue", "texture"])
def test_pixel_change_grows_with_severity(domain):
    change = [difference_from_clean(domain, s).mean().item() for s in range(1, 6)]
    assert all(a <= b for a, b in itertools.pairwise(change)), change
    assert change[-1] > change[0]


def test_sketch_outline_covers_less_with_severity():
    # The sketch scene keeps the clean background and the band of the object just inside its
    # outline; the rest of the object shows background, so the pixels that differ from clean
    # are the part of the object the outline no longer covers.
    uncovered = [(difference_from_clean("sketch", s) > 1e-6).float().mean().item() for s in range(1, 6)]
    assert all(a < b for a, b in itertools.pairwise(uncovered)), uncovered


@pytest.mark.parametrize("domain", SHIFTED)
def test_a_shift_is_the_same_at_any_size(domain):
    """Spatial levels (blur sigma, noise sigma, outline width) scale with the image, so a shift
    changes the scene as much at any size: compared on 16 x 16 area averages (the noise sigma
    scales as white noise does, with the same power per unit of area; a resize's antialiasing
    filter would remove a kernel-dependent part of it)."""

    def change(size: int) -> torch.Tensor:
        clean = render_domain("clean", 1, 32, seed=12, size=size).images
        shifted = render_domain(domain, 3, 32, seed=12, size=size).images
        return (F.adaptive_avg_pool2d(shifted, 16) - F.adaptive_avg_pool2d(clean, 16)).abs().mean()

    ratio = change(ORIGINAL_SIZE) / change(REFERENCE_SIZE)
    assert 0.75 < ratio < 1.33, ratio


def test_blur_and_noise_levels_scale_with_the_size():
    images = torch.full((1, 3, 32, 32), 0.5)
    g = torch.Generator().manual_seed(0)
    noise = SHIFTS["noise"]
    at_reference = (noise.apply(images, 3, g, scale=1.0) - 0.5).std()
    at_twice = (noise.apply(images, 3, torch.Generator().manual_seed(0), scale=2.0) - 0.5).std()
    assert abs(at_twice / at_reference - 2) < 0.2
    edge = torch.zeros(1, 3, 64, 64)
    edge[..., 32:] = 1
    blur = SHIFTS["blur"]
    width = [
        (blur.apply(edge, 3, g, scale=s)[0, 0, 0] > 0.05)
        .logical_and(blur.apply(edge, 3, g, scale=s)[0, 0, 0] < 0.95)
        .sum()
        for s in (1.0, 2.0)
    ]
    assert width[1] > 1.6 * width[0], width
