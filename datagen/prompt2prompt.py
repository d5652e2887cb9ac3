"""Prompt-to-Prompt as diffusers attention processors: the edited prompt of each pair borrows
attention maps from the input prompt for the first part of sampling, so the pair keeps one
layout and differs where the captions differ.

The UNet batch holds pairs side by side, (input, edited) for each pair, first all the
unconditional rows and then all the conditional ones, as `PairSampler` builds it:

    [u_in 0, u_ed 0, u_in 1, u_ed 1, ..., c_in 0, c_ed 0, c_in 1, c_ed 1, ...]

Modes:
- "self" (InstructPix2Pix): the edited rows take the input rows' *self*-attention maps, in
  the unconditional and the conditional half alike (the original's CrossAttention with
  `prompt_to_prompt=True` copies the pre-softmax scores q k^T; we copy q and k, the same).
- "replace" (the Prompt-to-Prompt paper's word swap): the edited prompt's conditional rows
  take the input prompt's *cross*-attention maps token for token; the two captions must have
  the same number of tokens.
- "refine" (the paper's refinement): cross-attention maps of the edited tokens that align
  with input tokens come from the input; new tokens keep their own maps.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = ("self", "replace", "refine")


class TokenCountMismatch(ValueError):
    """'replace' needs captions of equal token counts (a word swap)."""


def refinement_mapper(
    source_ids: Sequence[int], target_ids: Sequence[int], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of `max_length` target token positions, the source position its map comes
    from and alpha: 1 where the target token aligns with a source token (its map is the
    source's), 0 where it is new. Positions past the target's tokens (padding) keep their own
    index with alpha 1, as the Prompt-to-Prompt reference does."""
    mapper = torch.arange(max_length)
    alphas = torch.ones(max_length)
    alphas[: len(target_ids)] = 0.0
    matcher = difflib.SequenceMatcher(a=list(source_ids), b=list(target_ids), autojunk=False)
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            mapper[block.b + offset] = block.a + offset
            alphas[block.b + offset] = 1.0
    return mapper, alphas


@dataclass
class P2PController:
    """What the processors do at the current step; `PairSampler` sets it before each call.

    `active[k]` says whether pair k borrows maps at this step. For "refine", `mapper` and
    `alphas` align the edited caption's tokens with the input caption's
    (`refinement_mapper`); every pair of a call has the same two captions. Set them on the
    attention tensors' device and dtype (`PairSampler` does, once per prompt); `refine` moves
    them otherwise, at a copy per attention call. `edit_seconds` accumulates the time spent
    borrowing maps (the bookkeeping the benchmark reports against UNet time)."""

    mode: str = "self"
    active: torch.Tensor | None = None
    mapper: torch.Tensor | None = None
    alphas: torch.Tensor | None = None
    edit_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown Prompt-to-Prompt mode {self.mode!r}; choose one of {MODES}")

    def edits(self, is_cross: bool) -> bool:
        """Whether a layer of this kind (self- or cross-attention) borrows maps at this step."""
        wanted = self.mode != "self"
        return is_cross == wanted and self.active is not None and bool(self.active.any())

    def _active_pairs(self) -> list[int]:
        return self.active.nonzero().flatten().tolist()

    def borrow_query_key(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """'self' and 'replace': the maps softmax(q k^T) of the edited rows become the input
        rows' by giving them the input rows' queries and keys (in place; (batch, tokens,
        channels) tensors). Values stay the edited rows' own, as in the original."""
        start = time.perf_counter()
        pairs = query.shape[0] // 4  # unconditional and conditional (input, edited) per pair
        active = self._active_pairs()
        # the original copies both halves for self-attention; P2P edits the conditional half
        halves = slice(None) if self.mode == "self" else slice(1, 2)
        for tensor in (query, key):
            rows = tensor.view(2, pairs, 2, *tensor.shape[1:])
            rows[halves, active, 1] = rows[halves, active, 0]
        self.edit_seconds += time.perf_counter() - start

    def refine(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        out: torch.Tensor,
        scale: float,
    ) -> None:
        """'refine': recomputes, in place in `out` (batch, heads, queries, dim), the edited
        conditional row of each active pair from mixed maps: aligned tokens' maps from the
        input row, new tokens' (alpha 0) their own. All other rows stay as computed."""
        start = time.perf_counter()
        pairs = query.shape[0] // 4
        # a no-op once PairSampler has placed them (once per prompt); a safety net for callers
        # that build them on the CPU, which a GPU's attention maps cannot be mixed with
        mapper = self.mapper.to(query.device)
        alphas = self.alphas.to(query.device, query.dtype)
        for k in self._active_pairs():
            source, target = 2 * pairs + 2 * k, 2 * pairs + 2 * k + 1  # conditional half
            maps = (
                query[[source, target]] @ key[[source, target]].transpose(-1, -2) * scale
            ).softmax(-1)
            mixed = maps[0][..., mapper] * alphas + maps[1] * (1 - alphas)
            out[target] = mixed @ value[target]
        self.edit_seconds += time.perf_counter() - start


class P2PAttnProcessor:
    """diffusers' AttnProcessor2_0 (scaled dot-product attention) with the controller's
    borrowing: 'self' and 'replace' swap queries and keys before the fused kernel, so no map
    is ever materialised; 'refine' mixes maps, so it redoes the edited rows explicitly."""

    def __init__(self, controller: P2PController, is_cross: bool):
        self.controller = controller
        self.is_cross = is_cross

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross:
            raise NotImplementedError("Prompt-to-Prompt supports the SD UNet's attention only")
        if attention_mask is not None:
            raise NotImplementedError("Prompt-to-Prompt takes no attention mask")
        residual = hidden_states
        is_4d = hidden_states.ndim == 4
        if is_4d:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        controller = self.controller
        borrowing = controller.edits(self.is_cross)
        if borrowing and controller.mode != "refine":
            controller.borrow_query_key(query, key)
        size = query.shape[0]
        query, key, value = (
            t.view(size, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)
            for t in (query, key, value)
        )
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        if borrowing and controller.mode == "refine":
            controller.refine(query, key, value, out, attn.scale)
        hidden_states = out.transpose(1, 2).reshape(size, -1, attn.heads * out.shape[-1])
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if is_4d:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install(unet: torch.nn.Module, controller: P2PController) -> None:
    """Puts a P2PAttnProcessor on every attention layer of a diffusers UNet (attn1 is self-,
    attn2 cross-attention in its transformer blocks)."""
    processors = {
        name: P2PAttnProcessor(controller, is_cross=name.endswith("attn2.processor"))
        for name in unet.attn_processors
    }
    unet.set_attn_processor(processors)
