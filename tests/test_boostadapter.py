"""BoostAdapter against a test-side transcript of its authors' code, and the wrong readings it must not be.

What is proven here:

- ``BoostAdapterState`` (``tta.methods.boostadapter``) gives, sample after sample over 600-sample streams
  of 24 classes, the logits of a transcript of the reference's loop (taolinzhang/BoostAdapter 9983e1a:
  ``runner.py`` ``run_test_tda`` with ``--mode boostadapter``, ``update_cache`` with its ``fifo`` flag,
  ``compute_cache_logits``; ``utils.py`` ``get_clip_logits`` with ``infer_ori_image``,
  ``select_confident_samples``, ``get_output_entropy``), on 20 views summarised by their confident
  mean (ImageNet-A/...) or by the original (the fine-grained sets), and on one view (ImageNet); the
  historical positive cache (sorted by loss), the first-in-first-out negative cache and the boosted
  copy that serves each sample are the transcript's after every sample. Boosting entries open classes,
  append, displace historical entries and are rejected; the negative cache drops its oldest entry,
  lower losses included: each path is counted.
- Wrong readings give other logits on the same stream and fail that comparison: the logits before the
  update, every view bootstrapped (no entropy filter), another ``delta``, boosting entries leaking into
  the historical cache (no copy), a negative cache sorted by loss as TDA's.
- The state saved through ``safetensors`` at any step and loaded into a fresh state continues with
  bit-identical logits.
- The ``BoostAdapter`` callback refuses bad options by name and gives inside ``Trainer.predict`` the
  state's logits on its own view features in stream order whatever the batch size, a fresh state per
  domain.
- Every card of ``configs/experiment/boostadapter_vit_b16`` composes and builds the callback with the
  reference's per-data-set settings (a table transcribed from its ``configs/*.yaml``, ``runner.py`` and
  ``utils.py``).
"""

from __future__ import annotations

import copy
import inspect
import operator
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from test_config import assert_run_key_sees_every_argument
from test_tda import REFERENCE as TDA_REFERENCE
from test_tda import (
    SETTINGS,
    assert_same_cache,
    avg_entropy,
    get_entropy,
    make_stream,
    softmax_entropy,
)
from test_tta_callbacks import predict

import tta.methods.boostadapter as boostadapter_module
from tta.callbacks.boostadapter import BoostAdapter
from tta.methods.boostadapter import BoostAdapterState, FifoClassCache, boosted_cache
from tta.methods.tda import ClassCache
from tta.models import create_vlm
from tta.tasks import ZeroShotClassifier
from tta.validation import OptionError

SCALE = 100.0
TOLERANCE = 1e-4 * SCALE

# ---------------------------------------------------------------------------------------------------------
# The transcript of the reference (runner.py, utils.py)
# ---------------------------------------------------------------------------------------------------------


def get_output_entropy(outputs):
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    return -(logits * torch.exp(logits)).sum(dim=-1)


def select_confident_samples(feat, logits, top):
    batch_entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    idx = torch.argsort(batch_entropy, descending=False)[: int(batch_entropy.size()[0] * top)]
    return feat[idx], logits[idx], idx


def get_clip_logits(image_features, clip_weights, scale, infer_ori_image):
    """``utils.py`` ``get_clip_logits`` from the encoded, normalised views (``V x D``)."""
    clip_logits = scale * image_features @ clip_weights
    ori_feat = image_features.detach().clone()
    ori_output = clip_logits.detach().clone()
    if image_features.size(0) > 1:
        if infer_ori_image:
            loss = softmax_entropy(clip_logits[:1])
            prob_map = clip_logits[:1].softmax(1)
            pred = int(clip_logits[:1].topk(1, 1, True, True)[1].t()[0])
            return image_features[:1], clip_logits[:1], loss, prob_map, pred, ori_feat, ori_output
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
    return image_features, clip_logits, loss, prob_map, pred, ori_feat, ori_output


def update_cache(cache, pred, features_loss, shot_capacity, include_prob_map=False, fifo=True):
    item = features_loss if not include_prob_map else features_loss[:2] + [features_loss[2]]  # noqa: RUF005
    if pred in cache:
        cache[pred].append(item)
        if fifo:
            if len(cache[pred]) > shot_capacity:
                cache[pred] = cache[pred][1:]
        else:
            cache[pred] = sorted(cache[pred], key=operator.itemgetter(1))
            cache[pred] = cache[pred][:shot_capacity]
    else:
        cache[pred] = [item]


def compute_cache_logits(image_features, cache, alpha, beta, clip_weights, neg_mask_thresholds=None):
    """As the reference; ``.cuda().half()`` is ``.half()``, and the features (fp16 in the reference's
    fp16 CLIP) are cast to half here."""
    cache_keys = []
    cache_values = []
    for class_index in sorted(cache.keys()):
        for item in cache[class_index]:
            cache_keys.append(item[0])
            if neg_mask_thresholds:
                cache_values.append(item[2])
            else:
                cache_values.append(class_index)
    if len(cache_keys) == 0:
        return torch.zeros(1)[0]
    cache_keys = torch.cat(cache_keys, dim=0).permute(1, 0).half()
    if neg_mask_thresholds:
        cache_values = torch.cat(cache_values, dim=0)
        cache_values = (
            ((cache_values > neg_mask_thresholds[0]) & (cache_values < neg_mask_thresholds[1])).type(torch.int8)
        ).half()
    else:
        cache_values = (F.one_hot(torch.Tensor(cache_values).to(torch.int64), num_classes=clip_weights.size(1))).half()
    affinity = image_features.half() @ cache_keys
    cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
    return alpha * cache_logits


class ReferenceBoostAdapter:
    """``run_test_tda``'s loop body in ``boostadapter`` mode, one sample (``V x D``) at a time; keeps the
    last boosted copy (``cur_pos_cache``) and counts the paths taken."""

    def __init__(self, text, scale, settings, delta, infer_ori_image):
        self.clip_weights, self.scale, self.s = text.T.clone(), scale, settings
        self.delta, self.infer_ori_image = delta, infer_ori_image
        self.pos_cache, self.neg_cache, self.cur_pos_cache = {}, {}, {}
        self.paths = Counter()

    def step(self, views):
        s, shot = self.s, self.s["pos_shot_capacity"]
        image_features, clip_logits, loss, prob_map, pred, ori_feat, ori_output = get_clip_logits(
            views, self.clip_weights, self.scale, self.infer_ori_image
        )
        prop_entropy = get_entropy(loss, self.clip_weights)
        update_cache(self.pos_cache, pred, [image_features, loss], shot, fifo=False)
        select_feat, select_output, _ = select_confident_samples(ori_feat, ori_output, 0.1)
        select_entropy = get_output_entropy(select_output)
        cur_pos_cache = copy.deepcopy(self.pos_cache)
        for i in range(select_entropy.shape[0]):
            cur_pred = int(select_output[i].argmax(dim=-1).item())
            item = [select_feat[i].unsqueeze(0), select_entropy[i].item()]
            self.count_boost(cur_pos_cache, cur_pred, item)
            update_cache(cur_pos_cache, cur_pred, item, shot + self.delta, fifo=False)
        self.cur_pos_cache = cur_pos_cache
        if s["neg_entropy_lower"] < prop_entropy < s["neg_entropy_upper"]:
            self.count_negative(pred, loss)
            update_cache(self.neg_cache, pred, [image_features, loss, prob_map], s["neg_shot_capacity"], True)
        final_logits = clip_logits.clone()
        final_logits += compute_cache_logits(
            image_features, cur_pos_cache, s["pos_alpha"], s["pos_beta"], self.clip_weights
        )
        if self.neg_cache:
            mask = (s["neg_mask_lower"], s["neg_mask_upper"])
            final_logits -= compute_cache_logits(
                image_features, self.neg_cache, s["neg_alpha"], s["neg_beta"], self.clip_weights, mask
            )
        return final_logits[0].float()

    def count_boost(self, cache, pred, item):
        if pred not in cache:
            self.paths["boost new class"] += 1
        elif len(cache[pred]) < self.s["pos_shot_capacity"] + self.delta:
            self.paths["boost append"] += 1
        elif item[1] < float(cache[pred][-1][1]):
            self.paths["boost displaces"] += 1
        else:
            self.paths["boost rejected"] += 1

    def count_negative(self, pred, loss):
        items = self.neg_cache.get(pred, [])
        if len(items) == self.s["neg_shot_capacity"]:
            self.paths["negative drops the oldest"] += 1
            if float(items[0][1]) < float(loss):
                self.paths["negative drops a lower loss"] += 1


# ---------------------------------------------------------------------------------------------------------
# Fidelity
# ---------------------------------------------------------------------------------------------------------

#: (views, infer_original, delta): ImageNet-A-like, fine-grained-like (two of them), ImageNet-like. With
#: more confident views (int(0.1 * V)) than delta, boosting entries displace historical ones.
CASES = {
    "confident_mean": (20, False, 1),
    "original_delta0": (20, True, 0),
    "original_delta3": (40, True, 3),
    "one_view": (1, False, 3),
}


@pytest.fixture(scope="module")
def streams():
    return {20: make_stream(1, 20), 40: make_stream(2, 40), 1: make_stream(0, 1)}


def run_against_transcript(state, reference, views, check_caches=True, stop_above=None) -> dict:
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
            boosted = boosted_cache(state.pos, sample, state.text, state.logit_scale, state.delta)
            assert_same_cache(boosted, reference.cur_pos_cache, step, "boosted")
    return {"worst": worst, "paths": reference.paths}


@pytest.mark.parametrize("case", list(CASES))
def test_boostadapter_equals_the_reference_transcript_sample_after_sample(streams, case):
    n_views, infer_original, delta = CASES[case]
    text, views = streams[n_views]
    state = BoostAdapterState(text, SCALE, delta=delta, infer_original=infer_original, **SETTINGS)
    reference = ReferenceBoostAdapter(text, SCALE, SETTINGS, delta, infer_original)
    result = run_against_transcript(state, reference, views)
    assert result["worst"] <= TOLERANCE, result
    paths = result["paths"]
    assert paths["negative drops the oldest"] > 0 and paths["negative drops a lower loss"] > 0, paths
    if n_views == 1:  # int(0.1 * 1) = 0: nothing to bootstrap, TDA's positive cache
        assert not any(key.startswith("boost") for key in paths), paths
    else:
        for path in ("new class", "append", "displaces", "rejected"):
            assert paths[f"boost {path}"] > 0, (path, paths)
    assert state.pos.capacity == 3 and int(state.pos.count.max()) == 3  # no boosting entry stays


def test_boosting_entries_are_the_confident_views_under_their_own_labels_and_entropies(streams):
    text, views = streams[20]
    state = BoostAdapterState(text, SCALE, delta=3, infer_original=True, **SETTINGS)
    sample = views[0]
    boosted = boosted_cache(state.pos, sample, text, SCALE, 3)  # an empty history: the boosts alone
    logits = SCALE * sample @ text.T
    entropies = softmax_entropy(logits)
    kept = torch.argsort(entropies)[:2]
    assert boosted.size() == 2 and boosted.capacity == 6 and state.pos.size() == 0
    for view in kept.tolist():
        label = int(logits[view].argmax())
        slots = range(int(boosted.count[label]))
        assert any(torch.equal(boosted.features[label, s], sample[view]) for s in slots)
        assert any(abs(float(boosted.loss[label, s]) - float(entropies[view])) < 1e-5 for s in slots)


def test_the_negative_cache_is_first_in_first_out():
    cache = FifoClassCache(2, 2, 1, prob_maps=True)
    for value, loss in ((1.0, 0.1), (2.0, 0.9), (3.0, 0.5)):  # the lowest loss (1.0) goes first
        cache.add(0, torch.tensor([value]), torch.tensor(loss), torch.zeros(2))
    assert cache.features[0, :, 0].tolist() == [2.0, 3.0] and cache.loss[0].tolist() == pytest.approx([0.9, 0.5])
    assert int(cache.count[0]) == 2 and int(cache.count[1]) == 0


# ---------------------------------------------------------------------------------------------------------
# Wrong readings
# ---------------------------------------------------------------------------------------------------------


class PredictFirst(BoostAdapterState):
    """The update order swapped: the logits from the caches so far (boosted), then the update."""

    def step(self, view_features):
        views = view_features.float()
        summary = self.summarise(views)
        logits = self.final_logits(summary, boosted_cache(self.pos, views, self.text, self.logit_scale, self.delta))
        self.update(summary)
        return logits


def sorted_negative(self, n_classes, capacity, dim, device):
    return ClassCache(n_classes, capacity, dim, prob_maps=True, device=device)


@pytest.mark.parametrize("mutant", ["predict_first", "every_view", "delta", "leak", "sorted_negative"])
@pytest.mark.parametrize("case", ["confident_mean", "original_delta3"])
def test_wrong_readings_fail_the_comparison_with_the_transcript(streams, monkeypatch, mutant, case):
    n_views, infer_original, delta = CASES[case]
    text, views = streams[n_views]
    if mutant == "every_view":  # the bootstrap views not filtered by entropy
        monkeypatch.setattr(boostadapter_module, "CONFIDENT_FRACTION", 1.0)
    if mutant == "leak":  # no copy: the boosting entries go into the historical cache
        monkeypatch.setattr(ClassCache, "grown", lambda self, capacity: self)
    if mutant == "sorted_negative":
        monkeypatch.setattr(BoostAdapterState, "negative_cache", sorted_negative)
    state_class = PredictFirst if mutant == "predict_first" else BoostAdapterState
    state_delta = delta + 2 if mutant == "delta" else delta
    state = state_class(text, SCALE, delta=state_delta, infer_original=infer_original, **SETTINGS)
    reference = ReferenceBoostAdapter(text, SCALE, SETTINGS, delta, infer_original)
    result = run_against_transcript(state, reference, views, check_caches=False, stop_above=10 * TOLERANCE)
    assert result["worst"] > 10 * TOLERANCE, result["worst"]


# ---------------------------------------------------------------------------------------------------------
# State round trip
# ---------------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_through_safetensors_continues_bit_identically(streams):
    text, views = streams[20]
    views = views[:300]
    stop = random.Random(11).randrange(40, 260)
    options = {"delta": 2, "infer_original": True, **SETTINGS}
    uninterrupted = BoostAdapterState(text, SCALE, **options)
    expected = torch.stack([uninterrupted.step(v) for v in views])
    first = BoostAdapterState(text, SCALE, **options)
    for v in views[:stop]:
        first.step(v)
    saved = first.state_dict()
    restored = BoostAdapterState(text, SCALE, **options)
    restored.load_state_dict(load_tensors(save_tensors(saved)))
    assert restored.size() == first.size() > 0
    resumed = torch.stack([restored.step(v) for v in views[stop:]])
    assert torch.equal(resumed, expected[stop:])
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"delta": -1}, "delta"),
        ({"delta": 1.5}, "delta"),
        ({"infer_original": "yes"}, "infer_original"),
        ({"n_views": 5}, "n_views"),
        ({"pos_shot_capacity": 0}, "pos_shot_capacity"),
        ({"views": "diffusion"}, "views"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, option):
    with pytest.raises(OptionError) as error:
        BoostAdapter(**kwargs)
    assert error.value.option == option


def test_the_run_key_sees_every_option():
    assert_run_key_sees_every_argument(BoostAdapter(delta=1, infer_original=True, pos_beta=7.0, n_views=10))


@pytest.fixture(scope="module")
def world_module():
    return ZeroShotClassifier(create_vlm("tta-world-resnet"))


class Recording(BoostAdapterState):
    """The state, recording each sample's view features; every state made is listed in ``made``."""

    made: list[Recording] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []
        Recording.made.append(self)

    def step(self, view_features):
        self.seen.append(view_features.detach().clone())
        return super().step(view_features)


@pytest.mark.parametrize("infer_original", [False, True])
def test_callback_logits_are_the_state_on_its_own_view_features_in_stream_order(
    world_module, monkeypatch, infer_original
):
    monkeypatch.setattr("tta.callbacks.boostadapter.BoostAdapterState", Recording)
    monkeypatch.setattr(Recording, "made", [])
    options = {"n_views": 10, "delta": 1, "infer_original": infer_original, "pos_alpha": 3.0, "seed": 0}
    large, _ = predict(world_module, [BoostAdapter(**options)], batch_size=4, n=6, domains=("clean", "blur"))
    states = Recording.made
    assert [len(s.seen) for s in states] == [6, 6]
    assert all(f.shape == (10, states[0].text.shape[1]) for s in states for f in s.seen)
    assert (states[0].delta, states[0].infer_original, states[0].pos_alpha) == (1, infer_original, 3.0)
    text, scale = world_module.text_features().float(), float(world_module.vlm.logit_scale)
    replay = []
    for recorded in states:
        fresh = BoostAdapterState(text, scale, delta=1, infer_original=infer_original, pos_alpha=3.0)
        replay += [fresh.step(f) for f in recorded.seen]
    assert torch.allclose(large["logits"], torch.stack(replay), atol=1e-5)
    assert not torch.allclose(large["logits"], large["logits_zs"], atol=1e-2)
    small, _ = predict(
        world_module, [BoostAdapter(images_per_step=1, **options)], batch_size=1, n=6, domains=("clean", "blur")
    )
    assert torch.equal(small["index"], large["index"])
    assert torch.allclose(small["logits"], large["logits"], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The cards
# ---------------------------------------------------------------------------------------------------------

CARDS = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "boostadapter_vit_b16"
#: card -> delta of configs/<set>.yaml (ImageNet's has none: 0 here, unused with one view); alpha, beta and
#: templates are TDA's (the same configs and datasets/*.py), taken from test_tda's table.
DELTA = {
    "imagenet": 0,
    "imagenet_a": 3,
    "imagenet_v2": 1,
    "imagenet_r": 3,
    "imagenet_sketch": 1,
    "caltech101": 2,
    "dtd": 0,
    "eurosat": 0,
    "aircraft": 2,
    "flower102": 0,
    "food101": 3,
    "pets": 0,
    "cars": 3,
    "sun397": 1,
    "ucf101": 0,
}


def test_the_cards_are_the_fifteen_data_sets_and_the_base_is_marked():
    files = {p.stem for p in CARDS.glob("*.yaml")}
    assert {f for f in files if not f.startswith("_")} == set(DELTA) == set(TDA_REFERENCE)
    assert {f for f in files if f.startswith("_")} == {"_family_common"}


def test_every_card_builds_the_callback_with_the_reference_settings(compose):
    for card, delta in DELTA.items():
        data, alpha, beta, _, templates = TDA_REFERENCE[card]
        cfg = compose([f"experiment=boostadapter_vit_b16/{card}"])
        callback = instantiate(cfg.tta.callbacks.boostadapter)
        assert isinstance(callback, BoostAdapter), card
        fine_grained = "dataset" in data
        n_views = 1 if card == "imagenet" else 64  # runner.py --views 64; ImageNet's loader: one crop
        expected = (alpha, beta, delta, n_views, "crop_flip", fine_grained)
        got = (callback.pos_alpha, callback.pos_beta, callback.delta, callback.n_views, callback.views)
        assert (*got, callback.infer_original) == expected, card
        constant = {k: getattr(callback, k) for k in SETTINGS if k not in ("pos_alpha", "pos_beta")}
        assert constant == {k: v for k, v in SETTINGS.items() if k not in ("pos_alpha", "pos_beta")}, card
        assert (callback.entropy_norm, callback.cache_dtype, callback.continual) == ("log2", "float16", False), card
        if templates == 80:
            assert len(cfg.model.templates) == 80 and cfg.model.templates[0] == "a bad photo of a {}.", card
        else:
            assert list(cfg.model.templates) == templates, card
        assert all(cfg.data[k] == v for k, v in data.items()), card
        if fine_grained:
            assert cfg.data._target_.endswith("FineGrainedDataModule") and cfg.data.split == "test", card
        else:
            assert cfg.data.class_list == "clip", card
        assert cfg.model.vlm.name == "ViT-B-16-quickgelu" and cfg.model.vlm.pretrained == "openai", card
        assert cfg.trainer.precision == "16-mixed" and cfg.seed == 1, card
        assert cfg.published.method == "boostadapter" and dict(cfg.published.accuracy) == {}, card


def test_the_tta_option_is_the_callback_defaults(compose):
    built = instantiate(compose(["tta=boostadapter", "view_store=null"]).tta.callbacks.boostadapter)
    default = BoostAdapter()
    options = [name for name in inspect.signature(BoostAdapter).parameters if name != "view_store"]
    assert {k: getattr(built, k) for k in options} == {k: getattr(default, k) for k in options}
