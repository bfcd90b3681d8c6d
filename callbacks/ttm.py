"""TTM as a Lightning callback: fit on the whole prediction set, then predict with the adapted copy."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytorch_lightning as pl
import torch
from typing_extensions import override

from tta.callbacks.base import SetTTA
from tta.methods.ttm import LOSSES, RoundLog, TestTimeMatching, TTMSchedule
from tta.status import SlowStep
from tta.validation import OptionError, check_number


class TTM(SetTTA):
    """Test-time matching (see ``tta.methods.ttm``) for a :class:`~tta.tasks.GroupScorer`.

    At ``on_predict_start`` the whole prediction set (every group of the predict dataloader) is
    read once and TTM's rounds run on a deep copy of the module's ``vlm``; the copy is swapped in
    for the prediction and the user's model is swapped back at ``on_predict_end`` (unchanged).
    The output dict of every batch gains ``scores_zs`` (the unadapted scores, from the first
    round's scoring), ``adapt_ms`` and ``fit_ms`` (each group's share of the whole fit's wall
    time: the fit runs before the first batch, so the writer adds ``fit_ms`` to the batch's ``ms``); the
    rounds' logs (threshold, pseudo-labels, their precision, steps, loss, seconds) are kept in
    ``ttm_rounds``.

    Args: the round schedule (:class:`~tta.methods.ttm.TTMSchedule`; defaults are the reference
    Winoground schedule for SigLIP-B16), ``loss`` ("auto": sigmoid for models with a logit bias,
    else InfoNCE), ``seed`` (batch order), ``encode_batch_size`` (images per tower call when
    scoring the set), ``unchosen_negatives`` (1 x k items: the options the pseudo-label did not
    choose as extra negatives; off, as the reference).
    """

    method_name = "ttm"
    #: The schedule's arguments are kept in ``schedule`` (for the run key).
    argument_attributes = {field.name: f"schedule.{field.name}" for field in dataclasses.fields(TTMSchedule)}

    def __init__(
        self,
        rounds: int = 10,
        tau_max: float = 2.0,
        epochs: int = 30,
        groups_per_batch: int = 50,
        lr: float = 1e-5,
        lr_decay: float = 0.95,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.05,
        loss: str = "auto",
        seed: int = 0,
        encode_batch_size: int = 256,
        unchosen_negatives: bool = False,
    ) -> None:
        super().__init__()
        self.schedule = TTMSchedule(
            rounds=rounds,
            tau_max=tau_max,
            epochs=epochs,
            groups_per_batch=groups_per_batch,
            lr=lr,
            lr_decay=lr_decay,
            min_lr_ratio=min_lr_ratio,
            weight_decay=weight_decay,
        )
        if loss not in LOSSES:
            raise OptionError("loss", f"must be one of {LOSSES}, got {loss!r}")
        check_number("seed", seed, integer=True)
        check_number("encode_batch_size", encode_batch_size, 1, integer=True)
        self.loss, self.seed, self.encode_batch_size = loss, int(seed), int(encode_batch_size)
        self.unchosen_negatives = bool(unchosen_negatives)
        self.ttm_rounds: list[dict[str, Any]] = []
        self.fit_seconds = 0.0
        self._original: torch.nn.Module | None = None
        self._scores_zs: dict[int, torch.Tensor] = {}
        self._n_groups = 0

    @override
    def fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[dict[str, Any]]) -> None:
        if not hasattr(pl_module, "vlm") or any("images" not in b for b in batches):
            raise TypeError(
                f"TTM adapts a group scorer on group batches: use tta.tasks.GroupScorer with a "
                f"datamodule from tta.datamodules.compositional (got {type(pl_module).__name__})"
            )
        batches = [b for b in batches if len(b["index"])]
        if not batches:
            return
        start = time.perf_counter()
        images = torch.cat([b["images"] for b in batches])
        captions = [list(c) for b in batches for c in b["captions"]]
        index = torch.cat([b["index"] for b in batches]).tolist()
        matching = TestTimeMatching(
            pl_module.vlm, self.schedule, self.loss, self.seed, self.encode_batch_size, self.unchosen_negatives
        )
        self._scores_zs = dict(zip(index, matching.score_groups(images, captions)))
        what = f"ttm: self-training on {len(index)} groups before predicting"
        with SlowStep(what, total=self.schedule.rounds, unit="rounds") as step:

            def on_round(log: RoundLog) -> None:
                step.advance(note=f"round {log.round + 1}: {log.selected} pseudo-labelled groups, {log.seconds:.1f} s")

            rounds = matching.fit_groups(images, captions, on_round)
        self.ttm_rounds = [dataclasses.asdict(r) for r in rounds]
        self.fit_seconds = time.perf_counter() - start
        self._n_groups = len(index)
        self._original = pl_module.vlm
        pl_module.vlm = matching.vlm

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: dict[str, Any],
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        n = len(batch["index"])
        if n == 0 or not self._scores_zs:
            return
        outputs["scores_zs"] = torch.stack([self._scores_zs[i] for i in batch["index"].tolist()]).to(
            outputs["scores"].device
        )
        share = torch.full((n,), 1000 * self.fit_seconds / self._n_groups)
        outputs["adapt_ms"] = outputs.get("adapt_ms", torch.zeros(n)) + share
        outputs["fit_ms"] = outputs.get("fit_ms", torch.zeros(n)) + share

    @override
    def restore(self, pl_module: pl.LightningModule) -> None:
        if self._original is not None:
            pl_module.vlm = self._original
            self._original = None
        self._scores_zs = {}
