"""Token-wise value delta, the heart of ToVA (method §2.1): V[:, s_k] += λ_k · (c[:, s_k] @ A_kᵀ) @ B_kᵀ.

Only the identifier rows change; every other row of V stays bit-identical. Keys and queries are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenDelta:
    """One concept's adapter at one cross-attention layer, bound to its token position."""

    lora_A: torch.Tensor  # (r, d), fp32
    lora_B: torch.Tensor  # (C, r), fp32
    scale: float  # λ_k = strength · alpha / r
    position: int  # s_k in the prompt's token sequence
    prompt_length: int  # 77 · windows of the prompt s_k was found in (for LCM-repeated contexts, integration §1.6)
    label: str = ""  # adapter name, for messages
    prompt_ids: tuple | None = None  # token ids of that prompt, to recognise it among several conditionings

    def with_weights(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> "TokenDelta":
        return TokenDelta(lora_a, lora_b, self.scale, self.position, self.prompt_length, self.label, self.prompt_ids)


def identifier_rows(position: int, chunk_length: int, context_length: int) -> slice | None:
    """Rows of a context that hold token s_k of a conditioning of `chunk_length` tokens, or None when it has none.

    ComfyUI pads conditionings of different lengths in one batch by repeating the shorter one up to a common length
    (LCM), so token p of a conditioning of length L sits at p, p + L, p + 2L, ... inside a context of length T.
    A conditioning shorter than s_k + 1 (e.g. a one-window negative next to a two-window prompt) has no row for it.
    """
    if position >= chunk_length or position >= context_length:
        return None
    stride = chunk_length if context_length % chunk_length == 0 else context_length
    return slice(position, context_length, stride)


def apply_token_value_delta(
    value: torch.Tensor,
    context: torch.Tensor,
    delta: TokenDelta,
    row_mask: torch.Tensor,
    token_rows: slice | None = None,
) -> torch.Tensor:
    """Add the ToVA delta δ_kᵀ A_{C_k}(c_k) to the identifier rows of V (method §2.1), returning a new tensor.

    Shapes:
        value:    (B, T, C)  projected values V = c @ W_vᵀ, any float dtype
        context:  (B, T, d)  text features c that produced V
        row_mask: (B,) bool  batch rows that get the delta (e.g. cond rows only), on value's device
        token_rows: the token rows of s_k (see `identifier_rows`); default: those of a conditioning of the
                  delta's own prompt length
        returns   (B, T, C)  same dtype; rows other than (row_mask, token_rows) bit-identical to `value`
    The delta is computed in fp32 and added in fp32 before casting back. The token rows are a strided slice
    (s_k, s_k + L, ...) and the batch rows a mask, so nothing here waits for the GPU.
    """
    rows = (
        token_rows if token_rows is not None else identifier_rows(delta.position, delta.prompt_length, value.shape[1])
    )
    if rows is None:
        return value
    base = value[:, rows].to(torch.float32)  # (B, P, C)
    text_rows = context[:, rows].to(torch.float32)  # (B, P, d)
    update = (text_rows @ delta.lora_A.to(torch.float32).T) @ delta.lora_B.to(torch.float32).T  # (B, P, r) -> (B, P, C)
    updated = torch.where(row_mask[:, None, None], base + delta.scale * update, base)  # (B, P, C)
    out = value.clone()
    out[:, rows] = updated.to(value.dtype)  # fp32 -> dtype is exact for the untouched rows
    return out
