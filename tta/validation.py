"""Checks of user input that name the input and the fix: numeric options, and non-finite outputs.

Plain Python (torch imported only by the tensor check), used by the callbacks, datamodules and tasks.
``tta-predict`` prefixes an :class:`OptionError`'s option with where it lives in the config
(``tta.callbacks.tpt.lr``, ``data.batch_size``).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where tensors are checked: tta-predict checks options before it imports torch
    import torch


class OptionError(ValueError):
    """A bad value of a named option; ``str()`` is the whole one-line message."""

    def __init__(self, option: str, problem: str) -> None:
        self.option, self.problem = option, problem
        super().__init__(f"{option} {problem}")

    def within(self, prefix: str) -> OptionError:
        """The same error with the option named from ``prefix`` (``tta.callbacks.tpt``)."""
        return OptionError(f"{prefix}.{self.option}", self.problem)


def _bound(lowest: float | None, highest: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if lowest is not None:
        parts.append(f"{'>' if low_open else '>='} {lowest:g}")
    if highest is not None:
        parts.append(f"{'<' if high_open else '<='} {highest:g}")
    return " and ".join(parts)


def check_number(
    option: str,
    value: Any,
    lowest: float | None = None,
    highest: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> Any:
    """``value`` if it is a finite number in the range (``lowest``/``highest``, inclusive unless
    ``low_open``/``high_open``; an integer where ``integer``; ``None`` passes where ``optional``),
    else an :class:`OptionError` naming ``option``, the range and the value."""
    if value is None and optional:
        return None
    kind = "an integer" if integer else "a finite number"
    bound = _bound(lowest, highest, low_open, high_open)
    wanted = f"{kind}{' ' + bound if bound else ''}{' (or null)' if optional else ''}"
    number = isinstance(value, Integral) if integer else isinstance(value, Real)
    if isinstance(value, bool) or not number or not math.isfinite(float(value)):
        raise OptionError(option, f"must be {wanted}, got {value!r}")
    too_low = lowest is not None and (value <= lowest if low_open else value < lowest)
    too_high = highest is not None and (value >= highest if high_open else value > highest)
    if too_low or too_high:
        raise OptionError(option, f"must be {wanted}, got {value!r}")
    return value


class NonFiniteError(ValueError):
    """Logits or probabilities that are NaN or infinite: the run stops rather than write them."""


def non_finite_samples(values: torch.Tensor, index: torch.Tensor) -> list[int]:
    """The ``index`` of the samples whose row of ``values`` (``B x ...``) holds NaN or infinity."""
    import torch

    finite = torch.isfinite(values.detach())
    finite = finite.flatten(1).all(1) if values.ndim > 1 else finite
    return [] if bool(finite.all()) else index[~finite.to(index.device)].tolist()


def check_finite(values: torch.Tensor, index: torch.Tensor, what: str, trainer: Any, batch_idx: int, hint: str) -> None:
    """Raise :class:`NonFiniteError` if ``values`` (``B x ...``, one row per sample of ``index``)
    hold NaN or infinity: one line naming ``what`` gave them, the batch (its position in the
    stream of ``trainer``'s datamodule where it has one, see ``StreamDataModule.stream_position``), the
    first samples and ``hint`` (the likely setting and the fix)."""
    bad = non_finite_samples(values, index)
    if not bad:
        return
    position = getattr(getattr(trainer, "datamodule", None), "stream_position", None)
    where = f"batch {position(batch_idx) if position is not None else batch_idx + 1}"
    shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    raise NonFiniteError(
        f"{what} gave non-finite values (NaN or inf) in {where}, for {len(bad)} of {len(index)} samples "
        f"(index {shown}): {hint}"
    )
