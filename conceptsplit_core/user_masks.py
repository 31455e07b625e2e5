"""Concept masks a user draws (issue 13), plain torch: they replace or constrain the masks LODA finds, for attention
fixing and bound LoRAs alike (one set of masks).

Input: a ComfyUI MASK batch (M, H, W), values in [0, 1], with one mask per concept word in concept order (M = K:
every image of the batch gets the same masks) or one per image and concept, image-major (M = B·K: the layout of the
LODA Sampler's own concept_masks output, so one run's masks can be fed to another). Any resolution with the
latent's aspect ratio (image size, latent size, ...).

Each mask is resized to the latent grid (h, w) by area: a latent pixel belongs to the mask when at least half of it
is covered (box average ≥ 0.5). Every layer then takes the masks from that grid by nearest resize, as it takes the
masks LODA finds from the map grid, so the finest layers (latent/1) see the drawn region at latent resolution.

Modes (`MASK_MODES`):
  replace   : the drawn masks are the masks (LODA's stage 1 still runs; its maps are still reported);
  constrain : LODA's mask ∩ the drawn mask (the found mask nearest-upsampled to the latent grid), so a concept is
              found by LODA but never outside the region drawn for it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .errors import ConceptSplitError
from .number_checks import check_choice

__all__ = ["MASK_MODES", "MASK_MODE_DEFAULT", "check_mask_mode", "check_mask_values", "prepare_user_masks", "combine"]

MASK_MODES = ("replace", "constrain")
MASK_MODE_DEFAULT = "replace"
COVERED = 0.5  # a latent pixel is inside a drawn mask when at least this share of it is covered


def check_mask_mode(mode: str) -> str:
    """Return `mode` if it is one of MASK_MODES; else raise ConceptSplitError."""
    return check_choice("mask_mode", mode, MASK_MODES)


def check_mask_values(masks) -> torch.Tensor:
    """The checks that need no latent: a tensor (M, H, W) of finite values in [0, 1], none of the masks all zero.
    Returns the masks as float32 on the CPU, (M, H, W).

    Raises: ConceptSplitError for another shape, non-finite values, values outside [0, 1] or an all-zero mask.
    """
    if not torch.is_tensor(masks) or masks.dim() not in (2, 3) or masks.numel() == 0:
        shape = tuple(masks.shape) if torch.is_tensor(masks) else type(masks).__name__
        raise ConceptSplitError.build(
            "The concept masks are not a MASK batch",
            seen=f"{shape}",
            expected="a MASK (M, H, W): one mask per concept word, in concept_words order",
            fix="connect a MASK output (Load Image's MASK, Solid Mask, a mask editor) batched in concept order",
        )
    values = masks.detach().to(device="cpu", dtype=torch.float32)
    if values.dim() == 2:
        values = values[None]  # (1, H, W): one mask
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).flatten(1).any(1).nonzero()[0])
        raise ConceptSplitError.build(
            "The concept masks hold values that are not numbers",
            seen=f"NaN or Inf in mask {bad + 1} of {values.shape[0]}",
            expected="mask values between 0 and 1",
            fix="check the node that made the masks (a division by zero, an empty image)",
        )
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 1:
        raise ConceptSplitError.build(
            "The concept masks hold values outside 0..1",
            seen=f"values from {low:g} to {high:g}",
            expected="mask values between 0 and 1 (1 = the concept is here)",
            fix="make the masks with a mask node (Image To Mask, Solid Mask, the mask editor), or clamp them",
        )
    empty = (values.flatten(1) == 0).all(1)  # (M,)
    if bool(empty.any()):
        index = int(empty.nonzero()[0])
        raise ConceptSplitError.build(
            "A concept mask is empty: its concept would act nowhere",
            seen=f"mask {index + 1} of {values.shape[0]} is all zero",
            expected="every mask covering the region of its concept",
            fix="draw the region into that mask, or remove the concept from concept_words",
        )
    return values


def _check_aspect(values: torch.Tensor, latent_hw: tuple[int, int], latent_scale: int) -> None:
    """The masks' aspect ratio must be the latent's to within one latent pixel either way (what an image size that
    is not a multiple of the latent scale leaves)."""
    height, width = values.shape[-2:]
    h, w = latent_hw
    if abs(height * w / width - h) <= 1 and abs(width * h / height - w) <= 1:
        return
    raise ConceptSplitError.build(
        "The concept masks do not have the latent's aspect ratio",
        seen=f"masks of {height}×{width} px (height×width) for a latent of {h}×{w} "
        f"(an image of {h * latent_scale}×{w * latent_scale} px)",
        expected=f"masks shaped like the image, e.g. {h * latent_scale}×{w * latent_scale} px or {h}×{w}",
        fix="draw the masks on an image of the size you generate, or scale/crop them to that aspect ratio",
    )


def prepare_user_masks(
    masks, labels: Sequence[str], batch: int, latent_hw: tuple[int, int], latent_scale: int = 8
) -> torch.Tensor:
    """The drawn masks at the latent grid, per image: (B, K, h, w) bool.

    Args:
        masks: MASK (M, H, W) float in [0, 1]; M = K (every image) or B·K (image-major).
        labels: the K concept words in LODA's order (for the messages).
        batch: B, images in the latent batch.
        latent_hw: (h, w) of the latent; latent_scale: image pixels per latent pixel (messages only).
    Raises: ConceptSplitError for a count that is neither K nor B·K, another aspect ratio, a mask that covers no
        latent pixel (all zero, or less than half of every latent pixel), and the value errors of check_mask_values.
    """
    values = check_mask_values(masks)  # (M, H, W)
    k = len(labels)
    count = values.shape[0]
    if count not in (k, batch * k):
        per_image = f" or {batch * k} (image-major: every image's {k} masks in turn)" if batch > 1 else ""
        raise ConceptSplitError.build(
            "The number of concept masks does not match the concepts",
            seen=f"{count} mask(s) for {k} concepts ({', '.join(labels)}) and {batch} image(s)",
            expected=f"{k} masks, one per concept word in concept_words order{per_image}",
            fix="batch one mask per concept word (Batch Masks, or Mask To Image → Batch Images → Image To Mask), "
            "in the order of concept_words",
        )
    _check_aspect(values, latent_hw, latent_scale)
    h, w = latent_hw
    covered = F.interpolate(values[:, None], size=(h, w), mode="area")[:, 0] >= COVERED  # (M, h, w)
    if count == k:
        covered = covered[None].expand(batch, k, h, w)
    else:
        covered = covered.unflatten(0, (batch, k))  # (B, K, h, w), image-major
    empty = ~covered.flatten(2).any(-1)  # (B, K)
    if bool(empty.any()):
        image, concept = (int(i) for i in empty.nonzero()[0])
        where = f" of image {image + 1}" if count != k else ""
        raise ConceptSplitError.build(
            f'The concept mask of "{labels[concept]}"{where} is too small: the concept would act nowhere',
            seen=f"a mask covering no latent pixel by half (a latent pixel is {latent_scale}×{latent_scale} image "
            f"px; the latent is {h}×{w})",
            expected="each mask covering at least one latent pixel by half or more",
            fix="draw a larger region for that concept",
        )
    return covered.contiguous()


def combine(found: Optional[torch.Tensor], drawn: torch.Tensor, mode: str, labels: Sequence[str]):
    """The masks a run uses, (B, K, h, w) bool at the drawn masks' grid, or None (constrain without found masks).

    Shapes: found (B, K, h0, w0) bool at the map grid (LODA's, or None when it built none); drawn (B, K, h, w) bool.
    Raises: ConceptSplitError (constrain) when LODA's mask of a concept lies wholly outside the drawn one.
    """
    if mode == "replace":
        return drawn
    if found is None:
        return None
    drawn = drawn.to(found.device)
    upsampled = F.interpolate(found.float(), size=drawn.shape[-2:], mode="nearest") > 0.5  # (B, K, h, w)
    masks = upsampled & drawn
    empty = ~masks.flatten(2).any(-1)  # (B, K)
    if bool(empty.any()):
        image, concept = (int(i) for i in empty.nonzero()[0])
        raise ConceptSplitError.build(
            f'LODA found "{labels[concept]}" wholly outside the mask drawn for it (mask_mode constrain)',
            seen=f"an empty intersection for image {image + 1} at step N",
            expected="LODA's mask and the drawn mask overlapping",
            fix="use mask_mode replace to place the concept there, draw a larger mask, or change the seed",
        )
    return masks
