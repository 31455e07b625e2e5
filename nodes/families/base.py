"""The model-family contract (briefs: family contract): what core code and nodes ask a model family, and the shared
part of every DiT family (joint attention, text tokens first). One module per family answers for it."""

from __future__ import annotations

import math
from typing import ContextManager, Protocol

from ...conceptsplit_core.attention_calls import BlockKey
from ...conceptsplit_core.errors import ConceptSplitError
from ...conceptsplit_core.model_layout import ModelLayout
from ...conceptsplit_core.prompt_tokens import PromptTokens


class ModelFamily(Protocol):
    """One architecture family (module-level instance in nodes/families/<family>.py)."""

    name: str
    display: str
    supports_tova: bool

    def matches(self, model_patcher) -> bool: ...

    def layout(self, model_patcher) -> ModelLayout: ...

    def default_map_layers(self, layout: ModelLayout, latent_hw: tuple[int, int]) -> frozenset: ...

    def map_grid(self, layout: ModelLayout, key: BlockKey, latent_hw: tuple[int, int]) -> tuple[int, int]: ...

    def prompt_tokens(self, clip, text: str) -> PromptTokens: ...

    def install_observers(self, model_options: dict, layout: ModelLayout, observers: tuple) -> dict: ...

    def differentiable(self, model_patcher) -> ContextManager: ...


class JointGeometry:
    """Where the tokens of one DiT forward sit in every joint attention call: text rows 0 .. text_tokens − 1, the
    latent's image tokens image_start .. image_start + h·w − 1 (raster order of the patch grid); later rows (Flux
    Kontext reference latents, image padding) are neither. `calls` counts the joint calls of this forward."""

    def __init__(self, text_tokens: int, image_start: int, grid: tuple[int, int]):
        self.text_tokens = text_tokens
        self.image_start = image_start
        self.grid = grid
        self.calls = 0

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


class DitFamily:
    """Shared answers of the DiT families; subclasses name their classes, blocks, tokenizer and geometry."""

    name = ""
    display = ""
    supports_tova = False
    joint = True

    def tova_error(self, what: str = "ToVA adapters") -> ConceptSplitError:
        """The error of Apply ToVA / Train on this family (ToVA is defined on UNet cross-attention)."""
        return ConceptSplitError.build(
            f"{what} are defined on UNet cross-attention; {self.display} is not supported yet",
            seen=f"a {self.display} model (a DiT: text and image tokens share one joint attention)",
            expected="an SD1.5, SD2.x or SDXL model for ToVA and training",
            fix=f"use LODA, Capture Attention and the viewer on {self.display}, or ToVA with a UNet checkpoint")

    def patch_grid(self, latent_hw: tuple[int, int], patch: int) -> tuple[int, int]:
        """Image-token grid of a latent: ComfyUI pads it to a multiple of the patch size, then patchifies."""
        return math.ceil(latent_hw[0] / patch), math.ceil(latent_hw[1] / patch)

    def install_observers(self, model_options: dict, layout: ModelLayout, observers: tuple) -> dict:
        from . import dit_attention

        return dit_attention.with_dit_observers(model_options, self, layout, observers)
