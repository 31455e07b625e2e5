"""The ToVA training loop (method §2.6): one concept's A, B on every attn2.to_v, delta on the identifier row only.

The model is reached through one callable, a k-diffusion style denoiser that the host provides:

    denoise(x, sigma, template_index, deltas) -> x0_hat
        x (1, 4, h, w) = x0 + σ·ε, sigma (1,), template_index selects the prompt's (pre-encoded) conditioning,
        deltas {diffusers path: TokenDelta} are the trainable adapter bound to that prompt's identifier row,
        which the host must apply with `apply_token_value_delta`, the function inference uses.

With σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) of the model's discrete schedule, `(x0_hat − x0) / c_out` is exactly the error of
the raw model output (v̂ − v for v-prediction, c_out = σ·σd/sqrt(σ² + σd²); ε̂ − ε for ε-prediction, c_out = σ),
so the loss below is the spec's MSE against the model's own target (integration §4.4, checked in the tests
against a direct v-MSE). All randomness comes from (seed, step), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .config import PREDICTION_EPS, PREDICTION_V
from .errors import ConceptSplitError
from .prompt_tokens import IdentifierRequest, PromptTokens, locate_identifier_positions
from .token_value_delta import TokenDelta
from .tova_lora import ToVALoraSet, TrainingState, load_training_checkpoint, save_training_checkpoint
from .training_data import TrainConfig, crop_choice, sample_training_noise, training_schedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, int, Mapping[str, TokenDelta]], torch.Tensor]
StepCallback = Callable[[int, int, float], None]  # (steps done, total steps, loss of the last step)
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoiseSchedule:
    """The model's discrete noise schedule and what it predicts (method §2.6 "Timestep", "Target")."""

    sigmas: torch.Tensor  # (1000,) σ_t for t = 0..999, σ_t = sqrt((1 − ᾱ_t)/ᾱ_t)
    prediction: str  # "v" (SD2.1-768) or "eps" (SD1.5, SDXL)
    sigma_data: float = 1.0  # σd of the v-parametrisation (1 for SD2)

    def output_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_out: how much one unit of raw-output error moves the denoised x0 (shape of `sigma`)."""
        if self.prediction == PREDICTION_V:
            return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        if self.prediction == PREDICTION_EPS:
            return sigma
        raise ConceptSplitError.build(
            "ToVA training supports v- and ε-prediction models only",
            seen=f"prediction {self.prediction!r}",
            expected='"v" or "eps"',
            fix="train on an SD1.5, SD2.1 or SDXL checkpoint",
        )


@dataclass(frozen=True)
class TrainingData:
    """Everything encoded once per run (method §2.6, issue 5: VAE once per image, text encoder once per template)."""

    latent_mean: torch.Tensor  # (m, 4, h, w) VAE posterior mean of each encoded crop, already × scaling factor
    latent_std: torch.Tensor  # (m, 4, h, w) VAE posterior std, × scaling factor (zeros = use the mean)
    positions: tuple[int, ...]  # s of each template's prompt (method §2.4 unified rule)
    prompt_length: int = 77  # tokens of one prompt (one 77-token window)
    # per image, the latent rows of its k crop draws (training_data.crop_views; repeats allowed); () = row i is
    # image i's only crop
    view_rows: tuple[tuple[int, ...], ...] = ()

    @property
    def n_images(self) -> int:
        return len(self.view_rows) if self.view_rows else int(self.latent_mean.shape[0])

    def latent_row(self, image_index: int, step: int, seed: int) -> int:
        """The latent row of `image_index` at `step`: one of its k crops, picked by (seed, step) (method §2.6)."""
        if not self.view_rows:
            return image_index
        rows = self.view_rows[image_index]
        return rows[crop_choice(step, seed, len(rows))]


@dataclass(frozen=True)
class StepSample:
    """One training item: the pair of method §2.6 "Pairing", t, ε and the posterior sample x0."""

    image_index: int
    template_index: int
    timestep: torch.Tensor  # (1,) int64, t ~ U{0..999}
    sigma: torch.Tensor  # (1,) σ_t
    x0: torch.Tensor  # (1, 4, h, w) posterior sample × scaling factor
    noise: torch.Tensor  # (1, 4, h, w) ε ~ N(0, I)


@dataclass(frozen=True)
class CheckpointPlan:
    """Where and how often the run saves a resumable checkpoint; `resume` continues from it when it exists."""

    path: Path
    every: int  # steps between checkpoints; 0 = never
    resume: bool = False


@dataclass
class TrainingResult:
    losses: list[float] = field(default_factory=list)  # loss of every step 1..steps (resumed ones included)
    resumed_from: int = 0  # step the run continued from (0 = fresh)


def check_rank(rank: int, layer_shapes: Mapping[str, tuple[int, int]]) -> None:
    """Rank r must not exceed min(d, C) of any layer, or B·A could not be full rank (method §2.5)."""
    limit = min(min(shape) for shape in layer_shapes.values())
    if rank > limit:
        narrow = min(layer_shapes, key=lambda key: min(layer_shapes[key]))
        raise ConceptSplitError.build(
            f"Rank {rank} is larger than this model's layers allow",
            seen=f"layer {narrow} has to_v of (C, d) = {tuple(reversed(layer_shapes[narrow]))}",
            expected=f"a rank of at most {limit} (min of d and C over all layers)",
            fix=f"set rank to {min(64, limit)} (64 is the paper's value)",
        )


def template_prompts(templates: Sequence[str], word: str) -> list[str]:
    """Each template with `{}` replaced by the identifier word (method §2.6; replace, not format, so braces are
    safe)."""
    return [template.replace("{}", word) for template in templates]


def identifier_positions(prompts: Sequence[PromptTokens], word: str, word_ids: tuple[int, ...]) -> tuple[int, ...]:
    """s for every prompt by the inference rule (method §2.4 unified rule): the word's first BPE token."""
    if not word_ids:
        raise ConceptSplitError.build(
            f'The class word "{word}" gives no tokens',
            seen="the tokenizer returned nothing for it",
            expected='a plain class word such as "dog" or "teddy bear"',
            fix="type the concept's class word",
        )
    positions = []
    for prompt in prompts:
        request = IdentifierRequest(label="training template", word=word, word_ids=word_ids)
        positions.extend(locate_identifier_positions(prompt, [request]))
    return tuple(positions)


def fingerprint(tensor: torch.Tensor) -> str:
    """16 hex digits of sha256 over a tensor's fp32 bytes, to tell whether a resume sees the same images."""
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _posterior_noise(step: int, seed: int, shape: Sequence[int]) -> torch.Tensor:
    digest = hashlib.sha256(f"posterior:{seed}:{step}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randn(tuple(shape), generator=generator)  # (1, 4, h, w)


def draw_step(data: TrainingData, schedule: NoiseSchedule, pair: tuple[int, int], step: int, seed: int) -> StepSample:
    """The training item of `step`: x0 ~ N(mean, std²) of the pair's image (its crop for this step), t, ε; on the
    latents' device."""
    image_index, template_index = pair
    row = data.latent_row(image_index, step, seed)  # this step's random crop of the image
    mean = data.latent_mean[row : row + 1]  # (1, 4, h, w)
    std = data.latent_std[row : row + 1]
    timestep, noise = sample_training_noise(step, seed, mean.shape)  # (1,), (1, 4, h, w) on the CPU
    x0 = mean.float() + std.float() * _posterior_noise(step, seed, mean.shape).to(mean.device)  # posterior sample
    sigma = schedule.sigmas.to(mean.device, torch.float32)[timestep.to(mean.device)]  # (1,)
    return StepSample(image_index, template_index, timestep, sigma, x0, noise.to(mean.device))


def step_deltas(lora: ToVALoraSet, position: int, prompt_length: int, label: str) -> dict[str, TokenDelta]:
    """The live (trainable) adapter bound to one prompt's identifier row s, per diffusers path."""
    return {
        key: TokenDelta(lora_a, lora_b, lora.scale, position, prompt_length, label)
        for key, (lora_a, lora_b) in lora.pairs().items()
    }


def step_loss(
    lora: ToVALoraSet,
    data: TrainingData,
    schedule: NoiseSchedule,
    denoise: Denoiser,
    sample: StepSample,
    autocast_dtype: torch.dtype | None = None,
    label: str = "",
) -> torch.Tensor:
    """MSE of the raw model output against its target (method §2.6), differentiable in A and B (needs grad mode on).

    Shapes: x = x0 + σ·ε (1, 4, h, w); returns a scalar fp32 loss, mean over all elements.
    """
    x = sample.x0 + sample.sigma.view(-1, 1, 1, 1) * sample.noise  # (1, 4, h, w)
    deltas = step_deltas(lora, data.positions[sample.template_index], data.prompt_length, label)
    autocast = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with autocast:
        denoised = denoise(x, sample.sigma, sample.template_index, deltas)  # (1, 4, h, w)
    c_out = schedule.output_scale(sample.sigma).view(-1, 1, 1, 1)  # (1, 1, 1, 1)
    return ((denoised.float() - sample.x0) / c_out).pow(2).mean()


def make_optimizer(lora: ToVALoraSet, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW on the fp32 master A, B only (method §2.6: β (0.9, 0.999), weight decay 1e-2, ε 1e-8, constant lr)."""
    return torch.optim.AdamW(
        lora.parameters(),
        lr=config.learning_rate,
        betas=tuple(config.adam_betas),
        weight_decay=config.weight_decay,
        eps=config.adam_eps,
    )


def train_tova(
    lora: ToVALoraSet,
    data: TrainingData,
    schedule: NoiseSchedule,
    denoise: Denoiser,
    config: TrainConfig,
    *,
    run_record: Mapping[str, Any],
    checkpoint: CheckpointPlan | None = None,
    on_step: StepCallback | None = None,
    autocast_dtype: torch.dtype | None = None,
    label: str = "",
) -> TrainingResult:
    """Run method §2.6's loop for `config.steps` steps, batch 1, updating `lora` in place (needs grad mode on).

    Args:
        lora: the adapter, fp32, on the latents' device; only its A, B are optimised.
        run_record: JSON values describing the run (word, model, images, config); a resume must match it.
        checkpoint: saves every `every` steps (atomically); with `resume`, continues from an existing file.
        on_step: called after every step; may raise (ComfyUI's interrupt) to stop the run.
    Raises:
        ConceptSplitError: batch size other than 1, a NaN/Inf loss or gradient (naming the step; the last
        checkpoint is kept), or a checkpoint from another run.
    """
    if config.batch_size != 1:
        raise ConceptSplitError.build(
            "ToVA training runs with batch size 1",
            seen=f"batch_size {config.batch_size}",
            expected="1 (the paper's recipe)",
            fix="set batch_size to 1",
        )
    params = list(lora.parameters())
    optimizer = make_optimizer(lora, config)
    result = TrainingResult()
    if checkpoint is not None and checkpoint.resume and checkpoint.path.is_file():
        state = load_training_checkpoint(checkpoint.path)
        _check_same_run(state.extra, run_record, checkpoint.path)
        if state.step > config.steps:  # the loop would not run and the longer run's weights would be saved as this one
            raise ConceptSplitError.build(
                f'The training checkpoint "{checkpoint.path.name}" is past the end of this run',
                seen=f"checkpoint at step {state.step}, steps = {config.steps}",
                expected=f"steps of at least {state.step} to resume it",
                fix=f"set steps to {state.step} or more, or turn resume off to start again",
            )
        lora.load_pairs(state.lora)
        optimizer.load_state_dict(state.optimizer)
        result.losses, result.resumed_from = list(state.loss_history), state.step
        logger.info("[ConceptSplit] resuming ToVA training from step %d (%s)", state.step, checkpoint.path.name)
    pairs = training_schedule(data.n_images, len(data.positions), config.steps, config.seed)
    for step in range(result.resumed_from, config.steps):
        sample = draw_step(data, schedule, pairs[step], step, config.seed)
        loss = step_loss(lora, data, schedule, denoise, sample, autocast_dtype, label)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise _diverged(step + 1, f"loss {value}", checkpoint)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else math.inf)
        if not torch.isfinite(norm):
            raise _diverged(step + 1, f"gradient norm {float(norm)}", checkpoint)
        optimizer.step()
        result.losses.append(value)
        done = step + 1
        if checkpoint is not None and checkpoint.every and done % checkpoint.every == 0 and done < config.steps:
            state = TrainingState(
                step=done,
                lora=lora.state_for_saving(),
                optimizer=optimizer.state_dict(),
                loss_history=list(result.losses),
                extra=dict(run_record),
            )
            save_training_checkpoint(checkpoint.path, state)
        if on_step is not None:
            on_step(done, config.steps, value)
    return result


def _diverged(step: int, seen: str, checkpoint: CheckpointPlan | None) -> ConceptSplitError:
    kept = (
        f'the last good checkpoint "{checkpoint.path.name}" is kept; resume from it with a lower learning rate'
        if checkpoint is not None and checkpoint.path.is_file()
        else "lower the learning rate and train again"
    )
    return ConceptSplitError.build(
        f"ToVA training diverged at step {step}: the loss is not finite",
        seen=seen,
        expected="a finite loss and gradient",
        fix=kept,
    )


def _check_same_run(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    # steps may grow on resume: the schedule of a longer run starts with the shorter run's items.
    differing = sorted(
        key for key in set(saved) | set(current) if key != "steps" and saved.get(key) != current.get(key)
    )
    if differing:
        shown = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in differing[:4])
        raise ConceptSplitError.build(
            f'The training checkpoint "{path.name}" belongs to a different run',
            seen=shown,
            expected="the same images, class word, model and settings as the stopped run (only steps may change)",
            fix="restore the original settings, or turn resume off to start a new run",
        )
