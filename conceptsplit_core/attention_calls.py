"""What one cross-attention call looks like to ConceptSplit, and the explicit attention probabilities (spec §3.1).

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

BlockKey = tuple[str, int, int]  # ("input", 7, 0): block name, block id, depth index


@dataclass(frozen=True)
class AttentionCall:
    """One attn2 call: which layer, its grid, and how the batch is split into CFG chunks."""

    key: BlockKey
    grid: tuple[int, int]  # (h, w) of the layer's queries; N = h·w, row-major
    heads: int  # H
    cond_or_uncond: tuple[int, ...]  # per chunk: 0 positive, 1 negative; order varies per call
    batch: int  # B = rows of q, all chunks together
    context_length: int  # T (77 · windows, possibly LCM-repeated)
    sigmas: torch.Tensor | None  # (B // chunks,) sigma of each sample at this call

    @property
    def rows_per_chunk(self) -> int:
        return self.batch // len(self.cond_or_uncond)

    def chunk_rows(self, branch: int) -> list[int]:
        """Rows of q/k/v that belong to chunks of `branch` (0 cond, 1 uncond)."""
        per = self.rows_per_chunk
        return [i * per + r for i, c in enumerate(self.cond_or_uncond) if c == branch for r in range(per)]


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


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q Kᵀ / √D + bias) over all T keys, SOT included, in fp32 (spec §3.1).

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
