"""Model families (the family contract): one module per architecture; `model_family` picks the one of a MODEL.

This branch registers the DiT families (Flux.1 first); the UNet family module (`unet.py`) comes with the seam
refactor. Until then the UNet path stays in comfy_hooks and callers ask `dit_family(model)` (None = a UNet).
"""

from __future__ import annotations

from ...conceptsplit_core.errors import ConceptSplitError
from .flux import FLUX
from .qwenimage import QWEN_IMAGE

FAMILIES = (FLUX, QWEN_IMAGE)  # match order: a subclass family (Flux.2 subclasses Flux.1's config) goes before its base
SUPPORTED = "SD1.5, SD2.x, SDXL, Flux.1, Qwen-Image"


def dit_family(model_patcher):
    """The DiT family of a MODEL, or None (a UNet, handled by comfy_hooks, or an unsupported model)."""
    return next((family for family in FAMILIES if family.matches(model_patcher)), None)


def family_named(name: str):
    """The registered family called `name` ("flux", ...)."""
    return next(family for family in FAMILIES if family.name == name)


def clip_family(clip):
    """The DiT family whose text encoder this CLIP is, or None (a CLIP-L/H/G text encoder)."""
    return next((family for family in FAMILIES if family.matches_clip(clip)), None)


def model_family(model_patcher):
    """The registered family of a MODEL. Raises: ConceptSplitError naming the supported families."""
    family = dit_family(model_patcher)
    if family is None:
        raise ConceptSplitError.build(
            "This model family is not supported", seen=f"a {type(model_patcher.model.model_config).__name__} model",
            expected=SUPPORTED, fix=f"load a {SUPPORTED} checkpoint")
    return family


def refuse_tova(model_patcher, what: str = "ToVA adapters") -> None:
    """Raise on a DiT model: ToVA and training are UNet-only for now."""
    family = dit_family(model_patcher)
    if family is not None:
        raise family.tova_error(what)
