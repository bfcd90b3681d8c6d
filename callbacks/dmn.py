"""DMN-ZS as a callback: a per-class memory of test features, read by attention; no backward pass."""

from __future__ import annotations

import pytorch_lightning as pl
from typing_extensions import override

from tta.callbacks.online import OnlineTTA
from tta.methods.dmn import DMNState
from tta.validation import OptionError, check_number


class DMN(OnlineTTA):
    """The training-free dynamic memory network, zero-shot (defaults as the reference's ImageNet
    run, ``scripts/run.sh`` and ``dmn_main.py``: 32 views, crop-and-flip on the ImageNet family,
    the 10% most confident give the pseudo-label, 50 slots a class, attention sharpness ``beta``
    5.5, memory probabilities weighted 1.0). See :mod:`tta.methods.dmn`.

    ``memory_weight`` is the reference's searched ``beta2`` (per data set: the cards carry it);
    ``selection`` must keep at least one view (``int(n_views * selection) >= 1``).
    """

    method_name = "dmn"

    def __init__(
        self,
        memory_size: int = 50,
        beta: float = 5.5,
        memory_weight: float = 1.0,
        selection: float = 0.1,
        continual: bool = False,
        n_views: int = 32,
        views: str = "crop_flip",
        images_per_step: int = 16,
        view_batch_size: int = 64,
        seed: int | None = None,
        view_store: str | None = None,
    ) -> None:
        super().__init__(
            continual=continual,
            n_views=n_views,
            views=views,
            images_per_step=images_per_step,
            view_batch_size=view_batch_size,
            seed=seed,
            view_store=view_store,
        )
        check_number("memory_size", memory_size, 1, integer=True)  # slots per class
        check_number("beta", beta, 0)  # attention sharpness: exp(-beta * (1 - cos))
        check_number("memory_weight", memory_weight, 0)  # 0: the zero-shot prediction of the original view
        check_number("selection", selection, 0, 1, low_open=True)
        if int(n_views * selection) < 1:  # the reference's mean over no view is NaN
            raise OptionError(
                "selection",
                f"keeps int(n_views * selection) = int({n_views} * {selection}) = 0 views: raise it to at least "
                f"1/n_views ({1 / n_views:g}) or raise n_views",
            )
        self.memory_size, self.beta, self.memory_weight, self.selection = memory_size, beta, memory_weight, selection

    @override
    def new_state(self, pl_module: pl.LightningModule) -> DMNState:
        return DMNState(
            pl_module.text_features().float(),
            float(pl_module.vlm.logit_scale),
            memory_size=self.memory_size,
            beta=self.beta,
            memory_weight=self.memory_weight,
            selection=self.selection,
        )
