"""What every online (stream) method's state is: one sample in, its logits out, the state updated.

An online method carries state from one sample to the next (TDA's caches, DOTA's class
statistics, DMN's memory). :class:`OnlineMethod` is that state for one stream (one domain, or
several with ``continual``): :meth:`OnlineMethod.step` takes one sample's view features, returns
its logits and updates the state in the order the method's reference does (TDA updates its
caches with the sample before predicting it; DOTA predicts, then fits). The callback base
(``tta.callbacks.online.OnlineTTA``) walks a batch's samples in stream order through ``step``,
starts a fresh state at each new domain, and saves :meth:`OnlineMethod.state_dict` with every
finished batch so that a stopped run resumes to the same predictions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class OnlineMethod(ABC):
    """The state of one online method over one stream.

    Subclasses are built from the class text features (``C x D``, normalised) and the logit scale
    plus their options, and hold only tensors and numbers: :meth:`state_dict` returns every tensor
    needed to continue exactly, :meth:`load_state_dict` restores them.
    """

    @abstractmethod
    def step(self, view_features: torch.Tensor) -> torch.Tensor:
        """One sample: ``V x D`` normalised view features (view 0 the original image) -> its ``C``
        logits (fp32), the state updated in the reference's order."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor the state needs to continue exactly (plain, contiguous, no shared storage:
        what ``safetensors`` saves), counters included as tensors."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s tensors (on any device: moved to the state's own)."""

    @abstractmethod
    def size(self) -> int:
        """How many entries the state holds now (cached features, memory slots, samples fitted)."""
