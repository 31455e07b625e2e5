"""A minimal SD1.5 checkpoint that ComfyUI's real loader accepts (recipe B, docs/comfyui-integration.md §6).

``CheckpointLoaderSimple`` only detects SD15 for ``model_channels=320, context_dim=768``, so the UNet keeps real
widths with a single level (18.7 M params). The loader builds CLIP-L from a fixed config and leaves missing keys
uninitialised, so the text encoder is full size (123 M params); together they dominate the file. The VAE is
the smallest one the loader recognises: a TAESD (``first_stage_model.taesd_*`` keys, 2.4 M params) instead of
the 84 M-param AutoencoderKL; pass ``full_vae=True`` for the real-shaped one (+160 MB).

Measured on CPU (ComfyUI 0.3.64, torch 2.14): the default file is 289 MB in fp16, written in ~2.5 s, and
``load_checkpoint_guess_config`` loads it in ~0.1 s (``full_vae=True``: 451 MB, ~3 s, ~0.5 s). Weights are
random (seeded), so images are noise.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .tiny_models import seeded_value

_UNET_CONFIG = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=[1],
    channel_mult=[1],
    transformer_depth=[1],
    transformer_depth_output=[1, 1],
    transformer_depth_middle=-2,
    context_dim=768,
    use_spatial_transformer=True,
    legacy=False,
    use_checkpoint=False,
    use_temporal_attention=False,
    use_temporal_resblock=False,
    use_linear_in_transformer=False,
    adm_in_channels=None,
)
# SD1.x latents are scaled by 0.18215 before the VAE sees them; TAESD undoes it with vae_scale.
_TAESD_SCALE = 0.18215
_FULL_VAE_CONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def _seeded_state_dict(module: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """fp16 tensors for every parameter of a meta-device module, with the same init rule as tiny_models."""
    out = {}
    for name, p in module.named_parameters():
        out[name] = seeded_value(name, p.shape, gen).to(torch.float16)
    return out


def write_tiny_sd15_checkpoint(path: Path | str, seed: int = 0, full_vae: bool = False) -> Path:
    """Write a seeded SD1.5-detectable ``.safetensors`` checkpoint to ``path`` (atomically) and return it.

    Requires ``comfy_bootstrap.bootstrap_comfyui`` first.
    """
    import comfy.model_base
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    gen = torch.Generator().manual_seed(seed)
    mc = comfy.supported_models.SD15(_UNET_CONFIG)
    mc.set_inference_dtype(torch.float16, None)
    # Meta tensors give the exact key names and shapes without allocating 130 M floats twice.
    with torch.device("meta"):
        unet = comfy.model_base.BaseModel(mc).diffusion_model
        clip = comfy.sd1_clip.SD1ClipModel(device="meta", dtype=torch.float16)
        if full_vae:
            vae = AutoencoderKL(ddconfig=_FULL_VAE_CONFIG, embed_dim=4)
        else:
            vae = comfy.taesd.taesd.TAESD()
    unet_sd = _seeded_state_dict(unet, gen)
    clip_sd = _seeded_state_dict(clip, gen)
    vae_sd = _seeded_state_dict(vae, gen)
    if not full_vae:
        vae_sd["vae_scale"] = torch.tensor(_TAESD_SCALE, dtype=torch.float16)
    # The key layout ComfyUI's CheckpointSave writes: model.diffusion_model., cond_stage_model., first_stage_model.
    sd = {
        **mc.process_unet_state_dict_for_saving(unet_sd),
        **mc.process_clip_state_dict_for_saving(clip_sd),
        **mc.process_vae_state_dict_for_saving(vae_sd),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    comfy.utils.save_torch_file(sd, str(tmp))
    os.replace(tmp, path)
    return path
