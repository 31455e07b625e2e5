"""ToVA training data: prompt templates, the training config, image preprocessing and the seeded schedule (method §2.6).

Everything random here is derived from `(seed, step)` or `seed` alone, never from a running generator that a resume
would have to restore, so a run resumed at step k draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .config import FAMILY_SD15, FAMILY_SD21, FAMILY_SDXL
from .errors import ConceptSplitError
from .number_checks import check_number
from .widgets import WidgetRange

TEMPLATES_PATH = Path(__file__).parent / "data" / "prompt_templates.txt"
NUM_TRAIN_TIMESTEPS = 1000  # t ~ U{0..999} (method §2.6)

# Training resolution R per family (method §2.6, §8 #10): 768 for SD2.1-v, 1024 for SDXL, 512 for SD1.5.
_DEFAULT_RESOLUTION = {FAMILY_SD21: 768, FAMILY_SDXL: 1024, FAMILY_SD15: 512}


def load_prompt_templates(path: str | Path | None = None) -> tuple[str, ...]:
    """Read the pack's prompt templates (method §2.6 "prompt regularisation"), one per line, `{}` = identifier word.

    Args:
        path: a custom template file; None reads `data/prompt_templates.txt` next to this module.

    Raises:
        ConceptSplitError: the file is missing, empty, or a line does not hold exactly one `{}` and no other braces.
    """
    source = Path(path) if path is not None else TEMPLATES_PATH
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as err:
        raise ConceptSplitError.build(
            f'Cannot read the prompt template file "{source.name}"',
            seen=f"{type(err).__name__}: {err}",
            expected="a UTF-8 text file with one template per line",
            fix="reinstall the pack or point to an existing template file",
        ) from err
    templates = []
    for line_number, raw in enumerate(text.splitlines(), start=1):
        template = raw.strip()
        if not template:
            continue
        if template.count("{}") != 1 or template.count("{") != 1 or template.count("}") != 1:
            raise ConceptSplitError.build(
                f'Prompt template line {line_number} of "{source.name}" is malformed',
                seen=repr(template),
                expected='exactly one "{}" where the identifier word goes and no other braces',
                fix='write the line like "a watercolor painting of a {}"',
            )
        templates.append(template)
    if not templates:
        raise ConceptSplitError.build(
            f'The prompt template file "{source.name}" has no templates',
            seen="an empty file",
            expected="about 200 lines, each with one {}",
            fix="add templates or use the pack's default file",
        )
    return tuple(templates)


def templates_hash(templates: Sequence[str]) -> str:
    """Short fingerprint of a template list for adapter metadata `conceptsplit.templates` (method §2.7).

    Returns:
        The first 16 hex digits of sha256 over the templates joined by newlines.
    """
    return hashlib.sha256("\n".join(templates).encode("utf-8")).hexdigest()[:16]


def default_resolution(base_model: str) -> int:
    """Training resolution R for a model family (method §2.6): `sd2.1-v`/`sd2.1` 768, `sdxl` 1024, `sd1.5` 512.

    Raises:
        ConceptSplitError: unknown family name.
    """
    family = base_model.strip().lower().removesuffix("-v")
    if family not in _DEFAULT_RESOLUTION:
        raise ConceptSplitError.build(
            f'Unknown base model "{base_model}" for ToVA training',
            seen=repr(base_model),
            expected="one of sd2.1-v, sdxl, sd1.5",
            fix="train on an SD2.1, SDXL or SD1.5 checkpoint",
        )
    return _DEFAULT_RESOLUTION[family]


@dataclass(frozen=True)
class TrainConfig:
    """ToVA training hyper-parameters; defaults are the paper's recipe (method §2.5, §2.6, §6)."""

    steps: int = 300  # optimizer steps, batch 1 (paper: 300, about 1.5 epochs of 199 templates); sane 100..2000
    learning_rate: float = 1e-4  # AdamW lr, constant, no warm-up (paper; official code default 5e-4); 1e-5..1e-3
    rank: int = 64  # LoRA rank r of A (r, d) and B (C, r) (paper; script default 32); 4..128
    alpha: float | None = None  # LoRA alpha; None = rank, so scale alpha/r = 1 as in the official code (§2.5)
    batch_size: int = 1  # images per step (paper: 1); each row uses its own token position (§2.6)
    grad_clip: float = 1.0  # global gradient-norm clip over all A, B (code); 0 disables clipping
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW β1, β2 (code)
    weight_decay: float = 1e-2  # AdamW decoupled weight decay (code)
    adam_eps: float = 1e-8  # AdamW ε (code)
    resolution: int | None = None  # crop size R in pixels; None = default_resolution(base model) (§2.6, §8 #10)
    seed: int = 0  # seeds crops, shuffling, timesteps and noise; same seed + same data = same adapter
    checkpoint_every: int = 0  # save a resumable training checkpoint every N steps; 0 = off
    crop_views: int = 4  # k random crops pre-encoded per image, one picked per step by (seed, step); 1..16 (§2.6)

    def resolved_alpha(self) -> float:
        """Alpha with None replaced by the rank."""
        return float(self.rank) if self.alpha is None else float(self.alpha)

    def resolved_resolution(self, base_model: str) -> int:
        """Resolution with None replaced by `default_resolution(base_model)`."""
        return default_resolution(base_model) if self.resolution is None else self.resolution

    def validate(self) -> "TrainConfig":
        """Check every field; returns self so a caller can write `config = TrainConfig(...).validate()`.

        Raises:
            ConceptSplitError: naming the first bad field, its value, the allowed range and a fix.
        """
        for name in ("learning_rate", "alpha", "grad_clip", "weight_decay", "adam_eps"):  # NaN passes `> 0`
            if getattr(self, name) is not None:
                check_number(
                    f"Training setting {name}",
                    getattr(self, name),
                    fix=f"set {name} to the default {_PAPER_DEFAULTS[name]!r} or another finite value",
                )
        for beta in self.adam_betas:
            check_number("Training setting adam_betas", beta, fix="set adam_betas to the default (0.9, 0.999)")
        checks = [
            ("steps", self.steps >= 1, "an integer of at least 1"),
            ("learning_rate", self.learning_rate > 0, "a positive number"),
            ("rank", self.rank >= 1, "an integer of at least 1"),
            ("alpha", self.alpha is None or self.alpha > 0, "empty (= rank) or a positive number"),
            ("batch_size", self.batch_size >= 1, "an integer of at least 1"),
            ("grad_clip", self.grad_clip >= 0, "0 (off) or a positive gradient norm"),
            (
                "adam_betas",
                len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
                "two values in [0, 1)",
            ),
            ("weight_decay", self.weight_decay >= 0, "0 or a positive number"),
            ("adam_eps", self.adam_eps > 0, "a small positive number"),
            (
                "resolution",
                self.resolution is None or (self.resolution >= 64 and self.resolution % 8 == 0),
                "empty (model default) or a multiple of 8 of at least 64",
            ),
            ("seed", self.seed >= 0, "a non-negative integer"),
            ("checkpoint_every", self.checkpoint_every >= 0, "0 (off) or a positive number of steps"),
            ("crop_views", self.crop_views >= 1, "an integer of at least 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                default = _PAPER_DEFAULTS[name]
                shown = "(empty)" if default is None else repr(default)
                raise ConceptSplitError.build(
                    f"Training setting {name} is out of range",
                    seen=f"{name} = {getattr(self, name)!r}",
                    expected=expected,
                    fix=f"set {name} to the default {shown} or a value in range",
                )
        return self


TRAIN_DEFAULTS = TrainConfig()
_PAPER_DEFAULTS = {field.name: getattr(TRAIN_DEFAULTS, field.name) for field in fields(TrainConfig)}

# Widget limits for the training node (defaults and ranges come from the core).
UI_RANGES: dict[str, WidgetRange] = {
    "steps": WidgetRange(1, 10000, 1, "300 (paper); 200..600 for 3-10 images"),
    "learning_rate": WidgetRange(1e-6, 1e-2, 1e-6, "1e-4 (paper); lower if the concept overwrites the prompt"),
    "rank": WidgetRange(1, 256, 1, "64 (paper); 32 halves the file size"),
    "alpha": WidgetRange(0.0, 256.0, 1.0, "0 = same as rank (scale 1, as the official code)"),
    "batch_size": WidgetRange(1, 16, 1, "1 (paper)"),
    "grad_clip": WidgetRange(0.0, 100.0, 0.1, "1.0 (official code); 0 disables clipping"),
    "weight_decay": WidgetRange(0.0, 1.0, 1e-3, "0.01 (official code)"),
    "resolution": WidgetRange(0, 2048, 64, "0 = model default: 768 SD2.1, 1024 SDXL, 512 SD1.5"),
    "seed": WidgetRange(0, 2**63 - 1, 1, "any; the same seed and images give the same adapter"),
    "checkpoint_every": WidgetRange(0, 10000, 1, "0 = off; 100 lets a long run resume"),
}


def _to_image_list(images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a (n, H, W, 3) batch or a list of (H, W, 3) / (b, H, W, 3) tensors into (H, W, 3) images."""
    batches = [images] if isinstance(images, torch.Tensor) else list(images)
    result = []
    for item in batches:
        if item.ndim == 3:
            result.append(item)
        elif item.ndim == 4:
            result.extend(item.unbind(0))
        else:
            raise ConceptSplitError.build(
                "A training image has the wrong number of dimensions",
                seen=f"shape {tuple(item.shape)}",
                expected="(H, W, 3) images or an IMAGE batch (n, H, W, 3)",
                fix="connect a ComfyUI IMAGE output to the training node",
            )
    return result


def _resized(image: torch.Tensor, index: int, resolution: int) -> torch.Tensor:
    """Check one (H, W, 3) image and resize its shorter side to R (bilinear, antialiased) -> (1, 3, new_h, new_w)."""
    height, width, channels = image.shape
    if channels != 3:
        raise ConceptSplitError.build(
            f"Training image {index} does not have 3 colour channels",
            seen=f"shape {tuple(image.shape)} ({channels} channels)",
            expected="RGB images (H, W, 3)",
            fix="convert the image to RGB (drop the alpha channel) before training",
        )
    pixels = image.float()
    if not torch.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
        raise ConceptSplitError.build(
            f"Training image {index} has values outside 0..1",
            seen=f"min {pixels.min().item():.4g}, max {pixels.max().item():.4g}",
            expected="ComfyUI IMAGE values in [0, 1]",
            fix="load the images with Load Image or clamp them to 0..1",
        )
    scale = resolution / min(height, width)
    new_h = max(resolution, round(height * scale))
    new_w = max(resolution, round(width * scale))
    chw = pixels.permute(2, 0, 1).unsqueeze(0)  # (H, W, 3) -> (1, 3, H, W)
    return F.interpolate(chw, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)


def preprocess_images(
    images: torch.Tensor | Sequence[torch.Tensor],
    resolution: int,
    generator: torch.Generator | None = None,
    crop: str = "random",
) -> torch.Tensor:
    """Resize the shorter side to R (bilinear, antialiased), crop R×R, scale to [-1, 1] (method §2.6 image pipeline).

    Images of different sizes are fine: each one is resized and cropped on its own, so the outputs all come out R×R.
    No flip and no colour jitter, as the official code.

    Args:
        images: ComfyUI IMAGE layout in 0..1: a tensor (n, H_img, W_img, 3) or a list of (H_img, W_img, 3) or
            (b, H_img, W_img, 3) tensors with possibly different sizes. Any float dtype; computed in fp32.
        resolution: R in pixels.
        generator: CPU generator for the random crop offsets; None = a fresh generator seeded 0. The same
            generator state gives the same crops.
        crop: "random" (the recipe) or "center".

    Shapes:
        returns (n, 3, R, R) float32 on the input's device, values in [-1, 1].

    Raises:
        ConceptSplitError: no images, not 3 channels, non-finite values or values outside [0, 1].
    """
    image_list = _to_image_list(images)
    if not image_list:
        raise ConceptSplitError.build(
            "No training images were given",
            seen="0 images",
            expected="at least 1 image of the concept (the paper uses 3-5)",
            fix="connect a batch of images of the concept",
        )
    if crop not in ("random", "center"):
        raise ConceptSplitError.build(
            "Unknown crop mode", seen=repr(crop), expected='"random" or "center"', fix='use crop="random"'
        )
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    out = []
    for index, image in enumerate(image_list):
        resized = _resized(image, index, resolution)  # (1, 3, new_h, new_w) in 0..1
        new_h, new_w = resized.shape[-2:]
        if crop == "random":
            top = int(torch.randint(0, new_h - resolution + 1, (1,), generator=generator))
            left = int(torch.randint(0, new_w - resolution + 1, (1,), generator=generator))
        else:
            top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
        out.append(resized[0, :, top : top + resolution, left : left + resolution])  # (3, R, R)
    # Bilinear weights are convex, so [0, 1] stays [0, 1]; clamp only guards rounding at the ends.
    return (torch.stack(out) * 2 - 1).clamp(-1, 1)  # (n, 3, R, R)


@dataclass(frozen=True)
class CropViews:
    """k random R×R crops per image (method §2.6 draws a random crop per sample; k views bound the VAE work to k
    encodes per image). Stored as the resized images and crop offsets, so memory stays one resized image each."""

    resized: tuple[torch.Tensor, ...]  # per image (3, new_h, new_w) in [-1, 1], shorter side R
    offsets: tuple[tuple[tuple[int, int], ...], ...]  # per image its distinct (top, left) crop offsets, in draw order
    choices: tuple[tuple[int, ...], ...]  # per image the k draws, as indices into its offsets (repeats allowed)
    resolution: int  # R

    @property
    def n_images(self) -> int:
        return len(self.resized)

    def crops(self, index: int) -> torch.Tensor:
        """The distinct crops of image `index`: (v, 3, R, R) in [-1, 1], v <= k (a square image has one)."""
        R = self.resolution
        return torch.stack(
            [self.resized[index][:, top : top + R, left : left + R] for top, left in self.offsets[index]]
        )


def crop_views(images: torch.Tensor | Sequence[torch.Tensor], resolution: int, views: int, seed: int) -> CropViews:
    """Resize every image's shorter side to R and draw `views` random R×R crop offsets per image from `seed`.

    Identical offsets are kept once (an image already R×R after resizing has a single crop), but `choices` keeps
    all k draws, so picking one of the k draws uniformly (crop_choice) keeps the crop distribution.
    Raises: ConceptSplitError: no images, not 3 channels, values outside [0, 1] (checked for every image first).
    """
    image_list = _to_image_list(images)
    if not image_list:
        raise ConceptSplitError.build(
            "No training images were given",
            seen="0 images",
            expected="at least 1 image of the concept (the paper uses 3-5)",
            fix="connect a batch of images of the concept",
        )
    generator = torch.Generator().manual_seed(_derived_seed("crops", seed))
    resized, offsets, choices = [], [], []
    for index, image in enumerate(image_list):
        pixels = _resized(image, index, resolution)[0]  # (3, new_h, new_w) in 0..1
        new_h, new_w = pixels.shape[-2:]
        drawn = [
            (
                int(torch.randint(0, new_h - resolution + 1, (1,), generator=generator)),
                int(torch.randint(0, new_w - resolution + 1, (1,), generator=generator)),
            )
            for _ in range(views)
        ]
        distinct = list(dict.fromkeys(drawn))
        resized.append((pixels * 2 - 1).clamp(-1, 1))  # bilinear is convex; clamp guards rounding at the ends
        offsets.append(tuple(distinct))
        choices.append(tuple(distinct.index(offset) for offset in drawn))
    return CropViews(tuple(resized), tuple(offsets), tuple(choices), resolution)


def crop_choice(step: int, seed: int, views: int) -> int:
    """Which of an image's k crop draws step `step` uses: from (seed, step) only, so a resumed run repeats it."""
    return _derived_seed("crop", seed, step) % views


def _derived_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple, stable across processes (Python's hash() of str is salted per process)."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def training_schedule(n_images: int, n_templates: int, steps: int, seed: int) -> list[tuple[int, int]]:
    """The (image index, template index) pair of every training item (method §2.6 "Pairing").

    Item i pairs image `i mod n_images` with template `i mod n_templates`; one epoch is `n_templates` items,
    shuffled per epoch with a generator seeded from `seed`. The list depends only on its arguments, so a run
    resumed at step k continues with item k of the same list.

    Returns:
        `steps` pairs (with batch size b, the caller takes b consecutive pairs per optimizer step).

    Raises:
        ConceptSplitError: n_images, n_templates or steps below 1.
    """
    for name, value in (("n_images", n_images), ("n_templates", n_templates), ("steps", steps)):
        if value < 1:
            raise ConceptSplitError.build(
                f"The training schedule needs {name} of at least 1",
                seen=f"{name} = {value}",
                expected="1 or more",
                fix="connect at least one image, keep the template list non-empty and train for at least 1 step",
            )
    generator = torch.Generator().manual_seed(_derived_seed("schedule", seed))
    pairs: list[tuple[int, int]] = []
    epoch = 0
    while len(pairs) < steps:
        start = epoch * n_templates
        order = torch.randperm(n_templates, generator=generator).tolist()  # shuffled item offsets of this epoch
        pairs.extend(((start + offset) % n_images, offset) for offset in order)
        epoch += 1
    return pairs[:steps]


def sample_training_noise(
    step: int, seed: int, shape: Sequence[int], num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps and Gaussian noise for one training step, derived from (seed, step) only (method §2.6).

    A generator seeded from `(seed, step)` draws `t ~ U{0..num_train_timesteps-1}` per batch row, then ε ~ N(0, I);
    no offset noise. Resuming at step k therefore draws exactly what an uninterrupted run draws at step k.

    Shapes:
        shape: the latent shape (B, 4, h, w). Returns t (B,) int64 and ε `shape` float32, both on the CPU
        (move them with `.to(latent)`).
    """
    generator = torch.Generator().manual_seed(_derived_seed("noise", seed, step))
    timesteps = torch.randint(0, num_train_timesteps, (shape[0],), generator=generator)  # (B,)
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)  # (B, 4, h, w)
    return timesteps, noise
