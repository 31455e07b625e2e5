"""Seam: the ConceptSplit attention processor and ComfyUI's attention call signatures (integration §1-§2).

- attn2_patch  p(n, context, value, extra_options) -> (n, context, value): `stash_value_input` keeps the raw text
  features.
- attn2 replace f(q, k, v, extra_options) -> out (b, Lq, heads·dim_head): one `ConceptSplitAttention` per layer,
  which adds the ToVA delta to V's identifier rows, lets the observers (LODA, Capture Attention) see and bias the
  attention, and then runs attention (or the foreign replace it wraps).

Where a model's attention calls are and how the processor is installed on them is the model family's knowledge
(nodes/families/); this module knows only the call.
"""

from __future__ import annotations

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension

from ..conceptsplit_core.attention_calls import (
    AttentionCall,
    ChunkPrompt,
    attention_probabilities,
    chunk_holds_prompt,
    observed_attention,
    observed_bias,
)
from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.token_value_delta import TokenDelta, apply_token_value_delta, identifier_rows
from .comfy_conditioning import CHUNKS_KEY, CHUNKS_WRAPPER_KEY, call_chunk_prompts, record_chunk_prompts

VALUE_INPUT_KEY = "conceptsplit_value_input"  # extra_options key: the tensor that to_v receives, (B, T, d)
# transformer_options key: a tuple of AttentionObserver objects (a tuple, so ComfyUI's per-call dict/list copying
# keeps the same objects; integration §1.1)
OBSERVERS_KEY = "conceptsplit_observers"


def stash_value_input(n, context, value, extra_options):
    """attn2_patch: remember the tensor that to_v will project, so the replace can add ΔW·c on chosen rows."""
    extra_options[VALUE_INPUT_KEY] = value if value is not None else context  # (B, T, d)
    return n, context, value


class ConceptSplitAttention:
    """The attn2 replace for one block: ToVA deltas on V's identifier rows, the observers' bias and probability
    capture (LODA, viewer), then attention (ComfyUI's, or the foreign replace it wraps).

    Immutable: adding adapters builds a new processor. `__deepcopy__` returns self, because ComfyUI deep-copies
    model_options on every clone() and the adapters' tensors must not be duplicated (integration §1.1).
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
            fix="move the IPAdapter (or similar) node before Apply ToVA in the model chain",
        )

    def clear_device_cache(self) -> None:
        """Drop the adapter copies made for the GPU; called when ComfyUI cleans the model up after sampling."""
        self._device_cache.clear()

    def with_deltas(self, deltas: tuple[TokenDelta, ...], apply_to_uncond: bool) -> "ConceptSplitAttention":
        if self.deltas and apply_to_uncond != self.apply_to_uncond:
            raise ConceptSplitError.build(
                "Two Apply ToVA nodes on one model disagree on apply_to_uncond",
                seen=f"{self.apply_to_uncond} before, {apply_to_uncond} now",
                expected="the same setting",
                fix="use one setting, or put all adapters into one Apply ToVA node",
            )
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
        bias = observed_bias(observers, call, q, k)  # (B, N, T) or None
        return observed_attention(
            observers,
            call,
            lambda: attention_probabilities(q, k, call.heads, bias),  # (B, H, N, T) fp32
            lambda: self._attend(q, k, v, extra_options, bias),
        )

    def _attend(self, q, k, v, extra_options, bias):
        if self.wrapped is not None:
            if bias is not None:
                raise ConceptSplitError.build(
                    "Attention fixing cannot pass a bias through another pack's attention patch",
                    seen=f"a foreign attn2 replace ({type(self.wrapped).__name__}) at block {extra_options['block']}",
                    expected="no other attn2 replace on layers that get the LODA bias",
                    fix="set fixing off (p = m = 0) or remove the other attention patch from this model",
                )
            return self.wrapped(q, k, v, extra_options)
        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")
        if bias is None:
            return comfy_attention.optimized_attention(
                q, k, v, heads, attn_precision=precision, transformer_options=extra_options
            )
        return comfy_attention.optimized_attention(
            q, k, v, heads, mask=bias.to(q.dtype), attn_precision=precision, transformer_options=extra_options
        )

    def _add_value_deltas(self, v, extra_options):
        context = extra_options.get(VALUE_INPUT_KEY)
        if context is None or context.shape[:2] != v.shape[:2]:
            raise ConceptSplitError.build(
                "Another attention patch changed the text conditioning after ToVA read it",
                seen=f"values of {tuple(v.shape[:2])} rows but a stashed conditioning of "
                f"{None if context is None else tuple(context.shape[:2])}",
                expected="ToVA's attn2_patch to run last",
                fix="apply the other patch node before Apply ToVA",
            )
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
        """Token rows of s_k in one CFG chunk, or None: method §2.3 (both branches, where the token is present)."""
        if branch == 1 and not self.apply_to_uncond:
            return None
        if branch == 0 and not chunk_holds_prompt(chunk, delta.prompt_ids, delta.prompt_length):
            return None  # another positive prompt (ConditioningCombine, regions): its token s_k is another word
        if chunk is None:  # no record of this conditioning (ComfyUI path without calc_cond_batch): assume the prompt
            return identifier_rows(delta.position, delta.prompt_length, tokens)
        return identifier_rows(delta.position, chunk.length, tokens)


def attention_call(extra_options, q, k) -> AttentionCall:
    """Describe this attn2 call from ComfyUI's extra_options (block keys, grid, chunk layout; integration §1.2,
    §1.7)."""
    block = extra_options["block"]
    grid = tuple(int(x) for x in extra_options["activations_shape"][-2:])
    return AttentionCall(
        key=(block[0], int(block[1]), int(extra_options.get("block_index", 0))),
        grid=grid,
        heads=int(extra_options["n_heads"]),
        cond_or_uncond=tuple(int(c) for c in extra_options["cond_or_uncond"]),
        batch=int(q.shape[0]),
        context_length=int(k.shape[1]),
        sigmas=extra_options.get("sigmas"),
        chunk_prompts=call_chunk_prompts(extra_options),
    )


def with_observer_list(model_options: dict, observers: tuple) -> dict:
    """Return model_options whose ConceptSplit processors report to `observers` (appended after any already there),
    with the CALC_COND_BATCH wrapper that records each model call's chunk table (once). The caller's dicts stay as
    they were; installing the processors on the model's layers is the family's install_observers."""
    options = dict(model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    options["transformer_options"] = transformer_options
    transformer_options[OBSERVERS_KEY] = tuple(transformer_options.get(OBSERVERS_KEY, ())) + tuple(observers)
    call_type = comfy.patcher_extension.WrappersMP.CALC_COND_BATCH
    wrappers = dict(transformer_options.get("wrappers", {}))  # copied per level: the caller's dicts stay as they were
    by_key = dict(wrappers.get(call_type, {}))
    if record_chunk_prompts not in by_key.get(CHUNKS_WRAPPER_KEY, []):
        by_key[CHUNKS_WRAPPER_KEY] = [*by_key.get(CHUNKS_WRAPPER_KEY, []), record_chunk_prompts]
    wrappers[call_type] = by_key
    transformer_options["wrappers"] = wrappers
    return options
