"""ToVA adapter files: read the native and the official format, write the native one (method §2.7).

Native:   tova.<diffusers path>.attn2.to_v.lora_A.weight (r, d) and ....lora_B.weight (C, r), conceptsplit.* metadata.
Official: unet.<diffusers path>.attn2.to_v.original_linear.lora_A.weight / lora_B (KU-VGI/ConceptSplit checkpoints).
A <diffusers path> names one transformer block, e.g. "down_blocks.2.attentions.0.transformer_blocks.0".
Everything else (kohya, diffusers, PEFT LoRAs, keys on q/k/out or self-attention) is refused before any patching.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

import torch

from .atomic_file import atomic_replace
from .config import (
    FAMILIES,
    FAMILY_DISPLAY,
    NATIVE_FORMAT_NAME,
    NATIVE_FORMAT_VERSION,
    PREDICTION_EPS,
    PREDICTION_V,
    ROLES,
)
from .errors import ConceptSplitError
from .number_checks import check_number

FORMAT_NATIVE = "native"
FORMAT_OFFICIAL = "official"

_NATIVE_KEY = re.compile(r"^tova\.(?P<path>.+)\.attn2\.to_v\.lora_(?P<part>[AB])\.weight$")
_OFFICIAL_KEY = re.compile(r"^unet\.(?P<path>.+)\.attn2\.to_v\.original_linear\.lora_(?P<part>[AB])\.weight$")
# Fragments that only ordinary LoRA / LyCORIS files use (kohya, diffusers, PEFT, ComfyUI's own trainer).
_REGULAR_LORA_MARKERS = (
    "lora_up",
    "lora_down",
    "lora_unet_",
    "lora_te",
    ".alpha",
    "lora_A",
    "lora_B",
    "hada_w",
    "lokr_w",
    ".diff",
    "lora.up",
    "lora.down",
    "lora_linear_layer",
)
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
_LOADER_HINT = 'Load it with ComfyUI\'s "Load LoRA" node (LoraLoader) instead'

META = "conceptsplit."  # metadata key prefix
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # 3.4e38: the largest |value| the delta may reach in fp32
# Training-record metadata that holds numbers (written by the trainer; never read back into a computation, but
# checked so a damaged file is named as damaged): integer fields and the one real-valued field.
_TRAINING_INTEGERS = ("train_steps", "train_resolution", "train_batch", "train_images")
_TRAINING_REALS = ("train_lr",)


@dataclass(frozen=True)
class AdapterMetadata:
    """The `conceptsplit.*` metadata of a native file (method §2.7). All values are stored as strings."""

    base_model: str  # "sd1.5", "sd2.1" or "sd2.1-v", "sdxl"
    text_width: int  # d, the adapter input width
    rank: int  # r
    alpha: float  # scale is alpha / r
    identifier_word: str  # the plain class word, e.g. "dog" (method §2.4)
    role: str = "object"  # "object" or "background" (method §5)
    prediction: str = PREDICTION_EPS  # "eps" or "v": what the base model predicts
    layers: int = 0  # number of attn2.to_v layers covered; the writer fills it in from the tensors
    training: Mapping[str, str] = field(default_factory=dict)  # train_steps, train_lr, ... (method §2.7)

    @property
    def family(self) -> str:
        return family_of_base_model(self.base_model)

    def to_strings(self) -> dict[str, str]:
        out = {
            META + "format": NATIVE_FORMAT_NAME,
            META + "format_version": str(NATIVE_FORMAT_VERSION),
            META + "base_model": self.base_model,
            META + "text_width": str(self.text_width),
            META + "layers": str(self.layers),
            META + "rank": str(self.rank),
            META + "alpha": _number_text(self.alpha),
            META + "identifier_word": self.identifier_word,
            META + "role": self.role,
            META + "prediction": self.prediction,
        }
        for key, value in self.training.items():
            out[META + key] = str(value)
        return out


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter file in memory: per transformer block (diffusers path), lora_A (r, d) and lora_B (C, r) in fp32."""

    name: str  # file name shown in messages
    file_format: str  # FORMAT_NATIVE or FORMAT_OFFICIAL
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # path -> (A (r, d), B (C, r))
    rank: int
    text_width: int
    alpha: float
    metadata: AdapterMetadata | None  # None for official files
    # path -> ||B·A||_F (fp64, without the scale), measured when the file was read; empty for weights built in code
    delta_norms: Mapping[str, float] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """alpha / r (method §2.1: 1.0 for the paper's adapters); r >= 1 and alpha > 0 are checked on reading."""
        return self.alpha / self.rank

    def delta_norm(self, layer_path: str) -> float:
        """||B·A||_F of one layer (without the scale), from the read-time measurement or computed now."""
        known = self.delta_norms.get(layer_path)
        return known if known is not None else delta_frobenius_norm(*self.layers[layer_path])


def family_of_base_model(base_model: str) -> str:
    """'sd2.1-v' -> 'sd2.1'; raises for an unknown family."""
    family = base_model[:-2] if base_model.endswith("-v") else base_model
    if family not in FAMILIES:
        raise ConceptSplitError.build(
            f"Unknown base model {base_model!r} in adapter metadata",
            seen=f"conceptsplit.base_model = {base_model!r}",
            expected="one of " + ", ".join(FAMILIES) + " (optionally with -v)",
            fix="re-save the adapter with this pack's trainer, or fix the metadata",
        )
    return family


def read_adapter_file(path: str | Path) -> AdapterWeights:
    """Load and validate a ToVA adapter file (method §2.7 "Loading"): format, metadata, pairing, one rank, finite
    values.

    Shapes: lora_A (r, d), lora_B (C, r) per layer, returned as fp32 CPU tensors.
    Raises: ConceptSplitError for a missing, corrupt, pickled, regular-LoRA or otherwise invalid file.
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ConceptSplitError.build(
            f'Adapter file "{path}" does not exist',
            seen="no file at that path",
            expected="a .safetensors ToVA adapter",
            fix='put the file in ComfyUI/models/tova and press "Refresh" (R) in the UI',
        )
    tensors, raw_meta = _read_tensors(path)
    file_format, layer_parts = _classify_keys(name, tensors)
    metadata = _parse_metadata(name, raw_meta) if file_format == FORMAT_NATIVE else None
    layers = _pair_layers(name, layer_parts)
    rank, text_width = _check_shapes(name, layers)
    if metadata is not None:
        _check_metadata_against_tensors(name, metadata, rank, text_width, len(layers))
    alpha = metadata.alpha if metadata is not None else float(rank)  # official: alpha = r, scale 1 (method §2.5)
    norms = _check_delta_sizes(name, layers, alpha / rank)
    return AdapterWeights(
        name=name,
        file_format=file_format,
        layers=layers,
        rank=rank,
        text_width=text_width,
        alpha=alpha,
        metadata=metadata,
        delta_norms=norms,
    )


def delta_frobenius_norm(lora_a: torch.Tensor, lora_b: torch.Tensor) -> float:
    """||B·A||_F of one layer, computed in float64 without forming the (C, d) product.

    ||B·A||_F² = trace(Aᵀ Bᵀ B A) = sum((BᵀB) ∘ (A Aᵀ)): two (r, r) Gram matrices, C·r² + d·r² multiply-adds
    instead of C·d·r. Every entry of B·A is at most ||B·A||_F in magnitude, so a finite norm below 3.4e38 proves
    that B·A is finite in float32. Shapes: lora_a (r, d), lora_b (C, r).
    """
    a, b = lora_a.detach().to("cpu", torch.float64), lora_b.detach().to("cpu", torch.float64)
    squared = float(((b.T @ b) * (a @ a.T)).sum())  # fp64: entries up to 3.4e38 square to 1.2e77, far below 1.8e308
    return math.sqrt(max(squared, 0.0))  # rounding can leave a tiny negative sum for a zero delta


def write_adapter_file(
    path: str | Path,
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    metadata: AdapterMetadata,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write the native format atomically (temp file in the folder, then rename); never a partial file.

    Shapes: layers maps diffusers path -> (A (r, d), B (C, r)). dtype: torch.float32 (default) or torch.float16.
    """
    from safetensors.torch import save

    if dtype not in (torch.float32, torch.float16):
        raise ConceptSplitError.build(
            "Unsupported adapter precision",
            seen=str(dtype),
            expected="torch.float32 or torch.float16",
            fix="choose fp32 or fp16",
        )
    rank, width = _check_shapes(Path(path).name, layers)
    if (metadata.rank, metadata.text_width) != (rank, width):
        raise ConceptSplitError.build(
            "Adapter metadata does not match the tensors being saved",
            seen=f"metadata rank {metadata.rank}, text width {metadata.text_width}; tensors rank {rank}, width {width}",
            expected="the same numbers",
            fix="build the metadata from the trained tensors",
        )
    metadata = replace(metadata, layers=len(layers))
    tensors = {}
    for layer_path, (lora_a, lora_b) in sorted(layers.items()):
        tensors[f"tova.{layer_path}.attn2.to_v.lora_A.weight"] = lora_a.detach().to("cpu", dtype).contiguous()
        tensors[f"tova.{layer_path}.attn2.to_v.lora_B.weight"] = lora_b.detach().to("cpu", dtype).contiguous()
    payload = save(tensors, metadata=metadata.to_strings())
    return atomic_replace(Path(path), lambda handle: handle.write(payload), overwrite=overwrite)


# --- reading ---------------------------------------------------------------------------------------------------


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    suffix = path.suffix.lower()
    if suffix in _SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                meta = handle.metadata() or {}
                keys = list(handle.keys())
                _classify_keys(path.name, dict.fromkeys(keys))  # refuse a LoRA or checkpoint before reading it
                return {key: handle.get_tensor(key) for key in keys}, meta
        except ConceptSplitError:
            raise
        except Exception as err:  # safetensors raises several types for truncated/garbled headers and data
            raise ConceptSplitError.build(
                f'Adapter file "{path.name}" is truncated or corrupt',
                seen=f"{type(err).__name__}: {err}",
                expected="a complete safetensors file",
                fix="download or train the adapter again",
            ) from err
    if suffix in _PICKLE_SUFFIXES:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # Python objects besides tensors: refused, never executed
            raise ConceptSplitError.build(
                f'Adapter file "{path.name}" cannot be loaded safely: it holds pickled Python objects, not only '
                "tensors, and unpickling those can run any code the file contains",
                seen=f"PyTorch's safe loader (weights_only=True) refused it ({_unpickler_detail(err)})",
                expected="plain tensors: a .safetensors file, or a .pt/.ckpt/.bin holding only tensors",
                fix="do not load it with weights_only=False or any other pickle loader unless you made the file "
                "yourself: that is exactly how a malicious file runs its code. Ask its author for a "
                ".safetensors version",
            ) from err
        except Exception as err:  # RuntimeError for truncated or garbled zip archives
            raise ConceptSplitError.build(
                f'Adapter file "{path.name}" is truncated or corrupt',
                seen=f"{type(err).__name__}: {str(err).split('. ')[0]}",
                expected="a complete file of plain tensors, or better a .safetensors file",
                fix="download or train the adapter again",
            ) from err
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise ConceptSplitError.build(
                f'Adapter file "{path.name}" is not a flat tensor dictionary',
                seen=type(loaded).__name__,
                expected="a dict of name -> tensor",
                fix="save the adapter as a safetensors state dict",
            )
        return dict(loaded), {}
    raise ConceptSplitError.build(
        f'"{path.name}" has an unsupported file type',
        seen=suffix or "no extension",
        expected=".safetensors or .sft (or .pt/.ckpt/.bin holding plain tensors)",
        fix="use a .safetensors ToVA adapter",
    )


def _unpickler_detail(err: Exception) -> str:
    """What PyTorch's weights-only unpickler objected to ("Unsupported global: ..."), without its advice to retry
    with weights_only=False, which is the one thing not to do with a file from a stranger."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    detail = text[text.index(marker) + len(marker) :] if marker in text else ""
    detail = " ".join(detail.split("Check the documentation")[0].split())
    detail = detail.split(". ")[0].rstrip(".")[:200]  # the first sentence: later ones say how to allow the object
    return detail or type(err).__name__


def _classify_keys(
    name: str, tensors: Mapping[str, torch.Tensor | None]
) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """Return the format and {path: {"A": tensor, "B": tensor}}; refuse anything that is not a ToVA adapter."""
    keys = list(tensors)
    if not keys:
        raise ConceptSplitError.build(
            f'Adapter file "{name}" holds no tensors',
            seen="0 tensors",
            expected="lora_A/lora_B pairs for attn2.to_v",
            fix="train or download it again",
        )
    native = [k for k in keys if k.startswith("tova.")]
    official = [k for k in keys if ".original_linear." in k]
    if native:
        file_format, pattern = FORMAT_NATIVE, _NATIVE_KEY
    elif official:
        file_format, pattern = FORMAT_OFFICIAL, _OFFICIAL_KEY
    elif any(marker in key for key in keys for marker in _REGULAR_LORA_MARKERS):
        sample = next(k for k in keys if any(m in k for m in _REGULAR_LORA_MARKERS))
        raise ConceptSplitError.build(
            f'"{name}" is a regular LoRA, not a token-wise ToVA adapter',
            seen=f'keys like "{sample}" ({len(keys)} tensors), which a LoRA loader applies to every token',
            expected='keys "tova.<block>.attn2.to_v.lora_A.weight" (this pack) or '
            '"unet.<block>.attn2.to_v.original_linear.lora_A.weight" (official ConceptSplit)',
            fix=_LOADER_HINT,
        )
    else:
        raise ConceptSplitError.build(
            f'"{name}" is not a ToVA adapter',
            seen=f'keys like "{keys[0]}"',
            expected="tova.* keys (this pack) or *.original_linear.* keys (official ConceptSplit)",
            fix="choose a ToVA adapter file",
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key in keys:
        match = pattern.match(key)
        if match is None:
            raise ConceptSplitError.build(
                f'"{name}" adapts more than the cross-attention value projection',
                seen=f'key "{key}"',
                expected="only attn2.to_v (cross-attention values); ToVA never changes q, k, out or self-attention",
                fix="retrain with target modules attn2.to_v only, or load the file as a regular LoRA with LoraLoader",
            )
        parts.setdefault(match["path"], {})[match["part"]] = tensors[key]
    return file_format, parts


def _parse_metadata(name: str, raw: Mapping[str, str]) -> AdapterMetadata:
    def get(key: str, required: bool = True) -> str | None:
        value = raw.get(META + key)
        if value is None and required:
            raise ConceptSplitError.build(
                f'Adapter "{name}" lacks metadata field {META + key}',
                seen="fields: " + (", ".join(sorted(k for k in raw if k.startswith(META))) or "none"),
                expected="the full conceptsplit.* metadata of the native format",
                fix="re-save the adapter with this pack (Train ToVA Adapter or the command-line trainer)",
            )
        return value

    if get("format") != NATIVE_FORMAT_NAME:
        raise ConceptSplitError.build(
            f'Adapter "{name}" has tova.* keys but another format tag',
            seen=f"{META}format = {raw.get(META + 'format')!r}",
            expected=f"{NATIVE_FORMAT_NAME!r}",
            fix="re-save the adapter with this pack",
        )
    version = get("format_version")
    if not (version.isascii() and version.isdigit()) or not 1 <= int(version) <= NATIVE_FORMAT_VERSION:
        raise ConceptSplitError.build(
            f'Adapter "{name}" uses format version {version}',
            seen=f"version {version}",
            expected=f"a version from 1 to {NATIVE_FORMAT_VERSION}",
            fix="update ComfyUI-ConceptSplit (a newer version), or train the adapter again (a damaged one)",
        )
    prediction = get("prediction")
    role = get("role")
    if prediction not in (PREDICTION_EPS, PREDICTION_V) or role not in ROLES:
        raise ConceptSplitError.build(
            f'Adapter "{name}" has invalid metadata',
            seen=f"prediction={prediction!r}, role={role!r}",
            expected=f"prediction eps|v, role {'|'.join(ROLES)}",
            fix="re-save the adapter with this pack",
        )
    training = {
        key[len(META) :]: value
        for key, value in raw.items()
        if key.startswith(META + "train") or key == META + "templates"
    }
    try:
        numbers = {
            "text_width": int(get("text_width")),
            "rank": int(get("rank")),
            "layers": int(get("layers")),
            "alpha": float(get("alpha")),
        }
    except ValueError as err:
        raise ConceptSplitError.build(
            f'Adapter "{name}" has non-numeric metadata',
            seen=str(err),
            expected="integers for text_width, rank, layers; a number for alpha",
            fix="re-save the adapter with this pack",
        ) from err
    damaged = "the file was edited or damaged: train the adapter again or re-save it with this pack"
    for key in ("text_width", "rank", "layers"):
        check_number(f'Adapter "{name}" metadata {META}{key}', numbers[key], 1, integer=True, fix=damaged)
    # alpha: finite and positive (the trainer refuses alpha <= 0); its size is checked with the weights, as scale
    if not (math.isfinite(numbers["alpha"]) and numbers["alpha"] > 0):
        raise ConceptSplitError.build(
            f'Adapter "{name}" has an invalid alpha in its metadata',
            seen=f"{META}alpha = {get('alpha')!r}, so the scale alpha / rank would be "
            f"{numbers['alpha'] / numbers['rank']!r}",
            expected="a finite positive number (the rank itself for a scale of 1, as the paper)",
            fix=damaged,
        )
    _check_training_record(name, training, damaged)
    return AdapterMetadata(
        base_model=get("base_model"),
        text_width=numbers["text_width"],
        rank=numbers["rank"],
        alpha=numbers["alpha"],
        identifier_word=get("identifier_word"),
        role=role,
        prediction=prediction,
        layers=numbers["layers"],
        training=training,
    )


def _check_training_record(name: str, training: Mapping[str, str], fix: str) -> None:
    """The numeric training-record fields, where present: non-negative integers, and a finite rate."""
    for key in _TRAINING_INTEGERS + _TRAINING_REALS:
        if key not in training:
            continue
        integer = key in _TRAINING_INTEGERS
        try:
            value = int(training[key]) if integer else float(training[key])
        except ValueError:
            value = training[key]  # check_number names the text as "not a number"
        check_number(f'Adapter "{name}" metadata {META}{key}', value, 0, integer=integer, fix=fix)


def _pair_layers(
    name: str, parts: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    layers = {}
    for layer_path, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise ConceptSplitError.build(
                f'Adapter "{name}" is missing {missing} for layer {layer_path}',
                seen=f"only {', '.join('lora_' + p for p in pair)}",
                expected="lora_A and lora_B for every layer",
                fix="the file is incomplete; train or download it again",
            )
        for part in ("A", "B"):
            if not pair[part].is_floating_point():
                raise ConceptSplitError.build(
                    f'Adapter "{name}" stores lora_{part} of layer {layer_path} as {pair[part].dtype}',
                    seen=f"dtype {pair[part].dtype}",
                    expected="floating-point weights (float32, float16 or bfloat16)",
                    fix="the file is damaged or is not a ToVA adapter; train or download it again",
                )
        layers[layer_path] = (pair["A"].to(torch.float32), pair["B"].to(torch.float32))
    return layers


def _check_shapes(name: str, layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, int]:
    """One rank r and one text width d across layers; A (r, d), B (C, r); all values finite. Returns (r, d)."""
    ranks, widths = set(), set()
    for layer_path, (lora_a, lora_b) in layers.items():
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise ConceptSplitError.build(
                f'Adapter "{name}" has mis-shaped tensors at {layer_path}',
                seen=f"lora_A {tuple(lora_a.shape)}, lora_B {tuple(lora_b.shape)}",
                expected="lora_A (r, d) and lora_B (C, r) with the same r",
                fix="train or download the adapter again",
            )
        if min(*lora_a.shape, *lora_b.shape) < 1:
            raise ConceptSplitError.build(
                f'Adapter "{name}" has an empty layer at {layer_path} (rank 0, or a zero text or channel width)',
                seen=f"lora_A {tuple(lora_a.shape)}, lora_B {tuple(lora_b.shape)}",
                expected="lora_A (r, d) and lora_B (C, r) with r, d and C of at least 1 (the paper's rank is 64)",
                fix="the file is damaged or was saved from an empty adapter; train or download it again",
            )
        ranks.add(lora_a.shape[0])
        widths.add(lora_a.shape[1])
        for part, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise ConceptSplitError.build(
                    f'Adapter "{name}" contains NaN or Inf values',
                    seen=f"{bad} non-finite values in {part} of {layer_path}",
                    expected="finite weights",
                    fix="the training diverged or the file is damaged; retrain it",
                )
    if len(ranks) != 1 or len(widths) != 1:
        raise ConceptSplitError.build(
            f'Adapter "{name}" mixes ranks or text widths across layers',
            seen=f"ranks {sorted(ranks)}, text widths {sorted(widths)}",
            expected="one rank and one text width",
            fix="train or download the adapter again",
        )
    return ranks.pop(), widths.pop()


def _check_delta_sizes(
    name: str, layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scale: float
) -> dict[str, float]:
    """||B·A||_F per layer; refuse a file whose scaled delta is not finite in float32. Returns path -> ||B·A||_F.

    Finite A and B can still multiply to Inf (weights ×1e30 give entries ~1e60), and a huge alpha can overflow the
    scaled delta; either gives NaN latents. How large a delta may be next to the model's own weight is checked when
    the adapter is applied (concepts.check_delta_sizes), where that weight is known.
    """
    norms = {}
    for layer_path, (lora_a, lora_b) in layers.items():
        norm = delta_frobenius_norm(lora_a, lora_b)
        scaled = scale * norm
        if not (math.isfinite(scaled) and scaled <= FLOAT32_MAX):
            raise ConceptSplitError.build(
                f'Adapter "{name}" has weights too large to compute with: its delta overflows float32 '
                f"at layer {layer_path}",
                seen=f"scale alpha/rank = {scale:.4g}, ||lora_B·lora_A|| = {norm:.4g}, so ||scale·B·A|| = "
                f"{scaled:.4g} (largest |lora_A| {float(lora_a.abs().max()):.3g}, "
                f"|lora_B| {float(lora_b.abs().max()):.3g})",
                expected=f"a delta that float32 can hold (below {FLOAT32_MAX:.3g}; a trained adapter's stays "
                "within about 20 times the model layer's own weight)",
                fix="the file was damaged or saved with a wrong scale; train or download it again",
            )
        norms[layer_path] = norm
    return norms


def _check_metadata_against_tensors(name: str, meta: AdapterMetadata, rank: int, width: int, n_layers: int) -> None:
    family = meta.family  # raises on unknown families
    seen = f"metadata rank {meta.rank}, text width {meta.text_width}, layers {meta.layers}"
    if (meta.rank, meta.text_width, meta.layers) != (rank, width, n_layers):
        raise ConceptSplitError.build(
            f'Adapter "{name}" ({FAMILY_DISPLAY[family]}) has metadata that does not match its tensors',
            seen=f"{seen}; tensors rank {rank}, text width {width}, layers {n_layers}",
            expected="the same numbers",
            fix="the file was edited or damaged; re-save it with this pack",
        )


def _number_text(value: float) -> str:
    return json.dumps(int(value)) if float(value).is_integer() else repr(float(value))
