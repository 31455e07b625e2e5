"""Per-image concept attention maps as they travel between nodes (LODA sampler -> attention viewer).

Socket type `CONCEPTSPLIT_MAPS`. Core form of method §8: `(K, h, w)` per image, stacked over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model_layout import LayerKey


@dataclass(frozen=True)
class ConceptMaps:
    """Concept maps Ā[:, :, s_k] (method §3.1), one stack per image, with the concept labels in concept order."""

    labels: tuple[str, ...]  # one per concept, e.g. ("dog", "cat")
    maps: torch.Tensor  # (B, K, h, w) fp32 on the CPU, K = len(labels); attention probabilities, not normalised
    steps: tuple[int, ...] = ()  # 0-based sampling steps the maps average over; () = not recorded
    layers: tuple[LayerKey, ...] = ()  # keys of the layers averaged over; () = not recorded
    # Per recorded step, for the interactive viewer (Capture Attention keeps them, issue 15): step_maps[:, i] is the
    # mean over the model calls × layers of step `steps[i]`, step_weights[i] how many (call, layer) maps it averages,
    # so Σ_i w_i · step_maps[:, i] / Σ_i w_i == maps (up to float rounding). None / () = not kept.
    step_maps: torch.Tensor | None = None  # (B, S_rec, K, h, w) fp32 on the CPU, S_rec = len(steps)
    step_weights: tuple[int, ...] = ()
    total_steps: int = 0  # S of the sampling run; 0 = not recorded
    prompt: str = ""  # the positive prompt's text, for the viewer's word strip; "" = not recorded
    # LODA Sampler runs: stage 1 ran on steps 0 .. stage1_steps − 1, masks were taken at mask_step.
    stage1_steps: int | None = None  # None = not a LODA run
    mask_step: int | None = None  # None = no masks were built
    masks: torch.Tensor | None = None  # (B, K, h, w) bool, LODA's stage-2 masks at map level

    def __post_init__(self) -> None:
        assert self.maps.dim() == 4 and self.maps.shape[1] == len(self.labels), "maps are (B, K, h, w)"
        if self.step_maps is not None:
            assert self.step_maps.dim() == 5 and self.step_maps.shape[1] == len(self.steps) == len(self.step_weights)
            assert self.step_maps.shape[:1] + self.step_maps.shape[2:] == self.maps.shape, "(B, S_rec, K, h, w)"
        if self.masks is not None:
            assert self.masks.shape == self.maps.shape, "masks are (B, K, h, w)"
