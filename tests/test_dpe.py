"""DPE against a test-side transcript of its authors' code, and the wrong readings it must not be.

What is proven here:

- ``DPEState`` (``tta.methods.dpe``) gives, sample after sample over 500-sample streams of 24 classes
  (one view; and 20 views of which the 2 most confident are averaged, predicted from the original view
  and, as on ImageNet-A, from the confident views), the logits of a transcript of the reference's loop
  (zhangce01/DPE-CLIP fecae5a: ``main_dpe.py`` ``run_test_dpe``, ``update_cache``, ``cache_key_value``,
  ``compute_cache_logits``, ``TextResidue``, ``PositiveCacheResidue``, ``InfoNCELoss``; ``utils.py``
  ``get_clip_logits``, ``get_entropy``, ``avg_entropy``; ``info_nce`` of ``info-nce-pytorch``), with the
  same optimiser (AdamW, one step, fresh residuals a sample), and holds the same visual queue and the same
  textual prototypes after every sample. The streams open classes, append, replace, reject and evolve the
  text prototypes (and not): each path is counted.
- Wrong readings give other logits on the same stream and fail that comparison: the queue updated after
  the prediction, a full class that always replaces its last entry, a text residual carried from one
  sample to the next.
- The state saved through ``safetensors`` at any step and loaded into a fresh state continues with
  bit-identical logits.
- The ``DPE`` callback refuses bad options by name, gives inside ``Trainer.predict`` the state's logits
  on its own view features in stream order, leaves the model untouched, and every card of
  ``configs/experiment/dpe_vit_b16`` builds it with the reference's per-data-set settings.

Tolerance: both sides run in float32 with the same operations in other shapes (a per-class gather
instead of lists, a mean of zero-padded slots); the per-sample logits agree within ``1e-4 x logit scale``.
"""

from __future__ import annotations

import inspect
import math
import operator
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from test_config import assert_run_key_sees_every_argument
from test_tta_callbacks import predict

from tta.callbacks.dpe import DPE
from tta.methods.dpe import DPEState, info_nce
from tta.methods.tda import ClassCache
from tta.models import create_vlm
from tta.tasks import ZeroShotClassifier
from tta.validation import OptionError

SCALE = 100.0
TOLERANCE = 1e-4 * SCALE
#: The reference's ImageNet configuration (configs/imagenet.yaml), as the state's keyword arguments.
SETTINGS = {"shot_capacity": 3, "alpha": 6.0, "beta": 5.0, "lr_text": 6e-4, "lr_image": 6e-4, "align_weight": 0.5}

# ---------------------------------------------------------------------------------------------------------
# The transcript of the reference (main_dpe.py, utils.py, info_nce)
# ---------------------------------------------------------------------------------------------------------


def softmax_entropy(x):
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def avg_entropy(outputs):
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    avg_logits = logits.logsumexp(dim=0) - np.log(logits.shape[0])
    avg_logits = torch.clamp(avg_logits, min=torch.finfo(avg_logits.dtype).min)
    return -(avg_logits * torch.exp(avg_logits)).sum(dim=-1)


def get_clip_logits(image_features, clip_weights, scale):
    """``utils.py`` ``get_clip_logits`` from the encoded, normalised views (``V x D``)."""
    clip_logits = scale * image_features @ clip_weights
    if image_features.size(0) > 1:
        batch_entropy = softmax_entropy(clip_logits)
        selected_idx = torch.argsort(batch_entropy, descending=False)[: int(batch_entropy.size()[0] * 0.1)]
        output = clip_logits[selected_idx]
        image_features = image_features[selected_idx].mean(0).unsqueeze(0)
        clip_logits = output.mean(0).unsqueeze(0)
        loss = avg_entropy(output)
        pred = int(output.mean(0).unsqueeze(0).topk(1, 1, True, True)[1].t())
    else:
        loss = softmax_entropy(clip_logits)
        pred = int(clip_logits.topk(1, 1, True, True)[1].t()[0])
    return image_features, clip_logits, loss, pred


def get_entropy(loss, clip_weights):
    return float(loss.detach() / math.log2(clip_weights.size(1)))  # detach: float() of a graph warns


def reference_info_nce(query, positive_key, temperature=0.01):
    """``info_nce`` without negative keys: both normalised, the other rows as negatives, mean."""
    query, positive_key = F.normalize(query, dim=-1), F.normalize(positive_key, dim=-1)
    logits = query @ positive_key.transpose(-2, -1)
    return F.cross_entropy(logits / temperature, torch.arange(len(query)), reduction="mean")


def update_cache(cache, pred, features_loss, shot_capacity):
    with torch.no_grad():
        item = features_loss
        if pred in cache:
            if len(cache[pred]) < shot_capacity:
                cache[pred].append(item)
            elif features_loss[1] < cache[pred][-1][1]:
                cache[pred][-1] = item
            cache[pred] = sorted(cache[pred], key=operator.itemgetter(1))
        else:
            cache[pred] = [item]


def cache_key_value(image_features, cache, clip_weights):
    with torch.no_grad():
        cache_keys, cache_values, all_classes = [], [], []
        for class_index in sorted(cache.keys()):
            num_items = len(cache[class_index])
            image_prototype = torch.zeros_like(image_features)
            for item in cache[class_index]:
                image_prototype += item[0] / num_items
            cache_keys.append(image_prototype)
            cache_values.append(class_index)
            all_classes.append(class_index)
        cache_keys = torch.cat(cache_keys, dim=0).permute(1, 0)
        cache_values = F.one_hot(torch.Tensor(cache_values).to(torch.int64), num_classes=clip_weights.size(1)).float()
        return cache_keys, cache_values, all_classes


def compute_cache_logits(image_features, cache_keys, cache_values, alpha, beta):
    affinity = image_features @ cache_keys
    return alpha * (((-1) * (beta - beta * affinity)).exp() @ cache_values)


class Residue(torch.nn.Module):
    """``TextResidue`` / ``PositiveCacheResidue``: a zero ``D x N`` residual, columns normalised after it."""

    def __init__(self, x):
        super().__init__()
        self.residual = torch.nn.Parameter(torch.zeros(x.shape), requires_grad=True)

    def forward(self, x):
        return F.normalize(x.clone() + self.residual, dim=0)


class ReferenceDPE:
    """``run_test_dpe``'s loop body, one sample (``V x D`` views) at a time; counts the paths taken.

    ``on_a``: the reference's ``dataset_name == 'A'`` (the prediction from the confident views)."""

    def __init__(self, text, scale, settings, on_a=False):
        self.clip_weights, self.scale, self.s, self.on_a = text.T.clone(), scale, settings, on_a
        self.clip_weights_global = self.clip_weights.clone()
        self.pos_cache, self.num_avg = {}, 0
        self.paths = Counter()

    def count(self, pred, loss):
        cache, capacity = self.pos_cache, self.s["shot_capacity"]
        if pred not in cache:
            self.paths["new class"] += 1
        elif len(cache[pred]) < capacity:
            self.paths["append"] += 1
        else:
            self.paths["replace" if loss < cache[pred][-1][1] else "reject"] += 1

    def step(self, views):
        s = self.s
        clip_weights_local = self.clip_weights_global.clone().detach()
        text_residue = Residue(clip_weights_local)
        new_clip_weights = text_residue(clip_weights_local)
        image_features_x, clip_logits, entropy, pred = get_clip_logits(views, new_clip_weights, self.scale)
        entropy = get_entropy(entropy, self.clip_weights)
        self.count(pred, entropy)
        update_cache(self.pos_cache, pred, [image_features_x.detach(), entropy], s["shot_capacity"])
        pos_cache_keys, pos_cache_values, all_classes = cache_key_value(
            image_features_x.detach(), self.pos_cache, self.clip_weights
        )
        pos_cache_residue = Residue(pos_cache_keys)
        new_clip_weights = text_residue(clip_weights_local)
        final_logits = clip_logits.clone()
        new_pos_cache_keys = pos_cache_residue(pos_cache_keys)
        final_logits += compute_cache_logits(
            image_features_x, new_pos_cache_keys, pos_cache_values, s["alpha"], s["beta"]
        )
        loss = avg_entropy(final_logits)
        loss += reference_info_nce(new_pos_cache_keys.T, new_clip_weights[:, all_classes].T) * s["align_weight"]
        optimizer = torch.optim.AdamW(
            [
                {"params": text_residue.parameters(), "lr": s["lr_text"], "eps": 1e-3, "weight_decay": 1e-1},
                {"params": pos_cache_residue.parameters(), "lr": s["lr_image"], "eps": 1e-3, "weight_decay": 1e-1},
            ]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            new_clip_weights = text_residue(clip_weights_local)
            if self.on_a:
                image_features, clip_logits, _, _ = get_clip_logits(views, new_clip_weights, self.scale)
            else:
                image_features, clip_logits, _, _ = get_clip_logits(views[:1], new_clip_weights, self.scale)
            final_logits = clip_logits.clone()
            new_pos_cache_keys = pos_cache_residue(pos_cache_keys)
            final_logits += compute_cache_logits(
                image_features, new_pos_cache_keys, pos_cache_values, s["alpha"], s["beta"]
            )
            loss = avg_entropy(final_logits)
            if get_entropy(loss, self.clip_weights) < 0.1:
                self.paths["text update"] += 1
                self.num_avg += 1
                n = self.num_avg
                self.clip_weights_global = self.clip_weights_global * (n / (n + 1)) + new_clip_weights * (1 / (n + 1))
            else:
                self.paths["no text update"] += 1
        return final_logits[0].float()


# ---------------------------------------------------------------------------------------------------------
# The streams
# ---------------------------------------------------------------------------------------------------------


def make_stream(seed: int, n_views: int, n: int = 500, n_classes: int = 24, dim: int = 48):
    """CLIP-like features: class features at the same angle to a common direction ``u``; a sample lies
    between ``u`` (every class alike: high entropy) and its class (strength uniform in [0, 1]), its views
    scattered around it."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(dim, generator=g), dim=0)
    r = torch.randn(n_classes, dim, generator=g)
    r = F.normalize(r - (r @ u)[:, None] * u, dim=-1)
    text = F.normalize(0.9 * u + 0.45 * r, dim=-1)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    strength = torch.rand(n, 1, 1, generator=g)
    base = u + strength * (text[labels][:, None] - u) + 0.2 * torch.randn(n, 1, dim, generator=g) / math.sqrt(dim)
    views = F.normalize(base + 0.05 * torch.randn(n, n_views, dim, generator=g) / math.sqrt(dim), dim=-1)
    return text, views


@pytest.fixture(scope="module")
def streams():
    return {1: make_stream(0, 1), 20: make_stream(1, 20)}


def assert_same_state(ours: DPEState, reference: ReferenceDPE, step: int) -> None:
    """The same queue (entries and order, classes ascending) and the same textual prototypes."""
    cache, expected = ours.cache, reference.pos_cache
    counts = [len(expected.get(label, [])) for label in range(len(cache.count))]
    assert cache.count.tolist() == counts, step
    items = [item for label in sorted(expected) for item in expected[label]]
    valid = cache.valid()
    assert torch.allclose(cache.features[valid], torch.cat([item[0] for item in items]), atol=1e-6), step
    losses = torch.tensor([item[1] for item in items])
    assert torch.allclose(cache.loss[valid], losses, atol=1e-4, rtol=0), step  # BLAS shapes differ
    assert int(ours.updates) == reference.num_avg, step
    assert torch.allclose(ours.global_text, reference.clip_weights_global.T, atol=1e-6), step


def run_against_transcript(state, reference, views, check_state=True, stop_above=None) -> dict:
    """Both over the stream; the largest logit difference, the states compared after every sample."""
    worst = 0.0
    for step, sample in enumerate(views):
        expected = reference.step(sample.clone())
        got = state.step(sample.clone())
        worst = max(worst, float((got - expected).abs().max()))
        if stop_above is not None and worst > stop_above:  # a wrong reading shown wrong: no need to go on
            break
        if check_state:
            assert_same_state(state, reference, step)
    return {"worst": worst, "paths": reference.paths}


@pytest.mark.parametrize(("n_views", "prediction_views"), [(1, "original"), (20, "original"), (20, "confident")])
def test_dpe_equals_the_reference_transcript_sample_after_sample(streams, n_views, prediction_views):
    text, views = streams[n_views]
    state = DPEState(text, SCALE, prediction_views=prediction_views, **SETTINGS)
    reference = ReferenceDPE(text, SCALE, SETTINGS, on_a=prediction_views == "confident")
    result = run_against_transcript(state, reference, views)
    assert result["worst"] <= TOLERANCE, result
    paths = result["paths"]
    for path in ("new class", "append", "replace", "reject", "text update", "no text update"):
        assert paths[path] > 0, (path, paths)
    assert state.size() == int(state.cache.count.sum()) > 0
    # the text prototypes did evolve: no longer the class features
    assert not torch.allclose(state.global_text, text, atol=1e-4)


def test_the_info_nce_is_the_package_s_and_one_cached_class_gives_no_alignment_loss():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    assert torch.allclose(info_nce(a, b), reference_info_nce(a, b), atol=1e-6)
    assert float(info_nce(a[:1], b[:1])) == 0.0


def test_the_first_sample_meets_itself_and_the_model_features_are_not_modified():
    """The first sample is queued before it is predicted: its cache logit is about ``alpha`` on its
    pseudo-label (its key barely moved by one step); the given features are left as they were."""
    g = torch.Generator().manual_seed(3)
    text = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    feature = F.normalize(torch.randn(1, 16, generator=g), dim=-1)
    kept_text, kept_feature = text.clone(), feature.clone()
    logits = DPEState(text, SCALE, **SETTINGS).step(feature)
    zero_shot = SCALE * feature[0] @ text.T
    bonus = logits - zero_shot
    assert int(bonus.argmax()) == int(zero_shot.argmax()) and abs(float(bonus.max()) - 6.0) < 0.05
    assert torch.equal(text, kept_text) and torch.equal(feature, kept_feature)
    assert not logits.requires_grad


# ---------------------------------------------------------------------------------------------------------
# Wrong readings
# ---------------------------------------------------------------------------------------------------------


class PredictFirst(DPEState):
    """The update order swapped: the sample adapted and predicted with the queue so far, queued after."""

    def step(self, view_features):
        cache_add, queued = self.cache.add, []
        self.cache.add = lambda *args: queued.append(args)
        try:
            logits = super().step(view_features)
        finally:
            self.cache.add = cache_add
        self.cache.add(*queued[0])
        return logits


def add_always_replacing(self, label, feature, loss, prob_map=None):
    """A full class replaces its last entry whatever the new loss (then sorts)."""
    kept = min(int(self.count[label]), self.capacity - 1)
    self._insert(label, int((self.loss[label, :kept] <= loss).sum()), kept, feature, loss, prob_map)


class CarriedResidual(DPEState):
    """The text residual never reset: one residual learned over the whole stream."""

    def text_residual(self):
        if not hasattr(self, "carried"):
            self.carried = super().text_residual()
        return self.carried


@pytest.mark.parametrize("mutant", ["predict_first", "always_replace", "residual_carried"])
@pytest.mark.parametrize("n_views", [1, 20])
def test_wrong_readings_fail_the_comparison_with_the_transcript(streams, monkeypatch, mutant, n_views):
    text, views = streams[n_views]
    if mutant == "always_replace":
        monkeypatch.setattr(ClassCache, "add", add_always_replacing)
    state_class = {"predict_first": PredictFirst, "residual_carried": CarriedResidual}.get(mutant, DPEState)
    state = state_class(text, SCALE, **SETTINGS)
    reference = ReferenceDPE(text, SCALE, SETTINGS)
    result = run_against_transcript(state, reference, views, check_state=False, stop_above=10 * TOLERANCE)
    assert result["worst"] > 10 * TOLERANCE, result["worst"]


# ---------------------------------------------------------------------------------------------------------
# State round trip
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_views", [1, 20])
def test_state_dict_round_trip_through_safetensors_continues_bit_identically(streams, n_views):
    text, views = streams[n_views]
    views = views[:200]
    stop = random.Random(n_views).randrange(40, 160)
    uninterrupted = DPEState(text, SCALE, **SETTINGS)
    expected = torch.stack([uninterrupted.step(v) for v in views])
    first = DPEState(text, SCALE, **SETTINGS)
    for v in views[:stop]:
        first.step(v)
    saved = first.state_dict()
    assert set(saved) == {"global_text", "updates", "cache.features", "cache.loss", "cache.count"}
    assert saved["updates"].dtype == saved["cache.count"].dtype == torch.int64 and int(saved["updates"]) > 0
    restored = DPEState(text, SCALE, **SETTINGS)
    restored.load_state_dict(load_tensors(save_tensors(saved)))
    assert restored.size() == first.size() > 0
    resumed = torch.stack([restored.step(v) for v in views[stop:]])
    assert torch.equal(resumed, expected[stop:])
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert saved["global_text"].data_ptr() != first.global_text.data_ptr()  # copies, not views
    with pytest.raises(ValueError, match="global_text"):
        DPEState(text[:5], SCALE).load_state_dict(saved)


# ---------------------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"n_views": 5}, "n_views"),  # int(0.1 * 5) = 0 confident views
        ({"n_views": 0}, "n_views"),
        ({"shot_capacity": 0}, "shot_capacity"),
        ({"shot_capacity": 1.5}, "shot_capacity"),
        ({"alpha": -1.0}, "alpha"),
        ({"beta": float("nan")}, "beta"),
        ({"lr_text": -1e-4}, "lr_text"),
        ({"lr_image": "fast"}, "lr_image"),
        ({"align_weight": -0.5}, "align_weight"),
        ({"text_update_threshold": -0.1}, "text_update_threshold"),
        ({"prediction_views": "all"}, "prediction_views"),
        ({"entropy_norm": "log10"}, "entropy_norm"),
        ({"continual": 1}, "continual"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, option):
    with pytest.raises(OptionError) as error:
        DPE(**kwargs)
    assert error.value.option == option
    if kwargs.get("n_views") == 5:
        assert "at least 10" in str(error.value)  # names the fix


def test_the_run_key_sees_every_option():
    assert_run_key_sees_every_argument(DPE(alpha=3.0, lr_text=1e-4, prediction_views="confident", n_views=10))


@pytest.fixture(scope="module")
def world_module():
    return ZeroShotClassifier(create_vlm("tta-world-resnet"))


class Recording(DPEState):
    """The state, recording each sample's view features; every state made is listed in ``made``."""

    made: list[Recording] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []
        Recording.made.append(self)

    def step(self, view_features):
        self.seen.append(view_features.detach().clone())
        return super().step(view_features)


@pytest.mark.parametrize("n_views", [1, 10])
def test_callback_logits_are_the_state_on_its_own_view_features_in_stream_order(world_module, monkeypatch, n_views):
    monkeypatch.setattr("tta.callbacks.dpe.DPEState", Recording)
    monkeypatch.setattr(Recording, "made", [])
    weights = {k: v.clone() for k, v in world_module.state_dict().items()}
    options = {"n_views": n_views, "alpha": 3.0, "lr_text": 1e-2, "seed": 0}
    large, _ = predict(world_module, [DPE(**options)], batch_size=4, n=6, domains=("clean", "blur"))
    states = Recording.made
    assert [len(s.seen) for s in states] == [6, 6]  # a fresh state per domain
    assert all(f.shape == (n_views, states[0].text.shape[1]) for s in states for f in s.seen)
    assert (states[0].alpha, states[0].lr_text) == (3.0, 1e-2)
    text, scale = world_module.text_features().float(), float(world_module.vlm.logit_scale)
    replay = []
    for recorded in states:
        fresh = DPEState(text, scale, alpha=3.0, lr_text=1e-2)
        replay += [fresh.step(f) for f in recorded.seen]
    assert torch.allclose(large["logits"], torch.stack(replay), atol=1e-5)
    assert not torch.allclose(large["logits"], large["logits_zs"], atol=1e-2)
    # only DPE's own residuals learn: the model is as it was
    assert all(torch.equal(v, weights[k]) for k, v in world_module.state_dict().items())
    small, _ = predict(world_module, [DPE(images_per_step=1, **options)], batch_size=1, n=6, domains=("clean", "blur"))
    assert torch.equal(small["index"], large["index"])
    assert torch.allclose(small["logits"], large["logits"], atol=1e-5)


def test_continual_carries_one_state_across_domains(world_module, monkeypatch):
    monkeypatch.setattr("tta.callbacks.dpe.DPEState", Recording)
    monkeypatch.setattr(Recording, "made", [])
    predict(world_module, [DPE(n_views=1, continual=True)], batch_size=4, n=4, domains=("clean", "blur"))
    assert [len(s.seen) for s in Recording.made] == [8]


# ---------------------------------------------------------------------------------------------------------
# The cards
# ---------------------------------------------------------------------------------------------------------

CARDS = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "dpe_vit_b16"
SEVEN = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]
CARS = ["a photo of a {}.", "A {} featuring a wide range of color options for easy selection."]
#: card -> (data, (alpha, beta, lr_text, lr_image, align), n_views, prediction views, templates, CuPL file):
#: the numbers from configs/<set>.yaml; the views from utils.py build_test_data_loader (get_preprocess: 64
#: AugMix views on the whole ImageNet family) and main_dpe.py (the prediction from the confident views on
#: 'A' only); the templates and CuPL files from datasets/<set>.py (80 templates on -R and -Sketch).
REFERENCE = {
    "imagenet": ({"variant": "imagenet"}, (6.0, 5.0, 6e-4, 6e-4, 0.5), 64, "original", SEVEN, None),
    "imagenet_a": ({"variant": "imagenet_a"}, (6.0, 5.0, 3e-4, 3e-4, 2.5), 64, "confident", SEVEN, None),
    "imagenet_v2": (
        {"_target_": "tta.datamodules.ImageNetV2DataModule"},
        (3.0, 8.0, 5e-4, 5e-4, 0.5),
        64,
        "original",
        SEVEN,
        None,
    ),
    "imagenet_r": ({"variant": "imagenet_r"}, (3.0, 8.0, 6e-4, 6e-4, 0.0), 64, "original", 80, None),
    "imagenet_sketch": ({"variant": "imagenet_sketch"}, (7.0, 7.45, 6e-4, 6e-4, 0.2), 64, "original", 80, None),
    "caltech101": ({"dataset": "caltech101"}, (15.0, 5.0, 6e-4, 6e-4, 0.2), 1, "original", SEVEN, "caltech101"),
    "dtd": ({"dataset": "dtd"}, (6.0, 3.0, 6e-4, 6e-4, 0.2), 1, "original", ["{} texture."], "dtd"),
    "eurosat": (
        {"dataset": "eurosat"},
        (3.0, 8.0, 5e-5, 5e-5, 0.2),
        1,
        "original",
        ["a centered satellite photo of {}."],
        "eurosat",
    ),
    "aircraft": (
        {"dataset": "aircraft"},
        (6.0, 2.0, 6e-4, 6e-4, 0.2),
        1,
        "original",
        ["a photo of a {}, a type of aircraft."],
        "fgvcaircraft",
    ),
    "flower102": (
        {"dataset": "flower102"},
        (2.5, 5.0, 1e-4, 1e-4, 0.2),
        1,
        "original",
        ["a photo of a {}, a type of flower."],
        "flowers102",
    ),
    "food101": (
        {"dataset": "food101"},
        (3.0, 1.0, 2e-4, 2e-4, 0.2),
        1,
        "original",
        ["a photo of {}, a type of food."],
        "food101",
    ),
    "pets": (
        {"dataset": "pets"},
        (4.0, 7.0, 5e-5, 5e-5, 0.2),
        1,
        "original",
        ["a photo of a {}, a type of pet."],
        "oxfordpets",
    ),
    "cars": ({"dataset": "cars"}, (3.0, 7.0, 1e-4, 1e-4, 1.5), 1, "original", CARS, "stanfordcars"),
    "sun397": ({"dataset": "sun397"}, (6.0, 3.0, 2e-4, 2e-4, 0.2), 1, "original", SEVEN, "sun397"),
    "ucf101": (
        {"dataset": "ucf101"},
        (9.0, 8.0, 4e-4, 4e-4, 0.2),
        1,
        "original",
        ["a photo of a person doing {}."],
        "ucf101",
    ),
}
#: The only ViT-B/16 figure of shared/METHODS.md for DPE ("about 71.9 on ImageNet").
PUBLISHED = {"imagenet": 71.9}


def test_the_cards_are_the_fifteen_data_sets_and_the_bases_are_marked():
    files = {p.stem for p in CARDS.glob("*.yaml")}
    assert {f for f in files if not f.startswith("_")} == set(REFERENCE)
    assert all(f.startswith("_family_") for f in files if f.startswith("_"))


def test_every_card_builds_the_callback_with_the_reference_settings(compose):
    for card, (data, numbers, n_views, prediction_views, templates, cupl) in REFERENCE.items():
        cfg = compose([f"experiment=dpe_vit_b16/{card}"])
        callback = instantiate(cfg.tta.callbacks.dpe)
        assert isinstance(callback, DPE), card
        got = (callback.alpha, callback.beta, callback.lr_text, callback.lr_image, callback.align_weight)
        assert got == numbers, card
        assert (callback.n_views, callback.views, callback.prediction_views) == (n_views, "augmix", prediction_views)
        assert (callback.shot_capacity, callback.text_update_threshold, callback.entropy_norm) == (3, 0.1, "log2")
        assert callback.continual is False, card
        if templates == 80:
            assert len(cfg.model.templates) == 80, card
            assert (cfg.model.templates[0], cfg.model.templates[-1]) == ("a bad photo of a {}.", "a tattoo of the {}.")
        else:
            assert list(cfg.model.templates) == templates, card
        assert cfg.model.class_prompts is None, card  # the user passes the reference's CuPL file
        assert all(cfg.data[k] == v for k, v in data.items()), card
        if "dataset" in data:
            assert cfg.data._target_.endswith("FineGrainedDataModule") and cfg.data.split == "test", card
            assert f"CuPL_prompts_{cupl}.json" in (CARDS / f"{card}.yaml").read_text(), card
        else:
            assert cfg.data.class_list == "clip", card
        assert cfg.model.vlm.name == "ViT-B-16-quickgelu" and cfg.model.vlm.pretrained == "openai", card
        assert cfg.trainer.precision == "16-mixed" and cfg.seed == 1, card
        assert cfg.published.method == "dpe", card
        assert dict(cfg.published.accuracy) == ({card: PUBLISHED[card]} if card in PUBLISHED else {}), card


def test_the_tta_option_is_the_callback_defaults(compose):
    cfg = compose(["tta=dpe", "view_store=null"])
    built = instantiate(cfg.tta.callbacks.dpe)
    default = DPE()
    options = [name for name in inspect.signature(DPE).parameters if name != "view_store"]
    assert {k: getattr(built, k) for k in options} == {k: getattr(default, k) for k in options}
