"""The math of the view-based methods on hand-made tensors and tiny models (no Lightning)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tta.augment import make_views
from tta.methods.entropy import entropy, marginal_entropy, n_confident, select_confident
from tta.methods.sts import gavish_donoho_omega, spectral_basis, steered_prototypes, sts_adapt
from tta.methods.tpt import tpt_adapt
from tta.methods.views import confident_view_average
from tta.models import PromptLearner, create_vlm
from tta.world import CLASS_NAMES, render_single


def test_kept_view_count_is_6_of_64():
    assert n_confident(64, 0.1) == 6
    assert n_confident(5, 0.1) == 1
    logits = torch.randn(3, 64, 10)
    assert select_confident(logits, 0.1).shape == (3, 6)


def test_selection_keeps_the_lowest_entropy_views_original_included():
    # view v has logits scaled by v: higher scale, lower entropy; view 0 is made the sharpest
    base = torch.tensor([3.0, 1.0, 0.0, -1.0])
    scales = torch.arange(1, 21, dtype=torch.float32)
    scales[0] = 100.0
    logits = (scales[:, None] * base).unsqueeze(0)  # 1 x 20 x 4
    kept = select_confident(logits, 0.1)[0].tolist()
    assert kept == [0, 19]


def test_marginal_entropy_is_entropy_of_the_averaged_probability():
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0]]])  # two confident views that disagree
    averaged = logits.softmax(-1).mean(1)
    expected = -(averaged * averaged.log()).sum(-1)
    assert torch.allclose(marginal_entropy(logits), expected, atol=1e-6)
    assert marginal_entropy(logits).item() == pytest.approx(math.log(2), abs=1e-3)
    assert entropy(logits).mean().item() < 0.1  # the mean of per-view entropies is not the objective


def test_marginal_entropy_is_stable_for_extreme_logits():
    logits = torch.tensor([[[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]]])
    value = marginal_entropy(logits)
    assert torch.isfinite(value).all() and value.item() == pytest.approx(math.log(2), abs=1e-4)


def _tiny_world_views(vlm, n_images=3, n_views=16):
    images = render_single(n_images, seed=5).images
    views = make_views(list(images), images, n_views, seeds=list(range(n_images)))
    with torch.no_grad():
        return vlm.encode_image(views.flatten(0, 1)).view(n_images, n_views, -1)


@pytest.fixture(scope="module")
def world_vlm():
    return create_vlm("tta-world-resnet")


def test_tpt_first_adamw_step_moves_each_context_element_by_lr_times_sign(world_vlm):
    prompt = PromptLearner(world_vlm, CLASS_NAMES)
    features = _tiny_world_views(world_vlm, n_images=1)
    lr, wd = 5e-3, 0.01
    out = tpt_adapt(prompt, features, world_vlm.logits, lr=lr, weight_decay=wd)
    # the gradient of the loss at the initial context, computed independently
    context = prompt.initial_context.clone().unsqueeze(0).requires_grad_(True)
    kept = features[0, out.selected[0]].unsqueeze(0)
    marginal_entropy(world_vlm.logits(kept, prompt.text_features(context))).sum().backward()
    grad = context.grad[0]
    expected = prompt.initial_context * (1 - lr * wd) - lr * torch.sign(grad)
    big = grad.abs() > 1e-6  # where |grad| is far above Adam's eps the step is exactly lr * sign
    assert big.float().mean() > 0.9
    assert torch.allclose(out.variables[0][big], expected[big], atol=1e-6)


def test_tpt_batched_equals_one_image_at_a_time(world_vlm):
    prompt = PromptLearner(world_vlm, CLASS_NAMES)
    features = _tiny_world_views(world_vlm, n_images=4)
    together = tpt_adapt(prompt, features, world_vlm.logits)
    alone = [tpt_adapt(prompt, features[i : i + 1], world_vlm.logits) for i in range(4)]
    assert torch.allclose(together.logits, torch.cat([a.logits for a in alone]), atol=1e-5)
    assert torch.allclose(together.variables, torch.cat([a.variables for a in alone]), atol=1e-6)
    assert torch.equal(together.logits.argmax(-1), torch.cat([a.logits for a in alone]).argmax(-1))


def test_tpt_changes_the_prediction_logits(world_vlm):
    prompt = PromptLearner(world_vlm, CLASS_NAMES)
    features = _tiny_world_views(world_vlm, n_images=2)
    out = tpt_adapt(prompt, features, world_vlm.logits)
    zero_shot = world_vlm.logits(features[:, 0], world_vlm.class_text_features(CLASS_NAMES, ["a photo of a {}."]))
    assert not torch.allclose(out.logits, zero_shot, atol=1e-4)
    assert torch.allclose(out.logits, zero_shot, atol=5.0)  # one small step, not a different model


@pytest.mark.parametrize("name", ["tta-tiny-clip", "tta-tiny-customtext", "tta-tiny-sigmoid"])
def test_tpt_runs_on_every_tower_kind(name):
    torch.manual_seed(0)
    vlm = create_vlm(name)
    prompt = PromptLearner(vlm, CLASS_NAMES[:6])
    features = _tiny_world_views(vlm, n_images=2, n_views=8)
    out = tpt_adapt(prompt, features, vlm.logits)
    assert out.logits.shape == (2, 6) and torch.isfinite(out.logits).all()
    assert not torch.equal(out.variables[0], prompt.initial_context)


def test_gavish_donoho_rank_recovers_a_low_rank_signal():
    torch.manual_seed(0)
    c, d, rank = 100, 64, 5
    signal = torch.randn(c, rank) @ torch.randn(rank, d) * 3
    basis = spectral_basis(signal + 0.1 * torch.randn(c, d))
    assert basis.shape == (rank, d)
    assert torch.allclose(basis @ basis.T, torch.eye(rank), atol=1e-5)
    assert gavish_donoho_omega(1.0) == pytest.approx(2.86, abs=0.01)


def test_spectral_basis_of_isotropic_noise_keeps_few_directions():
    torch.manual_seed(0)
    basis = spectral_basis(torch.randn(200, 64))
    assert 1 <= basis.shape[0] <= 3


def test_sts_step_is_sign_like_and_needs_no_encoder():
    torch.manual_seed(0)
    class_features = F.normalize(torch.randn(10, 16), dim=-1)
    basis = spectral_basis(class_features)
    views = F.normalize(torch.randn(2, 32, 16), dim=-1)
    logit_fn = lambda image, text: 50 * image @ text.transpose(-1, -2)  # noqa: E731
    out = sts_adapt(views, class_features, basis, logit_fn, lr=5e-3, final="original")
    assert out.variables.shape == (2, basis.shape[0])
    assert torch.allclose(out.variables.abs(), torch.full_like(out.variables, 5e-3), rtol=0.05)
    prototypes = steered_prototypes(class_features, basis, out.variables)
    assert torch.allclose(out.logits, logit_fn(views[:, :1], prototypes)[:, 0], atol=1e-5)


def test_sts_batched_equals_one_image_at_a_time_and_options_differ():
    torch.manual_seed(1)
    class_features = F.normalize(torch.randn(12, 16), dim=-1)
    basis = spectral_basis(class_features, center=True)
    views = F.normalize(torch.randn(3, 20, 16), dim=-1)
    logit_fn = lambda image, text: 30 * image @ text.transpose(-1, -2)  # noqa: E731
    together = sts_adapt(views, class_features, basis, logit_fn, steps=3, squared_norm=True)
    alone = torch.cat(
        [
            sts_adapt(views[i : i + 1], class_features, basis, logit_fn, steps=3, squared_norm=True).logits
            for i in range(3)
        ]
    )
    assert torch.allclose(together.logits, alone, atol=1e-5)
    averaged = sts_adapt(views, class_features, basis, logit_fn, final="kept_average")
    assert not torch.allclose(averaged.logits.softmax(-1), together.logits.softmax(-1))
    with pytest.raises(ValueError, match="final"):
        sts_adapt(views, class_features, basis, logit_fn, final="mean")


def test_confident_view_average_averages_the_kept_probabilities():
    logits = torch.randn(2, 30, 5) * 3
    out, kept = confident_view_average(logits, 0.1)
    expected = torch.stack([logits[b, kept[b]].softmax(-1).mean(0) for b in range(2)])
    assert kept.shape == (2, 3)
    assert torch.allclose(out.exp(), expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["crop_flip", "augmix"])
def test_views_are_seeded_per_sample_and_keep_the_original_first(kind):
    originals = [(render_single(1, seed=s, size=96).images[0] * 255).round().to(torch.uint8) for s in (2, 3, 4)]
    images = torch.rand(3, 3, 64, 64)
    views = make_views(originals, images, 12, seeds=[10, 11, 12], kind=kind)
    assert views.shape == (3, 12, 3, 64, 64)
    assert torch.equal(views[:, 0], images)
    assert views.min() >= 0 and views.max() <= 1
    again = make_views([originals[2], originals[0]], images[[2, 0]], 12, seeds=[12, 10], kind=kind)  # other batch
    assert torch.equal(again[0], views[2]) and torch.equal(again[1], views[0])
    other = make_views(originals, images, 12, seeds=[13, 11, 12], kind=kind)
    assert not torch.equal(other[0], views[0]) and torch.equal(other[1], views[1])
    assert not torch.equal(views[0, 1], views[0, 2])


def test_augmix_differs_from_plain_crops_with_the_same_seed():
    images = render_single(2, seed=4).images
    crops = make_views(list(images), images, 8, seeds=[1, 2], kind="crop_flip")
    mixed = make_views(list(images), images, 8, seeds=[1, 2], kind="augmix")
    assert not torch.allclose(crops[:, 1:], mixed[:, 1:])


def test_view_arguments_are_checked():
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="one of each per image"):
        make_views(list(images), images, 4, seeds=[1])
    with pytest.raises(ValueError, match="view kind"):
        make_views(list(images), images, 4, seeds=[1, 2], kind="cutout")
    with pytest.raises(ValueError, match="3 x H x W"):
        make_views([torch.zeros(8, 8), torch.zeros(8, 8)], images, 4, seeds=[1, 2])


def ringed_image(height: int = 300, width: int = 400, ring: int = 60) -> torch.Tensor:
    """uint8 RGB: a red outer ring ``ring`` px wide around a blue centre."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[0] = 255
    image[:, ring:-ring, ring:-ring] = torch.tensor([0, 0, 255], dtype=torch.uint8).view(3, 1, 1)
    return image


def test_views_are_cropped_from_the_image_as_loaded_and_reach_its_outer_ring():
    """The model's input is the centre crop (no red left after the shorter side is resized and the
    centre cropped... here the ring is cut away first); views cropped from the full image reach
    the red ring, as the reference's RandomResizedCrop on the loaded image does."""
    original = ringed_image()
    image = torch.zeros(1, 3, 64, 64)
    image[:, 2] = 1  # the model's input: the blue centre (a crop inside the ring)
    views = make_views([original], image, 64, seeds=[0])[0]
    red = (views[1:, 0] > 0.5).flatten(1).any(1)
    assert red.float().mean() > 0.5  # most views see the ring
    from_image = make_views([image[0]], image, 64, seeds=[0])[0]  # the old source: the centre crop
    assert not (from_image[1:, 0] > 0.5).any()


def test_view_callbacks_crop_from_the_batch_original_not_the_model_input():
    """The callbacks' shared view encoder (TPT, STS, the views baseline, DiffTPT's conventional
    views) hands the batch's ``original`` to ``make_views``: with the ring only in the original,
    the encoded views show it."""
    from types import SimpleNamespace

    from tta.callbacks import ViewAverage

    encoded = []

    def encode_image(views: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        encoded.append(views)
        return torch.zeros(len(views), 4)

    callback = ViewAverage(n_views=16)
    image = torch.zeros(1, 3, 64, 64)
    image[:, 2] = 1  # the model's input: the blue centre only
    vlm = SimpleNamespace(encode_image=encode_image)
    callback.encode_views(SimpleNamespace(vlm=vlm), [ringed_image()], image, seeds=[0], indices=[0])
    (views,) = encoded
    assert (views[1:, 0] > 0.5).flatten(1).any(1).float().mean() > 0.5  # most crops reach the red ring


@pytest.mark.parametrize("size", [(300, 400), (64, 64), (500, 120)])
def test_crops_match_torchvision_random_resized_crop_on_the_same_box(size):
    """The project's views equal torchvision's RandomResizedCrop (bilinear, antialiased) + flip
    on the same boxes within 1e-4 on float images; PIL's uint8 version within 2/255 (rounding)."""
    import numpy as np
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    from tta.augment.views import crop_boxes

    height, width = size
    g = torch.Generator().manual_seed(7)
    original = (torch.rand(3, height, width, generator=g) * 255).round().to(torch.uint8)
    original = TF.gaussian_blur(original, [5, 5], [1.5, 1.5])  # a natural-ish image: smooth, not white noise
    views = make_views([original], torch.zeros(1, 3, 48, 48), 9, seeds=[3])[0, 1:]
    boxes, flip = crop_boxes(torch.Generator().manual_seed(3), 8, height, width)
    pil = Image.fromarray(original.permute(1, 2, 0).numpy())
    for view, (left, top, w, h), flipped in zip(views, boxes.long().tolist(), flip.tolist()):
        expected = TF.resized_crop(original.float() / 255, top, left, h, w, [48, 48], antialias=True)
        expected = expected.flip(-1) if flipped else expected
        assert (view - expected).abs().max() < 1e-4
        # the reference's path: torchvision's resized_crop on the PIL image = crop, then PIL's resize
        reference = pil.crop((left, top, left + w, top + h)).resize((48, 48), Image.BILINEAR)
        reference = torch.from_numpy(np.array(reference)).permute(2, 0, 1).float() / 255
        reference = reference.flip(-1) if flipped else reference
        assert (view - reference).abs().max() < 2.5 / 255


def test_boxes_follow_torchvision_sampling_with_its_central_fallback():
    from tta.augment.views import crop_boxes

    boxes, _ = crop_boxes(torch.Generator().manual_seed(0), 2000, 300, 400)
    area = boxes[:, 2] * boxes[:, 3] / (300 * 400)
    ratio = boxes[:, 2] / boxes[:, 3]
    assert area.min() >= 0.075 and area.max() <= 1.0
    assert ratio.min() >= 3 / 4 - 0.02 and ratio.max() <= 4 / 3 + 0.02
    assert (boxes[:, 0] + boxes[:, 2] <= 400).all() and (boxes[:, 1] + boxes[:, 3] <= 300).all()
    # a 10:1 strip: no draw fits in ten tries, so torchvision's central crop at ratio 4/3
    strip, _ = crop_boxes(torch.Generator().manual_seed(0), 50, 20, 200, attempts=1)
    fallback = strip[(strip[:, 3] == 20) & (strip[:, 2] == 27)]
    assert len(fallback) > 0 and (fallback[:, 0] == (200 - 27) // 2).all() and (fallback[:, 1] == 0).all()


def test_tpt_with_checkpointed_text_tower_gives_the_same_result(world_vlm):
    prompt = PromptLearner(world_vlm, CLASS_NAMES)
    features = _tiny_world_views(world_vlm, n_images=2)
    plain = tpt_adapt(prompt, features, world_vlm.logits)
    checkpointed = tpt_adapt(prompt, features, world_vlm.logits, checkpoint=True)
    assert torch.allclose(plain.variables, checkpointed.variables, atol=1e-6)
    assert torch.allclose(plain.logits, checkpointed.logits, atol=1e-5)
