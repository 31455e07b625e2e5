"""Identifier token rule (method §2.4) on hand-built token sequences; the real tokenizers are in tests/integration."""

from __future__ import annotations

import pytest

from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.prompt_tokens import IdentifierRequest, PromptTokens, locate_identifier_positions

SOT, EOT = 1000, 1001
# A toy vocabulary: id -> (text, ends a word)
VOCAB = {
    1: ("a", True),
    2: ("dog", True),
    3: ("cat", True),
    4: ("and", True),
    5: ("hot", False),
    6: ("teddy", True),
    7: ("bear", True),
    8: (",", True),
    9: ("dogs", True),
}


def prompt_of(*ids, windows=1):
    """SOT ids EOT, padded to 77 per window (ids may be given per window as tuples)."""
    groups = ids if windows > 1 else (ids,)
    token_ids, starts = [], []
    for group in groups:
        window = [SOT, *group, EOT] + [EOT] * (77 - len(group) - 2)
        previous_ends = True
        for token in window:
            special = token in (SOT, EOT)
            token_ids.append(token)
            starts.append(previous_ends and not special)
            previous_ends = special or VOCAB[token][1]
    return PromptTokens(text="toy", token_ids=tuple(token_ids), word_starts=tuple(starts))


def req(word_ids, explicit=None, label="x"):
    return IdentifierRequest(label=label, word="w", word_ids=tuple(word_ids), explicit_position=explicit)


def test_positions_count_sot_as_zero():
    # "a dog and a cat" -> [SOT, a, dog, and, a, cat, EOT] : dog = 2, cat = 5 (method §2.4 example)
    prompt = prompt_of(1, 2, 4, 1, 3)
    assert locate_identifier_positions(prompt, [req([2]), req([3])]) == [2, 5]
    assert locate_identifier_positions(prompt, [req([3]), req([2])]) == [5, 2]


def test_repeated_word_binds_in_concept_order_and_extra_concept_fails():
    prompt = prompt_of(1, 2, 4, 1, 2)  # a dog and a dog
    assert locate_identifier_positions(prompt, [req([2]), req([2])]) == [2, 5]
    with pytest.raises(ConceptSplitError, match="no free occurrence"):
        locate_identifier_positions(prompt, [req([2]), req([2]), req([2])])


def test_word_boundaries_and_multi_token_words():
    prompt = prompt_of(5, 2, 4, 6, 7)  # "hot" "dog" (one word hotdog) and teddy bear
    with pytest.raises(ConceptSplitError, match="is not in the prompt"):
        locate_identifier_positions(prompt, [req([2])])  # dog inside "hotdog" does not count
    assert locate_identifier_positions(prompt, [req([6, 7])]) == [4]  # first token of "teddy bear"
    # a later concept cannot reuse "bear" once "teddy bear" claimed it
    with pytest.raises(ConceptSplitError, match="no free occurrence"):
        locate_identifier_positions(prompt, [req([6, 7]), req([7])])
    assert locate_identifier_positions(prompt_of(9, 8, 2), [req([2])]) == [3]  # "dogs, dog": inflection differs


def test_second_window_positions_are_offset_by_77():
    prompt = prompt_of((1, 3), (1, 2), windows=2)
    assert locate_identifier_positions(prompt, [req([2]), req([3])]) == [77 + 2, 2]


def test_explicit_index_overrides_and_is_claimed_first():
    prompt = prompt_of(1, 2, 4, 1, 2)
    # explicit 2 is claimed first, so the searching concept takes the second dog
    assert locate_identifier_positions(prompt, [req([2]), req([], explicit=2)]) == [5, 2]
    with pytest.raises(ConceptSplitError, match="outside the prompt's text tokens"):
        locate_identifier_positions(prompt, [req([], explicit=77)])
    with pytest.raises(ConceptSplitError, match="outside the prompt's text tokens"):
        locate_identifier_positions(prompt, [req([], explicit=0)])
    with pytest.raises(ConceptSplitError, match="Two concepts use token index 3"):
        locate_identifier_positions(prompt, [req([], explicit=3), req([], explicit=3)])


def test_missing_word_message_names_word_prompt_and_fix():
    prompt = PromptTokens(text="a cat on a sofa", token_ids=(SOT, 1, 3, EOT), word_starts=(False, True, True, False))
    request = IdentifierRequest(label="dog.safetensors", word="dog", word_ids=(2,))
    with pytest.raises(ConceptSplitError) as err:
        locate_identifier_positions(prompt, [request])
    message = str(err.value)
    assert 'Identifier word "dog" of "dog.safetensors" is not in the prompt' in message
    assert 'Seen: prompt "a cat on a sofa"' in message and 'Fix: add "dog" to the prompt' in message
