"""The pack's nodes called as ComfyUI's executor calls them (inference mode), shared by the integration tests."""

from __future__ import annotations

import torch


def encode(pack, clip, text: str):
    """ConceptSplit Text Encode of `text` -> CONDITIONING."""
    with torch.inference_mode():
        return pack.glue("prompt").ConceptSplitTextEncode.execute(clip, text).result[0]


def bind(pack, bindings):
    """bindings: [(file name, word, strength)] -> BOUND_LORAS, one Bind LoRA to Concept node per binding."""
    node = pack.glue("bound_lora").BindLoraToConcept
    bound = None
    for name, word, strength in bindings:
        bound = node.execute(name, word, strength, bound).result[0]
    return bound


def apply_bound(pack, model, bound, positive, **options):
    """Apply Bound LoRAs -> its outputs (MODEL, ...)."""
    with torch.inference_mode():
        return pack.glue("bound_lora").ApplyBoundLoras.execute(model, bound, positive, **options).result
