"""Prompt learner: learnable context tokens right after the start token (CoOp / TPT style).

The class prompts are ``"{ctx_init} {class name}."``. Their token embeddings are computed once;
the ``n_ctx`` positions that hold ``ctx_init`` are replaced by the learnable context, so with
the initial context the features equal ``encode_text`` of the plain prompts. The context may
be batched (``B x n_ctx x W``: one context per image, adapted independently) and the text
tower runs only up to the longest pooled position when its mask is causal.

Under a causal mask the start token and the context are the same for every class, so their
positions are computed once per context and every class's remaining positions attend to them
(:meth:`tta.models.text_tower.TextTower.shared_prefix_features`): the same features up to float
rounding, with ``(1 + n_ctx) / L`` of the text tower's token work done once instead of once per
class. Towers without a causal mask (SigLIP) run every class prompt whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tta.models.vlm import VisionLanguageModel, check_class_names


def _find_span(sequence: list[int], span: list[int]) -> int:
    for start in range(len(sequence) - len(span) + 1):
        if sequence[start : start + len(span)] == span:
            return start
    return -1


class PromptLearner:
    """Class text features as a function of the context embeddings.

    ``initial_context`` is the ``n_ctx x W`` embedding of ``ctx_init``; :meth:`text_features`
    maps a context (``n_ctx x W`` or ``B x n_ctx x W``) to normalised class features
    (``C x D`` or ``B x C x D``). The learner holds no parameters itself: the caller owns the
    context tensor and its optimizer, which is what makes episodic reset trivial.
    """

    def __init__(
        self,
        vlm: VisionLanguageModel,
        class_names: Sequence[str],
        ctx_init: str = "a photo of a",
        truncate: bool = True,
        share_prefix: bool = True,
    ) -> None:
        self.vlm = vlm
        self.class_names = check_class_names(class_names)
        tower = vlm.text_tower
        tokens = vlm.tokenize([f"{ctx_init} {name}." for name in self.class_names])
        ctx_ids = self._context_ids(vlm, ctx_init)
        starts = {_find_span(row, ctx_ids) for row in tokens.tolist()}
        if len(starts) != 1 or -1 in starts:
            raise ValueError(
                f"could not place the context {ctx_init!r} at the same position in every "
                "class prompt; use a context text that tokenizes independently of the class names"
            )
        self.ctx_start = starts.pop()
        self.n_ctx = len(ctx_ids)
        self.pool_positions = tower.pool_positions(tokens)
        # truncate=False keeps every position of the context length (the reference behaviour,
        # for benchmarks); the features are the same either way under a causal mask
        length = tower.useful_length(tokens) if truncate else tokens.shape[1]
        with torch.no_grad():
            embeddings = tower.token_embedding(tokens[:, :length]).float()
        self.prefix = embeddings[:, : self.ctx_start]  # C x s x W (start token, if any)
        self.suffix = embeddings[:, self.ctx_start + self.n_ctx :]  # C x rest x W (class name, eot, pad)
        self.initial_context = embeddings[0, self.ctx_start : self.ctx_start + self.n_ctx].clone()
        self.seq_len = length
        # share_prefix=False runs every class prompt whole (the straightforward computation, for
        # benchmarks); the prefix is shared only where that is exact: a causal tower, the same
        # tokens before the context in every prompt, every pooled position after the context
        self.shares_prefix = (
            share_prefix
            and tower.shares_prefix
            and bool((self.prefix == self.prefix[:1]).all())
            and int(self.pool_positions.min()) >= self.ctx_start + self.n_ctx
        )

    @staticmethod
    def _context_ids(vlm: VisionLanguageModel, ctx_init: str) -> list[int]:
        """Token ids of ``ctx_init`` alone, without start, end or padding tokens."""
        with_ctx = vlm.tokenize([ctx_init])[0].tolist()
        empty = vlm.tokenize([""])[0].tolist()
        special = set(empty)
        ids = [t for t in with_ctx if t not in special]
        if not ids:
            raise ValueError(f"ctx_init {ctx_init!r} tokenizes to nothing: give some words, e.g. 'a photo of a'")
        return ids

    def text_features(self, context: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
        """Normalised class features for ``context`` (``n_ctx x W`` or ``B x n_ctx x W``);
        ``checkpoint`` trades compute for memory in the backward pass (see ``TextTower``)."""
        batched = context.ndim == 3
        ctx = context if batched else context.unsqueeze(0)
        b, c = ctx.shape[0], self.prefix.shape[0]
        dtype = ctx.dtype
        tower = self.vlm.text_tower
        if self.shares_prefix:
            shared = torch.cat([self.prefix[:1].to(dtype).expand(b, -1, -1), ctx], dim=1)  # B x (s + n_ctx) x W
            features = tower.shared_prefix_features(shared, self.suffix.to(dtype), self.pool_positions, checkpoint)
        else:
            embeddings = torch.cat(
                [
                    self.prefix.to(dtype).unsqueeze(0).expand(b, -1, -1, -1),
                    ctx.unsqueeze(1).expand(-1, c, -1, -1),
                    self.suffix.to(dtype).unsqueeze(0).expand(b, -1, -1, -1),
                ],
                dim=2,
            ).flatten(0, 1)  # (B*C) x L x W
            features = tower(embeddings, self.pool_positions.repeat(b), checkpoint=checkpoint).view(b, c, -1)
        features = F.normalize(features.float(), dim=-1)
        return features if batched else features[0]

    def to(self, device: torch.device | str) -> PromptLearner:
        self.prefix, self.suffix = self.prefix.to(device), self.suffix.to(device)
        self.initial_context = self.initial_context.to(device)
        self.pool_positions = self.pool_positions.to(device)
        return self
