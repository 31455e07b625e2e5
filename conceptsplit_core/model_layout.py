"""Plain-data description of a model's text-image attention sites, shared by every model family (the family
contract): what the core code asks instead of testing block names or family strings.

UNet families describe their attn2 layers; DiT families (Flux.1, ...) their joint attention blocks, where text and
image tokens form one sequence (text first) and one softmax runs over all keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from .attention_calls import BlockKey


@dataclass(frozen=True)
class AttentionSite:
    """One attention call that mixes text into the image: a UNet attn2 layer or a DiT joint-attention block."""

    key: BlockKey  # ("input", 7, 0) / ("double", 3, 0) / ("single", 0, 0)
    grid_divisor: int  # query grid = ceil(latent side / grid_divisor) (UNet: 2**level, DiT: the patch size)
    heads: int


@dataclass(frozen=True)
class ModelLayout:
    """A model's family, prediction, text width and attention sites, in execution order."""

    family: str  # "sd15" | "sd21" | "sdxl" | "flux" | "flux2" | "zimage" | "qwenimage"
    display: str  # "Flux.1", ...
    prediction: str  # "eps" | "v" | "flow" (ComfyUI's CONST: x_σ = (1 − σ)·x0 + σ·ε)
    text_width: int  # width of the text features the model takes
    joint: bool  # text and image tokens in one sequence (DiT) rather than cross-attention (UNet)
    sites: tuple[AttentionSite, ...]

    @property
    def keys(self) -> tuple[BlockKey, ...]:
        return tuple(site.key for site in self.sites)
