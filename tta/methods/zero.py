"""ZERO: test-time augmentation at zero temperature (Farina et al., NeurIPS 2024).

Per image, no backward pass: V views (the original and V - 1 random resized crops with flips, on
every data set), the ``int(V * gamma)`` views (19 of 64 at gamma 0.3) with the lowest entropy of
``softmax(scale * cos)`` kept, and each kept view votes for its arg-max class. The reference
writes the vote as ``softmax(cos / eps)`` with ``eps`` the machine epsilon of the cosines' dtype
(the temperature "set to zero"), so a view whose two best cosines lie within a few ``eps`` splits
its vote; the votes are summed over the kept views. The prediction is the class with the most
votes. When several classes have the most votes, the tie is broken greedily: the views not kept,
in order of increasing entropy, are read one by one and the first whose arg-max is a tied class
decides; that class gets one more vote. When no remaining view names a tied class, the
reference's fallback (``utils/tools.py``, ``break_sample_tie``) masks ``logit[~ties]``: the
bitwise NOT of the tie indices, negative positions that count from the end of the class list, so
it takes the arg-max of the first remaining view over every class but those mirrored ones, which
can be a class that was not tied. ``tie_fallback="reference"`` reproduces that (the default);
``"tied"`` takes the arg-max over the tied classes, as the code evidently meant.

The reference returns the vote counts (plus the tie-break vote) and only their arg-max is used.
The probabilities here are the vote shares (``output="votes"``: the marginal over the kept views
at zero temperature, the paper's definition; a class without a vote has logit -10,000: probability
0 in every float precision, yet finite in float16); ``output="counts"`` returns the counts themselves as logits, as the
2025 benchmark TomSheng21/tta-vlm feeds them to its metrics (softmax of the counts: nearly
one-hot). Both have the same arg-max.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

ZERO_OUTPUTS = ("votes", "counts")
TIE_FALLBACKS = ("reference", "tied")
#: The logit of a class without a vote under ``output="votes"``: exp(-10,000) is 0 in every float
#: dtype, and -10,000 survives the cast of the outputs to float16 or bfloat16 (float32's lowest does not).
NO_VOTE_LOGIT = -1.0e4


class ZeroResult(NamedTuple):
    """What ZERO returns per image: logits (``B x C``, see ``output``), the kept views
    (``B x k``, in order of increasing entropy) and the votes (``B x C``, tie-break vote included)."""

    logits: torch.Tensor
    selected: torch.Tensor
    votes: torch.Tensor


def n_zero_kept(n_views: int, gamma: float) -> int:
    """The reference's ``int(V * gamma)``: 19 of 64 at 0.3; 0 when ``V * gamma < 1`` (every view then
    goes to the tie-break, the original first in entropy order or not)."""
    return int(n_views * gamma)


def view_entropy_order(logits: torch.Tensor) -> torch.Tensor:
    """Views in order of increasing entropy of ``softmax(logits)`` (``B x V x C`` -> ``B x V``), the
    entropy as the reference computes it, ``-(p * log p)`` in float32; ties keep the lower index."""
    p = logits.float().softmax(-1)
    return torch.argsort(-(p * p.log()).sum(-1), dim=1, stable=True)


def zero_predict(
    cosines: torch.Tensor,
    logits: torch.Tensor,
    gamma: float = 0.3,
    tie_fallback: str = "reference",
    output: str = "votes",
) -> ZeroResult:
    """ZERO's prediction from each image's view cosines (``B x V x C``, ``image @ text.T`` of normalised
    features, in the dtype the votes are cast in: float16 under fp16 autocast, as the reference's)
    and view logits (``scale * cos + bias``: the entropies that pick the kept views)."""
    if tie_fallback not in TIE_FALLBACKS:
        raise ValueError(f"tie_fallback must be one of {TIE_FALLBACKS}, got {tie_fallback!r}")
    if output not in ZERO_OUTPUTS:
        raise ValueError(f"output must be one of {ZERO_OUTPUTS}, got {output!r}")
    order = view_entropy_order(logits)
    k = n_zero_kept(cosines.shape[1], gamma)
    selected = order[:, :k]
    kept = cosines.gather(1, selected.unsqueeze(-1).expand(-1, -1, cosines.shape[-1]))
    votes = (kept / torch.finfo(cosines.dtype).eps).float().softmax(-1).sum(1)  # B x C
    most = votes.max(-1, keepdim=True).values
    for b in ((votes == most).sum(-1) > 1).nonzero().flatten().tolist():
        votes[b, _break_tie(votes[b] == most[b], cosines[b, order[b, k:]], votes[b].argmax(), tie_fallback)] += 1
    if output == "counts":
        return ZeroResult(votes, selected, votes)
    shares = votes / votes.sum(-1, keepdim=True)
    return ZeroResult(shares.log().clamp_min(NO_VOTE_LOGIT), selected, votes)


def _break_tie(tied: torch.Tensor, remaining: torch.Tensor, first_tied: torch.Tensor, fallback: str) -> int:
    """The class that gets the tie-break vote: the arg-max of the first remaining view (``R x C``, in
    entropy order) that is a tied class; else the fallback's class."""
    picks = remaining.argmax(-1)
    named = tied[picks].nonzero()
    if len(named):
        return int(picks[named[0, 0]])
    if len(remaining) == 0:  # every view kept: the reference fails here (an empty view list); keep max's pick
        return int(first_tied)
    view = remaining[0].clone()
    if fallback == "reference":
        ties = tied.nonzero().flatten()
        view[~ties] = -torch.inf  # ~t = -(t + 1): masks classes counted from the end, as the reference
    else:
        view[~tied] = -torch.inf
    return int(view.argmax())
