"""Per-image concept attention maps as they travel between nodes (LODA sampler -> attention viewer).

Socket type `CONCEPTSPLIT_MAPS`. Core form of spec §8 (STYLE §8): `(K, h, w)` per image, stacked over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ConceptMaps:
    """Concept maps Ā[:, :, s_k] (spec §3.1), one stack per image, with the concept labels in concept order."""

    labels: tuple[str, ...]  # one per concept, e.g. ("dog", "cat")
    maps: torch.Tensor  # (B, K, h, w) fp32 on the CPU, K = len(labels); attention probabilities, not normalised
    steps: tuple[int, ...] = ()  # 0-based sampling steps the maps average over; () = not recorded
    layers: tuple[tuple[str, int, int], ...] = ()  # attn2 block keys averaged over; () = not recorded

    def __post_init__(self) -> None:
        assert self.maps.dim() == 4 and self.maps.shape[1] == len(self.labels), "maps are (B, K, h, w)"
