"""The offline world: seeded scenes, class names, captions and domain shifts."""

from __future__ import annotations

import itertools

import pytest
import torch

from tta.world import (
    CLASS_NAMES,
    COLOUR_NAMES,
    DOMAINS,
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


@pytest.mark.parametrize("domain", DOMAINS)
def test_images_are_rgb_64px_in_unit_range(domain):
    scenes = render_domain(domain, 5, N, seed=0)
    assert scenes.images.shape == (N, 3, 64, 64)
    assert scenes.images.dtype == torch.float32
    assert scenes.images.min() >= 0 and scenes.images.max() <= 1
    assert scenes.labels.dtype == torch.long
    assert scenes.labels.min() >= 0 and scenes.labels.max() < len(CLASS_NAMES)
    assert len(scenes.captions) == len(scenes.canonical) == N


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


def difference_from_clean(domain: str, severity: int) -> torch.Tensor:
    """Per-pixel max absolute channel difference between ``domain`` and clean (N x H x W)."""
    clean = render_domain("clean", 1, 32, seed=11).images
    return (render_domain(domain, severity, 32, seed=11).images - clean).abs().amax(1)


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
