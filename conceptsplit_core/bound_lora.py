"""Bound LoRAs: an ordinary LoRA confined to one concept's region (issue 13), plain torch.

A bound LoRA is never merged into the weights. At each layer it patches, its residual r = ΔW·x (computed from the
layer's input: bypass form) is added only where the concept is:
- image positions (convolutions, the UNet transformers' linear layers on (B, N, C) tokens): inside the concept's
  region, the LODA mask of that concept resized to the layer's grid, minus the positions another bound concept's
  mask also holds (so two bound LoRAs never act on one position);
- text-token inputs (cross-attention to_k / to_v on (B, T, d) context): only on the rows of the concept's own token
  s_k (and its LCM copies) in the chunks that hold the prompt, or nowhere (`text_rows=False`).
Everywhere else the layer's output is the base output, bit for bit (`torch.where`, not `+ 0·r`).

Before the masks exist (LODA stage 1, steps 0..N−1) the `stage1` policy decides (README "Bound LoRAs").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .attention_fixing import resize_masks_nearest
from .errors import ConceptSplitError
from .token_value_delta import identifier_rows

__all__ = [
    "STAGE1_POLICIES",
    "STAGE1_DEFAULT",
    "ConceptRegions",
    "BoundConcept",
    "check_bound_words",
    "exclusive_masks",
    "layer_grid",
    "image_position_mask",
    "token_row_mask",
    "sequence_rows",
    "add_masked",
]

# Stage-1 policies (before the LODA masks exist):
#   "text_rows": only the concept's own token rows of to_k/to_v (local by construction), image layers off;
#   "off": the bound LoRAs do nothing until the masks exist;
#   "unmasked": the whole LoRA everywhere until the masks exist (what merging would do: leaks by design).
STAGE1_POLICIES = ("text_rows", "off", "unmasked")
STAGE1_DEFAULT = "off"


@dataclass(frozen=True)
class ConceptRegions:
    """What LODA publishes for one sampling run (through transformer_options): its concepts and, once attention
    fixing starts (stage 2), their masks. `masks` is None during stage 1."""

    labels: tuple[str, ...]  # concept words in LODA's order
    positions: tuple[int, ...]  # s_k of each, SOT at 0
    prompt_length: int  # L of the positive prompt
    prompt_ids: Optional[tuple]  # its token ids (to tell its chunks from other positives')
    masks: Optional[torch.Tensor] = None  # (B_img, K, h, w) bool at the map level, or None in stage 1
    checkpointing: bool = False  # stage 1 recomputes blocks in its backward pass (hooks would be gone by then)
    masks_coming: bool = True  # False: this run never makes masks (stage 1 off and no fixing, or no stage 2)

    def __deepcopy__(self, memo):  # run state: ComfyUI's option copies must keep the same object
        return self


@dataclass(frozen=True)
class BoundConcept:
    """One binding resolved against the prompt: the word, its token position and the LoRA's strength."""

    word: str
    position: int  # s_k in the flat prompt, SOT at 0
    strength: float
    lora_name: str


def check_bound_words(words: Sequence[str]) -> None:
    """Raise ConceptSplitError when one concept word is bound twice (case-insensitive) or a word is empty."""
    seen: dict[str, int] = {}
    for index, word in enumerate(words):
        key = word.strip().lower()
        if not key:
            raise ConceptSplitError.build(
                "A bound LoRA has no concept word",
                seen=f"binding {index + 1} with an empty word",
                expected="the subject's class word or trigger word, as written in the prompt",
                fix="type the concept word into Bind LoRA to Concept",
            )
        if key in seen:
            raise ConceptSplitError.build(
                f'The concept word "{word}" is bound twice',
                seen=f"bindings {seen[key] + 1} and {index + 1}",
                expected="one LoRA per concept word",
                fix="remove one of the two Bind LoRA to Concept nodes, or bind the second LoRA to another word",
            )
        seen[key] = index


def exclusive_masks(masks: torch.Tensor, bound: Sequence[int]) -> torch.Tensor:
    """Per image, each bound concept's mask minus the positions another bound concept's mask also holds.

    Shapes: masks (B_img, K, h, w) bool; bound: concept indices in K; returns (B_img, len(bound), h, w) bool.
    """
    picked = masks[:, list(bound)]  # (B_img, J, h, w)
    count = picked.sum(dim=1, keepdim=True)  # (B_img, 1, h, w)
    return picked & (count == 1)


def layer_grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """(h, w) of a UNet layer holding `tokens` image positions for a latent of `latent_hw`: the grid after 0..4
    stride-2 downsamplings (ceil, padding 1), the one whose h·w is `tokens`.

    Raises: ConceptSplitError when no level fits (a layer this pack does not know how to mask).
    """
    h, w = latent_hw
    for _ in range(5):
        if h * w == tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ConceptSplitError.build(
        "A bound LoRA patches a layer whose positions do not match the latent's grid",
        seen=f"{tokens} positions for a {latent_hw[0]}×{latent_hw[1]} latent",
        expected="a layer at latent/1, /2, /4, /8 or /16",
        fix="report this model; bind LoRAs on SD1.5/SD2.x/SDXL",
    )


def image_position_mask(regions: torch.Tensor, grid: tuple[int, int], batch: int) -> torch.Tensor:
    """(B, h·w) bool: one concept's region at a layer's grid, per batch row (rows of each CFG chunk are the images).

    Shapes: regions (B_img, h0, w0) bool at the map level; batch B = chunks · B_img.
    """
    h, w = grid
    at_layer = resize_masks_nearest(regions, h, w).flatten(1)  # (B_img, h·w)
    rows = torch.arange(batch, device=regions.device) % regions.shape[0]
    return at_layer[rows]  # (B, h·w)


def token_row_mask(
    chunks: Sequence[Optional[int]], rows_per_chunk: int, position: int, context_length: int, device
) -> torch.Tensor:
    """(B, T) bool: the rows of token s_k (and its LCM copies) in the chunks that hold the prompt.

    `chunks`: per CFG chunk, the conditioning length of the prompt when the chunk holds it, else None.
    """
    mask = torch.zeros(len(chunks), context_length, dtype=torch.bool)
    for index, own_length in enumerate(chunks):
        rows = None if own_length is None else identifier_rows(position, own_length, context_length)
        if rows is not None:
            mask[index, rows] = True
    return mask.repeat_interleave(rows_per_chunk, dim=0).to(device)  # (B, T)


def sequence_rows(parts: Sequence[tuple[int, Optional[torch.Tensor]]], length: int, batch: int, device) -> torch.Tensor:
    """(B, length) bool: a layer's rows of a DiT token sequence, each (start, rows) part placed at its start (text
    rows (B, T) at 0 and image rows (B, N) at image_start in the joint sequence), False elsewhere (reference-image or
    padding tokens, and parts given as None).

    Raises: ConceptSplitError when a part does not fit into the layer's rows (a sequence laid out otherwise).
    """
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for start, rows in parts:
        if rows is None:
            continue
        if start + rows.shape[1] > length or rows.shape[0] != batch:
            raise ConceptSplitError.build(
                "A bound LoRA patches a layer whose token rows do not match the model call",
                seen=f"{length} rows of batch {batch}, expected {rows.shape[1]} rows from row {start}",
                expected="the text and image tokens of the call in the layer's input",
                fix="report this model; bind LoRAs on a supported checkpoint",
            )
        mask[:, start : start + rows.shape[1]] = rows
    return mask


def add_masked(output: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """output + residual where `positions` is True, output itself (bit for bit) elsewhere.

    Shapes: output, residual (B, N, C) with positions (B, N), or (B, C, H, W) with positions (B, H·W).
    """
    if output.dim() == 3:
        keep = positions[:, :, None]  # (B, N, 1)
    else:
        keep = positions.unflatten(1, output.shape[-2:])[:, None]  # (B, 1, H, W)
    return torch.where(keep, output + residual.to(output.dtype), output)
