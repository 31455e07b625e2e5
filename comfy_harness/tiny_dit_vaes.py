"""Tiny seeded VAEs for the DiT families' latent formats, built by ComfyUI's own ``comfy.sd.VAE`` from a state dict.

``comfy.sd.VAE(sd=...)`` recognises the architecture from the state dict's keys, exactly as VAELoader does for a
file, and sets the latent channels, scale ratios and dimensions itself:

- ``flux16``: 16 latent channels at 1/8 scale, 2-D (Flux.1, Z-Image: ``ae.safetensors``). The tiny stand-in is
  ComfyUI's TAESD with 16 channels (the layout of ``taef1``, which VAELoader offers for Flux), detected by its
  ``taesd_decoder.*`` keys; about 2.4 M parameters, so nothing needs shrinking.
- ``wan21``: the Wan 2.1 VAE (Qwen-Image's ``qwen_image_vae.safetensors``): 16 channels at 1/8 scale, 3-D latents
  (B, 16, T, h, w), detected by ``decoder.middle.0.residual.0.gamma``. ComfyUI 0.33 reads its width from
  ``decoder.head.0.gamma``; 0.3.64 always builds width 96 (127 M parameters), so there the constructor call is given
  the state dict's width (``_wan_width``). The result is checked to hold exactly the tiny weights.
- ``flux2``: the Flux.2 latent, 128 channels at 1/16 scale (32 channels at 1/8, 2×2-patchified), 2-D (Flux.2 and
  klein: ``flux2-vae.safetensors``). The tiny stand-in is ComfyUI's TAESD for Flux.2 (``taef2``, which VAELoader
  offers), detected by its ``taesd_decoder.*`` keys with the metadata ``tae_latent_channels = 128`` that VAELoader
  passes for taef2; only in ComfyUI versions with Flux.2 (0.33.0).

Requires ``comfy_bootstrap.bootstrap_comfyui`` first (or a running ComfyUI). Imports nothing of this repo, so the test
helper pack can load it by file path.
"""

from __future__ import annotations

import contextlib
import math

import torch

WAN_TINY_DIM = 8  # 96 in the real Wan 2.1 VAE; the decoder widths are dim·[1, 2, 4, 4]
TAEF1_SCALE_SHIFT = (0.3611, 0.1159)  # what VAELoader sets for taef1 (nodes.VAELoader.load_taesd)


def _seeded_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Conv/linear weights N(0, 1/fan_in) (activations stay of order 1 through the stack), norm scales (RMS_norm
    ``gamma``) 1, biases N(0, 0.02). ComfyUI ops create weights with torch.empty, so every tensor is written."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif name.endswith("gamma"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _checked(vae, sd: dict, latent_channels: int):
    """The VAE ComfyUI built must be the tiny one: every weight of `sd` loaded with its shape, no other weight."""
    import comfy.sd  # noqa: F401  (ComfyUI booted)

    built = vae.first_stage_model.state_dict()
    if set(built) != set(sd) or any(built[k].shape != sd[k].shape for k in sd):
        raise AssertionError("comfy.sd.VAE built another architecture than the tiny state dict's")
    if vae.latent_channels != latent_channels:
        raise AssertionError(f"comfy.sd.VAE reads {vae.latent_channels} latent channels, expected {latent_channels}")
    return vae


def build_tiny_flux16_vae(seed: int = 0):
    """A tiny VAE of the 16-channel Flux latent (B, 16, H/8, W/8): TAESD-16 weights through comfy.sd.VAE."""
    import comfy.sd
    import comfy.taesd.taesd

    gen = torch.Generator().manual_seed(seed)
    taesd = comfy.taesd.taesd.TAESD(latent_channels=16)
    _seeded_(taesd, gen)
    sd = {k: v.detach().clone() for k, v in taesd.state_dict().items()}
    sd["vae_scale"], sd["vae_shift"] = (torch.tensor(v) for v in TAEF1_SCALE_SHIFT)
    return _checked(comfy.sd.VAE(sd=sd, dtype=torch.float32), sd, 16)


@contextlib.contextmanager
def _wan_width(dim: int):
    """While ComfyUI builds a Wan 2.1 VAE, give its constructor the width `dim` (0.3.64 hard-codes 96; 0.33 already
    passes the state dict's width, so this changes nothing there)."""
    import comfy.ldm.wan.vae as wan_vae

    original = wan_vae.WanVAE

    def tiny(**config):
        return original(**dict(config, dim=dim))

    wan_vae.WanVAE = tiny
    try:
        yield
    finally:
        wan_vae.WanVAE = original


def build_tiny_wan21_vae(seed: int = 0, dim: int = WAN_TINY_DIM):
    """A tiny Wan 2.1 VAE (Qwen-Image's latent (B, 16, T, H/8, W/8)) through comfy.sd.VAE."""
    import comfy.ldm.wan.vae as wan_vae
    import comfy.sd

    gen = torch.Generator().manual_seed(seed)
    config = dict(z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], dropout=0.0)
    model = wan_vae.WanVAE(dim=dim, temperal_downsample=[False, True, True], **config)
    _seeded_(model, gen)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with _wan_width(dim):
        vae = comfy.sd.VAE(sd=sd, dtype=torch.float32)
    return _checked(vae, sd, 16)


def build_tiny_flux2_vae(seed: int = 0):
    """A tiny VAE of the Flux.2 latent (B, 128, H/16, W/16): taef2-layout TAESD weights through comfy.sd.VAE, as
    VAELoader builds "taef2" (scale 1, shift 0: load_taesd sets none for taef2)."""
    import comfy.sd
    import comfy.taesd.taesd

    gen = torch.Generator().manual_seed(seed)
    taesd = comfy.taesd.taesd.TAESD(latent_channels=128)
    _seeded_(taesd, gen)
    sd = {k: v.detach().clone() for k, v in taesd.state_dict().items()}
    sd["vae_scale"], sd["vae_shift"] = torch.tensor(1.0), torch.tensor(0.0)
    vae = comfy.sd.VAE(sd=sd, dtype=torch.float32, metadata={"tae_latent_channels": 128})
    return _checked(vae, sd, 128)


# latent format -> builder; a family names its format in helper_pack's TINY_DITS
TINY_DIT_VAES = {"flux16": build_tiny_flux16_vae, "wan21": build_tiny_wan21_vae, "flux2": build_tiny_flux2_vae}
