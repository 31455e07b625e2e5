"""Concept words: which words of the prompt ToVA, LODA and Capture Attention act on, and where they are.

One resolver for the three nodes (method §2.4): a typed word list is split at commas (`parse_words`) and located in
the positive prompt's tokens by ToVA's rule (prompt_tokens.locate_identifier_positions: the first free occurrence
that starts a word; a prompt that carries its decoded pieces, a DiT's T5 or Qwen prompt, by those pieces:
prompt_tokens.locate_words_in_pieces); without typed words the ToVA concepts recorded on the model are used, at the
positions s_k Apply ToVA located them at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import ConceptSplitError
from .prompt_tokens import (
    IdentifierRequest,
    PromptTokens,
    locate_identifier_positions,
    locate_words_in_pieces,
    located_table,
)

TOKEN_FIRST = "first token"
TOKEN_ALL = "all tokens"
TOKEN_MODES = (TOKEN_FIRST, TOKEN_ALL)

WordIds = Callable[[str], tuple[int, ...]]  # a word -> its BPE ids alone, without start/end tokens


def parse_words(text: str) -> tuple[str, ...]:
    """'dog, cat' -> ("dog", "cat"); empty entries are dropped."""
    return tuple(word.strip() for word in text.split(",") if word.strip())


def word_requests(words: Sequence[str], word_ids: WordIds) -> list[IdentifierRequest]:
    """One IdentifierRequest per word (the word is its own label)."""
    return [IdentifierRequest(label=word, word=word, word_ids=tuple(word_ids(word))) for word in words]


@dataclass(frozen=True)
class ConceptWords:
    """Words located in one prompt: what LODA separates or Capture Attention records."""

    labels: tuple[str, ...]  # the words, as typed (or the ToVA identifier words)
    positions: tuple[tuple[int, ...], ...]  # per word: its token positions (one, or every BPE token of the word)
    prompt_length: int  # T of the prompt the positions refer to (77 · windows)
    prompt_ids: tuple | None = None  # that prompt's token ids (None = not known)
    prompt_text: str = ""  # that prompt's text ("" = not known)
    token_table: str = ""  # located by decoded pieces: "word -> token row (piece)" lines for reports; "" otherwise

    @property
    def first_positions(self) -> tuple[int, ...]:
        """s_k of each word: its first token."""
        return tuple(p[0] for p in self.positions)


# --- LODA: the object concepts to separate ---------------------------------------------------------------------


def loda_words(
    words: Sequence[str], prompts: Sequence[PromptTokens], concepts: Sequence, word_ids: WordIds
) -> ConceptWords:
    """LODA's concepts: the typed `words`, located in the first positive prompt holding them all (several after
    ConditioningCombine), or, without typed words, the object concepts of the ToVA-patched model (`concepts`,
    concepts.LocatedConcept), whose prompt must be among the recorded positives `prompts` when there are any.

    Raises: ConceptSplitError for typed words without a token record, a word not in any prompt, or ToVA concepts
    located in another prompt.
    """
    if not words:
        objects = [c for c in concepts if c.role == "object"]
        _check_tova_prompt(objects, tuple(prompts))
        length = objects[0].prompt_length if objects else 0
        ids = objects[0].prompt_ids if objects else None
        return ConceptWords(tuple(c.word for c in objects), tuple((c.position,) for c in objects), length, ids)
    if not prompts:
        raise ConceptSplitError.build(
            "LODA cannot find the concept words: the positive prompt carries no token record",
            seen=f"concept words {', '.join(words)} with a positive from a plain CLIP Text Encode",
            expected="a positive from Apply ToVA to Model or ConceptSplit Text Encode",
            fix="encode the positive prompt with ConceptSplit Text Encode (or use Apply ToVA's positive output)",
        )
    requests = None
    first_error = None
    for prompt in prompts:  # several positives (ConditioningCombine): the first one holding every word
        try:
            if prompt.pieces:  # a DiT prompt: by its decoded pieces, with the bound tokens as a table
                rows = locate_words_in_pieces(prompt, words)
                return ConceptWords(
                    tuple(words),
                    rows,
                    len(prompt.token_ids),
                    tuple(prompt.token_ids),
                    prompt.text,
                    located_table(prompt, words, rows),
                )
            requests = requests or word_requests(words, word_ids)
            positions = locate_identifier_positions(prompt, requests)
        except ConceptSplitError as error:
            first_error = first_error or error
            continue
        return ConceptWords(
            tuple(words), tuple((p,) for p in positions), len(prompt.token_ids), tuple(prompt.token_ids), prompt.text
        )
    raise first_error


def _check_tova_prompt(objects, prompts: tuple[PromptTokens, ...]) -> None:
    """With empty concept words, the ToVA positions hold only in the prompt Apply ToVA located them in.

    A positive without a token record (plain CLIP Text Encode) is recognised by its text features at the first model
    call by ToVA itself (comfy_conditioning.check_prompt_sampled); recorded ones are compared here, before sampling:
    one of them must be that prompt.
    """
    if not prompts or any(all(_located_in(c, prompt) for c in objects) for prompt in prompts):
        return
    prompt = prompts[0]
    concept = next(c for c in objects if not _located_in(c, prompt))
    raise ConceptSplitError.build(
        f'The positive prompt being sampled is not the prompt Apply ToVA located "{concept.word}" in',
        seen=f'a positive encoded from "{prompt.text[:80]}" ({len(prompt.token_ids)} tokens)',
        expected=f"the prompt of that Apply ToVA ({concept.prompt_length} tokens)",
        fix="connect Apply ToVA's positive output to the sampler, or write the concept words into "
        "concept_words so LODA finds them in this prompt",
    )


def _located_in(concept, prompt: PromptTokens) -> bool:
    """Whether a ToVA concept's position s_k refers to `prompt`: same recorded tokens (when recorded), same length."""
    ids = tuple(prompt.token_ids)
    recorded = getattr(concept, "prompt_ids", None)
    return (recorded is None or tuple(recorded) == ids) and concept.prompt_length == len(ids)


# --- Capture Attention: the words to record --------------------------------------------------------------------


def capture_words(
    words_text: str, prompt: PromptTokens | None, concepts: Sequence, word_ids: WordIds, token_mode: str
) -> ConceptWords:
    """Which words Capture Attention records and where they are (`plan_words`), with the prompt they were located
    in: the positive's, or, without it, the ToVA concepts' prompt."""
    labels, positions, length = plan_words(words_text, prompt, concepts, word_ids, token_mode)
    if prompt is not None:
        return ConceptWords(labels, positions, length, tuple(prompt.token_ids), prompt.text)
    ids = next((c.prompt_ids for c in concepts if c.word.lower() == labels[0].lower()), None)
    return ConceptWords(labels, positions, length, ids, "")


def plan_words(
    words_text: str,
    prompt: PromptTokens | None,
    concepts: Sequence,
    word_ids: Callable[[str], tuple[int, ...]],
    token_mode: str,
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...], int]:
    """Which words to capture and where they are: (labels, token positions per word, prompt length T).

    Typed words (comma-separated) are located in the positive prompt's tokens; without typed words the ToVA
    concepts' identifier words are used. Without the prompt's tokens only ToVA concepts can be captured, at their
    recorded positions s_k (concepts.LocatedConcept). Raises: ConceptSplitError on an empty word list, a word not in
    the prompt, or typed words with nothing to locate them in.
    """
    typed = parse_words(words_text)
    words = typed or tuple(concept.word for concept in concepts)
    if not words:
        raise ConceptSplitError.build(
            "Capture Attention got no words",
            seen=f"words {words_text!r} and no ToVA concepts on the model",
            expected='one or more comma-separated words of the prompt, e.g. "dog, cat"',
            fix="type the words to inspect, or apply ToVA adapters before this node",
        )
    if prompt is not None:
        return words, locate_words(prompt, words, word_ids, token_mode), len(prompt.token_ids)
    by_word = {concept.word.lower(): concept for concept in concepts}
    missing = [word for word in words if word.lower() not in by_word]
    if missing:
        raise ConceptSplitError.build(
            f'Capture Attention cannot find "{missing[0]}" without the prompt\'s tokens',
            seen="no token record on the positive input" + (f", ToVA concepts {', '.join(by_word)}" if by_word else ""),
            expected="the positive CONDITIONING of ConceptSplit Text Encode or Apply ToVA, or only ToVA words",
            fix="connect that conditioning to Capture Attention's positive input",
        )
    positions = []
    for word in words:
        start = by_word[word.lower()].position
        width = len(word_ids(word)) if token_mode == TOKEN_ALL else 1
        positions.append(tuple(range(start, start + max(width, 1))))
    return words, tuple(positions), by_word[words[0].lower()].prompt_length


def locate_words(
    prompt: PromptTokens, words: Sequence[str], word_ids: Callable[[str], tuple[int, ...]], token_mode: str
) -> tuple[tuple[int, ...], ...]:
    """Token positions of each word in the prompt, by ToVA's rule (method §2.4: first free occurrence starting a word).

    Returns per word its first token's position, or all its BPE tokens' positions (token_mode "all tokens").
    A prompt with decoded pieces (a DiT's) is located by them: its first piece, or every piece of the word.
    Raises: ConceptSplitError for a word not in the prompt (or fewer occurrences than the word is listed).
    """
    if prompt.pieces:
        return locate_words_in_pieces(prompt, words, all_tokens=token_mode == TOKEN_ALL)
    ids_of = {word: tuple(word_ids(word)) for word in words}
    for word in dict.fromkeys(words):
        ids = ids_of[word]
        found = _count_occurrences(prompt, ids)
        wanted = sum(1 for other in words if other == word)
        if found < wanted:
            raise ConceptSplitError.build(
                f'Word "{word}" is not in the prompt' + (f" {wanted} times" if found else ""),
                seen=f'{found} occurrence(s) as a separate word in "{_short(prompt.text)}"',
                expected=f'"{word}" written in the positive prompt ("{word}s" or "hot{word}" do not match)',
                fix=f'add "{word}" to the prompt or remove it from the words',
            )
    requests = [IdentifierRequest(label=word, word=word, word_ids=ids_of[word]) for word in words]
    starts = locate_identifier_positions(prompt, requests)
    if token_mode == TOKEN_ALL:
        return tuple(tuple(range(start, start + len(ids_of[word]))) for word, start in zip(words, starts))
    return tuple((start,) for start in starts)


def _count_occurrences(prompt: PromptTokens, ids: tuple[int, ...]) -> int:
    n = len(ids)
    slots = range(len(prompt.token_ids) - n + 1) if n else ()
    return sum(1 for p in slots if prompt.word_starts[p] and tuple(prompt.token_ids[p : p + n]) == ids)


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
