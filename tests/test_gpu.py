"""The GPU tier: every method through ``tta-predict`` on a small world run, on the device.

``pytest -m gpu`` runs the CUDA variants (skipped without CUDA: see ``conftest.py``). The CPU
variants of the same test bodies run with the rest of the suite, at smaller sizes, so that the
tier's commands, probes and comparisons are checked without a GPU; their fp32 comparison is the
CPU against the CPU (the same command twice: same seed, same predictions).

Each run composes the config that ``tta-predict`` composes from the same command line and calls
``tta.cli.run`` (what the console script calls) in this process, so that probes can watch it:

- the tensors that matter are on the device: every image the towers encode (the views and the
  diffusion views among them), the view features, the prompt contexts and the prompt learner's
  stored embeddings, the diffusion views, the cached class features, STS's class features and
  basis, LAME's outputs, TTM's scores, the cell features of Search-TTA's adapted tower, and the
  logits or scores that are written out;
- under autocast the view features are in the autocast dtype and the learnable contexts in fp32;
  under fp16 the gradient steps of TPT and DiffTPT go through a loss scaler;
- the model handed to ``Trainer.predict`` is bitwise unchanged afterwards, without gradients;
- in fp32 the run agrees with the CPU run of the same command: the same prediction (the class;
  a group's metrics; a search's finds and steps) on at least ``FP32_AGREEMENT`` of the samples,
  and on those the logits (a group's scores) within ``FP32_LOGIT_ATOL``; in bf16 and fp16 the
  same prediction as the device's fp32 run on at least ``HALF_AGREEMENT`` of the samples.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import run_script

from tta.augment import DiffusionViewGenerator
from tta.callbacks import CTPT, LAME, MTA, STS, TPT, ZERO, DiffTPT, EpisodicTTA, ViewAverage
from tta.cli import run
from tta.methods import search as search_methods
from tta.methods import ttm as ttm_methods
from tta.methods.boostadapter import BoostAdapterState
from tta.methods.dmn import DMNState
from tta.methods.dota import DOTAState
from tta.methods.dpe import DPEState
from tta.methods.tda import TDAState
from tta.models import PromptLearner, VisionLanguageModel, create_vlm
from tta.tasks import GroupScorer, SearchEpisodeRunner
from tta.tasks.group_scorer import GROUP_METRICS
from tta.tasks.zero_shot import ClassifierPredictions

DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))
#: trainer.precision of each variant; Lightning runs 16-mixed as bf16-mixed on a CPU, so the
#: fp16 variant is CUDA's only.
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
ONLINE = ("tda", "boostadapter", "dmn", "dota", "dpe")
METHODS = (
    "none",
    "views",
    "tpt",
    "sts",
    "zero",
    "mta",
    "ctpt",
    *ONLINE,
    "lame",
    "sts_lame",
    "difftpt",
    "ttm",
    "search_tta",
)

#: fp32 on the device against fp32 on the CPU (cuDNN's TF32 convolutions turned off for it).
FP32_AGREEMENT = 0.99
FP32_LOGIT_ATOL = 1e-2  # logit units; the shipped model's logit scale is 17.5
#: bf16 / fp16 against fp32 on the same device, per kind of prediction: a check that half
#: precision is not broken (garbage logits, a lost loss scale), not a bound on its rounding.
#: Measured on the CPU in bf16 at the GPU variant's sizes (docs/benchmarks.md): classes 96.9% at
#: the least (views), TTM's group metrics 82.5% (many near-tied groups), search 2 of 2 episodes.
HALF_AGREEMENT = {"classes": 0.8, "groups": 0.6, "episodes": 0.5}
PREDICTION_KIND = {"ttm": "groups", "search_tta": "episodes"}  # the other methods predict classes
#: search results compared between runs
SEARCH_COLUMNS = ("found", "steps_first", "steps_middle", "steps_last")


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of the world runs."""

    images_per_domain: int  # clean and blur scenes
    views: int
    diffusion_images_per_domain: int
    diffusion_views: int
    groups_per_cell: int  # TTM: groups per swap kind
    ttm_rounds: int
    ttm_epochs: int
    episodes: int  # Search-TTA
    grid: int
    budget: int


#: Small on the CPU (the suite's variant); on the GPU, the methods' own 64 views and enough
#: samples that 99% agreement means something, yet the CPU reference runs stay short.
SCALES = {
    "cpu": Scale(3, 8, 2, 4, 3, 2, 1, 1, 6, 12),
    "cuda": Scale(32, 64, 8, 16, 20, 3, 2, 2, 8, 24),
}


def method_overrides(method: str, scale: Scale, precision: str) -> list[str]:
    """The ``tta-predict`` arguments that select ``method`` on a small world run."""
    world = ["data.domains=[clean,blur]", f"data.n_per_domain={scale.images_per_domain}"]
    if method in ("none", "lame"):
        return [f"tta={method}", *world]
    if method in ("views", "tpt", "sts", "zero", "mta", "ctpt"):
        return [f"tta={method}", *world, f"tta.callbacks.{method}.n_views={scale.views}"]
    if method in ONLINE:
        # views through the shared encoder (at least 10: the 10% most confident are one); against the CPU in
        # fp32, the parts the references run in fp16 (TDA's cache logits, DOTA's inverse and scores) in fp32
        # too: fp16 kernels round differently on the two devices, and the stream compounds it
        fp32 = {"tda": "cache_dtype=float32", "boostadapter": "cache_dtype=float32", "dota": "compute_dtype=float32"}
        exact = [f"tta.callbacks.{method}.{fp32[method]}"] if precision == "32-true" and method in fp32 else []
        return [f"tta={method}", *world, f"tta.callbacks.{method}.n_views={max(10, scale.views)}", *exact]
    if method == "sts_lame":
        return ["tta=[sts,lame]", *world, f"tta.callbacks.sts.n_views={scale.views}"]
    if method == "difftpt":
        generator = "tta.callbacks.difftpt.generator"
        return [
            "tta=difftpt",
            "data.domains=[clean,blur]",
            f"data.n_per_domain={scale.diffusion_images_per_domain}",
            f"tta.callbacks.difftpt.n_views={scale.views}",
            f"{generator}.pretrained=tta-tiny-image-variation",
            f"{generator}.n_views={scale.diffusion_views}",
            f"{generator}.num_inference_steps=2",
            f"{generator}.output_size=64",
            f"{generator}.cache_dir=null",
            # "auto" generates in fp16 on CUDA: the fp32 comparison needs fp32 on both devices
            f"{generator}.dtype={'float32' if precision == '32-true' else 'auto'}",
        ]
    if method == "ttm":
        return [
            "experiment=ttm_world",
            f"data.n_per_cell={scale.groups_per_cell}",
            f"tta.callbacks.ttm.rounds={scale.ttm_rounds}",
            f"tta.callbacks.ttm.epochs={scale.ttm_epochs}",
        ]
    if method == "search_tta":
        return [
            "experiment=search_world",
            f"data.n_episodes={scale.episodes}",
            f"data.grid=[{scale.grid},{scale.grid}]",
            f"model.budget={scale.budget}",
        ]
    raise ValueError(f"no overrides for method {method!r}")


def trainer_overrides(device: str, precision: str) -> list[str]:
    """``trainer=gpu`` on CUDA; the default trainer pinned to the CPU otherwise."""
    trainer = ["trainer=gpu"] if device == "cuda" else ["trainer.accelerator=cpu"]
    return [*trainer, f"trainer.precision={precision}", "trainer.enable_progress_bar=false"]


#: Probes each method must trigger (beyond the image tower and the written outputs, which all do).
METHOD_PROBES = {
    "none": {"class features"},
    "views": {"class features", "view features", "method state"},
    "tpt": {"class features", "view features", "method state", "prompt"},
    "sts": {"class features", "view features", "method state"},
    "zero": {"class features", "view features", "method state"},
    "mta": {"class features", "view features", "method state"},
    "ctpt": {"class features", "view features", "method state", "prompt"},
    **{method: {"class features", "view features", "online state"} for method in ONLINE},
    "lame": {"class features", "LAME"},
    "sts_lame": {"class features", "view features", "method state", "LAME"},
    "difftpt": {"class features", "view features", "method state", "prompt", "diffusion views"},
    "ttm": {"text tower", "TTM scores"},
    "search_tta": {"Search-TTA cells"},
}


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``value`` (tensors, and dicts, lists and tuples of them)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors(item)


def model_fingerprint(model: torch.nn.Module) -> tuple[str, tuple[bool, ...], bool]:
    """The bytes of every state tensor, which parameters require grad, whether any holds a grad."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    parameters = list(model.parameters())
    return digest.hexdigest(), tuple(p.requires_grad for p in parameters), any(p.grad is not None for p in parameters)


@dataclasses.dataclass
class Run:
    """What one run left: the probed tensors, the predictions, the loss scalers, the model's fingerprints."""

    seen: dict[str, list[tuple[str, torch.dtype]]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    predictions: dict[int, tuple[Any, torch.Tensor | None]] = dataclasses.field(default_factory=dict)
    scalers: list[torch.amp.GradScaler | None] = dataclasses.field(default_factory=list)
    fingerprints: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)
    metrics: dict[str, Any] | None = None

    def record(self, name: str, *values: Any) -> None:
        self.seen[name].extend((t.device.type, t.dtype) for t in tensors(values))

    def off_device(self, device: str) -> dict[str, set[str]]:
        return {
            name: {d for d, _ in seen if d != device}
            for name, seen in self.seen.items()
            if any(d != device for d, _ in seen)
        }

    def dtypes(self, name: str) -> set[torch.dtype]:
        return {dtype for _, dtype in self.seen[name]}


class Probes:
    """Wraps the functions that handle the tensors that matter and records into the current run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.run = Run()
        self._monkeypatch = monkeypatch
        self.watch(VisionLanguageModel, "encode_image", lambda a, r: self.run.record("image tower", a[1], r))
        self.watch(VisionLanguageModel, "encode_text", lambda a, r: self.run.record("text tower", r))
        self.watch(VisionLanguageModel, "class_text_features", lambda a, r: self.run.record("class features", r))
        for cls in (EpisodicTTA, TPT, CTPT, STS, ViewAverage, ZERO, MTA, DiffTPT):
            if "encode_views" in vars(cls):
                self.watch(cls, "encode_views", lambda a, r: self.run.record("view features", r))
            if "adapt" in vars(cls):
                self.watch(cls, "adapt", self._adapted)
        for state in (TDAState, BoostAdapterState, DMNState, DOTAState, DPEState):  # the state after each sample's step
            self.watch(state, "step", lambda a, r: self.run.record("online state", r, a[0].state_dict()))
        self.watch(PromptLearner, "text_features", self._prompt)
        self.watch(DiffusionViewGenerator, "views", lambda a, r: self.run.record("diffusion views", a[1], r))
        self.watch(LAME, "process_batch", lambda a, r: self.run.record("LAME", r))
        self.watch(ttm_methods.TestTimeMatching, "score_groups", lambda a, r: self.run.record("TTM scores", a[1], r))
        # the planner's map is small and walked in Python on the host (planner_map), by design
        self.watch(search_methods.CellEncoder, "__call__", lambda a, r: self.run.record("Search-TTA cells", r))
        for task in (ClassifierPredictions, GroupScorer, SearchEpisodeRunner):
            self.watch(task, "prediction_rows", self._outputs)
        original_predict = pl.Trainer.predict

        def predict(trainer: pl.Trainer, model: pl.LightningModule, *args: Any, **kwargs: Any) -> Any:
            before = model_fingerprint(model)
            try:
                return original_predict(trainer, model, *args, **kwargs)
            finally:
                self.run.fingerprints.append((before, model_fingerprint(model)))

        monkeypatch.setattr(pl.Trainer, "predict", predict)

    def _adapted(self, args: tuple, result: Any) -> None:
        self.run.record("method state", result, vars(args[0]))
        self.run.scalers.append(args[0].grad_scaler)  # the run's loss scaler at this step (None outside fp16)

    def watch(self, owner: type, name: str, record: Callable[[tuple, Any], None]) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            record(args, result)
            return result

        self._monkeypatch.setattr(owner, name, wrapped)

    def _prompt(self, args: tuple, result: torch.Tensor) -> None:
        learner, context = args[0], args[1]
        self.run.record(
            "prompt", result, learner.prefix, learner.suffix, learner.initial_context, learner.pool_positions
        )
        self.run.record("learnable contexts", context)

    def _outputs(self, args: tuple, rows: list[dict[str, Any]]) -> None:
        outputs = args[1]
        if "logits" in outputs:
            values, keys = outputs["logits"], [row["pred"] for row in rows]
        elif "scores" in outputs:
            values, keys = outputs["scores"], [tuple(row.get(m) for m in GROUP_METRICS) for row in rows]
        else:
            values, keys = None, [tuple(row[c] for c in SEARCH_COLUMNS) for row in rows]
        if values is not None:
            self.run.record("outputs", values)
        for i, row in enumerate(rows):
            self.run.predictions[row["index"]] = (keys[i], None if values is None else values[i].detach().float().cpu())

    def predict(self, overrides: list[str], output_dir: Any) -> Run:
        """Compose ``overrides`` as ``tta-predict`` does, run it, and return what the probes saw."""
        from hydra import compose, initialize_config_module

        self.run = Run()
        with initialize_config_module(config_module="tta.configs", version_base="1.3"):
            cfg = compose("predict", overrides=overrides)
        self.run.metrics = run(cfg, output_dir)
        return self.run


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> Probes:
    return Probes(monkeypatch)


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def agreement(run: Run, reference: Run) -> tuple[float, float]:
    """The fraction of samples with the same prediction, and the largest difference of their
    logits (scores) where both runs have them."""
    assert run.predictions.keys() == reference.predictions.keys(), "the two runs predicted different samples"
    same = [i for i, (key, _) in run.predictions.items() if key == reference.predictions[i][0]]
    differences = [
        (run.predictions[i][1] - reference.predictions[i][1]).abs().max().item()
        for i in same
        if run.predictions[i][1] is not None
    ]
    return len(same) / len(run.predictions), max(differences, default=0.0)


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


#: fp32 runs on each device, kept for the bf16 and fp16 tests of the same method (fp32 runs first).
_FP32_RUNS: dict[tuple[str, str], Run] = {}


def precision_cases() -> list[Any]:
    cases = []
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.gpu] if device == "cuda" else []
        for short, precision in PRECISIONS.items():
            if device == "cpu" and short == "fp16":
                continue
            cases.append(pytest.param(device, precision, id=f"{device}-{short}", marks=marks))
    return cases


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("device", "precision"), precision_cases())
def test_every_method_on_the_device(device, precision, method, probes, tmp_path):
    scale = SCALES[device]
    command = [*method_overrides(method, scale, precision), *trainer_overrides(device, precision)]
    if precision == "32-true":
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            result = probes.predict(command, tmp_path / "device")
        _FP32_RUNS[device, method] = result
    else:
        result = probes.predict(command, tmp_path / "device")
    command_line = "tta-predict " + " ".join(command)

    # nothing fell back to the CPU
    assert result.off_device(device) == {}, f"{command_line}: tensors off the {device}: {result.off_device(device)}"
    # Search-TTA reads the image tower's patch tokens (probed as its cells) and writes episode rows, not outputs
    expected = {"image tower", "outputs", *METHOD_PROBES[method]} - (
        {"image tower", "outputs"} if method == "search_tta" else set()
    )
    assert expected <= set(result.seen), f"{command_line}: never reached {sorted(expected - set(result.seen))}"
    if device == "cpu":  # the check above flags every probe's tensors when they are not where the device is
        assert set(result.off_device("cuda")) == set(result.seen)
    # dtypes: view features in the autocast dtype, learnable contexts fp32, fp16 steps scaled
    dtype = autocast_dtype(precision)
    if "view features" in expected:
        assert result.dtypes("view features") == {dtype or torch.float32}
    if "prompt" in expected:
        assert result.dtypes("learnable contexts") == {torch.float32}
        assert result.scalers, f"{command_line}: no gradient step"
        fp16 = dtype is torch.float16
        assert all((s is not None and s.is_enabled()) == fp16 for s in result.scalers), (
            f"loss scalers under {precision}"
        )
    # the user's model is unchanged
    assert result.fingerprints, "Trainer.predict was not called"
    for before, after in result.fingerprints:
        assert after == before and not after[2], f"{command_line}: the model changed or holds gradients"
    assert result.metrics is not None and result.metrics["n"] == len(result.predictions) > 0
    finite = [values for _, values in result.predictions.values() if values is not None]
    assert all(torch.isfinite(v).all() for v in finite), f"{command_line}: non-finite outputs"

    if precision == "32-true":
        reference_command = [*method_overrides(method, scale, precision), *trainer_overrides("cpu", precision)]
        # on the GPU machine the CPU reference may use every core (the suite pins torch to one)
        with cpu_threads((os.cpu_count() or 1) if device == "cuda" else torch.get_num_threads()):
            reference = probes.predict(reference_command, tmp_path / "cpu")
        same, max_difference = agreement(result, reference)
        assert same >= FP32_AGREEMENT and max_difference <= FP32_LOGIT_ATOL, (
            f"{command_line} against the CPU: same predictions on {same:.1%} (need {FP32_AGREEMENT:.0%}), "
            f"max |logit difference| {max_difference:.2e} (allowed {FP32_LOGIT_ATOL})"
        )
    else:
        fp32 = _FP32_RUNS.get((device, method))
        if fp32 is None:  # this test ran alone
            fp32_command = [*method_overrides(method, scale, "32-true"), *trainer_overrides(device, "32-true")]
            fp32 = probes.predict(fp32_command, tmp_path / "fp32")
        same, _ = agreement(result, fp32)
        needed = HALF_AGREEMENT[PREDICTION_KIND.get(method, "classes")]
        assert same >= needed, f"{command_line}: same predictions as fp32 on {same:.1%} only (need {needed:.0%})"


@pytest.mark.parametrize("device", DEVICES)
def test_tpt_step_under_fp16_with_the_loss_scaler(device):
    """TPT's reference setting (fp16 autocast, GradScaler(init_scale=1000)) gives fp32's step."""
    from tta.augment import make_views
    from tta.methods.tpt import tpt_adapt
    from tta.world import CLASS_NAMES, render_single

    vlm = create_vlm("tta-world-resnet", device=device)
    prompt = PromptLearner(vlm, CLASS_NAMES).to(device)
    images = render_single(4, seed=5).images.to(device)
    with torch.no_grad():
        features = vlm.encode_image(make_views(list(images), images, 16, list(range(4))).flatten(0, 1)).view(4, 16, -1)
    fp32 = tpt_adapt(prompt, features, vlm.logits)
    scaler = torch.amp.GradScaler(device, init_scale=1000)
    fp16 = tpt_adapt(prompt, features, vlm.logits, autocast=torch.autocast(device, dtype=torch.float16), scaler=scaler)
    assert scaler.get_scale() == 1000  # no overflow: the step was taken, not skipped
    assert fp16.variables.device.type == device and fp16.variables.dtype == torch.float32
    assert torch.equal(fp16.logits.argmax(-1), fp32.logits.argmax(-1))
    assert (fp16.logits - fp32.logits).abs().max() < 0.05
    assert not torch.equal(fp16.variables, prompt.initial_context.expand_as(fp16.variables))


@pytest.mark.parametrize("device", DEVICES)
def test_tta_predict_console_script_on_the_device(device, tmp_path):
    out = tmp_path / "run"
    arguments = [
        *trainer_overrides(device, "bf16-mixed"),
        "tta=tpt",
        "tta.callbacks.tpt.n_views=8",
        "data.domains=[blur]",
        "data.n_per_domain=4",
        f"hydra.run.dir={out}",
    ]
    done = run_script("tta-predict", arguments, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["method"] == "tpt"
    trainer = metrics["run"]["config"]["trainer"]
    assert (trainer["accelerator"], trainer["precision"]) == ("gpu" if device == "cuda" else "cpu", "bf16-mixed")


@pytest.mark.parametrize("precision", PRECISIONS.values())
def test_trainer_gpu_takes_every_precision_by_override(compose, precision):
    cfg = compose(["trainer=gpu", f"trainer.precision={precision}"])
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision) == ("gpu", 1, precision)
