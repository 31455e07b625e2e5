"""The model-family interface: what the pack asks of an architecture (docs/architecture.md).

One module per family in this package answers these questions for its models; nodes and the other seam modules
ask the family object that `model_family(model_patcher)` returns, and core code reads the plain-data
`model_layout.ModelLayout` the family builds. Adding an architecture is adding one module and registering its
family objects in `nodes/families/__init__.py`.
"""

from __future__ import annotations

from typing import ContextManager, Iterable, Optional, Protocol, runtime_checkable

import comfy.supported_models

from ...conceptsplit_core.model_layout import LayerKey, ModelLayout
from ...conceptsplit_core.prompt_tokens import PromptTokens


@runtime_checkable
class ModelFamily(Protocol):
    """One architecture family (a module-level instance per family)."""

    name: str  # the family's id, stored in adapter metadata for the UNet families: "sd1.5", "sd2.1", "sdxl", ...
    display: str  # for people: "SD1.5", "SD2.1", "SDXL", "Flux.1", ...
    supports_tova: bool  # False: Apply ToVA and training refuse this family with a ConceptSplitError
    supports_checkpointing: bool  # False: LODA refuses gradient_checkpointing on this family
    supports_bound_loras: bool  # False: Apply Bound LoRAs refuses this family with a ConceptSplitError

    def available(self) -> bool:
        """Whether this ComfyUI has the family's model classes (older versions lack the newer families)."""

    def matches(self, model_patcher) -> bool:
        """Whether this family describes the MODEL."""

    def layout(self, model_patcher) -> ModelLayout:
        """The model's text-attention layers and where its maps are, as plain data."""

    def default_map_layers(self, layout: ModelLayout, latent_hw: tuple[int, int]) -> frozenset:
        """The layers LODA and the viewer read maps from by default."""

    def map_grid(self, layout: ModelLayout, key: LayerKey, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the query grid of layer `key` for a latent of `latent_hw`."""

    def matches_clip(self, clip) -> bool:
        """Whether `clip` is this family's own text encoder (one whose prompt positions only this family knows);
        False for the CLIP-L/H/G encoders, whose positions comfy_text reads for every UNet family."""

    def prompt_tokens(self, clip, text: str) -> PromptTokens:
        """The token positions of `text` in the context the model sees."""

    def word_token_ids(self, clip, word: str) -> tuple[int, ...]:
        """The word's token ids alone, as the prompt tokenizer writes it inside a prompt."""

    def default_word_token_ids(self, word: str) -> tuple[int, ...]:
        """The word's token ids without the model's text encoder (for nodes that get CONDITIONING only)."""

    def install_observers(self, model_options: dict, layout: ModelLayout, observers: tuple) -> dict:
        """A NEW model_options whose every text-image attention call reports to the AttentionObserver objects."""

    def check_fixing_patches(self, model_options: dict, layout: ModelLayout, fixing_keys) -> None:
        """Raise if another pack's attention patch on a biased layer cannot take LODA's bias."""

    def gradient_pass_options(self, model_options: dict, conds) -> dict:
        """model_options for a gradient pass w.r.t. the latent (patches autograd needs), else the same dict."""

    def differentiable(
        self, model_patcher, conds=None, checkpointing: bool = False, keep_layers: Iterable[LayerKey] = ()
    ) -> ContextManager:
        """What makes a gradient pass through the model work inside ComfyUI's inference-mode sampling; with
        `checkpointing`, the model's blocks are recomputed in backward, except those holding `keep_layers`."""

    def bound_lora_site(self, module_path: str) -> str:
        """Where a LoRA patch on the diffusion model's module `module_path` acts (bound LoRAs, nodes/comfy_lora.py):
        "image" (its rows or pixels are image positions of the latent), "text" (its rows are prompt tokens),
        "joint" (its rows are the joint sequence [text | image | other]), "joint_image" (rows of the joint
        sequence, acting on its image rows only: Z-Image's final layer) or "global" (no positions: left out)."""

    def bound_lora_rows(self, layout: ModelLayout, x, context) -> Optional[object]:
        """Where the text and image rows of this model call sit (a dit_attention.JointGeometry: the one the attention
        hook uses), for `x` the latent and `context` (B, T, d) the call's text; None where each layer's grid is read
        from its own shape (UNets: one grid per resolution level)."""


class FamilyBase:
    """Shared behaviour of the family objects: they are singletons, so copies (ComfyUI deep-copies sampler options
    and model_options) are the object itself."""

    name = ""
    display = ""
    supports_tova = False
    supports_checkpointing = True
    supports_bound_loras = False
    comfy_class = ""  # the class of comfy.supported_models this family needs ("": one every supported ComfyUI has)

    def available(self) -> bool:
        """Whether this ComfyUI has the family's model class (capability, never the version string)."""
        return not self.comfy_class or hasattr(comfy.supported_models, self.comfy_class)

    def matches_clip(self, clip) -> bool:
        """Whether `clip` is a text encoder only this family reads (default: no; CLIP-L/H/G are comfy_text's)."""
        return False

    def bound_lora_site(self, module_path: str) -> str:
        """Families without bound-LoRA support have no sites (Apply Bound LoRAs refuses them first)."""
        raise NotImplementedError(f"{self.display} has no bound-LoRA sites")

    def bound_lora_rows(self, layout: ModelLayout, x, context):
        """None: each layer's positions are read from its own shape."""
        return None

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __repr__(self) -> str:
        return f"<model family {self.name}>"
