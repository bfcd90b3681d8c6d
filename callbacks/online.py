"""The base of online (stream) TTA callbacks: state carried from one sample to the next, saved per batch.

``OnlineTTA`` adds to :class:`~tta.callbacks.base.EpisodicTTA`'s views what a method that learns
from the stream needs, so that a method only writes :meth:`OnlineTTA.new_state`:

- stream order: the batch's samples go one at a time, in the order the stream presents them,
  through the method's state (:class:`tta.methods.online.OnlineMethod`), each predicted from the
  state so far and the state then updated in the method's own order; the results do not depend
  on the batch size;
- one state per domain: a sample from another domain than the one before starts a fresh state,
  as the references run one data set at a time; ``continual=True`` carries it across domains;
- state that survives a stop: :meth:`stream_state` is what the prediction writer saves with each
  finished batch (``tta.run_folder``: atomically, its checksum in ``progress.json``), and
  :meth:`resume_stream_state` what it hands back when a rerun resumes after those batches, so
  the resumed run writes the rows an uninterrupted run writes;
- one process: under DDP each process would see every ``world_size``-th batch of the stream and
  learn from a different stream than a one-device run; such a run is refused (predict on one
  device).

The view features come from the shared view encoder (per-sample seeds, the view store), so an
online method's views are those of the episodic methods with the same recipe.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
from typing_extensions import override

from tta.callbacks.base import EpisodicTTA
from tta.methods.online import OnlineMethod
from tta.validation import OptionError

log = logging.getLogger(__name__)

#: The base's own entries in :meth:`OnlineTTA.stream_state` (the method's are prefixed "state.").
SEEN, DOMAIN = "seen", "domain"


def check_confident_views(n_views: int, fraction: float) -> None:
    """Refuse a number of views of which ``int(fraction * n_views)`` most confident would be none (the
    references average the kept views: over none, NaN); 1 (the original alone) is always fine."""
    if n_views > 1 and int(n_views * fraction) < 1:
        least = math.ceil(1 / fraction)
        raise OptionError(
            "n_views",
            f"must be 1 (the original alone) or at least {least} (the {fraction:.0%} most confident views are "
            f"averaged: int({fraction} * n_views) of them), got {n_views}",
        )


class OnlineTTA(EpisodicTTA):
    """Base of online TTA callbacks; subclasses implement :meth:`new_state`.

    Args:
        continual: carry the state from one domain to the next (default: a fresh state per
            domain, as the references run each data set on its own).
        n_views, views, images_per_step, view_batch_size, seed, view_store: as
            :class:`~tta.callbacks.base.EpisodicTTA` (``n_views=1``: the original image only).
    """

    method_name = "online"

    def __init__(
        self,
        continual: bool = False,
        n_views: int = 1,
        views: str = "augmix",
        images_per_step: int = 16,
        view_batch_size: int = 64,
        seed: int | None = None,
        view_store: str | None = None,
    ) -> None:
        super().__init__(
            n_views=n_views,
            views=views,
            images_per_step=images_per_step,
            view_batch_size=view_batch_size,
            seed=seed,
            view_store=view_store,
        )
        if not isinstance(continual, bool):
            raise OptionError("continual", f"must be true or false, got {continual!r}")
        self.continual = continual
        #: The state of the stream so far (``None`` before the first sample).
        self.state: OnlineMethod | None = None
        #: The domain of the last sample seen, and how many samples the stream has shown.
        self.domain: str | None = None
        self.seen = 0
        #: ``state.size()`` after each sample of this session (for reports of the cache's growth).
        self.sizes: list[int] = []
        #: This session's wall time (ms) in the views' encoding and in the method's own steps.
        self.encode_ms = self.method_ms = 0.0
        self._pending_state: dict[str, Any] | None = None

    def new_state(self, pl_module: pl.LightningModule) -> OnlineMethod:
        """A fresh state for a new stream (a new domain)."""
        raise NotImplementedError

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict":
            self.check_one_process(trainer.world_size)

    def check_one_process(self, world_size: int) -> None:
        """Refuse a run on several processes (DDP), naming the fix (``tta-predict`` asks before it
        launches them)."""
        if world_size > 1:
            raise OptionError(
                "trainer.devices",
                f"is {world_size} processes, but {type(self).__name__} learns from the stream in its order and "
                "each process would see only every other batch of it: predict on one device (trainer.devices=1, "
                "or trainer=cpu / trainer=gpu)",
            )

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self.state, self.domain, self.seen, self.sizes = None, None, 0, []
        self.encode_ms = self.method_ms = 0.0
        if self._pending_state is not None:
            with torch.inference_mode(False):  # the state's tensors are updated in place later, outside it
                self._restore(pl_module, self._pending_state)
            self._pending_state = None

    @override
    def process_batch(
        self, pl_module: pl.LightningModule, outputs: dict[str, Any], batch: dict[str, Any]
    ) -> torch.Tensor:
        indices = batch["index"].tolist()
        domains = list(batch.get("domain") or [""] * len(indices))
        device = pl_module.device
        start = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():
            if self.n_views == 1:  # the original alone: the features the model's forward computed
                if "image_features" not in outputs:
                    raise KeyError(
                        f"{type(self).__name__} with n_views=1 reads the batch's image features: "
                        f"{type(pl_module).__name__}.predict_step must return 'image_features' (B x D), as "
                        "ZeroShotClassifier does"
                    )
                features = outputs["image_features"].detach().clone().unsqueeze(1)
            else:
                features = super().process_batch(pl_module, outputs, batch)
            self._synchronize(device)
            encoded = time.perf_counter()
            logits = []
            for position, domain in enumerate(domains):
                if self.state is None or (domain != self.domain and not self.continual):
                    self.state = self.new_state(pl_module)
                self.domain = domain
                logits.append(self.state.step(features[position]))
                self.seen += 1
                self.sizes.append(self.state.size())
            logits = torch.stack(logits)
            self._synchronize(device)
        self.encode_ms += (encoded - start) * 1000
        self.method_ms += (time.perf_counter() - encoded) * 1000
        return logits

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_predict_end(trainer, pl_module)
        if self.sizes:
            n = len(self.sizes)
            log.info(
                "%s: %d samples; its own work %.3f ms a sample, the views' encoding %.3f ms; state size: mean %.1f "
                "over the stream, %d at the end",
                self.method_name,
                n,
                self.method_ms / n,
                self.encode_ms / n,
                sum(self.sizes) / n,
                self.sizes[-1],
            )

    @override
    def adapt(self, pl_module: pl.LightningModule, view_features: torch.Tensor) -> torch.Tensor:
        # the views of a chunk, handed back to process_batch, which walks them through the state
        return view_features

    def stream_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What a resume needs: the method state's tensors (``state.`` prefixed) with the samples seen,
        and the last sample's domain (text)."""
        tensors = {SEEN: torch.tensor(self.seen, dtype=torch.int64)}
        if self.state is not None:
            tensors.update({f"state.{k}": v.detach().cpu().contiguous() for k, v in self.state.state_dict().items()})
        return tensors, {DOMAIN: self.domain if self.domain is not None else ""}

    def resume_stream_state(self, tensors: dict[str, torch.Tensor], text: dict[str, str]) -> None:
        """Continue from :meth:`stream_state`'s output (applied at ``on_predict_start``, once the model
        the state is built from is known)."""
        self._pending_state = {"tensors": tensors, "text": text}

    def _restore(self, pl_module: pl.LightningModule, saved: dict[str, Any]) -> None:
        tensors, text = saved["tensors"], saved["text"]
        self.seen = int(tensors[SEEN])
        method = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
        if method:
            self.state = self.new_state(pl_module)
            self.state.load_state_dict({k: v.to(pl_module.device) for k, v in method.items()})
            self.domain = text.get(DOMAIN, "")
