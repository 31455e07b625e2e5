"""The model families the pack supports, in match order, and `model_family`, the one place that tells which family a
MODEL belongs to. A new architecture adds its module here (one import, its objects appended to FAMILIES)."""

from __future__ import annotations

from ...conceptsplit_core.errors import ConceptSplitError
from .base import FamilyBase, ModelFamily
from .flux import FLUX
from .flux2 import FLUX2
from .qwenimage import QWEN_IMAGE
from .unet import SD15, SD21, SDXL
from .zimage import Z_IMAGE

# Order matters: the first family whose matches() is true wins (SDXL variants subclass SDXL, SD2 unCLIP SD20; a
# subclass family such as Flux.2, whose config subclasses Flux.1's, goes before its base).
FAMILIES: tuple[ModelFamily, ...] = (SDXL, SD21, SD15, FLUX2, FLUX, QWEN_IMAGE, Z_IMAGE)

# The newest ComfyUI the pack is tested on: named in the error for a family this ComfyUI is too old to have.
NEWEST_TESTED_COMFYUI = "0.33.0"

__all__ = [
    "FAMILIES",
    "available_families",
    "FamilyBase",
    "ModelFamily",
    "clip_family",
    "family_of_layout",
    "model_family",
    "tova_family",
]


def model_family(model_patcher) -> ModelFamily:
    """The family of a MODEL (a ComfyUI ModelPatcher).

    Raises: ConceptSplitError naming the supported families for a model none of them describes, and the families
    this ComfyUI is too old to have, with the version to update to.
    """
    families = available_families()
    for family in families:
        if family.matches(model_patcher):
            return family
    config = getattr(getattr(model_patcher, "model", None), "model_config", None)
    names = _listed([family.display for family in families])
    missing = [family.display for family in FAMILIES if family not in families]
    newer = (
        f"; {_listed(missing)} {'needs' if len(missing) == 1 else 'need'} a newer ComfyUI than this one, which has "
        f"no model class for {'it' if len(missing) == 1 else 'them'} (the pack tests them on ComfyUI "
        f"{NEWEST_TESTED_COMFYUI})"
        if missing
        else ""
    )
    raise ConceptSplitError.build(
        f"ConceptSplit supports {names} models only{newer}",
        seen=f"a {type(config if config is not None else model_patcher).__name__} model",
        expected=f"a {names} checkpoint",
        fix=f"load a {names} checkpoint"
        + (f", or update ComfyUI to {NEWEST_TESTED_COMFYUI} or newer for {_listed(missing)}" if missing else ""),
    )


def available_families() -> tuple[ModelFamily, ...]:
    """The families whose model classes this ComfyUI has, in match order."""
    return tuple(family for family in FAMILIES if family.available())


def family_of_layout(layout) -> ModelFamily:
    """The family that built `layout` (a model_layout.ModelLayout), by its name."""
    return next(family for family in FAMILIES if family.name == layout.family)


def clip_family(clip) -> ModelFamily | None:
    """The family whose own text encoder `clip` is (T5 of Flux.1, Qwen2.5-VL of Qwen-Image), or None for a
    CLIP-L/H/G text encoder, whose prompt positions comfy_text reads for every UNet family."""
    return next((family for family in available_families() if family.matches_clip(clip)), None)


def tova_family(model_patcher) -> ModelFamily:
    """The family of a MODEL that ToVA (Apply ToVA, training) works on.

    Raises: ConceptSplitError for an unsupported model, or a family without ToVA support.
    """
    family = model_family(model_patcher)
    if not family.supports_tova:
        raise ConceptSplitError.build(
            f"ToVA adapters are defined on UNet cross-attention; {family.display} is not supported yet",
            seen=f"a {family.display} model",
            expected=_listed([f.display for f in FAMILIES if f.supports_tova]) + " for ToVA",
            fix=f"use a {_listed([f.display for f in FAMILIES if f.supports_tova])} checkpoint for ToVA",
        )
    return family


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
