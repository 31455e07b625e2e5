""" "Train ToVA Adapter": learn one concept's token-wise value LoRA from a few photos (ConceptSplit, Lim et al.,
ICCV 2025, §3.1 ToVA; recipe in method §2.6). `train_adapter` is the one code path of the node and the CLI trainer.

Images: an IMAGE batch shares one size in ComfyUI (Batch Images resizes the second input to the first); an image list
(newer ComfyUI's Load Image (from Folder)) holds photos of different sizes, and the node declares is_input_list so
the whole list reaches one call (one run), not one call per photo. Every image is resized on its shorter side to the
resolution R (bilinear, antialiased); k = 4 random R×R crops per image (offsets from the seed) are VAE-encoded once,
and each step picks one of them by (seed, step), so the recipe's random crop per sample (method §2.6) is approximated by
k views at k encodes per image and a resume repeats the same picks. Any size and aspect ratio works (a square image
has one crop); the CLI passes photos of different sizes the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import folder_paths
import torch
from comfy_api.latest import io

from ..conceptsplit_core import training as core
from ..conceptsplit_core.adapter_file import AdapterMetadata, read_adapter_file, write_adapter_file
from ..conceptsplit_core.atomic_file import safe_save_name
from ..conceptsplit_core.concepts import ConceptAdapter, make_concept
from ..conceptsplit_core.config import FAMILY_SD21, PREDICTION_V, ROLE_OBJECT, TOVA_FOLDER
from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.loss_curve import render_loss_curve
from ..conceptsplit_core.tova_lora import ToVALoraSet
from ..conceptsplit_core.training_data import (
    TRAIN_DEFAULTS,
    UI_RANGES,
    CropViews,
    TrainConfig,
    crop_views,
    load_prompt_templates,
    templates_hash,
)
from . import comfy_training
from .sockets import ConceptAdapters
from .families import tova_family
from .input_checks import check_number_inputs
from .widgets import number_input

CHECKPOINT_SUFFIX = ".tova-checkpoint"  # not a model extension, so Load ToVA Adapter never lists it


@dataclass(frozen=True)
class TrainingRequest:
    identifier_word: str  # the plain class word, e.g. "dog" (method §2.4)
    config: TrainConfig
    save_name: str  # file name inside the tova folder
    overwrite: bool = False
    resume: bool = False
    role: str = ROLE_OBJECT
    templates: tuple[str, ...] | None = None  # prompt templates; None = the pack's list (method §2.6)
    gradient_checkpointing: bool = False  # recompute UNet block activations in backward: less memory, ~30% slower


@dataclass(frozen=True)
class TrainingOutcome:
    concept: ConceptAdapter  # the saved file as Load ToVA Adapter reads it (strength 1)
    losses: list[float]
    path: Path
    resumed_from: int


def tova_folder() -> Path:
    return Path(folder_paths.get_folder_paths(TOVA_FOLDER)[0])


def train_adapter(
    model,
    clip,
    vae,
    images,
    request: TrainingRequest,
    folder: Path,
    on_step: Callable[[int, int, float], None] | None = None,
) -> TrainingOutcome:
    """Validate everything, encode once, train (method §2.6), save atomically; nothing is written on bad input.

    images: an IMAGE batch (n, H_img, W_img, 3) in 0..1, or a list of such tensors of different sizes.
    Raises: ConceptSplitError (settings, rank, class word, images, save name, NaN loss, foreign checkpoint).
    """
    config = request.config.validate()
    word = request.identifier_word.strip()
    family = tova_family(model)
    layout = family.layout(model)
    sigmas, prediction, sigma_data = family.training_schedule(model)
    # The final, checkpoint and temp names are checked against the file system now, not after the run (issue 11).
    path = safe_save_name(folder, request.save_name, sibling_suffixes=(CHECKPOINT_SUFFIX,))
    if path.exists() and not request.overwrite:
        raise ConceptSplitError.build(
            f'An adapter named "{path.name}" already exists',
            seen=str(path),
            expected="a new save name, or overwrite on",
            fix="change save_name or turn overwrite on",
        )
    shapes = {layer.path: (layer.in_features, layer.out_features) for layer in layout.layers}  # (d, C)
    core.check_rank(config.rank, shapes)
    templates = request.templates or load_prompt_templates()
    prompts = core.template_prompts(templates, word)
    positions = core.identifier_positions(
        [family.prompt_tokens(clip, p) for p in prompts], word, family.word_token_ids(clip, word)
    )
    base_model = layout.family + ("-v" if layout.family == FAMILY_SD21 and prediction == PREDICTION_V else "")
    resolution = config.resolved_resolution(base_model)
    views = crop_views(images, resolution, config.crop_views, config.seed)  # k random crops per image (§2.6)
    mean, std, view_rows = _encode_views(vae, model, views)
    conditionings = [comfy_training.training_conditioning(clip, p, resolution) for p in prompts]
    schedule = core.NoiseSchedule(sigmas, prediction, sigma_data)
    alpha = float(config.resolved_alpha())
    images_print = core.fingerprint(torch.cat([image.flatten() for image in views.resized]))
    record = {
        "word": word,
        "base_model": base_model,
        "layers": len(shapes),
        "images": images_print,
        "templates": templates_hash(templates),
        "resolution": resolution,
        "rank": config.rank,
        "alpha": alpha,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "steps": config.steps,
        "crop_views": config.crop_views,
    }
    folder.mkdir(parents=True, exist_ok=True)
    plan = core.CheckpointPlan(path.with_name(path.stem + CHECKPOINT_SUFFIX), config.checkpoint_every, request.resume)
    autocast = comfy_training.training_autocast_dtype(model)

    def body(denoise):
        # Runs with autograd on and inference mode off: tensors made here can be saved for backward (integration §4.2).
        data = core.TrainingData(mean.clone(), std.clone(), positions, view_rows=view_rows)
        lora = ToVALoraSet(shapes, config.rank, config.alpha, torch.Generator().manual_seed(config.seed))
        result = core.train_tova(
            lora.to(mean.device),
            data,
            schedule,
            denoise,
            config,
            run_record=record,
            checkpoint=plan,
            on_step=on_step,
            autocast_dtype=autocast,
            label=word,
        )
        return lora.state_for_saving(), result

    weights, result = comfy_training.run_training(
        model.clone(),
        family,
        layout,
        conditionings,
        tuple(mean[:1].shape),
        body,
        gradient_checkpointing=request.gradient_checkpointing,
    )
    meta = AdapterMetadata(
        base_model=base_model,
        text_width=layout.text_width,
        rank=config.rank,
        alpha=alpha,
        identifier_word=word,
        role=request.role,
        prediction=prediction,
        layers=len(shapes),
        training={
            "train_steps": config.steps,
            "train_lr": config.learning_rate,
            "train_resolution": resolution,
            "train_batch": config.batch_size,
            "train_images": views.n_images,
            "templates": templates_hash(templates),
        },
    )
    write_adapter_file(path, weights, meta, overwrite=request.overwrite)
    plan.path.unlink(missing_ok=True)  # the run is complete; its checkpoint is no longer needed
    concept = make_concept(read_adapter_file(path), word, 1.0, request.role)
    return TrainingOutcome(concept, result.losses, path, result.resumed_from)


def _encode_views(vae, model, views: CropViews) -> tuple[torch.Tensor, torch.Tensor, tuple[tuple[int, ...], ...]]:
    """VAE posterior of every distinct crop, image by image (one image's crops in memory at a time).

    Returns mean, std (m, 4, R/8, R/8) and, per image, the latent rows of its k crop draws.
    """
    means, stds, view_rows, base = [], [], [], 0
    for index in range(views.n_images):
        crops = views.crops(index)  # (v, 3, R, R) in [-1, 1]
        mean, std = comfy_training.encode_latent_posterior(vae, model, ((crops + 1) / 2).movedim(1, -1))
        means.append(mean)
        stds.append(std)
        view_rows.append(tuple(base + choice for choice in views.choices[index]))
        base += crops.shape[0]
    return torch.cat(means), torch.cat(stds), tuple(view_rows)


def _int_input(name: str, default: int, tooltip: str) -> io.Int.Input:
    return number_input(name, default, UI_RANGES[name], tooltip, integer=True)


class TrainToVAAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptSplitTrainToVA",
            display_name="Train ToVA Adapter",
            category="ConceptSplit/training",
            description="Train one concept's ToVA adapter (a LoRA on every cross-attention value projection, applied "
            "only at the class word's token) from a few photos. ConceptSplit, Lim et al., ICCV 2025.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="SD2.1-768 (v), SD1.5 or SDXL model to train on. It is not changed."),
                io.Clip.Input(
                    "clip",
                    tooltip="The CLIP of the same checkpoint; it encodes the ~200 prompt templates once (frozen).",
                ),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint; it encodes each photo once."),
                io.Image.Input(
                    "images",
                    tooltip="3-20 photos of the concept: an IMAGE batch (Load Training "
                    "Photos) or an image list (Load Image (from Folder)); sizes may "
                    "differ in a list. Each is resized (shorter side to resolution); "
                    "4 random square crops per photo are encoded once and each step "
                    "uses one of them. All photos train one adapter in one run.",
                ),
                io.String.Input(
                    "identifier_word",
                    default="dog",
                    tooltip="The plain class word of the concept (dog, cat, barn). Its first token gets "
                    "the delta, in training and in every later prompt.",
                ),
                _int_input("steps", TRAIN_DEFAULTS.steps, "Optimizer steps, batch 1."),
                number_input(
                    "learning_rate",
                    TRAIN_DEFAULTS.learning_rate,
                    UI_RANGES["learning_rate"],
                    "AdamW learning rate, constant.",
                ),
                _int_input("rank", TRAIN_DEFAULTS.rank, "LoRA rank r of each layer."),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=int(UI_RANGES["seed"].max),
                    control_after_generate=False,
                    tooltip="Seeds the init, crops, order, timesteps and noise: same seed, same adapter.",
                ),
                _int_input("resolution", 0, "Training crop size in pixels."),
                io.String.Input(
                    "save_name",
                    default="my_concept",
                    tooltip="File name in ComfyUI/models/tova (.safetensors is added). No folders.",
                ),
                io.Boolean.Input(
                    "overwrite",
                    default=False,
                    tooltip="Replace an existing adapter with this name. Off: the node refuses.",
                ),
                _int_input(
                    "checkpoint_every",
                    TRAIN_DEFAULTS.checkpoint_every,
                    "Save a resumable checkpoint next to the adapter every N steps.",
                ),
                io.Boolean.Input(
                    "resume",
                    default=False,
                    tooltip="Continue a stopped run from its checkpoint (same images and settings); "
                    "the result equals an uninterrupted run.",
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=False,
                    optional=True,  # old API graphs lack it
                    tooltip="Recompute each UNet block's activations during the backward pass instead "
                    "of keeping them: much less memory (for 1024 px SDXL or small GPUs), about "
                    "a third slower, same adapter. Off by default.",
                ),
            ],
            outputs=[
                ConceptAdapters.Output(
                    display_name="adapters",
                    tooltip="The trained adapter (strength 1, role object): connect to Apply ToVA "
                    "to Model or to Load ToVA Adapter's adapters input.",
                ),
                io.Image.Output(
                    display_name="loss_curve", tooltip="Loss per step (light) and its moving average (dark)."
                ),
            ],
            hidden=[io.Hidden.unique_id],
            is_input_list=True,  # an image list trains one adapter in one call; execute unwraps the other inputs
        )

    @classmethod
    def execute(cls, images, **inputs) -> io.NodeOutput:
        """images: a list of IMAGE batches (n_i, H_i, W_i, 3) or one batch; every other input (model, clip, vae,
        identifier_word, steps, learning_rate, rank, seed, resolution, save_name, overwrite, checkpoint_every,
        resume, gradient_checkpointing) is a one-value list under is_input_list, or the value itself."""
        one = {name: _one_value(name, value) for name, value in inputs.items()}
        check_number_inputs(cls, one)  # steps, learning_rate, rank, seed, resolution, checkpoint_every (issue 11)
        steps = one["steps"]
        config = TrainConfig(
            steps=steps,
            learning_rate=one["learning_rate"],
            rank=one["rank"],
            seed=one["seed"],
            resolution=one["resolution"] or None,
            checkpoint_every=one["checkpoint_every"],
        )
        request = TrainingRequest(
            one["identifier_word"],
            config,
            one["save_name"],
            one["overwrite"],
            one["resume"],
            gradient_checkpointing=one.get("gradient_checkpointing", False),
        )
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        outcome = train_adapter(
            one["model"],
            one["clip"],
            one["vae"],
            images,
            request,
            tova_folder(),
            comfy_training.training_progress(steps, node_id),
        )
        return io.NodeOutput((outcome.concept,), render_loss_curve(outcome.losses))


def _one_value(name: str, value):
    """The single value of an input that ComfyUI passes as a list (is_input_list); a plain value as it is.

    Raises:
        ConceptSplitError: the list holds no value or several (a list output wired to a setting).
    """
    if not isinstance(value, list):
        return value
    if len(value) != 1:
        raise ConceptSplitError.build(
            f"Train ToVA Adapter got {len(value)} values for {name}",
            seen=f"a list of {len(value)} connected to {name}",
            expected="one value for every input except images, which may be a list of photos",
            fix=f"connect a single value to {name}; to train several adapters, use one Train ToVA Adapter per adapter",
        )
    return value[0]
