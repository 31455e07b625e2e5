"""Seam for bound LoRAs (issue 13): ComfyUI's LoRA reading, weight adapters and the diffusion model's module forward.

- LoRA files are read exactly as Load LoRA reads them: comfy.utils.load_torch_file, comfy.lora_convert.convert_lora,
  comfy.lora.model_lora_keys_unet and comfy.lora.load_lora (every format ComfyUI accepts: kohya, diffusers, PEFT,
  LyCORIS LoHa/LoKr, ...). Only the diffusion-model part is used; text-encoder keys are counted and left out.
  A patch may cover a slice of a weight's output rows (ComfyUI's offset patches: a diffusers Flux LoRA's to_q, to_k,
  to_v are rows of the fused qkv weight); its residual fills those output features only.
- Which positions a patched module's rows are (image, text, joint sequence, none) is the model family's answer
  (`bound_lora_site`), and where the text and image rows sit in a call is the family's `bound_lora_rows`.
- The residual of one patch at one layer, from the layer's input x (bypass form, never merged):
  * where ComfyUI has bypass mode (comfy.weight_adapter.bypass, 0.33.0+) and the adapter is additive (LoRA, LoHa,
    LoKr without DoRA): the adapter's own low-rank h(x), with the module info ComfyUI's BypassForwardHook sets;
  * otherwise (0.3.64, DoRA, OFT/BOFT/GLoRA, plain "diff" patches): ΔW = calculate_weight(W) − W with ComfyUI's own
    comfy.lora.calculate_weight, computed once per device and dtype, and r = op(x, ΔW) (linear or conv, the module's
    stride/padding), plus Δb for bias patches.
- A DIFFUSION_MODEL wrapper registers forward hooks on the patched modules for one model call and removes them in
  `finally` (the shared model never keeps them); the hooks add the residual where conceptsplit_core.bound_lora says.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import comfy.lora
import comfy.lora_convert
import comfy.patcher_extension
import comfy.utils
import comfy.weight_adapter

from ..conceptsplit_core.attention_calls import chunk_holds_prompt
from ..conceptsplit_core.bound_lora import (
    BoundConcept,
    ConceptRegions,
    add_masked,
    exclusive_masks,
    image_position_mask,
    layer_grid,
    sequence_rows,
    token_row_mask,
)
from ..conceptsplit_core.errors import ConceptSplitError
from . import comfy_conditioning
from .families import model_family

# transformer_options key: the ConceptRegions of the running LODA sampler (None masks in stage 1)
REGIONS_KEY = "conceptsplit_concept_regions"
WRAPPER_KEY = "conceptsplit_bound_loras"
IMAGE_ONLY = ("image", "joint_image")  # sites with no text rows (off in stage 1 under the text_rows policy)
MODEL_PREFIX = "diffusion_model."
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1", "te2", "te_", "lora_te1", "lora_te2", "clip_")
HAS_BYPASS = importlib.util.find_spec("comfy.weight_adapter.bypass") is not None  # ComfyUI 0.33.0+
_DORA_INDEX = {"lora": 4, "loha": 7, "lokr": 8}  # where each additive adapter keeps its DoRA scale (weights tuple)


def with_concept_regions(model_options: dict, regions: ConceptRegions) -> dict:
    """A copy of `model_options` whose model calls see `regions` (LODA's concepts and masks) under REGIONS_KEY;
    the caller's dicts stay as they were."""
    options = dict(model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    transformer_options[REGIONS_KEY] = regions
    options["transformer_options"] = transformer_options
    return options


# --- reading ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraPatches:
    """The UNet patches of one LoRA file, as comfy.lora.load_lora made them."""

    name: str
    patches: dict  # "diffusion_model.<module>.weight|bias" (or (that, offset[, function])) -> adapter or ("diff", ...)
    text_encoder_keys: int  # keys for the text encoders, not applied


def read_lora(path: str, name: str, model_patcher) -> LoraPatches:
    """Read a LoRA file for this MODEL's UNet with ComfyUI's own loader and key map.

    Raises: ConceptSplitError for a file that cannot be read, or one of whose keys no layer of this UNet matches
    (a LoRA for another base model, or a file that is not a LoRA).
    """
    try:
        state = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as error:  # safetensors / torch raise many types for damaged files
        raise ConceptSplitError.build(
            f'The LoRA file "{name}" cannot be read',
            seen=f"{type(error).__name__}: {str(error)[:120]}",
            expected="a .safetensors (or weights-only .pt) LoRA file",
            fix="download the file again",
        ) from None
    if not isinstance(state, dict) or not state:
        raise ConceptSplitError.build(
            f'The LoRA file "{name}" holds no tensors',
            seen="an empty file",
            expected="a LoRA file",
            fix="download the file again",
        )
    text_keys = sum(1 for key in state if key.lower().startswith(TEXT_ENCODER_PREFIXES))
    state = comfy.lora_convert.convert_lora(state)
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    loaded = comfy.lora.load_lora(state, key_map, log_missing=False)
    patches = {key: patch for key, patch in loaded.items() if _weight_key(key).startswith(MODEL_PREFIX)}
    if not patches:
        family = model_family(model_patcher)
        sample = ", ".join(sorted(state)[:3])
        raise ConceptSplitError.build(
            f'The LoRA "{name}" matches no layer of this {family.display} model',
            seen=f"{len(state)} keys ({text_keys} for text encoders), e.g. {sample}",
            expected=f"a LoRA trained for {family.display} (kohya, diffusers, PEFT or LyCORIS keys of its "
            "diffusion model)",
            fix="use a LoRA made for this base model (SDXL fine-tunes take SDXL LoRAs), or another checkpoint",
        )
    _check_unmatched(name, state, key_map, model_patcher)
    _check_shapes(name, patches, model_patcher)
    return LoraPatches(name, patches, text_keys)


def _check_unmatched(name: str, state: dict, key_map: dict, model_patcher) -> None:
    """Raise when some of the file's diffusion-model keys name no layer of this model (Load LoRA would leave them
    out with a warning): a LoRA of another base whose key names partly exist here (diffusers Flux.1 and Qwen-Image
    LoRAs share transformer_blocks.N.attn.to_q, ...). A key is taken when a prefix of it, at a dot, is a LoRA name
    of this model (ComfyUI's load_lora reads "<name>.<factor>" keys); text-encoder keys are counted apart."""
    names = set(key_map)
    unmatched = []
    for key in state:
        if key.lower().startswith(TEXT_ENCODER_PREFIXES):
            continue
        parts = key.split(".")
        if not any(".".join(parts[:i]) in names for i in range(1, len(parts))):
            unmatched.append(key)
    if unmatched:
        family = model_family(model_patcher)
        raise ConceptSplitError.build(
            f'The LoRA "{name}" does not fit this {family.display} model: some of its layers are not in it',
            seen=f"{len(unmatched)} of {len(state)} keys naming no layer, e.g. {', '.join(sorted(unmatched)[:2])}",
            expected=f"a LoRA trained for {family.display}",
            fix="use a LoRA made for this base model",
        )


def _check_shapes(name: str, patches: dict, model_patcher) -> None:
    """Raise when a patch's ΔW cannot have its layer's shape (a LoRA of another base model whose key names happen
    to exist in this one: Load LoRA would skip those layers with a warning)."""
    state = model_patcher.model.state_dict()
    wrong = []
    for key, patch in patches.items():
        weight = state.get(_weight_key(key))
        if weight is None:
            continue
        rows = int(weight.shape[0]) if weight.dim() else 1
        expected = (rows, int(weight[0].numel()) if weight.dim() else 1)
        offset = _offset(key)
        if offset is not None:  # a slice of the weight: offset (dim, start, length), dim 0 = output rows
            fits = offset[0] == 0 and offset[1] + offset[2] <= rows
            expected = (int(offset[2]), expected[1]) if fits else (-1, -1)
        found = _delta_shape(patch)
        if expected == (-1, -1) or (found is not None and found != expected):
            found = found or ("?", "?")
            wrong.append(
                f"{_weight_key(key)[len(MODEL_PREFIX) :]}: {found[0]}×{found[1]} for "
                + (f"{expected[0]}×{expected[1]}" if expected != (-1, -1) else f"a slice {offset} of {rows} rows")
            )
    if wrong:
        family = model_family(model_patcher)
        raise ConceptSplitError.build(
            f'The LoRA "{name}" does not fit this {family.display} model',
            seen=f"{len(wrong)} of {len(patches)} layers with other shapes, e.g. {wrong[0]}",
            expected=f"a LoRA trained for {family.display}",
            fix="use a LoRA made for this base model",
        )


def _delta_shape(patch) -> Optional[tuple[int, int]]:
    """(out, in·kernel) of a patch's ΔW from its factors, or None where the type is not known here."""

    def numel(t):
        return int(t[0].numel()) if t.dim() > 1 else 1

    if isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "diff":
        t = patch[1][0]
        return int(t.shape[0]), numel(t)
    name = getattr(patch, "name", None)
    v = getattr(patch, "weights", None)
    if name == "lora" and v[3] is None:
        return int(v[0].shape[0]), numel(v[1])
    if name == "loha" and v[5] is None:
        return int(v[0].shape[0]), numel(v[1])
    if name == "lokr" and v[7] is None:
        w1 = v[0] if v[0] is not None else v[3] @ v[4]
        rows2 = v[1].shape[0] if v[1] is not None else v[5].shape[0]
        cols2 = numel(v[1]) if v[1] is not None else numel(v[6])
        return int(w1.shape[0] * rows2), int(w1.shape[1] * cols2)
    return None


# --- residuals ----------------------------------------------------------------------------------------------


def _weight_key(key) -> str:
    """The state-dict key of a patch key: the key itself, or the first item of (key, offset[, function])."""
    return key if isinstance(key, str) else str(key[0])


def _offset(key) -> Optional[tuple[int, int, int]]:
    """(dim, start, length) of a patch on a slice of its weight, else None."""
    return None if isinstance(key, str) or len(key) < 2 or key[1] is None else tuple(int(v) for v in key[1])


def _function(key):
    """The function ComfyUI applies to a patch's ΔW (e.g. Flux's swap_scale_shift), else None."""
    return None if isinstance(key, str) or len(key) < 3 else key[2]


def _module_path(key) -> tuple[str, str]:
    """ "diffusion_model.input_blocks.1.1.proj_in.weight" -> ("input_blocks.1.1.proj_in", "weight")."""
    path, _, part = _weight_key(key)[len(MODEL_PREFIX) :].rpartition(".")
    return path, part


class PatchResidual:
    """r(x) of one ComfyUI patch at one module, for a strength; device copies cached. A patch on a slice of the
    weight's output rows (offset) gives a residual that is zero outside those output features."""

    def __init__(self, module: torch.nn.Module, key, patch, strength: float):
        self.module, self.key, self.patch, self.strength = module, key, patch, float(strength)
        self.part = _module_path(key)[1]
        self.offset, self.function = _offset(key), _function(key)
        self.bypass = HAS_BYPASS and self.part == "weight" and self.function is None and _additive(patch)
        self._cache: dict = {}

    def __deepcopy__(self, memo):
        return self

    def clear(self) -> None:
        self._cache.clear()

    def __call__(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Shapes: x the module's input ((B, N, d) or (B, C, H, W)); returns a tensor shaped like base_out."""
        cache_key = (x.device, x.dtype)
        entry = self._cache.get(cache_key)
        if entry is None:
            with torch.inference_mode(False), torch.no_grad():  # normal tensors: stage 1 saves them for backward
                entry = self._adapter_on(x.device, x.dtype) if self.bypass else self._delta_on(x.device, x.dtype)
            self._cache[cache_key] = entry
        if self.bypass:
            if self.offset is None:
                return entry.h(x, base_out)
            _, start, length = self.offset  # output rows start .. start + length − 1 of the weight
            residual = torch.zeros_like(base_out)  # (..., C_out)
            residual[..., start : start + length] = entry.h(x, base_out[..., start : start + length])
            return residual
        if self.part == "bias":
            shape = (-1,) + (1,) * (base_out.dim() - 2) if isinstance(self.module, torch.nn.Conv2d) else (-1,)
            return entry.reshape(shape).expand_as(base_out)
        if isinstance(self.module, torch.nn.Conv2d):
            m = self.module
            return F.conv2d(x, entry, None, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, entry)

    def _adapter_on(self, device, dtype):
        from comfy.weight_adapter.bypass import BypassForwardHook

        adapter = copy.copy(self.patch)
        BypassForwardHook(self.module, adapter, multiplier=self.strength)  # sets the module info h() reads
        adapter.weights = tuple(
            w.to(device=device, dtype=dtype).clone() if torch.is_tensor(w) else w for w in adapter.weights
        )
        return adapter

    def _delta_on(self, device, dtype) -> torch.Tensor:
        base = getattr(self.module, self.part).detach().to(device=device, dtype=torch.float32).clone()
        patched = comfy.lora.calculate_weight(
            [(self.strength, self.patch, 1.0, self.offset, self.function)],
            base.clone(),
            _weight_key(self.key),
            intermediate_dtype=torch.float32,
        )  # an offset patch changes its slice only: ΔW is exactly 0 outside it
        return (patched - base).to(dtype)  # ΔW (C_out, C_in[, kh, kw]) or Δb (C_out,)


def _additive(patch) -> bool:
    """Whether ComfyUI's bypass h(x) is this adapter's whole effect: LoRA/LoHa/LoKr without DoRA or reshape."""
    if not isinstance(patch, comfy.weight_adapter.WeightAdapterBase):
        return False
    cls = type(patch)
    base = comfy.weight_adapter.WeightAdapterBase
    dora = _DORA_INDEX.get(getattr(patch, "name", ""))
    weights = getattr(patch, "weights", ())
    if dora is None or len(weights) <= dora or weights[dora] is not None:
        return False
    if patch.name == "lora" and len(weights) > 5 and weights[5] is not None:  # reshape
        return False
    return cls.h is not base.h and cls.g is base.g and cls.bypass_forward is base.bypass_forward


# --- the wrapper ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoundLayer:
    path: str
    kind: str  # the family's site: "image", "text", "joint" ([text | image | other] rows) or "joint_image" (its
    # image rows only)
    concept: int  # index into BoundLoras.concepts
    residual: PatchResidual


class BoundLoras:
    """DIFFUSION_MODEL wrapper: the bound LoRAs of one Apply Bound LoRAs node, hooked in for each model call."""

    def __init__(
        self,
        layers: tuple[BoundLayer, ...],
        concepts: tuple[BoundConcept, ...],
        prompt_ids: tuple,
        prompt_length: int,
        stage1: str,
        text_rows: bool,
        family=None,
        layout=None,
    ):
        self.layers, self.concepts = layers, concepts
        self.prompt_ids, self.prompt_length = prompt_ids, prompt_length
        self.stage1, self.text_rows = stage1, text_rows
        self.family, self.layout = family, layout  # the model's family (its bound_lora_rows) and layout

    def __deepcopy__(self, memo):
        return self

    def clear_device_caches(self) -> None:
        for layer in self.layers:
            layer.residual.clear()

    def _concept_indices(self, regions: ConceptRegions) -> list[int]:
        """Index in LODA's concepts of each bound word; the same token position is required."""
        labels = [label.lower() for label in regions.labels]
        indices = []
        for concept in self.concepts:
            if concept.word.lower() not in labels:
                raise ConceptSplitError.build(
                    f'The bound concept "{concept.word}" is not one of the concepts LODA separates',
                    seen=f"LODA concepts {', '.join(regions.labels)}",
                    expected="every bound word among the LODA sampler's concept words",
                    fix=f'add "{concept.word}" to the concept_words of the LODA sampler',
                )
            index = labels.index(concept.word.lower())
            other_prompt = regions.prompt_ids is not None and tuple(regions.prompt_ids) != tuple(self.prompt_ids)
            if regions.positions[index] != concept.position or other_prompt:
                raise ConceptSplitError.build(
                    f'The bound concept "{concept.word}" was located in another prompt than the one LODA samples',
                    seen=f"token {concept.position} in Apply Bound LoRAs, token {regions.positions[index]} in LODA",
                    expected="Apply Bound LoRAs given the positive prompt the sampler gets",
                    fix="connect the same positive CONDITIONING to Apply Bound LoRAs and to the sampler",
                )
            indices.append(index)
        return indices

    def __call__(self, executor, *args, **kwargs):
        x, context, transformer_options = call_arguments(executor, args, kwargs)
        regions = transformer_options.get(REGIONS_KEY)
        if regions is None:
            raise ConceptSplitError.build(
                "Bound LoRAs need the LODA masks, but this model is sampled without a LODA sampler",
                seen="a model from Apply Bound LoRAs in KSampler / SamplerCustom without LODA",
                expected="the LODA Sampler, or ConceptSplit LODA SAMPLER into SamplerCustom",
                fix="sample this model with the LODA Sampler (its concept_words naming the bound words)",
            )
        indices = self._concept_indices(regions)
        masks = regions.masks
        if masks is None and not regions.masks_coming:
            raise ConceptSplitError.build(
                "Bound LoRAs need LODA's masks, but this LODA run never makes them",
                seen="loda_steps 0 with boost = suppression = 0, or loda_steps equal to the number of steps",
                expected="a LODA run with masks for its later steps (stage 1 on, or attention fixing on)",
                fix="set loda_steps to -1 (auto) or a number below steps, or a non-zero boost/suppression",
            )
        if masks is None and self.stage1 == "off":
            return executor(*args, **kwargs)
        if masks is None and self.stage1 != "unmasked" and torch.is_grad_enabled() and regions.checkpointing:
            raise ConceptSplitError.build(
                "Bound LoRAs cannot act in LODA stage 1 with gradient checkpointing",
                seen="gradient_checkpointing on and stage1 = text_rows",
                expected="gradient checkpointing off, or bound LoRAs off in stage 1",
                fix="turn gradient_checkpointing off in the LODA sampler, or set stage1 to off in Apply Bound LoRAs",
            )
        rows = None if self.family is None else self.family.bound_lora_rows(self.layout, x, context)
        state = _CallState(self, regions, indices, x, transformer_options, rows)
        diffusion_model = executor.class_obj  # the UNetModel / DiT (a class executor around its _forward)
        handles = []
        try:
            for layer in self.layers:
                if masks is None and self.stage1 == "text_rows" and layer.kind in IMAGE_ONLY:
                    continue  # stage 1 text_rows: text layers, and the text rows of joint layers
                if masks is not None and layer.kind == "text" and not self.text_rows:
                    continue
                handles.append(diffusion_model.get_submodule(layer.path).register_forward_hook(state.hook(layer)))
            return executor(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()


def call_arguments(executor, args: tuple, kwargs: dict):
    """(x, context, transformer_options) of a DIFFUSION_MODEL wrapper call, for any diffusion model's _forward
    signature (UNet: x, timesteps, context, y, control, transformer_options; Flux: x, timestep, context, y, guidance,
    ref_latents, control, transformer_options; Qwen-Image: x, timesteps, context, attention_mask, ...), read by name
    from the signature of the function the executor wraps."""
    bound = inspect.signature(executor.original).bind_partial(*args, **kwargs).arguments
    return bound.get("x"), bound.get("context"), bound.get("transformer_options") or {}


class _CallState:
    """Per model call: where each bound concept acts (cached per layer grid / context length). `rows`: the
    family's bound_lora_rows (a JointGeometry for DiTs), or None (UNets: each layer's grid from its shape)."""

    def __init__(
        self, owner: BoundLoras, regions: ConceptRegions, indices: list[int], x, transformer_options, rows=None
    ):
        self.owner = owner
        self.rows = rows
        self.stage1_text_only = regions.masks is None and owner.stage1 == "text_rows"
        self.latent_hw = tuple(int(s) for s in x.shape[-2:])
        self.batch = int(x.shape[0])
        self.unmasked = regions.masks is None  # stage 1 ("unmasked" or "text_rows" policy)
        self.regions = None if regions.masks is None else exclusive_masks(regions.masks.to(x.device), indices)
        branches = tuple(int(c) for c in transformer_options.get("cond_or_uncond", (0,)))
        uuids = transformer_options.get("uuids") or [None] * len(branches)
        table = transformer_options.get(comfy_conditioning.CHUNKS_KEY) or {}
        self.chunks = []  # per CFG chunk: the prompt's own length when it holds the prompt, else None
        for branch, uuid in zip(branches, uuids):
            chunk = table.get(uuid)
            holds = branch == 0 and chunk_holds_prompt(chunk, owner.prompt_ids, owner.prompt_length)
            self.chunks.append((chunk.length if chunk is not None else owner.prompt_length) if holds else None)
        self.device = x.device
        self._masks: dict = {}

    def _image_mask(self, concept: int, tokens: int, grid: Optional[tuple[int, int]], batch: int) -> torch.Tensor:
        grid = grid or layer_grid(self.latent_hw, tokens)
        key = ("image", concept, grid, batch)
        if key not in self._masks:
            self._masks[key] = image_position_mask(self.regions[:, concept], grid, batch)  # (B, N)
        return self._masks[key]

    def _text_mask(self, concept: int, context_length: int, batch: int) -> torch.Tensor:
        key = ("text", concept, context_length, batch)
        if key not in self._masks:
            position = self.owner.concepts[concept].position
            self._masks[key] = token_row_mask(
                self.chunks, batch // max(len(self.chunks), 1), position, context_length, self.device
            )  # (B, T)
        return self._masks[key]

    def _sequence_mask(self, layer: BoundLayer, output: torch.Tensor) -> torch.Tensor:
        """(B, L) rows of a DiT layer's token sequence where `layer`'s concept acts (text, image or joint site)."""
        geometry, batch, length = self.rows, output.shape[0], output.shape[1]
        key = ("sequence", layer.kind, layer.concept, batch, length)
        if key not in self._masks:
            text = image = None
            if layer.kind in ("text", "joint") and (self.owner.text_rows or self.regions is None):
                text = self._text_mask(layer.concept, geometry.text_tokens, batch)  # (B, T)
            if layer.kind in ("image", "joint", "joint_image") and not self.stage1_text_only:
                image = self._image_mask(layer.concept, geometry.image_tokens, geometry.grid, batch)  # (B, N)
            image_start = geometry.image_start if layer.kind in ("joint", "joint_image") else 0
            self._masks[key] = sequence_rows(((0, text), (image_start, image)), length, batch, self.device)
        return self._masks[key]

    def hook(self, layer: BoundLayer):
        def forward_hook(module, args, output):
            x = args[0]
            residual = layer.residual(x, output)
            if self.unmasked and not self.stage1_text_only:
                return output + residual.to(output.dtype)
            if self.rows is not None:  # a DiT: text / image / joint rows from the call's geometry
                return add_masked(output, residual, self._sequence_mask(layer, output))
            if layer.kind == "text":
                return add_masked(output, residual, self._text_mask(layer.concept, output.shape[1], output.shape[0]))
            grid = tuple(output.shape[-2:]) if output.dim() == 4 else None
            tokens = output.shape[1] if output.dim() == 3 else output.shape[-2] * output.shape[-1]
            return add_masked(output, residual, self._image_mask(layer.concept, tokens, grid, output.shape[0]))

        return forward_hook


def bound_layers(
    model_patcher, loras: list[tuple[LoraPatches, float]], family=None
) -> tuple[tuple[BoundLayer, ...], int]:
    """The hooked layers of every (LoRA, strength) in concept order, and how many patches were left out: those the
    family places on no positions ("global": timestep/label embeddings, modulation) and those on modules other than
    linear and 2-D convolution layers (norm scales), whose residual is not an op of the input."""
    family = family or model_family(model_patcher)
    modules = dict(model_patcher.model.diffusion_model.named_modules())
    layers, skipped = [], 0
    for concept, (lora, strength) in enumerate(loras):
        for key, patch in sorted(lora.patches.items(), key=lambda item: repr(item[0])):
            path, part = _module_path(key)
            module = modules.get(path)
            kind = family.bound_lora_site(path)
            layer_op = isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            if kind == "global" or not layer_op or part not in ("weight", "bias"):
                skipped += 1
                continue
            layers.append(BoundLayer(path, kind, concept, PatchResidual(module, key, patch, strength)))
    return tuple(layers), skipped


def install_bound_loras(model_patcher, wrapper: BoundLoras, positive) -> None:
    """Install the wrapper on `model_patcher` (a clone), with the chunk table the text rows need (prompt of each
    CFG chunk, recorded or recognised by content) and a cleanup that frees device copies."""
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, wrapper)
    model_patcher.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, comfy_conditioning.record_chunk_prompts
    )
    model_patcher.model_options = comfy_conditioning.with_prompt_encodings(
        model_patcher.model_options, comfy_conditioning.conditioning_encodings(positive)
    )
    model_patcher.add_callback_with_key(
        comfy.patcher_extension.CallbacksMP.ON_CLEANUP, WRAPPER_KEY, lambda patcher: wrapper.clear_device_caches()
    )


def lora_file_path(name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path("loras", name)
    if path is None or not os.path.isfile(path):
        raise ConceptSplitError.build(
            f'LoRA file "{name}" was not found',
            seen="no such file in models/loras",
            expected="a LoRA file in ComfyUI/models/loras",
            fix='copy it there and press "Refresh" (R) in the UI',
        )
    return path
