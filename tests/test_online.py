"""The online base (``tta.callbacks.online.OnlineTTA``) and the stream state in the run folder.

A small online method (running class prototypes of the samples seen, predicted before it learns)
drives the base through ``Trainer.predict`` on the offline world:

- samples go through the state one at a time in stream order, so predictions do not depend on the
  batch size; a new domain starts a fresh state (``continual=True`` carries it);
- the prediction writer saves the state with every finished batch; a run that fails after batch k
  and is rerun writes the bytes an uninterrupted run writes; a state file that was changed, removed or
  left half-written is refused or dropped as the run folder's rules say;
- a DDP run is refused with one line naming the fix;
- the user's model is unchanged.
"""

from __future__ import annotations

import json
import types

import pytest
import pytorch_lightning as pl
import torch
from conftest import one_line_error, tta_predict
from test_tta_callbacks import predict

from tta.callbacks import PredictionWriter
from tta.callbacks.online import OnlineTTA
from tta.datamodules import WorldDataModule
from tta.methods.online import OnlineMethod
from tta.models import create_vlm
from tta.run_folder import RunFolderError
from tta.tasks import ZeroShotClassifier
from tta.validation import OptionError


class RunningPrototypes(OnlineMethod):
    """Zero-shot logits plus ``alpha`` times the similarity to the mean feature of each pseudo-class so
    far; the sample joins its pseudo-class after its prediction."""

    def __init__(self, text: torch.Tensor, scale: float, alpha: float = 4.0) -> None:
        self.text, self.scale, self.alpha = text, scale, alpha
        self.sums = torch.zeros_like(text)
        self.counts = torch.zeros(len(text), dtype=torch.int64)

    def step(self, view_features: torch.Tensor) -> torch.Tensor:
        feature = view_features[0].float()
        logits = self.scale * feature @ self.text.T
        means = self.sums / self.counts.clamp_min(1).unsqueeze(1)
        logits = logits + self.alpha * (feature @ means.T)
        label = int(logits.argmax())
        self.sums[label] += feature
        self.counts[label] += 1
        return logits

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sums, self.counts = state["sums"].to(self.text.device), state["counts"].to(self.text.device)

    def size(self) -> int:
        return int(self.counts.sum())


class Prototypes(OnlineTTA):
    method_name = "prototypes"

    def __init__(self, alpha: float = 4.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.alpha = alpha

    def new_state(self, pl_module: pl.LightningModule) -> OnlineMethod:
        return RunningPrototypes(pl_module.text_features().float(), float(pl_module.vlm.logit_scale), self.alpha)


class FailAfter(pl.Callback):
    """Raises at the start of batch ``at`` (0-based; ``None``: never): a crash after ``at`` finished
    batches. A class attribute, not a constructor argument, so that the crashed run and its rerun have
    the same run key."""

    at: int | None = None

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == FailAfter.at:
            raise RuntimeError("crash")


@pytest.fixture(scope="module")
def module():
    return ZeroShotClassifier(create_vlm("tta-world-resnet"))


def _reference_stream(module, data):
    """The toy method walked sample by sample over the stream, outside Lightning."""
    text = module.text_features().float()
    scale = float(module.vlm.logit_scale)
    data.setup("predict")
    state, domain, out = None, None, {}
    with torch.no_grad():
        for batch in data.predict_dataloader():
            features = module(batch["image"])["image_features"]
            for position, index in enumerate(batch["index"].tolist()):
                if batch["domain"][position] != domain:
                    state, domain = RunningPrototypes(text, scale), batch["domain"][position]
                out[index] = state.step(features[position : position + 1])
    return out


def test_samples_go_through_the_state_in_stream_order_whatever_the_batch_size(module):
    one, _ = predict(module, [Prototypes()], batch_size=1, n=8, domains=("clean", "blur"))
    seven, _ = predict(module, [Prototypes()], batch_size=7, n=8, domains=("clean", "blur"))
    assert torch.equal(one["index"], seven["index"])
    assert torch.allclose(one["logits"], seven["logits"], atol=1e-5)
    expected = _reference_stream(
        module, WorldDataModule(domains=["clean", "blur"], n_per_domain=8, batch_size=3, seed=321)
    )
    got = dict(zip(one["index"].tolist(), one["logits"]))
    assert all(torch.allclose(got[i], expected[i], atol=1e-4) for i in expected)
    # the stream's first sample of each domain is predicted by a fresh state: its logits are zero-shot's
    assert torch.allclose(one["logits"][0], one["logits_zs"][0], atol=1e-5)
    assert torch.allclose(one["logits"][8], one["logits_zs"][8], atol=1e-5)
    assert not torch.allclose(one["logits"], one["logits_zs"], atol=1e-3)


def test_continual_carries_the_state_across_domains(module):
    callback = Prototypes(continual=True)
    out, _ = predict(module, [callback], batch_size=4, n=8, domains=("clean", "blur"))
    episodic, _ = predict(module, [Prototypes()], batch_size=4, n=8, domains=("clean", "blur"))
    assert torch.allclose(out["logits"][:8], episodic["logits"][:8], atol=1e-6)
    assert not torch.allclose(out["logits"][8], out["logits_zs"][8], atol=1e-3)  # the clean domain's state
    assert callback.seen == 16 and callback.sizes == list(range(1, 17))


def test_the_model_is_unchanged_and_bad_options_are_refused(module):
    before = {k: v.clone() for k, v in module.state_dict().items()}
    predict(module, [Prototypes(n_views=4, views="crop_flip", seed=0)], batch_size=4, n=4)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    with pytest.raises(OptionError, match="continual"):
        Prototypes(continual="yes")


def test_a_ddp_run_is_refused_naming_the_fix(tmp_path):
    """From Python, at the trainer's setup; from tta-predict, before the processes are launched: one line,
    nothing written but the lock."""
    trainer = types.SimpleNamespace(world_size=2)
    with pytest.raises(OptionError, match=r"trainer.devices.*predict on one device"):
        Prototypes().setup(trainer, None, "predict")
    Prototypes().setup(types.SimpleNamespace(world_size=1), None, "predict")
    run = tmp_path / "run"
    args = ["tta=tda", "trainer=ddp_cpu", "data.n_per_domain=2", "data.domains=[clean]", f"hydra.run.dir={run}"]
    one_line_error(tta_predict(args, tmp_path), "trainer.devices is 2 processes", "predict on one device")
    assert [p.name for p in run.iterdir()] == ["run.lock"]


def _run(module, directory, callbacks, fail_after=None, batch_size=3, stream="iid"):
    """A run writing to ``directory`` (the writer's own run key: every setting of the module, the data and
    the callbacks); ``fail_after``: crash at the start of that batch, after the writer recorded the ones
    before."""
    data = WorldDataModule(domains=["clean", "blur"], n_per_domain=8, batch_size=batch_size, stream=stream, seed=321)
    writer = PredictionWriter(directory, seed=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, writer, FailAfter()],
    )
    FailAfter.at = fail_after
    try:
        trainer.predict(module, datamodule=data, return_predictions=False)
    finally:
        FailAfter.at = None
    return directory


@pytest.mark.parametrize("k", [1, 3, 5])
def test_a_run_that_failed_after_k_batches_resumes_to_the_uninterrupted_bytes(module, tmp_path, k):
    whole = _run(module, tmp_path / "whole", [Prototypes()])
    with pytest.raises(RuntimeError, match="crash"):
        _run(module, tmp_path / "stopped", [Prototypes()], fail_after=k)
    progress = json.loads((tmp_path / "stopped" / "progress.json").read_text())
    # a small state is saved with most batches (how often depends on the save's time against the batches')
    assert len(progress["batches"]) == k and 1 <= progress["stream_state"]["batches"] <= k
    assert [p.name for p in (tmp_path / "stopped").glob("stream_state-*")] == [progress["stream_state"]["file"]]
    _run(module, tmp_path / "stopped", [Prototypes()])
    assert (tmp_path / "stopped" / "predictions.csv").read_bytes() == (whole / "predictions.csv").read_bytes()
    # a state file changed since it was saved is refused, never used
    changed = tmp_path / "changed"
    with pytest.raises(RuntimeError, match="crash"):
        _run(module, changed, [Prototypes()], fail_after=k)
    state_file = changed / json.loads((changed / "progress.json").read_text())["stream_state"]["file"]
    data = bytearray(state_file.read_bytes())
    data[-1] ^= 1
    state_file.write_bytes(bytes(data))
    with pytest.raises(RunFolderError, match="state changed since it was saved"):
        _run(module, changed, [Prototypes()])


def test_a_missing_state_or_a_leftover_of_a_kill_is_handled(module, tmp_path):
    stopped = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="crash"):
        _run(module, stopped, [Prototypes()], fail_after=2)
    # a kill between the next state's write and progress.json leaves a file progress.json does not name
    (stopped / "stream_state-0000003.safetensors").write_bytes(b"half")
    (stopped / "stream_state-0000003.safetensors.tmp").write_bytes(b"half")
    whole = _run(module, tmp_path / "whole", [Prototypes()])
    _run(module, stopped, [Prototypes()])
    assert (stopped / "predictions.csv").read_bytes() == (whole / "predictions.csv").read_bytes()
    assert len(list(stopped.glob("stream_state-*"))) == 1
    again = tmp_path / "again"
    with pytest.raises(RuntimeError, match="crash"):
        _run(module, again, [Prototypes()], fail_after=2)
    (again / json.loads((again / "progress.json").read_text())["stream_state"]["file"]).unlink()
    with pytest.raises(RunFolderError, match=r"cannot read .*restore it, or move"):
        _run(module, again, [Prototypes()])


@pytest.mark.parametrize("change", [{"batch_size": 4}, {"stream": "sorted"}])
def test_a_rerun_with_another_stream_order_or_batch_size_is_refused(module, tmp_path, change):
    """Which samples a state has seen depends on the order and the cut into batches: a folder of
    another order or batch size is another run."""
    with pytest.raises(RuntimeError, match="crash"):
        _run(module, tmp_path, [Prototypes()], fail_after=2)
    with pytest.raises(RunFolderError, match="different run"):
        _run(module, tmp_path, [Prototypes()], **change)


def test_a_state_saved_less_often_than_the_batches_resumes_after_it(module, tmp_path, monkeypatch):
    """A state too slow to save with every batch (here: any state) is saved with the first batch, before
    a stop and with the last; a crash after batch 4 resumes after batch 1, the rows of batches 2-4 are
    dropped and redone, and the bytes are an uninterrupted run's."""
    import tta.callbacks.writer as writer

    monkeypatch.setattr(writer, "STATE_SAVE_SHARE", 1e-12)
    whole = _run(module, tmp_path / "whole", [Prototypes()])
    assert json.loads((whole / "progress.json").read_text())["stream_state"]["batches"] == 6  # the last
    stopped = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="crash"):
        _run(module, stopped, [Prototypes()], fail_after=4)
    progress = json.loads((stopped / "progress.json").read_text())
    assert len(progress["batches"]) == 4 and progress["stream_state"]["batches"] == 1
    _run(module, stopped, [Prototypes()])
    assert (stopped / "predictions.csv").read_bytes() == (whole / "predictions.csv").read_bytes()
    assert (stopped / "timing.csv").read_text().count("\n") == 17  # header + 16 rows: none twice


@pytest.mark.parametrize("method", ["TDA", "BoostAdapter", "DMN", "DOTA", "DPE"])
def test_each_online_method_resumes_a_crashed_run_to_the_uninterrupted_bytes(module, tmp_path, method):
    """Each method's own state (caches, memory, Gaussians, prototypes) through the writer: a run that
    crashed after 3 batches, rerun, writes the bytes of an uninterrupted run, on 10 views each."""
    import tta.callbacks as callbacks

    def make():
        return getattr(callbacks, method)(n_views=10, seed=0)

    whole = _run(module, tmp_path / "whole", [make()])
    stopped = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="crash"):
        _run(module, stopped, [make()], fail_after=3)
    _run(module, stopped, [make()])
    assert (stopped / "predictions.csv").read_bytes() == (whole / "predictions.csv").read_bytes()
