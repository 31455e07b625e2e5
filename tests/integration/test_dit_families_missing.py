"""DiT families this ComfyUI is too old for, and models no family describes: a clear ConceptSplitError on every
supported version, never a crash deep in a hook.

Runs on every version. Z-Image's model class (comfy.supported_models.ZImage) exists from ComfyUI 0.33.0 on; whether
this ComfyUI has it is read from the class itself (capability), never from a version string. Its base class, plain
Lumina2 (Lumina-Image 2.0, in every supported version), is not a family of the pack and must be refused as such.
"""

from __future__ import annotations

import pytest
import torch

from comfy_harness.tiny_dit_models import build_tiny_lumina2


def _has_zimage() -> bool:
    import comfy.supported_models

    return hasattr(comfy.supported_models, "ZImage")


def _refusal(pack, model) -> str:
    with pytest.raises(pack.error) as caught:
        pack.glue("families").model_family(model)
    return str(caught.value)


def _newer_part(message: str) -> str:
    """The part of the refusal naming the families this ComfyUI is too old for ('' when it has them all)."""
    head = message.split(". Seen:")[0]
    return head.split("models only", 1)[1] if "models only" in head else ""


def test_a_plain_lumina2_model_is_refused_by_every_family_entry_point(pack):
    with torch.inference_mode():
        model = build_tiny_lumina2()
    families = pack.glue("families")
    assert not any(family.matches(model) for family in families.FAMILIES)
    message = _refusal(pack, model)
    supported = message.split("models only")[0]
    assert message.startswith("ConceptSplit supports SDXL, SD2.1, SD1.5, ") and "a Lumina2 model" in message
    assert all(family.display in supported for family in families.available_families())
    with pytest.raises(pack.error, match="ConceptSplit supports"):
        pack.glue("viewer").CaptureAttention.execute(model, "cat, dog", "first token", 0, -1, "all")
    with pytest.raises(pack.error, match="ConceptSplit supports"):
        families.tova_family(model)


def test_the_refusal_names_z_image_as_needing_a_newer_comfyui_only_where_this_one_lacks_it(pack):
    families = pack.glue("families")
    with torch.inference_mode():
        model = build_tiny_lumina2()
    message = _refusal(pack, model)
    supported, newer = message.split("models only", 1)[0], _newer_part(message)
    zimage = families.Z_IMAGE
    assert zimage.comfy_class == "ZImage" and zimage.available() == _has_zimage()
    assert (zimage in families.available_families()) == _has_zimage()
    if _has_zimage():  # 0.33.0 and newer: Z-Image is one of the supported families, not in the "newer" part
        assert "Z-Image" in supported and "Z-Image" not in newer
        assert "for Z-Image" not in message.split("Fix:")[1]
    else:  # 0.3.64: Z-Image needs a newer ComfyUI, and the version to update to is named
        assert "Z-Image" not in supported
        assert "Z-Image" in newer and "a newer ComfyUI" in newer and families.NEWEST_TESTED_COMFYUI in newer
        assert families.NEWEST_TESTED_COMFYUI == "0.33.0"
        fix = message.split("Fix:")[1]
        assert "update ComfyUI to 0.33.0 or newer" in fix and "Z-Image" in fix


def test_z_image_does_not_take_a_plain_lumina2_config_nor_its_text_encoder(pack):
    """The class check itself: a Lumina2 config is not a Z-Image (ZImage subclasses Lumina2, not the reverse), and
    Lumina2's Gemma tokenizer is not Z-Image's (their prompts sit differently in the context)."""
    import types

    import comfy.supported_models

    zimage = pack.glue("families").Z_IMAGE
    lumina = comfy.supported_models.Lumina2.__new__(comfy.supported_models.Lumina2)
    assert not zimage.matches(types.SimpleNamespace(model=types.SimpleNamespace(model_config=lumina)))
    lumina_tokenizer = type("LuminaTokenizer", (), {})()
    assert not zimage.matches_clip(types.SimpleNamespace(tokenizer=lumina_tokenizer))
    if _has_zimage():
        config = comfy.supported_models.ZImage.__new__(comfy.supported_models.ZImage)
        assert zimage.matches(types.SimpleNamespace(model=types.SimpleNamespace(model_config=config)))
