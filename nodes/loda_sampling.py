"""The LODA SAMPLER function: stage 1 step by step around any k-diffusion sampler, then stage 2 in one call
(method §3.3, §3.4, §4; integration §4.3). ComfyUI objects are read through the seam (`comfy_sampling`,
`comfy_conditioning`) and the model's family (`families`); the plan is core's (loda.plan_loda_run).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..conceptsplit_core.attention_record import ConceptMaps
from ..conceptsplit_core.bound_lora import ConceptRegions
from ..conceptsplit_core.concept_words import loda_words
from ..conceptsplit_core.config import PREDICTION_FLOW
from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.loda import (
    COND,
    UNCOND,
    FixingBias,
    LodaPlan,
    MapCollector,
    StepRecord,
    build_concept_masks,
    format_report,
    loda_stage1_steps,
    plan_loda_run,
    run_truncated,
)
from ..conceptsplit_core.loda_config import LodaConfig
from ..conceptsplit_core.loda_loss import flow_latent_update, kdiffusion_latent_update, separation_loss, step_size
from ..conceptsplit_core.prompt_tokens import PromptTokens
from ..conceptsplit_core.user_masks import MASK_MODE_DEFAULT, combine, prepare_user_masks
from . import comfy_conditioning, comfy_lora, comfy_sampling
from .families import family_of_layout, model_family

OPTION_KEY = "conceptsplit_loda"  # KSAMPLER extra_options key holding the LodaRequest
PLAN_KEY = "conceptsplit_loda_plan"  # KSAMPLER extra_options key: the LodaPlan made before sampling (or None)


@dataclass(frozen=True)
class LodaRequest:
    """What the user asked for; resolved against the model, prompt and latent when sampling starts."""

    config: LodaConfig  # config.loda_steps: -1 auto, 0 stage 1 off, N >= 1
    words: tuple[str, ...] = ()  # concept words; empty = the object concepts of the ToVA-patched model
    result: Optional["LodaResult"] = None  # filled after sampling (masks, maps, report)
    gradient_checkpointing: bool = False  # recompute UNet blocks in the stage-1 backward instead of storing them
    concept_masks: Optional[torch.Tensor] = None  # (M, H, W) float: masks the user drew (user_masks), or None
    mask_mode: str = MASK_MODE_DEFAULT  # replace or constrain (user_masks.MASK_MODES)


class LodaResult:
    """Mutable holder of the masks, maps and report of the LAST run of one LODA sampler (shared by reference,
    never deep-copied; reset when a run starts, so a failed run leaves nothing stale)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.masks: Optional[torch.Tensor] = None  # (B_img, K, h, w) bool
        self.maps: Optional[ConceptMaps] = None
        self.report = ""
        self.pixel_scale = 8  # image pixels per latent pixel of the run's model (Flux.2: 16)

    def __deepcopy__(self, memo):
        return self


def plan_loda(
    model_patcher,
    prompts: Sequence[PromptTokens],
    latent_hw: tuple[int, int],
    request: LodaRequest,
    total_steps: int,
    inner=None,
    batch: int = 1,
) -> LodaPlan:
    """Check every input and resolve concepts, layers and N before any sampling step (method §5); once per
    run (the LODA Sampler node plans before sampling and hands the plan to the sampler).

    Args:
        prompts: tokens of each recorded positive prompt being sampled (several after ConditioningCombine; none
            when no prompt carries a record). The concepts are located in the first that holds them all.
        total_steps: S; 0 plans a run with nothing to sample (denoise 0).
        inner: the wrapped SAMPLER, when known: checked to step one slice at a time if N > 0.
        batch: images in the latent batch (the drawn concept masks are K or B·K).
    Raises: ConceptSplitError for a bad setting, fewer than 2 concepts, a word not in the prompt, ToVA concepts
        located in another prompt, N > S, a sampler that cannot run stage 1, a model without the map-level layers,
        maps smaller than the smoothing kernel, fixing through another pack's attention patch, or drawn concept
        masks of another count or aspect ratio, or too small to cover a latent pixel (user_masks).
    """
    config = request.config
    stage1_steps = loda_stage1_steps(config, total_steps)
    if inner is not None and stage1_steps > 0:
        comfy_sampling.check_steps_one_slice(inner)
    family = model_family(model_patcher)
    if request.gradient_checkpointing and not family.supports_checkpointing:
        raise ConceptSplitError.build(
            f"Gradient checkpointing is not available for {family.display} yet",
            seen=f"gradient_checkpointing on with a {family.display} model",
            expected="gradient_checkpointing off (the stage-1 pass already stops after the last map layer)",
            fix="turn gradient_checkpointing off",
        )
    layout = family.layout(model_patcher)
    words = loda_words(
        request.words, tuple(prompts), comfy_conditioning.located_concepts(model_patcher), family.default_word_token_ids
    )
    plan = plan_loda_run(config, layout, words, latent_hw, total_steps, stage1_steps)
    if request.concept_masks is not None:
        drawn = prepare_user_masks(request.concept_masks, plan.concepts.labels, batch, latent_hw, layout.latent_scale)
        plan = replace(plan, drawn_masks=drawn, mask_mode=request.mask_mode)
    if plan.fixing:
        family.check_fixing_patches(model_patcher.model_options, layout, plan.layers.fixing_keys)
    return plan


def sample_loda(model_k, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """k-diffusion sampler function: LODA around `options["inner"]` (a KSAMPLER). Returns the final state x."""
    inner, request = options["inner"], options[OPTION_KEY]
    if request.result is not None:
        request.result.reset()
    extra_args = dict(extra_args or {})
    patcher = comfy_sampling.sampling_model(model_k)
    if request.result is not None:
        request.result.pixel_scale = comfy_sampling.latent_pixel_scale(patcher)
    plan = options.get(PLAN_KEY)
    if plan is None:
        plan = plan_loda(
            patcher,
            comfy_sampling.sampled_prompts(model_k),
            tuple(x.shape[-2:]),
            request,
            len(sigmas) - 1,
            inner,
            batch=x.shape[0],
        )
    if plan.total_steps == 0:
        _record(request.result, plan, [], None, None, x.shape[0])
        return x
    config = request.config
    layout = plan.layout
    family = family_of_layout(layout)
    collector = MapCollector(plan.concepts, plan.layers)
    fixer = FixingBias(plan.concepts, torch.zeros(0), config, plan.layers)
    options_with = family.install_observers(comfy_sampling.run_model_options(extra_args), layout, (collector, fixer))
    options_with = _publish_regions(options_with, plan, None, request.gradient_checkpointing)  # bound LoRAs
    if plan.fixing:  # the per-run options may carry patches the MODEL did not (wrappers, hooks)
        family.check_fixing_patches(options_with, layout, plan.layers.fixing_keys)
    extra_args = comfy_sampling.with_run_model_options(extra_args, options_with)
    mask_branches = (COND,) if config.mask_source == "cond" else (COND, UNCOND)
    updates: list[_Update] = []
    n = plan.stage1_steps
    noise_sampler = None
    if n > 0:
        noise_sampler = comfy_sampling.persistent_noise_sampler(inner, x, sigmas, extra_args.get("seed"))
    maps = None
    positives = comfy_sampling.positive_conds(model_k)
    gradient_options = family.gradient_pass_options(options_with, positives)
    for i in range(n):
        comfy_sampling.throw_if_interrupted()
        with family.differentiable(patcher, positives, request.gradient_checkpointing, plan.layers.loss_keys):
            x = _stage1_update(
                model_k,
                x,
                sigmas,
                i,
                plan,
                config,
                collector,
                gradient_options,
                extra_args.get("denoise_mask"),
                updates,
            )
        if i == n - 1:  # masks from the first (main CFG) forward of step N − 1, on the updated latent (method §4.1)
            collector.start(plan.layers.mask_keys, mask_branches, first_call=True)
        x = comfy_sampling.run_inner_sampler(
            inner, model_k, x, sigmas[i : i + 2], extra_args, callback, disable, i, noise_sampler
        )
        if i == n - 1:
            maps = collector.maps().detach()
            collector.stop()
    if n == 0 and plan.fixing and not _replaced(plan):  # no forward yet: the maps of the initial latent (method §4.1)
        collector.start(plan.layers.mask_keys, mask_branches, first_call=True)
        with torch.no_grad():
            comfy_sampling.cond_forward(
                model_k,
                x,
                sigmas[0],
                comfy_sampling.mark_auxiliary_pass(options_with),
                negative=UNCOND in mask_branches,
                prompt_ids=plan.concepts.prompt_ids,
            )
        maps = collector.maps().detach()
        collector.stop()
    masks = None if maps is None else build_concept_masks(maps, config)
    if plan.drawn_masks is not None:  # the user's masks replace or constrain LODA's (user_masks)
        masks = combine(masks, plan.drawn_masks.to(x.device), plan.mask_mode, plan.concepts.labels)
    if masks is not None:  # bound LoRAs: stage 2 sees the masks (nodes/comfy_lora.py)
        extra_args = comfy_sampling.with_run_model_options(
            extra_args, _publish_regions(options_with, plan, masks, request.gradient_checkpointing)
        )
    if plan.fixing and masks is not None:
        fixer.activate(masks)
    x = comfy_sampling.run_inner_sampler(inner, model_k, x, sigmas[n:], extra_args, callback, disable, n, noise_sampler)
    fixer.active = False
    _record(request.result, plan, updates, maps, masks, x.shape[0])
    return x


def _replaced(plan: LodaPlan) -> bool:
    """Whether the run's masks are the drawn ones (known before sampling: no forward is needed to find them)."""
    return plan.drawn_masks is not None and plan.mask_mode == "replace"


def _publish_regions(model_options: dict, plan: LodaPlan, masks, checkpointing: bool) -> dict:
    """Bound LoRAs (issue 13) read LODA's concepts and, from stage 2 on, its masks (B_img, K, h, w) from the
    model options of each call; a copy per run, so no run sees another's masks."""
    concepts = plan.concepts
    coming = plan.stage1_steps < plan.total_steps and (plan.stage1_steps > 0 or plan.fixing or _replaced(plan))
    regions = ConceptRegions(
        concepts.labels, concepts.positions, concepts.prompt_length, concepts.prompt_ids, masks, checkpointing, coming
    )
    return comfy_lora.with_concept_regions(model_options, regions)


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
            outcome = (
                "updated"
                if gradient_ok and latent_ok
                else "skipped: non-finite gradient"
                if not gradient_ok
                else "skipped: non-finite latent"
            )
        return StepRecord(self.step, self.image, self.iteration, self.harmonic_mean, self.loss, self.eta, outcome)


def _stage1_update(
    model_k,
    x,
    sigmas,
    i,
    plan: LodaPlan,
    config: LodaConfig,
    collector: MapCollector,
    model_options,
    denoise_mask,
    updates: list,
) -> torch.Tensor:
    """Stage 1 at step i: per image, a truncated cond-only forward with gradients, the loss, and the k-diffusion
    update x ← x − η_i (1 + σ_i²) ∇_x L (flow matching: x ← x − η_i ∇_x L) replacing the sampler's state (method §3.3,
    §3.4). With an inpainting mask the pass sees the blended input the sampler's model call sees, so the update is
    zero outside the mask."""
    eta = step_size(i, plan.total_steps, config)
    images = []
    sigma = sigmas[i].detach().clone()  # () normal tensor (called inside _gradient_scope)
    for b in range(x.shape[0]):
        x_b = x[b : b + 1].detach().clone()  # (1, 4, h, w), batch 1 per image
        for iteration in range(config.inner_iterations):
            comfy_sampling.throw_if_interrupted()
            x_b, update = _one_update(
                model_k, x_b, sigma, eta, collector, model_options, denoise_mask, b, config, plan.layout.prediction
            )
            updates.append(_Update(i, b, iteration, *update))
        images.append(x_b.detach())
    return torch.cat(images).to(x.dtype)


def _one_update(model_k, x_b, sigma, eta, collector, model_options, denoise_mask, image, config, prediction):
    x_grad = x_b.detach().requires_grad_(True)
    model_input = comfy_sampling.inpaint_model_input(model_k, x_grad, sigma, denoise_mask, model_options, image)
    collector.start(collector.layers.loss_keys, (COND,), truncate=True)
    try:
        run_truncated(
            lambda: comfy_sampling.cond_forward(
                model_k, model_input, sigma, model_options, prompt_ids=collector.concepts.prompt_ids
            )
        )
        concept_maps = collector.maps()[0]  # (K, h, w) in the graph
    finally:
        collector.stop()
    loss, diagnostics = separation_loss(concept_maps, config)
    hm, value = torch.stack([diagnostics.harmonic_mean.float(), diagnostics.loss.float()]).tolist()  # one sync
    if not value > 0:  # L = 0 (or NaN): no update, skip the backward pass
        outcome = "loss 0, no update" if value == 0 else "skipped: non-finite loss"
        return x_b, (hm, value, eta, outcome)
    (grad,) = torch.autograd.grad(loss, x_grad)  # (1, 4, h, w)
    if prediction == PREDICTION_FLOW:  # the model sees the state itself (docs/method.md, LODA on DiT models)
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
    # the viewer reads masks and maps on one grid: drawn masks (latent grid) as the map-level layers see them
    map_masks = result.masks
    if tuple(map_masks.shape[-2:]) != (h, w):
        map_masks = F.interpolate(map_masks.float(), size=(h, w), mode="nearest") > 0.5  # (B, K, h, w)
    # For the viewer's step marks: stage 1 on steps 0 .. N − 1; masks from step N − 1 (or the initial latent, step 0).
    result.maps = ConceptMaps(
        plan.concepts.labels,
        maps.float().cpu() if maps is not None else torch.zeros(batch, k, h, w),
        total_steps=plan.total_steps,
        stage1_steps=plan.stage1_steps,
        mask_step=None if masks is None else max(plan.stage1_steps - 1, 0),
        masks=None if masks is None else map_masks,
    )
    records = [update.record() for update in updates]
    result.report = format_report(records, plan.concepts, plan.stage1_steps, plan.total_steps, masks, plan.fixing)
    if plan.drawn_masks is not None and plan.total_steps:
        result.report += (
            "\n"
            + (
                "concept masks: the drawn masks (mask_mode replace)"
                if plan.mask_mode == "replace"
                else "concept masks: LODA's masks inside the drawn masks (mask_mode constrain)"
            )
            + f", at the latent grid {plan.drawn_masks.shape[-2]}×{plan.drawn_masks.shape[-1]}"
        )
    if plan.token_table:
        result.report += "\n" + plan.token_table


def record_without_sampling(result: LodaResult, plan: LodaPlan, batch: int, pixel_scale: int = 8) -> None:
    """Fill `result` for a run with nothing to sample (denoise 0): zero maps and masks, as KSampler returns the
    latent unchanged."""
    result.reset()
    result.pixel_scale = pixel_scale
    _record(result, plan, [], None, None, batch)


def loda_sampler(inner, request: LodaRequest, plan: Optional[LodaPlan] = None):
    """A SAMPLER running LODA around the SAMPLER `inner` (from KSamplerSelect); with `plan` (made by the caller for
    this run's model, prompts, latent and steps), sampling uses it instead of planning again."""
    return comfy_sampling.wrapping_ksampler(sample_loda, inner, {"inner": inner, OPTION_KEY: request, PLAN_KEY: plan})
