"""Match an adapter's layers to the host UNet's cross-attention layers (spec §2.2) and check they fit.

The host side is described by a `UNetLayout` that the ComfyUI seam builds from the real model: one
`CrossAttentionLayer` per attn2 with its diffusers path, its ComfyUI block key and the shape of `to_v`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter_file import AdapterWeights
from .config import FAMILY_DISPLAY, FAMILY_TEXT_WIDTH
from .errors import ConceptSplitError


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One cross-attention layer of the host UNet."""

    path: str  # diffusers path of the transformer block, e.g. "down_blocks.2.attentions.0.transformer_blocks.0"
    block: tuple[str, int]  # ComfyUI block, e.g. ("input", 7)
    block_index: int  # depth index inside the SpatialTransformer (0 for SD1.5/SD2.1)
    out_features: int  # C, width of V
    in_features: int  # d, text feature width

    @property
    def key(self) -> tuple[str, int, int]:
        """ComfyUI's attn2 replace key: (block name, block id, block_index)."""
        return (self.block[0], self.block[1], self.block_index)


@dataclass(frozen=True)
class UNetLayout:
    """What the host model is: family, prediction type, text width and its cross-attention layers in order."""

    family: str  # "sd1.5", "sd2.1", "sdxl"
    prediction: str  # "eps" or "v"
    text_width: int  # d
    layers: tuple[CrossAttentionLayer, ...]

    def by_path(self) -> dict[str, CrossAttentionLayer]:
        return {layer.path: layer for layer in self.layers}


def family_for_text_width(width: int) -> str | None:
    """Name the family a full-size text width belongs to (768 SD1.5, 1024 SD2.1, 2048 SDXL), else None."""
    return next((family for family, w in FAMILY_TEXT_WIDTH.items() if w == width), None)


def bind_adapter_layers(adapter: AdapterWeights, layout: UNetLayout
                        ) -> dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]]:
    """Map the adapter's layers onto the host's attn2 layers; every layer present and shaped (spec §2.7 "Loading").

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
            expected=f"exactly the {len(host)} attn2 layers of this {FAMILY_DISPLAY.get(layout.family, layout.family)} "
                     "model",
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


def _check_family(adapter: AdapterWeights, layout: UNetLayout) -> None:
    model_name = FAMILY_DISPLAY.get(layout.family, layout.family)
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
            seen=f"lora_A input width {adapter.text_width}", expected=f"{layout.text_width} ({model_name})",
            fix=f"use an adapter trained for this {model_name} checkpoint",
        )


def _sample(paths: list[str], limit: int = 3) -> str:
    if not paths:
        return "none"
    shown = ", ".join(paths[:limit])
    return f"{shown} (+{len(paths) - limit} more)" if len(paths) > limit else shown
