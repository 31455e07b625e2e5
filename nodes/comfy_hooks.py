"""Seam, part 1: ComfyUI's model classes, tokenizers, attention patch signatures and option keys.

Node modules call the functions here; conceptsplit_core never sees ComfyUI objects. Hooks used (comfyui-notes §1-§3):
- attn2_patch  p(n, context, value, extra_options) -> (n, context, value): stashes the raw text features.
- attn2 replace f(q, k, v, extra_options) -> out (b, Lq, heads·dim_head): one ConceptSplit processor per block,
  which adds the ToVA delta to V's identifier rows and then runs attention (or the foreign replace it wraps).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_base
import comfy.patcher_extension
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.sd1_clip
import comfy.supported_models
import comfy.utils

from ..conceptsplit_core.adapter_layers import CrossAttentionLayer, UNetLayout
from ..conceptsplit_core.attention_calls import (AttentionCall, ChunkPrompt, attention_probabilities,
                                                 chunk_holds_prompt)
from ..conceptsplit_core.config import FAMILY_SD15, FAMILY_SD21, FAMILY_SDXL, PREDICTION_EPS, PREDICTION_V
from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.prompt_encoding import PromptEncoding, identify_conditionings
from ..conceptsplit_core.prompt_tokens import PromptTokens
from ..conceptsplit_core.token_value_delta import TokenDelta, apply_token_value_delta, identifier_rows

VALUE_INPUT_KEY = "conceptsplit_value_input"  # extra_options key: the tensor that to_v receives, (B, T, d)
# transformer_options key: a tuple of AttentionObserver objects (a tuple, so ComfyUI's per-call dict/list copying
# keeps the same objects; notes §1.1)
OBSERVERS_KEY = "conceptsplit_observers"
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
TOVA_WRAPPER_KEY = "conceptsplit_tova"
BlockKey = tuple[str, int, int]  # ("input", 7, 0): block name, block id, block_index (depth)


# --- model description ----------------------------------------------------------------------------------------

def unet_layout(model_patcher) -> UNetLayout:
    """Describe the MODEL's family, prediction type, text width and cross-attention layers (spec §2.2).

    Raises: ConceptSplitError for a model that is not an SD1.5, SD2.x or SDXL UNet.
    """
    base = model_patcher.model
    config = base.model_config
    family = _family_of(config)
    prediction = PREDICTION_V if base.model_type == comfy.model_base.ModelType.V_PREDICTION else PREDICTION_EPS
    layers = []
    for path, ldm_key, module in _value_projections(model_patcher):
        out_features, in_features = module.weight.shape  # (C, d)
        layers.append(CrossAttentionLayer(
            path=path, block=_block_of(ldm_key), block_index=_depth_of(ldm_key),
            out_features=int(out_features), in_features=int(in_features)))
    layers.sort(key=lambda layer: (("input", "middle", "output").index(layer.block[0]), layer.block[1],
                                   layer.block_index))
    return UNetLayout(family=family, prediction=prediction, text_width=int(config.unet_config["context_dim"]),
                      layers=tuple(layers))


def _value_projections(model_patcher):
    """(diffusers path of the transformer block, ldm key of to_v.weight, the to_v module) of every attn2."""
    base = model_patcher.model
    modules = dict(base.diffusion_model.named_modules())
    suffix = ".attn2.to_v.weight"
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(base.model_config.unet_config).items():
        if diffusers_key.endswith(suffix):
            yield diffusers_key[: -len(suffix)], ldm_key, modules[ldm_key[: -len(".weight")]]


def value_weight_norms(model_patcher, layout: UNetLayout) -> dict[BlockKey, float]:
    """{attn2 replace key: ||W_v||_F} of the model's own cross-attention value weights, for the ToVA size check.

    Read from the stored weight (fp32 norm, on whatever device it sits). A weight that cannot be read as numbers
    (a meta tensor, an exotic quantised type) or whose norm is not a finite positive number is left out, and its
    layer is then not compared (concepts.check_delta_sizes).
    """
    keys = {layer.path: layer.key for layer in layout.layers}
    norms = {}
    for path, _, module in _value_projections(model_patcher):
        try:
            norm = float(torch.linalg.vector_norm(module.weight.detach().float()))  # (C, d) -> scalar
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            continue
        if path in keys and 0 < norm < float("inf"):
            norms[keys[path]] = norm
    return norms


def _family_of(config) -> str:
    # Order matters: SDXL variants subclass SDXL, SD2 unCLIP subclasses SD20.
    for cls, family in ((comfy.supported_models.SDXL, FAMILY_SDXL), (comfy.supported_models.SD20, FAMILY_SD21),
                        (comfy.supported_models.SD15, FAMILY_SD15)):
        if isinstance(config, cls):
            return family
    raise ConceptSplitError.build(
        "ConceptSplit supports SD1.5, SD2.x and SDXL UNets only",
        seen=f"a {type(config).__name__} model", expected="an SD1.5, SD2.1 or SDXL checkpoint",
        fix="load an SD1.5, SD2.1 or SDXL checkpoint",
    )


def _block_of(ldm_key: str) -> tuple[str, int]:
    # "input_blocks.7.1.transformer_blocks.0..." -> ("input", 7); "middle_block.1..." -> ("middle", 0)
    head, number = ldm_key.split(".")[:2]
    if head == "middle_block":
        return ("middle", 0)
    return (head[: -len("_blocks")], int(number))


def _depth_of(ldm_key: str) -> int:
    parts = ldm_key.split(".")
    return int(parts[parts.index("transformer_blocks") + 1])


# --- tokens ---------------------------------------------------------------------------------------------------

def _position_tokenizer(clip) -> tuple[str, object]:
    """The tokenizer whose positions ComfyUI's context uses: CLIP-L for SD1.5/SDXL, OpenCLIP-H for SD2 (spec §2.4)."""
    tokenizer = clip.tokenizer
    for key in ("l", "h", "g"):
        inner = getattr(tokenizer, f"clip_{key}", None)
        if inner is not None:
            return key, inner
    raise ConceptSplitError.build("This CLIP has no CLIP-L/H/G tokenizer", seen=type(tokenizer).__name__,
                                  expected="the text encoder of an SD1.5, SD2.x or SDXL checkpoint",
                                  fix="connect the CLIP output of the same checkpoint loader as the MODEL")


def prompt_tokens(clip, text: str) -> PromptTokens:
    """Tokenize `text` exactly as CLIPTextEncode does and flatten its 77-token windows (spec §2.4, notes §3).

    Shapes: one slot per context row; position = window · 77 + index in window.
    """
    from .families import clip_family  # DiT text encoders (T5, Qwen): the family knows its tokenizer and template

    family = clip_family(clip)
    if family is not None:
        return family.prompt_tokens(clip, text)
    key, inner = _position_tokenizer(clip)
    windows = clip.tokenize(text)[key]  # list of windows, each a list of (token, weight)
    ids: list[int | None] = []
    starts: list[bool] = []
    previous_ends_word = True
    for window in windows:
        for entry in window:
            token = entry[0]
            if isinstance(token, int):
                special = token in (inner.start_token, inner.end_token, inner.pad_token)
                ids.append(token)
                starts.append(previous_ends_word and not special)
                previous_ends_word = special or inner.inv_vocab.get(token, "").endswith("</w>")
            else:  # a textual-inversion embedding vector occupies one slot
                ids.append(None)
                starts.append(False)
                previous_ends_word = True
    return PromptTokens(text=text, token_ids=tuple(ids), word_starts=tuple(starts),
                        window_length=len(windows[0]) if windows else 77)


def word_token_ids(clip, word: str) -> tuple[int, ...]:
    """BPE ids of the word alone, without start/end tokens (lowercased and split by CLIP's own tokenizer)."""
    _, inner = _position_tokenizer(clip)
    ids = inner.tokenizer(word)["input_ids"]
    return tuple(i for i in ids if i not in (inner.start_token, inner.end_token, inner.pad_token))


# --- the attention processor ----------------------------------------------------------------------------------

def stash_value_input(n, context, value, extra_options):
    """attn2_patch: remember the tensor that to_v will project, so the replace can add ΔW·c on chosen rows."""
    extra_options[VALUE_INPUT_KEY] = value if value is not None else context  # (B, T, d)
    return n, context, value


class ConceptSplitAttention:
    """The attn2 replace for one block: ToVA deltas on V's identifier rows, the observers' bias and probability
    capture (LODA, viewer), then attention (ComfyUI's, or the foreign replace it wraps).

    Immutable: adding adapters builds a new processor. `__deepcopy__` returns self, because ComfyUI deep-copies
    model_options on every clone() and the adapters' tensors must not be duplicated (notes §1.1).
    """

    def __init__(self, deltas: tuple[TokenDelta, ...] = (), apply_to_uncond: bool = True, wrapped=None):
        self.deltas = deltas
        self.apply_to_uncond = apply_to_uncond
        self.wrapped = wrapped  # a foreign attn2 replace (IPAdapter, ...) that we delegate the attention call to
        self._device_cache: dict = {}  # device -> deltas on it; (chunks, batch, device) -> row mask

    def __deepcopy__(self, memo):
        return self

    def add(self, *args, **kwargs):
        """IPAdapter_plus extends the replace object it finds at a block with .add(); ours cannot host its patch."""
        raise ConceptSplitError.build(
            "Another pack tried to add its attention patch on top of ConceptSplit's",
            seen="an IPAdapter-style node applied after Apply ToVA / LODA on the same model",
            expected="other attention patches applied first; ConceptSplit wraps them",
            fix="move the IPAdapter (or similar) node before Apply ToVA in the model chain")

    def clear_device_cache(self) -> None:
        """Drop the adapter copies made for the GPU; called when ComfyUI cleans the model up after sampling."""
        self._device_cache.clear()

    def with_deltas(self, deltas: tuple[TokenDelta, ...], apply_to_uncond: bool) -> "ConceptSplitAttention":
        if self.deltas and apply_to_uncond != self.apply_to_uncond:
            raise ConceptSplitError.build(
                "Two Apply ToVA nodes on one model disagree on apply_to_uncond",
                seen=f"{self.apply_to_uncond} before, {apply_to_uncond} now", expected="the same setting",
                fix="use one setting, or put all adapters into one Apply ToVA node")
        return ConceptSplitAttention(self.deltas + deltas, apply_to_uncond, self.wrapped)

    def _deltas_on(self, device: torch.device) -> tuple[TokenDelta, ...]:
        if any(d.lora_A.requires_grad for d in self.deltas):  # training: keep the parameters in the graph
            return tuple(d.with_weights(d.lora_A.to(device), d.lora_B.to(device)) for d in self.deltas)
        cached = self._device_cache.get(device)
        if cached is None:
            cached = tuple(d.with_weights(d.lora_A.to(device), d.lora_B.to(device)) for d in self.deltas)
            self._device_cache[device] = cached
        return cached

    def _row_mask(self, members: tuple[int, ...], chunks: int, batch: int, device) -> torch.Tensor:
        """(B,) bool: the rows of the chunks in `members`; cached, since building it on the GPU copies from the host."""
        key = (members, chunks, batch, device)
        mask = self._device_cache.get(key)
        if mask is None:
            flags = torch.tensor([index in members for index in range(chunks)], device=device)
            mask = flags.repeat_interleave(batch // chunks)
            self._device_cache[key] = mask
        return mask

    def __call__(self, q, k, v, extra_options):
        if self.deltas:
            v = self._add_value_deltas(v, extra_options)
        observers = extra_options.get(OBSERVERS_KEY, ())
        if not observers:
            return self._attend(q, k, v, extra_options, None)
        call = attention_call(extra_options, q, k)
        bias = None
        for observer in observers:
            extra = observer.attention_bias(call, q, k)
            if extra is not None:
                bias = extra if bias is None else bias + extra  # (B, N, T)
        if any(observer.needs_probabilities(call) for observer in observers):
            probs = attention_probabilities(q, k, call.heads, bias)  # (B, H, N, T) fp32
            for observer in observers:
                observer.observe_probabilities(call, probs)
        out = self._attend(q, k, v, extra_options, bias)
        for observer in observers:
            observer.after_attention(call)
        return out

    def _attend(self, q, k, v, extra_options, bias):
        if self.wrapped is not None:
            if bias is not None:
                raise ConceptSplitError.build(
                    "Attention fixing cannot pass a bias through another pack's attention patch",
                    seen=f"a foreign attn2 replace ({type(self.wrapped).__name__}) at block {extra_options['block']}",
                    expected="no other attn2 replace on layers that get the LODA bias",
                    fix="set fixing off (p = m = 0) or remove the other attention patch from this model")
            return self.wrapped(q, k, v, extra_options)
        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")
        if bias is None:
            return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=precision,
                                                       transformer_options=extra_options)
        return comfy_attention.optimized_attention(q, k, v, heads, mask=bias.to(q.dtype), attn_precision=precision,
                                                   transformer_options=extra_options)

    def _add_value_deltas(self, v, extra_options):
        context = extra_options.get(VALUE_INPUT_KEY)
        if context is None or context.shape[:2] != v.shape[:2]:
            raise ConceptSplitError.build(
                "Another attention patch changed the text conditioning after ToVA read it",
                seen=f"values of {tuple(v.shape[:2])} rows but a stashed conditioning of "
                     f"{None if context is None else tuple(context.shape[:2])}",
                expected="ToVA's attn2_patch to run last", fix="apply the other patch node before Apply ToVA")
        chunks = tuple(extra_options["cond_or_uncond"])
        uuids = extra_options.get("uuids") or [None] * len(chunks)
        table = extra_options.get(CHUNKS_KEY) or {}
        tokens = v.shape[1]
        for delta in self._deltas_on(v.device):
            groups: dict[tuple[int, int], list[int]] = {}  # token rows (start, stride) -> chunks that have them
            for index, branch in enumerate(chunks):
                rows = self._chunk_rows(delta, branch, table.get(uuids[index]), tokens)
                if rows is not None:
                    groups.setdefault((rows.start, rows.step), []).append(index)
            for (start, stride), members in groups.items():
                row_mask = self._row_mask(tuple(members), len(chunks), v.shape[0], v.device)
                v = apply_token_value_delta(v, context, delta, row_mask, slice(start, tokens, stride))  # (B, T, C)
        return v

    def _chunk_rows(self, delta: TokenDelta, branch: int, chunk: "ChunkPrompt | None", tokens: int):
        """Token rows of s_k in one CFG chunk, or None: spec §2.3 (both branches, where the token is present)."""
        if branch == 1 and not self.apply_to_uncond:
            return None
        if branch == 0 and not chunk_holds_prompt(chunk, delta.prompt_ids, delta.prompt_length):
            return None  # another positive prompt (ConditioningCombine, regions): its token s_k is another word
        if chunk is None:  # no record of this conditioning (ComfyUI path without calc_cond_batch): assume the prompt
            return identifier_rows(delta.position, delta.prompt_length, tokens)
        return identifier_rows(delta.position, chunk.length, tokens)


def attention_call(extra_options, q, k) -> AttentionCall:
    """Describe this attn2 call from ComfyUI's extra_options (block keys, grid, chunk layout; notes §1.2, §1.7)."""
    block = extra_options["block"]
    grid = tuple(int(x) for x in extra_options["activations_shape"][-2:])
    table = extra_options.get(CHUNKS_KEY) or {}
    uuids = extra_options.get("uuids") or ()
    chunk_prompts = tuple(table.get(uuid) for uuid in uuids) if table else ()
    return AttentionCall(key=(block[0], int(block[1]), int(extra_options.get("block_index", 0))), grid=grid,
                         heads=int(extra_options["n_heads"]),
                         cond_or_uncond=tuple(int(c) for c in extra_options["cond_or_uncond"]),
                         batch=int(q.shape[0]), context_length=int(k.shape[1]), sigmas=extra_options.get("sigmas"),
                         chunk_prompts=chunk_prompts)


def with_processors(model_options: dict, layout: UNetLayout,
                    deltas_by_key: Mapping[BlockKey, tuple[TokenDelta, ...]] | None = None,
                    apply_to_uncond: bool = True) -> dict:
    """Return model_options with a ConceptSplit processor on every cross-attention block of `layout`.

    Chains with what is there: an earlier ConceptSplit processor is extended, a foreign attn2 replace is wrapped,
    the attn2_patch list is appended to (once), weight patches are untouched. The input dict is not modified.
    """
    deltas_by_key = deltas_by_key or {}
    options = dict(model_options)  # copy every level we write, so the caller's (shared) dicts stay as they were
    transformer_options = dict(options.get("transformer_options", {}))
    options["transformer_options"] = transformer_options
    patches = dict(transformer_options.get("patches", {}))
    transformer_options["patches"] = patches
    if stash_value_input not in patches.get("attn2_patch", []):
        patches["attn2_patch"] = list(patches.get("attn2_patch", [])) + [stash_value_input]
    patches_replace = dict(transformer_options.get("patches_replace", {}))
    transformer_options["patches_replace"] = patches_replace
    replaces = dict(patches_replace.get("attn2", {}))
    patches_replace["attn2"] = replaces
    for layer in layout.layers:
        key = layer.key
        existing = replaces.get(key, replaces.get(key[:2]))
        deltas = tuple(deltas_by_key.get(key, ()))
        if isinstance(existing, ConceptSplitAttention):
            processor = existing.with_deltas(deltas, apply_to_uncond) if deltas else existing
        else:
            processor = ConceptSplitAttention(deltas, apply_to_uncond, wrapped=existing)
        replaces[key] = processor
    return options


def install_token_deltas(model_patcher, layout: UNetLayout,
                         deltas_by_key: Mapping[BlockKey, tuple[TokenDelta, ...]], apply_to_uncond: bool,
                         prompt: PromptTokens | None = None, label: str = "", positive=None) -> None:
    """Install ToVA on `model_patcher` (already a clone): processors on every attn2 block, deltas where given.

    With `prompt`, a CALC_COND_BATCH wrapper also identifies each conditioning's prompt per model call (token record
    or content: prompt_encoding), so the delta lands only on the rows of that prompt's conditioning (notes §2,
    variant 1), and checks that the positive prompt being sampled is this prompt. `positive` is the CONDITIONING
    encode_prompt made of it: its encoding is what an unrecorded positive is recognised by.
    """
    model_patcher.model_options = with_processors(model_patcher.model_options, layout, deltas_by_key,
                                                  apply_to_uncond)
    if positive is not None:
        model_patcher.model_options = with_prompt_encodings(model_patcher.model_options,
                                                            conditioning_encodings(positive))
    if prompt is not None:
        model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, TOVA_WRAPPER_KEY,
                                           _chunk_table_wrapper(prompt, label))
    cleanups = model_patcher.callbacks.get(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, {}).get(TOVA_WRAPPER_KEY, [])
    if _clear_device_caches not in cleanups:
        model_patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, TOVA_WRAPPER_KEY,
                                            _clear_device_caches)


def check_patch_order(model_options: dict) -> None:
    """Raise if a patch added after ToVA would be skipped or would change the text after ToVA read it."""
    transformer_options = model_options.get("transformer_options", {})
    attn2_patches = transformer_options.get("patches", {}).get("attn2_patch", [])
    if attn2_patches and attn2_patches[-1] is not stash_value_input and stash_value_input in attn2_patches:
        raise ConceptSplitError.build(
            "An attention patch was added after Apply ToVA and changes the text it reads",
            seen=f"attn2 patches after ToVA's: {[getattr(p, '__qualname__', type(p).__name__) for p in attn2_patches]}",
            expected="ToVA's attn2 patch last", fix="apply the other patch node before Apply ToVA")
    replaces = transformer_options.get("patches_replace", {}).get("attn2", {})
    shadowed = [key for key, patch in replaces.items() if len(key) == 2 and not isinstance(patch, ConceptSplitAttention)
                and any(len(k) == 3 and k[:2] == key for k in replaces)]
    if shadowed:
        raise ConceptSplitError.build(
            "Another pack's attention patch was applied after ConceptSplit and would be ignored",
            seen=f"foreign attn2 replaces at blocks {shadowed[:3]} next to ConceptSplit's",
            expected="other attention patches applied before Apply ToVA, so ConceptSplit wraps them",
            fix="move that node before Apply ToVA in the model chain")


def _clear_device_caches(model_patcher) -> None:
    """ON_CLEANUP callback: free the GPU copies of adapter weights held by this model's processors."""
    replaces = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for processor in replaces.values():
        if isinstance(processor, ConceptSplitAttention):
            processor.clear_device_cache()


def chunk_table(conds, encodings=(), default_length: int = 0) -> dict:
    """{cond uuid: ChunkPrompt} for the conditionings of one calc_cond_batch call (`conds`: [positives, negatives],
    each a list of processed cond dicts): each one's own token length, area flag and prompt.

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
            cross = cond.get("cross_attn")  # (n, L, d)
            ids = recorded_prompt_ids(cond)
            if ids is None:
                ids = identified.get(id(cond))
            table[cond["uuid"]] = ChunkPrompt(int(cross.shape[1]) if cross is not None else default_length, ids,
                                              area=cond.get("area") is not None)
    return table


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


def record_chunk_prompts(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper (a plain function, so clone() keeps it as is): record which prompt each conditioning
    of this model call holds, for the observers (LODA, Capture Attention) to skip other positive prompts."""
    table = call_chunk_table(conds, model_options)
    return executor(model, conds, x_in, timestep, with_chunk_table(model_options, table))


TOVA_SOURCE = "Apply ToVA's positive output"
TOVA_FIX = ("connect Apply ToVA's positive output to the sampler, or give Apply ToVA the prompt you sample (the same "
            "text and prompt weights)")


def check_prompt_sampled(conds, table: dict, prompt_ids: tuple, prompt_length: int, prompt_text: str,
                         problem: str, source: str = TOVA_SOURCE, fix: str = TOVA_FIX) -> None:
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
        parts.append(f"{len(positives) - len(recorded)} with text features other than those of "
                     f"\"{prompt_text[:80]}\" (another text, other prompt weights or another CLIP)")
    raise ConceptSplitError.build(
        problem, seen=", ".join(parts),
        expected=f"the conditioning of \"{prompt_text[:80]}\" ({prompt_length} tokens): {source}, or that same "
                 "text encoded with the same CLIP by any text encode node",
        fix=fix)


def _chunk_table_wrapper(prompt: PromptTokens, label: str):
    prompt_ids, prompt_length = tuple(prompt.token_ids), len(prompt.token_ids)

    def wrapper(executor, model, conds, x_in, timestep, model_options):
        check_patch_order(model_options)
        table = call_chunk_table(conds, model_options, prompt_length)
        check_prompt_sampled(conds, table, prompt_ids, prompt_length, prompt.text,
                             f"The positive prompt being sampled is not the prompt Apply ToVA located {label} in")
        return executor(model, conds, x_in, timestep, with_chunk_table(model_options, table))

    return wrapper


def with_observers(model_options: dict, layout: UNetLayout, observers: tuple) -> dict:
    """Return model_options whose processors report to `observers` (appended after any already there)."""
    if getattr(layout, "joint", False):  # a DiT (ModelLayout from nodes/families): its joint attention override
        from .families import family_named

        return family_named(layout.family).install_observers(model_options, layout, observers)
    options = with_processors(model_options, layout)
    transformer_options = options["transformer_options"]
    transformer_options[OBSERVERS_KEY] = tuple(transformer_options.get(OBSERVERS_KEY, ())) + tuple(observers)
    call_type = comfy.patcher_extension.WrappersMP.CALC_COND_BATCH
    wrappers = dict(transformer_options.get("wrappers", {}))  # copied per level: the caller's dicts stay as they were
    by_key = dict(wrappers.get(call_type, {}))
    if record_chunk_prompts not in by_key.get(CHUNKS_WRAPPER_KEY, []):
        by_key[CHUNKS_WRAPPER_KEY] = [*by_key.get(CHUNKS_WRAPPER_KEY, []), record_chunk_prompts]
    wrappers[call_type] = by_key
    transformer_options["wrappers"] = wrappers
    return options


def encode_prompt(clip, text: str, layout: UNetLayout | None = None):
    """CONDITIONING for `text`, exactly as CLIPTextEncode makes it, with its PromptTokens and PromptEncoding attached.

    Checks the CLIP matches the model's text width when a layout is given.
    Shapes: [[cond (1, 77·windows, d), {"pooled_output": ..., PROMPT_TOKENS_KEY: PromptTokens,
              PROMPT_ENCODING_KEY: PromptEncoding (the cond itself, not a copy)}]].
    """
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    tokens = prompt_tokens(clip, text)
    eps = _encoder_eps(clip)
    conditioning = [[cond, {**extras, PROMPT_TOKENS_KEY: tokens,
                            PROMPT_ENCODING_KEY: PromptEncoding(tuple(tokens.token_ids), text, cond, eps)}]
                    for cond, extras in conditioning]
    width = conditioning[0][0].shape[-1]
    if layout is not None and width != layout.text_width:
        raise ConceptSplitError.build(
            "The CLIP does not belong to this model",
            seen=f"text features of width {width}", expected=f"width {layout.text_width} for this model",
            fix="connect the CLIP output of the same checkpoint loader as the MODEL")
    return conditioning


def _encoder_eps(clip) -> float:
    """eps of the dtype the text encoder computes in: the coarsest of its weights' dtypes, at least 16 bits
    (8-bit weights are cast up for the matmuls). 0 when ComfyUI's CLIP does not say (the tensors' dtypes decide)."""
    dtypes = getattr(getattr(clip, "cond_stage_model", None), "dtypes", None) or ()
    eps = [torch.finfo(dtype).eps for dtype in dtypes if isinstance(dtype, torch.dtype) and dtype.is_floating_point]
    return min(max(eps), torch.finfo(torch.bfloat16).eps) if eps else 0.0


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



# --- model levels and default tokens (used by LODA and the viewer) ---------------------------------------

def layer_levels(model_patcher, layout: UNetLayout) -> list[tuple[BlockKey, int]]:
    """(replace key, downsampling level) of every cross-attention layer, in execution order (notes §1.3).

    ComfyUI's UNet: input block 0 is conv_in; each level has num_res_blocks blocks, then one downsample block
    (not after the last level); the middle sits at the deepest level; output blocks run back up with
    num_res_blocks + 1 blocks per level.
    """
    unet_config = model_patcher.model.model_config.unet_config
    levels = len(unet_config["channel_mult"])
    res_blocks = unet_config["num_res_blocks"]
    res_blocks = [res_blocks] * levels if isinstance(res_blocks, int) else list(res_blocks)
    input_level, output_level, block = {}, {}, 1
    for level in range(levels):
        for _ in range(res_blocks[level]):
            input_level[block] = level
            block += 1
        block += 1 if level < levels - 1 else 0  # the downsample block
    block = 0
    for level in reversed(range(levels)):
        for _ in range(res_blocks[level] + 1):
            output_level[block] = level
            block += 1
    by_name = {"input": input_level, "output": output_level}
    return [(layer.key, levels - 1 if layer.block[0] == "middle" else by_name[layer.block[0]][layer.block[1]])
            for layer in layout.layers]


_DEFAULT_TOKENIZER = []


def default_word_token_ids(word: str) -> tuple[int, ...]:
    """BPE ids of a word with ComfyUI's CLIP tokenizer (the same vocabulary for SD1.5 CLIP-L, SD2 OpenCLIP-H and
    SDXL CLIP-L/G), for nodes that get CONDITIONING but no CLIP."""
    if not _DEFAULT_TOKENIZER:
        _DEFAULT_TOKENIZER.append(comfy.sd1_clip.SDTokenizer())
    inner = _DEFAULT_TOKENIZER[0]
    ids = inner.tokenizer(word)["input_ids"]
    return tuple(i for i in ids if i not in (inner.start_token, inner.end_token, inner.pad_token))
