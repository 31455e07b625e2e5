"""attention_capture without ComfyUI: step indices, layer choices, word positions, per-call maps, running means."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conceptsplit_core.attention_calls import AttentionCall
from conceptsplit_core.attention_capture import (
    AttentionCapture,
    CaptureRequest,
    call_concept_maps,
    select_layers,
    step_index,
    step_maps_bytes,
)
from conceptsplit_core.concept_words import locate_words, plan_words
from conceptsplit_core.concepts import LocatedConcept
from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.prompt_tokens import PromptTokens

# An SD1.5-like layout: input 1, 2 at level 0; 4, 5 at 1; 7, 8 at 2; middle at 3; output 3..11 back up.
LEVELS = {
    ("input", 1, 0): 0,
    ("input", 2, 0): 0,
    ("input", 4, 0): 1,
    ("input", 5, 0): 1,
    ("input", 7, 0): 2,
    ("input", 8, 0): 2,
    ("middle", 0, 0): 3,
    ("output", 3, 0): 2,
    ("output", 4, 0): 2,
    ("output", 5, 0): 2,
    ("output", 6, 0): 1,
    ("output", 9, 0): 0,
}
# [SOT, a, dog, and, a, blo, rp, cat, EOT, pad...]: "blorp" is two BPE tokens (made-up ids)
IDS = (49406, 320, 1929, 537, 320, 900, 901, 2368, 49407) + (49407,) * 68
STARTS = (False, True, True, True, True, True, False, True) + (False,) * 69
PROMPT = PromptTokens("a dog and a blorp cat", IDS, STARTS)
WORD_IDS = {"dog": (1929,), "cat": (2368,), "blorp": (900, 901), "horse": (4558,)}.get


def test_step_index_maps_sigmas_to_their_step_and_intermediate_sigmas_to_the_step_they_belong_to():
    schedule = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.0])
    assert [step_index(s, schedule) for s in (14.6, 6.0, 2.5, 0.9)] == [0, 1, 2, 3]
    assert step_index(4.0, schedule) == 1 and step_index(0.5, schedule) == 3  # heun's second evaluation
    assert step_index(6.0 * (1 + 1e-7), schedule) == 1  # float noise


def test_select_layers_by_level_all_and_block_names():
    assert select_layers(LEVELS, "latent/4") == {
        ("input", 7, 0),
        ("input", 8, 0),
        ("output", 3, 0),
        ("output", 4, 0),
        ("output", 5, 0),
    }
    assert select_layers(LEVELS, "all") == set(LEVELS)
    assert select_layers(LEVELS, "latent") == {("input", 1, 0), ("input", 2, 0), ("output", 9, 0)}
    assert select_layers(LEVELS, "blocks", "Input 7, middle, output_9.0") == {
        ("input", 7, 0),
        ("middle", 0, 0),
        ("output", 9, 0),
    }
    with pytest.raises(ConceptSplitError, match=r"no cross-attention layer at latent/16.*latent/8"):
        select_layers(LEVELS, "latent/16")
    with pytest.raises(ConceptSplitError, match=r'block "input 3".*input 1, 2, 4, 5, 7, 8; middle 0'):
        select_layers(LEVELS, "blocks", "input 3")
    with pytest.raises(ConceptSplitError, match="needs block names"):
        select_layers(LEVELS, "blocks", " ")


def test_words_are_located_by_the_tova_rule_first_or_all_tokens():
    assert locate_words(PROMPT, ["dog", "blorp"], WORD_IDS, "first token") == ((2,), (5,))
    assert locate_words(PROMPT, ["blorp", "cat"], WORD_IDS, "all tokens") == ((5, 6), (7,))
    with pytest.raises(ConceptSplitError, match=r'Word "horse" is not in the prompt\. Seen: 0 occurrence'):
        locate_words(PROMPT, ["horse"], WORD_IDS, "first token")
    with pytest.raises(ConceptSplitError, match=r'Word "dog" is not in the prompt 2 times'):
        locate_words(PROMPT, ["dog", "dog"], WORD_IDS, "first token")


def test_plan_words_falls_back_to_tova_concepts():
    concepts = (
        LocatedConcept("dog", 2, "object", 77, "dog.safetensors"),
        LocatedConcept("blorp", 5, "object", 77, "blorp.safetensors"),
    )
    assert plan_words("", None, concepts, WORD_IDS, "all tokens") == (("dog", "blorp"), ((2,), (5, 6)), 77)
    assert plan_words("cat", PROMPT, concepts, WORD_IDS, "first token") == (("cat",), ((7,),), 77)
    with pytest.raises(ConceptSplitError, match="got no words"):
        plan_words(" ,", PROMPT, (), WORD_IDS, "first token")
    with pytest.raises(ConceptSplitError, match='cannot find "cat" without the prompt\'s tokens'):
        plan_words("cat", None, concepts, WORD_IDS, "first token")


def _call(grid=(2, 3), chunks=(1, 0), rows=2, T=154, sigma=6.0, key=("input", 7, 0)):
    return AttentionCall(
        key=key,
        grid=grid,
        heads=2,
        cond_or_uncond=chunks,
        batch=rows * len(chunks),
        context_length=T,
        sigmas=torch.full((rows,), sigma),
    )


def test_call_maps_take_cond_rows_average_heads_and_sum_tokens_and_lcm_copies():
    request = CaptureRequest(
        labels=("blorp", "cat"),
        token_positions=((5, 6), (7,)),
        prompt_length=77,
        layer_keys=frozenset({("input", 7, 0)}),
    )
    probs = torch.rand(4, 2, 6, 154).softmax(-1)  # (B = 2 chunks × 2 images, H, N = 2·3, T = 2 copies of 77)
    maps = call_concept_maps(probs, _call(), request)
    cond = probs[2:]  # chunks (1, 0): the cond rows are the second chunk
    expected_blorp = (cond[..., 5] + cond[..., 6] + cond[..., 82] + cond[..., 83]).mean(1).reshape(2, 2, 3)
    expected_cat = (cond[..., 7] + cond[..., 84]).mean(1).reshape(2, 2, 3)
    # float32 sums of ≤ 4 probabilities and a mean of 2 heads, values ≤ 1: ≤ 8 roundings, 1e-6 ≈ 8 eps32
    assert torch.allclose(maps, torch.stack([expected_blorp, expected_cat], 1), atol=1e-6, rtol=0)
    with pytest.raises(ConceptSplitError, match="not a multiple|not the one"):
        call_concept_maps(torch.rand(4, 2, 6, 100), _call(T=100), request)


def test_capture_averages_calls_in_range_upsamples_coarse_grids_and_matches_runs_by_latent():
    keys = frozenset({("input", 7, 0), ("middle", 0, 0)})
    request = CaptureRequest(
        labels=("dog",), token_positions=((2,),), prompt_length=77, layer_keys=keys, first_step=1, last_step=1
    )
    store = AttentionCapture(request)
    schedule = torch.tensor([10.0, 5.0, 1.0, 0.0])
    store.start_run(schedule)
    fine = [torch.rand(2, 2, 4, 77).softmax(-1) for _ in range(2)]  # (B = cond + uncond, H, N = 2·2, T)
    coarse = torch.rand(2, 2, 1, 77).softmax(-1)  # middle block, 1×1 grid
    skipped_step = torch.rand(2, 2, 4, 77).softmax(-1)
    assert not store.needs_probabilities(_call((2, 2), (0, 1), 1, 77))  # outside a model call: nothing recorded

    def model_call(sigma, calls):  # what the seam does around one model call
        previous = store.begin_model_call(sigma)
        try:
            for call, probs in calls:
                if store.needs_probabilities(call):
                    store.observe_probabilities(call, probs)
        finally:
            store.end_model_call(previous)

    model_call(10.0, [(_call((2, 2), (0, 1), 1, 77), skipped_step)])  # step 0: outside the range
    model_call(None, [(_call((2, 2), (0, 1), 1, 77), skipped_step)])  # an auxiliary or gradient pass
    previous = store.begin_model_call(5.0)
    assert store.needs_probabilities(_call((2, 2), (0, 1), 1, 77))
    assert not store.needs_probabilities(_call((2, 2), (0, 1), 1, 77, key=("output", 3, 0)))  # layer not chosen
    assert not store.needs_probabilities(_call((2, 2), (1,), 1, 77))  # an uncond-only call
    store.end_model_call(previous)
    model_call(
        5.0,
        [(_call((2, 2), (0, 1), 1, 77), probs) for probs in fine]
        + [(_call((1, 1), (0, 1), 1, 77, key=("middle", 0, 0)), coarse)],
    )
    latent = torch.rand(1, 4, 2, 2)
    store.finish_run(latent)
    record = store.maps_for(latent)
    head_mean = [p[0, :, :, 2].mean(0).reshape(2, 2) for p in fine]
    upsampled = F.interpolate(coarse[0, :, :, 2].mean(0).reshape(1, 1, 1, 1), size=(2, 2), mode="bilinear")[0, 0]
    expected = (head_mean[0] + head_mean[1] + upsampled) / 3
    assert torch.allclose(record.maps[0, 0], expected, atol=1e-6, rtol=0)  # as above: a few float32 ops on maps ≤ 1
    assert record.steps == (1,) and set(record.layers) == keys
    with pytest.raises(ConceptSplitError, match="LATENT was not sampled"):
        store.maps_for(latent + 1)
    with pytest.raises(ConceptSplitError, match=r"outside the sampling run.*run of 1 steps"):
        store.start_run(torch.tensor([1.0, 0.0]))


def test_per_step_maps_add_up_to_the_running_mean_and_stay_within_the_stated_memory():
    """Issue 15: the step slider's maps. Their weighted sum over all recorded steps is the running-sum capture."""
    keys = frozenset({("input", 7, 0), ("middle", 0, 0)})
    request = CaptureRequest(
        labels=("dog", "cat"),
        token_positions=((2,), (7,)),
        prompt_length=77,
        layer_keys=keys,
        first_step=1,
        last_step=3,
        prompt_text="a dog and a cat",
    )
    store = AttentionCapture(request)
    schedule = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.0])  # 4 steps; 0 is outside the range
    store.start_run(schedule)
    batch, grids = 2, ((4, 4), (2, 2))
    generator = torch.Generator().manual_seed(0)
    calls = 0
    # heun-like: step 2 gets a second model call at an intermediate sigma, so the steps' weights differ
    for sigma in (14.6, 6.0, 2.5, 1.5, 0.9):
        previous = store.begin_model_call(sigma)
        for grid, key in zip(grids, (("input", 7, 0), ("middle", 0, 0))):
            call = _call(grid, (0, 1), batch, 77, sigma, key)
            probs = torch.rand(2 * batch, 2, grid[0] * grid[1], 77, generator=generator).softmax(-1)
            if store.needs_probabilities(call):
                store.observe_probabilities(call, probs)
                calls += 1
        store.end_model_call(previous)
    during, kept = step_maps_bytes(batch, 2, 3, grids)
    assert sum(t.numel() * t.element_size() for t in store._run.step_sums.values()) == during
    latent = torch.rand(batch, 4, 4, 4)
    store.finish_run(latent)
    record = store.maps_for(latent)
    assert record.steps == (1, 2, 3) and record.step_weights == (2, 4, 2) and record.total_steps == 4
    assert record.step_maps.shape == (batch, 3, 2, 4, 4)  # (B, S_rec, K, h, w) at the finest grid
    assert record.step_maps.numel() * record.step_maps.element_size() == kept  # the README's bound, exactly
    assert record.prompt == "a dog and a cat"
    weights = torch.tensor(record.step_weights, dtype=torch.float64)  # (S_rec,)
    total = (record.step_maps.double() * weights[None, :, None, None, None]).sum(1) / weights.sum()  # (B, K, h, w)
    # Both sides add the same fp32 maps (values <= 1), grouped differently: each sum of n terms is off by at most
    # n · 2^-24 relative, plus one rounding each for the upsampling, the division and the final cast: (calls + 3) ulps.
    tolerance = (calls + 3) * 2**-24 * float(record.maps.abs().max())
    assert torch.allclose(total, record.maps.double(), rtol=0, atol=tolerance)
    # a different grouping of the steps is not the running mean: the check can fail
    assert (record.step_maps[:, 0].double() - record.maps.double()).abs().max() > 100 * tolerance
