"""The content rule that recognises a located prompt's conditioning (conceptsplit_core.prompt_encoding, issue 11 #4)."""

from __future__ import annotations

import torch

from conceptsplit_core.attention_calls import ChunkPrompt, chunk_holds_prompt
from conceptsplit_core.prompt_encoding import (
    ENCODING_ULPS,
    PromptEncoding,
    identify_conditionings,
    rounding_eps,
    same_encoding,
)

EPS32 = torch.finfo(torch.float32).eps
EPS16 = torch.finfo(torch.float16).eps


def features(length=77, width=16, seed=0):
    """Text features shaped like CLIP's (1, L, d), with a large start-token row as CLIP has."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, length, width, generator=generator)
    x[0, 0] *= 30.0
    return x


def matches(candidate, encoding) -> bool | None:
    flag = same_encoding(candidate, encoding)
    return None if flag is None else bool(flag)


def test_the_same_features_match_exactly_and_after_a_cast():
    reference = features()
    encoding = PromptEncoding((1, 2, 3), "a dog", reference)
    assert matches(reference.clone(), encoding)
    assert matches(reference.half(), encoding)  # ≤ ½ float16 ulp per feature: inside 4 ulps of the row maximum
    assert matches(reference.bfloat16(), encoding)
    assert matches(reference.double(), encoding)


def test_the_bound_is_four_ulps_of_the_coarser_dtype_times_the_rows_largest_feature():
    reference = features()
    encoding = PromptEncoding((1,), "x", reference)
    row = 3
    bound = ENCODING_ULPS * EPS32 * float(reference[0, row].abs().max())  # fp32 on both sides
    inside, outside = reference.clone(), reference.clone()
    inside[0, row, 0] += 0.5 * bound
    outside[0, row, 0] += 2.0 * bound
    assert matches(inside, encoding) and not matches(outside, encoding)
    # The start-token row is 30× larger, but its bound does not loosen the other rows: row 3 still fails at a
    # change far below the start row's own bound.
    assert 2.0 * bound < ENCODING_ULPS * EPS32 * float(reference[0, 0].abs().max())
    # An encoder that computes in float16 may differ by its rounding: the bound widens to float16's eps.
    loose = PromptEncoding((1,), "x", reference, compute_eps=EPS16)
    assert matches(outside, loose)
    assert rounding_eps(torch.float32, torch.float16) == EPS16
    assert rounding_eps(torch.float32, compute_eps=EPS16) == EPS16


def test_another_token_changes_its_row_and_is_another_prompt():
    reference = features()
    encoding = PromptEncoding((1,), "x", reference)
    other = reference.clone()
    other[0, 5:] = features(seed=1)[0, 5:]  # a causal encoder: a different token at 5 changes rows 5 and after
    assert not matches(other, encoding)
    assert not matches(other.half(), encoding)


def test_prefix_length_width_and_batch_rules():
    reference = features()
    encoding = PromptEncoding((1,), "x", reference)
    appended = torch.cat([reference, features(seed=2)], dim=1)  # ConditioningConcat: the prompt's window first
    assert matches(appended, encoding)
    assert not matches(torch.cat([features(seed=2), reference], dim=1), encoding)
    assert matches(reference[:, :70], encoding) is None  # shorter than the prompt: ruled out by shape
    assert matches(features(width=8), encoding) is None
    assert matches(reference.expand(2, -1, -1), encoding)  # a batch of copies: every row matches
    assert not matches(torch.cat([reference, features(seed=3)]), encoding)  # one batch row is another prompt


def test_identify_returns_the_first_matching_prompt_or_none():
    a, b = features(seed=10), features(seed=11)
    encodings = [PromptEncoding((1,), "a", a), PromptEncoding((2,), "b", b), PromptEncoding((3,), "a again", a)]
    found = identify_conditionings([b.clone(), None, features(seed=12), a.half(), features(width=8)], encodings)
    assert found == [(2,), None, None, (1,), None]
    assert identify_conditionings([a], []) == [None]


def test_encoding_is_not_copied_by_deepcopy_and_caches_its_device_copy():
    import copy

    encoding = PromptEncoding((1,), "a", features())
    assert copy.deepcopy({"e": encoding})["e"] is encoding
    first = encoding.reference_on(torch.device("cpu"))
    assert encoding.reference_on(torch.device("cpu"))[0] is first[0]


def test_chunk_holds_prompt_rules():
    ids = (1, 2, 3)
    assert chunk_holds_prompt(None, ids, 3)  # no record of the call: assumed to be the prompt
    assert chunk_holds_prompt(ChunkPrompt(3, ids), ids, 3) and not chunk_holds_prompt(ChunkPrompt(3, (1, 2, 4)), ids, 3)
    assert chunk_holds_prompt(ChunkPrompt(6, ids), ids, 3)  # identified (ConditioningConcat appended text)
    # unidentified: neither recorded nor matching the prompt's encoding, whatever its length
    assert not chunk_holds_prompt(ChunkPrompt(3, None), ids, 3)
    assert chunk_holds_prompt(ChunkPrompt(6, (9,)), None, 3)  # no ids to compare with: a known prompt counts
    assert chunk_holds_prompt(ChunkPrompt(3, None), None, 3) and not chunk_holds_prompt(ChunkPrompt(6, None), None, 3)
