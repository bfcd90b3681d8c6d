"""The text tower of any open_clip model, reimplemented so that token embeddings can be edited.

open_clip's ``encode_text`` starts from token ids; a prompt learner must start from embeddings.
``TextTower`` reads the parts of the three tower kinds (``CLIP`` keeps them on the model,
``CustomTextCLIP`` and SigLIP-style models in ``model.text``) and runs the same computation
from embeddings, with the sequence optionally cut short when the mask is causal.

Under a causal mask the first positions of a prompt see nothing after them, so prompts that
share their first tokens (the start token and a learned context, the same for every class)
share those positions' hidden states in every layer. :meth:`TextTower.shared_prefix_features`
runs the shared positions once and lets every prompt's remaining positions attend to their
keys and values: the same features as running each prompt whole, up to float rounding, with
the shared positions' arithmetic done once instead of once per prompt.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import ResidualAttentionBlock, TextTransformer
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
        # the shared-prefix computation re-implements open_clip's default block (nn.MultiheadAttention
        # without added key/value biases or dropout); other blocks run every prompt whole
        self.shares_prefix = self.causal and all(
            type(block) is ResidualAttentionBlock
            and not hasattr(block, "ln_1_kv")
            and block.attn._qkv_same_embed_dim
            and block.attn.bias_k is None
            and not block.attn.add_zero_attn
            and block.attn.dropout == 0
            for block in self._source.transformer.resblocks
        )

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
        return self._project(pooled)

    def shared_prefix_features(
        self,
        prefix: torch.Tensor,
        suffixes: torch.Tensor,
        pool_positions: torch.Tensor,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """Features (B x C x D, unnormalised) of the B x C prompts ``prefix[b] + suffixes[c]``.

        ``prefix`` (B x P x W): the embeddings of each prompt set's shared first positions;
        ``suffixes`` (C x S x W): the embeddings of the rest of each prompt, the same for every
        prefix; ``pool_positions`` (C): the position each prompt's features are read from, counted
        from the start of the whole prompt, each at least P (not checked here, where reading it
        would wait for the device on every call; ``PromptLearner`` checks it once). The prefix
        positions run once per prompt set (B x P tokens instead of B x C x P); the suffixes
        attend to their keys and values. Needs :attr:`shares_prefix` (a causal mask and
        open_clip's default blocks). ``checkpoint`` as in :meth:`__call__`.
        """
        if not self.shares_prefix:
            raise ValueError(
                "this text tower cannot share a prompt prefix (its mask is not causal, or its blocks are not "
                "open_clip's default ones): run every prompt whole with TextTower.__call__"
            )
        src = self._source
        n_prefix, n_suffix = prefix.shape[1], suffixes.shape[1]
        length = n_prefix + n_suffix
        cast_dtype = src.transformer.get_cast_dtype()
        positions = src.positional_embedding[:length].to(cast_dtype)
        head = prefix.to(cast_dtype) + positions[:n_prefix]  # B x P x W
        n_sets, n_prompts = prefix.shape[0], suffixes.shape[0]
        tail = (
            (suffixes.to(cast_dtype) + positions[n_prefix:]).expand(n_sets, -1, -1, -1).flatten(0, 1)
        )  # (B*C) x S x W
        head_mask, tail_mask = src.attn_mask[:n_prefix, :n_prefix], src.attn_mask[n_prefix:length, :length]
        checkpoint = checkpoint and torch.is_grad_enabled()
        for block in src.transformer.resblocks:
            head, (keys, values) = _block_forward(block, head, head_mask)
            past = (_per_prompt(keys, n_prompts), _per_prompt(values, n_prompts))
            if checkpoint:
                tail, _ = torch_checkpoint(_block_forward, block, tail, tail_mask, past, use_reentrant=False)
            else:
                tail, _ = _block_forward(block, tail, tail_mask, past)
        rows = torch.arange(tail.shape[0], device=tail.device)
        pooled = src.ln_final(tail[rows, (pool_positions - n_prefix).repeat(n_sets)])
        return self._project(pooled).view(n_sets, n_prompts, -1)

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        projection = self._source.text_projection
        if projection is None:
            return pooled
        if isinstance(projection, nn.Linear):
            return projection(pooled)
        return pooled @ projection

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


def _per_prompt(prefix_states: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """B x P x W -> (B*C) x P x W, each prompt set's rows repeated for its C prompts."""
    return prefix_states.unsqueeze(1).expand(-1, n_prompts, -1, -1).flatten(0, 1)


def _block_forward(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    mask: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """open_clip's ``ResidualAttentionBlock`` on ``x`` (N x T x W, batch first) whose positions
    also attend to ``past`` keys and values (N x P x W each, positions before ``x``'s); ``mask``
    (T x (P + T)) is the additive attention mask. Returns the block's output and the keys and
    values of ``x``'s own positions (what later positions attend to)."""
    attn = block.attn
    queries, keys, values = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    own = (keys, values)
    if past is not None:
        keys, values = torch.cat([past[0], keys], dim=1), torch.cat([past[1], values], dim=1)

    def heads(t: torch.Tensor) -> torch.Tensor:  # N x T x W -> N x H x T x W/H
        return t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(queries), heads(keys), heads(values), attn_mask=mask.to(queries.dtype))
    x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).flatten(2)))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, own
