"""DMN-ZS against a test-side transcript of its authors' code, and the wrong readings it must not be.

What is proven here:

- ``DMNState`` (``tta.methods.dmn``) gives, sample after sample over a 600-sample stream of 24
  classes, the prediction of a transcript of the reference's zero-shot loop (YBZh/DMN c6c218c
  ``dmn_main.py``: ``direct_inference`` with ``n_shot`` 0, ``DualMem.get_text_prediction``,
  ``select_confident_samples``, ``DualMem.update_memory_bank``, ``DualMem.get_image_pred``
  ``similarity_weighted``, the ``weight_search`` mixture; ``clip/fix_clip.py`` for the memory's
  layout and its text slot), and holds the same memory, entropies and counts after every sample.
  The stream fills free slots, replaces the highest-entropy slot and drops samples, and some classes
  stay empty or part-filled: each path is counted.
- Wrong readings give other predictions on the same stream and fail that comparison: the memory
  read before the write, a replacement without the entropy test or of the lowest-entropy slot, another
  attention sharpness, an un-normalised read, no text slot. A softmax over each class's slots is NOT
  wrong (the read is normalised per class): it passes.
- The state saved through ``safetensors`` at any step and loaded into a fresh state continues with
  bit-identical logits.
- The ``DMN`` callback refuses bad options by name, gives inside ``Trainer.predict`` the state's logits
  on its own view features in stream order whatever the batch size, and a fresh memory per domain; a
  run stopped after two batches resumes from the saved memory to the uninterrupted run's bytes.
- Every card of ``configs/experiment/dmn_vit_b16`` composes and builds the callback with the reference's
  per-data-set settings (a table transcribed from its config and log files).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from test_config import assert_run_key_sees_every_argument
from test_online import _run
from test_tta_callbacks import predict

from tta.callbacks.dmn import DMN
from tta.methods.dmn import DMNState, confident_mean, n_dmn_kept
from tta.models import create_vlm
from tta.tasks import ZeroShotClassifier
from tta.validation import OptionError

# ---------------------------------------------------------------------------------------------------------
# The transcript of the reference (dmn_main.py, n_shot 0)
# ---------------------------------------------------------------------------------------------------------


class ReferenceDMN:
    """The reference's per-sample loop, step by step, one sample of ``V x D`` normalised view features
    at a time. The wrong readings are switched on by name (``mutant``); ``None`` is the reference."""

    def __init__(self, text, scale, memory_size, beta, memory_weight, selection_p, mutant=None):
        n_cls, dim = text.shape
        self.text_feat, self.scale, self.memory_size, self.beta = text.clone(), scale, memory_size, beta
        self.beta2, self.selection_p, self.mutant = memory_weight, selection_p, mutant
        # clip/fix_clip.py get_text_features: the text slot and the empty dynamic memory
        self.fixed_global_feat_vanilla = self.text_feat.clone().unsqueeze(1)  # C x 1 x D
        self.image_feature_memory = torch.zeros(n_cls, memory_size, dim)
        self.image_prediction_mem = torch.zeros(n_cls, memory_size, n_cls)
        self.image_entropy_mem = torch.zeros(n_cls, memory_size)
        self.image_feature_count = torch.zeros(n_cls, 1).long()
        # DualMem's mapping parameters, never trained in the training-free setting (position 'all')
        self.global_bias = torch.zeros(n_cls, dim)
        self.global_bias_key = torch.zeros(n_cls, dim)
        self.global_bias_value = torch.zeros(n_cls, dim)
        self.global_ffn_bias = torch.zeros(n_cls, dim)
        self.text_bias = torch.zeros(n_cls, dim)
        self.paths = {"free": 0, "replace": 0, "drop": 0}

    def get_text_prediction(self, image_features_global):
        text_feat = self.text_feat + self.text_bias
        text_feat = text_feat / text_feat.norm(dim=1, keepdim=True)
        return (self.scale * image_features_global @ text_feat.t()).softmax(-1)

    @staticmethod
    def select_confident_samples(prob, top):
        batch_entropy = -(prob * torch.log(prob + 1e-6)).sum(1)
        idx = torch.argsort(batch_entropy, descending=False)[: int(batch_entropy.size()[0] * top)]
        return prob[idx], idx

    def update_memory_bank(self, image_features_global, init_pred):
        mean_prob = init_pred[0]
        _value, indice = mean_prob.max(0)
        pseudo_label = indice.item()
        selected_image_features_global = image_features_global[:1]
        current_instance_entropy = -(mean_prob * (torch.log(mean_prob + 1e-8))).sum()
        if self.image_feature_count[pseudo_label] == self.memory_size:
            gate = self.mutant != "replace_always"
            if gate and (current_instance_entropy < self.image_entropy_mem[pseudo_label]).sum() == 0:
                self.paths["drop"] += 1
            else:
                _, indice = torch.sort(self.image_entropy_mem[pseudo_label])
                to_replace_indice = indice[0] if self.mutant == "replace_lowest" else indice[-1]
                self.image_feature_memory[pseudo_label][to_replace_indice] = selected_image_features_global
                self.image_prediction_mem[pseudo_label][to_replace_indice] = mean_prob
                self.image_entropy_mem[pseudo_label][to_replace_indice] = current_instance_entropy
                self.paths["replace"] += 1
        else:
            slot = self.image_feature_count[pseudo_label, 0].item()
            self.image_feature_memory[pseudo_label][slot] = selected_image_features_global
            self.image_prediction_mem[pseudo_label][slot] = mean_prob
            self.image_entropy_mem[pseudo_label][slot] = current_instance_entropy
            self.image_feature_count[pseudo_label] += 1
            self.paths["free"] += 1

    def get_image_pred(self, image_features_global):
        img_feat = image_features_global[:1]
        if self.mutant == "no_text_slot":
            memorized_image_feat = self.image_feature_memory.clone()
        else:
            memorized_image_feat = torch.cat((self.image_feature_memory, self.fixed_global_feat_vanilla), dim=1)
        img_feat_mappling = img_feat + self.global_bias.mean(0, keepdim=True)
        memorized_image_feat_K = memorized_image_feat + self.global_bias_key.unsqueeze(1)
        memorized_image_feat_V = memorized_image_feat + self.global_bias_value.unsqueeze(1)
        memorized_image_feat_K = memorized_image_feat_K / memorized_image_feat_K.norm(dim=-1, keepdim=True)
        memorized_image_feat_K[memorized_image_feat.sum(-1) == 0] = 0
        memorized_image_feat_V = memorized_image_feat_V / memorized_image_feat_V.norm(dim=-1, keepdim=True)
        memorized_image_feat_V[memorized_image_feat.sum(-1) == 0] = 0
        img_feat_mappling = img_feat_mappling / img_feat_mappling.norm(dim=-1, keepdim=True)
        similarity_matrix = (img_feat_mappling * memorized_image_feat_K).sum(-1)
        if self.mutant == "sharpness":  # beta read as a temperature
            similarity_matrix = torch.exp(-(1 / self.beta) * (-similarity_matrix + 1))
        elif self.mutant == "softmax_slots":  # normalised over each class's slots: the same read
            similarity_matrix = (self.beta * similarity_matrix).softmax(-1)
        else:
            similarity_matrix = torch.exp(-self.beta * (-similarity_matrix + 1))
        adaptive_image_feat = (memorized_image_feat_V * similarity_matrix.unsqueeze(-1)).sum(1)
        if self.mutant != "unnormalised":
            adaptive_image_feat = adaptive_image_feat / adaptive_image_feat.norm(dim=-1, keepdim=True)
            adaptive_image_feat = adaptive_image_feat + self.global_ffn_bias.unsqueeze(0)
            adaptive_image_feat = adaptive_image_feat / adaptive_image_feat.norm(dim=-1, keepdim=True)
        logits = self.scale * adaptive_image_feat @ img_feat.unsqueeze(-1)
        return logits[:, :, 0].softmax(dim=1)

    def step(self, image_features_global):
        """One sample as ``direct_inference``'s loop body; returns the searched mixture (probabilities)."""
        img_text = self.get_text_prediction(image_features_global)
        img_text_pred = img_text[:1]
        confidence_prediction, _ = self.select_confident_samples(img_text, self.selection_p)
        init_pred = confidence_prediction.mean(0, keepdim=True)
        if self.mutant == "read_first":
            img_global_pred = self.get_image_pred(image_features_global)
            self.update_memory_bank(image_features_global, init_pred)
        else:
            self.update_memory_bank(image_features_global, init_pred)
            img_global_pred = self.get_image_pred(image_features_global)
        pred_fewshot_global = img_text_pred  # n_shot 0: the static memory's prediction is the text one, weight 0
        return (img_text_pred * 1.0 + img_global_pred * self.beta2 + pred_fewshot_global * 0)[0]


# ---------------------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------------------

SETTINGS = {"memory_size": 4, "beta": 5.5, "memory_weight": 1.0, "selection": 0.25}


def make_stream(seed: int = 0, n: int = 600, n_classes: int = 24, dim: int = 48, n_views: int = 8):
    """Text features and ``n`` samples of ``n_views`` normalised views: classes drawn from a skewed law whose
    last three classes never occur (only samples mistaken for them reach their memories, which stay empty
    or part-filled), class signal of random strength (confident and unsure samples: both sides of the
    entropy test), views scattered around the sample."""
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    law = torch.linspace(1.0, 0.05, n_classes) ** 2
    law[-3:] = 0
    labels = torch.multinomial(law, n, replacement=True, generator=g)
    strength = 0.2 + 1.3 * torch.rand(n, 1, generator=g)
    centres = strength * text[labels] + 0.8 * torch.randn(n, dim, generator=g) / math.sqrt(dim)
    views = centres.unsqueeze(1) + 0.5 * torch.randn(n, n_views, dim, generator=g) / math.sqrt(dim)
    return text, F.normalize(views, dim=-1), labels


def run_against_transcript(state: DMNState, reference: ReferenceDMN, stream: torch.Tensor, scale: float) -> dict:
    """Both over the stream; the largest logit difference (log of the reference's mixture), the first
    step whose memory differs, and the paths the reference took."""
    worst, first_memory_mismatch, argmax_mismatches = 0.0, None, 0
    for i, views in enumerate(stream):
        ours = state.step(views)
        mixture = reference.step(views.clone())
        shown = mixture > 1e-30  # the reference's probabilities underflow far out; compare where they do not
        gap = (ours[shown] - mixture[shown].log()).abs().max() if shown.any() else torch.tensor(math.inf)
        worst = max(worst, float(gap) if torch.isfinite(mixture).all() else math.inf)
        argmax_mismatches += int(ours.argmax() != mixture.argmax())
        same_memory = (
            torch.equal(state.counts, reference.image_feature_count[:, 0])
            and torch.allclose(state.features, reference.image_feature_memory, atol=1e-6)
            and torch.allclose(state.entropies, reference.image_entropy_mem, atol=1e-6)
        )
        if not same_memory and first_memory_mismatch is None:
            first_memory_mismatch = i
    return {
        "worst": worst,
        "memory_mismatch": first_memory_mismatch,
        "argmax_mismatches": argmax_mismatches,
        "paths": dict(reference.paths),
    }


@pytest.fixture(scope="module")
def stream():
    return make_stream()


@pytest.mark.parametrize(
    "scale, settings",
    [(100.0, SETTINGS), (50.0, {**SETTINGS, "memory_weight": 10.0, "beta": 2.0, "selection": 0.5})],
    ids=["reference-like", "other-settings"],
)
def test_dmn_equals_the_reference_transcript_sample_after_sample(stream, scale, settings):
    text, views, _ = stream
    state = DMNState(text, scale, **settings)
    reference = ReferenceDMN(
        text,
        scale,
        settings["memory_size"],
        settings["beta"],
        settings["memory_weight"],
        settings["selection"],
    )
    result = run_against_transcript(state, reference, views, scale)
    assert result["worst"] <= 1e-4 * scale, result
    assert result["memory_mismatch"] is None and result["argmax_mismatches"] == 0, result
    # every path of the write fired, many times
    assert min(result["paths"].values()) >= 20, result["paths"]
    # some classes never filled their memory (a part-filled or empty memory is read), most did
    counts = state.counts
    assert (counts < settings["memory_size"]).sum() >= 2 and (counts == settings["memory_size"]).sum() >= 18, counts
    assert state.size() == int(counts.sum())


def test_confident_views_and_kept_count_as_the_reference():
    assert n_dmn_kept(32, 0.1) == 3 and n_dmn_kept(8, 0.25) == 2
    with pytest.raises(ValueError, match="selection"):
        n_dmn_kept(8, 0.1)
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.98, 0.01, 0.01], [0.1, 0.1, 0.8], [0.0, 1.0, 0.0]])
    # entropies with p log(p + 1e-6): view 3 (one-hot) < view 1 < view 2 < view 0; 2 of 4 kept
    assert torch.allclose(confident_mean(probs, 0.5), (probs[3] + probs[1]) / 2)


def test_a_class_without_memory_reads_its_text_feature_and_the_sample_reads_itself():
    text, views, _ = make_stream(n=1, n_classes=5, n_views=4)
    state = DMNState(text, 100.0, memory_size=3, selection=0.5)
    query = views[0, 0]
    assert torch.allclose(state.memory_logits(query), 100.0 * text @ query, atol=1e-4)  # empty: zero-shot
    logits = state.step(views[0])
    label = int(state.counts.argmax())
    assert state.size() == 1 and torch.allclose(state.features[label, 0], query, atol=1e-7)
    # read after the write: the sample's own slot (cos 1, weight 1) pulls its class towards it
    memory = state.memory_logits(query)
    assert memory[label] > 100.0 * text[label] @ query
    text_logits = 100.0 * text @ query
    expected = (text_logits.softmax(-1) + memory.softmax(-1)).log()
    assert torch.allclose(logits, expected, atol=1e-5)


def test_the_replacement_keeps_the_lowest_entropies_and_drops_a_less_confident_sample():
    text = torch.eye(3, 4)
    state = DMNState(text, 100.0, memory_size=2)

    def probs(top):
        return torch.tensor([top, (1 - top) / 2, (1 - top) / 2])

    feature = [F.normalize(torch.tensor([1.0, 0.1 * k, 0.0, 0.0]), dim=0) for k in range(5)]
    state.write(feature[0], probs(0.9))
    state.write(feature[1], probs(0.6))  # the higher entropy of the two
    assert state.counts.tolist() == [2, 0, 0]
    state.write(feature[2], probs(0.8))  # lower than 0.6's: replaces slot 1
    assert torch.equal(state.features[0, 1], feature[2]) and torch.equal(state.features[0, 0], feature[0])
    state.write(feature[3], probs(0.5))  # higher than both stored: dropped
    assert torch.equal(state.features[0, 1], feature[2]) and torch.equal(state.features[0, 0], feature[0])
    state.write(feature[4], probs(0.95))  # lower than both: replaces the highest (0.8's, slot 1)
    assert torch.equal(state.features[0, 1], feature[4]) and state.counts.tolist() == [2, 0, 0]


# ---------------------------------------------------------------------------------------------------------
# Wrong readings
# ---------------------------------------------------------------------------------------------------------


class ReadFirst(DMNState):
    def step(self, view_features):
        x = F.normalize(view_features.float(), dim=-1)
        text_logits = self.logit_scale * x @ self.text.T
        memory = self.memory_logits(x[0])  # before the write
        self.write(x[0], confident_mean(text_logits.softmax(-1), self.selection))
        return torch.logaddexp(text_logits[0].log_softmax(-1), math.log(self.memory_weight) + memory.log_softmax(-1))


class ReplaceAlways(DMNState):
    def write(self, feature, mean_probs):
        label = int(mean_probs.argmax())
        if int(self.counts[label]) == self.memory_size:  # no entropy test: the new sample always enters
            self.entropies[label, self.entropies[label].argmax()] = math.inf  # forces the replacement below
        super().write(feature, mean_probs)


class ReplaceLowest(DMNState):
    def write(self, feature, mean_probs):
        label = int(mean_probs.argmax())
        entropy = -(mean_probs * torch.log(mean_probs + 1e-8)).sum()
        if int(self.counts[label]) == self.memory_size and bool((entropy < self.entropies[label]).any()):
            slot = int(self.entropies[label].argmin())  # the most confident stored sample goes
            self.features[label, slot], self.entropies[label, slot] = feature, entropy
            return
        super().write(feature, mean_probs)


def read_variant(kind: str):
    """A state whose attention read is changed: ``sharpness`` (beta read as a temperature), ``unnormalised``
    (the weighted sum not L2-normalised), ``no_text_slot``, ``softmax_slots`` (the same read)."""

    class Variant(DMNState):
        def memory_logits(self, query):
            sim = torch.einsum("cmd,d->cm", self.features, query)
            text_sim = self.text @ query
            if kind == "no_text_slot":
                weights = torch.exp(-self.beta * (1 - sim))
                read = F.normalize(torch.einsum("cm,cmd->cd", weights, self.features), dim=-1)
                return self.logit_scale * read @ query
            all_sim = torch.cat([sim, text_sim.unsqueeze(1)], dim=1)
            if kind == "sharpness":
                weights = torch.exp(-(1 / self.beta) * (1 - all_sim))
            elif kind == "softmax_slots":  # empty slots get weight too, but their value is zero
                weights = (self.beta * all_sim).softmax(-1)
            else:
                weights = torch.exp(-self.beta * (1 - all_sim))
            values = torch.cat([self.features, self.text.unsqueeze(1)], dim=1)
            read = torch.einsum("cm,cmd->cd", weights, values)
            if kind != "unnormalised":
                read = F.normalize(read, dim=-1)
            return self.logit_scale * read @ query

    return Variant


MUTANTS = {
    "read_first": ReadFirst,
    "replace_always": ReplaceAlways,
    "replace_lowest": ReplaceLowest,
    "sharpness": read_variant("sharpness"),
    "unnormalised": read_variant("unnormalised"),
    "no_text_slot": read_variant("no_text_slot"),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_wrong_readings_fail_the_comparison_with_the_transcript(stream, mutant):
    text, views, _ = stream
    views = views[:300]
    scale = 100.0
    args = (SETTINGS["memory_size"], SETTINGS["beta"], SETTINGS["memory_weight"], SETTINGS["selection"])
    wrong_state = MUTANTS[mutant](text, scale, **SETTINGS)
    wrong = run_against_transcript(wrong_state, ReferenceDMN(text, scale, *args), views, scale)
    assert wrong["worst"] > 1e-4 * scale * 100, wrong  # logits at least 1 apart somewhere
    if mutant.startswith("replace"):
        assert wrong["memory_mismatch"] is not None, wrong
    if mutant == "no_text_slot":
        return  # the reference's read without its text slot is NaN for a class with no memory (0 / 0)
    # the transcript's own mutant is what the wrong state computes: the variants are the same wrong reading
    wrong_state = MUTANTS[mutant](text, scale, **SETTINGS)
    same = run_against_transcript(wrong_state, ReferenceDMN(text, scale, *args, mutant), views, scale)
    assert same["worst"] <= 1e-4 * scale and same["argmax_mismatches"] == 0, same


def test_a_softmax_over_each_class_slots_is_the_same_read(stream):
    text, views, _ = stream
    scale = 100.0
    args = (SETTINGS["memory_size"], SETTINGS["beta"], SETTINGS["memory_weight"], SETTINGS["selection"])
    state = read_variant("softmax_slots")(text, scale, **SETTINGS)
    result = run_against_transcript(state, ReferenceDMN(text, scale, *args), views[:300], scale)
    assert result["worst"] <= 1e-4 * scale and result["memory_mismatch"] is None, result


# ---------------------------------------------------------------------------------------------------------
# State round trip
# ---------------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_through_safetensors_continues_bit_identically(stream):
    text, views, _ = stream
    views = views[:250]
    stop = random.Random(7).randrange(40, 200)
    uninterrupted = DMNState(text, 100.0, **SETTINGS)
    expected = torch.stack([uninterrupted.step(v) for v in views])
    first = DMNState(text, 100.0, **SETTINGS)
    for v in views[:stop]:
        first.step(v)
    saved = first.state_dict()
    assert set(saved) == {"features", "entropies", "counts"} and saved["counts"].dtype == torch.int64
    restored = DMNState(text, 100.0, **SETTINGS)
    restored.load_state_dict(load_tensors(save_tensors(saved)))
    assert restored.size() == first.size() > 0
    resumed = torch.stack([restored.step(v) for v in views[stop:]])
    assert torch.equal(resumed, expected[stop:])
    assert torch.equal(restored.features, uninterrupted.features) and torch.equal(restored.counts, uninterrupted.counts)
    # the saved tensors are copies, not views of the live state
    assert all(saved[k].data_ptr() != v.data_ptr() for k, v in first.state_dict().items())
    assert saved["features"].data_ptr() != first.features.data_ptr()
    with pytest.raises(ValueError, match="features"):
        DMNState(text, 100.0, memory_size=5).load_state_dict(saved)


# ---------------------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"memory_size": 0}, "memory_size"),
        ({"memory_size": 2.5}, "memory_size"),
        ({"beta": -1.0}, "beta"),
        ({"memory_weight": -0.1}, "memory_weight"),
        ({"selection": 0}, "selection"),
        ({"selection": 1.5}, "selection"),
        ({"n_views": 8, "selection": 0.1}, "selection"),  # int(8 * 0.1) = 0 views
        ({"n_views": 0}, "n_views"),
        ({"continual": "yes"}, "continual"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, option):
    with pytest.raises(OptionError) as error:
        DMN(**kwargs)
    assert error.value.option == option
    if kwargs.get("n_views") == 8:
        assert "n_views" in str(error.value) and "0.125" in str(error.value)  # names the fix


def test_the_run_key_sees_every_option():
    assert_run_key_sees_every_argument(DMN(memory_size=3, beta=2.0, memory_weight=0.3, selection=0.5, n_views=4))


@pytest.fixture(scope="module")
def world_module():
    return ZeroShotClassifier(create_vlm("tta-world-resnet"))


class Recording(DMNState):
    """The state, recording each sample's view features; every state made is listed in ``made``."""

    made: list[Recording] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []
        Recording.made.append(self)

    def step(self, view_features):
        self.seen.append(view_features.detach().clone())
        return super().step(view_features)


def test_callback_logits_are_the_state_on_its_own_view_features_in_stream_order(world_module, monkeypatch):
    monkeypatch.setattr("tta.callbacks.dmn.DMNState", Recording)
    monkeypatch.setattr(Recording, "made", [])
    options = {"n_views": 6, "selection": 0.34, "memory_size": 2, "memory_weight": 1.0, "seed": 0}
    large, _ = predict(world_module, [DMN(**options)], batch_size=4, n=6, domains=("clean", "blur"))
    states = Recording.made
    # one fresh state per domain, each fed its domain's 6 samples of 6 views, built with the options
    assert [len(s.seen) for s in states] == [6, 6]
    assert all(f.shape == (6, states[0].text.shape[1]) for s in states for f in s.seen)
    assert (states[0].memory_size, states[0].memory_weight, states[0].selection) == (2, 1.0, 0.34)
    text, scale = world_module.text_features().float(), float(world_module.vlm.logit_scale)
    replay = []
    for recorded in states:
        fresh = DMNState(text, scale, memory_size=2, memory_weight=1.0, selection=0.34)
        replay += [fresh.step(f) for f in recorded.seen]
    assert torch.allclose(large["logits"], torch.stack(replay), atol=1e-5)
    assert not torch.allclose(large["logits"].softmax(-1), large["logits_zs"].softmax(-1), atol=1e-3)
    small, _ = predict(world_module, [DMN(images_per_step=1, **options)], batch_size=1, n=6, domains=("clean", "blur"))
    assert torch.equal(small["index"], large["index"])
    assert torch.allclose(small["logits"], large["logits"], atol=1e-5)


def test_a_stopped_run_resumes_from_the_saved_memory_to_the_uninterrupted_bytes(world_module, tmp_path):
    options = {"n_views": 4, "selection": 0.5, "memory_size": 2, "seed": 0}
    whole = _run(world_module, tmp_path / "whole", [DMN(**options)])
    with pytest.raises(RuntimeError, match="crash"):
        _run(world_module, tmp_path / "stopped", [DMN(**options)], fail_after=2)
    assert len(list((tmp_path / "stopped").glob("stream_state-*"))) == 1
    _run(world_module, tmp_path / "stopped", [DMN(**options)])
    assert (tmp_path / "stopped" / "predictions.csv").read_bytes() == (whole / "predictions.csv").read_bytes()


# ---------------------------------------------------------------------------------------------------------
# The cards
# ---------------------------------------------------------------------------------------------------------

CARDS = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "dmn_vit_b16"
TIP = [
    "a bad photo of the {}.",
    "a {} in a video game.",
    "a origami {}.",
    "a photo of the small {}.",
    "art of the {}.",
    "a photo of the large {}.",
    "itap of a {}.",
]
#: card -> (data, memory_weight, views, templates): beta2 from camera_ready_dmn_tf_searched_vit_0.txt (n_shot 0)
#: and camera_ready_dmn_tf_shift_0.txt; views from AugMixAugmenter(augmix=len(set_id) > 1); templates from
#: data/imagnet_prompts.py (tip_imagenet_templates for one-letter set ids, else ID_to_prompts).
REFERENCE = {
    "imagenet": ({"variant": "imagenet"}, 1.0, "crop_flip", TIP),
    "imagenet_a": ({"variant": "imagenet_a"}, 3.0, "crop_flip", TIP),
    "imagenet_v2": ({"_target_": "tta.datamodules.ImageNetV2DataModule"}, 1.0, "crop_flip", TIP),
    "imagenet_r": ({"variant": "imagenet_r"}, 0.3, "crop_flip", TIP),
    "imagenet_sketch": ({"variant": "imagenet_sketch"}, 1.0, "crop_flip", TIP),
    "flower102": ({"dataset": "flower102"}, 10.0, "augmix", ["a photo of a {}, a type of flower."]),
    "dtd": ({"dataset": "dtd"}, 10.0, "augmix", ["{} texture."]),
    "pets": ({"dataset": "pets"}, 1.0, "augmix", ["a photo of a {}, a type of pet."]),
    "cars": ({"dataset": "cars"}, 0.3, "augmix", ["a photo of a {}, a type of car."]),
    "ucf101": ({"dataset": "ucf101"}, 0.3, "augmix", ["a photo of a person doing {}."]),
    "caltech101": ({"dataset": "caltech101"}, 0.3, "augmix", TIP),
    "food101": ({"dataset": "food101"}, 0.3, "augmix", ["a photo of {}, a type of food."]),
    "sun397": ({"dataset": "sun397"}, 3.0, "augmix", TIP),
    "aircraft": ({"dataset": "aircraft"}, 1.0, "augmix", ["a photo of a {}, a type of aircraft."]),
    "eurosat": ({"dataset": "eurosat"}, 0.3, "augmix", ["a centered satellite photo of {}."]),
}


def test_the_cards_are_the_fifteen_data_sets_and_the_bases_are_marked():
    files = {p.stem for p in CARDS.glob("*.yaml")}
    assert {f for f in files if not f.startswith("_")} == set(REFERENCE)
    assert {f for f in files if f.startswith("_")} == {"_family_common", "_family_imagenet", "_family_fine_grained"}


def test_every_card_builds_the_callback_with_the_reference_settings(compose):
    for card, (data, weight, views, templates) in REFERENCE.items():
        cfg = compose([f"experiment=dmn_vit_b16/{card}"])
        callback = instantiate(cfg.tta.callbacks.dmn)
        assert isinstance(callback, DMN), card
        settings = (callback.memory_weight, callback.views, callback.n_views, callback.selection)
        assert settings == (weight, views, 32, 0.1), card
        assert (callback.memory_size, callback.beta, callback.continual) == (50, 5.5, False), card
        assert list(cfg.model.templates) == templates, card
        assert all(cfg.data[k] == v for k, v in data.items()), card
        if "dataset" in data:
            assert cfg.data._target_.endswith("FineGrainedDataModule") and cfg.data.split == "test", card
        else:
            assert cfg.data.class_list == "clip", card
        assert cfg.model.vlm.name == "ViT-B-16-quickgelu" and cfg.model.vlm.pretrained == "openai", card
        assert cfg.trainer.precision == "32-true" and cfg.seed == 0, card  # the reference's CLIP runs in fp32
        assert cfg.published.method == "dmn" and dict(cfg.published.accuracy) == {}, card
