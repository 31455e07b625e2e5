"""LODA run logic without ComfyUI: layer selection, map capture, truncation, fixing bias, masks, report (§3, §4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptsplit_core.attention_calls import AttentionCall
from conceptsplit_core.attention_fixing import build_fixing_bias, build_fixing_masks
from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.loda import (
    FixingBias,
    LodaConcepts,
    MapCollector,
    StepRecord,
    _TruncatedForward,
    build_concept_masks,
    format_report,
    map_grid,
    run_truncated,
    select_map_layers,
)
from conceptsplit_core.loda_config import LodaConfig
from conceptsplit_core.model_layout import AttentionSite, ModelLayout
from comfy_harness.tolerance import float32_tolerance

# Full-size SD1/SD2 layout (integration §1.3): key, level. input 1,2 L0; 4,5 L1; 7,8 L2; middle L3; output 3,4,5 L2 ...
SD2_LEVELS = (
    [(("input", i, 0), lv) for i, lv in ((1, 0), (2, 0), (4, 1), (5, 1), (7, 2), (8, 2))]
    + [(("middle", 0, 0), 3)]
    + [(("output", i, 0), lv) for i, lv in ((3, 2), (4, 2), (5, 2), (6, 1), (7, 1), (8, 1), (9, 0), (10, 0), (11, 0))]
)
SDXL_LEVELS = (
    [(("input", i, d), lv) for i, lv, depth in ((4, 1, 2), (5, 1, 2), (7, 2, 10), (8, 2, 10)) for d in range(depth)]
    + [(("middle", 0, d), 2) for d in range(10)]
    + [
        (("output", i, d), lv)
        for i, lv, depth in ((0, 2, 10), (1, 2, 10), (2, 2, 10), (3, 1, 2), (4, 1, 2), (5, 1, 2))
        for d in range(depth)
    ]
)
TINY_LEVELS = [
    (("input", 1, 0), 0),
    (("input", 3, 0), 1),
    (("middle", 0, 0), 1),
    (("output", 0, 0), 1),
    (("output", 1, 0), 1),
    (("output", 2, 0), 0),
    (("output", 3, 0), 0),
]


def layout(levels, map_level: int, loss_where=lambda key: True) -> ModelLayout:
    """A layout with these (key, level) layers, the map layers at `map_level`, the loss on those `loss_where` allows
    (the UNet family's rules, written out: families/unet.py builds them from the model)."""
    return ModelLayout(
        "test",
        "eps",
        8,
        tuple(
            AttentionSite(key, level, 8, 8, map=level == map_level, loss=level == map_level and loss_where(key))
            for key, level in levels
        ),
    )


SD2 = layout(SD2_LEVELS, 2)
SDXL = layout(SDXL_LEVELS, 2, lambda key: key[0] == "input")  # method §3.1: SDXL's loss in the down blocks only
TINY = layout(TINY_LEVELS, 1)  # a shallow UNet: its deepest down level


def test_sd21_map_layers_at_768_are_input_7_8_and_output_3_4_5_at_24x24():
    layers = select_map_layers(SD2, (96, 96), "all")
    assert layers.grid == (24, 24)
    assert layers.loss_keys == (("input", 7, 0), ("input", 8, 0), ("output", 3, 0), ("output", 4, 0), ("output", 5, 0))
    assert layers.mask_keys == layers.loss_keys and layers.fixing_keys is None
    assert select_map_layers(SD2, (96, 96), "map_level").fixing_keys == frozenset(layers.loss_keys)


def test_sdxl_loss_uses_down_blocks_only_and_masks_all_60_level_blocks():
    layers = select_map_layers(SDXL, (128, 128), "all")
    assert layers.grid == (32, 32)
    assert len(layers.loss_keys) == 20 and {k[0] for k in layers.loss_keys} == {"input"}
    assert len(layers.mask_keys) == 60 and layers.loss_keys[-1] == ("input", 8, 9)


def test_odd_latents_use_ceil_and_shallow_unets_use_their_deepest_level():
    assert map_grid((97, 75), 2) == (25, 19)
    layers = select_map_layers(TINY, (16, 16), "all")
    assert layers.grid == (8, 8) and layers.mask_keys == tuple(k for k, lv in TINY_LEVELS if lv == 1)


def test_maps_smaller_than_the_kernel_and_models_without_map_layers_are_refused():
    with pytest.raises(ConceptSplitError, match=r"Unsupported resolution.*6×6 maps.*at least 224×224 px"):
        select_map_layers(SD2, (24, 24), "all")
    with pytest.raises(ConceptSplitError, match="no cross-attention layers at the level LODA reads its maps from"):
        select_map_layers(layout([(("middle", 0, 0), 1)], None), (64, 64), "all")


def test_concepts_need_two_objects_and_repeat_columns_for_lcm_contexts():
    with pytest.raises(ConceptSplitError, match="at least 2 object concepts.*1 object concept"):
        LodaConcepts(("dog",), (2,), 77)
    concepts = LodaConcepts(("dog", "cat"), (2, 5), 77)
    assert concepts.columns(77) == [[2], [5]]
    assert concepts.columns(231) == [[2, 79, 156], [5, 82, 159]]


def _call(key, grid, heads, cond_or_uncond, per, context, sigma=1.0):
    return AttentionCall(
        key=key,
        grid=grid,
        heads=heads,
        cond_or_uncond=cond_or_uncond,
        batch=per * len(cond_or_uncond),
        context_length=context,
        sigmas=torch.full((per,), sigma),
    )


def test_collector_equals_numpy_mean_over_heads_and_layers_of_the_concept_columns():
    torch.manual_seed(0)
    concepts = LodaConcepts(("dog", "cat"), (2, 5), 8)
    layers = select_map_layers(TINY, (14, 14), "all")  # 7×7 grid
    keys = layers.mask_keys[:2]
    collector = MapCollector(concepts, layers)
    collector.start(keys, (0,))
    heads, per, context = 2, 2, 16  # two images, uncond first, context repeated twice (LCM)
    all_probs = []
    for key in keys:
        probs = torch.rand(2 * per, heads, 49, context).softmax(-1)  # (B, H, N, T)
        all_probs.append(probs.numpy())
        collector.observe_probabilities(_call(key, (7, 7), heads, (1, 0), per, context), probs)
    got = collector.maps()  # (2, K, 7, 7)
    for image in range(per):
        ref = []
        for s in (2, 5):
            cond_rows = [np.asarray(p)[per + image] for p in all_probs]  # chunk 1 holds cond
            ref.append(np.mean([r[h, :, s] + r[h, :, s + 8] for r in cond_rows for h in range(heads)], axis=0))
        # float32 both sides: sums of 2 layers × 2 heads × 2 copies of positive probabilities, then a mean; each side
        # within ~8 eps32 relative of the exact value
        np.testing.assert_allclose(
            got[image].numpy(), np.stack(ref).reshape(2, 7, 7), rtol=float32_tolerance(1.0, 16), atol=0
        )


def test_collector_keeps_the_graph_and_truncates_after_the_last_key():
    concepts = LodaConcepts(("dog", "cat"), (1, 2), 4)
    layers = select_map_layers(TINY, (14, 14), "all")
    collector = MapCollector(concepts, layers)
    collector.start(layers.loss_keys, (0,), truncate=True)
    logits = torch.randn(1, 1, 49, 4, requires_grad=True)
    for key in layers.loss_keys[:-1]:
        call = _call(key, (7, 7), 1, (0,), 1, 4)
        collector.observe_probabilities(call, logits.softmax(-1))
        collector.after_attention(call)  # no truncation before the last key
    last = _call(layers.loss_keys[-1], (7, 7), 1, (0,), 1, 4)
    with pytest.raises(_TruncatedForward):
        collector.after_attention(last)
    run_truncated(lambda: collector.after_attention(last))  # swallowed
    collector.maps().sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_collector_first_call_keeps_the_first_model_call_with_each_branch_and_then_stops():
    """Masks come from the first (main CFG) forward of step N − 1, never from heun's corrector (method §4.1)."""
    concepts = LodaConcepts(("dog", "cat"), (1, 2), 4)
    layers = select_map_layers(TINY, (14, 14), "all")
    collector = MapCollector(concepts, layers)

    def forward(chunks, values):  # one model call: every mask layer, then after_attention
        for key in layers.mask_keys:
            call = _call(key, (7, 7), 1, chunks, 1, 4)
            if collector.needs_probabilities(call):
                collector.observe_probabilities(call, values)
            collector.after_attention(call)

    first, second = torch.rand(2, 1, 49, 4), torch.rand(2, 1, 49, 4)
    collector.start(layers.mask_keys, (0,), first_call=True)
    forward((1,), torch.rand(1, 1, 49, 4))  # an uncond-only call (split batch): not wanted, nothing collected
    assert collector.active
    forward((1, 0), first)  # the main CFG pass: collected, then collection stops
    assert not collector.active
    forward((1, 0), second)  # the corrector pass at another sigma: ignored
    torch.testing.assert_close(collector.maps()[0], first[1, 0, :, 1:3].T.reshape(2, 7, 7), rtol=0, atol=0)  # selected
    collector.start(layers.mask_keys, (0, 1), first_call=True)  # cond and uncond arriving in separate calls
    forward((1,), first[:1])
    forward((0,), second[1:])
    assert not collector.active
    # default float32 tolerance (rtol 1.3e-6 ≈ 11 eps32): one sum and a halving of probabilities ≤ 1
    torch.testing.assert_close(collector.maps()[0], (first[0, 0] + second[1, 0])[:, 1:3].T.reshape(2, 7, 7) / 2)


def test_fixing_bias_gives_each_image_its_masks_on_the_chosen_branches_and_layers():
    concepts = LodaConcepts(("dog", "cat"), (2, 5), 8)
    layers = select_map_layers(TINY, (28, 28), "map_level")  # 14×14 map level
    masks = torch.rand(2, 2, 14, 14) > 0.7  # (B_img, K, h, w), different per image
    config = LodaConfig(fixing_branches="cond", boost=5.0, suppression=-1e8)
    fixer = FixingBias(concepts, masks, config, layers)
    q = torch.zeros(4, 196, 8)
    call = _call(layers.mask_keys[0], (14, 14), 2, (1, 0), 2, 16)
    assert fixer.attention_bias(call, q, q) is None  # inactive until the masks exist
    fixer.active = True
    bias = fixer.attention_bias(call, q, q)  # (B, N, T)
    assert bias.shape == (4, 196, 16)
    assert bias[:2].abs().sum() == 0  # uncond chunk first: untouched with fixing_branches = cond
    for image in range(2):
        ref = build_fixing_bias(masks[image].flatten(1), [[2, 10], [5, 13]], 16, 5.0, -1e8, torch.float32)
        torch.testing.assert_close(bias[2 + image], ref, rtol=0, atol=0)  # the same constants placed by the same masks
    assert fixer.attention_bias(_call(("input", 1, 0), (28, 28), 2, (0,), 2, 16), q, q) is None  # not map level
    assert fixer.attention_bias(call, q, q) is bias  # built once per call layout, then looked up
    swapped = fixer.attention_bias(_call(layers.mask_keys[0], (14, 14), 2, (0, 1), 2, 16), q, q)
    torch.testing.assert_close(swapped[:2], bias[2:], rtol=0, atol=0)  # cond chunk first now
    assert swapped[2:].abs().sum() == 0
    fixer.activate(masks.flip(0))  # new masks drop the cached biases
    torch.testing.assert_close(fixer.attention_bias(call, q, q)[2:], bias[2:].flip(0), rtol=0, atol=0)
    coarse = FixingBias(concepts, masks, LodaConfig(), select_map_layers(TINY, (28, 28), "all"))
    coarse.active = True
    big = coarse.attention_bias(_call(("input", 1, 0), (28, 28), 2, (0,), 2, 16), q, q)
    upsampled = masks[1].repeat_interleave(2, -1).repeat_interleave(2, -2).flatten(1)  # nearest 14 -> 28, (K, N)
    torch.testing.assert_close(big[1], build_fixing_bias(upsampled, [[2, 10], [5, 13]], 16, 5.0, -1e8), rtol=0, atol=0)


def test_masks_per_image_and_report():
    maps = torch.rand(2, 3, 10, 10)
    masks = build_concept_masks(maps, LodaConfig())
    for image in range(2):
        assert torch.equal(masks[image], build_fixing_masks(maps[image], LodaConfig()))
    concepts = LodaConcepts(("dog", "cat", "bear"), (2, 5, 8), 77)
    records = [
        StepRecord(0, 0, 0, 0.25, 0.75, 40.0, "updated"),
        StepRecord(0, 1, 0, 0.1, 0.9, 40.0, "skipped: non-finite gradient"),
    ]
    text = format_report(records, concepts, 1, 4, masks, True)
    assert "HM 0.2500 loss 0.7500" in text and "1 update(s) skipped" in text and "fixing from step 1" in text


def test_other_positive_prompts_in_the_batch_are_neither_collected_nor_biased():
    """ConditioningCombine: a second positive shares the batch; its token s_k is another word (method §2.3)."""
    from conceptsplit_core.attention_calls import ChunkPrompt

    ours, other = tuple(range(100, 108)), tuple(range(200, 216))  # token ids: our prompt 8 tokens, the other 16
    concepts = LodaConcepts(("dog", "cat"), (2, 5), 8, ours)
    layers = select_map_layers(TINY, (14, 14), "all")  # 7×7 map level
    chunks = (ChunkPrompt(16, other), ChunkPrompt(8, ours), ChunkPrompt(16, None))  # other +, our +, negative
    call = AttentionCall(
        key=layers.mask_keys[0],
        grid=(7, 7),
        heads=2,
        cond_or_uncond=(0, 0, 1),
        batch=3,
        context_length=16,
        sigmas=torch.ones(1),
        chunk_prompts=chunks,
    )
    assert concepts.chunks(call, (0, 1)) == ((1, 8), (2, 16))  # our chunk (LCM copies 8 apart), the negative
    probs = torch.rand(3, 2, 49, 16)  # (B, H, N, T)
    collector = MapCollector(concepts, layers)
    collector.start(layers.mask_keys[:1], (0,))
    collector.observe_probabilities(call, probs)
    expected = (probs[1, :, :, [2, 5]] + probs[1, :, :, [10, 13]]).mean(0).T.reshape(1, 2, 7, 7)  # chunk 1 only
    torch.testing.assert_close(collector.maps(), expected)  # default float32 tolerance: ≤ 3 roundings of values ≤ 1
    collector.start(layers.mask_keys[:1], (1,))  # the negative has its own length (16): s_k once, no copy
    collector.observe_probabilities(call, probs)
    torch.testing.assert_close(collector.maps(), probs[2, :, :, [2, 5]].mean(0).T.reshape(1, 2, 7, 7))  # as above
    masks = torch.rand(1, 2, 7, 7) > 0.5
    fixer = FixingBias(concepts, masks, LodaConfig(), layers)
    fixer.activate(masks)
    q = torch.zeros(3, 49, 8)
    bias = fixer.attention_bias(call, q, q)  # (3, 49, 16)
    assert bias[0].abs().sum() == 0  # the other positive: untouched
    exact = dict(rtol=0, atol=0)  # the same constants placed by the same masks
    torch.testing.assert_close(
        bias[1], build_fixing_bias(masks[0].flatten(1), [[2, 10], [5, 13]], 16, 5.0, -1e8), **exact
    )
    torch.testing.assert_close(bias[2], build_fixing_bias(masks[0].flatten(1), [[2], [5]], 16, 5.0, -1e8), **exact)
    only_other = AttentionCall(
        key=layers.mask_keys[0],
        grid=(7, 7),
        heads=2,
        cond_or_uncond=(0,),
        batch=1,
        context_length=16,
        sigmas=torch.ones(1),
        chunk_prompts=chunks[:1],
    )
    assert fixer.attention_bias(only_other, q[:1], q[:1]) is None and not collector.needs_probabilities(only_other)
    cropped = AttentionCall(
        key=layers.mask_keys[0],
        grid=(4, 7),
        heads=2,
        cond_or_uncond=(0,),
        batch=1,
        context_length=8,
        sigmas=torch.ones(1),
        chunk_prompts=chunks[1:2],
    )
    collector.start(layers.mask_keys[:1], (0,), first_call=True)
    assert not collector.needs_probabilities(cropped)  # an area-cropped call is never the whole-image prompt's
    collector.after_attention(cropped)
    assert collector.active  # and does not end the first-call collection
    with pytest.raises(ConceptSplitError, match="LODA found no attention of its prompt.*remove area or mask"):
        collector.maps()


def test_area_chunks_are_left_out_of_whole_image_maps_and_masks():
    from conceptsplit_core.attention_calls import ChunkPrompt

    ids = (1, 2, 3)
    chunks = (ChunkPrompt(3, ids, area=True), ChunkPrompt(3, ids), ChunkPrompt(3, None, area=True))
    call = AttentionCall(
        key=("input", 1, 0),
        grid=(4, 4),
        heads=1,
        cond_or_uncond=(0, 0, 1),
        batch=3,
        context_length=3,
        sigmas=None,
        chunk_prompts=chunks,
    )
    assert call.prompt_chunks((0, 1), ids, 3) == ((1, 3),)


def test_a_negative_too_short_for_a_concept_token_is_neither_collected_nor_biased():
    """A two-window prompt (154 tokens, "cat" at s = 80) beside a one-window negative: ComfyUI repeats the negative
    to 154 tokens, so column 80 of the negative chunk is the negative's own token 3, not a concept token. The columns
    follow ToVA's identifier_rows rule."""
    from conceptsplit_core.attention_calls import ChunkPrompt
    from conceptsplit_core.token_value_delta import identifier_rows

    concepts = LodaConcepts(("dog", "cat"), (2, 80), 154)
    assert concepts.columns(154, 77) == [[2, 79], []]
    assert concepts.columns(154) == [[2], [80]]
    for position, length, total in ((2, 77, 154), (80, 154, 308), (5, 77, 231)):
        assert (
            list(range(total)[identifier_rows(position, length, total)])
            == LodaConcepts(("a", "b"), (position, 1), length).columns(total)[0]
        )
    layers = select_map_layers(TINY, (14, 14), "all")
    call = AttentionCall(
        key=layers.mask_keys[0],
        grid=(7, 7),
        heads=1,
        cond_or_uncond=(0, 1),
        batch=2,
        context_length=154,
        sigmas=torch.ones(1),
        chunk_prompts=(ChunkPrompt(154, None), ChunkPrompt(77, None)),
    )
    assert concepts.chunks(call, (0, 1)) == ((0, 154),)  # the short negative is left out
    masks = torch.rand(1, 2, 7, 7) > 0.5
    fixer = FixingBias(concepts, masks, LodaConfig(), layers)
    fixer.activate(masks)
    q = torch.zeros(2, 49, 8)
    bias = fixer.attention_bias(call, q, q)  # (2, 49, 154)
    assert bias[1].abs().sum() == 0  # no bias lands on the negative's token 3
    torch.testing.assert_close(
        bias[0], build_fixing_bias(masks[0].flatten(1), [[2], [80]], 154, 5.0, -1e8), rtol=0, atol=0
    )  # the same constants placed by the same masks
    collector = MapCollector(concepts, layers)
    collector.start(layers.mask_keys[:1], (0, 1))
    probs = torch.rand(2, 1, 49, 154)
    collector.observe_probabilities(call, probs)
    torch.testing.assert_close(
        collector.maps(), probs[0, 0][:, [2, 80]].T.reshape(1, 2, 7, 7), rtol=0, atol=0
    )  # one head, one call: the probabilities themselves
