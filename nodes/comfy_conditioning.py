"""Seam: what the pack records on CONDITIONING and on a model's transformer_options, and the chunk table that tells
each CFG chunk of a model call which prompt it holds (integration §1.1, §1.7, §2).

Node modules and the model-family modules call these; conceptsplit_core never sees ComfyUI objects.
"""

from __future__ import annotations

from collections import OrderedDict

from ..conceptsplit_core.attention_calls import ChunkPrompt, chunk_holds_prompt
from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.prompt_encoding import PromptEncoding, identify_conditionings
from ..conceptsplit_core.prompt_tokens import PromptTokens

# CONDITIONING dict key: the PromptTokens the conditioning was encoded from (token positions for LODA and the viewer)
PROMPT_TOKENS_KEY = "conceptsplit_prompt"
# CONDITIONING dict key: the PromptEncoding of that prompt (its text features as the pack encoded them), so the same
# text encoded by another node is recognised by content (prompt_encoding)
PROMPT_ENCODING_KEY = "conceptsplit_encoding"
# transformer_options key: tuple of PromptEncoding, the prompts nodes located positions in (Apply ToVA, Capture
# Attention); the CALC_COND_BATCH wrappers recognise unrecorded positives by them
ENCODINGS_KEY = "conceptsplit_encodings"
# transformer_options key: tuple of LocatedConcept, the ToVA concepts and their positions (no tensors)
CONCEPTS_KEY = "conceptsplit_concepts"
# transformer_options key: {cond uuid: ChunkPrompt}, set per model call by a CALC_COND_BATCH wrapper (ToVA's, or
# record_chunk_prompts for observers), so the processor knows which prompt each CFG chunk holds
CHUNKS_KEY = "conceptsplit_chunks"
CHUNKS_WRAPPER_KEY = "conceptsplit_chunk_prompts"


def chunk_table(conds, encodings=(), default_length: int = 0) -> dict:
    """{cond uuid: ChunkPrompt} for the conditionings of one calc_cond_batch call (`conds`: [positives, negatives],
    each a list of processed cond dicts): each one's own token length (as the model sees it), area flag and prompt.

    The prompt of a positive is its token record, or, without one, the prompt of the first encoding its text
    features match (prompt_encoding's rule): `encodings` (the model's, from Apply ToVA and Capture Attention) and
    those recorded on the call's own positives. Negatives keep only their record (never matched by content).
    Shapes: cond["cross_attn"] (n, L, d), compared once per run (one host read on an accelerator, none on the CPU).
    """
    positives = list((conds[0] or ()) if conds else ())
    known = list(encodings)
    for cond in positives:
        encoding = cond.get(PROMPT_ENCODING_KEY)
        if encoding is not None and all(encoding is not other for other in known):
            known.append(encoding)
    unrecorded = [cond for cond in positives if recorded_prompt_ids(cond) is None]
    identified = dict(zip((id(cond) for cond in unrecorded), _identified_prompts(unrecorded, known)))
    table = {}
    for group in conds:
        for cond in group or ():
            length = model_context_length(cond)
            ids = recorded_prompt_ids(cond)
            if ids is None:
                ids = identified.get(id(cond))
            table[cond["uuid"]] = ChunkPrompt(
                length if length is not None else default_length, ids, area=cond.get("area") is not None
            )
    return table


def model_context_length(cond: dict) -> int | None:
    """Rows of the context the model gets from one processed cond: its model_conds["c_crossattn"] (after the model's
    extra_conds, e.g. Flux.2's left pad to 512 rows), else its conditioning tensor's; None without either."""
    model_cond = (cond.get("model_conds") or {}).get("c_crossattn")
    tensor = getattr(model_cond, "cond", None)
    if tensor is None:
        tensor = cond.get("cross_attn")  # (n, L, d)
    return int(tensor.shape[1]) if tensor is not None else None


def encoding_text(model_options: dict, prompt_ids: tuple) -> str:
    """The text of the model's recorded encoding with these token ids ("" when there is none)."""
    encodings = model_options.get("transformer_options", {}).get(ENCODINGS_KEY, ())
    return next((e.text for e in encodings if tuple(e.prompt_ids) == tuple(prompt_ids)), "")


# (cond uuid, encodings) -> prompt ids or None. ComfyUI gives each processed cond of a run its own uuid4 and keeps
# its tensor for the whole run, so a positive is compared once per run, not at every model call (an SDXL comparison
# reads 77·2048 floats per window and encoding). Bounded: the oldest entries go first.
_IDENTIFIED: OrderedDict = OrderedDict()
_IDENTIFIED_LIMIT = 1024


def _identified_prompts(unrecorded: list, known: list) -> list:
    """prompt_encoding.identify_conditionings for the unrecorded positives `unrecorded`, cached per run."""
    keys = [(cond["uuid"], tuple(id(encoding) for encoding in known)) for cond in unrecorded]
    missing = [index for index, key in enumerate(keys) if key not in _IDENTIFIED]
    if missing:
        found = identify_conditionings([unrecorded[index].get("cross_attn") for index in missing], known)
        for index, ids in zip(missing, found):
            _IDENTIFIED[keys[index]] = ids
        while len(_IDENTIFIED) > _IDENTIFIED_LIMIT:
            _IDENTIFIED.popitem(last=False)
    return [_IDENTIFIED[key] for key in keys]


def call_chunk_table(conds, model_options: dict, default_length: int = 0) -> dict:
    """The chunk table of one model call: the one an enclosing CALC_COND_BATCH wrapper already put into
    `model_options` when it covers every cond of the call, else `chunk_table` with the model's encodings."""
    transformer_options = model_options.get("transformer_options", {})
    existing = transformer_options.get(CHUNKS_KEY) or {}
    uuids = [cond["uuid"] for group in (conds or ()) for cond in (group or ())]
    if existing and all(uuid in existing for uuid in uuids):
        return {uuid: existing[uuid] for uuid in uuids}
    return chunk_table(conds, transformer_options.get(ENCODINGS_KEY, ()), default_length)


def with_chunk_table(model_options: dict, table: dict) -> dict:
    """A copy of `model_options` whose attn2 calls see `table` ({uuid: ChunkPrompt}) under CHUNKS_KEY."""
    to = dict(model_options.get("transformer_options", {}))
    to[CHUNKS_KEY] = {**to.get(CHUNKS_KEY, {}), **table}
    return {**model_options, "transformer_options": to}


def call_chunk_prompts(transformer_options: dict) -> tuple:
    """Per CFG chunk of one attention call, the ChunkPrompt its conditioning recorded (None where unknown), in the
    order of the call's uuids; () when this model call recorded no chunk table."""
    table = transformer_options.get(CHUNKS_KEY) or {}
    uuids = transformer_options.get("uuids") or ()
    return tuple(table.get(uuid) for uuid in uuids) if table else ()


def record_chunk_prompts(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper (a plain function, so clone() keeps it as is): record which prompt each conditioning
    of this model call holds, for the observers (LODA, Capture Attention) to skip other positive prompts."""
    table = call_chunk_table(conds, model_options)
    return executor(model, conds, x_in, timestep, with_chunk_table(model_options, table))


TOVA_SOURCE = "Apply ToVA's positive output"
TOVA_FIX = (
    "connect Apply ToVA's positive output to the sampler, or give Apply ToVA the prompt you sample (the same "
    "text and prompt weights)"
)


def check_prompt_sampled(
    conds,
    table: dict,
    prompt_ids: tuple,
    prompt_length: int,
    prompt_text: str,
    problem: str,
    source: str = TOVA_SOURCE,
    fix: str = TOVA_FIX,
) -> None:
    """Raise `problem` unless one positive conditioning of this model call holds the located prompt (chunk_holds_prompt
    on `table`, from call_chunk_table); a call without positives passes.

    The one check of Apply ToVA and Capture Attention (and so of LODA on a ToVA model), at the first model call,
    before anything is sampled. `source` names the conditioning that is the prompt, `fix` how to connect it.
    """
    positives = [table[cond["uuid"]] for cond in ((conds[0] or ()) if conds else ())]
    if not positives or any(chunk_holds_prompt(chunk, prompt_ids, prompt_length) for chunk in positives):
        return
    recorded = [chunk for chunk in positives if chunk.prompt_ids is not None]
    lengths = sorted({chunk.length for chunk in positives})
    parts = [f"{len(positives)} positive conditioning(s) of {', '.join(map(str, lengths))} tokens"]
    if recorded:
        parts.append(f"{len(recorded)} encoded by the pack from another prompt")
    if len(recorded) < len(positives):
        parts.append(
            f"{len(positives) - len(recorded)} with text features other than those of "
            f'"{prompt_text[:80]}" (another text, other prompt weights or another CLIP)'
        )
    raise ConceptSplitError.build(
        problem,
        seen=", ".join(parts),
        expected=f'the conditioning of "{prompt_text[:80]}" ({prompt_length} tokens): {source}, or that same '
        "text encoded with the same CLIP by any text encode node",
        fix=fix,
    )


def conditioning_encodings(conditioning) -> tuple[PromptEncoding, ...]:
    """The PromptEncodings recorded on a CONDITIONING's entries (encode_prompt attaches one per entry)."""
    found = []
    for _, extras in conditioning or ():
        encoding = extras.get(PROMPT_ENCODING_KEY)
        if encoding is not None and all(encoding is not other for other in found):
            found.append(encoding)
    return tuple(found)


def with_prompt_encodings(model_options: dict, encodings) -> dict:
    """Return model_options whose CALC_COND_BATCH wrappers also recognise the prompts of `encodings` by content
    (appended to any recorded before; the caller's dicts stay as they were)."""
    options = dict(model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    known = tuple(transformer_options.get(ENCODINGS_KEY, ()))
    transformer_options[ENCODINGS_KEY] = known + tuple(e for e in encodings if all(e is not k for k in known))
    options["transformer_options"] = transformer_options
    return options


def recorded_prompt_ids(entry: dict) -> tuple | None:
    """Token ids of the PromptTokens recorded on one conditioning dict (a CONDITIONING entry's extras, or a cond
    ComfyUI processed from it: convert_cond keeps the keys), or None for a plain CLIP Text Encode."""
    tokens = entry.get(PROMPT_TOKENS_KEY)
    return None if tokens is None else tuple(tokens.token_ids)


def distinct_prompts(entries) -> tuple[PromptTokens, ...]:
    """Every distinct PromptTokens recorded on the conditioning dicts `entries`, in order (ConditioningCombine keeps
    each entry's own record)."""
    found: dict[tuple, PromptTokens] = {}
    for entry in entries:
        tokens = entry.get(PROMPT_TOKENS_KEY)
        if tokens is not None:
            found.setdefault(tuple(tokens.token_ids), tokens)
    return tuple(found.values())


def conditioning_prompts(conditioning) -> tuple[PromptTokens, ...]:
    """Every distinct PromptTokens attached to the entries of a CONDITIONING."""
    return distinct_prompts(extras for _, extras in conditioning)


def conditioning_prompt_tokens(conditioning) -> PromptTokens | None:
    """The first PromptTokens attached by Apply ToVA / ConceptSplit Text Encode to a CONDITIONING, or None."""
    prompts = conditioning_prompts(conditioning)
    return prompts[0] if prompts else None


def with_located_concepts(model_options: dict, concepts: tuple) -> dict:
    """Record the ToVA concepts and their positions on the model (appended to any recorded before)."""
    options = dict(model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    transformer_options[CONCEPTS_KEY] = tuple(transformer_options.get(CONCEPTS_KEY, ())) + tuple(concepts)
    options["transformer_options"] = transformer_options
    return options


def located_concepts(model_patcher) -> tuple:
    """The LocatedConcepts recorded on a MODEL by Apply ToVA nodes, in concept order (empty when none)."""
    return tuple(model_patcher.model_options.get("transformer_options", {}).get(CONCEPTS_KEY, ()))
