"""The LODA SAMPLER function: stage 1 step by step around any k-diffusion sampler, then stage 2 in one call
(spec §3.3, §3.4, §4; comfyui-notes §4.3). ComfyUI signatures come from `comfy_hooks`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..conceptsplit_core.attention_record import ConceptMaps
from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.loda import (COND, UNCOND, FixingBias, LodaConcepts, MapCollector, MapLayers, StepRecord,
                                      build_concept_masks, format_report, joint_map_layers, run_truncated,
                                      select_map_layers)
from ..conceptsplit_core.loda_config import LodaConfig
from ..conceptsplit_core.loda_loss import flow_latent_update, kdiffusion_latent_update, separation_loss, step_size
from ..conceptsplit_core.prompt_tokens import (IdentifierRequest, PromptTokens, locate_identifier_positions,
                                               locate_words_in_pieces, located_table)
from . import comfy_autograd, comfy_hooks, comfy_sampling
from .families import dit_family

OPTION_KEY = "conceptsplit_loda"  # KSAMPLER extra_options key holding the LodaRequest


@dataclass(frozen=True)
class LodaRequest:
    """What the user asked for; resolved against the model, prompt and latent when sampling starts."""

    config: LodaConfig  # config.loda_steps: -1 auto, 0 stage 1 off, N >= 1
    words: tuple[str, ...] = ()  # concept words; empty = the object concepts of the ToVA-patched model
    result: Optional["LodaResult"] = None  # filled after sampling (masks, maps, report)
    gradient_checkpointing: bool = False  # recompute UNet blocks in the stage-1 backward instead of storing them


class LodaResult:
    """Mutable holder of the masks, maps and report of the LAST run of one LODA sampler (shared by reference,
    never deep-copied; reset when a run starts, so a failed run leaves nothing stale)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.masks: Optional[torch.Tensor] = None  # (B_img, K, h, w) bool
        self.maps: Optional[ConceptMaps] = None
        self.report = ""

    def __deepcopy__(self, memo):
        return self


@dataclass(frozen=True)
class LodaPlan:
    """A request resolved against one model, prompt, latent and schedule; checked before any step."""

    concepts: LodaConcepts
    layers: MapLayers
    stage1_steps: int  # N
    total_steps: int  # S; 0 when there is nothing to sample (denoise 0)
    fixing: bool  # p or m non-zero
    family: object = None  # the DiT family (nodes/families) of the model; None = a UNet (comfy_hooks' path)
    token_table: str = ""  # DiT: the located tokens (word -> token row, piece), shown in the report


def parse_words(text: str) -> tuple[str, ...]:
    """'dog, cat' -> ("dog", "cat"); empty entries are dropped."""
    return tuple(word.strip() for word in text.split(",") if word.strip())


def plan_loda(model_patcher, prompts: Sequence[PromptTokens], latent_hw: tuple[int, int], request: LodaRequest,
              total_steps: int, inner=None) -> LodaPlan:
    """Check every input and resolve concepts, layers and N before any sampling step (spec §5, STYLE §10).

    Args:
        prompts: tokens of each recorded positive prompt being sampled (several after ConditioningCombine; none
            when no prompt carries a record). The concepts are located in the first that holds them all.
        total_steps: S; 0 plans a run with nothing to sample (denoise 0).
        inner: the wrapped SAMPLER, when known: checked to step one slice at a time if N > 0.
    Raises: ConceptSplitError for a bad setting, fewer than 2 concepts, a word not in the prompt, ToVA concepts
        located in another prompt, N > S, a sampler that cannot run stage 1, a model without the map-level layers,
        maps smaller than the smoothing kernel, or fixing through another pack's attention patch.
    """
    config = request.config
    if total_steps == 0:
        config.validate()
        stage1_steps = 0
    else:
        config.validate(total_steps)
        stage1_steps = config.loda_steps_for(total_steps)
    if inner is not None and stage1_steps > 0:
        comfy_sampling.check_steps_one_slice(inner)
    family = dit_family(model_patcher)
    if family is not None:  # a DiT: joint attention maps (nodes/families, conceptsplit_core.joint_attention)
        if request.gradient_checkpointing:
            raise ConceptSplitError.build(
                f"Gradient checkpointing is not available for {family.display} yet",
                seen=f"gradient_checkpointing on with a {family.display} model",
                expected="gradient_checkpointing off (the stage-1 pass already stops after the last map block)",
                fix="turn gradient_checkpointing off")
        layout = family.layout(model_patcher)
        concepts, table = _resolve_dit_concepts(family, tuple(prompts), request.words)
        layers = joint_map_layers(layout.keys, family.default_map_layers(layout, latent_hw),
                                  family.map_grid(layout, layout.keys[0], latent_hw), latent_hw, family.display,
                                  config.fixing_layers)
        fixing = (config.boost != 0 or config.suppression != 0) and stage1_steps < total_steps
        return LodaPlan(concepts, layers, stage1_steps, total_steps, fixing, family, table)
    layout = comfy_hooks.unet_layout(model_patcher)
    concepts = _resolve_concepts(model_patcher, tuple(prompts), request.words)
    layers = select_map_layers(comfy_hooks.layer_levels(model_patcher, layout), layout.family, latent_hw,
                               config.fixing_layers)
    fixing = (config.boost != 0 or config.suppression != 0) and stage1_steps < total_steps
    if fixing:
        comfy_sampling.check_fixing_patches(model_patcher.model_options, layout, layers.fixing_keys)
    return LodaPlan(concepts, layers, stage1_steps, total_steps, fixing)


def _resolve_concepts(model_patcher, prompts: tuple[PromptTokens, ...], words: tuple[str, ...]) -> LodaConcepts:
    if not words:
        objects = [c for c in comfy_hooks.located_concepts(model_patcher) if c.role == "object"]
        _check_tova_prompt(objects, prompts)
        length = objects[0].prompt_length if objects else 0
        ids = objects[0].prompt_ids if objects else None
        return LodaConcepts(tuple(c.word for c in objects), tuple(c.position for c in objects), length, ids)  # K >= 2
    if not prompts:
        raise ConceptSplitError.build(
            "LODA cannot find the concept words: the positive prompt carries no token record",
            seen=f"concept words {', '.join(words)} with a positive from a plain CLIP Text Encode",
            expected="a positive from Apply ToVA to Model or ConceptSplit Text Encode",
            fix="encode the positive prompt with ConceptSplit Text Encode (or use Apply ToVA's positive output)")
    requests = [IdentifierRequest(word, word, comfy_hooks.default_word_token_ids(word)) for word in words]
    first_error = None
    for prompt in prompts:  # several positives (ConditioningCombine): the first one holding every word
        try:
            positions = locate_identifier_positions(prompt, requests)
        except ConceptSplitError as error:
            first_error = first_error or error
            continue
        return LodaConcepts(words, tuple(positions), len(prompt.token_ids), tuple(prompt.token_ids))
    raise first_error


def _resolve_dit_concepts(family, prompts: tuple[PromptTokens, ...], words: tuple[str, ...]):
    """LodaConcepts of the concept words on a DiT, located by their decoded pieces in the first recorded positive
    that holds them all, and the token table of what was bound (word -> row, piece)."""
    if not words or not prompts:
        raise ConceptSplitError.build(
            f"LODA on {family.display} needs concept words and a positive with a token record",
            seen=f"concept words {', '.join(words) or '(none)'}; "
                 f"{'no' if not prompts else len(prompts)} recorded positive prompt(s)",
            expected="two or more comma-separated concept words and a positive from ConceptSplit Text Encode",
            fix="type the concept words (e.g. 'dog, cat') and encode the positive with ConceptSplit Text Encode")
    first_error = None
    for prompt in prompts:
        try:
            rows = locate_words_in_pieces(prompt, words)
        except ConceptSplitError as error:
            first_error = first_error or error
            continue
        concepts = LodaConcepts(words, tuple(r[0] for r in rows), len(prompt.token_ids), tuple(prompt.token_ids))
        return concepts, located_table(prompt, words, rows)
    raise first_error


def _check_tova_prompt(objects, prompts: tuple[PromptTokens, ...]) -> None:
    """With empty concept words, the ToVA positions hold only in the prompt Apply ToVA located them in.

    A positive without a token record (plain CLIP Text Encode) is recognised by its text features at the first model
    call by ToVA itself (comfy_hooks.check_prompt_sampled); recorded ones are compared here, before sampling: one of
    them must be that prompt.
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
            "concept_words so LODA finds them in this prompt")


def _located_in(concept, prompt: PromptTokens) -> bool:
    """Whether a ToVA concept's position s_k refers to `prompt`: same recorded tokens (when recorded), same length."""
    ids = tuple(prompt.token_ids)
    recorded = getattr(concept, "prompt_ids", None)
    return (recorded is None or tuple(recorded) == ids) and concept.prompt_length == len(ids)


def sample_loda(model_k, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """k-diffusion sampler function: LODA around `options["inner"]` (a KSAMPLER). Returns the final state x."""
    inner, request = options["inner"], options[OPTION_KEY]
    if request.result is not None:
        request.result.reset()
    extra_args = dict(extra_args or {})
    guider = comfy_sampling.sampling_guider(model_k)
    plan = plan_loda(guider.model_patcher, comfy_sampling.guider_prompts(guider), tuple(x.shape[-2:]), request,
                     len(sigmas) - 1, inner)
    if plan.total_steps == 0:
        _record(request.result, plan, [], None, None, x.shape[0])
        return x
    config = request.config
    layout = (plan.family.layout(guider.model_patcher) if plan.family is not None
              else comfy_hooks.unet_layout(guider.model_patcher))
    collector = MapCollector(plan.concepts, plan.layers)
    fixer = FixingBias(plan.concepts, torch.zeros(0), config, plan.layers)
    options_with = comfy_hooks.with_observers(extra_args.get("model_options", {}), layout, (collector, fixer))
    if plan.fixing and plan.family is None:  # the per-run options may carry patches the MODEL did not
        comfy_sampling.check_fixing_patches(options_with, layout, plan.layers.fixing_keys)
    extra_args["model_options"] = options_with
    mask_branches = (COND,) if config.mask_source == "cond" else (COND, UNCOND)
    updates: list[_Update] = []
    n = plan.stage1_steps
    noise_sampler = None
    if n > 0:
        noise_sampler = comfy_sampling.persistent_noise_sampler(inner, x, sigmas, extra_args.get("seed"))
    maps = None
    gradient_options = comfy_sampling.gradient_pass_options(options_with, guider.conds.get("positive"))
    for i in range(n):
        comfy_sampling.throw_if_interrupted()
        with _gradient_scope(guider, plan, request.gradient_checkpointing):
            x = _stage1_update(model_k, x, sigmas, i, plan, config, collector, gradient_options,
                               extra_args.get("denoise_mask"), updates)
        if i == n - 1:  # masks from the first (main CFG) forward of step N − 1, on the updated latent (spec §4.1)
            collector.start(plan.layers.mask_keys, mask_branches, first_call=True)
        x = comfy_sampling.run_inner_sampler(inner, model_k, x, sigmas[i:i + 2], extra_args, callback, disable, i,
                                             noise_sampler)
        if i == n - 1:
            maps = collector.maps().detach()
            collector.stop()
    if n == 0 and plan.fixing:  # no forward has run yet: take the maps of the initial latent (spec §4.1)
        collector.start(plan.layers.mask_keys, mask_branches, first_call=True)
        with torch.no_grad():
            comfy_sampling.cond_forward(model_k, x, sigmas[0], comfy_sampling.mark_auxiliary_pass(options_with),
                                        negative=UNCOND in mask_branches, prompt_ids=plan.concepts.prompt_ids)
        maps = collector.maps().detach()
        collector.stop()
    masks = None if maps is None else build_concept_masks(maps, config)
    if plan.fixing and masks is not None:
        fixer.activate(masks)
    x = comfy_sampling.run_inner_sampler(inner, model_k, x, sigmas[n:], extra_args, callback, disable, n, noise_sampler)
    fixer.active = False
    _record(request.result, plan, updates, maps, masks, x.shape[0])
    return x


@contextlib.contextmanager
def _gradient_scope(guider, plan: LodaPlan, checkpointing: bool):
    """Autograd on for one stage-1 step, inside ComfyUI's inference mode: the UNet's and ControlNets' weights as
    autograd-usable views and, with `checkpointing`, the UNet's blocks checkpointed except those holding loss
    layers; all restored on exit, also after an interrupt (comfy_autograd)."""
    patcher = guider.model_patcher
    modules = comfy_autograd.unet_and_control_modules(patcher, guider.conds.get("positive"))
    if plan.family is not None:  # a DiT: the family's fixes (eager RoPE, cloned norm inputs), no checkpointing
        with torch.inference_mode(False), torch.enable_grad(), comfy_autograd.AutogradWeights(modules), \
                plan.family.differentiable(patcher):
            yield
        return
    keep = {key[:2] for key in plan.layers.loss_keys}
    with torch.inference_mode(False), torch.enable_grad(), comfy_autograd.AutogradWeights(modules), \
            comfy_autograd.GradientCheckpointing(patcher.model.diffusion_model, checkpointing, keep_blocks=keep):
        yield


@dataclass(frozen=True)
class _Update:
    """One stage-1 update as it ran; `finite` (grad, latent) stays on the device until the report is written, so an
    update costs one host sync (the loss value, which decides whether the backward pass runs)."""

    step: int
    image: int
    iteration: int
    harmonic_mean: float
    loss: float
    eta: float
    outcome: str  # final, or "" when `finite` decides
    finite: Optional[torch.Tensor] = None  # (2,) bool: gradient finite, updated latent finite

    def record(self) -> StepRecord:
        outcome = self.outcome
        if not outcome:
            gradient_ok, latent_ok = self.finite.tolist()
            outcome = ("updated" if gradient_ok and latent_ok else
                       "skipped: non-finite gradient" if not gradient_ok else "skipped: non-finite latent")
        return StepRecord(self.step, self.image, self.iteration, self.harmonic_mean, self.loss, self.eta, outcome)


def _stage1_update(model_k, x, sigmas, i, plan: LodaPlan, config: LodaConfig, collector: MapCollector,
                   model_options, denoise_mask, updates: list) -> torch.Tensor:
    """Stage 1 at step i: per image, a truncated cond-only forward with gradients, the loss, and the k-diffusion
    update x ← x − η_i (1 + σ_i²) ∇_x L replacing the sampler's state (spec §3.3, §3.4). With an inpainting mask
    the pass sees the blended input the sampler's model call sees, so the update is zero outside the mask."""
    eta = step_size(i, plan.total_steps, config)
    images = []
    sigma = sigmas[i].detach().clone()  # () normal tensor (called inside _gradient_scope)
    for b in range(x.shape[0]):
        x_b = x[b:b + 1].detach().clone()  # (1, 4, h, w), batch 1 per image
        for iteration in range(config.inner_iterations):
            comfy_sampling.throw_if_interrupted()
            x_b, update = _one_update(model_k, x_b, sigma, eta, collector, model_options, denoise_mask, b, config,
                                      flow=plan.family is not None)
            updates.append(_Update(i, b, iteration, *update))
        images.append(x_b.detach())
    return torch.cat(images).to(x.dtype)


def _one_update(model_k, x_b, sigma, eta, collector, model_options, denoise_mask, image, config, flow=False):
    x_grad = x_b.detach().requires_grad_(True)
    model_input = comfy_sampling.inpaint_model_input(model_k, x_grad, sigma, denoise_mask, model_options, image)
    collector.start(collector.layers.loss_keys, (COND,), truncate=True)
    try:
        run_truncated(lambda: comfy_sampling.cond_forward(model_k, model_input, sigma, model_options,
                                                          prompt_ids=collector.concepts.prompt_ids))
        concept_maps = collector.maps()[0]  # (K, h, w) in the graph
    finally:
        collector.stop()
    loss, diagnostics = separation_loss(concept_maps, config)
    hm, value = torch.stack([diagnostics.harmonic_mean.float(), diagnostics.loss.float()]).tolist()  # one sync
    if not value > 0:  # L = 0 (or NaN): no update, skip the backward pass
        outcome = "loss 0, no update" if value == 0 else "skipped: non-finite loss"
        return x_b, (hm, value, eta, outcome)
    (grad,) = torch.autograd.grad(loss, x_grad)  # (1, 4, h, w)
    if flow:  # flow matching (CONST): the model sees the state itself (docs/method.md, LODA on DiT models)
        updated = flow_latent_update(x_b.detach(), grad, eta)
    else:
        updated = kdiffusion_latent_update(x_b.detach(), grad, sigma, eta)
    finite = torch.stack([torch.isfinite(grad).all(), torch.isfinite(updated).all()])  # (2,) on the device
    return torch.where(finite.all(), updated, x_b), (hm, value, eta, "", finite)


def _record(result: Optional[LodaResult], plan: LodaPlan, updates, maps, masks, batch: int) -> None:
    if result is None:
        return
    h, w = plan.layers.grid
    k = len(plan.concepts.labels)
    result.masks = masks.cpu() if masks is not None else torch.zeros(batch, k, h, w, dtype=torch.bool)
    # For the viewer's step marks: stage 1 on steps 0 .. N − 1; masks from step N − 1 (or the initial latent, step 0).
    result.maps = ConceptMaps(plan.concepts.labels,
                              maps.float().cpu() if maps is not None else torch.zeros(batch, k, h, w),
                              total_steps=plan.total_steps, stage1_steps=plan.stage1_steps,
                              mask_step=None if masks is None else max(plan.stage1_steps - 1, 0),
                              masks=None if masks is None else result.masks)
    records = [update.record() for update in updates]
    result.report = format_report(records, plan.concepts, plan.stage1_steps, plan.total_steps, masks, plan.fixing)
    if plan.token_table:
        result.report += "\n" + plan.token_table


def record_without_sampling(result: LodaResult, plan: LodaPlan, batch: int) -> None:
    """Fill `result` for a run with nothing to sample (denoise 0): zero maps and masks, as KSampler returns the
    latent unchanged."""
    result.reset()
    _record(result, plan, [], None, None, batch)


def loda_sampler(inner, request: LodaRequest):
    """A SAMPLER running LODA around the SAMPLER `inner` (from KSamplerSelect)."""
    return comfy_sampling.wrapping_ksampler(sample_loda, inner, {"inner": inner, OPTION_KEY: request})
