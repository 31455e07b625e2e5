"""Seam: ComfyUI's sampler, guider, noise and run signatures (integration §4), for LODA and the attention viewer's
run bookkeeping. Node modules call these; conceptsplit_core never sees ComfyUI objects.
"""

from __future__ import annotations

import inspect

import torch

import comfy.extra_samplers.uni_pc as k_diffusion_uni_pc
import comfy.k_diffusion.sampling as k_diffusion_sampling
import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.model_layout import ModelLayout
from ..conceptsplit_core.prompt_tokens import PromptTokens
from .comfy_conditioning import (
    call_chunk_table,
    check_prompt_sampled,
    distinct_prompts,
    encoding_text,
    recorded_prompt_ids,
    with_chunk_table,
    with_prompt_encodings,
)


def check_steps_one_slice(inner) -> None:
    """Raise unless the SAMPLER `inner` denoises when called on one step (two sigmas), as stage 1 calls it.

    ComfyUI's UniPC sets its order to min(3, len(sigmas) − 2), which is 0 for a one-step slice.
    """
    function = getattr(inner.sampler_function, "func", inner.sampler_function)  # functools.partial
    if getattr(function, "__module__", "") == k_diffusion_uni_pc.__name__:
        raise ConceptSplitError.build(
            "LODA stage 1 cannot run with the uni_pc samplers",
            seen=f"sampler {getattr(function, '__name__', function)} (UniPC has order 0 on a one-step slice, "
            "so it would not denoise the stage-1 steps)",
            expected="a sampler that can step one sigma at a time (euler, ddim, dpmpp_2m, heun, ...)",
            fix="pick another sampler, or set loda_steps to 0 to turn stage 1 off (attention fixing still works)",
        )


def inpaint_model_input(
    model_k, x: torch.Tensor, sigma: torch.Tensor, denoise_mask, model_options: dict, image: int
) -> torch.Tensor:
    """KSamplerX0Inpaint's blend of image `image` before a model call: x · mask + known · (1 − mask) (integration §4.1).

    Differentiable w.r.t. x; the known part does not depend on x, so ∇_x is zero where the mask is 0.
    Shapes: x (1, 4, h, w); sigma () or (1,); denoise_mask (B, 1 or 4, h, w) or None (then x is returned).
    """
    if denoise_mask is None:
        return x
    sigma = sigma.reshape(-1)[:1]  # (1,)
    if "denoise_mask_function" in model_options:
        denoise_mask = model_options["denoise_mask_function"](
            sigma, denoise_mask, extra_options={"model": model_k.inner_model, "sigmas": model_k.sigmas}
        )
    pick = slice(image, image + 1) if denoise_mask.shape[0] > 1 else slice(0, 1)
    mask = denoise_mask[pick].to(x).clone()  # (1, c, h, w); a normal tensor, saved for backward
    known = model_k.inner_model.inner_model.scale_latent_inpaint(
        x=x,
        sigma=sigma.to(x),
        noise=model_k.noise[image : image + 1].to(x),
        latent_image=model_k.latent_image[image : image + 1].to(x),
    )
    return x * mask + known * (1.0 - mask)


def sampling_guider(model_k):
    """The guider behind a k-diffusion model function (KSamplerX0Inpaint.inner_model; integration §4.1)."""
    return model_k.inner_model


def sampling_model(model_k):
    """The MODEL (ModelPatcher) being sampled by the k-diffusion model function `model_k`."""
    return sampling_guider(model_k).model_patcher


def latent_pixel_scale(model_patcher) -> int:
    """Image pixels per latent pixel of a MODEL: its latent format's downscale (8 for SD and Flux.1, 16 for
    Flux.2), 8 where the format does not say."""
    latent_format = getattr(getattr(model_patcher, "model", None), "latent_format", None)
    return int(getattr(latent_format, "spacial_downscale_ratio", 8))


def positive_conds(model_k) -> list:
    """The processed positive conds of the run (dicts; convert_cond keeps the CONDITIONING's keys), or []."""
    return sampling_guider(model_k).conds.get("positive", None) or []


def sampled_prompts(model_k) -> tuple[PromptTokens, ...]:
    """Every distinct PromptTokens of the run's processed positive conds."""
    return distinct_prompts(positive_conds(model_k))


def run_model_options(extra_args: dict) -> dict:
    """The per-run model_options of a sampler call (KSAMPLER extra_args; integration §4.1)."""
    return extra_args.get("model_options", {})


def with_run_model_options(extra_args: dict, model_options: dict) -> dict:
    """A copy of the sampler call's extra_args with `model_options` in place of the run's."""
    return {**extra_args, "model_options": model_options}


def cond_forward(
    model_k,
    x: torch.Tensor,
    sigma: torch.Tensor,
    model_options: dict,
    negative: bool = False,
    prompt_ids: tuple | None = None,
):
    """One cond-only model forward through ComfyUI's own batching (SDXL `y`, areas, ToVA; integration §4.3 step 2).

    Differentiable w.r.t. x when grad mode is on; the model input scaling is part of the graph (method §3.4).
    Shapes: x (b, 4, h, w); sigma () or (b,). With `negative`, the negative conds run as well (mask capture).
    With `prompt_ids`, only the positive conditionings recorded with those token ids run when there are any, so
    other positive prompts (ConditioningCombine) cost nothing and never come first in a split batch.
    """
    guider = sampling_guider(model_k)
    positives = guider.conds["positive"]
    if prompt_ids is not None:
        own = [entry for entry in positives if recorded_prompt_ids(entry) == tuple(prompt_ids)]
        positives = own or positives
    conds = [positives]
    if negative and guider.conds.get("negative") is not None:
        conds.append(guider.conds["negative"])
    timestep = sigma.reshape(-1).expand(x.shape[0]) if sigma.dim() <= 1 else sigma
    return comfy.samplers.calc_cond_batch(guider.inner_model, conds, x, timestep, model_options)


def persistent_noise_sampler(inner, x: torch.Tensor, sigmas: torch.Tensor, seed):
    """One noise sampler for the whole run when the inner sampler takes `noise_sampler`, else None (integration §7.10).

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
    return inner.sampler_function(
        model_k, x, sigmas, extra_args=extra_args, callback=shifted, disable=disable, **options
    )


def wrapping_ksampler(function, inner, options: dict):
    """A SAMPLER for SamplerCustom(Advanced) that calls `function(model_k, x, sigmas, ..., **options)`."""
    if not isinstance(inner, comfy.samplers.KSAMPLER):
        raise ConceptSplitError.build(
            "LODA can only wrap k-diffusion samplers",
            seen=f"a {type(inner).__name__} sampler",
            expected="a SAMPLER from KSamplerSelect (euler, dpmpp_2m, heun, ...)",
            fix="connect KSamplerSelect's output to the LODA node",
        )
    return comfy.samplers.KSAMPLER(function, extra_options=options, inpaint_options=dict(inner.inpaint_options))


def named_sampler(sampler_name: str):
    return comfy.samplers.sampler_object(sampler_name)


def throw_if_interrupted() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def ksampler_sigmas(model_patcher, steps: int, sampler_name: str, scheduler: str, denoise: float) -> torch.Tensor:
    """The sigmas the KSampler node would use (denoise < 1 keeps the last steps; integration §4.1)."""
    sampler = comfy.samplers.KSampler(
        model_patcher,
        steps=steps,
        device=model_patcher.load_device,
        sampler=sampler_name,
        scheduler=scheduler,
        denoise=denoise,
        model_options=model_patcher.model_options,
    )
    return sampler.sigmas


def sample_latent_with_sampler(
    model_patcher, seed: int, cfg: float, sampler, sigmas, positive, negative, latent: dict
) -> dict:
    """KSampler's sampling (noise, mask, preview callback) with a custom SAMPLER and sigmas; returns a LATENT."""
    latent_image = comfy.sample.fix_empty_latent_channels(model_patcher, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model_patcher, len(sigmas) - 1)
    samples = comfy.sample.sample_custom(
        model_patcher,
        noise,
        cfg,
        sampler,
        sigmas,
        positive,
        negative,
        latent_image,
        noise_mask=latent.get("noise_mask"),
        callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=seed,
    )
    out = latent.copy()
    out["samples"] = samples
    return out


# --- attention capture for the viewer (issue 4): run and model-call wrappers around the capture observer ---------

CAPTURE_WRAPPER_KEY = "conceptsplit_attention_capture"
# transformer_options key: True on a model call that is not a sampling step (e.g. LODA's no-grad mask pass at σ0
# when stage 1 is off); the viewer's capture skips such calls. Set it with mark_auxiliary_pass.
AUX_PASS_KEY = "conceptsplit_aux_pass"


def mark_auxiliary_pass(model_options: dict) -> dict:
    """A copy of `model_options` whose model calls the attention capture does not count (not a sampling step)."""
    options = dict(model_options)
    options["transformer_options"] = {**options.get("transformer_options", {}), AUX_PASS_KEY: True}
    return options


def install_attention_capture(model_patcher, family, layout: ModelLayout, capture, encodings=()) -> None:
    """Make `model_patcher` (already a clone) report attn2 probabilities to `capture` and tell it each run's bounds.

    `capture` is an attention_capture.AttentionCapture. An OUTER_SAMPLE wrapper (integration §1.4; it chains, and
    clone()
    copies wrapper lists shallowly) calls capture.start_run(sigmas) before the first model call, so a bad step range
    fails before sampling, and capture.finish_run(output latent) after the last. A CALC_COND_BATCH wrapper reads each
    model call's sigma once (one host sync per model call, none per attn2 layer) and brackets the call with
    capture.begin_model_call / end_model_call; at the run's model calls it also checks that a positive being
    sampled is the prompt the words were located in (comfy_conditioning.check_prompt_sampled), recognising an unrecorded
    one by `encodings` (PromptEncodings of Capture Attention's positive input) and the model's.
    """
    options = family.install_observers(model_patcher.model_options, layout, (capture,))
    model_patcher.model_options = with_prompt_encodings(options, encodings)
    model_patcher.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CAPTURE_WRAPPER_KEY, _capture_run_wrapper(capture)
    )
    model_patcher.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, CAPTURE_WRAPPER_KEY, _capture_call_wrapper(capture)
    )


def _capture_run_wrapper(capture):
    # A closure, not a bound method: deepcopy treats functions as atomic (integration §1.1).
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


def _capture_call_wrapper(capture):
    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        # Gradient passes (LODA stage 1) and marked auxiliary passes are not sampling steps: no sigma, no record.
        auxiliary = model_options.get("transformer_options", {}).get(AUX_PASS_KEY, False)
        sigma = None
        request = capture.request
        if capture.running and request.prompt_ids is not None:
            table = call_chunk_table(conds, model_options)
            text = request.prompt_text or encoding_text(model_options, request.prompt_ids)
            check_prompt_sampled(
                conds,
                table,
                request.prompt_ids,
                request.prompt_length,
                text,
                f'The positive prompt being sampled is not the prompt Capture Attention located "{request.labels[0]}" '
                "in",
                source="the positive connected to Capture Attention (for ToVA words: Apply ToVA's positive)",
                fix="connect the same positive conditioning to Capture Attention and to the sampler",
            )
            model_options = with_chunk_table(model_options, table)
        if capture.running and not auxiliary and not torch.is_grad_enabled():
            sigma = float(timestep.reshape(-1)[0])  # timestep (B,) sigmas: the one host sync of this model call
        previous = capture.begin_model_call(sigma)
        try:
            return executor(model, conds, x_in, timestep, model_options)
        finally:
            capture.end_model_call(previous)

    return calc_cond_batch
