"""TDA against a test-side transcript of its authors' code, and the wrong readings it must not be.

What is proven here:

- ``TDAState`` (``tta.methods.tda``) gives, sample after sample over 600-sample streams of 24 classes
  (one view, and 20 views of which the 2 most confident are averaged), the logits of a transcript of
  the reference's loop (kdiAAA/TDA e697fb0: ``tda_runner.py`` ``run_test_tda``, ``update_cache``,
  ``compute_cache_logits``; ``utils.py`` ``get_clip_logits``, ``get_entropy``, ``softmax_entropy``,
  ``avg_entropy``), with the cache logits in float16 (the reference's) and in float32, and holds the
  same positive and negative caches (features, losses, probability maps, order) after every sample.
  The streams open classes, append, replace the highest-loss entry, reject, meet equal losses, and put
  samples below, inside and above the negative cache's entropy window: each path is counted.
- Wrong readings give other logits on the same stream and fail that comparison: the logits computed
  before the caches' update, a full class that always replaces its last entry, a class never
  re-sorted, the entropy normalised by ln C.
- The state saved through ``safetensors`` at any step and loaded into a fresh state continues with
  bit-identical logits.
- The ``TDA`` callback refuses bad options by name, gives inside ``Trainer.predict`` the state's
  logits on its own view features in stream order whatever the batch size, and a fresh cache per
  domain (one for the whole stream with ``continual``).
- Every card of ``configs/experiment/tda_vit_b16`` composes and builds the callback with the
  reference's per-data-set settings (a table transcribed from its ``configs/*.yaml``, ``utils.py``
  and ``datasets/*.py``).
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

from tta.callbacks.tda import TDA
from tta.methods.tda import ClassCache, TDAState, normalised_entropy, summarise_views
from tta.models import create_vlm
from tta.tasks import ZeroShotClassifier
from tta.validation import OptionError

SCALE = 100.0
TOLERANCE = 1e-4 * SCALE
#: The reference's ImageNet configuration (configs/imagenet.yaml), as the state's keyword arguments.
SETTINGS = {
    "pos_shot_capacity": 3,
    "pos_alpha": 2.0,
    "pos_beta": 5.0,
    "neg_shot_capacity": 2,
    "neg_alpha": 0.117,
    "neg_beta": 1.0,
    "neg_entropy_lower": 0.2,
    "neg_entropy_upper": 0.5,
    "neg_mask_lower": 0.03,
    "neg_mask_upper": 1.0,
}

# ---------------------------------------------------------------------------------------------------------
# The transcript of the reference (tda_runner.py, utils.py)
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
        prob_map = output.softmax(1).mean(0).unsqueeze(0)
        pred = int(output.mean(0).unsqueeze(0).topk(1, 1, True, True)[1].t())
    else:
        loss = softmax_entropy(clip_logits)
        prob_map = clip_logits.softmax(1)
        pred = int(clip_logits.topk(1, 1, True, True)[1].t()[0])
    return image_features, clip_logits, loss, prob_map, pred


def get_entropy(loss, clip_weights, log=math.log2):
    return float(loss / log(clip_weights.size(1)))


def update_cache(cache, pred, features_loss, shot_capacity, include_prob_map=False):
    item = features_loss if not include_prob_map else features_loss[:2] + [features_loss[2]]  # noqa: RUF005
    if pred in cache:
        if len(cache[pred]) < shot_capacity:
            cache[pred].append(item)
        elif features_loss[1] < cache[pred][-1][1]:
            cache[pred][-1] = item
        cache[pred] = sorted(cache[pred], key=operator.itemgetter(1))
    else:
        cache[pred] = [item]


def compute_cache_logits(image_features, cache, alpha, beta, clip_weights, neg_mask_thresholds=None, dtype=None):
    """As the reference; ``.cuda().half()`` is ``.to(dtype)``, and the features (fp16 in the reference's
    fp16 CLIP) are cast to ``dtype`` here."""
    cache_keys = []
    cache_values = []
    for class_index in sorted(cache.keys()):
        for item in cache[class_index]:
            cache_keys.append(item[0])
            if neg_mask_thresholds:
                cache_values.append(item[2])
            else:
                cache_values.append(class_index)
    cache_keys = torch.cat(cache_keys, dim=0).permute(1, 0).to(dtype)
    if neg_mask_thresholds:
        cache_values = torch.cat(cache_values, dim=0)
        cache_values = (
            ((cache_values > neg_mask_thresholds[0]) & (cache_values < neg_mask_thresholds[1])).type(torch.int8)
        ).to(dtype)
    else:
        cache_values = (F.one_hot(torch.Tensor(cache_values).to(torch.int64), num_classes=clip_weights.size(1))).to(
            dtype
        )
    affinity = image_features.to(dtype) @ cache_keys
    cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
    return alpha * cache_logits


class ReferenceTDA:
    """``run_test_tda``'s loop body, one sample (``V x D`` views) at a time; counts the paths taken."""

    def __init__(self, text, scale, settings, dtype=torch.float16):
        self.clip_weights, self.scale, self.s, self.dtype = text.T.clone(), scale, settings, dtype
        self.pos_cache, self.neg_cache = {}, {}
        self.paths = Counter()

    def count(self, name, cache, pred, loss, capacity):
        if pred not in cache:
            self.paths[f"{name} new class"] += 1
            return
        losses = [float(item[1]) for item in cache[pred]]
        if float(loss) in losses:
            self.paths[f"{name} equal loss"] += 1
        if len(losses) < capacity:
            self.paths[f"{name} append"] += 1
        else:
            self.paths[f"{name} {'replace' if loss < cache[pred][-1][1] else 'reject'}"] += 1

    def step(self, views):
        s = self.s
        image_features, clip_logits, loss, prob_map, pred = get_clip_logits(views, self.clip_weights, self.scale)
        prop_entropy = get_entropy(loss, self.clip_weights)
        self.count("pos", self.pos_cache, pred, loss, s["pos_shot_capacity"])
        update_cache(self.pos_cache, pred, [image_features, loss], s["pos_shot_capacity"])
        if s["neg_entropy_lower"] < prop_entropy < s["neg_entropy_upper"]:
            self.count("neg", self.neg_cache, pred, loss, s["neg_shot_capacity"])
            update_cache(self.neg_cache, pred, [image_features, loss, prob_map], s["neg_shot_capacity"], True)
        else:
            self.paths["neg window " + ("below" if prop_entropy <= s["neg_entropy_lower"] else "above")] += 1
        final_logits = clip_logits.clone()
        final_logits += compute_cache_logits(
            image_features, self.pos_cache, s["pos_alpha"], s["pos_beta"], self.clip_weights, dtype=self.dtype
        )
        if self.neg_cache:
            mask = (s["neg_mask_lower"], s["neg_mask_upper"])
            values = torch.cat([item[2] for items in self.neg_cache.values() for item in items])
            masked = (values > mask[0]) & (values < mask[1])
            self.paths["neg mask 1"] += int(masked.sum())
            self.paths["neg mask 0"] += int((~masked).sum())
            final_logits -= compute_cache_logits(
                image_features, self.neg_cache, s["neg_alpha"], s["neg_beta"], self.clip_weights, mask, self.dtype
            )
        else:
            self.paths["neg empty"] += 1
        return final_logits[0].float()


# ---------------------------------------------------------------------------------------------------------
# The streams
# ---------------------------------------------------------------------------------------------------------


def make_stream(seed: int, n_views: int, n: int = 600, n_classes: int = 24, dim: int = 48):
    """CLIP-like features: class features at the same angle to a common direction ``u``; a sample lies
    between ``u`` (every class alike: high entropy) and its class (strength uniform in [0, 0.5]), 10% at
    ``u`` itself; its views scatter around it. 10% of the samples repeat an earlier one exactly (equal
    losses)."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(dim, generator=g), dim=0)
    r = torch.randn(n_classes, dim, generator=g)
    r = F.normalize(r - (r @ u)[:, None] * u, dim=-1)
    text = F.normalize(0.9 * u + 0.45 * r, dim=-1)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    strength = 0.5 * torch.rand(n, 1, 1, generator=g)
    strength = torch.where(torch.rand(n, 1, 1, generator=g) < 0.1, 0.0, strength)
    base = u + strength * (text[labels][:, None] - u) + 0.1 * torch.randn(n, 1, dim, generator=g) / math.sqrt(dim)
    views = F.normalize(base + 0.03 * torch.randn(n, n_views, dim, generator=g) / math.sqrt(dim), dim=-1)
    repeats = torch.rand(n, generator=g) < 0.1
    for i in repeats.nonzero().flatten().tolist():
        if i > 0:
            views[i] = views[int(torch.randint(0, i, (1,), generator=g))]
    return text, views


@pytest.fixture(scope="module")
def streams():
    return {1: make_stream(0, 1), 20: make_stream(1, 20)}


def assert_same_cache(ours: ClassCache, reference: dict, step: int, name: str) -> None:
    """The same entries in the same order: classes ascending, each class's list as the reference's."""
    counts = [len(reference.get(label, [])) for label in range(len(ours.count))]
    assert ours.count.tolist() == counts, (step, name)
    if not sum(counts):
        return
    items = [item for label in sorted(reference) for item in reference[label]]
    valid = ours.valid()
    assert torch.allclose(ours.features[valid], torch.cat([item[0] for item in items]), atol=1e-6), (step, name)
    losses = torch.tensor([float(item[1]) for item in items])
    assert torch.allclose(ours.loss[valid], losses, atol=1e-4, rtol=0), (step, name)  # BLAS shapes differ
    if ours.prob_map is not None:
        maps = torch.cat([item[2] for item in items])
        assert torch.allclose(ours.prob_map[valid], maps, atol=1e-5, rtol=0), (step, name)


def run_against_transcript(state, reference, views, check_caches=True, stop_above=None) -> dict:
    """Both over the stream; the largest logit difference, and the caches compared after every sample."""
    worst = 0.0
    for step, sample in enumerate(views):
        expected = reference.step(sample.clone())
        got = state.step(sample.clone())
        worst = max(worst, float((got - expected).abs().max()))
        if stop_above is not None and worst > stop_above:  # a wrong reading shown wrong: no need to go on
            break
        if check_caches:
            assert_same_cache(state.pos, reference.pos_cache, step, "positive")
            assert_same_cache(state.neg, reference.neg_cache, step, "negative")
    return {"worst": worst, "paths": reference.paths}


@pytest.mark.parametrize("n_views", [1, 20])
@pytest.mark.parametrize("cache_dtype", ["float16", "float32"])
def test_tda_equals_the_reference_transcript_sample_after_sample(streams, n_views, cache_dtype):
    text, views = streams[n_views]
    dtype = {"float16": torch.float16, "float32": torch.float32}[cache_dtype]
    state = TDAState(text, SCALE, cache_dtype=cache_dtype, **SETTINGS)
    result = run_against_transcript(state, ReferenceTDA(text, SCALE, SETTINGS, dtype), views)
    assert result["worst"] <= TOLERANCE, result
    paths = result["paths"]
    # every path of update_cache in both caches, both sides of the entropy window, both mask values
    for name in ("pos", "neg"):
        for path in ("new class", "append", "replace", "reject", "equal loss"):
            assert paths[f"{name} {path}"] > 0, (name, path, paths)
    for path in ("neg window below", "neg window above", "neg empty", "neg mask 1", "neg mask 0"):
        assert paths[path] > 0, (path, paths)
    assert state.size() == int(state.pos.count.sum() + state.neg.count.sum()) > 0


def test_the_float16_cache_logits_round_as_the_reference_and_float32_does_not(streams):
    """The default keeps the reference's half-precision cache logits: against a float32 transcript it is
    off by their rounding (which the float16 transcript reproduces exactly, above)."""
    text, views = streams[1]
    state = TDAState(text, SCALE, **SETTINGS)
    result = run_against_transcript(state, ReferenceTDA(text, SCALE, SETTINGS, torch.float32), views, False)
    assert result["worst"] > 1e-3


def test_the_summary_of_several_views_is_the_unnormalised_mean_of_the_most_confident(streams):
    text, views = streams[20]
    for sample in views[:20]:
        summary = summarise_views(sample, text, SCALE)
        features, logits, loss, prob_map, pred = get_clip_logits(sample, text.T, SCALE)
        assert torch.allclose(summary.feature, features[0], atol=1e-7) and summary.pred == pred
        assert torch.allclose(summary.logits, logits[0], atol=1e-4)
        assert abs(float(summary.loss) - float(loss)) < 1e-5
        assert torch.allclose(summary.prob_map, prob_map[0], atol=1e-7)
        assert float(summary.feature.norm()) < 1 - 1e-6  # a mean of distinct unit vectors, kept as it is


def test_a_sample_meets_itself_in_the_positive_cache():
    """The first sample of a stream: cached before it is predicted, so its positive cache logit is
    ``alpha * exp(-beta * (1 - 1)) = alpha`` on its pseudo-label (no negative cache yet)."""
    g = torch.Generator().manual_seed(3)
    text = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    feature = F.normalize(torch.randn(1, 16, generator=g), dim=-1)
    state = TDAState(text, SCALE, cache_dtype="float32", **SETTINGS)
    logits = state.step(feature)
    zero_shot = SCALE * feature[0] @ text.T
    expected = zero_shot.clone()
    expected[int(zero_shot.argmax())] += 2.0
    assert torch.allclose(logits, expected, atol=1e-4)


def test_equal_losses_keep_their_arrival_order_and_a_full_class_rejects_an_equal_loss():
    cache = ClassCache(3, 3, 2)
    for value, loss in ((1.0, 0.5), (2.0, 0.2), (3.0, 0.5), (4.0, 0.5)):  # 4.0 ties with the full class's last
        cache.add(1, torch.full((2,), value), torch.tensor(loss))
    assert cache.features[1, :, 0].tolist() == [2.0, 1.0, 3.0] and int(cache.count[1]) == 3
    cache.add(1, torch.full((2,), 5.0), torch.tensor(0.2))  # strictly lower: replaces 3.0, after the equal 2.0
    assert cache.features[1, :, 0].tolist() == [2.0, 5.0, 1.0]
    assert cache.loss[1].tolist() == pytest.approx([0.2, 0.2, 0.5])
    assert int(cache.count[0]) == 0 and cache.size() == 3


def test_the_entropy_is_normalised_by_log2_of_the_class_count_unless_asked_otherwise():
    loss = torch.tensor(math.log(24))  # the entropy of a uniform prediction over 24 classes, in nats
    assert normalised_entropy(loss, 24) == pytest.approx(math.log(24) / math.log2(24)) == pytest.approx(math.log(2))
    assert normalised_entropy(loss, 24, "ln") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="entropy_norm"):
        normalised_entropy(loss, 24, "log10")


# ---------------------------------------------------------------------------------------------------------
# Wrong readings
# ---------------------------------------------------------------------------------------------------------


class PredictFirst(TDAState):
    """The update order swapped: the logits from the caches so far, then the caches' update."""

    def step(self, view_features):
        summary = self.summarise(view_features.float())
        logits = self.final_logits(summary, self.pos)
        self.update(summary)
        return logits


def add_always_replacing(self, label, feature, loss, prob_map=None):
    """A full class replaces its last entry whatever the new loss (then sorts)."""
    kept = min(int(self.count[label]), self.capacity - 1)
    self._insert(label, int((self.loss[label, :kept] <= loss).sum()), kept, feature, loss, prob_map)


def add_unsorted(self, label, feature, loss, prob_map=None):
    """The entries in arrival order, never sorted: a full class compares with its latest entry."""
    n = int(self.count[label])
    if n == self.capacity and not bool(loss < self.loss[label, n - 1]):
        return
    kept = min(n, self.capacity - 1)
    self._insert(label, kept, kept, feature, loss, prob_map)


@pytest.mark.parametrize("mutant", ["predict_first", "always_replace", "unsorted", "entropy_ln"])
@pytest.mark.parametrize("n_views", [1, 20])
def test_wrong_readings_fail_the_comparison_with_the_transcript(streams, monkeypatch, mutant, n_views):
    text, views = streams[n_views]
    if mutant == "always_replace":
        monkeypatch.setattr(ClassCache, "add", add_always_replacing)
    if mutant == "unsorted":
        monkeypatch.setattr(ClassCache, "add", add_unsorted)
    state_class = PredictFirst if mutant == "predict_first" else TDAState
    state = state_class(text, SCALE, entropy_norm="ln" if mutant == "entropy_ln" else "log2", **SETTINGS)
    reference = ReferenceTDA(text, SCALE, SETTINGS)
    result = run_against_transcript(state, reference, views, check_caches=False, stop_above=10 * TOLERANCE)
    assert result["worst"] > 10 * TOLERANCE, result["worst"]


# ---------------------------------------------------------------------------------------------------------
# State round trip
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_views", [1, 20])
def test_state_dict_round_trip_through_safetensors_continues_bit_identically(streams, n_views):
    text, views = streams[n_views]
    views = views[:300]
    stop = random.Random(n_views).randrange(40, 260)
    uninterrupted = TDAState(text, SCALE, **SETTINGS)
    expected = torch.stack([uninterrupted.step(v) for v in views])
    first = TDAState(text, SCALE, **SETTINGS)
    for v in views[:stop]:
        first.step(v)
    saved = first.state_dict()
    assert set(saved) == {f"{c}.{k}" for c in ("pos", "neg") for k in ("features", "loss", "count")} | {"neg.prob_map"}
    assert saved["pos.count"].dtype == torch.int64
    restored = TDAState(text, SCALE, **SETTINGS)
    restored.load_state_dict(load_tensors(save_tensors(saved)))
    assert restored.size() == first.size() > 0
    resumed = torch.stack([restored.step(v) for v in views[stop:]])
    assert torch.equal(resumed, expected[stop:])
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    # the saved tensors are copies, not views of the live state
    assert saved["pos.features"].data_ptr() != first.pos.features.data_ptr()
    with pytest.raises(ValueError, match="pos.features"):
        TDAState(text, SCALE, pos_shot_capacity=5).load_state_dict(saved)


# ---------------------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"n_views": 5}, "n_views"),  # int(0.1 * 5) = 0 confident views
        ({"n_views": 0}, "n_views"),
        ({"pos_shot_capacity": 0}, "pos_shot_capacity"),
        ({"neg_shot_capacity": 1.5}, "neg_shot_capacity"),
        ({"pos_alpha": -1.0}, "pos_alpha"),
        ({"neg_beta": -0.5}, "neg_beta"),
        ({"neg_entropy_lower": 0.6}, "neg_entropy_upper"),  # the window would be empty
        ({"neg_mask_upper": 0.01}, "neg_mask_upper"),
        ({"pos_enabled": "yes"}, "pos_enabled"),
        ({"entropy_norm": "log10"}, "entropy_norm"),
        ({"cache_dtype": "bfloat16"}, "cache_dtype"),
        ({"continual": 1}, "continual"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, option):
    with pytest.raises(OptionError) as error:
        TDA(**kwargs)
    assert error.value.option == option
    if kwargs.get("n_views") == 5:
        assert "at least 10" in str(error.value)  # names the fix


def test_the_run_key_sees_every_option():
    assert_run_key_sees_every_argument(TDA(pos_alpha=1.0, neg_entropy_upper=0.6, entropy_norm="ln", n_views=10))


@pytest.fixture(scope="module")
def world_module():
    return ZeroShotClassifier(create_vlm("tta-world-resnet"))


class Recording(TDAState):
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
    monkeypatch.setattr("tta.callbacks.tda.TDAState", Recording)
    monkeypatch.setattr(Recording, "made", [])
    options = {"n_views": n_views, "pos_alpha": 3.0, "neg_entropy_upper": 0.69, "seed": 0}
    large, _ = predict(world_module, [TDA(**options)], batch_size=4, n=6, domains=("clean", "blur"))
    states = Recording.made
    # one fresh state per domain, each fed its domain's 6 samples of n_views views, built with the options
    assert [len(s.seen) for s in states] == [6, 6]
    assert all(f.shape == (n_views, states[0].text.shape[1]) for s in states for f in s.seen)
    assert (states[0].pos_alpha, states[0].entropy_window) == (3.0, (0.2, 0.69))
    text, scale = world_module.text_features().float(), float(world_module.vlm.logit_scale)
    replay = []
    for recorded in states:
        fresh = TDAState(text, scale, pos_alpha=3.0, neg_entropy_upper=0.69)
        replay += [fresh.step(f) for f in recorded.seen]
    assert torch.allclose(large["logits"], torch.stack(replay), atol=1e-5)
    assert not torch.allclose(large["logits"], large["logits_zs"], atol=1e-2)
    small, _ = predict(world_module, [TDA(images_per_step=1, **options)], batch_size=1, n=6, domains=("clean", "blur"))
    assert torch.equal(small["index"], large["index"])
    assert torch.allclose(small["logits"], large["logits"], atol=1e-5)


def test_continual_carries_one_cache_across_domains(world_module, monkeypatch):
    monkeypatch.setattr("tta.callbacks.tda.TDAState", Recording)
    monkeypatch.setattr(Recording, "made", [])
    predict(world_module, [TDA(n_views=1, continual=True)], batch_size=4, n=4, domains=("clean", "blur"))
    assert [len(s.seen) for s in Recording.made] == [8]


# ---------------------------------------------------------------------------------------------------------
# The cards
# ---------------------------------------------------------------------------------------------------------

CARDS = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "tda_vit_b16"
SEVEN = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]
#: card -> (data, positive alpha, positive beta, views, templates): alpha and beta from configs/<set>.yaml;
#: views from utils.py build_test_data_loader (64 AugMix views on A/V/R/S only); templates from
#: datasets/<set>.py (80 on ImageNet-R and -Sketch: their first and last are checked).
REFERENCE = {
    "imagenet": ({"variant": "imagenet"}, 2.0, 5.0, 1, SEVEN),
    "imagenet_a": ({"variant": "imagenet_a"}, 2.0, 5.0, 64, SEVEN),
    "imagenet_v2": ({"_target_": "tta.datamodules.ImageNetV2DataModule"}, 1.0, 8.0, 64, SEVEN),
    "imagenet_r": ({"variant": "imagenet_r"}, 1.0, 8.0, 64, 80),
    "imagenet_sketch": ({"variant": "imagenet_sketch"}, 2.363, 7.45, 64, 80),
    "caltech101": ({"dataset": "caltech101"}, 5.0, 5.0, 1, SEVEN),
    "dtd": ({"dataset": "dtd"}, 2.0, 3.0, 1, ["{} texture."]),
    "eurosat": ({"dataset": "eurosat"}, 4.0, 8.0, 1, ["a centered satellite photo of {}."]),
    "aircraft": ({"dataset": "aircraft"}, 2.0, 2.0, 1, ["a photo of a {}, a type of aircraft."]),
    "flower102": ({"dataset": "flower102"}, 1.0, 5.0, 1, ["a photo of a {}, a type of flower."]),
    "food101": ({"dataset": "food101"}, 1.0, 1.0, 1, ["a photo of {}, a type of food."]),
    "pets": ({"dataset": "pets"}, 2.0, 7.0, 1, ["a photo of a {}, a type of pet."]),
    "cars": ({"dataset": "cars"}, 1.0, 7.0, 1, SEVEN),
    "sun397": ({"dataset": "sun397"}, 2.0, 3.0, 1, SEVEN),
    "ucf101": ({"dataset": "ucf101"}, 3.0, 8.0, 1, ["a photo of a person doing {}."]),
}
#: ViT-B/16 figures of shared/METHODS.md (the DOTA paper's tables); none for the fine-grained sets.
PUBLISHED = {
    "imagenet": 69.51,
    "imagenet_a": 60.11,
    "imagenet_r": 80.24,
    "imagenet_sketch": 50.54,
    "imagenet_v2": 64.67,
}


def test_the_cards_are_the_fifteen_data_sets_and_the_bases_are_marked():
    files = {p.stem for p in CARDS.glob("*.yaml")}
    assert {f for f in files if not f.startswith("_")} == set(REFERENCE)
    assert {f for f in files if f.startswith("_")} == {"_family_common", "_family_templates_7", "_family_templates_80"}


def test_every_card_builds_the_callback_with_the_reference_settings(compose):
    for card, (data, alpha, beta, n_views, templates) in REFERENCE.items():
        cfg = compose([f"experiment=tda_vit_b16/{card}"])
        callback = instantiate(cfg.tta.callbacks.tda)
        assert isinstance(callback, TDA), card
        assert (callback.pos_alpha, callback.pos_beta, callback.n_views, callback.views) == (
            alpha,
            beta,
            n_views,
            "augmix",
        ), card
        constant = {k: getattr(callback, k) for k in SETTINGS if k not in ("pos_alpha", "pos_beta")}
        assert constant == {k: v for k, v in SETTINGS.items() if k not in ("pos_alpha", "pos_beta")}, card
        assert (callback.pos_enabled, callback.neg_enabled, callback.continual) == (True, True, False), card
        assert (callback.entropy_norm, callback.cache_dtype) == ("log2", "float16"), card
        if templates == 80:
            assert len(cfg.model.templates) == 80, card
            ends = (cfg.model.templates[0], cfg.model.templates[-1])
            assert ends == ("a bad photo of a {}.", "a tattoo of the {}."), card
        else:
            assert list(cfg.model.templates) == templates, card
        assert all(cfg.data[k] == v for k, v in data.items()), card
        if "dataset" in data:
            assert cfg.data._target_.endswith("FineGrainedDataModule") and cfg.data.split == "test", card
        else:
            assert cfg.data.class_list == "clip", card
        assert cfg.model.vlm.name == "ViT-B-16-quickgelu" and cfg.model.vlm.pretrained == "openai", card
        assert cfg.trainer.precision == "16-mixed" and cfg.seed == 1, card  # clip.load on CUDA: fp16
        assert cfg.published.method == "tda", card
        assert dict(cfg.published.accuracy) == ({card: PUBLISHED[card]} if card in PUBLISHED else {}), card


def test_the_tta_option_is_the_callback_defaults(compose):
    cfg = compose(["tta=tda", "view_store=null"])
    built = instantiate(cfg.tta.callbacks.tda)
    default = TDA()
    options = [name for name in inspect.signature(TDA).parameters if name != "view_store"]
    assert {k: getattr(built, k) for k in options} == {k: getattr(default, k) for k in options}
