"""The UNet families: SD1.5, SD2.x and SDXL (and their fine-tunes), which share ComfyUI's UNet class
(openaimodel.UNetModel) and its attn2 patch points (integration §1-§3).

Everything the pack knows of these models lives here: which ComfyUI model classes they are, their attn2 layers
(diffusers path, replace key, level), the map level LODA and the viewer read (latent/4; SDXL's loss only in the down
blocks), how the ConceptSplit processor is installed (attn2 replace + attn2_patch), what a gradient pass needs
(the skip-clone patch for ControlNets, the modules whose weights autograd must see, which blocks may be
checkpointed) and the training noise schedule (discrete 1000 steps, ε or v).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Mapping

import torch

import comfy.model_base
import comfy.model_sampling
import comfy.patcher_extension
import comfy.supported_models
import comfy.utils
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

from ...conceptsplit_core.config import (
    FAMILY_DISPLAY,
    FAMILY_SD15,
    FAMILY_SD21,
    FAMILY_SDXL,
    PREDICTION_EPS,
    PREDICTION_V,
)
from ...conceptsplit_core.errors import ConceptSplitError
from ...conceptsplit_core.model_layout import AttentionSite, LayerKey, ModelLayout, map_grid
from ...conceptsplit_core.prompt_tokens import PromptTokens
from ...conceptsplit_core.token_value_delta import TokenDelta
from .. import comfy_text
from ..comfy_attention import ConceptSplitAttention, stash_value_input, with_observer_list
from ..comfy_autograd import AutogradWeights, FrozenWeights, GradientCheckpointing
from ..comfy_conditioning import (
    call_chunk_table,
    check_prompt_sampled,
    conditioning_encodings,
    with_chunk_table,
    with_located_concepts,
    with_prompt_encodings,
)
from .base import FamilyBase

MAP_LEVEL = 2  # LODA's maps are at latent/4: two downsamplings (method §3.1)
TOVA_WRAPPER_KEY = "conceptsplit_tova"
_BLOCK_ORDER = ("input", "middle", "output")  # execution order of ComfyUI's UNet blocks
UNetBlock = tuple  # ("input", 7) / ("middle", 0) / ("output", 5): a ComfyUI UNet block, a replace key without depth


class UNetFamily(FamilyBase):
    """One family of ComfyUI's UNet models, told apart by its supported_models class."""

    supports_tova = True
    supports_bound_loras = True

    def __init__(self, name: str, config_class, loss_in_down_blocks_only: bool = False):
        self.name = name
        self.display = FAMILY_DISPLAY[name]
        self.config_class = config_class
        # method §3.1: SDXL's stage-1 loss reads only the down blocks' map-level layers (the masks read all of them)
        self.loss_in_down_blocks_only = loss_in_down_blocks_only

    def matches(self, model_patcher) -> bool:
        config = getattr(getattr(model_patcher, "model", None), "model_config", None)
        return isinstance(config, self.config_class)

    def bound_lora_site(self, module_path: str) -> str:
        """ "text" for cross-attention key/value projections (their input is the prompt's tokens), "global" for
        layers on the timestep/label embedding (no positions to mask), else "image" (convolutions and the
        transformers' linear layers: positions of the layer's grid, read from its shape)."""
        if module_path.endswith(("attn2.to_k", "attn2.to_v")):
            return "text"
        if "emb" in module_path.split(".")[0] or ".emb_layers." in f".{module_path}.":
            return "global"
        return "image"

    # --- layout -------------------------------------------------------------------------------------------------

    def layout(self, model_patcher) -> ModelLayout:
        """The model's prediction type, text width and attn2 layers (method §2.2), with their levels and map flags."""
        base = model_patcher.model
        config = base.model_config
        prediction = PREDICTION_V if base.model_type == comfy.model_base.ModelType.V_PREDICTION else PREDICTION_EPS
        found = []
        for path, ldm_key, module, heads in _value_projections(model_patcher):
            out_features, in_features = module.weight.shape  # (C, d)
            block = _block_of(ldm_key)
            found.append((block, _depth_of(ldm_key), path, int(out_features), int(in_features), heads))
        found.sort(key=lambda item: (_BLOCK_ORDER.index(item[0][0]), item[0][1], item[1]))
        levels = _block_levels(config.unet_config)
        keys_levels = [((block[0], block[1], depth), levels[block]) for block, depth, *_ in found]
        down_levels = [level for key, level in keys_levels if key[0] == "input"]
        # [choice] A UNet shallower than SD's (fewer than 3 levels, e.g. the tiny test models) uses its deepest level.
        map_level = min(MAP_LEVEL, max(down_levels)) if down_levels else None
        sites = []
        for (key, level), (_, _, path, out_features, in_features, heads) in zip(keys_levels, found):
            at_map = level == map_level
            loss = at_map and (not self.loss_in_down_blocks_only or key[0] == "input")
            sites.append(
                AttentionSite(
                    key=key,
                    level=level,
                    out_features=out_features,
                    in_features=in_features,
                    path=path,
                    heads=heads,
                    map=at_map,
                    loss=loss,
                )
            )
        return ModelLayout(
            family=self.name,
            prediction=prediction,
            text_width=int(config.unet_config["context_dim"]),
            layers=tuple(sites),
            display=self.display,
        )

    def default_map_layers(self, layout: ModelLayout, latent_hw: tuple[int, int]) -> frozenset:
        """The attn2 layers at latent/4 (the deepest level of a shallower UNet)."""
        return layout.map_keys()

    def map_grid(self, layout: ModelLayout, key: LayerKey, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of layer `key`: the latent halved at each downsampling before it, ceil (integration §1.3)."""
        return map_grid(latent_hw, layout.levels()[key])

    def value_weight_norms(self, model_patcher, layout: ModelLayout) -> dict[LayerKey, float]:
        """{attn2 replace key: ||W_v||_F} of the model's own cross-attention value weights, for the ToVA size check.

        Read from the stored weight (fp32 norm, on whatever device it sits). A weight that cannot be read as numbers
        (a meta tensor, an exotic quantised type) or whose norm is not a finite positive number is left out, and its
        layer is then not compared (concepts.check_delta_sizes).
        """
        keys = {layer.path: layer.key for layer in layout.layers}
        norms = {}
        for path, _, module, _ in _value_projections(model_patcher):
            try:
                norm = float(torch.linalg.vector_norm(module.weight.detach().float()))  # (C, d) -> scalar
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                continue
            if path in keys and 0 < norm < float("inf"):
                norms[keys[path]] = norm
        return norms

    # --- text ---------------------------------------------------------------------------------------------------

    def prompt_tokens(self, clip, text: str) -> PromptTokens:
        """CLIP's 77-token windows, flattened (comfy_text.prompt_tokens)."""
        return comfy_text.prompt_tokens(clip, text)

    def word_token_ids(self, clip, word: str) -> tuple[int, ...]:
        """The word's BPE ids with the CLIP tokenizer the context positions come from."""
        return comfy_text.word_token_ids(clip, word)

    def default_word_token_ids(self, word: str) -> tuple[int, ...]:
        """The word's BPE ids without the model's CLIP (nodes that get CONDITIONING only): ComfyUI's CLIP
        vocabulary, the same for SD1.5 CLIP-L, SD2 OpenCLIP-H and SDXL CLIP-L/G."""
        return comfy_text.default_word_token_ids(word)

    # --- attention ----------------------------------------------------------------------------------------------

    def install_observers(self, model_options: dict, layout: ModelLayout, observers: tuple) -> dict:
        """A new model_options whose attn2 processors report to `observers` (appended after any already there)."""
        return with_observer_list(with_processors(model_options, layout), observers)

    def with_deltas(
        self, model_options: dict, layout: ModelLayout, deltas_by_key: Mapping[LayerKey, tuple[TokenDelta, ...]]
    ) -> dict:
        """A new model_options whose processors add `deltas_by_key` (training's per-step deltas)."""
        return with_processors(model_options, layout, deltas_by_key)

    def install_tova(
        self,
        model_patcher,
        layout: ModelLayout,
        deltas_by_key: Mapping[LayerKey, tuple[TokenDelta, ...]],
        apply_to_uncond: bool,
        prompt: PromptTokens | None = None,
        label: str = "",
        positive=None,
        concepts: tuple = (),
    ) -> None:
        """Install ToVA on `model_patcher` (already a clone): processors on every attn2 block, deltas where given,
        and the located concepts recorded for LODA and the viewer.

        With `prompt`, a CALC_COND_BATCH wrapper also identifies each conditioning's prompt per model call (token
        record or content: prompt_encoding), so the delta lands only on the rows of that prompt's conditioning
        (integration §2, variant 1), and checks that the positive prompt being sampled is this prompt. `positive` is the
        CONDITIONING encode_prompt made of it: its encoding is what an unrecorded positive is recognised by.
        """
        model_patcher.model_options = with_processors(
            model_patcher.model_options, layout, deltas_by_key, apply_to_uncond
        )
        if positive is not None:
            model_patcher.model_options = with_prompt_encodings(
                model_patcher.model_options, conditioning_encodings(positive)
            )
        if prompt is not None:
            model_patcher.add_wrapper_with_key(
                comfy.patcher_extension.WrappersMP.CALC_COND_BATCH,
                TOVA_WRAPPER_KEY,
                _chunk_table_wrapper(prompt, label),
            )
        cleanups = model_patcher.callbacks.get(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, {}).get(
            TOVA_WRAPPER_KEY, []
        )
        if _clear_device_caches not in cleanups:
            model_patcher.add_callback_with_key(
                comfy.patcher_extension.CallbacksMP.ON_CLEANUP, TOVA_WRAPPER_KEY, _clear_device_caches
            )
        if concepts:
            model_patcher.model_options = with_located_concepts(model_patcher.model_options, concepts)

    def check_fixing_patches(self, model_options: dict, layout: ModelLayout, fixing_keys) -> None:
        """Raise if a layer that attention fixing biases has another pack's attn2 replace (chained as
        ConceptSplitAttention.wrapped), which cannot take the bias; checked before sampling.

        fixing_keys: the biased replace keys, or None for every cross-attention layer of `layout`.
        """
        replaces = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        foreign = []
        for layer in layout.layers:
            if fixing_keys is not None and layer.key not in fixing_keys:
                continue
            patch = replaces.get(layer.key, replaces.get(layer.key[:2]))
            inner = patch.wrapped if isinstance(patch, ConceptSplitAttention) else patch
            if inner is not None:
                foreign.append((layer.key, type(inner).__name__))
        if foreign:
            raise ConceptSplitError.build(
                "Attention fixing cannot pass a bias through another pack's attention patch",
                seen=f"foreign attn2 replaces on {len(foreign)} biased layer(s), e.g. {foreign[0][1]} at "
                f"{foreign[0][0]}",
                expected="no other attn2 replace (IPAdapter, attention couple, ...) on the layers that get the LODA "
                "bias",
                fix="set boost and suppression to 0 (fixing off), set fixing_layers to map_level if the other patch "
                "avoids those layers, or remove the other attention patch from this model",
            )

    # --- gradients ----------------------------------------------------------------------------------------------

    def gradient_pass_options(self, model_options: dict, conds) -> dict:
        """model_options for the stage-1 gradient pass: with a ControlNet in `conds`, each input block's output is
        cloned after it is stored as a skip, because the UNet adds the control to the stored skips in place
        (openaimodel.apply_control), which autograd refuses once the next block has saved that tensor."""
        if not any(entry.get("control") is not None for entry in conds or ()):
            return model_options
        options = dict(model_options)
        transformer_options = dict(options.get("transformer_options", {}))
        patches = dict(transformer_options.get("patches", {}))
        patches["input_block_patch_after_skip"] = [*patches.get("input_block_patch_after_skip", []), _clone_after_skip]
        transformer_options["patches"] = patches
        options["transformer_options"] = transformer_options
        return options

    @contextlib.contextmanager
    def differentiable(
        self, model_patcher, conds=None, checkpointing: bool = False, keep_layers: Iterable[LayerKey] = ()
    ):
        """Autograd on for one gradient pass inside ComfyUI's inference mode: the UNet's and ControlNets' weights as
        autograd-usable views and, with `checkpointing`, the UNet's blocks checkpointed except those holding
        `keep_layers` (LODA's loss layers); all restored on exit, also after an interrupt (comfy_autograd)."""
        modules = gradient_modules(model_patcher, conds)
        keep = {key[:2] for key in keep_layers}
        unet = model_patcher.model.diffusion_model
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            AutogradWeights(modules),
            GradientCheckpointing(checkpoint_modules(unet, keep) if checkpointing else ()),
        ):
            yield

    @contextlib.contextmanager
    def trainable(self, model_patcher, checkpointing: bool = False):
        """For ToVA training: the UNet frozen (requires_grad off, weights as autograd-usable views) and, with
        `checkpointing`, its ResBlock / SpatialTransformer forwards checkpointed; restored on exit."""
        unet = model_patcher.model.diffusion_model
        with FrozenWeights(unet), GradientCheckpointing(checkpoint_modules(unet) if checkpointing else ()):
            yield

    def training_schedule(self, model_patcher) -> tuple[torch.Tensor, str, float]:
        """(σ_t table (1000,), "v" | "eps", σd) of the model's sampling object, which a ModelSamplingDiscrete may
        patch: the noise schedule and target ToVA training uses (method §2.6)."""
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
                seen=f"model sampling {type(sampling).__name__}",
                expected="SD1.5, SD2.1 or SDXL sampling (discrete)",
                fix="remove ModelSampling nodes other than ModelSamplingDiscrete (eps or v_prediction) before training",
            )
        return sigmas.detach().to("cpu", torch.float32).clone(), prediction, float(sampling.sigma_data)


SDXL = UNetFamily(FAMILY_SDXL, comfy.supported_models.SDXL, loss_in_down_blocks_only=True)
SD21 = UNetFamily(FAMILY_SD21, comfy.supported_models.SD20)
SD15 = UNetFamily(FAMILY_SD15, comfy.supported_models.SD15)


# --- the model's attn2 layers -----------------------------------------------------------------------------------


def _value_projections(model_patcher):
    """(diffusers path of the transformer block, ldm key of to_v.weight, the to_v module, heads) of every attn2."""
    base = model_patcher.model
    modules = dict(base.diffusion_model.named_modules())
    suffix = ".attn2.to_v.weight"
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(base.model_config.unet_config).items():
        if diffusers_key.endswith(suffix):
            attention = modules.get(ldm_key[: -len(".to_v.weight")])
            yield (
                diffusers_key[: -len(suffix)],
                ldm_key,
                modules[ldm_key[: -len(".weight")]],
                int(getattr(attention, "heads", 0) or 0),
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


def _block_levels(unet_config: dict) -> dict[UNetBlock, int]:
    """{block: downsampling level} of ComfyUI's UNet blocks (integration §1.3).

    Input block 0 is conv_in; each level has num_res_blocks blocks, then one downsample block (not after the last
    level); the middle sits at the deepest level; output blocks run back up with num_res_blocks + 1 per level.
    """
    levels = len(unet_config["channel_mult"])
    res_blocks = unet_config["num_res_blocks"]
    res_blocks = [res_blocks] * levels if isinstance(res_blocks, int) else list(res_blocks)
    found, block = {("middle", 0): levels - 1}, 1
    for level in range(levels):
        for _ in range(res_blocks[level]):
            found[("input", block)] = level
            block += 1
        block += 1 if level < levels - 1 else 0  # the downsample block
    block = 0
    for level in reversed(range(levels)):
        for _ in range(res_blocks[level] + 1):
            found[("output", block)] = level
            block += 1
    return found


# --- the attn2 processor on the model ---------------------------------------------------------------------------


def with_processors(
    model_options: dict,
    layout: ModelLayout,
    deltas_by_key: Mapping[LayerKey, tuple[TokenDelta, ...]] | None = None,
    apply_to_uncond: bool = True,
) -> dict:
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


def check_patch_order(model_options: dict) -> None:
    """Raise if a patch added after ToVA would be skipped or would change the text after ToVA read it."""
    transformer_options = model_options.get("transformer_options", {})
    attn2_patches = transformer_options.get("patches", {}).get("attn2_patch", [])
    if attn2_patches and attn2_patches[-1] is not stash_value_input and stash_value_input in attn2_patches:
        raise ConceptSplitError.build(
            "An attention patch was added after Apply ToVA and changes the text it reads",
            seen=f"attn2 patches after ToVA's: {[getattr(p, '__qualname__', type(p).__name__) for p in attn2_patches]}",
            expected="ToVA's attn2 patch last",
            fix="apply the other patch node before Apply ToVA",
        )
    replaces = transformer_options.get("patches_replace", {}).get("attn2", {})
    shadowed = [
        key
        for key, patch in replaces.items()
        if len(key) == 2
        and not isinstance(patch, ConceptSplitAttention)
        and any(len(k) == 3 and k[:2] == key for k in replaces)
    ]
    if shadowed:
        raise ConceptSplitError.build(
            "Another pack's attention patch was applied after ConceptSplit and would be ignored",
            seen=f"foreign attn2 replaces at blocks {shadowed[:3]} next to ConceptSplit's",
            expected="other attention patches applied before Apply ToVA, so ConceptSplit wraps them",
            fix="move that node before Apply ToVA in the model chain",
        )


def _clear_device_caches(model_patcher) -> None:
    """ON_CLEANUP callback: free the GPU copies of adapter weights held by this model's processors."""
    replaces = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for processor in replaces.values():
        if isinstance(processor, ConceptSplitAttention):
            processor.clear_device_cache()


def _chunk_table_wrapper(prompt: PromptTokens, label: str):
    prompt_ids, prompt_length = tuple(prompt.token_ids), len(prompt.token_ids)

    def wrapper(executor, model, conds, x_in, timestep, model_options):
        check_patch_order(model_options)
        table = call_chunk_table(conds, model_options, prompt_length)
        check_prompt_sampled(
            conds,
            table,
            prompt_ids,
            prompt_length,
            prompt.text,
            f"The positive prompt being sampled is not the prompt Apply ToVA located {label} in",
        )
        return executor(model, conds, x_in, timestep, with_chunk_table(model_options, table))

    return wrapper


# --- gradients --------------------------------------------------------------------------------------------------


def _clone_after_skip(h: torch.Tensor, transformer_options) -> torch.Tensor:
    return h.clone()  # the skip list keeps the original (changed in place later), the next block gets the copy


def gradient_modules(model_patcher, conds=None) -> list[torch.nn.Module]:
    """The UNet of `model_patcher` and every ControlNet (or ControlLoRA) in the conds' control chains, each once:
    the modules a gradient w.r.t. the latent runs through. T2I adapters are left out: their output depends on the
    hint only, never on the latent."""
    found: dict[int, torch.nn.Module] = {id(model_patcher.model.diffusion_model): model_patcher.model.diffusion_model}
    for entry in conds or ():
        control = entry.get("control")
        while control is not None:
            module = getattr(control, "control_model", None)
            if isinstance(module, torch.nn.Module):
                found.setdefault(id(module), module)
            control = getattr(control, "previous_controlnet", None)
    return list(found.values())


def checkpoint_modules(
    diffusion_model: torch.nn.Module, keep_blocks: Iterable[UNetBlock] = ()
) -> list[torch.nn.Module]:
    """The ResBlock and SpatialTransformer modules of the UNet to checkpoint: all but the SpatialTransformers of
    `keep_blocks`. LODA keeps its loss layers' blocks: their attention observers record maps and end the pass,
    which a recompute in backward must not repeat."""
    kept = {
        id(m)
        for block in keep_blocks
        for m in _block_module(diffusion_model, block).modules()
        if isinstance(m, SpatialTransformer)
    }
    return [m for m in diffusion_model.modules() if isinstance(m, (ResBlock, SpatialTransformer)) and id(m) not in kept]


def _block_module(diffusion_model: torch.nn.Module, block: UNetBlock) -> torch.nn.Module:
    name, index = block[0], block[1]
    if name == "middle":
        return diffusion_model.middle_block
    return (diffusion_model.input_blocks if name == "input" else diffusion_model.output_blocks)[index]
