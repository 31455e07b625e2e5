"""The prompt Apply ToVA (or Capture Attention) located the words in is recognised by its content (issue 11 #4), in
process through ComfyUI's own nodes: another text of the same length is refused before anything is sampled, the same
text from any encode node is accepted and samples exactly what Apply ToVA's own positive samples."""

from __future__ import annotations

import pytest
import torch
from conftest import sample
from test_tova import changed_rows_per_chunk
from tova_reference import spy_model

from comfy_harness.tiny_adapters import write_tiny_adapter
from comfy_harness.tiny_models import build_tiny_model

PROMPT = "a dog and a cat"  # [SOT, a, dog, and, a, cat, EOT]: dog = 2, cat = 5
REFUSED = "The positive prompt being sampled is not the prompt Apply ToVA located"


def plain(clip, text):
    """CLIP Text Encode's CONDITIONING (no token record)."""
    import nodes

    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, text)[0]


def tova(pack, model, clip, tova_folder, text=PROMPT):
    """Apply ToVA with a dog and a cat adapter: (patched MODEL, its positive)."""
    adapters = pack.glue("adapters")
    chain = None
    for word, seed in (("dog", 1), ("cat", 2)):
        write_tiny_adapter(tova_folder / f"{word}.safetensors", model, word, seed=seed)
        chain = adapters.LoadToVAAdapter.execute(f"{word}.safetensors", "", 1.0, "from file", -1, chain).result[0]
    with torch.inference_mode():
        patched, positive, _ = adapters.ApplyToVA.execute(model, chain, clip, text, True).result
    return patched, positive


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_another_text_of_the_same_length_is_refused_before_any_model_call(pack, tova_folder, arch):
    model, clip, _ = build_tiny_model(arch)
    spy, spied = spy_model(model)
    patched, positive = tova(pack, spied, clip, tova_folder)
    other = plain(clip, "a cat")
    assert other[0][0].shape == positive[0][0].shape  # 77 tokens each: length alone cannot tell them apart
    with pytest.raises(
        pack.error,
        match=REFUSED + r'.*text features other than those of "a dog and a cat"'
        r".*Fix: connect Apply ToVA\'s positive output",
    ):
        sample(patched, clip, positive=other)
    # The same tokens with another weight are other text features: refused too (the documented rule; the weighted
    # text belongs in Apply ToVA, or in ConceptSplit Text Encode, whose token record is trusted).
    with pytest.raises(pack.error, match=REFUSED):
        sample(patched, clip, positive=plain(clip, "a (dog:1.3) and a cat"))
    assert spy.calls == []  # refused at the first model call, before its UNet forward
    with torch.inference_mode():
        weighted = pack.glue("prompt").ConceptSplitTextEncode.execute(clip, "a (dog:1.3) and a cat").result[0]
    sample(patched, clip, positive=weighted, steps=1)  # recorded with the same token ids: accepted


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_the_same_text_from_another_encode_node_samples_exactly_apply_tovas_positive(pack, tova_folder, arch):
    model, clip, _ = build_tiny_model(arch)
    patched, positive = tova(pack, model, clip, tova_folder)
    same = plain(clip, PROMPT)
    # The pack encodes with ComfyUI's own CLIP call, so on the CPU the two encodings are bit-identical, and then so
    # is everything sampled from them (the same operations on the same inputs).
    assert torch.equal(same[0][0], positive[0][0])
    latent = sample(patched, clip, positive=same)
    assert torch.equal(latent, sample(patched, clip, positive=positive))
    assert (latent - sample(model, clip, positive=same)).abs().max() > 0  # the adapters did act on it
    with torch.inference_mode():
        text_encode = pack.glue("prompt").ConceptSplitTextEncode.execute(clip, PROMPT).result[0]
    assert torch.equal(sample(patched, clip, positive=text_encode), latent)


def test_two_window_prompts_are_compared_over_every_window_and_batches_are_accepted(pack, tova_folder):
    """A prompt of two windows: a plain encode of the same text is the prompt (batch 2 too); one whose first window is
    the same and whose second differs is not, although it has the same 154 tokens."""
    model, clip, _ = build_tiny_model("sd15")
    text = "cat " * 80 + "and a dog"  # "dog" in the second window
    patched, positive = tova(pack, model, clip, tova_folder, text=text)
    same, other = plain(clip, text), plain(clip, "cat " * 80 + "and a cow")
    assert same[0][0].shape[1] == other[0][0].shape[1] == 154
    assert torch.equal(other[0][0][:, :77], same[0][0][:, :77])  # only the second window differs
    assert torch.equal(
        sample(patched, clip, positive=same, batch=2, steps=2),
        sample(patched, clip, positive=positive, batch=2, steps=2),
    )
    with pytest.raises(pack.error, match=REFUSED):
        sample(patched, clip, positive=other, steps=1)


def test_a_cast_copy_is_the_same_prompt_and_gets_the_delta_on_its_rows(pack, tova_folder):
    """A float16 copy of the features (a GPU user's node may hand one on) is within its rounding of the encoding."""
    model, clip, _ = build_tiny_model("sd15")
    spy, spied = spy_model(model)
    patched, positive = tova(pack, spied, clip, tova_folder)
    same = plain(clip, PROMPT)
    half = [[same[0][0].half(), dict(same[0][1])]]
    sample(patched, clip, positive=half, steps=1)
    encodings = {"half": half[0][0][0].float(), "negative": plain(clip, "")[0][0][0]}
    assert set(changed_rows_per_chunk(spy, model, encodings)) == {
        ("half", frozenset({2, 5})),
        ("negative", frozenset({2, 5})),
    }


def test_combined_and_concatenated_plain_encodes_get_the_delta_only_on_the_prompt(pack, tova_folder):
    """ConditioningCombine of the same text and another: only the first chunk is the prompt. ConditioningConcat of
    the same text and another: the prompt's window comes first, so its rows 2 and 5 are the prompt's (the appended
    window's rows 79 and 82 are another prompt's words)."""
    import nodes

    model, clip, _ = build_tiny_model("sd15")
    spy, spied = spy_model(model)
    patched, _ = tova(pack, spied, clip, tova_folder)
    same, other = plain(clip, PROMPT), plain(clip, "a cat")
    with torch.inference_mode():
        combined = nodes.ConditioningCombine().combine(same, other)[0]
        concatenated = nodes.ConditioningConcat().concat(same, other)[0]
    negative = plain(clip, "")[0][0][0]
    sample(patched, clip, positive=combined, steps=1)
    encodings = {"same": same[0][0][0], "other": other[0][0][0], "negative": negative}
    assert set(changed_rows_per_chunk(spy, model, encodings)) == {
        ("same", frozenset({2, 5})),
        ("other", frozenset()),
        ("negative", frozenset({2, 5})),
    }
    spy.calls.clear()
    sample(patched, clip, positive=concatenated, steps=1)
    encodings = {"concatenated": concatenated[0][0][0], "negative": negative}
    # the 77-token negative is repeated to 154 beside the 154-token positive: its s_k rows appear in both copies
    assert set(changed_rows_per_chunk(spy, model, encodings)) == {
        ("concatenated", frozenset({2, 5})),
        ("negative", frozenset({2, 5, 79, 82})),
    }
    with torch.inference_mode():
        reversed_order = nodes.ConditioningConcat().concat(other, same)[0]
    with pytest.raises(pack.error, match=REFUSED):  # the other text first: the prompt is not at s_k
        sample(patched, clip, positive=reversed_order, steps=1)


def test_loda_sampler_on_a_tova_model_refuses_another_text_the_same_way(pack, tova_folder):
    from test_loda import all_in_one

    with torch.inference_mode():
        model, clip, _ = build_tiny_model("sd15")
    patched, _ = tova(pack, model, clip, tova_folder)
    with pytest.raises(pack.error, match=REFUSED + r'.*text features other than those of "a dog and a cat"'):
        all_in_one(pack, patched, clip, positive=plain(clip, "a cat and a dog"), words="", steps=3, loda_steps=1)
    all_in_one(pack, patched, clip, positive=plain(clip, PROMPT), words="", steps=2, loda_steps=1)  # accepted


def test_capture_attention_refuses_another_text_and_accepts_the_same_from_any_encoder(pack):
    from test_viewer import capture, encode

    model, clip, _ = build_tiny_model("sd15")
    positive = encode(pack, clip, PROMPT)  # ConceptSplit Text Encode: the words are located in it
    patched, store = capture(pack, model, "dog, cat", positive, layers="all")
    with pytest.raises(
        pack.error,
        match=r'not the prompt Capture Attention located "dog" in'
        r'.*text features other than those of "a dog and a cat"',
    ):
        sample(patched, clip, positive=plain(clip, "a cat"), steps=2)
    recorded = store.maps_for(sample(patched, clip, positive=positive, steps=2)).maps
    latent = sample(patched, clip, positive=plain(clip, PROMPT), steps=2)
    assert torch.equal(store.maps_for(latent).maps, recorded)  # bit-identical encodings: the same maps
