"""Seam, part 3: what ToVA training needs from ComfyUI: the noise schedule, the VAE posterior, conditioning with SDXL's
size embedding, and autograd inside ComfyUI's own sampling machinery (comfyui-notes §4.2, §4.4).
"""

from __future__ import annotations

import torch

import comfy.ldm.models.autoencoder as comfy_autoencoder
import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.sd1_clip
import comfy.supported_models
import comfy.utils

from ..conceptsplit_core.adapter_layers import UNetLayout
from ..conceptsplit_core.config import PREDICTION_EPS, PREDICTION_V
from ..conceptsplit_core.errors import ConceptSplitError

from .comfy_autograd import AutogradWeights, GradientCheckpointing
from .comfy_hooks import with_processors


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
    afterwards; its inference-tensor weights are autograd-usable views for the run (comfy_autograd)."""

    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.weights = AutogradWeights([model_patcher.model.diffusion_model])
        self.flags: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self):
        self.weights.__enter__()
        for param in self.model_patcher.model.diffusion_model.parameters():
            self.flags.append((param, param.requires_grad))
            param.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for param, flag in self.flags:
            param.requires_grad_(flag)
        self.flags.clear()
        self.weights.__exit__(*exc)


class _TrainingSampler(comfy.samplers.Sampler):
    """A SAMPLER that trains instead of sampling (the shape of comfy_extras/nodes_train.py): ComfyUI has loaded
    the model and encoded the conds; `body(denoise)` runs the core training loop with a k-diffusion denoiser."""

    def __init__(self, layout: UNetLayout, body, gradient_checkpointing: bool = False):
        self.layout = layout
        self.body = body
        self.gradient_checkpointing = gradient_checkpointing
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

        patcher = model_wrap.model_patcher
        with _FrozenUNet(patcher), GradientCheckpointing(patcher.model.diffusion_model, self.gradient_checkpointing):
            self.result = self.body(denoise)
        return torch.zeros_like(latent_image)


def run_training(model_patcher, layout: UNetLayout, conditionings: list, latent_shape: tuple[int, ...], body,
                 gradient_checkpointing: bool = False):
    """Run `body(denoise)` inside ComfyUI's sampling machinery with autograd on; returns what body returns.

    `model_patcher` must be a clone (ComfyUI patches it while loading); `conditionings` holds one CONDITIONING per
    training prompt, in template order. Works inside the executor's inference mode (notes §4.2). With
    `gradient_checkpointing`, the UNet's ResBlock / SpatialTransformer forwards are checkpointed for this run only.
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
        sampler = _TrainingSampler(layout, body, gradient_checkpointing)
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
