"""Tiny seeded SD1.5 / SD2.1 / SDXL models built in code (recipe A, docs/comfyui-integration.md §6).

Real ComfyUI classes and key names with tiny widths, so hooks see the true layer layout but a build plus a
few sampling steps take well under a second on CPU. Context widths: sd15 32 (clip_l), sd21 64 (clip_h),
sdxl 96 (clip_l 32 + clip_g 64, pooled 64). Requires ``comfy_bootstrap.bootstrap_comfyui`` first.
"""

from __future__ import annotations

import contextlib
import logging

import torch

TINY_ARCHS = ("sd15", "sd21", "sdxl")

# Widths of the tiny text encoders; an SDXL context is clip_l + clip_g wide.
_CLIP_WIDTHS = {"clip_l": 32, "clip_h": 64, "clip_g": 64}
CONTEXT_WIDTHS = {"sd15": 32, "sd21": 64, "sdxl": 96}

_VAE_CONFIG = {
    "params": {
        "embed_dim": 4,
        "ddconfig": {
            "double_z": True,
            "z_channels": 4,
            "resolution": 64,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 32,
            "ch_mult": [1, 1, 1, 1],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    }
}


def _unet_config(arch: str) -> dict:
    cfg = dict(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=64,
        num_res_blocks=[1, 1],
        channel_mult=[1, 2],
        transformer_depth=[1, 1],
        transformer_depth_output=[1, 1, 1, 1],
        transformer_depth_middle=1,
        context_dim=CONTEXT_WIDTHS[arch],
        use_spatial_transformer=True,
        legacy=False,
        use_checkpoint=False,
        use_temporal_attention=False,
        use_temporal_resblock=False,
        use_linear_in_transformer=arch != "sd15",
        adm_in_channels=None,
    )
    if arch == "sdxl":
        # pooled clip_g width + 6 size embeddings of 256 (comfy.model_base.SDXL.encode_adm)
        cfg.update(num_classes="sequential", adm_in_channels=_CLIP_WIDTHS["clip_g"] + 1536)
    return cfg


def seeded_value(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """The init rule of every tiny test weight: N(0, 0.02) for matrices, 1 for 1-D weights (norm scales), 0 for
    biases."""
    if len(shape) >= 2:
        return torch.randn(shape, generator=gen) * 0.02
    return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)


def _init_module(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Seeded init; comfy ops skip reset_parameters, so weights start as torch.empty garbage.

    1-D weights (norm scales) get 1: a zero GroupNorm scale makes the UNet output exactly 0 and patch tests
    pass vacuously (integration §6).
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(seeded_value(name, p.shape, gen).to(p.dtype))
        for name, b in module.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                raise AssertionError(f"buffer {name} is not finite after build")
        bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise AssertionError(f"non-finite parameters after init: {bad[:5]}")


def _build_clip(arch: str, gen: torch.Generator):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base
    import comfy.text_encoders.sd2_clip

    targets = {
        "sd15": (comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel, ["clip_l"]),
        "sd21": (comfy.text_encoders.sd2_clip.SD2Tokenizer, comfy.text_encoders.sd2_clip.SD2ClipModel, ["clip_h"]),
        "sdxl": (comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel, ["clip_l", "clip_g"]),
    }
    tokenizer, model, names = targets[arch]
    options = {"dtype": torch.float32}
    for name in names:
        width = _CLIP_WIDTHS[name]
        # SDClipModel merges "<name>_model_config" into its JSON config, which shrinks the encoder.
        options[f"{name}_model_config"] = {
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_attention_heads": 2,
            "num_hidden_layers": 3,
        }
    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, model), model_options=options)
    _init_module(clip.cond_stage_model, gen)
    return clip


@contextlib.contextmanager
def _quiet_missing_vae_keys():
    """comfy.sd.VAE logs every key of an empty state dict as missing; we initialise them right after."""

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Missing VAE keys")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def build_tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build a fresh tiny (MODEL, CLIP, VAE) triple; the same seed gives bit-identical weights.

    Works inside and outside ``torch.inference_mode`` (the executor builds under it). Nothing is cached.
    ``dtype`` is the UNet's (ComfyUI's inference dtype, no manual cast); the float32 draws are exact in float64, so
    ``torch.float64`` gives the same weights in higher precision, for comparing two implementations of the same maths
    without float32 rounding. CLIP and VAE stay float32 (ComfyUI casts the conditioning to the UNet's dtype).

    Returns:
        (comfy.model_patcher.ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE); sd21 is V_PREDICTION, others EPS.

    Raises:
        ValueError: unknown ``arch``.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"Unknown tiny arch {arch!r}; expected one of {TINY_ARCHS}")
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    gen = torch.Generator().manual_seed(seed)
    config_cls = {
        "sd15": comfy.supported_models.SD15,
        "sd21": comfy.supported_models.SD20,
        "sdxl": comfy.supported_models.SDXL,
    }[arch]
    mc = config_cls(_unet_config(arch))
    # __init__ forces the full-size head layout from unet_extra_config; shrink it back.
    if arch == "sd15":
        mc.unet_config["num_heads"] = 2
    else:
        mc.unet_config["num_head_channels"] = 32
    mc.set_inference_dtype(dtype, None)
    model_type = comfy.model_base.ModelType.V_PREDICTION if arch == "sd21" else comfy.model_base.ModelType.EPS
    base_cls = comfy.model_base.SDXL if arch == "sdxl" else comfy.model_base.BaseModel
    base = base_cls(mc, model_type=model_type)
    _init_module(base.diffusion_model, gen)
    model = comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )
    clip = _build_clip(arch, gen)
    with _quiet_missing_vae_keys():
        vae = comfy.sd.VAE(sd={}, config=_VAE_CONFIG)
    _init_module(vae.first_stage_model, gen)
    return model, clip, vae


# attn2 q/k factor that makes a tiny model's cross-attention far from uniform (see sharpen_cross_attention). SDXL's
# penultimate, un-normalised text features are smaller, so it needs a larger factor for the same effect.
SHARPEN_FACTORS = {"sd15": 10.0, "sd21": 10.0, "sdxl": 20.0}


def sharpen_cross_attention(model_patcher, factor: float) -> None:
    """Scale every attn2 ``to_q`` and ``to_k`` weight of the UNet by ``factor`` in place (logits × factor²).

    With N(0, 0.02) weights every pixel attends to every token alike (LODA's pairwise KL is ~1e-6), so neither the
    maps nor LODA's effects on them can be seen; ×10 on q and k gives maps far from flat. Works on weights built
    inside or outside ``torch.inference_mode`` (the executor builds under it). The model is changed in place.
    """
    for name, module in model_patcher.model.diffusion_model.named_modules():
        if not name.endswith(".attn2"):
            continue
        for weight in (module.to_q.weight, module.to_k.weight):
            # inference tensors can only be changed under inference mode, normal ones under no_grad
            with torch.inference_mode() if weight.is_inference() else torch.no_grad():
                weight.mul_(factor)
