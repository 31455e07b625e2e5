"""A tiny seeded ControlNet for the tiny test models, built with ComfyUI's own classes (for chaining tests)."""

from __future__ import annotations

import torch

from .tiny_models import _init_module, _unet_config


def build_tiny_controlnet(arch: str = "sd15", seed: int = 0):
    """comfy.controlnet.ControlNet over a cldm ControlNet shaped like the tiny `arch` UNet; hint is an RGB image.

    Random weights (zero-convs included), so the control visibly changes the result.
    """
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops

    config = _unet_config(arch)
    for key in ("out_channels", "use_temporal_attention", "use_temporal_resblock"):
        config.pop(key, None)
    heads = {"num_heads": 2} if arch == "sd15" else {"num_head_channels": 32}
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu", dtype=torch.float32, **heads)
    control_model = comfy.cldm.cldm.ControlNet(**config)
    _init_module(control_model, torch.Generator().manual_seed(seed))
    return comfy.controlnet.ControlNet(control_model, load_device=mm.get_torch_device(), manual_cast_dtype=None)
