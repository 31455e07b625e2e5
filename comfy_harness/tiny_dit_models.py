"""Tiny seeded DiT models built in code with ComfyUI's own classes (Flux.1, Flux.2 klein and Qwen-Image; docs/method.md
§10).

Real ComfyUI model, text-encoder and tokenizer classes with tiny widths, so the pack's hooks see the true joint
attention calls (text tokens first, post-RoPE q and k), while a build plus a few sampling steps take well under a
second on CPU. Requires ``comfy_bootstrap.bootstrap_comfyui`` first. Which families exist depends on the installed
ComfyUI: ``available_dit_families()`` detects them by class, never by version string.
"""

from __future__ import annotations

import math

import torch

FLUX_HIDDEN, FLUX_HEADS = 64, 2
FLUX_T5_WIDTH, FLUX_CLIP_WIDTH = 48, 32
FLUX_CONFIG = {  # the keys FluxParams needs; real Flux.1-dev values in comments
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": FLUX_CLIP_WIDTH,  # 768: CLIP-L pooled
    "context_in_dim": FLUX_T5_WIDTH,  # 4096: T5-XXL d_model
    "hidden_size": FLUX_HIDDEN,  # 3072
    "mlp_ratio": 2.0,  # 4.0
    "num_heads": FLUX_HEADS,  # 24
    "depth": 2,
    "depth_single_blocks": 1,  # 19 / 38
    "axes_dim": [8, 12, 12],  # [16, 56, 56]; sum = hidden / heads
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
    "txt_ids_dims": [],
}


# Each DiT family's model class in comfy.supported_models (older ComfyUI versions lack Flux2 and ZImage).
DIT_MODEL_CLASSES = {"flux": "Flux", "flux2": "Flux2", "zimage": "ZImage", "qwenimage": "QwenImage"}


def available_dit_families() -> tuple[str, ...]:
    """The DiT families whose model classes the imported ComfyUI has ("flux" in every supported version)."""
    import comfy.supported_models as sm

    return tuple(name for name, cls in DIT_MODEL_CLASSES.items() if hasattr(sm, cls))


def dit_families_in_source(comfyui_root) -> tuple[str, ...] | None:
    """The DiT families whose model classes a ComfyUI tree defines, read from its comfy/supported_models.py without
    importing it (pytest collection runs before ComfyUI is booted); None when there is no tree."""
    import ast
    from pathlib import Path

    if comfyui_root is None:
        return None
    tree = ast.parse((Path(comfyui_root) / "comfy" / "supported_models.py").read_text(encoding="utf-8"))
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    return tuple(name for name, cls in DIT_MODEL_CLASSES.items() if cls in classes)


def _init_module(module: torch.nn.Module, gen: torch.Generator, skip=()) -> None:
    """ComfyUI ops create weights with torch.empty: matrices N(0, 1/fan_in) (attention far from uniform, so map
    comparisons prove something), norm scales 1, other vectors N(0, 0.02)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(s in name for s in skip):
                continue
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith(("weight", "scale")):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        for _, b in module.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()


def _build_clip(tokenizer_cls, te_cls, options: dict, gen: torch.Generator, skip=()):
    import comfy.sd
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(tokenizer_cls, te_cls)
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32, **options})
    _init_module(clip.cond_stage_model, gen, skip)
    return clip


def _seeded_patcher(model_config, gen: torch.Generator, dtype: torch.dtype = torch.float32, device=None):
    """A MODEL (ModelPatcher) of a supported-models `model_config`: built in `dtype` on `device` (default CPU),
    weights drawn from `gen` as `_init_module` does, offloaded to the CPU."""
    import comfy.model_patcher

    device = torch.device("cpu") if device is None else device
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    _init_module(model.diffusion_model, gen)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def _flux_params(config: dict) -> dict:
    """`config` without the keys this ComfyUI's FluxParams lacks (older versions know fewer of Flux.2's keys)."""
    import dataclasses

    import comfy.ldm.flux.model

    known = {field.name for field in dataclasses.fields(comfy.ldm.flux.model.FluxParams)} | {"image_model"}
    return {k: v for k, v in config.items() if k in known}


def build_flux_model(config: dict, gen: torch.Generator, dtype: torch.dtype = torch.float32, device=None):
    """A Flux.1 MODEL (ModelPatcher) of `config` (FLUX_CONFIG's keys; those this ComfyUI's FluxParams lacks are
    dropped) with weights drawn from `gen` as `_init_module` does, in `dtype`, on `device` (default CPU). Used with
    the tiny widths by build_tiny_flux and with Flux.1's real widths by bench/bench_dit_loda.py."""
    import comfy.supported_models

    return _seeded_patcher(comfy.supported_models.Flux(_flux_params(config)), gen, dtype, device)


def build_tiny_flux(seed: int = 0):
    """A fresh tiny Flux.1 (MODEL, CLIP): 2 double + 1 single blocks, 2 heads, T5 + CLIP-L text encoders.

    A latent (B, 16, h, w) gives an (h/2)×(w/2) image-token grid; the context is T5's, padded to 256 tokens.
    The same seed gives bit-identical weights. Works inside and outside inference mode.
    """
    import comfy.text_encoders.flux

    gen = torch.Generator().manual_seed(seed)
    patcher = build_flux_model(FLUX_CONFIG, gen)
    clip = _build_clip(
        comfy.text_encoders.flux.FluxTokenizer,
        comfy.text_encoders.flux.flux_clip(),
        {
            "t5xxl_model_config": {"d_model": FLUX_T5_WIDTH, "d_ff": 64, "d_kv": 16, "num_heads": 3, "num_layers": 1},
            "clip_l_model_config": {
                "hidden_size": FLUX_CLIP_WIDTH,
                "intermediate_size": 64,
                "num_attention_heads": 2,
                "num_hidden_layers": 2,
                "projection_dim": FLUX_CLIP_WIDTH,
            },
        },
        gen,
    )
    return patcher, clip


QWEN_TE_WIDTH = 32
QWEN_CONFIG = {  # real Qwen-Image values in comments
    "image_model": "qwen_image",
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,  # 16 ch × 2×2 packed
    "num_layers": 2,  # 60
    "attention_head_dim": 32,
    "num_attention_heads": 2,  # 128 × 24
    "joint_attention_dim": QWEN_TE_WIDTH,  # 3584 (Qwen2.5-VL-7B hidden)
    "axes_dims_rope": (8, 12, 12),  # (16, 56, 56); sum = head dim
}


def build_tiny_qwenimage(seed: int = 0):
    """A fresh tiny Qwen-Image (MODEL, CLIP): 2 joint blocks, 2 heads, a 3-layer Qwen2.5-VL text encoder.

    Its vision tower is always built full size by ComfyUI (allocated, never initialised nor used: text prompts only).
    A latent (B, 16, h, w) gives an (h/2)×(w/2) image-token grid.
    """
    import comfy.supported_models
    import comfy.text_encoders.qwen_image

    gen = torch.Generator().manual_seed(seed)
    config = comfy.supported_models.QwenImage(dict(QWEN_CONFIG))
    patcher = _seeded_patcher(config, gen)
    clip = _build_clip(
        comfy.text_encoders.qwen_image.QwenImageTokenizer,
        comfy.text_encoders.qwen_image.te(),
        {
            "qwen25_7b_model_config": {
                "hidden_size": QWEN_TE_WIDTH,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
            },
        },
        gen,
        skip=(".visual.",),
    )
    return patcher, clip


FLUX2_HIDDEN, FLUX2_HEADS = 64, 2
FLUX2_TE_WIDTH = 32
FLUX2_CONFIG = {  # model_detection's flux2 keys with tiny sizes; real FLUX.2 klein 4B values in comments
    "image_model": "flux2",
    "in_channels": 128,
    "out_channels": 128,  # the Flux.2 VAE's 128 channels, patch 1
    "patch_size": 1,
    "vec_in_dim": None,  # no pooled vector
    "context_in_dim": 3 * FLUX2_TE_WIDTH,  # 7680: Qwen3-4B hidden states of layers 9, 18, 27 stacked
    "hidden_size": FLUX2_HIDDEN,  # 3072
    "mlp_ratio": 3.0,
    "num_heads": FLUX2_HEADS,  # 24
    "depth": 2,  # 5
    "depth_single_blocks": 1,  # 20
    "axes_dim": [8, 8, 8, 8],  # [32, 32, 32, 32]: 4 RoPE axes (t, h, w, text position); sum = hidden / heads
    "theta": 2000,
    "qkv_bias": False,
    "ops_bias": False,
    "guidance_embed": False,  # True for FLUX.2 dev (Mistral text encoder)
    "global_modulation": True,
    "mlp_silu_act": True,
    "txt_ids_dims": [3],
    "default_ref_method": "index",
    "ref_index_scale": 10.0,
}


def build_tiny_flux2(seed: int = 0):
    """A fresh tiny Flux.2 klein (MODEL, CLIP): 2 double + 1 single blocks, 2 heads, a 28-layer Qwen3 text encoder
    of width 32 (klein's TE stacks the hidden states of layers 9, 18 and 27, so it needs 28 layers).

    A latent (B, 128, h, w) gives an h×w image-token grid (patch 1); the context is the chat-templated prompt,
    right-padded to 512 tokens by the tokenizer. Needs a ComfyUI with comfy.supported_models.Flux2 (0.33.0).
    """
    import comfy.supported_models
    import comfy.text_encoders.flux

    gen = torch.Generator().manual_seed(seed)
    config = comfy.supported_models.Flux2(_flux_params(FLUX2_CONFIG))
    patcher = _seeded_patcher(config, gen)
    clip = _build_clip(
        comfy.text_encoders.flux.KleinTokenizer,
        comfy.text_encoders.flux.klein_te(model_type="qwen3_4b"),
        {
            "qwen3_4b_model_config": {
                "hidden_size": FLUX2_TE_WIDTH,
                "intermediate_size": 64,
                "num_hidden_layers": 28,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
            },
        },
        gen,
    )
    return patcher, clip


def tiny_latent(model, batch: int = 1, pixels: int = 128) -> dict:
    """An empty LATENT for `model` at `pixels`×`pixels` px: its latent format's channels and downscale (Flux.1 and
    Qwen-Image (B, 16, px/8, px/8), Flux.2 (B, 128, px/16, px/16))."""
    latent_format = model.model.latent_format
    size = pixels // int(getattr(latent_format, "spacial_downscale_ratio", 8))
    return {"samples": torch.zeros(batch, int(latent_format.latent_channels), size, size)}


def flux_latent(batch: int = 1, size: int = 16) -> dict:
    """An empty Flux LATENT (B, 16, size, size): EmptySD3LatentImage's layout at pixel size 8·size."""
    return {"samples": torch.zeros(batch, 16, size, size)}


ZIMAGE_TE_WIDTH = 32
ZIMAGE_CONFIG = {  # model_detection's Z-Image values except the sizes; real Z-Image values in comments
    "image_model": "lumina2",
    "patch_size": 2,
    "in_channels": 16,
    "dim": 64,  # 3840
    "cap_feat_dim": ZIMAGE_TE_WIDTH,  # 2560 (Qwen3-4B hidden)
    "n_layers": 3,  # 30
    "n_refiner_layers": 1,  # 2
    "n_heads": 2,
    "n_kv_heads": 2,  # 30 / 30
    "qk_norm": True,
    "axes_dims": [8, 12, 12],  # [32, 48, 48]; sum = dim / heads
    "axes_lens": [1536, 512, 512],
    "rope_theta": 256.0,
    "ffn_dim_multiplier": 8.0 / 3.0,
    "z_image_modulation": False,  # True; needs dim >= 256 (the adaLN input is min(dim, 256), t_embedder's 256)
    "time_scale": 1000.0,
    "pad_tokens_multiple": 32,
}
ZIMAGE_FULL_MODULATION = {"dim": 256, "axes_dims": [32, 48, 48], "z_image_modulation": True}  # heads 2 × 128


def build_tiny_zimage(seed: int = 0, **config):
    """A fresh tiny Z-Image (MODEL, CLIP): 1 context + 1 noise refiner and 3 joint layers, 2 heads, dim 64 without
    z_image_modulation (`build_tiny_zimage(**ZIMAGE_FULL_MODULATION)`: dim 256 with it, as the real model), and a
    3-layer Qwen3 text encoder (layer_idx −2 needs > 2) with ComfyUI's own Z-Image tokenizer and template.

    A latent (B, 16, h, w) gives an (h/2)×(w/2) image-token grid; text and image tokens are padded to multiples of
    32 inside the model. Needs a ComfyUI with comfy.supported_models.ZImage (0.33+).
    """
    import comfy.supported_models
    import comfy.text_encoders.z_image

    gen = torch.Generator().manual_seed(seed)
    model_config = comfy.supported_models.ZImage({**ZIMAGE_CONFIG, **config})
    patcher = _seeded_patcher(model_config, gen)
    clip = _build_clip(
        comfy.text_encoders.z_image.ZImageTokenizer,
        comfy.text_encoders.z_image.te(),
        {
            "qwen3_4b_model_config": {
                "hidden_size": ZIMAGE_TE_WIDTH,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
            },
        },
        gen,
    )
    return patcher, clip


def build_tiny_lumina2(seed: int = 0):
    """A tiny plain Lumina2 (Lumina-Image 2.0) MODEL, the base class of Z-Image, with the config keys this
    ComfyUI's NextDiT accepts (0.3.64 takes no Z-Image keys; 0.33 pads nothing without pad_tokens_multiple)."""
    import inspect

    import comfy.ldm.lumina.model
    import comfy.supported_models

    gen = torch.Generator().manual_seed(seed)
    accepted = set(inspect.signature(comfy.ldm.lumina.model.NextDiT.__init__).parameters)
    plain = {k: v for k, v in ZIMAGE_CONFIG.items() if k not in ("z_image_modulation", "pad_tokens_multiple")}
    model_config = comfy.supported_models.Lumina2({k: v for k, v in plain.items() if k in accepted})
    return _seeded_patcher(model_config, gen)
