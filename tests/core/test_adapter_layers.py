"""Binding an adapter to the host's cross-attention layers (spec §2.2, §2.7): family, width, layer set, shapes."""

from __future__ import annotations

import pytest
import torch

from conceptsplit_core.adapter_file import AdapterMetadata, AdapterWeights
from conceptsplit_core.adapter_layers import CrossAttentionLayer, UNetLayout, bind_adapter_layers
from conceptsplit_core.errors import ConceptSplitError

HOST = UNetLayout(family="sd2.1", prediction="v", text_width=1024, layers=(
    CrossAttentionLayer("down_blocks.0.attentions.0.transformer_blocks.0", ("input", 1), 0, 320, 1024),
    CrossAttentionLayer("mid_block.attentions.0.transformer_blocks.0", ("middle", 0), 0, 1280, 1024),
))


def adapter(width=1024, family="sd2.1-v", channels=(320, 1280), drop=None, official=False, rank=4):
    layers = {layer.path: (torch.zeros(rank, width), torch.zeros(c, rank)) for layer, c in zip(HOST.layers, channels)}
    if drop:
        layers.pop(drop)
    meta = None if official else AdapterMetadata(base_model=family, text_width=width, rank=rank, alpha=rank,
                                                 identifier_word="dog", layers=len(layers))
    return AdapterWeights(name="dog.safetensors", file_format="official" if official else "native", layers=layers,
                          rank=rank, text_width=width, alpha=rank, metadata=meta)


def test_binds_every_layer_to_its_comfy_block_key():
    bound = bind_adapter_layers(adapter(), HOST)
    assert list(bound) == [("input", 1, 0), ("middle", 0, 0)]
    assert bound[("middle", 0, 0)][1].shape == (1280, 4)


def test_family_mismatch_names_both_families():
    with pytest.raises(ConceptSplitError,
                       match=r"trained for SDXL \(text width 2048\) but the model is SD2.1 \(1024\)"):
        bind_adapter_layers(adapter(width=2048, family="sdxl"), HOST)
    with pytest.raises(ConceptSplitError, match=r"made for SD1.5 \(text width 768\) but the model is SD2.1"):
        bind_adapter_layers(adapter(width=768, official=True), HOST)


def test_width_mismatch_without_known_family():
    with pytest.raises(ConceptSplitError, match="text features of width 96 but the model's are 1024"):
        bind_adapter_layers(adapter(width=96, official=True), HOST)


def test_missing_and_misshaped_layers():
    with pytest.raises(ConceptSplitError, match="does not cover.*missing mid_block"):
        bind_adapter_layers(adapter(drop="mid_block.attentions.0.transformer_blocks.0"), HOST)
    with pytest.raises(ConceptSplitError, match=r"shaped for another model.*lora_B \(640, 4\).*lora_B \(1280, r\)"):
        bind_adapter_layers(adapter(channels=(320, 640)), HOST)
