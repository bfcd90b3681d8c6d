"""The shared bases of the TTA callbacks: all Lightning plumbing, no method math.

``TTACallback`` owns the output replacement and timing of every method; ``EpisodicTTA`` adds
what per-sample methods need, so that a method only writes :meth:`EpisodicTTA.adapt`:

- gradients inside ``Trainer.predict``: Lightning runs prediction under
  ``torch.inference_mode()``; the base runs the method under ``inference_mode(False)`` and
  ``enable_grad()`` on cloned inputs, and builds method state (prompt learners, bases) outside
  inference mode too, so the default ``Trainer(inference_mode=True)`` works;
- autocast matching the trainer's precision (Lightning's own autocast covers ``predict_step``
  only); learnable tensors are created in fp32 by the methods;
- episodic reset: every batch starts from fresh method state (nothing is carried from one
  sample to the next) and the user's model is never an optimizer's parameter;
- per-sample seeds: sample ``i`` of run seed ``s`` draws its views from its own generator,
  seeded from ``(s, i)``, so its prediction does not depend on batch size, composition or order;
- views on the device, cropped from the batch's ``original`` images (the images as loaded, as
  the reference crops them) with the model's input ``image`` as view 0, encoded once per chunk
  of ``images_per_step`` images;
- the view-feature store (``view_store``, :mod:`tta.view_store`): a sample's view features are read
  from the store when an earlier run with the same key wrote them, else made, encoded and written;
- one loss scaler for the whole ``predict`` under fp16 autocast, as the reference keeps one
  ``GradScaler(init_scale=1000)`` for its run;
- outputs: the adapted ``logits``/``probs`` replace the module's in the dict that ``predict``
  returns and writers see; the unadapted ones stay as ``logits_zs``/``probs_zs``;
  ``adapt_ms`` (B) holds each sample's share of the adaptation wall time.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import move_data_to_device
from typing_extensions import override

from tta.augment import VIEW_KINDS, make_views
from tta.datamodules.preprocess import ORIGINAL
from tta.fingerprint import weights_fingerprint
from tta.validation import OptionError, check_finite, check_number
from tta.view_store import ViewFeatureStore, sample_digest, split_hits

log = logging.getLogger(__name__)

#: trainer.precision -> autocast dtype; "-true" precisions cast the weights instead.
AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def seed_in_force() -> int | None:
    """The global seed that ``pytorch_lightning.seed_everything`` set in this process (``None``: not
    called): what callbacks whose own ``seed`` is ``None`` draw from."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None and seed.lstrip("-").isdigit() else None


def sample_seed(run_seed: int, index: int) -> int:
    """The seed of one sample's randomness: a function of the run seed and the sample index only."""
    return (int(run_seed) * 1_000_003 + int(index)) % (2**63 - 1)


class TTACallback(pl.Callback):
    """Base of every TTA callback: timing and the replacement of the module's outputs.

    Subclasses implement :meth:`process_batch`, which returns the batch's adapted logits; the
    base writes them into the output dict in place (``logits``, ``probs``), keeps the first
    unadapted ones (``logits_zs``, ``probs_zs``) when methods are stacked, and adds each
    sample's share of the wall time to ``adapt_ms``. Callbacks run in list order, so a stack
    such as ``[STS, LAME]`` hands STS's outputs to LAME.

    Logits that are NaN or infinite stop the run (:class:`~tta.validation.NonFiniteError`) with
    one line naming the method, the batch, the samples and the method's ``likely_settings``
    (e.g. TPT's ``lr``), before any of the batch's rows are written. A ``batch_level`` method
    (one that adapts each batch as a whole, LAME) says at the start when the stream is i.i.d.,
    where it is not meant to help.
    """

    method_name = "tta"
    #: The options that most likely made non-finite logits (named in the error).
    likely_settings: tuple[str, ...] = ()
    #: Whether the method adapts each batch as a whole (its result depends on the stream's order).
    batch_level = False

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if self.batch_level and getattr(datamodule, "stream", None) == "iid":
            log.warning(
                "note: %s adapts each batch of %s samples as one neighbourhood and is meant for non-i.i.d. "
                "streams; on this i.i.d. stream (data.stream=iid) it usually lowers accuracy: see data.stream "
                "(sorted, dirichlet)",
                self.method_name,
                getattr(datamodule, "batch_size", "?"),
            )

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
        if n == 0:  # every image of the batch failed to decode: nothing to adapt
            return
        device = pl_module.device
        self._synchronize(device)
        start = time.perf_counter()
        logits = self.process_batch(pl_module, outputs, batch)
        self._synchronize(device)
        elapsed_ms = (time.perf_counter() - start) * 1000
        check_finite(logits, batch["index"], self.method_name, trainer, batch_idx, self.non_finite_hint())
        outputs.setdefault("logits_zs", outputs["logits"])
        outputs.setdefault("probs_zs", outputs["probs"])
        outputs["logits"] = logits.detach().to(outputs["logits"].dtype)
        outputs["probs"] = logits.detach().float().softmax(-1)
        outputs["adapt_ms"] = outputs.get("adapt_ms", torch.zeros(n)) + elapsed_ms / n

    def process_batch(
        self, pl_module: pl.LightningModule, outputs: dict[str, Any], batch: dict[str, Any]
    ) -> torch.Tensor:
        """The batch's adapted logits (``B x C``)."""
        raise NotImplementedError

    def non_finite_hint(self) -> str:
        """What to change when the method's logits are not finite."""
        settings = " or ".join(
            f"{name} (now {getattr(self, name)!r}; tta.callbacks.{self.method_name}.{name})"
            for name in self.likely_settings
        )
        if settings:
            return f"lower {settings}, or run in full precision (trainer.precision=32-true)"
        return "run in full precision (trainer.precision=32-true), or check the model's weights"

    @staticmethod
    def _synchronize(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


class EpisodicTTA(TTACallback):
    """Base of per-sample (episodic) TTA callbacks; subclasses implement :meth:`adapt`.

    Args:
        n_views: views per image, the original included (1: the original only).
        views: ``"crop_flip"`` (ImageNet-type protocol) or ``"augmix"`` (fine-grained).
        images_per_step: images adapted together (memory bound; results do not depend on it).
        view_batch_size: views per image-tower call (speed only: a few dozen suit CPUs,
            several hundred suit GPUs).
        seed: run seed for the per-sample views; ``None`` takes the seed of
            ``pytorch_lightning.seed_everything`` (0 if it was not called).
        view_store: folder of the view-feature store (:mod:`tta.view_store`; ``None``: encode the
            views in every run). It never changes a prediction, so it is not part of the run key.
    """

    method_name = "episodic"
    #: The store's folder cannot change the rows (the store verifies what it returns): not in the run key.
    argument_attributes: dict[str, str | None] = {"view_store": None}

    def __init__(
        self,
        n_views: int = 64,
        views: str = "crop_flip",
        images_per_step: int = 16,
        view_batch_size: int = 64,
        seed: int | None = None,
        view_store: str | None = None,
    ) -> None:
        super().__init__()
        check_number("n_views", n_views, 1, integer=True)  # the original image counts as one
        if views not in VIEW_KINDS:
            raise OptionError("views", f"must be one of {VIEW_KINDS}, got {views!r}")
        check_number("images_per_step", images_per_step, 1, integer=True)
        check_number("view_batch_size", view_batch_size, 1, integer=True)
        check_number("seed", seed, integer=True, optional=True)
        self.n_views, self.views, self.images_per_step, self.seed = n_views, views, images_per_step, seed
        self.view_batch_size, self.view_store = view_batch_size, view_store
        #: The run's open store (``None`` without ``view_store``), opened at ``on_predict_start``.
        self.store: ViewFeatureStore | None = None
        self._run_seed = 0
        self._autocast_dtype: torch.dtype | None = None
        #: The run's loss scaler under fp16 autocast (None otherwise), made at ``on_predict_start``.
        self.grad_scaler: torch.amp.GradScaler | None = None

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        if not hasattr(pl_module, "vlm") or not hasattr(pl_module, "text_features"):
            raise TypeError(
                f"{type(self).__name__} adapts a vision-language classifier: use "
                f"tta.tasks.ZeroShotClassifier (got {type(pl_module).__name__})"
            )
        self._autocast_dtype = AUTOCAST_DTYPES.get(str(trainer.precision))
        self._run_seed = self.seed if self.seed is not None else seed_in_force() or 0
        # one scaler for the run, as the reference: its scale moves with the inf/NaN steps it sees
        self.grad_scaler = (
            torch.amp.GradScaler(pl_module.device.type, init_scale=1000)
            if self._autocast_dtype is torch.float16
            else None
        )
        self.store = self.open_view_store(trainer, pl_module)
        with torch.inference_mode(False):
            self.setup_method(pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.store is not None:
            log.info("%s: %s", self.method_name, self.store.summary())

    def open_view_store(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ViewFeatureStore | None:
        """The store of this run's views (``None`` without ``view_store``, or without a datamodule to
        name the data set by), its key holding everything that changes a view's features."""
        if self.view_store is None:
            return None
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            log.info("%s: no datamodule names the data set, so the view store is not used", self.method_name)
            return None
        from tta.callbacks.writer import object_settings  # the writer imports this module

        # options that only order or batch the samples stay out: runs that differ in them share views
        ordering = getattr(datamodule, "ordering_options", ())
        data = {k: v for k, v in object_settings(datamodule).items() if k not in ordering}
        content = getattr(datamodule, "content_fingerprint", None)
        vlm = pl_module.vlm
        key = {
            "weights": weights_fingerprint(vlm),
            "normalisation": {"mean": vlm.mean.flatten().tolist(), "std": vlm.std.flatten().tolist()},
            "image_size": list(vlm.image_size),
            "data": {"settings": data, "files": content() if callable(content) else None},
            "views": {"kind": self.views, "n_views": self.n_views},
            "seed": self._run_seed,
            "precision": str(trainer.precision),
            "device": pl_module.device.type,
        }
        return ViewFeatureStore(self.view_store, key)

    @override
    def process_batch(
        self, pl_module: pl.LightningModule, outputs: dict[str, Any], batch: dict[str, Any]
    ) -> torch.Tensor:
        if ORIGINAL not in batch:
            raise KeyError(
                f"{type(self).__name__} crops its views from the images as loaded: the batch needs "
                "'original' (a list of the B images as decoded, uint8 3 x H x W) beside 'image', as every "
                "classification datamodule of tta.datamodules yields"
            )
        indices = batch["index"].tolist()
        seeds = [sample_seed(self._run_seed, i) for i in indices]
        step = self.images_per_step
        originals = batch[ORIGINAL]
        with torch.inference_mode(False), torch.enable_grad():
            images = batch["image"].clone()
            return torch.cat(
                [
                    self.adapt(
                        pl_module,
                        self.encode_views(
                            pl_module,
                            originals[i : i + step],
                            images[i : i + step],
                            seeds[i : i + step],
                            indices[i : i + step],
                        ),
                    )
                    for i in range(0, len(seeds), step)
                ]
            )

    def setup_method(self, pl_module: pl.LightningModule) -> None:
        """Build method state that lives for the whole ``predict`` (runs outside inference mode)."""

    def adapt(self, pl_module: pl.LightningModule, view_features: torch.Tensor) -> torch.Tensor:
        """Adapted logits (``B x C``) from ``B x V x D`` normalised view features (view 0 the original)."""
        raise NotImplementedError

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """Autocast matching the trainer's precision, for use inside :meth:`adapt`."""
        if self._autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self._autocast_dtype)

    @torch.no_grad()
    def encode_views(
        self,
        pl_module: pl.LightningModule,
        originals: list[torch.Tensor],
        images: torch.Tensor,
        seeds: list[int],
        indices: list[int],
    ) -> torch.Tensor:
        """``B x V x D`` normalised image features of the views: view 0 the model's input ``images``,
        the others cropped from ``originals``; read from the view store where it has them, the
        others made and encoded in one image-tower pass (and written to the store)."""
        dtype = self._autocast_dtype or torch.float32
        if self.store is None:
            return self._encode(pl_module, originals, images, seeds, dtype)
        digests = [sample_digest(original) for original in originals]
        found, missing = split_hits(self.store, indices, digests, self.n_views, dtype)
        if missing:
            encoded = self._encode(
                pl_module, [originals[m] for m in missing], images[missing], [seeds[m] for m in missing], dtype
            )
            for m, features in zip(missing, encoded):
                self.store.write(indices[m], digests[m], features)
                found[m] = features
        return torch.stack([found[position].to(images.device) for position in range(len(seeds))])

    def _encode(
        self,
        pl_module: pl.LightningModule,
        originals: list[torch.Tensor],
        images: torch.Tensor,
        seeds: list[int],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        views = make_views(originals, images, self.n_views, seeds, self.views)
        with self.autocast(images.device):
            features = pl_module.vlm.encode_image(views.flatten(0, 1), batch_size=self.view_batch_size)
        # kept in the autocast dtype, which the logits' matmuls cast them to anyway (fp32 without autocast)
        return features.to(dtype).view(len(seeds), self.n_views, -1)


class SetTTA(pl.Callback):
    """Base of set-level TTA callbacks (TTM): the method sees the whole prediction set first.

    No prediction is final before :meth:`fit` ends: at ``on_predict_start`` the base reads the
    whole prediction set once (the datamodule's ``whole_set_dataloader()`` where it has one, so
    that every DDP rank and a resumed run see every sample; else the trainer's predict
    dataloaders), moves the batches to the module's device and hands them to :meth:`fit`
    outside inference mode, with gradients enabled; ``predict`` then runs as usual, seeing
    whatever :meth:`fit` changed (an adapted copy of the model, swapped in by the subclass and
    swapped back in :meth:`restore`, which runs at ``on_predict_end`` and on exceptions).
    """

    method_name = "set"

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        whole_set = getattr(trainer.datamodule, "whole_set_dataloader", None)
        loaders = [whole_set()] if whole_set is not None else trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        with torch.inference_mode(False), torch.enable_grad():
            batches = [move_data_to_device(batch, pl_module.device) for loader in loaders for batch in loader]
            self.fit(trainer, pl_module, batches)

    def fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[dict[str, Any]]) -> None:
        """Adapt on the whole prediction set (``batches``: every batch of every predict dataloader)."""
        raise NotImplementedError

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.restore(pl_module)

    def restore(self, pl_module: pl.LightningModule) -> None:
        """Give the module back its original model (idempotent)."""
