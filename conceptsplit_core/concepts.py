"""Concepts: an adapter file plus what the user said about it (word, strength, role, token index), and the plan
that binds a list of concepts to one model and one prompt (method §2.4, §2.8).

Each concept keeps its own position next to it: never parallel lists of adapters and positions (method §2.8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from .adapter_file import AdapterWeights
from .adapter_layers import bind_adapter_layers
from .config import ROLE_FROM_FILE, ROLES, TOKEN_INDEX_AUTO
from .errors import ConceptSplitError
from .model_layout import LayerKey, ModelLayout
from .prompt_tokens import IdentifierRequest, PromptTokens, locate_identifier_positions
from .token_value_delta import TokenDelta

# The largest ToVA delta accepted next to the layer's own value weight: ||strength · alpha/r · B·A||_F may be at most
# this many times ||W_v||_F (see check_delta_sizes for the derivation).
MAX_DELTA_TO_WEIGHT = 1000.0


@dataclass(frozen=True)
class ConceptAdapter:
    """One concept as it travels on the adapters wire between nodes (immutable)."""

    weights: AdapterWeights
    identifier_word: str  # the plain class word whose first BPE token gets the delta (method §2.4)
    strength: float  # λ_k multiplier (method §2.1, default 1.0)
    role: str  # "object" (ToVA + LODA) or "background" (ToVA only), method §5
    token_index: int | None = None  # explicit s_k; None = find the word in the prompt

    @property
    def label(self) -> str:
        return f"{self.weights.name} ({self.identifier_word})"


@dataclass(frozen=True)
class BoundConcept:
    """A concept located in a prompt: its position s_k and its tensors keyed by the host's attn2 blocks."""

    concept: ConceptAdapter
    position: int  # s_k, 0-based in the flat token sequence
    layers: dict  # LayerKey -> (A (r, d), B (C, r))


@dataclass(frozen=True)
class LocatedConcept:
    """What later nodes (LODA, viewer) need to know of a ToVA concept: no tensors, so it is cheap to copy."""

    word: str  # identifier word
    position: int  # s_k
    role: str  # "object" or "background"
    prompt_length: int  # 77 · windows of the prompt s_k was found in
    label: str  # adapter file name
    prompt_ids: tuple[int, ...] | None = None  # token ids of that prompt, so LODA can check it is the one sampled


def located(
    bound: Sequence[BoundConcept], prompt_length: int, prompt_ids: Sequence[int] | None = None
) -> tuple[LocatedConcept, ...]:
    """The tensor-free record of bound concepts, in concept order."""
    ids = None if prompt_ids is None else tuple(prompt_ids)
    return tuple(
        LocatedConcept(
            b.concept.identifier_word, b.position, b.concept.role, prompt_length, b.concept.weights.name, ids
        )
        for b in bound
    )


def make_concept(
    weights: AdapterWeights, identifier_word: str, strength: float, role: str, token_index: int = TOKEN_INDEX_AUTO
) -> ConceptAdapter:
    """Resolve the identifier word and role (node input first, then the file's metadata) and validate them."""
    word = identifier_word.strip()
    if not word and weights.metadata is not None:
        word = weights.metadata.identifier_word
    if not word:
        raise ConceptSplitError.build(
            f'Adapter "{weights.name}" needs an identifier word',
            seen="an empty identifier_word and a file without one (official ConceptSplit checkpoints carry none)",
            expected='the plain class word the adapter was trained on, e.g. "dog"',
            fix="type the word into identifier_word",
        )
    if role == ROLE_FROM_FILE:
        role = weights.metadata.role if weights.metadata is not None else "object"
    if role not in ROLES:
        raise ConceptSplitError.build(
            "Unknown concept role", seen=repr(role), expected=" or ".join(ROLES), fix="pick object or background"
        )
    explicit = None if token_index == TOKEN_INDEX_AUTO else int(token_index)
    return ConceptAdapter(
        weights=weights, identifier_word=word, strength=float(strength), role=role, token_index=explicit
    )


def bind_concepts(
    concepts: Sequence[ConceptAdapter],
    layout: ModelLayout,
    prompt: PromptTokens,
    word_ids: Callable[[str], tuple[int, ...]],
    value_weight_norms: Mapping[LayerKey, float] | None = None,
) -> list[BoundConcept]:
    """Check every adapter against the model, then find every identifier in the prompt (method §2.4, §2.7, §2.8).

    `value_weight_norms` ({attn2 replace key: ||W_v||_F} of the host) adds the delta-size check (check_delta_sizes).
    All checks run before anything is patched. Raises: ConceptSplitError (family, layers, size, word, occurrence).
    """
    if not concepts:
        raise ConceptSplitError.build(
            "No ToVA adapters given",
            seen="an empty adapter list",
            expected="at least one adapter",
            fix="connect a Load ToVA Adapter node",
        )
    layers = [bind_adapter_layers(concept.weights, layout) for concept in concepts]
    if value_weight_norms is not None:
        for concept in concepts:
            check_delta_sizes(concept, layout, value_weight_norms)
    requests = []
    for concept in concepts:
        ids = word_ids(concept.identifier_word) if concept.token_index is None else ()
        if concept.token_index is None and not ids:
            raise ConceptSplitError.build(
                f'Identifier word "{concept.identifier_word}" of "{concept.weights.name}" has no tokens',
                seen="the tokenizer returned nothing for it",
                expected="a word, e.g. dog",
                fix="type a real word into identifier_word",
            )
        requests.append(
            IdentifierRequest(
                label=concept.weights.name,
                word=concept.identifier_word,
                word_ids=ids,
                explicit_position=concept.token_index,
            )
        )
    positions = locate_identifier_positions(prompt, requests)
    return [BoundConcept(concept, position, bound) for concept, position, bound in zip(concepts, positions, layers)]


def check_delta_sizes(
    concept: ConceptAdapter, layout: ModelLayout, value_weight_norms: Mapping[LayerKey, float]
) -> None:
    """Refuse a concept whose delta dwarfs the layer it adapts: ||λ · alpha/r · B·A||_F <= 1000 · ||W_v||_F.

    Why Frobenius norms: for text features c in general position E||M c||² = ||M||_F² ||c||² / d, so the ratio is
    the typical size of the delta's contribution to the identifier's value row next to the row the layer itself
    makes. Why 1000: trained adapters sit far below it. The paper's recipe (300 AdamW steps at lr 1e-4) moves an
    entry of A or B by at most lr·(1−β1)/√(1−β2) = 3.16·lr per step (Kingma & Ba, §2.1), 0.095 in all, so for
    SD2.1's widest layer (C 1280, d 1024, r 64) ||B·A||_F <= ||B||_F·||A||_F <= 27 · 28 ≈ 770, about 20× a weight
    of entries ~0.03 (||W_v||_F ≈ 34) even if every step pushed the same way; the pack's tiny test adapters, drawn
    large so their effect shows, measure 5-10× at strength 1, and the strength widget allows 4×. A delta 1000× the
    weight makes the identifier's value row three orders of magnitude larger than every other token's row: no
    picture of the concept survives that, and an fp16 model (largest value 65504) overflows as soon as its own
    value rows exceed 65, which gives NaN latents. Such a file is damaged or carries a wrong alpha.

    Layers missing from `value_weight_norms` (a weight that could not be read) are not checked here; the read-time
    check that the scaled delta is finite in float32 (adapter_file) still holds for them.
    Raises: ConceptSplitError naming the layer, the sizes seen and the bound.
    """
    weights = concept.weights
    factor = abs(concept.strength) * weights.scale
    if factor == 0:
        return  # strength 0: the concept is off, its delta is never added
    for layer in layout.layers:
        reference = value_weight_norms.get(layer.key)
        if reference is None or layer.path not in weights.layers:
            continue
        size = factor * weights.delta_norm(layer.path)
        if size > MAX_DELTA_TO_WEIGHT * reference:
            ratio = size / reference if reference > 0 else float("inf")
            raise ConceptSplitError.build(
                f'Adapter "{weights.name}" changes layer {layer.path} by {ratio:.3g} times the layer\'s own weight',
                seen=f"||strength · alpha/rank · lora_B·lora_A|| = {concept.strength:g} · {weights.scale:.4g} · "
                f"{weights.delta_norm(layer.path):.4g} = {size:.4g}, the model's ||to_v weight|| = "
                f"{reference:.4g}",
                expected=f"at most {MAX_DELTA_TO_WEIGHT:g} times the weight (a trained ToVA adapter stays below "
                "about 20 times at strength 1)",
                fix="the file is damaged or was saved with a wrong alpha: train or download it again. If it is "
                "right, lower its strength",
            )


def plan_token_deltas(
    bound: Sequence[BoundConcept], prompt_length: int, prompt_ids: tuple | None = None
) -> dict[LayerKey, tuple[TokenDelta, ...]]:
    """Per attn2 block, the deltas of every concept, in concept order (method §2.1: scale = strength · alpha / r).

    `prompt_ids` (the prompt's token ids) lets the sampler tell this prompt's conditioning from others in a batch.
    """
    plan: dict[LayerKey, list[TokenDelta]] = {}
    for item in bound:
        scale = item.concept.strength * item.concept.weights.scale
        for key, (lora_a, lora_b) in item.layers.items():
            plan.setdefault(key, []).append(
                TokenDelta(lora_a, lora_b, scale, item.position, prompt_length, item.concept.label, prompt_ids)
            )
    return {key: tuple(deltas) for key, deltas in plan.items()}


def describe_bindings(bound: Sequence[BoundConcept], prompt: PromptTokens) -> str:
    """One line per concept for the node's text output: word, position (window and index), role, strength."""
    lines = []
    window = prompt.window_length
    for item in bound:
        c = item.concept
        lines.append(
            f'{c.weights.name}: "{c.identifier_word}" -> token {item.position} '
            f"(window {item.position // window}, index {item.position % window}), role {c.role}, "
            f"strength {c.strength:g}, rank {c.weights.rank}, {c.weights.file_format} format"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class ToVAPlan:
    """Everything Apply ToVA installs, resolved before anything is patched."""

    deltas: dict  # LayerKey -> tuple[TokenDelta, ...], per layer, in concept order
    located: tuple[LocatedConcept, ...]  # the concepts and their positions, for LODA and the viewer
    info: str  # the node's text output: where each identifier word was found
    label: str  # the adapters' labels, for messages


def plan_tova(
    concepts: Sequence[ConceptAdapter],
    layout: ModelLayout,
    prompt: PromptTokens,
    word_ids: Callable[[str], tuple[int, ...]],
    value_weight_norms: Mapping[LayerKey, float] | None = None,
) -> ToVAPlan:
    """Bind the concepts to the model and the prompt (bind_concepts), and plan their deltas (method §2.1, §2.4).

    Raises: ConceptSplitError as bind_concepts.
    """
    bound = bind_concepts(concepts, layout, prompt, word_ids, value_weight_norms)
    length, ids = len(prompt.token_ids), prompt.token_ids
    return ToVAPlan(
        plan_token_deltas(bound, length, ids),
        located(bound, length, ids),
        describe_bindings(bound, prompt),
        ", ".join(c.label for c in concepts),
    )
