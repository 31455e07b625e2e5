"""What one cross-attention call looks like to ConceptSplit, and the explicit attention probabilities (method §3.1).

The ComfyUI seam builds an `AttentionCall` for every attn2 call and hands it, with q and k, to the observers of the
run (LODA's map capture and fixing bias, the viewer's capture). Observers are plain objects with four methods;
see `AttentionObserver`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from einops import rearrange

from .model_layout import LayerKey

COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond values


@dataclass(frozen=True)
class ChunkPrompt:
    """What is known of the conditioning behind one CFG chunk of a model call (recorded per call by the seam)."""

    length: int  # tokens of that conditioning before ComfyUI repeats it to the batch's common (LCM) length
    # PromptTokens.token_ids of the prompt this conditioning holds: from its token record (Apply ToVA, ConceptSplit
    # Text Encode), or, for a positive without one, of the pack's encoding its text features match
    # (prompt_encoding.identify_conditionings); None = no prompt the pack knows
    prompt_ids: tuple | None
    area: bool = False  # an area-conditioned entry: its model calls see a crop of the latent, not the whole grid


def chunk_holds_prompt(chunk: ChunkPrompt | None, prompt_ids: tuple | None, prompt_length: int) -> bool:
    """Whether a positive chunk is the conditioning of the prompt whose token positions s_k we use (method §2.3, §8
    #16).

    The prompt is recognised by its token ids (recorded, or identified by content: prompt_encoding's rule), so
    another positive in the same batch (ConditioningCombine, regional prompts) or another text of the same length
    never gets the prompt's s_k. A call without records (a ComfyUI path that bypasses calc_cond_batch) is assumed to
    be the prompt; a user of positions without token ids (training's own forward) goes by length.
    """
    if chunk is None:
        return True
    if prompt_ids is None:
        return chunk.prompt_ids is not None or chunk.length == prompt_length
    return chunk.prompt_ids is not None and tuple(chunk.prompt_ids) == tuple(prompt_ids)


@dataclass(frozen=True)
class AttentionCall:
    """One attn2 call: which layer, its grid, and how the batch is split into CFG chunks."""

    key: LayerKey  # model_layout.AttentionSite.key of the layer
    grid: tuple[int, int]  # (h, w) of the layer's queries; N = h·w, row-major
    heads: int  # H
    cond_or_uncond: tuple[int, ...]  # per chunk: 0 positive, 1 negative; order varies per call
    batch: int  # B = rows of q, all chunks together
    context_length: int  # T (77 · windows, possibly LCM-repeated)
    sigmas: torch.Tensor | None  # (B // chunks,) sigma of each sample at this call
    chunk_prompts: tuple[ChunkPrompt | None, ...] = ()  # per chunk, when recorded; () = nothing known

    @property
    def rows_per_chunk(self) -> int:
        return self.batch // len(self.cond_or_uncond)

    def chunk_rows(self, branch: int) -> list[int]:
        """Rows of q/k/v that belong to chunks of `branch` (0 cond, 1 uncond)."""
        per = self.rows_per_chunk
        return [i * per + r for i, c in enumerate(self.cond_or_uncond) if c == branch for r in range(per)]

    def prompt_chunks(self, branches, prompt_ids: tuple | None, prompt_length: int) -> tuple[tuple[int, int], ...]:
        """(chunk index, own length) of the whole-image chunks in `branches` whose token columns follow the prompt:
        every negative chunk, and the positive chunks holding the prompt (`chunk_holds_prompt`). Area-conditioned
        chunks (and the negatives ComfyUI pairs with them) see a crop, so whole-image maps and masks do not fit them.
        The own length is the stride of a token's LCM copies in that chunk (the prompt's length when unrecorded)."""
        found = []
        for index, branch in enumerate(self.cond_or_uncond):
            if branch not in branches:
                continue
            chunk = self.chunk_prompts[index] if index < len(self.chunk_prompts) else None
            if chunk is not None and chunk.area:
                continue
            if branch == COND and not chunk_holds_prompt(chunk, prompt_ids, prompt_length):
                continue
            found.append((index, chunk.length if chunk is not None else prompt_length))
        return tuple(found)


class AttentionObserver(Protocol):
    """What the attention processor asks of each observer, in this order, for every attn2 call."""

    def attention_bias(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """Additive pre-softmax bias (B, N, T) or None."""

    def needs_probabilities(self, call: AttentionCall) -> bool:
        """Whether `observe_probabilities` wants softmax(q kᵀ/√D + bias) for this call."""

    def observe_probabilities(self, call: AttentionCall, probs: torch.Tensor) -> None:
        """Receive probabilities (B, H, N, T), fp32; in the autograd graph when grad mode is on."""

    def after_attention(self, call: AttentionCall) -> None:
        """Called after the layer's output is computed; may raise to end a truncated forward pass."""


def observed_bias(observers, call: AttentionCall, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The sum of the observers' pre-softmax biases for one call (B, N, T), or None when none gives one (the LODA
    fixing bias of method §4 and any other observer's)."""
    bias = None
    for observer in observers:
        extra = observer.attention_bias(call, q, k)  # (B, N, T) or None
        if extra is not None:
            bias = extra if bias is None else bias + extra
    return bias


def observed_attention(observers, call: AttentionCall, probabilities, attend) -> torch.Tensor:
    """The rest of one observed attention call, in the protocol's order: `probabilities()` ((B, H, N, T) fp32,
    computed only when an observer needs them) to every observer, then `attend()` (the layer's output), then
    after_attention (which may end a truncated pass). Returns attend()'s output."""
    if any(observer.needs_probabilities(call) for observer in observers):
        probs = probabilities()  # (B, H, N, T) fp32
        for observer in observers:
            observer.observe_probabilities(call, probs)
    out = attend()
    for observer in observers:
        observer.after_attention(call)
    return out


def attention_probabilities(
    q: torch.Tensor, k: torch.Tensor, heads: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q Kᵀ / √D + bias) over all T keys, SOT included, in fp32 (method §3.1).

    Shapes:
        q: (B, N, H·D), k: (B, T, H·D), any float dtype; bias: (B, N, T) or None
        returns (B, H, N, T) fp32
    """
    q_heads = rearrange(q.float(), "b n (h d) -> b h n d", h=heads)  # (B, H, N, D)
    k_heads = rearrange(k.float(), "b t (h d) -> b h t d", h=heads)  # (B, H, T, D)
    logits = q_heads @ k_heads.transpose(-1, -2) / math.sqrt(q_heads.shape[-1])  # (B, H, N, T)
    if bias is not None:
        logits = logits + bias.float()[:, None]  # (B, 1, N, T) broadcast over heads
    return logits.softmax(dim=-1)
