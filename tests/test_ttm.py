"""TTM: pseudo-label selection by threshold, the schedule, the losses, the trainer on tiny models
(user's model unchanged, optimizer state kept, same seed same result), and the callback end to end."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import make_tiny_vlm

from tta.callbacks import TTM, PredictionWriter
from tta.callbacks.writer import read_rows
from tta.datamodules import WorldDataModule, WorldGroupsDataModule
from tta.methods.ttm import (
    TestTimeMatching,
    TTMSchedule,
    contrastive_loss,
    hungarian_labels,
    select_choice_labels,
    select_group_labels,
)
from tta.tasks import GroupScorer, ZeroShotClassifier
from tta.world.groups import render_groups


def state_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def two_by_two(margins: list[float]) -> torch.Tensor:
    """2 x 2 matrices with ``s00 + s11 - s01 - s10`` equal to each margin."""
    scores = torch.zeros(len(margins), 2, 2)
    scores[:, 0, 0] = torch.tensor(margins)
    return scores


# --- selection ---------------------------------------------------------------------------------


def test_2x2_selection_by_threshold():
    keep, permutation = select_group_labels(two_by_two([3.0, -3.0, 1.0, -1.0, 2.0, -2.0, 0.0]), tau=2.0)
    assert keep.tolist() == [True, True, False, False, True, True, False]
    assert permutation[0].tolist() == [0, 1] and permutation[1].tolist() == [1, 0]  # identity, swapped
    keep, permutation = select_group_labels(two_by_two([3.0, -3.0, 1.0, -1.0, 2.0, -2.0, 0.0]), tau=0.0)
    assert keep.tolist() == [True] * 7  # at threshold 0 an exact tie is kept, as the identity (the reference's >=)
    assert permutation[-1].tolist() == [0, 1]


def reference_group_selection(scores: torch.Tensor, tau: float) -> list[tuple[bool, list[int]]]:
    """The reference's 2 x 2 rule, group by group: the margin in the scores' own precision, identity
    if ``margin >= tau``, elif swapped if ``margin <= -tau``."""
    out = []
    for block in scores:
        margin = (block[0, 0] + block[1, 1] - block[0, 1] - block[1, 0]).item()
        out.append((True, [0, 1]) if margin >= tau else (True, [1, 0]) if margin <= -tau else (False, [0, 1]))
    return out


def reference_choice_selection(scores: torch.Tensor, tau: float) -> list[tuple[bool, int]]:
    out = []
    for row in scores:
        top2 = torch.topk(row, 2)
        out.append(((top2.values[0] - top2.values[1]).item() >= tau, int(top2.indices[0])))
    return out


@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_selection_on_tied_scores_is_the_references(tau):
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 3, (2000, 2, 2), generator=g).float()  # small integers: many exact ties
    keep, permutation = select_group_labels(groups, tau)
    ours = [(bool(k), p.tolist() if k else [0, 1]) for k, p in zip(keep, permutation)]
    assert ours == reference_group_selection(groups, tau)
    choices = torch.randint(0, 3, (2000, 4), generator=g).float()
    keep, choice = select_choice_labels(choices, tau)
    reference = reference_choice_selection(choices, tau)
    assert keep.tolist() == [k for k, _ in reference]
    assert [int(c) for c, k in zip(choice, keep) if k] == [c for k, c in reference if k]


def test_selection_compares_in_the_precision_the_scores_arrive_in():
    # float64 leads 1e-9 above the threshold: a cast to float32 would round them onto it or below
    tau = 1.0 + 5e-10
    choices = torch.tensor([[1.0 + 1e-9, 0.0], [1.0, 0.0]], dtype=torch.float64)
    keep, _ = select_choice_labels(choices, tau)
    assert keep.tolist() == [True, False]
    # float32 2 x 2 scores: the reference's margin is float32 arithmetic (1e8 + 1 rounds to 1e8)
    groups = torch.tensor([[[1e8, 1e8], [0.0, 1.0]]], dtype=torch.float32)
    assert select_group_labels(groups, 0.5)[0].tolist() == [r[0] for r in reference_group_selection(groups, 0.5)]


def test_kxk_selection_uses_the_lead_over_the_second_best_matching():
    scores = torch.tensor(
        [
            [[0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]],  # lead 10
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, 0.5, 1.0]],
        ]
    )  # lead 1
    keep, permutation = select_group_labels(scores, tau=2.0)
    assert keep.tolist() == [True, False]
    assert permutation[0].tolist() == [2, 0, 1]


def test_choice_selection():
    scores = torch.tensor([[3.0, 0.0, 0.5], [0.0, 1.0, 0.5], [1.0, 1.0, 0.0]])
    keep, choice = select_choice_labels(scores, tau=1.0)
    assert keep.tolist() == [True, False, False] and choice[:2].tolist() == [0, 1]
    keep, _ = select_choice_labels(scores, tau=0.0)
    assert keep.tolist() == [True, True, True]  # the tie of the last item is kept at threshold 0


def test_hungarian_keeps_the_most_confident_fraction():
    scores = torch.tensor([[0.0, 9.0, 0.0, 0.0], [8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    rows, cols = hungarian_labels(scores, keep_fraction=0.5)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 1), (1, 0)]
    rows, cols = hungarian_labels(scores, keep_fraction=1.0)
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 1), (1, 0), (2, 2), (3, 3)]


# --- schedule and losses -------------------------------------------------------------------------


def test_schedule():
    schedule = TTMSchedule()
    assert [schedule.tau(t) for t in (0, 9)] == [2.0, 0.0]
    assert schedule.tau(1) == pytest.approx(2.0 * 8 / 9)
    assert schedule.peak_lr(3) == pytest.approx(1e-5 * 0.95**3)
    assert schedule.step_lr(2, 0, 10) == pytest.approx(schedule.peak_lr(2))
    assert schedule.step_lr(2, 9, 10) == pytest.approx(0.1 * schedule.peak_lr(2))
    with pytest.raises(ValueError, match="tau_max"):
        TTMSchedule(tau_max=-1)


def test_infonce_is_the_symmetric_clip_loss_and_ignores_extra_negatives_for_text_to_image():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 4, generator=g)
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    assert contrastive_loss(logits, torch.eye(4, dtype=torch.bool), "infonce").item() == pytest.approx(expected.item())
    extra = torch.cat([logits, torch.randn(4, 2, generator=g)], 1)  # two wrong options without images
    positives = torch.cat([torch.eye(4, dtype=torch.bool), torch.zeros(4, 2, dtype=torch.bool)], 1)
    expected = 0.5 * (F.cross_entropy(extra, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    assert contrastive_loss(extra, positives, "infonce").item() == pytest.approx(expected.item())


def test_sigmoid_loss_is_siglips():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    labels = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    expected = -torch.log(torch.sigmoid(labels * logits)).sum() / 2
    assert contrastive_loss(logits, torch.eye(2, dtype=torch.bool), "sigmoid").item() == pytest.approx(expected.item())


# --- the trainer ------------------------------------------------------------------------------

SMALL = TTMSchedule(rounds=2, tau_max=0.0, epochs=1, groups_per_batch=3, lr=1e-3)


@pytest.fixture(scope="module")
def groups():
    return render_groups("colour", 6, seed=3)


@pytest.mark.parametrize(("name", "loss"), [("tta-tiny-clip", "infonce"), ("tta-tiny-sigmoid", "sigmoid")])
def test_trainer_adapts_a_copy_with_the_models_own_loss(groups, name, loss):
    vlm = make_tiny_vlm(name)
    before = state_hash(vlm)
    matching = TestTimeMatching(vlm, SMALL)
    assert matching.loss == loss
    rounds = matching.fit_groups(groups.images, groups.captions)
    assert state_hash(vlm) == before
    assert state_hash(matching.vlm) != before
    assert [r.round for r in rounds] == [0, 1] and all(r.seconds > 0 for r in rounds)
    assert all(r.selected > 0 and r.steps == 2 and math.isfinite(r.loss) for r in rounds)
    # AdamW's state is kept across rounds: every parameter took all four steps
    steps = {int(s["step"]) for s in matching.optimizer.state.values()}
    assert steps == {4}
    assert not any(p.requires_grad for p in matching.vlm.parameters())


def test_trainer_is_seeded(groups):
    runs = []
    for _ in range(2):
        matching = TestTimeMatching(make_tiny_vlm("tta-tiny-clip"), SMALL, seed=1)
        matching.fit_groups(groups.images, groups.captions)
        runs.append(matching.score_groups(groups.images, groups.captions))
    assert torch.equal(runs[0], runs[1])


def test_threshold_above_every_margin_trains_nothing(groups):
    vlm = make_tiny_vlm("tta-tiny-clip")
    matching = TestTimeMatching(vlm, TTMSchedule(rounds=2, tau_max=1e6, epochs=1))  # round 0: tau 1e6
    rounds = matching.fit_groups(groups.images, groups.captions)
    assert rounds[0].selected == 0 and rounds[0].steps == 0 and rounds[0].precision is None


def test_multiple_choice_and_ungrouped_paths(groups):
    matching = TestTimeMatching(make_tiny_vlm("tta-tiny-clip"), SMALL)
    options = [[a, b, "a green star above a red circle."] for a, b in groups.captions]
    rounds = matching.fit_groups(groups.images[:, :1], options)
    assert rounds[-1].selected == len(options)
    two_rounds = TTMSchedule(rounds=2, tau_max=2.0, epochs=1, groups_per_batch=3, lr=1e-3)
    rounds = TestTimeMatching(make_tiny_vlm("tta-tiny-clip"), two_rounds).fit_set(
        groups.images.flatten(0, 1), [c for pair in groups.captions for c in pair]
    )
    assert rounds[0].selected == 0 and rounds[1].selected == 12  # keep 1 - tau/tau_max: 0 then all


def test_logit_scale_is_not_clamped(groups):
    # SigLIP so-400m learns a scale of about 112: clamping it to 100 after each step shrinks the margins
    vlm = make_tiny_vlm("tta-tiny-sigmoid")
    with torch.no_grad():
        vlm.model.logit_scale.fill_(math.log(112.0))
    matching = TestTimeMatching(vlm, TTMSchedule(rounds=1, tau_max=0.0, epochs=1, groups_per_batch=3, lr=1e-6))
    matching.fit_groups(groups.images, groups.captions)
    assert matching.rounds[0].steps > 0
    assert float(matching.vlm.logit_scale) == pytest.approx(112.0, rel=1e-3)


@pytest.mark.parametrize("unchosen_negatives", [False, True])
def test_multiple_choice_trains_on_the_chosen_pairs_unless_asked(groups, monkeypatch, unchosen_negatives):
    import tta.methods.ttm as ttm

    columns_without_image = []

    def recording_loss(logits, positives, kind):
        columns_without_image.append(int((~positives.any(0)).sum()))
        return contrastive_loss(logits, positives, kind)

    monkeypatch.setattr(ttm, "contrastive_loss", recording_loss)
    matching = TestTimeMatching(make_tiny_vlm("tta-tiny-clip"), SMALL, unchosen_negatives=unchosen_negatives)
    options = [[a, b, "a green star above a red circle."] for a, b in groups.captions]
    matching.fit_groups(groups.images[:, :1], options)
    assert columns_without_image
    # the reference: (image, pseudo-caption) pairs only; the option adds the unchosen captions as columns
    assert all(n > 0 for n in columns_without_image) if unchosen_negatives else set(columns_without_image) == {0}


def test_bad_groups_are_named(groups):
    matching = TestTimeMatching(make_tiny_vlm("tta-tiny-clip"), SMALL)
    with pytest.raises(ValueError, match="N x k x 3 x H x W"):
        matching.fit_groups(groups.images[0], groups.captions)
    with pytest.raises(ValueError, match="same number of captions"):
        matching.fit_groups(groups.images, [[*c, "extra"] for c in groups.captions])
    with pytest.raises(ValueError, match="loss"):
        TestTimeMatching(make_tiny_vlm("tta-tiny-clip"), loss="hinge")


# --- the callback -------------------------------------------------------------------------------


def predict(vlm, callbacks, **data):
    datamodule = WorldGroupsDataModule(
        kinds=["colour", "shape"],
        domains=["clean", "noise@1"],
        n_per_cell=3,
        image_size=vlm.image_size[0],
        batch_size=4,
        **data,
    )
    module = GroupScorer(vlm)
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    trainer = pl.Trainer(
        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"
    )
    return module, trainer.predict(module, datamodule=datamodule)


def test_callback_end_to_end_leaves_the_users_model_unchanged():
    vlm = make_tiny_vlm("tta-tiny-sigmoid")
    before = state_hash(vlm)
    callback = TTM(rounds=2, epochs=1, groups_per_batch=4, lr=1e-3, tau_max=0.5)
    module, outputs = predict(vlm, callback)
    assert module.vlm is vlm and state_hash(vlm) == before
    assert len(callback.ttm_rounds) == 2 and all(r["seconds"] > 0 for r in callback.ttm_rounds)
    assert sum(len(o["index"]) for o in outputs) == 12
    for out in outputs:
        assert out["scores"].shape == out["scores_zs"].shape == (len(out["index"]), 2, 2)
        assert (out["adapt_ms"] > 0).all()
    assert not all(torch.equal(o["scores"], o["scores_zs"]) for o in outputs)
    # the unadapted scores are those of the user's model
    _, plain = predict(vlm, pl.Callback())
    assert all(torch.allclose(a["scores_zs"], b["scores"], atol=1e-5) for a, b in zip(outputs, plain))
    rows = [r for o in outputs for r in module.prediction_rows(o)]
    summary = module.summarize_predictions([{k: "" if v is None else str(v) for k, v in r.items()} for r in rows])
    assert summary["n"] == 12 and set(summary["domains"]) == {"clean", "noise@1"}
    assert set(summary["kinds"]) == {"colour", "shape"}
    assert 0 <= summary["group_score_zs"] <= 1


def test_callback_with_the_prediction_writer(tmp_path):
    vlm = make_tiny_vlm("tta-tiny-clip")
    writer = PredictionWriter(tmp_path, seed=0)
    predict(vlm, [TTM(rounds=2, epochs=1, groups_per_batch=4, lr=1e-3), writer])
    rows = read_rows(tmp_path / "predictions.csv")
    assert len(rows) == 12 and rows[0]["shape"] == "2x2" and rows[0]["group_score_zs"] in ("0", "1")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "ttm" and metrics["n"] == 12 and metrics["adapt_ms_per_sample"] > 0
    # the fit runs before the first batch: each group's ms includes its share of it
    assert all(float(t["ms"]) >= float(t["adapt_ms"]) > 0 for t in read_rows(tmp_path / "timing.csv"))
    assert {"text_score", "image_score", "group_score", "group_match", "group_score_zs"} <= set(metrics)
    assert set(metrics["domains"]) == {"clean", "noise@1"} and "group_match_zs" in metrics["domains"]["clean"]
    assert metrics["group_score"] == pytest.approx(sum(int(r["group_score"]) for r in rows) / 12)


def test_callback_same_seed_same_predictions():
    runs = [
        predict(make_tiny_vlm("tta-tiny-clip"), TTM(rounds=2, epochs=1, groups_per_batch=4, lr=1e-3))[1]
        for _ in range(2)
    ]
    assert all(torch.equal(a["scores"], b["scores"]) for a, b in zip(*runs))


def test_callback_rejects_classifiers_and_bad_settings():
    with pytest.raises(ValueError, match="rounds"):
        TTM(rounds=0)
    with pytest.raises(ValueError, match="loss"):
        TTM(loss="hinge")
    vlm = make_tiny_vlm("tta-tiny-clip")
    trainer = pl.Trainer(
        callbacks=[TTM(rounds=1, epochs=1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with pytest.raises(TypeError, match="GroupScorer"):
        trainer.predict(ZeroShotClassifier(vlm), datamodule=WorldDataModule(domains="clean", n_per_domain=4))
