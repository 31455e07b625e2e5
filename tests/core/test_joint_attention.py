"""Joint (DiT) attention maths: image-row × text-column probabilities of the joint softmax, the bias embedded into
an additive mask, piece-based word location and the flow-matching latent update."""

from __future__ import annotations

import math

import pytest
import torch

from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.joint_attention import add_masks, joint_bias_mask, joint_text_probabilities
from conceptsplit_core.loda_loss import flow_latent_update
from conceptsplit_core.prompt_tokens import PromptTokens, locate_words_in_pieces, located_table
from comfy_harness.tolerance import EPS32, float32_softmax_tolerance


def qk(seed=0, b=2, h=3, length=13, d=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, length, d, generator=g) * 2, torch.randn(b, h, length, d, generator=g) * 2


def reference(q, k, start, n, t, mask=None, bias=None):
    """float64, written out: logits of every key, mask and bias added, softmax over all keys, then the slice."""
    logits = torch.einsum("bhnd,bhld->bhnl", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits + mask.double()
    logits = logits[:, :, start : start + n]
    if bias is not None:
        logits[..., :t] += bias.double()[:, None]
    return logits.softmax(-1)[..., :t]


def bound(q, k):
    b, h, length, d = q.shape
    return float32_softmax_tolerance(
        q.transpose(1, 2).reshape(b, length, h * d), k.transpose(1, 2).reshape(b, length, h * d), h
    )


def test_probabilities_are_the_joint_softmax_sliced_to_image_rows_and_text_columns():
    q, k = qk()
    probs = joint_text_probabilities(q, k, image_start=4, image_tokens=6, text_tokens=4)  # 3 extra (reference) rows
    assert probs.shape == (2, 3, 6, 4) and probs.dtype == torch.float32
    assert torch.allclose(probs.double(), reference(q, k, 4, 6, 4), rtol=0, atol=bound(q, k))
    assert float(probs.sum(-1).max()) < 1  # image keys take the rest: not renormalised over the text


def test_mask_and_bias_enter_the_logits_of_their_rows_and_columns():
    q, k = qk(1)
    mask = torch.randn(2, 1, 13, 13) * 0.5
    bias = torch.randn(2, 6, 4)
    probs = joint_text_probabilities(q, k, 4, 6, 4, mask=mask, bias=bias)
    assert torch.allclose(
        probs.double(), reference(q, k, 4, 6, 4, mask, bias), rtol=0, atol=bound(q, k) + 4 * EPS32
    )  # + the float32 adds of mask and bias (≤ 1 ulp each, O(1))


def test_bias_mask_is_zero_outside_image_rows_and_text_columns_and_adds_to_an_existing_mask():
    bias = torch.randn(2, 6, 4)
    mask = joint_bias_mask(bias, 13, 4, torch.float32)
    assert mask.shape == (2, 1, 13, 13) and torch.equal(mask[:, 0, 4:10, :4], bias)
    outside = mask.clone()
    outside[:, 0, 4:10, :4] = 0
    assert not outside.any()
    existing = torch.zeros(13, 13, dtype=torch.bool)
    existing[:, 12] = True
    combined = add_masks(existing, mask)
    assert combined.shape == (2, 1, 13, 13) and combined[0, 0, 0, 0] == -torch.finfo(torch.float32).max
    assert torch.equal(combined[:, 0, 4:10, 12], mask[:, 0, 4:10, 12])


def test_flow_update_is_the_plain_gradient_step():
    x, grad = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    assert torch.equal(flow_latent_update(x, grad, 2.5), x - 2.5 * grad)


def pieces_prompt(pieces, starts):
    return PromptTokens(
        text=" ".join(p for p in pieces if p),
        token_ids=tuple(range(len(pieces))),
        word_starts=tuple(starts),
        window_length=len(pieces),
        pieces=tuple(pieces),
    )


# T5 of "a hotdog, a Cat and a xylophonist": '▁','a','▁hot','dog',',','▁','a','▁Cat','▁and','▁','a','▁xylo','phon','ist'
T5 = pieces_prompt(
    ["", "a", "hot", "dog", ",", "", "a", "Cat", "and", "", "a", "xylo", "phon", "ist", ""],
    [True, True, True, False, False, True, True, True, True, True, True, True, False, False, False],
)


def test_words_are_found_by_their_pieces_case_insensitively_and_only_as_whole_words():
    assert locate_words_in_pieces(T5, ("cat",)) == ((7,),)
    assert locate_words_in_pieces(T5, ("xylophonist",)) == ((11,),)  # first piece of a split word
    assert locate_words_in_pieces(T5, ("xylophonist",), all_tokens=True) == ((11, 12, 13),)
    assert locate_words_in_pieces(T5, ("hotdog",)) == ((2,),)  # punctuation after it ends the word
    assert locate_words_in_pieces(T5, ("a", "a")) == ((1,), (6,))  # the empty '▁' piece skipped; next free one
    table = located_table(T5, ("cat",), ((7,),))
    assert "cat -> row 7 ('Cat')" in table


@pytest.mark.parametrize("word", ["dog", "cats", "xylo"])
def test_a_word_not_in_the_prompt_names_the_token_table(word):
    with pytest.raises(ConceptSplitError, match=r"not in the prompt.*7:'Cat'"):
        locate_words_in_pieces(T5, (word,))
