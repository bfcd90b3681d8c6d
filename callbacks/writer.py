"""Write ``predictions.csv`` as batches finish and ``metrics.json`` at the end of ``predict``."""

from __future__ import annotations

import csv
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from typing_extensions import override

from tta.metrics import summarize

COLUMNS = ("index", "domain", "label", "pred", "confidence", "pred_zs", "confidence_zs", "ms", "adapt_ms")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated on the device since ``predict`` started. CPU: the process's peak
    resident set size (a high-water mark over the process's life, libraries included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class PredictionWriter(pl.Callback):
    """One CSV row per sample, appended and flushed batch by batch; metrics at the end.

    Rows are written when the *next* batch starts (or ``predict`` ends), so every callback's
    changes to the batch's outputs are in, whatever the order of the callback list. ``ms`` is
    the batch's wall time per sample, from its start to the next batch's start (data loading,
    adaptation and prediction included, this writer's own I/O excluded); ``adapt_ms`` the
    part of it spent in TTA callbacks (empty without one).

    ``metrics.json`` holds ``method`` (the TTA callbacks' ``method_name`` joined by "+", or
    "none"), ``model``, ``data``, ``seed``, ``n``, ``accuracy``, ``ece``, ``ms_per_sample``,
    ``adapt_ms_per_sample``, ``peak_mem_mb``, ``skipped_images`` (images the datamodule could not
    decode and left out; 0 for datamodules that do not count them) and ``domains`` (per domain ``n``, ``accuracy``, ``ece``).
    """

    def __init__(self, output_dir: str | Path = ".", seed: int | None = None) -> None:
        super().__init__()
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.metrics: dict[str, Any] | None = None
        self._pending: tuple[dict, float] | None = None
        self._file = None
        self._writer = None

    @property
    def predictions_path(self) -> Path:
        return self.output_dir / "predictions.csv"

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.json"

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._file = open(self.predictions_path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._writer.writeheader()
        self._pending = None

    @override
    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        now = time.perf_counter()
        self._flush(now)
        self._pending = (None, now)

    @override
    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                             batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._pending = (outputs, self._pending[1])

    @override
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(time.perf_counter())

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._file.close()
        self.metrics = self._compute_metrics(trainer, pl_module)
        self.metrics_path.write_text(json.dumps(self.metrics, indent=2) + "\n")

    def _flush(self, now: float) -> None:
        if self._pending is None or self._pending[0] is None:
            return
        outputs, started = self._pending
        self._pending = None
        n = len(outputs["index"])
        if n == 0:  # every image of the batch failed to decode (counted by the datamodule)
            return
        ms = (now - started) * 1000 / n
        probs = outputs["probs"].detach().float().cpu()
        confidence, pred = probs.max(-1)
        zs = outputs.get("probs_zs")
        confidence_zs, pred_zs = zs.detach().float().cpu().max(-1) if zs is not None else (None, None)
        adapt_ms = outputs.get("adapt_ms")
        for i in range(n):
            self._writer.writerow({
                "index": int(outputs["index"][i]), "domain": outputs["domain"][i],
                "label": int(outputs["label"][i]), "pred": int(pred[i]),
                "confidence": f"{confidence[i]:.6f}",
                "pred_zs": "" if pred_zs is None else int(pred_zs[i]),
                "confidence_zs": "" if confidence_zs is None else f"{confidence_zs[i]:.6f}",
                "ms": f"{ms:.4f}",
                "adapt_ms": "" if adapt_ms is None else f"{float(adapt_ms[i]):.4f}",
            })
        self._file.flush()

    def _compute_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        rows = read_predictions(self.predictions_path)
        methods = [c.method_name for c in trainer.callbacks if hasattr(c, "method_name")]
        datamodule = trainer.datamodule
        metrics = {
            "method": "+".join(methods) or "none",
            "model": getattr(pl_module, "model_name", type(pl_module).__name__),
            "data": getattr(datamodule, "name", type(datamodule).__name__),
            "seed": self.seed,
        }
        metrics.update(summarize([r["pred"] for r in rows], [r["label"] for r in rows],
                                 [r["confidence"] for r in rows], [r["domain"] for r in rows]))
        metrics["ms_per_sample"] = sum(r["ms"] for r in rows) / max(1, len(rows))
        metrics["adapt_ms_per_sample"] = sum(r["adapt_ms"] for r in rows) / max(1, len(rows))
        metrics["peak_mem_mb"] = peak_memory_mb(pl_module.device)
        metrics["skipped_images"] = int(getattr(datamodule, "skipped_images", 0))
        domains = metrics.pop("domains")
        for name, values in domains.items():
            picked = [r["ms"] for r in rows if r["domain"] == name]
            values["ms_per_sample"] = sum(picked) / len(picked)
        metrics["domains"] = domains
        return metrics


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``predictions.csv`` with numbers parsed."""
    with open(path, newline="") as f:
        return [{"index": int(r["index"]), "domain": r["domain"], "label": int(r["label"]),
                 "pred": int(r["pred"]), "confidence": float(r["confidence"]), "ms": float(r["ms"]),
                 "adapt_ms": float(r["adapt_ms"] or 0.0)}
                for r in csv.DictReader(f)]
