"""What the pack knows of a host model, as plain data: its family, prediction type, text width and every attention
layer that reads the text, with where the maps LODA and the viewer use live.

The model-family modules of the seam (nodes/families/) build a `ModelLayout` from the real model; core code reads
only these fields, never a block name or a family name, so a new architecture needs no change here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable

# The key of one text-image attention layer: a hashable tuple (name, id, depth), e.g. ("input", 7, 0) for a UNet's
# attn2 (ComfyUI's replace key), ("double", 3, 0) / ("single", 0, 0) for a DiT block. Defined here only.
LayerKey = tuple[Hashable, ...]


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer of the host model whose keys are (or include) the text tokens."""

    key: LayerKey
    level: int  # the layer's query grid is the latent halved `level` times, ceil at each halving (map_grid)
    out_features: int  # C, width of V
    in_features: int  # d, text feature width
    path: str = ""  # name of the layer in adapter files (diffusers path of a UNet transformer block); "" = none
    heads: int = 0  # attention heads H (0 = not known)
    map: bool = False  # holds the maps LODA and the viewer use by default (the family's map level)
    loss: bool = False  # may carry LODA's stage-1 loss (a subset of the map layers)


@dataclass(frozen=True)
class ModelLayout:
    """The host model: family, prediction type, text width and its text-attention layers in execution order."""

    family: str  # a family name (config.FAMILY_* for the UNet families), e.g. "sd1.5", "sd2.1", "sdxl"
    prediction: str  # "eps" or "v" (config.PREDICTION_*), or a family's own, e.g. "flow"
    text_width: int  # d
    layers: tuple[AttentionSite, ...]
    display: str = ""  # the family's name for people, e.g. "SDXL"; "" = `family`
    joint: bool = False  # text and image tokens in one sequence (DiT joint attention), not cross-attention
    latent_scale: int = 8  # image pixels per latent pixel

    @property
    def display_name(self) -> str:
        """The family's name for messages."""
        return self.display or self.family

    @property
    def keys(self) -> tuple[LayerKey, ...]:
        """Every layer's key, in execution order."""
        return tuple(layer.key for layer in self.layers)

    def by_path(self) -> dict[str, AttentionSite]:
        """{adapter path: site} of the layers that have a path."""
        return {layer.path: layer for layer in self.layers if layer.path}

    def levels(self) -> dict[LayerKey, int]:
        """{layer key: level}, in execution order."""
        return {layer.key: layer.level for layer in self.layers}

    def map_keys(self) -> frozenset:
        """The layers the maps are read from by default (the family's map level)."""
        return frozenset(layer.key for layer in self.layers if layer.map)


def map_grid(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """Grid after `level` stride-2 downsamplings with padding 1: ceil at each one (method §3.1, integration §1.3)."""
    h, w = latent_hw
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w
