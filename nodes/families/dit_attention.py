"""Shared part of the DiT families (joint attention, text tokens first): `DitFamily`, the answers every DiT family
gives the same way, and one `optimized_attention_override` that turns every joint attention call of a
DiT forward into an `AttentionCall` for the pack's observers (LODA's MapCollector and FixingBias, Capture Attention).

ComfyUI routes every attention call that carries transformer_options through `wrap_attn`, which hands it to
transformer_options["optimized_attention_override"] as f(func, q, k, v, heads, *args, **kwargs), q and k post-RoPE
(B, H, L, D). For each joint call the observers see:
- key: the family's block key, ("double", i, 0) / ("single", i, 0); grid: the patchified latent grid;
  context_length: the text tokens T (the first T keys); rows: the image tokens of the latent;
- probabilities: the JOINT softmax over all L keys (text, image, reference tokens), sliced to image rows × text
  columns (B, H, N, T): the map the model actually mixes its values with (conceptsplit_core.joint_attention);
- their (B, N, T) bias, embedded into the additive attention mask on those rows and columns only, and passed only
  when it is non-zero (so a zero bias leaves the call bit-identical).
A DIFFUSION_MODEL wrapper records each forward's geometry (text length, latent grid) for the override. Any override
installed before is chained (called in place of ComfyUI's attention), never replaced.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Iterable, Optional

import torch

import comfy.patcher_extension

from ...conceptsplit_core.attention_calls import AttentionCall, observed_attention, observed_bias
from ...conceptsplit_core.errors import ConceptSplitError
from ...conceptsplit_core.joint_attention import add_masks, joint_bias_mask, joint_text_probabilities
from ...conceptsplit_core.model_layout import AttentionSite, LayerKey, ModelLayout, map_grid
from ..comfy_attention import OBSERVERS_KEY
from ..comfy_autograd import AutogradWeights
from ..comfy_conditioning import CHUNKS_WRAPPER_KEY, call_chunk_prompts, record_chunk_prompts
from .base import FamilyBase

OVERRIDE_KEY = "optimized_attention_override"
GEOMETRY_WRAPPER_KEY = "conceptsplit_dit_geometry"


class JointGeometry:
    """Where the tokens of one DiT forward sit in every joint attention call: text rows 0 .. text_tokens − 1, the
    latent's image tokens image_start .. image_start + h·w − 1 (raster order of the patch grid); later rows (Flux
    Kontext reference latents, image padding) are neither. `calls` counts the joint calls of this forward."""

    def __init__(self, text_tokens: int, image_start: int, grid: tuple[int, int]):
        self.text_tokens = text_tokens
        self.image_start = image_start
        self.grid = grid
        self.calls = 0

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


class DitFamily(FamilyBase):
    """Shared answers of the DiT families; subclasses name their classes, blocks, tokenizer and geometry.

    Their layout marks the family's default map blocks `map` and `loss` (LODA's loss and masks both read them; the
    gradient pass stops after the last one), and gives every block the level of the patch grid (2×2 patches: one
    halving), so core's map_grid and select_map_layers read a DiT as they read a UNet.
    """

    supports_tova = False
    supports_checkpointing = False  # LODA's pass already stops after the last map block
    # Bound LoRAs: (regular expression on the diffusion model's module path, site) pairs, first full match wins;
    # modules no pattern matches are "global" (modulation, time/guidance/pooled embeddings, norms). None: the family
    # does not support bound LoRAs (Apply Bound LoRAs refuses it).
    bound_lora_sites: Optional[tuple[tuple[str, str], ...]] = None

    def sites(
        self, keys: Iterable[LayerKey], map_keys: Iterable[LayerKey], patch: int, heads: int, width: int
    ) -> tuple[AttentionSite, ...]:
        """AttentionSites of the joint blocks `keys` (execution order): the patch grid's level, `width` (the joint
        stream's width: text and image features are projected to it), map and loss flags on `map_keys`."""
        level = int(math.log2(patch))
        if 2**level != patch:
            raise ConceptSplitError.build(
                f"This {self.display} model's patch size is not a power of 2",
                seen=f"patch size {patch}",
                expected="2 (every released model)",
                fix=f"load a standard {self.display} checkpoint",
            )
        chosen = frozenset(map_keys)
        return tuple(
            AttentionSite(
                key=key,
                level=level,
                out_features=width,
                in_features=width,
                heads=heads,
                map=key in chosen,
                loss=key in chosen,
            )
            for key in keys
        )

    @property
    def supports_bound_loras(self) -> bool:
        return self.bound_lora_sites is not None

    def bound_lora_site(self, module_path: str) -> str:
        """The site of the first `bound_lora_sites` pattern that matches the whole path, else "global"."""
        for pattern, site in self.bound_lora_sites or ():
            if re.fullmatch(pattern, module_path):
                return site
        return "global"

    def bound_lora_rows(self, layout: ModelLayout, x: torch.Tensor, context: torch.Tensor) -> JointGeometry:
        """The call's JointGeometry (the attention hook's): text rows 0..T−1 of the text stream and of the joint
        sequence, image rows 0..h·w−1 of the image stream and image_start.. of the joint sequence."""
        return self.geometry(layout, x, context)

    def default_map_layers(self, layout: ModelLayout, latent_hw) -> frozenset:
        """The family's default map blocks (marked in its layout)."""
        return layout.map_keys()

    def map_grid(self, layout: ModelLayout, key: LayerKey, latent_hw) -> tuple[int, int]:
        """The image-token grid: ComfyUI pads the latent to a multiple of the patch size, then patchifies."""
        return map_grid(latent_hw, layout.levels()[key])

    def patch_grid(self, layout: ModelLayout, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Image-token grid of a latent (every joint block has the same one)."""
        return map_grid(latent_hw, layout.layers[0].level)

    def word_token_ids(self, clip, word: str) -> tuple[int, ...]:
        """(): DiT prompts carry their decoded pieces (PromptTokens.pieces), and words are located by those."""
        return ()

    def default_word_token_ids(self, word: str) -> tuple[int, ...]:
        """(): see word_token_ids."""
        return ()

    def install_observers(self, model_options: dict, layout: ModelLayout, observers: tuple) -> dict:
        """A new model_options whose joint attention calls report to `observers` (with_dit_observers)."""
        return with_dit_observers(model_options, self, layout, observers)

    def check_fixing_patches(self, model_options: dict, layout: ModelLayout, fixing_keys) -> None:
        """Nothing to refuse: the bias reaches the attention as an additive mask, through any chained override."""

    def gradient_pass_options(self, model_options: dict, conds) -> dict:
        """The same options: a DiT needs no extra patch for a gradient pass."""
        return model_options

    @contextlib.contextmanager
    def differentiable(
        self, model_patcher, conds=None, checkpointing: bool = False, keep_layers: Iterable[LayerKey] = ()
    ):
        """Autograd on inside ComfyUI's inference mode: the model's weights as autograd-usable views and the
        family's own fixes (`gradient_fixes`); no checkpointing (`supports_checkpointing` is False)."""
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            AutogradWeights([model_patcher.model.diffusion_model]),
            self.gradient_fixes(model_patcher),
        ):
            yield

    def gradient_fixes(self, model_patcher):
        """What this family's forward needs to be differentiable (a context manager)."""
        return contextlib.nullcontext()


class DitAttentionHook:
    """The override: reports joint calls to the observers in transformer_options[OBSERVERS_KEY], then attends
    (through the override it wraps, if any). Shared by reference: ComfyUI deep-copies model_options on clone()."""

    def __init__(self, family, layout: ModelLayout, wrapped=None):
        self.family = family
        self.layout = layout
        self.wrapped = wrapped
        self._stack: list = []  # JointGeometry of the forwards in progress (innermost last)
        hook = self

        def diffusion_model_wrapper(executor, *args, **kwargs):
            x = args[0] if args else kwargs["x"]  # (B, C, h, w) latent (5-D for video-style latents)
            context = args[2] if len(args) > 2 else kwargs.get("context")  # (B, T, d)
            hook._stack.append(family.geometry(layout, x, context))
            try:
                return executor(*args, **kwargs)
            finally:
                hook._stack.pop()

        self.diffusion_model_wrapper = diffusion_model_wrapper  # a plain function: deepcopy keeps it as is

    def __deepcopy__(self, memo):
        return self

    def _attend(self, func, q, k, v, heads, args, kwargs):
        if self.wrapped is not None:
            return self.wrapped(func, q, k, v, heads, *args, **kwargs)
        return func(q, k, v, heads, *args, **kwargs)

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        observers = options.get(OBSERVERS_KEY, ())
        geometry = self._stack[-1] if self._stack else None
        qh, kh = _heads_layout(q, k, heads, kwargs.get("skip_reshape", False))  # (B, H, L, D) views
        if (
            not observers
            or geometry is None
            or qh is None
            or qh.shape[2] < geometry.image_start + geometry.image_tokens
        ):
            return self._attend(func, q, k, v, heads, args, kwargs)  # not a joint call of a recorded forward
        if args:  # Lumina / Qwen pass the mask positionally: optimized_attention(q, k, v, heads, mask, ...)
            kwargs = {**kwargs, "mask": args[0]}
            args = args[1:]
        call = _attention_call(self.family.block_key(self.layout, options, geometry), geometry, options, qh)
        bias = observed_bias(observers, call, q, k)  # (B, N, T) or None
        if bias is not None and not bool(torch.count_nonzero(bias)):
            bias = None  # a zero bias changes nothing: keep the call (and its kernel choice) as it was
        mask = kwargs.get("mask")
        if bias is not None:
            added = joint_bias_mask(bias, qh.shape[2], geometry.image_start, q.dtype)  # (B, 1, L, L)
            kwargs = {**kwargs, "mask": add_masks(mask, added)}
        return observed_attention(
            observers,
            call,
            lambda: joint_text_probabilities(
                qh, kh, geometry.image_start, geometry.image_tokens, geometry.text_tokens, mask, bias
            ),  # (B, H, N, T) fp32
            lambda: self._attend(func, q, k, v, heads, args, kwargs),
        )


def _heads_layout(q: torch.Tensor, k: torch.Tensor, heads: int, skip_reshape: bool):
    """q, k as (B, H, L, D): as given with skip_reshape, else from ComfyUI's (B, L, H·D); (None, None) otherwise."""
    if skip_reshape and q.dim() == 4:
        return q, k
    if not skip_reshape and q.dim() == 3 and q.shape[-1] % heads == 0:
        b, length, inner = q.shape
        return (
            q.reshape(b, length, heads, inner // heads).transpose(1, 2),
            k.reshape(b, k.shape[1], heads, inner // heads).transpose(1, 2),
        )
    return None, None


def _attention_call(key, geometry, options: dict, q: torch.Tensor) -> AttentionCall:
    chunks = tuple(int(c) for c in options.get("cond_or_uncond") or (0,))
    return AttentionCall(
        key=key,
        grid=geometry.grid,
        heads=int(q.shape[1]),
        cond_or_uncond=chunks,
        batch=int(q.shape[0]),
        context_length=geometry.text_tokens,
        sigmas=options.get("sigmas"),
        chunk_prompts=call_chunk_prompts(options),
    )


def with_dit_observers(model_options: dict, family, layout: ModelLayout, observers: tuple) -> dict:
    """A NEW model_options whose joint attention calls report to `observers` (appended to any there), with the
    geometry wrapper and the chunk-table wrapper installed once; the caller's dicts stay as they were."""
    options = dict(model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    options["transformer_options"] = transformer_options
    transformer_options[OBSERVERS_KEY] = tuple(transformer_options.get(OBSERVERS_KEY, ())) + tuple(observers)
    existing = transformer_options.get(OVERRIDE_KEY)
    hook = existing if isinstance(existing, DitAttentionHook) else DitAttentionHook(family, layout, existing)
    transformer_options[OVERRIDE_KEY] = hook
    wrappers = dict(transformer_options.get("wrappers", {}))
    for call_type, key, wrapper in (
        (comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, CHUNKS_WRAPPER_KEY, record_chunk_prompts),
        (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, GEOMETRY_WRAPPER_KEY, hook.diffusion_model_wrapper),
    ):
        by_key = dict(wrappers.get(call_type, {}))
        if wrapper not in by_key.get(key, []):
            by_key[key] = [*by_key.get(key, []), wrapper]
        wrappers[call_type] = by_key
    transformer_options["wrappers"] = wrappers
    return options
