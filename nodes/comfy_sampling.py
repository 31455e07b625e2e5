"""Seam, part 2: ComfyUI's sampler, guider, noise and gradient-pass signatures (comfyui-notes §4), for LODA and the
attention viewer's run bookkeeping. Node modules call these; conceptsplit_core never sees ComfyUI objects.
"""

from __future__ import annotations

import inspect

import torch

import comfy.k_diffusion.sampling as k_diffusion_sampling
import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.sd1_clip
import comfy.supported_models
import comfy.utils
import latent_preview

from ..conceptsplit_core.adapter_layers import UNetLayout
from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.prompt_tokens import PromptTokens

from .comfy_hooks import PROMPT_TOKENS_KEY, with_observers


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


