"""Token-wise value delta, the heart of ToVA (spec §2.1): V[:, s_k] += λ_k · (c[:, s_k] @ A_kᵀ) @ B_kᵀ.

Only the identifier rows change; every other row of V stays bit-identical. Keys and queries are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConceptSplitError


@dataclass(frozen=True)
class TokenDelta:
    """One concept's adapter at one cross-attention layer, bound to its token position."""

    lora_A: torch.Tensor  # (r, d), fp32
    lora_B: torch.Tensor  # (C, r), fp32
    scale: float  # λ_k = strength · alpha / r
    position: int  # s_k in the prompt's token sequence
    prompt_length: int  # 77 · windows of the prompt s_k was found in (for LCM-repeated contexts, §1.6 of the notes)
    label: str = ""  # adapter name, for messages

    def with_weights(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> "TokenDelta":
        return TokenDelta(lora_a, lora_b, self.scale, self.position, self.prompt_length, self.label)


def repeated_positions(position: int, prompt_length: int, context_length: int, label: str = "") -> list[int]:
    """All rows holding token s_k when ComfyUI repeats a shorter context up to a common length.

    ComfyUI pads cond and uncond of different lengths by repeating the shorter one (LCM), so token p of a
    prompt of length L sits at p, p + L, p + 2L, ... inside a context of length T.
    Raises: ConceptSplitError when s_k lies beyond the context (the sampled prompt is not the ToVA prompt).
    """
    if position >= context_length:
        raise ConceptSplitError.build(
            f'The identifier token of "{label}" lies outside the text conditioning being sampled',
            seen=f"token position {position}, conditioning of {context_length} tokens",
            expected=f"a conditioning encoded from the same prompt as Apply ToVA ({prompt_length} tokens)",
            fix="use the CONDITIONING output of Apply ToVA to Model as the positive prompt, or give both the same text",
        )
    if context_length % prompt_length:
        return [position]
    return list(range(position, context_length, prompt_length))


def apply_token_value_delta(value: torch.Tensor, context: torch.Tensor, delta: TokenDelta,
                            row_mask: torch.Tensor) -> torch.Tensor:
    """Add the ToVA delta δ_kᵀ A_{C_k}(c_k) to the identifier rows of V (spec §2.1), returning a new tensor.

    Shapes:
        value:    (B, T, C)  projected values V = c @ W_vᵀ, any float dtype
        context:  (B, T, d)  text features c that produced V
        row_mask: (B,) bool  batch rows that get the delta (e.g. cond rows only), on value's device
        returns   (B, T, C)  same dtype; rows other than (row_mask, s_k) bit-identical to `value`
    The delta is computed in fp32 and added in fp32 before casting back. The token rows are taken with a strided
    slice (s_k, s_k + L, ...), and the batch rows with a mask, so nothing here waits for the GPU.
    """
    tokens = value.shape[1]
    positions = repeated_positions(delta.position, delta.prompt_length, tokens, delta.label)
    stride = positions[1] - positions[0] if len(positions) > 1 else 1
    rows = slice(positions[0], positions[-1] + 1, stride)  # token rows s_k, s_k + L, ...
    base = value[:, rows].to(torch.float32)  # (B, P, C)
    text_rows = context[:, rows].to(torch.float32)  # (B, P, d)
    update = (text_rows @ delta.lora_A.to(torch.float32).T) @ delta.lora_B.to(torch.float32).T  # (B, P, r) -> (B, P, C)
    updated = torch.where(row_mask[:, None, None], base + delta.scale * update, base)  # (B, P, C)
    out = value.clone()
    out[:, rows] = updated.to(value.dtype)  # fp32 -> dtype is exact for the untouched rows
    return out
