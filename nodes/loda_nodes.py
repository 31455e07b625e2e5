"""LODA nodes: "LODA Sampler" (KSampler-style, all in one), "ConceptSplit LODA" (a SAMPLER for SamplerCustom) and
"ConceptSplit LODA Results" (ConceptSplit, Lim et al., ICCV 2025, §3.2 LODA: latent optimisation for disentangled
attention, then attention fixing).
"""

from __future__ import annotations

from dataclasses import fields

import torch.nn.functional as F
from comfy_api.latest import io

import comfy.samplers

from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.loda_config import LODA_DEFAULTS, MEANINGS, UI_OPTIONS, UI_RANGES, LodaConfig
from ..conceptsplit_core.concept_words import parse_words
from ..conceptsplit_core.user_masks import MASK_MODE_DEFAULT, MASK_MODES, check_mask_mode, check_mask_values
from .loda_sampling import LodaRequest, LodaResult, loda_sampler, plan_loda, record_without_sampling
from . import comfy_conditioning, comfy_sampling
from .input_checks import check_number_inputs
from .sockets import ConceptMaps, LodaResultType
from .widgets import choice_input, number_input


def loda_setting_inputs() -> list:
    """One widget per LodaConfig field, defaults, ranges and meanings from conceptsplit_core.loda_config."""
    inputs = [
        io.String.Input(
            "concept_words",
            default="",
            tooltip=(
                "Comma-separated object words to separate, e.g. 'dog, cat' (at least 2), found in the positive prompt "
                "as ToVA finds identifier words. Needs a positive from ConceptSplit Text Encode or Apply ToVA. Empty = "
                "the object concepts of the ToVA-patched model."
            ),
        )
    ]
    for field in fields(LodaConfig):  # every field, in declaration order (the frozen input order)
        name = field.name
        meaning = MEANINGS.get(name, "")
        if name in UI_OPTIONS:
            inputs.append(choice_input(name, UI_OPTIONS[name], meaning))
            continue
        default = getattr(LODA_DEFAULTS, name)
        inputs.append(
            number_input(name, default, UI_RANGES[name], meaning, integer=isinstance(default, int), step=False)
        )
    # optional: API-format prompts saved before this input existed still validate (and get the default)
    inputs.append(
        io.Boolean.Input(
            "gradient_checkpointing",
            default=False,
            optional=True,
            tooltip=(
                "Stage 1 only: recompute the UNet's blocks during the backward pass instead of storing their "
                "activations. Lowers the peak memory of the stage-1 steps, costs extra time on those steps; same "
                "result. Turn on when LODA runs out of memory (8 GB cards, SDXL at 1024 px). Default off."
            ),
        )
    )
    inputs.append(
        io.Mask.Input(
            "concept_masks",
            optional=True,
            tooltip=(
                "Masks you draw, one per concept word in concept_words order (a MASK batch: Batch Masks, or one "
                "per image and concept, image-major, like this node's concept_masks output), any size with the "
                "image's aspect ratio. They replace or constrain the masks LODA finds (mask_mode), for attention "
                "fixing and bound LoRAs alike. Unconnected: LODA's own masks."
            ),
        )
    )
    inputs.append(
        io.Combo.Input(
            "mask_mode",
            options=list(MASK_MODES),
            default=MASK_MODE_DEFAULT,
            optional=True,
            tooltip=(
                "Only with concept_masks connected. replace: the drawn masks are the masks (from step N; from step "
                "0 with loda_steps 0). constrain: LODA's masks, but only inside the drawn ones. Default replace."
            ),
        )
    )
    return inputs


def loda_request(concept_words: str, settings: dict, result: LodaResult) -> LodaRequest:
    checkpointing = bool(settings.pop("gradient_checkpointing", False))
    concept_masks = settings.pop("concept_masks", None)
    mask_mode = check_mask_mode(settings.pop("mask_mode", None) or MASK_MODE_DEFAULT)
    config = LodaConfig(**settings)
    config.validate()
    return LodaRequest(
        config=config,
        words=parse_words(concept_words),
        result=result,
        gradient_checkpointing=checkpointing,
        concept_masks=None if concept_masks is None else check_mask_values(concept_masks),
        mask_mode=mask_mode,
    )


def result_outputs(result: LodaResult, latent_hw: tuple[int, int]):
    """MASK (B·K, H_img, W_img), image-major then concept order, and the maps and report of `result`."""
    masks = result.masks.float()  # (B, K, h, w)
    size = (latent_hw[0] * result.pixel_scale, latent_hw[1] * result.pixel_scale)  # the decoded image's
    image_masks = F.interpolate(masks, size=size, mode="nearest").flatten(0, 1)  # (B·K, H_img, W_img)
    return image_masks, result.maps, result.report


_OUTPUTS = [
    io.Mask.Output(
        display_name="concept_masks",
        tooltip="Stage-2 masks, one per image and concept "
        "(image-major, concept order), at image size. Zeros when no mask was built.",
    ),
    ConceptMaps.Output(
        display_name="concept_maps",
        tooltip="Each concept's attention map at step N (map "
        "level, latent/4), per image, for the ConceptSplit attention viewer.",
    ),
    io.String.Output(
        display_name="report", tooltip="Per step: harmonic-mean KL, loss and step size; skipped updates; mask sizes."
    ),
]


class LodaSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptSplitLodaSampler",
            display_name="LODA Sampler",
            category="ConceptSplit/sampling",
            description="KSampler with LODA: separates the concepts' cross-attention during the first steps, then "
            "fixes each concept to its region. ConceptSplit, Lim et al., ICCV 2025.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.5, SD2.1 or SDXL model, with or without Apply ToVA."),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Noise seed, as in KSampler.",
                ),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="Sampling steps S (paper: 50)."),
                io.Float.Input(
                    "cfg",
                    default=7.5,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance scale (paper: 7.5).",
                ),
                io.Combo.Input(
                    "sampler_name",
                    options=comfy.samplers.KSampler.SAMPLERS,
                    tooltip="Any k-diffusion sampler (paper: ddim).",
                ),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="Noise schedule."),
                io.Conditioning.Input(
                    "positive",
                    tooltip="From ConceptSplit Text Encode or Apply ToVA, so the concept words can be located.",
                ),
                io.Conditioning.Input("negative", tooltip="Negative prompt."),
                io.Latent.Input(
                    "latent_image",
                    tooltip="Latent to denoise; maps at latent/4 must be at least 7×7 "
                    "(at least 224 px for SD1.5/SD2.1).",
                ),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="As in KSampler; LODA counts the steps that actually run.",
                ),
                *loda_setting_inputs(),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The sampled latent."), *_OUTPUTS],
        )

    @classmethod
    def execute(
        cls,
        model,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent_image,
        denoise,
        concept_words,
        **settings,
    ) -> io.NodeOutput:
        check_number_inputs(cls, dict(settings, seed=seed, steps=steps, cfg=cfg, denoise=denoise))
        result = LodaResult()
        request = loda_request(concept_words, settings, result)
        sigmas = comfy_sampling.ksampler_sigmas(model, steps, sampler_name, scheduler, denoise)
        latent_hw = tuple(latent_image["samples"].shape[-2:])
        sampler = comfy_sampling.named_sampler(sampler_name)
        total_steps = max(len(sigmas) - 1, 0)  # denoise 0 gives no sigmas: KSampler returns the latent unchanged
        plan = plan_loda(
            model,
            comfy_conditioning.conditioning_prompts(positive),
            latent_hw,
            request,
            total_steps,
            sampler,
            batch=latent_image["samples"].shape[0],
        )
        if total_steps == 0:
            record_without_sampling(
                result, plan, latent_image["samples"].shape[0], comfy_sampling.latent_pixel_scale(model)
            )
            return io.NodeOutput(latent_image.copy(), *result_outputs(result, latent_hw))
        latent = comfy_sampling.sample_latent_with_sampler(
            model, seed, cfg, loda_sampler(sampler, request, plan), sigmas, positive, negative, latent_image
        )
        return io.NodeOutput(latent, *result_outputs(result, latent_hw))


class LodaSamplerSelect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptSplitLoda",
            display_name="ConceptSplit LODA",
            category="ConceptSplit/sampling",
            description="Wrap a sampler with LODA for SamplerCustom / SamplerCustomAdvanced. ConceptSplit, Lim et "
            "al., ICCV 2025.",
            inputs=[
                io.Sampler.Input("sampler", tooltip="The sampler to wrap, from KSamplerSelect."),
                *loda_setting_inputs(),
            ],
            outputs=[
                io.Sampler.Output(display_name="SAMPLER", tooltip="Connect to SamplerCustom(Advanced)."),
                LodaResultType.Output(
                    display_name="loda_result",
                    tooltip="Masks, maps and report of this "
                    "sampler's LAST run (one holder per node, overwritten by each run); "
                    "read them with ConceptSplit LODA Results.",
                ),
            ],
        )

    @classmethod
    def execute(cls, sampler, concept_words, **settings) -> io.NodeOutput:
        check_number_inputs(cls, settings)
        result = LodaResult()
        return io.NodeOutput(loda_sampler(sampler, loda_request(concept_words, settings, result)), result)


class LodaResults(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptSplitLodaResults",
            display_name="ConceptSplit LODA Results",
            category="ConceptSplit/sampling",
            description="The masks, maps and report of a ConceptSplit LODA sampler run. ConceptSplit, ICCV 2025.",
            inputs=[
                io.Latent.Input("latent", tooltip="The sampler's output, so this node runs after sampling."),
                LodaResultType.Input(
                    "loda_result",
                    tooltip="From ConceptSplit LODA. It reflects that sampler's "
                    "last run: connect the latent of that run so this node runs after it.",
                ),
            ],
            outputs=list(_OUTPUTS),
        )

    @classmethod
    def execute(cls, latent, loda_result) -> io.NodeOutput:
        if loda_result.masks is None:
            raise ConceptSplitError.build(
                "The LODA sampler has not run yet",
                seen="no result recorded",
                expected="the LATENT of the SamplerCustom that used this ConceptSplit LODA sampler",
                fix="connect that sampler's output latent to this node",
            )
        return io.NodeOutput(*result_outputs(loda_result, tuple(latent["samples"].shape[-2:])))
