"""The one module that knows ComfyUI's patch signatures, option keys, model classes and tokenizers.

Node modules call the functions here; conceptsplit_core never sees ComfyUI objects. Hooks used (comfyui-notes §1-§3):
- attn2_patch  p(n, context, value, extra_options) -> (n, context, value): stashes the raw text features.
- attn2 replace f(q, k, v, extra_options) -> out (b, Lq, heads·dim_head): one ConceptSplit processor per block,
  which adds the ToVA delta to V's identifier rows and then runs attention (or the foreign replace it wraps).
"""

from __future__ import annotations

import inspect
from typing import Mapping

import torch

import comfy.k_diffusion.sampling as k_diffusion_sampling
import comfy.ldm.models.autoencoder as comfy_autoencoder
import comfy.ldm.modules.attention as comfy_attention
import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.sd1_clip
import comfy.supported_models
import comfy.utils
import latent_preview

from ..conceptsplit_core.adapter_layers import CrossAttentionLayer, UNetLayout
from ..conceptsplit_core.attention_calls import AttentionCall, attention_probabilities
from ..conceptsplit_core.config import FAMILY_SD15, FAMILY_SD21, FAMILY_SDXL, PREDICTION_EPS, PREDICTION_V
from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.prompt_tokens import PromptTokens
from ..conceptsplit_core.token_value_delta import TokenDelta, apply_token_value_delta

VALUE_INPUT_KEY = "conceptsplit_value_input"  # extra_options key: the tensor that to_v receives, (B, T, d)
# transformer_options key: a tuple of AttentionObserver objects (a tuple, so ComfyUI's per-call dict/list copying
# keeps the same objects; notes §1.1)
OBSERVERS_KEY = "conceptsplit_observers"
# CONDITIONING dict key: the PromptTokens the conditioning was encoded from (token positions for LODA and the viewer)
PROMPT_TOKENS_KEY = "conceptsplit_prompt"
# transformer_options key: tuple of LocatedConcept, the ToVA concepts and their positions (no tensors)
CONCEPTS_KEY = "conceptsplit_concepts"
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
    diffusers_to_ldm = comfy.utils.unet_to_diffusers(config.unet_config)
    modules = dict(base.diffusion_model.named_modules())
    layers = []
    suffix = ".attn2.to_v.weight"
    for diffusers_key, ldm_key in diffusers_to_ldm.items():
        if not diffusers_key.endswith(suffix):
            continue
        module = modules[ldm_key[: -len(".weight")]]
        out_features, in_features = module.weight.shape  # (C, d)
        layers.append(CrossAttentionLayer(
            path=diffusers_key[: -len(suffix)], block=_block_of(ldm_key), block_index=_depth_of(ldm_key),
            out_features=int(out_features), in_features=int(in_features)))
    layers.sort(key=lambda layer: (("input", "middle", "output").index(layer.block[0]), layer.block[1],
                                   layer.block_index))
    return UNetLayout(family=family, prediction=prediction, text_width=int(config.unet_config["context_dim"]),
                      layers=tuple(layers))


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

    def _row_mask(self, cond_or_uncond: tuple, batch: int, device) -> torch.Tensor:
        key = (cond_or_uncond, batch, device)
        mask = self._device_cache.get(key)
        if mask is None:  # cached: building it on the GPU every call would copy from the host each time
            mask = branch_row_mask(cond_or_uncond, batch, self.apply_to_uncond, device)
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
            raise RuntimeError("ConceptSplit: the value stash patch did not run before the attn2 replace")
        row_mask = self._row_mask(tuple(extra_options["cond_or_uncond"]), v.shape[0], v.device)
        for delta in self._deltas_on(v.device):
            v = apply_token_value_delta(v, context, delta, row_mask)  # (B, T, C)
        return v


def attention_call(extra_options, q, k) -> AttentionCall:
    """Describe this attn2 call from ComfyUI's extra_options (block keys, grid, chunk layout; notes §1.2, §1.7)."""
    block = extra_options["block"]
    grid = tuple(int(x) for x in extra_options["activations_shape"][-2:])
    return AttentionCall(key=(block[0], int(block[1]), int(extra_options.get("block_index", 0))), grid=grid,
                         heads=int(extra_options["n_heads"]),
                         cond_or_uncond=tuple(int(c) for c in extra_options["cond_or_uncond"]),
                         batch=int(q.shape[0]), context_length=int(k.shape[1]), sigmas=extra_options.get("sigmas"))


def branch_row_mask(cond_or_uncond, batch: int, include_uncond: bool, device) -> torch.Tensor:
    """(B,) bool: which rows of this call belong to the branches that get the delta.

    The batch is len(cond_or_uncond) chunks of equal size; 0 marks a positive chunk, 1 a negative one. Their order
    varies per call (uncond first is common), so index by the list, never by position (notes §1.7).
    """
    chunks = len(cond_or_uncond)
    per_chunk = batch // chunks
    flags = torch.tensor([include_uncond or c == 0 for c in cond_or_uncond], device=device)
    return flags.repeat_interleave(per_chunk)


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
                         deltas_by_key: Mapping[BlockKey, tuple[TokenDelta, ...]], apply_to_uncond: bool) -> None:
    """Install ToVA on `model_patcher` (already a clone): processors on every attn2 block, deltas where given."""
    model_patcher.model_options = with_processors(model_patcher.model_options, layout, deltas_by_key,
                                                  apply_to_uncond)


def with_observers(model_options: dict, layout: UNetLayout, observers: tuple) -> dict:
    """Return model_options whose processors report to `observers` (appended after any already there)."""
    options = with_processors(model_options, layout)
    transformer_options = options["transformer_options"]
    transformer_options[OBSERVERS_KEY] = tuple(transformer_options.get(OBSERVERS_KEY, ())) + tuple(observers)
    return options


def encode_prompt(clip, text: str, layout: UNetLayout | None = None):
    """CONDITIONING for `text`, exactly as CLIPTextEncode makes it, with its PromptTokens attached.

    Checks the CLIP matches the model's text width when a layout is given.
    Shapes: [[cond (1, 77·windows, d), {"pooled_output": ..., PROMPT_TOKENS_KEY: PromptTokens}]].
    """
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    tokens = prompt_tokens(clip, text)
    conditioning = [[cond, {**extras, PROMPT_TOKENS_KEY: tokens}] for cond, extras in conditioning]
    width = conditioning[0][0].shape[-1]
    if layout is not None and width != layout.text_width:
        raise ConceptSplitError.build(
            "The CLIP does not belong to this model",
            seen=f"text features of width {width}", expected=f"width {layout.text_width} for this model",
            fix="connect the CLIP output of the same checkpoint loader as the MODEL")
    return conditioning


def conditioning_prompt_tokens(conditioning) -> PromptTokens | None:
    """The PromptTokens attached by Apply ToVA / ConceptSplit Text Encode to a CONDITIONING, or None."""
    for _, extras in conditioning:
        tokens = extras.get(PROMPT_TOKENS_KEY)
        if tokens is not None:
            return tokens
    return None


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


# --- LODA sampling (issue 3): sampler, guider and gradient-pass signatures (notes §4) -------------------------

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


def release_inference_parameters(model_patcher) -> int:
    """Replace the UNet's inference-tensor parameters and buffers by equal normal tensors (notes §4.2 fix (a)).

    Must run inside `torch.inference_mode(False)`, after the model is loaded, once per run (LoRA patching makes
    inference tensors again). Values are unchanged, so later plain runs are bit-identical. Returns the count.
    """
    replaced = 0
    for module in model_patcher.model.diffusion_model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_inference():
                module._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
                replaced += 1
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_inference():
                module._buffers[name] = buffer.detach().clone()
                replaced += 1
    return replaced


def sampling_guider(model_k):
    """The guider behind a k-diffusion model function (KSamplerX0Inpaint.inner_model; notes §4.1)."""
    return model_k.inner_model


def guider_prompt_tokens(guider) -> PromptTokens | None:
    """PromptTokens of the guider's processed positive conds (convert_cond keeps the conditioning's dict keys)."""
    for entry in guider.conds.get("positive", None) or ():
        tokens = entry.get(PROMPT_TOKENS_KEY)
        if tokens is not None:
            return tokens
    return None


def cond_forward(model_k, x: torch.Tensor, sigma: torch.Tensor, model_options: dict, negative: bool = False):
    """One cond-only UNet forward through ComfyUI's own batching (SDXL `y`, areas, ToVA; notes §4.3 step 2).

    Differentiable w.r.t. x when grad mode is on; the model input scaling is part of the graph (spec §3.4).
    Shapes: x (b, 4, h, w); sigma () or (b,). With `negative`, the negative conds run as well (mask capture).
    """
    guider = sampling_guider(model_k)
    conds = [guider.conds["positive"]]
    if negative and guider.conds.get("negative") is not None:
        conds.append(guider.conds["negative"])
    timestep = sigma.reshape(-1).expand(x.shape[0]) if sigma.dim() <= 1 else sigma
    return comfy.samplers.calc_cond_batch(guider.inner_model, conds, x, timestep, model_options)


def persistent_noise_sampler(inner, x: torch.Tensor, sigmas: torch.Tensor, seed):
    """One noise sampler for the whole run when the inner sampler takes `noise_sampler`, else None (pitfall §7.10).

    Built as the sampler itself would build it from the full sigmas: a Brownian tree for the SDE samplers, the
    seeded default sampler for the ancestral ones, so slice-by-slice sampling draws the same noise as one call.
    """
    function = inner.sampler_function
    try:
        parameters = inspect.signature(function).parameters
        source = inspect.getsource(function)
    except (TypeError, ValueError, OSError):
        return None
    if "noise_sampler" not in parameters or "noise_sampler" in inner.extra_options:
        return None
    if "BrownianTreeNoiseSampler" in source:
        positive = sigmas[sigmas > 0]
        return k_diffusion_sampling.BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed=seed, cpu=True)
    return k_diffusion_sampling.default_noise_sampler(x, seed=seed)


def run_inner_sampler(inner, model_k, x, sigmas, extra_args, callback, disable, step_offset: int, noise_sampler):
    """Run the wrapped SAMPLER's function on `sigmas` (a slice), its callback steps shifted by `step_offset`."""
    if len(sigmas) < 2:
        return x
    shifted = None if callback is None else (lambda d: callback({**d, "i": d["i"] + step_offset}))
    options = dict(inner.extra_options)
    if noise_sampler is not None:
        options["noise_sampler"] = noise_sampler
    return inner.sampler_function(model_k, x, sigmas, extra_args=extra_args, callback=shifted, disable=disable,
                                  **options)


def wrapping_ksampler(function, inner, options: dict):
    """A SAMPLER for SamplerCustom(Advanced) that calls `function(model_k, x, sigmas, ..., **options)`."""
    if not isinstance(inner, comfy.samplers.KSAMPLER):
        raise ConceptSplitError.build(
            "LODA can only wrap k-diffusion samplers", seen=f"a {type(inner).__name__} sampler",
            expected="a SAMPLER from KSamplerSelect (euler, dpmpp_2m, heun, ...)",
            fix="connect KSamplerSelect's output to the LODA node")
    return comfy.samplers.KSAMPLER(function, extra_options=options, inpaint_options=dict(inner.inpaint_options))


def named_sampler(sampler_name: str):
    return comfy.samplers.sampler_object(sampler_name)


def throw_if_interrupted() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


_DEFAULT_TOKENIZER = []


def default_word_token_ids(word: str) -> tuple[int, ...]:
    """BPE ids of a word with ComfyUI's CLIP tokenizer (the same vocabulary for SD1.5 CLIP-L, SD2 OpenCLIP-H and
    SDXL CLIP-L/G), for nodes that get CONDITIONING but no CLIP."""
    if not _DEFAULT_TOKENIZER:
        _DEFAULT_TOKENIZER.append(comfy.sd1_clip.SDTokenizer())
    inner = _DEFAULT_TOKENIZER[0]
    ids = inner.tokenizer(word)["input_ids"]
    return tuple(i for i in ids if i not in (inner.start_token, inner.end_token, inner.pad_token))


def ksampler_sigmas(model_patcher, steps: int, sampler_name: str, scheduler: str, denoise: float) -> torch.Tensor:
    """The sigmas the KSampler node would use (denoise < 1 keeps the last steps; notes §4.1)."""
    sampler = comfy.samplers.KSampler(model_patcher, steps=steps, device=model_patcher.load_device,
                                      sampler=sampler_name, scheduler=scheduler, denoise=denoise,
                                      model_options=model_patcher.model_options)
    return sampler.sigmas


def sample_latent_with_sampler(model_patcher, seed: int, cfg: float, sampler, sigmas, positive, negative,
                               latent: dict) -> dict:
    """KSampler's sampling (noise, mask, preview callback) with a custom SAMPLER and sigmas; returns a LATENT."""
    latent_image = comfy.sample.fix_empty_latent_channels(model_patcher, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model_patcher, len(sigmas) - 1)
    samples = comfy.sample.sample_custom(model_patcher, noise, cfg, sampler, sigmas, positive, negative,
                                         latent_image, noise_mask=latent.get("noise_mask"), callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return out


# --- attention capture for the viewer (issue 4): a sampling-run wrapper around the capture observer -----------

CAPTURE_WRAPPER_KEY = "conceptsplit_attention_capture"


def install_attention_capture(model_patcher, layout: UNetLayout, capture) -> None:
    """Make `model_patcher` (already a clone) report attn2 probabilities to `capture` and tell it each run's bounds.

    `capture` is an attention_capture.AttentionCapture. An OUTER_SAMPLE wrapper (notes §1.4; it chains, and clone()
    copies wrapper lists shallowly) calls capture.start_run(sigmas) before the first model call, so a bad step range
    fails before sampling, and capture.finish_run(output latent) after the last.
    """
    import comfy.patcher_extension  # kept local to this section (already loaded by comfy.samplers)

    model_patcher.model_options = with_observers(model_patcher.model_options, layout, (capture,))
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CAPTURE_WRAPPER_KEY,
                                       _capture_run_wrapper(capture))


def _capture_run_wrapper(capture):
    # A closure, not a bound method: deepcopy treats functions as atomic (notes §1.1).
    def outer_sample(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        capture.start_run(sigmas)  # (S + 1,) the run's schedule; LODA's slices still see the full one here
        try:
            output = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)  # (B, 4, h, w)
        except BaseException:
            capture.abort_run()
            raise
        capture.finish_run(output)
        return output

    return outer_sample


# --- ToVA training (issue 5): schedule, VAE posterior, conditioning, autograd inside ComfyUI's sampling ----------

def training_noise_schedule(model_patcher) -> tuple[torch.Tensor, str, float]:
    """(σ_t table (1000,), "v" | "eps", σd) of the model's sampling object, which a ModelSamplingDiscrete may patch."""
    sampling = model_patcher.get_model_object("model_sampling")
    sigmas = getattr(sampling, "sigmas", None)
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        prediction = PREDICTION_V
    elif type(sampling).calculate_denoised is comfy.model_sampling.EPS.calculate_denoised:
        prediction = PREDICTION_EPS
    else:
        prediction = None
    if prediction is None or sigmas is None or sigmas.numel() != 1000:
        raise ConceptSplitError.build(
            "ToVA training needs a discrete 1000-step v- or ε-prediction model",
            seen=f"model sampling {type(sampling).__name__}", expected="SD1.5, SD2.1 or SDXL sampling (discrete)",
            fix="remove ModelSampling nodes other than ModelSamplingDiscrete (eps or v_prediction) before training")
    return sigmas.detach().to("cpu", torch.float32).clone(), prediction, float(sampling.sigma_data)


@torch.no_grad()
def encode_latent_posterior(vae, model_patcher, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior N(mean, std²) of each image, in the model's latent space (× scaling factor, spec §2.6).

    ComfyUI's VAE.encode returns the posterior mode; the recipe samples it, so the moments are read from the
    encoder directly (AutoencoderKL), one image at a time. Other VAEs fall back to the mode with std 0.
    Shapes: pixels (n, R, R, 3) in 0..1 -> mean, std (n, 4, R/8, R/8) fp32 on the model's load device.
    """
    engine = vae.first_stage_model
    regularizer = getattr(engine, "regularization", None)
    means, stds = [], []
    if isinstance(regularizer, comfy_autoencoder.DiagonalGaussianRegularizer) and hasattr(engine, "quant_conv"):
        comfy.model_management.load_models_gpu([vae.patcher])
        for image in pixels.split(1):
            x = vae.process_input(image.movedim(-1, 1)).to(vae.device, vae.vae_dtype)  # (1, 3, R, R) in [-1, 1]
            moments = engine.quant_conv(engine.encoder(x)).float()  # (1, 8, R/8, R/8)
            mean, logvar = moments.chunk(2, dim=1)
            means.append(mean)
            stds.append(torch.exp(0.5 * logvar.clamp(-30.0, 20.0)))  # as DiagonalGaussianDistribution
        mean, std = torch.cat(means), torch.cat(stds)
    else:
        mean = vae.encode(pixels)
        std = torch.zeros_like(mean)
    base = model_patcher.model
    device = model_patcher.load_device
    scale = float(base.latent_format.scale_factor)
    return base.process_latent_in(mean.float()).to(device), (std.float() * scale).to(device)


def training_conditioning(clip, text: str, resolution: int) -> list:
    """CONDITIONING of one training prompt; SDXL's size conditioning says "an R×R image, uncropped" (spec §2.6)."""
    size = {"width": resolution, "height": resolution, "crop_w": 0, "crop_h": 0,
            "target_width": resolution, "target_height": resolution}
    return clip.encode_from_tokens_scheduled(clip.tokenize(text), add_dict=size, show_pbar=False)


def training_autocast_dtype(model_patcher) -> torch.dtype | None:
    """bf16 autocast on a CUDA device that supports it; None (fp32) elsewhere. LoRA master weights stay fp32."""
    device = model_patcher.load_device
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _clone_conditioning(item):
    # Tensors made under the executor's inference mode cannot be saved for backward (notes §4.2): clone inside.
    cond, extras = item
    return [cond.clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in extras.items()}]


class _FrozenUNet:
    """Only the LoRA parameters require grad: the UNet's requires_grad flags are off for the run and restored
    afterwards; inference-tensor weights are released first (notes §4.2 fix (a))."""

    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.flags: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self):
        release_inference_parameters(self.model_patcher)
        for param in self.model_patcher.model.diffusion_model.parameters():
            self.flags.append((param, param.requires_grad))
            param.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for param, flag in self.flags:
            param.requires_grad_(flag)


class _TrainingSampler(comfy.samplers.Sampler):
    """A SAMPLER that trains instead of sampling (the shape of comfy_extras/nodes_train.py): ComfyUI has loaded
    the model and encoded the conds; `body(denoise)` runs the core training loop with a k-diffusion denoiser."""

    def __init__(self, layout: UNetLayout, body):
        self.layout = layout
        self.body = body
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        base = model_wrap.inner_model
        conds = model_wrap.conds["positive"]  # one processed cond per training prompt, in order
        options = extra_args["model_options"]
        keys = {layer.path: layer.key for layer in self.layout.layers}

        def denoise(x, sigma, template_index, deltas):
            # x (1, 4, h, w), sigma (1,) -> denoised x0 (1, 4, h, w); cond-only forward, our processor adds deltas
            run_options = with_processors(options, self.layout, {keys[path]: (d,) for path, d in deltas.items()})
            return comfy.samplers.calc_cond_batch(base, [[conds[template_index]]], x, sigma, run_options)[0]

        with _FrozenUNet(model_wrap.model_patcher):
            self.result = self.body(denoise)
        return torch.zeros_like(latent_image)


def run_training(model_patcher, layout: UNetLayout, conditionings: list, latent_shape: tuple[int, ...], body):
    """Run `body(denoise)` inside ComfyUI's sampling machinery with autograd on; returns what body returns.

    `model_patcher` must be a clone (ComfyUI patches it while loading); `conditionings` holds one CONDITIONING per
    training prompt, in template order. Works inside the executor's inference mode (notes §4.2).
    """
    with torch.inference_mode(False), torch.enable_grad():
        positives = []
        for conditioning in conditionings:
            if len(conditioning) != 1:
                raise ConceptSplitError.build(
                    "A training prompt encoded to several conditionings", seen=f"{len(conditioning)} entries",
                    expected="one conditioning per prompt", fix="remove scheduled CLIP hooks from the CLIP input")
            positives.append(_clone_conditioning(conditioning[0]))
        guider = comfy.samplers.CFGGuider(model_patcher)
        guider.set_conds(positives, [])
        guider.set_cfg(1.0)
        sampler = _TrainingSampler(layout, body)
        zeros = torch.zeros(latent_shape)
        guider.sample(zeros, zeros, sampler, torch.tensor([1.0, 0.0]), disable_pbar=True, seed=0)
        return sampler.result


def training_progress(total: int, node_id: str | None = None):
    """on_step callback: ComfyUI's progress bar, the loss as progress text, and the interrupt check per step."""
    bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def report(done: int, steps: int, loss: float) -> None:
        bar.update_absolute(done, steps)
        server = getattr(__import__("server").PromptServer, "instance", None)
        if server is not None and node_id is not None:
            server.send_progress_text(f"step {done}/{steps}  loss {loss:.4f}", node_id)
        comfy.model_management.throw_exception_if_processing_interrupted()

    return report
