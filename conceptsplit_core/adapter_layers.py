"""Match an adapter's layers to the host model's text-attention layers (method §2.2) and check they fit.

The host side is the `model_layout.ModelLayout` the model's family module builds from the real model: one
`AttentionSite` per layer with its adapter path (the diffusers path of a UNet attn2), its key and the shape of `to_v`.
"""

from __future__ import annotations

import torch

from .adapter_file import AdapterWeights
from .config import FAMILY_DISPLAY, FAMILY_TEXT_WIDTH
from .errors import ConceptSplitError
from .model_layout import LayerKey, ModelLayout


def family_for_text_width(width: int) -> str | None:
    """Name the family a full-size text width belongs to (768 SD1.5, 1024 SD2.1, 2048 SDXL), else None."""
    return next((family for family, w in FAMILY_TEXT_WIDTH.items() if w == width), None)


def bind_adapter_layers(
    adapter: AdapterWeights, layout: ModelLayout
) -> dict[LayerKey, tuple[torch.Tensor, torch.Tensor]]:
    """Map the adapter's layers onto the host's attn2 layers; every layer present and shaped (method §2.7 "Loading").

    Shapes: returns {replace key: (A (r, d), B (C, r))} for every host cross-attention layer.
    Raises: ConceptSplitError on a family mismatch, a text width mismatch, a missing, extra or mis-shaped layer.
    """
    _check_family(adapter, layout)
    host = layout.by_path()
    missing = [path for path in host if path not in adapter.layers]
    extra = [path for path in adapter.layers if path not in host]
    if missing or extra:
        raise ConceptSplitError.build(
            f'Adapter "{adapter.name}" does not cover this model\'s cross-attention layers',
            seen=f"{len(adapter.layers)} layers in the file; missing {_sample(missing)}; unknown {_sample(extra)}",
            expected=f"exactly the {len(host)} attn2 layers of this {layout.display_name} model",
            fix="use an adapter trained for this base model",
        )
    bound = {}
    for path, layer in host.items():
        lora_a, lora_b = adapter.layers[path]
        if lora_a.shape[1] != layer.in_features or lora_b.shape[0] != layer.out_features:
            raise ConceptSplitError.build(
                f'Adapter "{adapter.name}" is shaped for another model at layer {path}',
                seen=f"lora_A {tuple(lora_a.shape)}, lora_B {tuple(lora_b.shape)}",
                expected=f"lora_A (r, {layer.in_features}) and lora_B ({layer.out_features}, r)",
                fix="use an adapter trained for this base model",
            )
        bound[layer.key] = (lora_a, lora_b)
    return bound


def _check_family(adapter: AdapterWeights, layout: ModelLayout) -> None:
    model_name = layout.display_name
    if adapter.metadata is not None:
        adapter_family = adapter.metadata.family
        source = "trained for"
    else:
        adapter_family = family_for_text_width(adapter.text_width)
        source = "made for"
    if adapter_family is not None and adapter_family != layout.family:
        raise ConceptSplitError.build(
            f'Adapter "{adapter.name}" was {source} {FAMILY_DISPLAY[adapter_family]} '
            f"(text width {adapter.text_width}) but the model is {model_name} ({layout.text_width})",
            seen=f"adapter for {FAMILY_DISPLAY[adapter_family]}, model {model_name}",
            expected=f"an adapter for {model_name}",
            fix=f"load a {model_name} adapter or switch the checkpoint to {FAMILY_DISPLAY[adapter_family]}",
        )
    if adapter.text_width != layout.text_width:
        raise ConceptSplitError.build(
            f'Adapter "{adapter.name}" expects text features of width {adapter.text_width} '
            f"but the model's are {layout.text_width} wide",
            seen=f"lora_A input width {adapter.text_width}",
            expected=f"{layout.text_width} ({model_name})",
            fix=f"use an adapter trained for this {model_name} checkpoint",
        )


def _sample(paths: list[str], limit: int = 3) -> str:
    if not paths:
        return "none"
    shown = ", ".join(paths[:limit])
    return f"{shown} (+{len(paths) - limit} more)" if len(paths) > limit else shown
