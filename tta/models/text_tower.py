"""The text tower of any open_clip model, reimplemented so that token embeddings can be edited.

open_clip's ``encode_text`` starts from token ids; a prompt learner must start from embeddings.
``TextTower`` reads the parts of the three tower kinds (``CLIP`` keeps them on the model,
``CustomTextCLIP`` and SigLIP-style models in ``model.text``) and runs the same computation
from embeddings, with the sequence optionally cut short when the mask is causal.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import TextTransformer
from torch.utils.checkpoint import checkpoint as torch_checkpoint


class TextTower:
    """Embeddings-in, features-out view of an open_clip text tower.

    A plain object holding references, not an ``nn.Module``: the parameters stay owned (and
    moved, cast, saved) by the open_clip model alone.
    """

    def __init__(self, model: nn.Module) -> None:
        if isinstance(model, CLIP):
            self._source = model
            self.pool_type: str = model.text_pool_type
            self.eos_id = getattr(model, "text_eos_id", None)
        elif isinstance(model, CustomTextCLIP) and isinstance(model.text, TextTransformer):
            if model.text.cls_emb is not None or model.text.use_pad_mask:
                raise ValueError(
                    "prompt learning needs a text tower without an appended class token or padding "
                    "mask (CoCa-style towers are not supported); pick a CLIP or SigLIP model"
                )
            self._source = model.text
            self.pool_type = model.text.pool_type
            self.eos_id = model.text.eos_id
        else:
            text = getattr(model, "text", None)
            raise ValueError(
                f"text tower {type(text or model).__name__} is not an open_clip TextTransformer "
                "(Hugging Face text towers are not supported for prompt learning); pick a model "
                "whose config has no 'hf_model_name' in text_cfg"
            )
        self.token_embedding: nn.Embedding = self._source.token_embedding
        self.causal = self._source.attn_mask is not None

    @property
    def width(self) -> int:
        return self.token_embedding.weight.shape[1]

    def pool_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the position each sequence's features are read from (N long)."""
        length = tokens.shape[1]
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "last":
            return torch.full((tokens.shape[0],), length - 1, dtype=torch.long, device=tokens.device)
        if self.pool_type == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        raise ValueError(f"text pool type {self.pool_type!r} gives no single feature vector")

    def useful_length(self, tokens: torch.Tensor) -> int:
        """Shortest prefix that gives the same features: under a causal mask nothing after the
        pooled position can reach it; without one every position matters."""
        if not self.causal:
            return tokens.shape[1]
        return int(self.pool_positions(tokens).max()) + 1

    def __call__(
        self, embeddings: torch.Tensor, pool_positions: torch.Tensor, checkpoint: bool = False
    ) -> torch.Tensor:
        """Features (N x D, unnormalised) from token embeddings (N x L x W).

        ``L`` may be shorter than the context length (see :meth:`useful_length`).
        ``checkpoint`` recomputes each block in the backward pass instead of keeping its
        activations: about a third more compute for a fraction of the memory, which is what
        lets many prompts (images x classes) be tuned at once on a GPU.
        """
        src = self._source
        length = embeddings.shape[1]
        cast_dtype = src.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype) + src.positional_embedding[:length].to(cast_dtype)
        mask = None if src.attn_mask is None else src.attn_mask[:length, :length]
        if checkpoint and torch.is_grad_enabled():
            x = self._checkpointed_blocks(x, mask)
        else:
            x = src.transformer(x, attn_mask=mask)
        x = src.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), pool_positions]
        if src.text_projection is None:
            return pooled
        if isinstance(src.text_projection, nn.Linear):
            return src.text_projection(pooled)
        return pooled @ src.text_projection

    def _checkpointed_blocks(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        transformer = self._source.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for block in transformer.resblocks:
            x = torch_checkpoint(block, x, None, None, mask, use_reentrant=False)
        return x if transformer.batch_first else x.transpose(0, 1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Same as the model's ``encode_text``, computed on the useful prefix only."""
        positions = self.pool_positions(tokens)
        tokens = tokens[:, : self.useful_length(tokens)]
        return self(self.token_embedding(tokens), positions)
