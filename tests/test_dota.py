"""DOTA against a test-side transcript of its authors' code, the wrong readings it must not be, and its callback.

What is proven here:

- ``tta.methods.dota.DOTAState`` gives, sample after sample over CLIP-like random streams of 500
  samples and 24 classes (one view, and 30 views of which 3 are kept), the logits of a transcript of
  the reference's per-sample loop (skylineeeeen/DOTA bc67d44: ``dota.py`` ``DOTA`` and
  ``run_test_dota``, ``utils.py`` ``get_clip_logits_aug``) and the same means, counts, covariances
  and inverse covariance after every step, bit for bit; the stream crosses the weight's cap,
  drops the original view, and changes zero-shot predictions. The options ``mean_init="text"``
  and ``compute_dtype="float32"`` match the transcript read the same way.
- Wrong readings differ by more than 1e-4 x the logit scale: fitting before predicting, hard
  pseudo-labels, the inverse covariance and scores in fp32 (the reference's are fp16), the
  covariance taken around the new means, the weight without the division by the kept views.
- A state saved through ``safetensors`` at a random step and loaded into a fresh state continues
  to the same logits, bit for bit.
- The ``DOTA`` callback refuses bad options by name, returns inside ``Trainer.predict`` the state's
  logits on the model's features in stream order whatever the batch size (a fresh state per
  domain), walks 12 views when asked, and resumes a stopped run to the same predictions file.
- Every card of ``configs/experiment/dota_vit_b16`` composes and builds the callback with the
  reference's per-data-set values (a table transcribed from its ``configs/vit/*.yaml``,
  ``datasets/*.py`` and ``utils.py``).
"""

from __future__ import annotations

import json
from importlib.resources import files

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from test_tta_callbacks import predict

import tta.callbacks
from tta.callbacks import PredictionWriter
from tta.callbacks.dota import DOTA
from tta.datamodules import WorldDataModule
from tta.methods.dota import DOTAState, confident_views
from tta.models import create_vlm
from tta.tasks import ZeroShotClassifier
from tta.validation import OptionError

SCALE = 100.0
#: Hyperparameters for the random streams: the cap eta is reached after about 340 of the 500 samples.
STREAM_CFG = {"epsilon": 1e-4, "sigma": 0.002, "eta": 0.3, "rho": 0.02}


def clip_like_stream(seed: int, n: int = 500, c: int = 24, d: int = 48, v: int = 1):
    """``n x v x d`` normalised features and ``c x d`` text features, CLIP-like: every feature near
    one axis orthogonal to the text span (no class favoured by it), a class signal of 0.06, noise along
    a few wide and many narrow directions (so the shared covariance's inverse grows to ~1 / epsilon), and
    view 0 the clean image, the other views noisier by a random amount (entropies differ)."""
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    axis = torch.randn(d, generator=g)
    q = torch.linalg.qr(text.T)[0]
    axis = F.normalize(axis - q @ (q.T @ axis), dim=0)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    spread = torch.logspace(-1.0, -3.5, d)
    labels = torch.randint(c, (n,), generator=g)
    centre = 0.8 * axis + 0.06 * text[labels] + (torch.randn(n, d, generator=g) * spread) @ basis.T
    amount = torch.rand(n, v, 1, generator=g) * 0.6 * (torch.arange(v) > 0)[:, None]
    views = centre[:, None] + (amount * torch.randn(n, v, d, generator=g) * spread) @ basis.T
    return F.normalize(views, dim=-1), text


# ---------------------------------------------------------------------------------------------------------
# The transcript: dota.py and utils.py, one sample at a time, in plain PyTorch
# ---------------------------------------------------------------------------------------------------------


class ReferenceDOTA:
    """``dota.py`` ``DOTA`` restated, statistics named as in the paper: means ``mu`` (``C x D``, from the
    ``D x C`` initial weights ``main`` passes), soft counts ``c`` (start 1), covariances ``Sigma`` (start
    sigma * I), inverse ``Lambda`` (the float64 pseudo-inverse of their mean, cast to fp16).
    ``inverse_dtype`` and ``around`` give wrong readings (an fp32 inverse and fp32 scores; the covariance
    taken around the new means)."""

    def __init__(self, cfg, dim, n_classes, weights, inverse_dtype=torch.float16, around="old"):
        self.epsilon, self.inverse_dtype, self.around = cfg["epsilon"], inverse_dtype, around
        self.mu = weights.T
        self.c = torch.ones(n_classes)
        self.Sigma = cfg["sigma"] * torch.eye(dim).repeat(n_classes, 1, 1)
        self.Lambda = torch.pinverse(self.Sigma.mean(0).double()).to(inverse_dtype)

    def fit(self, x, y):
        """``k`` kept views ``x`` (``k x D``, fp16) with soft labels ``y`` (``k x C``, fp16); the fp32
        statistics promote the fp16 sums."""
        mass = y.sum(0)
        pulled = (y.T @ x + self.c[:, None] * self.mu) / (mass[:, None] + self.c[:, None])
        offsets = x[:, None, :] - (self.mu if self.around == "old" else pulled)[None]  # k x C x D
        scatter = torch.einsum("kci,kcj->cij", y[:, :, None] * offsets, offsets)
        self.Sigma = (self.c[:, None, None] * self.Sigma + scatter) / (self.c + mass)[:, None, None]
        self.mu, self.c = pulled, self.c + mass

    def update(self):
        shrunk = (1 - self.epsilon) * self.Sigma.mean(0) + self.epsilon * torch.eye(self.Sigma.shape[-1])
        self.Lambda = torch.inverse(shrunk).to(self.inverse_dtype)

    def predict(self, features):
        M = self.mu.T.to(self.inverse_dtype)
        W = self.Lambda @ M
        # the fp32 reading's scores are rounded back to the features' dtype: only the inverse's dtype differs
        return (features.to(self.inverse_dtype) @ W - 0.5 * (M * W).sum(0)).to(features.dtype)


def reference_sample(views, weights, scale):
    """``utils.py`` ``get_clip_logits_aug`` restated: ``(kept features, zero-shot logits, soft labels, kept
    indices)`` of one sample's views (``V x D``): with V > 1 the int(0.1 V) views of lowest entropy, their
    features not averaged, their logits averaged, each its own softmax."""
    logits = scale * views @ weights  # (scale * views) @ weights, as Python groups the reference's line
    if len(views) == 1:
        return views, logits, logits.softmax(1), torch.zeros(1, dtype=torch.long)
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    kept = torch.argsort(entropy, stable=True)[: int(len(views) * 0.1)]
    return views[kept], logits[kept].mean(0, keepdim=True), logits[kept].softmax(1), kept


def reference_stream(
    stream,
    text,
    cfg,
    scale=SCALE,
    dtype=torch.float16,
    init="constant",
    order="predict_then_fit",
    labels="soft",
    inverse_dtype=None,
    around="old",
    per_view_weight=True,
):
    """``run_test_dota`` restated over ``stream`` (``N x V x D``): yields each sample's final logits (an
    fp32 copy of the reference's fp16 ones), its zero-shot logits, the weight, the kept views and the
    model after the sample. The keyword arguments other than ``dtype``/``init`` give wrong readings."""
    n_classes, dim = text.shape
    weights = text.to(dtype).T  # clip_classifier's D x C weights, fp16 from the fp16 text tower
    start = torch.full((dim, n_classes), 0.001) if init == "constant" else weights.float()
    model = ReferenceDOTA(cfg, dim, n_classes, start, inverse_dtype or dtype, around)
    for views in stream:
        x, zero_shot, soft, kept = reference_sample(views.to(dtype), weights, scale)
        if labels == "hard":
            soft = F.one_hot(soft.argmax(1), n_classes).to(soft.dtype)
        if order == "fit_then_predict":
            model.fit(x, soft)
            model.update()
        gaussian = model.predict(x.mean(0, keepdim=True))
        weight = torch.clamp(cfg["rho"] * model.c.mean() / (len(x) if per_view_weight else 1), max=cfg["eta"])
        final = zero_shot + weight * gaussian
        if order == "predict_then_fit":
            model.fit(x, soft)
            model.update()
        yield final[0].float(), zero_shot[0].float(), float(weight), kept, model


def transcript_logits(stream, text, cfg, **reading) -> torch.Tensor:
    return torch.stack([out[0] for out in reference_stream(stream, text, cfg, **reading)])


def state_logits(stream, text, cfg, **options) -> torch.Tensor:
    state = DOTAState(text, SCALE, **cfg, **options)
    return torch.stack([state.step(views) for views in stream])


# ---------------------------------------------------------------------------------------------------------
# Fidelity
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [1, 30], ids=["original_only", "30_views"])
def test_state_equals_the_reference_transcript_after_every_sample(v):
    stream, text = clip_like_stream(0, v=v)
    state = DOTAState(text, SCALE, **STREAM_CFG)
    paths = {"below_cap": 0, "at_cap": 0, "original_dropped": 0, "changed_prediction": 0}
    for step, (views, (ref, zero_shot, weight, kept, model)) in enumerate(
        zip(stream, reference_stream(stream, text, STREAM_CFG))
    ):
        out = state.step(views)
        assert torch.allclose(out, ref, atol=1e-4 * SCALE, rtol=0), step
        assert torch.equal(out, ref), step  # the same operations in the same dtypes: bit for bit
        assert torch.equal(state.means, model.mu) and torch.equal(state.counts, model.c), step
        assert torch.equal(state.covariances, model.Sigma), step
        assert torch.equal(state.inverse, model.Lambda) and state.inverse.dtype == torch.float16, step
        assert state.size() == step + 1
        paths["below_cap" if weight < STREAM_CFG["eta"] else "at_cap"] += 1
        paths["original_dropped"] += int(0 not in kept.tolist())
        paths["changed_prediction"] += int(out.argmax() != zero_shot.argmax())
        if step == 0:  # every mean starts equal: the first sample's Gaussian scores are all the same
            assert torch.allclose(out - zero_shot, (out - zero_shot)[0].expand_as(out), atol=0.1)
    assert paths["below_cap"] > 100 and paths["at_cap"] > 100, paths
    assert paths["changed_prediction"] >= 5, paths
    assert (paths["original_dropped"] > 100) == (v > 1), paths
    assert state.inverse.abs().max() > 1000  # the fp16 inverse grows towards 1 / epsilon on this stream


@pytest.mark.parametrize("options", [{"mean_init": "text"}, {"compute_dtype": "float32"}], ids=["text", "float32"])
def test_options_equal_the_transcript_read_the_same_way(options):
    stream, text = clip_like_stream(1, n=200, v=30)
    reading = {"init": options.get("mean_init", "constant")}
    if options.get("compute_dtype") == "float32":
        reading["dtype"] = torch.float32
    ref = transcript_logits(stream, text, STREAM_CFG, **reading)
    out = state_logits(stream, text, STREAM_CFG, **options)
    assert torch.allclose(out, ref, atol=1e-4 * SCALE, rtol=0)
    assert (out - state_logits(stream, text, STREAM_CFG)).abs().max() > 1e-4 * SCALE  # not the default


def test_confident_views_keep_the_tenth_of_lowest_entropy_in_order():
    logits = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 1.0], [9.0, 0.0]] * 5)  # entropies 4 levels, 5 ties each
    assert confident_views(logits).tolist() == [3, 7]  # int(20 * 0.1) = 2; ties: the lower index first
    assert confident_views(logits[:9]).tolist() == []


# ---------------------------------------------------------------------------------------------------------
# Mutants
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streams():
    return {v: clip_like_stream(0, v=v) for v in (1, 30)}


WRONG_READINGS = {
    "fit_before_predict": {"order": "fit_then_predict"},
    "hard_labels": {"labels": "hard"},
    "fp32_inverse": {"inverse_dtype": torch.float32},
    "covariance_around_new_means": {"around": "new"},
    "weight_not_per_view": {"per_view_weight": False},  # with one view a division by 1: views only
}


@pytest.mark.parametrize(
    "v, name",
    [(v, name) for v in (1, 30) for name in WRONG_READINGS if v > 1 or name != "weight_not_per_view"],
)
def test_wrong_readings_give_other_logits(streams, v, name):
    reading = WRONG_READINGS[name]
    stream, text = streams[v]
    right = state_logits(stream, text, STREAM_CFG)
    wrong = transcript_logits(stream, text, STREAM_CFG, **reading)
    # far above the fidelity tolerance (the fp32 inverse's gap is its fp16 rounding: about 0.06 on these streams)
    assert (right - wrong).abs().max() > 1e-4 * SCALE * 3, reading


# ---------------------------------------------------------------------------------------------------------
# State round trip
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [1, 30])
def test_a_state_saved_at_a_random_step_continues_bit_for_bit(v):
    stream, text = clip_like_stream(2, n=120, v=v)
    whole = state_logits(stream, text, STREAM_CFG)
    stop = int(torch.randint(1, len(stream) - 1, (1,), generator=torch.Generator().manual_seed(v)))
    first = DOTAState(text, SCALE, **STREAM_CFG)
    for views in stream[:stop]:
        first.step(views)
    saved = first.state_dict()
    assert all(t.is_contiguous() for t in saved.values())
    blob = save(saved)  # refuses tensors that share storage
    for views in stream[stop : stop + 3]:
        first.step(views)  # the saved tensors are copies: stepping on does not change them
    resumed = DOTAState(text, SCALE, **STREAM_CFG)
    loaded = load(blob)
    resumed.load_state_dict(loaded)
    assert resumed.size() == stop
    rest = torch.stack([resumed.step(views) for views in stream[stop:]])
    assert torch.equal(rest, whole[stop:])
    assert torch.equal(loaded["covariances"], load(blob)["covariances"])  # the loaded dict was not updated in place


# ---------------------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"epsilon": 0}, "epsilon"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"sigma": 0}, "sigma"),
        ({"eta": -0.1}, "eta"),
        ({"rho": -1}, "rho"),
        ({"rho": "fast"}, "rho"),
        ({"mean_init": "zeros"}, "mean_init"),
        ({"compute_dtype": "bfloat16"}, "compute_dtype"),
        ({"n_views": 8}, "n_views"),
        ({"n_views": 0}, "n_views"),
        ({"continual": "yes"}, "continual"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, option):
    with pytest.raises(OptionError) as error:
        DOTA(**kwargs)
    assert error.value.option == option


def test_n_views_between_2_and_9_is_refused_with_the_fix():
    with pytest.raises(OptionError, match=r"must be 1 \(the original alone\) or at least 10 .*got 8"):
        DOTA(n_views=8)
    assert DOTA(n_views=10).n_views == 10


def test_the_non_finite_hint_names_epsilon_and_float32():
    assert "raise epsilon (now 0.0001" in DOTA().non_finite_hint()
    assert "compute_dtype=float32" in DOTA().non_finite_hint()


@pytest.fixture(scope="module")
def world_module():
    return ZeroShotClassifier(create_vlm("tta-world-resnet"))


def walked_stream(module, domains, n, **options):
    """DOTA walked sample by sample over the world's stream outside Lightning, a fresh state per domain,
    on the features of the model's forward."""
    text, scale = module.text_features().float(), float(module.vlm.logit_scale)
    data = WorldDataModule(domains=list(domains), n_per_domain=n, batch_size=5, seed=321)
    data.setup("predict")
    state, domain, out = None, None, {}
    with torch.no_grad():
        for batch in data.predict_dataloader():
            features = module(batch["image"])["image_features"]
            for position, index in enumerate(batch["index"].tolist()):
                if batch["domain"][position] != domain:
                    state, domain = DOTAState(text, scale, **options), batch["domain"][position]
                out[index] = state.step(features[position : position + 1])
    return out


def test_callback_is_the_state_in_stream_order_whatever_the_batch_size(world_module):
    options = {"eta": 3.0, "rho": 0.5}  # a strong weight: the statistics change the world's predictions
    one, _ = predict(world_module, [DOTA(**options)], batch_size=1, n=10, domains=("clean", "blur"))
    four, _ = predict(world_module, [DOTA(**options)], batch_size=4, n=10, domains=("clean", "blur"))
    assert torch.equal(one["index"], four["index"])
    assert torch.allclose(one["logits"], four["logits"], atol=0.02)  # to the fp16 logits' rounding
    expected = walked_stream(world_module, ("clean", "blur"), 10, **options)
    got = dict(zip(four["index"].tolist(), four["logits"]))
    assert all(torch.allclose(got[i], expected[i], atol=0.02) for i in expected)
    # each domain's first sample: every mean equal, so zero-shot's logits shifted by one constant (fp16 rounding)
    for first in (0, 10):
        shift = four["logits"][first] - four["logits_zs"][first]
        assert (shift - shift.mean()).abs().max() < 0.02
    assert not torch.allclose(four["logits"], four["logits_zs"], atol=0.5)


def test_callback_walks_the_views_it_is_given(world_module):
    seen = []

    class Recording(DOTA):
        def new_state(self, pl_module):
            state = super().new_state(pl_module)
            step = state.step
            state.step = lambda views: seen.append(views.shape) or step(views)
            return state

    callback = Recording(n_views=12, seed=0)
    out, _ = predict(world_module, [callback], batch_size=3, n=4)
    assert seen == [torch.Size([12, 64])] * 4
    assert torch.isfinite(out["logits"]).all() and callback.sizes == [1, 2, 3, 4]


class CrashAt(pl.Callback):
    """Raises at the start of batch ``at`` (``None``: never); a class attribute, so that the crashed run
    and its rerun have the same run key."""

    at: int | None = None

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == CrashAt.at:
            raise RuntimeError("crash")


def test_a_stopped_run_resumes_to_the_uninterrupted_predictions(world_module, tmp_path):
    def run(directory, crash_at=None):
        data = WorldDataModule(domains=["clean", "blur"], n_per_domain=6, batch_size=4, seed=321)
        callbacks = [DOTA(eta=3.0, rho=0.5), PredictionWriter(directory, seed=0), CrashAt()]
        trainer = pl.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks
        )
        CrashAt.at = crash_at
        try:
            trainer.predict(world_module, datamodule=data, return_predictions=False)
        finally:
            CrashAt.at = None

    run(tmp_path / "whole")
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "stopped", crash_at=1)  # mid-domain: the clean domain's statistics are saved and resumed
    run(tmp_path / "stopped")
    assert (tmp_path / "stopped" / "predictions.csv").read_bytes() == (
        tmp_path / "whole" / "predictions.csv"
    ).read_bytes()


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------

SEVEN = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]
EIGHTY = json.loads(files("tta.data").joinpath("imagenet.json").read_text())["templates_80"]
#: card -> (epsilon, sigma, eta, rho) of configs/vit/<file>.yaml, n_views (utils.py: 64 AugMix views for
#: A/V/R/S, the image alone otherwise), templates (datasets/<file>.py), data (variant or data set).
REFERENCE = {
    "imagenet": ((1e-4, 0.002, 0.2, 0.005), 1, SEVEN, "imagenet"),
    "imagenet_a": ((1e-4, 0.002, 0.5, 0.02), 64, SEVEN, "imagenet_a"),
    "imagenet_v2": ((1e-4, 0.002, 0.1, 0.01), 64, SEVEN, "imagenet_v2"),
    "imagenet_r": ((1e-4, 0.002, 0.3, 0.0025), 64, EIGHTY, "imagenet_r"),
    "imagenet_sketch": ((1e-4, 0.002, 0.8, 0.03), 64, EIGHTY, "imagenet_sketch"),
    "caltech101": ((0.002, 0.002, 0.3, 0.02), 1, SEVEN, "caltech101"),
    "dtd": ((1e-4, 0.002, 0.3, 0.02), 1, ["{} texture."], "dtd"),
    "eurosat": ((1e-4, 0.002, 3, 0.05), 1, ["a centered satellite photo of {}."], "eurosat"),
    "aircraft": ((1e-4, 0.002, 0.2, 0.01), 1, ["a photo of a {}, a type of aircraft."], "aircraft"),
    "flower102": ((1e-4, 0.002, 0.2, 0.02), 1, ["a photo of a {}, a type of flower."], "flower102"),
    "food101": ((4e-5, 0.002, 0.1, 0.01), 1, ["a photo of {}, a type of food."], "food101"),
    "pets": ((1e-4, 0.002, 0.3, 0.02), 1, ["a photo of a {}, a type of pet."], "pets"),
    "cars": ((1e-4, 0.002, 0.3, 0.01), 1, SEVEN, "cars"),
    "sun397": ((1e-4, 0.002, 0.2, 0.01), 1, SEVEN, "sun397"),
    "ucf101": ((1e-4, 0.002, 0.4, 0.02), 1, ["a photo of a person doing {}."], "ucf101"),
}
PUBLISHED = {"imagenet": 70.69, "imagenet_a": 61.50, "imagenet_r": 81.21, "imagenet_sketch": 51.84}


@pytest.fixture
def exported(monkeypatch):
    """``tta.callbacks.DOTA``, the configs' target (set here until the package exports it)."""
    monkeypatch.setattr(tta.callbacks, "DOTA", DOTA, raising=False)


def test_the_folder_holds_the_fifteen_cards_and_one_base():
    folder = files("tta.configs").joinpath("experiment", "dota_vit_b16")
    names = {p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")}
    assert names == set(REFERENCE) | {"_common"}


@pytest.mark.parametrize("card", sorted(REFERENCE))
def test_each_card_builds_the_callback_with_the_reference_values(compose, exported, card):
    from hydra.utils import instantiate
    from test_config import assert_run_key_sees_every_argument

    (epsilon, sigma, eta, rho), n_views, templates, data = REFERENCE[card]
    cfg = compose([f"experiment=dota_vit_b16/{card}"])
    callback = instantiate(cfg.tta.callbacks.dota)
    assert isinstance(callback, DOTA)
    assert (callback.epsilon, callback.sigma, callback.eta, callback.rho) == (epsilon, sigma, eta, rho)
    assert (callback.n_views, callback.views) == (n_views, "augmix")
    assert (callback.mean_init, callback.compute_dtype, callback.continual) == ("constant", "float16", False)
    assert list(cfg.model.templates) == templates
    assert cfg.model.vlm.name == "ViT-B-16-quickgelu" and cfg.model.vlm.pretrained == "openai"
    assert cfg.trainer.precision == "16-mixed" and cfg.seed == 1
    if data == "imagenet_v2":
        assert cfg.data._target_.endswith("ImageNetV2DataModule") and cfg.data.class_list == "clip"
    elif data.startswith("imagenet"):
        assert cfg.data._target_.endswith(".ImageNetDataModule")
        assert cfg.data.variant == data and cfg.data.class_list == "clip"
    else:
        assert cfg.data._target_.endswith("FineGrainedDataModule")
        assert cfg.data.dataset == data and cfg.data.split == "test"
    assert cfg.published.method == "dota"
    assert dict(cfg.published.accuracy) == ({card: PUBLISHED[card]} if card in PUBLISHED else {})
    assert_run_key_sees_every_argument(callback)


def test_the_tta_option_defaults_are_the_reference_imagenet_run(compose, exported):
    from hydra.utils import instantiate

    callback = instantiate(compose(["tta=dota"]).tta.callbacks.dota)
    defaults = DOTA()
    for name in ("epsilon", "sigma", "eta", "rho", "mean_init", "compute_dtype", "n_views", "views", "continual"):
        assert getattr(callback, name) == getattr(defaults, name), name
    assert (callback.epsilon, callback.eta, callback.rho, callback.n_views) == (1e-4, 0.2, 0.005, 1)
