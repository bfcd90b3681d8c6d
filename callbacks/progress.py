"""A rich progress bar for ``predict`` that shows the running metrics of the rows written."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from typing_extensions import override

from tta.callbacks.writer import PredictionWriter


class TTAProgressBar(RichProgressBar):
    """Lightning's rich bar, its prediction line followed by the running means that the
    trainer's :class:`PredictionWriter` keeps (the task's ``progress_values``: for classifiers
    the accuracy of the labelled samples written so far, e.g. ``Predicting · acc 54.3%``).

    Under DDP the bar is rank 0's, and so are its running values; ``metrics.json`` holds them all.
    """

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._show_running_values(trainer)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the writer writes a batch's rows when the next one starts, the last batch's at the
        # epoch's end: show the final values, equal to metrics.json's
        self._show_running_values(trainer)
        super().on_predict_end(trainer, pl_module)

    def _show_running_values(self, trainer: pl.Trainer) -> None:
        if self.is_disabled or self.predict_progress_bar_id is None:
            return
        writers = [c for c in trainer.callbacks if isinstance(c, PredictionWriter)]
        if writers and writers[0].progress:
            running = " ".join(f"{name} {100 * value:.1f}%" for name, value in writers[0].progress.items())
            self.progress.update(self.predict_progress_bar_id, description=f"{self.predict_description} · {running}")
            self.refresh()
