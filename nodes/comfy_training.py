"""Seam: what ToVA training needs from ComfyUI: the VAE posterior, conditioning with SDXL's size embedding, and a
training run inside ComfyUI's own sampling machinery (integration §4.2, §4.4). The noise schedule, the frozen
model and where the deltas go are the model family's (nodes/families/).
"""

from __future__ import annotations

import torch

import comfy.ldm.models.autoencoder as comfy_autoencoder
import comfy.model_management
import comfy.samplers
import comfy.utils

from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.model_layout import ModelLayout


@torch.no_grad()
def encode_latent_posterior(vae, model_patcher, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior N(mean, std²) of each image, in the model's latent space (× scaling factor, method §2.6).

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
    """CONDITIONING of one training prompt; SDXL's size conditioning says "an R×R image, uncropped" (method §2.6)."""
    size = {
        "width": resolution,
        "height": resolution,
        "crop_w": 0,
        "crop_h": 0,
        "target_width": resolution,
        "target_height": resolution,
    }
    return clip.encode_from_tokens_scheduled(clip.tokenize(text), add_dict=size, show_pbar=False)


def training_autocast_dtype(model_patcher) -> torch.dtype | None:
    """bf16 autocast on a CUDA device that supports it; None (fp32) elsewhere. LoRA master weights stay fp32."""
    device = model_patcher.load_device
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _clone_conditioning(item):
    # Tensors made under the executor's inference mode cannot be saved for backward (integration §4.2): clone inside.
    cond, extras = item
    return [cond.clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in extras.items()}]


class _TrainingSampler(comfy.samplers.Sampler):
    """A SAMPLER that trains instead of sampling (the shape of comfy_extras/nodes_train.py): ComfyUI has loaded
    the model and encoded the conds; `body(denoise)` runs the core training loop with a k-diffusion denoiser."""

    def __init__(self, family, layout: ModelLayout, body, gradient_checkpointing: bool = False):
        self.family = family
        self.layout = layout
        self.body = body
        self.gradient_checkpointing = gradient_checkpointing
        self.result = None

    def sample(
        self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False
    ):
        base = model_wrap.inner_model
        conds = model_wrap.conds["positive"]  # one processed cond per training prompt, in order
        options = extra_args["model_options"]
        keys = {layer.path: layer.key for layer in self.layout.layers}

        def denoise(x, sigma, template_index, deltas):
            # x (1, 4, h, w), sigma (1,) -> denoised x0 (1, 4, h, w); cond-only forward, our processor adds deltas
            run_options = self.family.with_deltas(
                options, self.layout, {keys[path]: (d,) for path, d in deltas.items()}
            )
            return comfy.samplers.calc_cond_batch(base, [[conds[template_index]]], x, sigma, run_options)[0]

        patcher = model_wrap.model_patcher
        with self.family.trainable(patcher, self.gradient_checkpointing):
            self.result = self.body(denoise)
        return torch.zeros_like(latent_image)


def run_training(
    model_patcher,
    family,
    layout: ModelLayout,
    conditionings: list,
    latent_shape: tuple[int, ...],
    body,
    gradient_checkpointing: bool = False,
):
    """Run `body(denoise)` inside ComfyUI's sampling machinery with autograd on; returns what body returns.

    `model_patcher` must be a clone (ComfyUI patches it while loading); `conditionings` holds one CONDITIONING per
    training prompt, in template order. Works inside the executor's inference mode (integration §4.2). With
    `gradient_checkpointing`, the model's blocks are checkpointed for this run only (family.trainable).
    """
    with torch.inference_mode(False), torch.enable_grad():
        positives = []
        for conditioning in conditionings:
            if len(conditioning) != 1:
                raise ConceptSplitError.build(
                    "A training prompt encoded to several conditionings",
                    seen=f"{len(conditioning)} entries",
                    expected="one conditioning per prompt",
                    fix="remove scheduled CLIP hooks from the CLIP input",
                )
            positives.append(_clone_conditioning(conditioning[0]))
        guider = comfy.samplers.CFGGuider(model_patcher)
        guider.set_conds(positives, [])
        guider.set_cfg(1.0)
        sampler = _TrainingSampler(family, layout, body, gradient_checkpointing)
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
