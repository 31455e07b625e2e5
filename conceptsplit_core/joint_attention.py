"""Text-image attention inside a DiT's joint attention (Flux.1, ...): one sequence [text tokens, image tokens, ...],
one softmax over ALL keys. ConceptSplit's observers want the image-query rows × text-key columns of it.

Why the joint softmax and not a softmax over the text columns alone: the model mixes its values with the joint
probabilities, so a concept's share of an image token's attention is its column of that softmax, text and image
keys competing. Renormalising over the text columns would show a map the model never uses (an image token that
attends almost only to image tokens would still look fully "bound" to some word). LODA's loss and masks, the fixing
bias and the viewer all read this joint map, the DiT counterpart of the UNet's attn2 softmax (method §3.1).
"""

from __future__ import annotations

import math

import torch


def joint_text_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    image_start: int,
    image_tokens: int,
    text_tokens: int,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ/√D + mask + bias) over all L keys, for the image-query rows, sliced to the text-key columns.

    The text tokens are the first `text_tokens` keys; the image queries are rows image_start .. image_start + N.
    Shapes:
        q, k: (B, H, L, D) post-RoPE (ComfyUI's skip_reshape layout), any float dtype
        mask: additive float mask broadcastable to (B, H, L, L), or None
        bias: (B, N, T) on the text columns of the image rows, or None
        returns (B, H, N, T) fp32; in the autograd graph when grad mode is on
    """
    rows = slice(image_start, image_start + image_tokens)
    qi = q[:, :, rows].float()  # (B, H, N, D)
    logits = qi @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, N, L)
    if mask is not None:
        logits = logits + _mask_rows(mask, rows, logits.shape).float()
    if bias is not None:
        text = logits[..., :text_tokens] + bias.float()[:, None]  # (B, H, N, T)
        logits = torch.cat([text, logits[..., text_tokens:]], dim=-1)
    return logits.softmax(dim=-1)[..., :text_tokens]


def _mask_rows(mask: torch.Tensor, rows: slice, shape) -> torch.Tensor:
    """The image-query rows of an additive mask of any broadcastable shape ((L, L), (B, 1, L, L), (B, H, L, L), ...)."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[-2] != 1:
        mask = mask[..., rows, :]
    return mask.expand(shape[0] if mask.shape[0] != 1 else 1, -1, shape[2], -1)


def joint_bias_mask(bias: torch.Tensor, length: int, image_start: int, dtype: torch.dtype) -> torch.Tensor:
    """Embed an observer bias on (image rows, text columns) into an additive (B, 1, L, L) attention mask, zero
    elsewhere, so text-query rows and image/other key columns are never changed.

    Shapes: bias (B, N, T) -> (B, 1, L, L); text columns are keys 0 .. T − 1, image rows image_start .. + N.
    """
    b, n, t = bias.shape
    mask = torch.zeros(b, 1, length, length, dtype=dtype, device=bias.device)
    mask[:, 0, image_start : image_start + n, :t] = bias.to(dtype)
    return mask


def add_masks(existing: torch.Tensor | None, added: torch.Tensor) -> torch.Tensor:
    """existing + added for additive float masks (a boolean mask becomes 0 / −max first); broadcast to the larger."""
    if existing is None:
        return added
    if existing.dtype == torch.bool:
        existing = torch.zeros(existing.shape, dtype=added.dtype, device=added.device).masked_fill(
            ~existing, -torch.finfo(added.dtype).max
        )
    while existing.dim() < 4:
        existing = existing.unsqueeze(0)
    return existing.to(added.dtype) + added
