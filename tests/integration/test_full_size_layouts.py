"""The layer tables of method §2.2 on the real full-size UNets (built on the meta device: shapes only, no memory)."""

from __future__ import annotations

import pytest
import torch


def full_size_model(family: str):
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models

    name, config_cls, base_cls, model_type = {
        "sd15": ("SD15", comfy.supported_models.SD15, comfy.model_base.BaseModel, comfy.model_base.ModelType.EPS),
        "sd21": (
            "SD21",
            comfy.supported_models.SD20,
            comfy.model_base.BaseModel,
            comfy.model_base.ModelType.V_PREDICTION,
        ),
        "sdxl": ("SDXL", comfy.supported_models.SDXL, comfy.model_base.SDXL, comfy.model_base.ModelType.EPS),
    }[family]
    config = config_cls(_known_config(name))
    base = base_cls(config, model_type=model_type, device=torch.device("meta"))
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "model_channels": 320,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
_SD = {
    "adm_in_channels": None,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}
# ComfyUI's own full-size configs, comfy/model_detection.py (unet_config_from_diffusers_unet).
FULL_SIZE = {
    "SD15": {**_COMMON, **_SD, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8},
    "SD21": {**_COMMON, **_SD, "use_linear_in_transformer": True, "context_dim": 1024, "num_head_channels": 64},
    "SDXL": {
        **_COMMON,
        "num_classes": "sequential",
        "adm_in_channels": 2816,
        "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 10,
        "use_linear_in_transformer": True,
        "context_dim": 2048,
        "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    },
}


def _known_config(name: str) -> dict:
    return dict(FULL_SIZE[name])


@pytest.mark.parametrize(
    "family, layers, widths, text_width",
    [
        ("sd15", 16, {320, 640, 1280}, 768),
        ("sd21", 16, {320, 640, 1280}, 1024),
        ("sdxl", 70, {640, 1280}, 2048),
    ],
)
def test_full_size_layout_matches_spec(pack, family, layers, widths, text_width):
    layout = pack.layout(full_size_model(family))
    assert len(layout.layers) == layers and layout.text_width == text_width
    assert {layer.out_features for layer in layout.layers} == widths
    assert all(layer.in_features == text_width for layer in layout.layers)
    by_path = layout.by_path()
    if family == "sd21":
        # method §2.2 table: down_blocks.2.attentions.0 = input_blocks.7.1, C 1280; 7.39 MB fp32 at rank 64
        layer = by_path["down_blocks.2.attentions.0.transformer_blocks.0"]
        assert (layer.key, layer.out_features) == (("input", 7, 0), 1280)
        assert by_path["mid_block.attentions.0.transformer_blocks.0"].key == ("middle", 0, 0)
        assert by_path["up_blocks.3.attentions.2.transformer_blocks.0"].key == ("output", 11, 0)
        assert sum(64 * (layer.in_features + layer.out_features) for layer in layout.layers) == 1_847_296
        assert layout.prediction == "v"
    if family == "sdxl":
        layer = by_path["mid_block.attentions.0.transformer_blocks.9"]
        assert layer.key == ("middle", 0, 9) and layer.out_features == 1280
        assert by_path["up_blocks.0.attentions.2.transformer_blocks.9"].key == ("output", 2, 9)
        assert by_path["down_blocks.1.attentions.1.transformer_blocks.1"].key == ("input", 5, 1)
