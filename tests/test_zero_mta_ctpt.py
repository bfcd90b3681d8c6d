"""ZERO, MTA and C-TPT against test-side transcripts of their authors' code, and the wrong readings each must not be.

What is proven here:

- ZERO (``tta.methods.zero``) keeps the same views, casts the same votes (tie-break vote included) and
  predicts the same class as a one-image-at-a-time transcript of the reference (``ttas/zero.py``
  ``Zero.zero``, ``ttas/base.py`` ``confidence_filter``, ``utils/tools.py`` ``greedy_break`` and
  ``break_sample_tie``) on many random cases where ties are frequent; its fallback reproduces the
  reference's bitwise-NOT mask (``"reference"``) or picks among the tied classes (``"tied"``); it is
  neither an average of probabilities nor a lowest-index tie-break; under fp16 the vote temperature is
  the fp16 epsilon; ``output="votes"``/``"counts"`` are the vote shares / the counts.
- MTA (``tta.methods.mta``) gives the mode logits of a per-image transcript of ``solve_mta`` (per-view
  bandwidths without the self-distance, mode started at view 0, ``y`` carried over, inner loops that
  stop early per image), and differs from the mean start, the self-including bandwidth and a reset ``y``.
- C-TPT (``tta.methods.ctpt``): the dispersion is the mean plain L2 distance to the centroid; one step
  equals a transcript of ``test_time_tuning`` with ``--run_type tpt_ctpt`` on the world model, batched
  or not; the wrong sign, squared distances and un-normalised features give other contexts; lambda 0 is TPT
  (to float rounding).
- The ZERO, MTA and CTPT callbacks inside ``Trainer.predict`` return the method functions' outputs on
  their own view features, independently of batch size, and refuse bad options by name.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from test_tta_callbacks import predict
from test_view_methods import _tiny_world_views

import tta.models.prompt as prompt_module
from tta.callbacks import CTPT, MTA, ZERO
from tta.methods.ctpt import ctpt_adapt, text_feature_dispersion
from tta.methods.mta import mta_bandwidth, mta_mode
from tta.methods.tpt import tpt_adapt
from tta.methods.zero import n_zero_kept, view_entropy_order, zero_predict
from tta.models import PromptLearner, create_vlm
from tta.tasks import ZeroShotClassifier
from tta.validation import OptionError
from tta.world import CLASS_NAMES

# ---------------------------------------------------------------------------------------------------------
# ZERO
# ---------------------------------------------------------------------------------------------------------


def zero_transcript(cos: torch.Tensor, logits: torch.Tensor, gamma: float = 0.3) -> dict:
    """One image (``V x C``) as the reference: keep the int(V * gamma) lowest-entropy views, each votes
    softmax(cos / eps) (eps of the cosines' dtype; CUDA autocast runs the softmax in float32), sum; on a
    tie, the first remaining view (entropy order) naming a tied class decides, else ``break_sample_tie``."""
    p = logits.float().softmax(1)
    order = torch.argsort(-(p * p.log()).sum(1))
    k = int(cos.shape[0] * gamma)
    votes = (cos[order[:k]] / torch.finfo(cos.dtype).eps).float().softmax(1).sum(0)
    best, first = votes.max(0)
    ties = [int(first)] + [c for c in range(len(votes)) if c != int(first) and votes[c] == best]
    path = "none"
    if len(ties) > 1:
        rest = cos[order[k:]]
        winner = next((int(c) for c in rest.argmax(1) if int(c) in ties), None)
        path = "greedy"
        if winner is None:  # break_sample_tie: the mask is the bitwise NOT of the int tie indices
            view = rest[0].clone()
            view[~torch.tensor(ties, dtype=torch.int)] = -torch.inf
            winner, path = int(view.argmax()), "fallback"
        votes[winner] += 1
    return {"kept": order[:k], "votes": votes, "path": path}


def random_cosines(seed: int, b: int, v: int, c: int, d: int = 64, dtype=torch.float32):
    """CLIP-like cosines of random normalised features and their logits (scale 50: no probability underflows)."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, v, d, generator=g), dim=-1)
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    cos = (image @ text.T).to(dtype)
    return cos, 50 * cos.float()


def test_zero_equals_the_reference_transcript_on_random_cases_with_frequent_ties():
    paths = {"none": 0, "greedy": 0, "fallback": 0}
    shapes = [(8, 2), (10, 3), (16, 2), (10, 4), (32, 3), (20, 10)]  # few classes, few kept views: many ties
    for seed in range(200):
        v, c = shapes[seed % len(shapes)]
        cos, logits = random_cosines(seed, 6, v, c)
        gamma = 0.3 if seed % 4 else 0.2
        out = zero_predict(cos, logits, gamma=gamma, output="counts")
        for i in range(6):
            ref = zero_transcript(cos[i], logits[i], gamma)
            paths[ref["path"]] += 1
            assert torch.equal(out.selected[i], ref["kept"]), (seed, i)  # same views, same entropy order
            assert torch.equal(out.votes[i], ref["votes"]), (seed, i)  # tie-break vote included
            assert int(out.logits[i].argmax()) == int(ref["votes"].argmax()), (seed, i)
    # the greedy tie-break is exercised, often, and so is the fallback
    assert paths["greedy"] > 100 and paths["fallback"] > 0 and paths["none"] > 100, paths


def fallback_case() -> tuple[torch.Tensor, torch.Tensor]:
    """C = 4, V = 8, 2 kept views voting 0 and 3 (a tie); every other view names class 1 or 2, the
    first of them (lowest entropy) class 1, with cos[3] > cos[0]."""
    cos = torch.tensor(
        [
            [0.9, 0.0, 0.0, 0.1],  # kept: votes 0
            [0.1, 0.0, 0.0, 0.9],  # kept: votes 3
            [0.2, 0.45, 0.1, 0.3],  # first remaining: names 1
            *[[0.25, 0.3, 0.32, 0.25], [0.25, 0.32, 0.3, 0.25]] * 2,
            [0.26, 0.31, 0.3, 0.27],
        ]
    )
    return cos[None], 20 * cos[None]


def test_zero_fallback_reference_masks_mirrored_classes_and_tied_picks_among_the_tied():
    cos, logits = fallback_case()
    assert view_entropy_order(logits)[0, :3].tolist() == [0, 1, 2]
    reference = zero_predict(cos, logits, tie_fallback="reference", output="counts")
    tied = zero_predict(cos, logits, tie_fallback="tied", output="counts")
    ref = zero_transcript(cos[0], logits[0])
    assert ref["path"] == "fallback"
    # ~[0, 3] = [-1, -4] masks classes 3 and 0: the untied class 1 gets the vote, then 0 wins the 3-way tie
    assert torch.equal(reference.votes[0], ref["votes"]) and reference.votes[0].tolist() == [1, 1, 0, 1]
    assert int(reference.logits.argmax()) == 0
    # among the tied {0, 3} the first remaining view prefers 3
    assert tied.votes[0].tolist() == [1, 0, 0, 2] and int(tied.logits.argmax()) == 3


def votes_against_average_case() -> tuple[torch.Tensor, torch.Tensor]:
    """C = 2, V = 10, 3 kept views: two weakly for 0, one strongly for 1; the others near-uniform."""
    cos = torch.tensor([[0.30, 0.29], [0.30, 0.29], [0.10, 0.40]] + [[0.25, 0.251]] * 7)
    return cos[None], 100 * cos[None]


def test_zero_is_a_vote_not_an_average_of_probabilities():
    cos, logits = votes_against_average_case()
    out = zero_predict(cos, logits)
    kept = out.selected[0]
    assert sorted(kept.tolist()) == [0, 1, 2]
    averaged = logits[0, kept].softmax(-1).mean(0)  # the unfaithful reading: TPT-like averaging
    assert int(averaged.argmax()) == 1
    assert out.votes[0].tolist() == [2.0, 1.0] and int(out.logits.argmax()) == 0


def test_zero_breaks_ties_greedily_by_the_next_views_not_by_class_index():
    cos = torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.9, 0.0], [0.1, 0.4, 0.0]] + [[0.3, 0.31, 0.3]] * 5)
    out = zero_predict(cos[None], 20 * cos[None], output="counts")
    assert sorted(out.selected[0].tolist()) == [0, 1]  # a 1-1 tie between classes 0 and 1
    # the first remaining view names class 1; the lowest index would give 0
    assert out.votes[0].tolist() == [1.0, 2.0, 0.0] and int(out.logits.argmax()) == 1


def test_zero_fp16_votes_use_the_fp16_epsilon_and_split_on_near_ties():
    g = torch.Generator().manual_seed(0)
    b, v, c = 8, 20, 5
    cos = (0.2 + 0.1 * torch.rand(b, v, c, generator=g)).half()
    # the runner-up of every view 0-3 fp16 steps below the best: split votes at temperature eps16
    best = cos.float().argmax(-1, keepdim=True)
    runner = (best + 1) % c
    top = cos.gather(-1, best)
    steps = torch.randint(0, 4, (b, v, 1), generator=g).half() * 2**-12  # the fp16 spacing in [0.25, 0.5)
    cos = cos.scatter(-1, runner, torch.maximum(top - steps, torch.tensor(0.25).half()))
    cos = cos.scatter(-1, best, torch.maximum(top, torch.tensor(0.2505).half()))
    logits = 50 * cos.float()
    out = zero_predict(cos, logits, output="counts")
    for i in range(b):
        ref = zero_transcript(cos[i], logits[i])
        assert torch.equal(out.selected[i], ref["kept"])
        assert torch.allclose(out.votes[i], ref["votes"], atol=1e-6)
        assert int(out.logits[i].argmax()) == int(ref["votes"].argmax())
    assert (out.votes != out.votes.round()).any()  # votes were split
    # at the float32 epsilon the same views would vote (almost) one-hot: a different vote vector
    one_hot = zero_predict(cos.float(), logits, output="counts").votes
    assert not torch.allclose(out.votes, one_hot, atol=1e-3)


def test_zero_outputs_votes_are_shares_and_counts_are_counts():
    cos, logits = random_cosines(3, 16, 16, 4)
    votes = zero_predict(cos, logits, output="votes")
    counts = zero_predict(cos, logits, output="counts")
    assert torch.isfinite(votes.logits).all()
    probs = votes.logits.softmax(-1)
    assert torch.allclose(probs.sum(-1), torch.ones(16), atol=1e-6)
    assert torch.allclose(probs, counts.votes / counts.votes.sum(-1, keepdim=True), atol=1e-6)
    assert (probs[counts.votes == 0] == 0).all() and (counts.votes == 0).any()
    assert torch.equal(counts.logits, counts.votes)
    assert counts.votes.sum(-1).ge(n_zero_kept(16, 0.3)).all()
    assert torch.equal(votes.logits.argmax(-1), counts.logits.argmax(-1))


def test_zero_refuses_unknown_modes():
    cos, logits = fallback_case()
    with pytest.raises(ValueError, match="tie_fallback"):
        zero_predict(cos, logits, tie_fallback="lowest")
    with pytest.raises(ValueError, match="output"):
        zero_predict(cos, logits, output="probs")


# ---------------------------------------------------------------------------------------------------------
# MTA
# ---------------------------------------------------------------------------------------------------------


def mta_transcript(
    x: torch.Tensor,
    text: torch.Tensor,
    scale: float,
    lambda_y: float = 0.2,
    lambda_q: float = 4.0,
    start: str = "view0",
    self_distance: bool = False,
    reset_y: bool = False,
) -> dict:
    """One image (``V x D``) as ``solve_mta``; ``start``, ``self_distance`` and ``reset_y`` give wrong readings."""
    v = x.shape[0]
    logits = x @ text.T * scale
    k = int(0.3 * (v - 1))
    ranked = torch.cdist(x, x).sort(dim=1).values
    near = ranked[:, :k] if self_distance else ranked[:, 1 : k + 1]  # column 0: the view itself
    h = torch.sqrt(0.5 * (near**2).mean(1))
    p = logits.softmax(1)
    affinity = p @ p.T

    def kernel(m):
        return torch.exp(-((x - m).norm(dim=-1) ** 2) / (2 * h**2))

    y = torch.ones(v) / v
    mode = x[0] if start == "view0" else x.mean(0)
    counts = []
    for _ in range(5):
        if reset_y:
            y = torch.ones(v) / v
        density = kernel(mode)
        n_y = n_m = 0
        while True:  # inlierness steps, the kernel fixed at the outer iteration's mode
            n_y += 1
            previous, y = y, torch.softmax((density + lambda_q * (affinity * y[None]).sum(1)) / lambda_y, -1)
            if torch.norm(previous - y) < 1e-6 or n_y == 5:
                break
        while True:  # mode steps, the kernel recomputed at each
            n_m += 1
            w = kernel(mode) * y
            previous, mode = mode, (w[:, None] * x).sum(0) / w.sum()
            mode = mode / mode.norm()
            if torch.norm(previous - mode) < 1e-6 or n_m == 5:
                break
        counts.append((n_y, n_m))
    return {"logits": mode @ text.T * scale, "mode": mode, "y": y, "counts": counts}


def mta_batch(seed: int = 0, v: int = 16, d: int = 32, c: int = 6):
    """Four images: 0 with near-identical views (its loops stop at once), 1-3 with clustered random views."""
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    centre = torch.randn(1, d, generator=g)
    images = [F.normalize(centre + 1e-3 * torch.randn(v, d, generator=g), dim=-1)]
    for spread in (0.6, 1.0, 1.5):
        centres = torch.randn(3, d, generator=g)
        assign = torch.randint(0, 3, (v,), generator=g)
        images.append(F.normalize(centres[assign] + spread * torch.randn(v, d, generator=g), dim=-1))
    return torch.stack(images), text


def test_mta_equals_the_solve_mta_transcript_with_per_image_early_stopping():
    scale = 30.0
    features, text = mta_batch()
    mode, y = mta_mode(features, scale * features @ text.T)
    refs = [mta_transcript(features[i], text, scale) for i in range(len(features))]
    logits = scale * mode @ text.T
    for i, ref in enumerate(refs):
        assert torch.allclose(logits[i], ref["logits"], atol=1e-4 * scale), i
        assert torch.allclose(y[i], ref["y"], atol=1e-4), i
    counts = [n for ref in refs for pair in ref["counts"] for n in pair]
    # some inner loops stopped early and others ran to the cap, within the same batch
    assert min(counts) < 5 and max(counts) == 5
    assert max(refs[0]["counts"][0]) < 5 and any(5 in pair for ref in refs[1:] for pair in ref["counts"])


def test_mta_bandwidth_leaves_the_view_itself_out():
    x = F.normalize(torch.randn(1, 11, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    d = torch.cdist(x[0], x[0]).sort(1).values
    assert torch.allclose(mta_bandwidth(x)[0], (0.5 * (d[:, 1:4] ** 2).mean(1)).sqrt(), atol=1e-6)  # k = 3 of 10
    assert not torch.allclose(mta_bandwidth(x)[0], (0.5 * (d[:, 0:3] ** 2).mean(1)).sqrt(), atol=1e-3)


def two_clusters():
    """View 0 in a small cluster (3 views around e0), 9 views around e1; class 0 at e0, class 1 at e1."""
    g = torch.Generator().manual_seed(2)
    d = 8
    small = torch.eye(d)[0] + 0.15 * torch.randn(3, d, generator=g)
    large = torch.eye(d)[1] + 0.15 * torch.randn(9, d, generator=g)
    return F.normalize(torch.cat([small, large]), dim=-1)[None], torch.eye(d)[:3]


def test_mta_mode_starts_at_the_original_view_not_the_mean():
    features, text = two_clusters()
    scale = 1.0  # a flat affinity: the kernel decides where the mode goes
    mode, _ = mta_mode(features, scale * features @ text.T)
    right = mta_transcript(features[0], text, scale)
    mean_start = mta_transcript(features[0], text, scale, start="mean")
    assert torch.allclose(mode[0], right["mode"], atol=1e-5)
    # from view 0 the mode stays in its small cluster; from the mean it goes to the large one
    assert int(mode[0].argmax()) == 0 and int(mean_start["mode"].argmax()) == 1
    assert int(right["logits"].argmax()) == 0 and int(mean_start["logits"].argmax()) == 1


def test_mta_differs_from_self_including_bandwidth_and_reset_inlierness():
    scale = 10.0
    features, text = mta_batch(seed=21)  # image 3: y has not converged after 5 inner steps, so carrying it matters
    mode, _ = mta_mode(features, scale * features @ text.T)
    right = torch.stack([mta_transcript(features[i], text, scale)["mode"] for i in range(4)])
    self_distance = torch.stack(
        [mta_transcript(features[i], text, scale, self_distance=True)["mode"] for i in range(4)]
    )
    reset_y = torch.stack([mta_transcript(features[i], text, scale, reset_y=True)["mode"] for i in range(4)])
    assert torch.allclose(mode, right, atol=1e-5)
    assert (mode - self_distance).abs().max() > 1e-3
    assert (mode[3] - reset_y[3]).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------------
# C-TPT
# ---------------------------------------------------------------------------------------------------------


def test_text_feature_dispersion_is_the_mean_plain_distance_to_the_centroid():
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])  # centroid (1, 1)
    expected = (math.sqrt(2) + 2 * math.sqrt(5)) / 3  # squared would be 4, summed 5.886
    assert text_feature_dispersion(points).item() == pytest.approx(expected, abs=1e-6)
    batched = torch.stack([points, 2 * points])
    assert torch.allclose(text_feature_dispersion(batched), torch.tensor([expected, 2 * expected]), atol=1e-5)


@pytest.fixture(scope="module")
def world_vlm():
    return create_vlm("tta-world-resnet")


@pytest.fixture(scope="module")
def world_views(world_vlm):
    return _tiny_world_views(world_vlm, n_images=3, n_views=20)  # 2 of 20 views kept


def raw_text_features(prompt: PromptLearner, context: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The prompt's class features before their L2 normalisation (the learner's last line made the identity)."""
    with monkeypatch.context() as patch:
        patch.setattr(prompt_module, "F", types.SimpleNamespace(normalize=lambda t, dim: t))
        return prompt.text_features(context)


def ctpt_transcript(
    prompt: PromptLearner,
    vlm,
    views: torch.Tensor,
    lambda_term: float,
    monkeypatch,
    sign: float = -1.0,
    power: int = 1,
    normalised: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image (``V x D``) as ``test_time_tuning`` with ``tpt_ctpt``: select under the step's forward (the
    initial prompt), loss ``avg_entropy + sign * lambda * ATFD`` of that same forward, one fresh AdamW step
    (torch defaults besides lr: weight decay 0.01), then the original view's logits. ``sign``, ``power`` and
    ``normalised`` give wrong readings."""
    context = prompt.initial_context.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([context], lr=5e-3)
    raw = raw_text_features(prompt, context, monkeypatch)
    text = raw / raw.norm(dim=-1, keepdim=True)  # custom_clip get_text_features
    output = vlm.logits(views, text)
    entropy = -(output.softmax(1) * output.log_softmax(1)).sum(1)
    chosen = output[torch.argsort(entropy)[: int(len(views) * 0.1)]]
    logp = chosen - chosen.logsumexp(-1, keepdim=True)
    average = (logp.logsumexp(0) - math.log(len(chosen))).clamp(min=torch.finfo(torch.float32).min)
    loss = -(average * average.exp()).sum()
    features = text if normalised else raw
    atfd = ((features - features.mean(0)).norm(dim=-1) ** power).mean()
    loss = loss + sign * lambda_term * atfd
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        return context.detach(), vlm.logits(views[:1], prompt.text_features(context))[0]


def test_ctpt_step_equals_the_reference_transcript_batched_and_one_at_a_time(world_vlm, world_views, monkeypatch):
    prompt = PromptLearner(world_vlm, CLASS_NAMES)
    together = ctpt_adapt(prompt, world_views, world_vlm.logits, lambda_term=20.0)
    refs = [ctpt_transcript(prompt, world_vlm, world_views[i], 20.0, monkeypatch) for i in range(len(world_views))]
    assert torch.allclose(together.variables, torch.stack([r[0] for r in refs]), atol=1e-5)
    assert torch.allclose(together.logits, torch.stack([r[1] for r in refs]), atol=1e-5)
    alone = [ctpt_adapt(prompt, world_views[i : i + 1], world_vlm.logits, lambda_term=20.0) for i in range(3)]
    assert torch.allclose(together.variables, torch.cat([a.variables for a in alone]), atol=1e-6)
    assert torch.allclose(together.logits, torch.cat([a.logits for a in alone]), atol=1e-5)


def test_ctpt_differs_from_wrong_sign_squared_distance_and_unnormalised_features(world_vlm, world_views, monkeypatch):
    prompt = PromptLearner(world_vlm, CLASS_NAMES)
    views = world_views[:2]
    out = ctpt_adapt(prompt, views, world_vlm.logits, lambda_term=20.0)
    readings = {
        "right": {},
        "plus_lambda": {"sign": 1.0},
        "squared": {"power": 2},
        "unnormalised": {"normalised": False},
    }
    contexts = {
        name: torch.stack([ctpt_transcript(prompt, world_vlm, v, 20.0, monkeypatch, **kw)[0] for v in views])
        for name, kw in readings.items()
    }
    assert torch.allclose(out.variables, contexts["right"], atol=1e-5)
    for name in ("plus_lambda", "squared", "unnormalised"):
        # a sign-like AdamW step: a wrong reading moves some context elements the other way (2 * lr apart)
        assert (out.variables - contexts[name]).abs().max() > 5e-3, name


def test_ctpt_with_lambda_zero_is_tpt(world_vlm, world_views):
    prompt = PromptLearner(world_vlm, CLASS_NAMES)
    ctpt = ctpt_adapt(prompt, world_views, world_vlm.logits, lambda_term=0.0)
    tpt = tpt_adapt(prompt, world_views, world_vlm.logits)
    # equal up to float rounding (~4e-9 in the context): the class features' gradient is bitwise TPT's, but
    # the text tower's backward rounds differently once the zero term joins the graph
    assert torch.allclose(ctpt.variables, tpt.variables, atol=1e-7, rtol=0)
    assert torch.allclose(ctpt.logits, tpt.logits, atol=1e-5, rtol=0)
    assert not torch.equal(ctpt_adapt(prompt, world_views, world_vlm.logits, lambda_term=20.0).variables, tpt.variables)


# ---------------------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_module():
    return ZeroShotClassifier(create_vlm("tta-world-resnet"))


def recording(callback_cls):
    """The callback, recording each ``adapt`` call's view features and returned logits."""

    class Recording(callback_cls):
        def adapt(self, pl_module, view_features):
            logits = super().adapt(pl_module, view_features)
            self.calls.append((view_features.detach().clone(), logits.detach().clone()))
            return logits

    Recording.calls = None
    return Recording


def zero_on(module, features):
    text = module.text_features()
    return zero_predict(features @ text.T, module.vlm.logits(features, text)).logits


def mta_on(module, features):
    text = module.text_features()
    mode, _ = mta_mode(features, module.vlm.logits(features, text))
    return module.vlm.logits(mode, text)


def ctpt_on(module, features):
    prompt = PromptLearner(module.vlm, module.class_names, "a photo of a")
    return ctpt_adapt(prompt, features, module.vlm.logits, lambda_term=20.0).logits


@pytest.mark.parametrize(
    "callback_cls, method, options",
    [(ZERO, zero_on, {"n_views": 12}), (MTA, mta_on, {"n_views": 12}), (CTPT, ctpt_on, {"n_views": 10})],
    ids=["zero", "mta", "ctpt"],
)
def test_callback_logits_are_the_method_on_its_own_view_features_at_any_batch_size(
    world_module, callback_cls, method, options
):
    callback = recording(callback_cls)(seed=0, **options)
    callback.calls = []
    large, _ = predict(world_module, [callback], batch_size=4, n=6)
    assert torch.allclose(large["logits"], torch.cat([logits for _, logits in callback.calls]), atol=0)
    for features, logits in callback.calls:
        assert features.shape[1] == options["n_views"]
        assert torch.allclose(method(world_module, features).detach(), logits, atol=1e-5)
    small, _ = predict(world_module, [callback_cls(seed=0, images_per_step=2, **options)], batch_size=2, n=6)
    assert torch.equal(small["index"], large["index"])
    assert torch.allclose(small["logits"], large["logits"], atol=1e-5)
    assert torch.equal(small["logits"].argmax(-1), large["logits"].argmax(-1))


@pytest.mark.parametrize(
    "callback_cls, kwargs, option",
    [
        (ZERO, {"gamma": 0}, "gamma"),
        (ZERO, {"gamma": 1.5}, "gamma"),
        (ZERO, {"tie_fallback": "x"}, "tie_fallback"),
        (ZERO, {"output": "probs"}, "output"),
        (MTA, {"lambda_y": 0}, "lambda_y"),
        (MTA, {"lambda_q": -1}, "lambda_q"),
        (MTA, {"neighbour_fraction": 0}, "neighbour_fraction"),
        (CTPT, {"lambda_term": -1}, "lambda_term"),
        (CTPT, {"lr": 0}, "lr"),
    ],
)
def test_bad_options_are_refused_by_name(callback_cls, kwargs, option):
    with pytest.raises(OptionError) as error:
        callback_cls(**kwargs)
    assert error.value.option == option
