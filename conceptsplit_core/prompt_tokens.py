"""Find each concept's identifier token position s_k in the host's own token sequence (method §2.4).

The seam turns ComfyUI's tokenization of the prompt into a `PromptTokens`: the flat token sequence across
77-token windows (position = window · 77 + index in window, SOT at 0 of each window), and for each slot whether a
word may start there. Matching is on BPE ids, so it is case-insensitive and punctuation-split like CLIP itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import ConceptSplitError


@dataclass(frozen=True)
class PromptTokens:
    """A tokenized prompt as the text encoder sees it."""

    text: str
    token_ids: tuple[int | None, ...]  # flat over windows; None for an embedding slot (textual inversion)
    word_starts: tuple[bool, ...]  # word_starts[p]: slot p begins a new word (previous slot ended one)
    window_length: int = 77  # tokens per window, SOT and EOT included
    # DiT text encoders (T5, Qwen): each slot's piece text as the tokenizer decodes it, without the word-start
    # marker ("▁cat" -> "cat"; "" for special and pad tokens); () for CLIP prompts, which are matched by BPE ids
    pieces: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        assert len(self.token_ids) == len(self.word_starts), "one flag per token slot"
        assert not self.pieces or len(self.pieces) == len(self.token_ids), "one piece per token slot"


@dataclass(frozen=True)
class IdentifierRequest:
    """What one concept asks for: its word, the word's BPE ids, or an explicit position."""

    label: str  # shown in messages, e.g. the adapter file name
    word: str  # identifier word as typed, e.g. "dog"
    word_ids: tuple[int, ...]  # BPE ids of the word alone, without SOT/EOT
    explicit_position: int | None = None  # overrides the search when set


def locate_identifier_positions(prompt: PromptTokens, requests: Sequence[IdentifierRequest]) -> list[int]:
    """Return s_k for each request, in request order (method §2.4, inference rule, used everywhere).

    Concepts are processed in order; each takes the first occurrence of its whole BPE sequence that starts a word
    and whose tokens are not yet claimed; s_k is the first token of that occurrence. An explicit position wins.
    Raises: ConceptSplitError when a word is not in the prompt, or every occurrence is already taken.
    """
    claimed: set[int] = set()
    positions = []
    for request in requests:  # explicit positions claim first, so searching concepts never take them
        if request.explicit_position is not None:
            _check_explicit(prompt, request, claimed)
            claimed.add(request.explicit_position)
    for request in requests:
        if request.explicit_position is not None:
            positions.append(request.explicit_position)
            continue
        occurrences = _occurrences(prompt, request.word_ids)
        free = [p for p in occurrences if not claimed.intersection(range(p, p + len(request.word_ids)))]
        if not free:
            raise _not_found_error(prompt, request, taken=bool(occurrences))
        start = free[0]
        claimed.update(range(start, start + len(request.word_ids)))
        positions.append(start)
    return positions


def _occurrences(prompt: PromptTokens, word_ids: tuple[int, ...]) -> list[int]:
    if not word_ids:
        return []
    n = len(word_ids)
    ids = prompt.token_ids
    return [p for p in range(len(ids) - n + 1) if prompt.word_starts[p] and tuple(ids[p : p + n]) == word_ids]


def _check_explicit(prompt: PromptTokens, request: IdentifierRequest, claimed: set[int]) -> None:
    position = request.explicit_position
    window = prompt.window_length
    if not 0 <= position < len(prompt.token_ids) or position % window == 0:
        raise ConceptSplitError.build(
            f'Token index {position} of "{request.label}" is outside the prompt\'s text tokens',
            seen=f"{len(prompt.token_ids)} token slots ({len(prompt.token_ids) // window} window(s) of {window}; "
            f"index 0 of each window is the start token)",
            expected=f"an index between 1 and {len(prompt.token_ids) - 1}, not a multiple of {window}",
            fix="set token_index to -1 to find the identifier word automatically",
        )
    if position in claimed:
        raise ConceptSplitError.build(
            f"Two concepts use token index {position}",
            seen=f'"{request.label}" and an earlier concept',
            expected="one concept per token position",
            fix="give each adapter its own token_index or word",
        )


def _not_found_error(prompt: PromptTokens, request: IdentifierRequest, taken: bool) -> ConceptSplitError:
    if taken:
        return ConceptSplitError.build(
            f'Identifier word "{request.word}" of "{request.label}" has no free occurrence in the prompt',
            seen=f'every "{request.word}" in "{_short(prompt.text)}" is already used by an earlier concept',
            expected="one occurrence of the word per concept that uses it",
            fix=f'write "{request.word}" once more in the prompt (e.g. "a {request.word} and a {request.word}") '
            "or remove one of the adapters",
        )
    return ConceptSplitError.build(
        f'Identifier word "{request.word}" of "{request.label}" is not in the prompt',
        seen=f'prompt "{_short(prompt.text)}"',
        expected=f'"{request.word}" as a separate word (any case; "{request.word}s" or "hot{request.word}" '
        "do not match)",
        fix=f'add "{request.word}" to the prompt or remove its adapter',
    )


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def locate_words_in_pieces(
    prompt: PromptTokens, words: Sequence[str], all_tokens: bool = False
) -> tuple[tuple[int, ...], ...]:
    """Token rows of each word in a prompt with decoded pieces (DiT text encoders: T5, Qwen), ToVA's rule:
    words in order, each takes its first free occurrence as a whole word (case-insensitive, punctuation ends a word).

    An occurrence starts at a word-start slot and is the shortest run of pieces whose text is the word; an empty
    leading piece (T5 writes "a" as "▁" + "a") is skipped, so a split word's first piece is its first non-empty one.
    Returns per word (first row,) or, with `all_tokens`, every row of its pieces.
    Raises: ConceptSplitError naming the prompt's token table when a word has no free occurrence.
    """
    claimed: set[int] = set()
    found = []
    for word in words:
        rows = next((r for r in _piece_occurrences(prompt, word) if not claimed.intersection(r)), None)
        if rows is None:
            taken = bool(_piece_occurrences(prompt, word))
            raise ConceptSplitError.build(
                f'Word "{word}" is not in the prompt' + (" often enough" if taken else ""),
                seen=f'the tokens of "{_short(prompt.text)}": {token_table_text(prompt)}',
                expected=f'"{word}" as a separate word of the prompt, once per concept that uses it ("{word}s" or '
                f'"hot{word}" do not match)',
                fix=f'add "{word}" to the prompt or remove it from the words',
            )
        claimed.update(rows)
        found.append(tuple(rows) if all_tokens else (rows[0],))
    return tuple(found)


def _piece_occurrences(prompt: PromptTokens, word: str) -> list[list[int]]:
    target = word.strip().lower()
    pieces = [p.lower() for p in prompt.pieces]
    hits = []
    for start in range(len(pieces)):
        if not prompt.word_starts[start] or not target:
            continue
        text, rows, end = "", [], start
        while end < len(pieces) and len(text) < len(target) and (end == start or not prompt.word_starts[end]):
            if pieces[end]:
                rows.append(end)
                text += pieces[end]
            end += 1
        ends_word = end >= len(pieces) or prompt.word_starts[end] or not pieces[end] or not pieces[end][0].isalnum()
        if text == target and rows and ends_word:
            hits.append(rows)
    return hits


def token_table_text(prompt: PromptTokens, limit: int = 40) -> str:
    """'row: piece' for the non-empty pieces of a prompt (the first `limit`), for errors and info outputs."""
    shown = [f"{row}:{piece!r}" for row, piece in enumerate(prompt.pieces) if piece][:limit]
    return ", ".join(shown) + (" ..." if len([p for p in prompt.pieces if p]) > limit else "")


def located_table(prompt: PromptTokens, labels: Sequence[str], rows: Sequence[Sequence[int]]) -> str:
    """The bound tokens as a table, one line per word: 'word -> row r (piece 'cat')'."""
    lines = ["word -> token row (piece)"]
    for label, word_rows in zip(labels, rows):
        pieces = ", ".join(
            f"row {r} ({prompt.pieces[r]!r})" if r < len(prompt.pieces) else f"row {r}" for r in word_rows
        )
        lines.append(f"{label} -> {pieces}")
    return "\n".join(lines)
