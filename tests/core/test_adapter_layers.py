"""Binding an adapter to the host's cross-attention layers (method §2.2, §2.7): family, width, layer set, shapes."""

from __future__ import annotations

import pytest
import torch

from conceptsplit_core.adapter_file import AdapterMetadata, AdapterWeights
from conceptsplit_core.adapter_layers import bind_adapter_layers
from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.model_layout import AttentionSite, ModelLayout

HOST = ModelLayout(
    family="sd2.1",
    prediction="v",
    text_width=1024,
    display="SD2.1",
    layers=(
        AttentionSite(("input", 1, 0), 0, 320, 1024, path="down_blocks.0.attentions.0.transformer_blocks.0"),
        AttentionSite(("middle", 0, 0), 3, 1280, 1024, path="mid_block.attentions.0.transformer_blocks.0"),
    ),
)


def adapter(width=1024, family="sd2.1-v", channels=(320, 1280), drop=None, official=False, rank=4):
    layers = {layer.path: (torch.zeros(rank, width), torch.zeros(c, rank)) for layer, c in zip(HOST.layers, channels)}
    if drop:
        layers.pop(drop)
    meta = (
        None
        if official
        else AdapterMetadata(
            base_model=family, text_width=width, rank=rank, alpha=rank, identifier_word="dog", layers=len(layers)
        )
    )
    return AdapterWeights(
        name="dog.safetensors",
        file_format="official" if official else "native",
        layers=layers,
        rank=rank,
        text_width=width,
        alpha=rank,
        metadata=meta,
    )


def test_binds_every_layer_to_its_comfy_block_key():
    bound = bind_adapter_layers(adapter(), HOST)
    assert list(bound) == [("input", 1, 0), ("middle", 0, 0)]
    assert bound[("middle", 0, 0)][1].shape == (1280, 4)


def test_family_mismatch_names_both_families():
    with pytest.raises(
        ConceptSplitError, match=r"trained for SDXL \(text width 2048\) but the model is SD2.1 \(1024\)"
    ):
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


# --- the delta's size next to the layer's own weight (issue 11, item 1) ---------------------------------------------


def sized_concept(ratio: float, strength: float = 1.0, alpha: float = 4.0):
    """A concept whose ||strength · alpha/r · B·A||_F is `ratio` times 1.0 (the reference weight norm) at every layer.

    B·A = e_0 e_0ᵀ · (ratio / (strength · alpha / r)) has Frobenius norm exactly that factor (one non-zero entry).
    """
    from conceptsplit_core.concepts import make_concept

    rank = 4
    value = ratio / (strength * alpha / rank)
    layers = {}
    for layer in HOST.layers:
        lora_a = torch.zeros(rank, layer.in_features)
        lora_b = torch.zeros(layer.out_features, rank)
        lora_a[0, 0], lora_b[0, 0] = 1.0, value
        layers[layer.path] = (lora_a, lora_b)
    meta = AdapterMetadata(
        base_model="sd2.1-v", text_width=1024, rank=rank, alpha=alpha, identifier_word="dog", layers=len(layers)
    )
    weights = AdapterWeights(
        name="dog.safetensors",
        file_format="native",
        layers=layers,
        rank=rank,
        text_width=1024,
        alpha=alpha,
        metadata=meta,
    )
    return make_concept(weights, "dog", strength, "object")


def test_delta_at_the_bound_passes_and_just_above_it_is_refused():
    from conceptsplit_core.concepts import MAX_DELTA_TO_WEIGHT, check_delta_sizes

    norms = {layer.key: 1.0 for layer in HOST.layers}
    check_delta_sizes(sized_concept(MAX_DELTA_TO_WEIGHT), HOST, norms)  # exactly at the bound: accepted
    # 0.1 % over: float32 stores the one entry to 6e-8 relative, far inside that margin
    message = (
        r'Adapter "dog.safetensors" changes layer down_blocks.0.* by 1e\+03 times the layer\'s own weight.*'
        r"to_v weight\|\| = 1.*at most 1000 times"
    )
    with pytest.raises(ConceptSplitError, match=message):
        check_delta_sizes(sized_concept(MAX_DELTA_TO_WEIGHT * 1.001), HOST, norms)


def test_delta_size_counts_strength_and_alpha_and_skips_unknown_layers():
    from conceptsplit_core.concepts import check_delta_sizes

    norms = {layer.key: 2.0 for layer in HOST.layers}
    small = sized_concept(1500.0, strength=1.0)  # 750x a weight of norm 2: accepted
    check_delta_sizes(small, HOST, norms)
    stronger = type(small)(small.weights, "dog", 4.0, "object")  # the same file at strength 4: 3000x, refused
    with pytest.raises(ConceptSplitError, match=r"by 3e\+03 times"):
        check_delta_sizes(stronger, HOST, norms)
    negative = type(small)(small.weights, "dog", -4.0, "object")  # |strength| counts
    with pytest.raises(ConceptSplitError, match=r"by 3e\+03 times"):
        check_delta_sizes(negative, HOST, norms)
    check_delta_sizes(type(small)(small.weights, "dog", 0.0, "object"), HOST, norms)  # strength 0: off
    check_delta_sizes(stronger, HOST, {})  # no readable weight: only the read-time float32 check applies
