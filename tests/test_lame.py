"""LAME: the affinities, the fixed point and its stopping rule, the callback, and the timm classifier."""

from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from tta.callbacks import LAME, STS, PredictionWriter
from tta.datamodules import WorldDataModule
from tta.methods.lame import (
    AFFINITIES,
    fixed_point,
    knn_affinity,
    laplacian_adjust,
    linear_affinity,
    rbf_affinity,
    rbf_sigma,
)
from tta.models import create_vlm
from tta.tasks import TimmClassifier, ZeroShotClassifier

#: Four points on the unit circle at these angles (radians): a "line" along the circle, so the
#: Euclidean distance between points i and j is 2 sin(|a_i - a_j| / 2), increasing with |a_i - a_j|.
ANGLES = torch.tensor([0.0, 0.1, 0.3, 0.7], dtype=torch.float64)


def circle_points(radii: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """The four points, scaled by ``radii`` (the affinities must normalise them away)."""
    return torch.stack([ANGLES.cos(), ANGLES.sin()], 1) * torch.tensor(radii, dtype=torch.float64)[:, None]


def chord(a: float, b: float) -> float:
    return 2 * math.sin(abs(a - b) / 2)


def random_batch(n: int = 12, c: int = 5, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g).mul(2).softmax(-1), torch.randn(n, d, generator=g)


def test_knn_affinity_takes_the_nearest_excluding_self_and_is_not_symmetric():
    w = knn_affinity(circle_points((1.0, 2.0, 0.5, 3.0)), k=1)
    # nearest of 0 is 1, of 1 is 0 (0.1 < 0.2), of 2 is 1 (0.2 < 0.4), of 3 is 2
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[0, 1] = expected[1, 0] = expected[2, 1] = expected[3, 2] = 1
    assert torch.equal(w, expected)
    assert not torch.equal(w, w.T)
    w2 = knn_affinity(circle_points(), k=2)
    assert [set(row.nonzero().flatten().tolist()) for row in w2] == [{1, 2}, {0, 2}, {0, 1}, {1, 2}]
    assert torch.equal(w2.diagonal(), torch.zeros(4, dtype=torch.float64))


def test_knn_affinity_clamps_k_to_the_other_points():
    assert torch.equal(knn_affinity(circle_points(), k=10), 1 - torch.eye(4, dtype=torch.float64))
    assert torch.equal(knn_affinity(circle_points()[:1], k=5), torch.zeros(1, 1, dtype=torch.float64))


def test_rbf_sigma_counts_the_point_itself_and_the_affinity_keeps_self_loops():
    points = circle_points((1.0, 2.0, 0.5, 3.0))
    # k = 2: the 2nd nearest counting the point itself is its nearest other point
    nearest_other = [chord(0, 0.1), chord(0.1, 0), chord(0.3, 0.1), chord(0.7, 0.3)]
    assert rbf_sigma(points, k=2).item() == pytest.approx(sum(nearest_other) / 4, rel=1e-9)
    third = [chord(0, 0.3), chord(0.1, 0.3), chord(0.3, 0.0), chord(0.7, 0.1)]
    assert rbf_sigma(points, k=3).item() == pytest.approx(sum(third) / 4, rel=1e-9)
    assert rbf_sigma(points, k=1).item() == 0  # the point itself
    assert rbf_sigma(points, k=9).item() == pytest.approx(rbf_sigma(points, k=4).item())  # clamped to N

    sigma = sum(nearest_other) / 4
    w = rbf_affinity(points, k=2)
    expected = torch.tensor(
        [[math.exp(-(chord(a, b) ** 2) / (2 * sigma**2)) for b in ANGLES.tolist()] for a in ANGLES.tolist()],
        dtype=torch.float64,
    )
    assert torch.allclose(w, expected, rtol=1e-9, atol=0)
    assert torch.equal(w.diagonal(), torch.ones(4, dtype=torch.float64))
    assert torch.equal(w, w.T)


def test_linear_affinity_is_the_gram_matrix_of_the_normalised_features():
    w = linear_affinity(circle_points((1.0, 2.0, 0.5, 3.0)))
    expected = torch.cos(ANGLES[:, None] - ANGLES[None, :])
    assert torch.allclose(w, expected, atol=1e-12)


@pytest.mark.parametrize("affinity", sorted(AFFINITIES))
def test_output_is_the_fixed_point(affinity):
    probs, features = random_batch()
    z = laplacian_adjust(probs, features, affinity=affinity, k=3, max_iter=1000, tol=0.0)
    w = AFFINITIES[affinity](features, 3)
    assert torch.allclose(z, torch.softmax((probs + 1e-10).log() + w @ z, -1), atol=1e-5)
    assert torch.allclose(z.sum(-1), torch.ones(len(z)), atol=1e-6)


def reference_loop(probs: torch.Tensor, w: torch.Tensor, max_iter: int = 100, tol: float = 1e-8) -> tuple:
    """LAME's fixed point as the authors' code runs it (METHODS.md): unary ``-log(p + 1e-10)``,
    ``Y = softmax(-unary)``; each step the pairwise term of the current Y, the new Y, and the bound
    with THAT pairwise term and ``Y log max(Y, 1e-20)``; stop from the 3rd step on a relative
    change <= tol. Returns (Y, steps)."""
    unary = -torch.log(probs + 1e-10)
    y, old = (-unary).softmax(-1), float("inf")
    for i in range(max_iter):
        pairwise = w @ y
        y = (-unary + pairwise).softmax(-1)
        energy = float((unary * y - pairwise * y + y * torch.log(y.clip(1e-20))).sum())
        if i > 1 and abs(energy - old) <= tol * abs(old):
            return y, i + 1
        old = energy
    return y, max_iter


@pytest.mark.parametrize("affinity", sorted(AFFINITIES))
def test_stopping_rule_does_not_depend_on_how_often_the_host_checks(affinity):
    probs, features = (t.double() for t in random_batch(seed=0))  # float64: no rounding near the threshold
    w = AFFINITIES[affinity](features, 5)
    log_probs = (probs + 1e-10).log()
    runs = [fixed_point(log_probs, w, max_iter=100, tol=1e-6, check_every=every) for every in (1, 7, 10, 100)]
    for z, iterations in runs[1:]:
        assert torch.equal(z, runs[0][0]) and iterations == runs[0][1]
    z, steps = reference_loop(probs, w, tol=1e-6)
    assert int(runs[0][1]) == steps < 100
    assert torch.allclose(runs[0][0], z, atol=1e-12)


@pytest.mark.parametrize("affinity", sorted(AFFINITIES))
@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-8])
def test_the_stopping_rule_is_the_references(affinity, tol):
    """The bound takes the previous iterate's pairwise term, as the reference computes it: with a
    loose tolerance, the bound of the new iterate (W z_t) stops at another iteration."""
    for seed in range(4):
        probs, features = (t.double() for t in random_batch(n=20, c=6, seed=seed))
        w = AFFINITIES[affinity](features, 5)
        expected, steps = reference_loop(probs, w, tol=tol)
        z, iterations = fixed_point((probs + 1e-10).log(), w, tol=tol)
        assert int(iterations) == steps
        assert torch.allclose(z, expected, atol=1e-12)


def test_the_unary_term_is_log_of_p_plus_1e_10():
    """A class below 1e-10 that 40 neighbours favour: the reference's log(p + 1e-10) (-23) lets the
    neighbours' votes (about 40 with the linear affinity) win; the log of p clamped at the smallest
    float (-69 for p = 1e-30) does not."""
    g = torch.Generator().manual_seed(0)
    neighbours = torch.tensor([[0.0, 1.0]]) + 0.01 * torch.randn(40, 2, generator=g)
    features = torch.cat([torch.tensor([[0.1, 1.0]]), neighbours])
    probs = torch.cat([torch.tensor([[1.0, 1e-30]]), torch.tensor([[1e-12, 1.0]]).expand(40, -1)]).double()
    features = features.double()
    adjusted = laplacian_adjust(probs, features, affinity="linear")
    expected, _ = reference_loop(probs / probs.sum(-1, keepdim=True), linear_affinity(features))
    assert torch.allclose(adjusted, expected, atol=1e-9)
    clamped, _ = fixed_point(probs.clamp_min(torch.finfo(probs.dtype).tiny).log(), linear_affinity(features))
    assert adjusted[0].argmax() == 1 and clamped[0].argmax() == 0  # the two unary terms answer differently


def test_max_iter_bounds_the_iterations():
    probs, features = random_batch()
    _, iterations = fixed_point((probs + 1e-10).log(), linear_affinity(features), max_iter=4, tol=0.0)
    assert int(iterations) == 4


@pytest.mark.parametrize("affinity", sorted(AFFINITIES))
def test_a_batch_of_one(affinity):
    probs = torch.tensor([[0.2, 0.5, 0.3]])
    z = laplacian_adjust(probs * 2, torch.randn(1, 4), affinity=affinity)
    assert z.shape == (1, 3) and torch.isfinite(z).all()
    assert torch.allclose(z.sum(-1), torch.ones(1))
    assert z.argmax(-1).item() == 1
    if affinity == "knn":  # no neighbour: the normalised input
        assert torch.equal(z, probs * 2 / (probs * 2).sum(-1, keepdim=True))


@pytest.mark.parametrize("affinity", sorted(AFFINITIES))
def test_probabilities_with_zeros_and_tiny_values(affinity):
    probs = torch.tensor([[0.0, 1e-30, 1.0], [0.5, 0.5, 0.0], [1e-30, 0.0, 1.0], [0.0, 0.0, 1.0]])
    z = laplacian_adjust(probs, torch.randn(4, 6), affinity=affinity, k=2)
    assert torch.isfinite(z).all() and (z >= 0).all()
    assert torch.allclose(z.sum(-1), torch.ones(4), atol=1e-6)
    assert torch.isfinite(z.clamp_min(torch.finfo(z.dtype).tiny).log()).all()


@pytest.mark.parametrize("affinity", ["rbf", "knn"])
def test_neighbours_pull_a_mislabelled_point_to_its_cluster_class(affinity):
    g = torch.Generator().manual_seed(0)
    n_classes, per_cluster, dim = 3, 6, 16
    centres = torch.eye(dim)[:n_classes] * 5
    labels = torch.arange(n_classes).repeat_interleave(per_cluster)
    features = centres[labels] + 0.2 * torch.randn(len(labels), dim, generator=g)
    probs = torch.full((len(labels), n_classes), 0.1)
    probs[torch.arange(len(labels)), labels] = 0.8
    probs[0] = torch.tensor([0.25, 0.6, 0.15])  # a class-0 point the model calls class 1
    z = laplacian_adjust(probs, features, affinity=affinity, k=5)
    assert probs.argmax(-1)[0] == 1
    assert torch.equal(z.argmax(-1), labels)


@pytest.mark.parametrize(
    "kwargs",
    [dict(affinity="cosine"), dict(k=0), dict(k=2.5), dict(max_iter=0), dict(tol=-1.0), dict(tol=float("nan"))],
)
def test_bad_arguments_are_refused_with_the_fix(kwargs):
    with pytest.raises(ValueError, match="must be"):
        LAME(**kwargs)
    with pytest.raises(ValueError, match="must be"):
        laplacian_adjust(*random_batch(), **kwargs)


# --- the callback inside Trainer.predict ---------------------------------------------------------


@pytest.fixture(scope="module")
def world_module() -> ZeroShotClassifier:
    return ZeroShotClassifier(create_vlm("tta-world-resnet"))


def predict(module: pl.LightningModule, callbacks: list[pl.Callback], tmp_path=None, **data_kwargs) -> list[dict]:
    data = WorldDataModule(**{"domains": ["clean"], "n_per_domain": 16, "batch_size": 8, **data_kwargs})
    if tmp_path is not None:
        callbacks = [*callbacks, PredictionWriter(tmp_path, seed=0)]
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks
    )
    return trainer.predict(module, datamodule=data)


def test_lame_callback_adjusts_each_batch(world_module, tmp_path):
    batches = predict(world_module, [LAME()], tmp_path)
    assert len(batches) == 2
    for batch in batches:
        assert {"logits_zs", "probs_zs", "adapt_ms"} <= set(batch)
        expected = laplacian_adjust(batch["probs_zs"].float(), batch["image_features"].float())
        assert torch.allclose(batch["probs"], expected, atol=1e-6)
        assert torch.allclose(batch["probs"], batch["logits"].softmax(-1), atol=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text())["method"] == "lame"


def test_lame_stacked_after_sts_adjusts_the_sts_predictions(world_module, tmp_path):
    sts_only = predict(world_module, [STS(n_views=8, seed=0)])
    stacked = predict(world_module, [STS(n_views=8, seed=0), LAME()], tmp_path)
    for alone, both in zip(sts_only, stacked, strict=True):
        expected = laplacian_adjust(alone["probs"].float(), alone["image_features"].float())
        assert torch.allclose(both["probs"], expected, atol=1e-5)
        assert torch.equal(both["probs_zs"], alone["probs_zs"])  # the module's, not STS's
    assert json.loads((tmp_path / "metrics.json").read_text())["method"] == "sts+lame"


def test_lame_on_a_timm_classifier(tmp_path):
    torch.manual_seed(0)
    module = TimmClassifier("resnet18")
    batches = predict(module, [LAME()], tmp_path, image_size=64)
    assert module.num_classes == len(WorldDataModule.class_names)  # head sized by the datamodule
    for batch in batches:
        assert batch["logits"].shape == batch["probs_zs"].shape == (8, len(WorldDataModule.class_names))
        assert batch["image_features"].shape == (8, 512)
        assert torch.allclose(batch["image_features"].norm(dim=-1), torch.ones(8), atol=1e-5)
        expected = laplacian_adjust(batch["probs_zs"].float(), batch["image_features"].float())
        assert torch.allclose(batch["probs"], expected, atol=1e-6)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "lame" and metrics["model"] == "resnet18"


# --- TimmClassifier ------------------------------------------------------------------------------


def test_timm_classifier_outputs_match_its_model():
    torch.manual_seed(0)
    module = TimmClassifier("resnet18", class_names=["a", "b", "c"]).eval()
    images = torch.rand(2, 3, 64, 64)
    out = module(images)
    normalized = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    assert torch.allclose(out["logits"], module.model(normalized), atol=1e-5)
    pooled = module.model.forward_head(module.model.forward_features(normalized), pre_logits=True)
    assert torch.allclose(out["image_features"], F.normalize(pooled, dim=-1), atol=1e-6)
    assert module.model_name == "resnet18" and module.num_classes == 3


def test_timm_classifier_loads_a_local_checkpoint_head_included(tmp_path):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("resnet18", num_classes=30)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    module = TimmClassifier("resnet18", pretrained=str(tmp_path / "resnet18.pth"), num_classes=30)
    for name, tensor in source.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="set num_classes to its head's size"):
        TimmClassifier("resnet18", pretrained=str(tmp_path / "resnet18.pth"), num_classes=10)


def test_timm_classifier_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown timm model"):
        TimmClassifier("resnet18x")
    with pytest.raises(FileNotFoundError, match="not a file"):
        TimmClassifier("resnet18", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="one name per output"):
        TimmClassifier("resnet18", class_names=["a", "b"], num_classes=3)
    with pytest.raises(ValueError, match="has 10 outputs but the datamodule has 30 classes"):
        predict(TimmClassifier("resnet18", num_classes=10), [LAME()], n_per_domain=2, image_size=32)
