"""Random ToVA adapters shaped for the tiny test models (native and official format), for tests, bench and demo.

Shapes come from the pack's own layout of a tiny model (every attn2.to_v: A (r, d), B (C, r)); B is non-zero so
the delta is visible (a freshly initialised adapter has B = 0 and would change nothing).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_RANK = 4


def _pack_module(name: str):
    from comfy_harness.comfy_bootstrap import load_pack_in_process
    import importlib

    return importlib.import_module(f"{load_pack_in_process().__name__}.{name}")


def tiny_adapter_layers(model_patcher, seed: int, rank: int = TINY_RANK, magnitude: float = 0.5):
    """{diffusers path: (A (r, d), B (C, r))} random for this model's cross-attention layers."""
    layout = _pack_module("nodes.families").model_family(model_patcher).layout(model_patcher)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for layer in layout.layers:
        lora_a = torch.randn(rank, layer.in_features, generator=g) / layer.in_features**0.5
        lora_b = torch.randn(layer.out_features, rank, generator=g) * magnitude
        layers[layer.path] = (lora_a, lora_b)
    return layout, layers


def write_tiny_adapter(
    path: Path | str,
    model_patcher,
    word: str,
    seed: int,
    *,
    role: str = "object",
    official: bool = False,
    rank: int = TINY_RANK,
) -> Path:
    """Write a random adapter for `model_patcher` in the native (default) or the official format."""
    path = Path(path)
    layout, layers = tiny_adapter_layers(model_patcher, seed, rank)
    if official:
        state = {}
        for layer_path, (lora_a, lora_b) in layers.items():
            state[f"unet.{layer_path}.attn2.to_v.original_linear.lora_A.weight"] = lora_a
            state[f"unet.{layer_path}.attn2.to_v.original_linear.lora_B.weight"] = lora_b
        save_file(state, str(path), metadata={"format": "pt"})
        return path
    adapter_file = _pack_module("conceptsplit_core.adapter_file")
    base = layout.family + ("-v" if layout.family == "sd2.1" and layout.prediction == "v" else "")
    meta = adapter_file.AdapterMetadata(
        base_model=base,
        text_width=layout.text_width,
        rank=rank,
        alpha=rank,
        identifier_word=word,
        role=role,
        prediction=layout.prediction,
        layers=len(layers),
    )
    return adapter_file.write_adapter_file(path, layers, meta, overwrite=True)
