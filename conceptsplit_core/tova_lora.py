"""ToVA LoRA parameters, training targets and resumable training checkpoints (method §2.1, §2.5, §2.6).

Tensor naming follows microsoft/LoRA `loralib/layers.py`: `lora_A` is `(r, d)`, `lora_B` is `(C, r)`,
`scale = alpha / r`, and `B` starts at zero so the delta `B (A c)` starts at zero.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open

from .atomic_file import atomic_write_bytes
from .errors import ConceptSplitError

CHECKPOINT_FORMAT = "conceptsplit.training_checkpoint"
CHECKPOINT_VERSION = 1


def init_lora_pair(
    rank: int,
    in_features: int,
    out_features: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial A, B of one ToVA layer: `A ~ N(0, (1/r)²)`, `B = 0` (method §2.5, peft "gaussian" init).

    Shapes:
        returns A (r, d) and B (C, r) on the CPU, in `dtype` (fp32 for training, method §2.5).
    """
    lora_a = torch.randn(rank, in_features, generator=generator, dtype=torch.float32) / rank  # (r, d), std 1/r
    lora_b = torch.zeros(out_features, rank, dtype=torch.float32)  # (C, r): delta is exactly zero at step 0
    return lora_a.to(dtype), lora_b.to(dtype)


def _parameter_name(layer_key: str) -> str:
    # ParameterDict keys cannot contain "."; diffusers paths do.
    return layer_key.replace(".", "__")


class ToVALoraSet(torch.nn.Module):
    """One concept's trainable ToVA adapter: an fp32 (A, B) pair per cross-attention value projection (method §2.2).

    Layer keys are chosen by the caller (for example the diffusers path `down_blocks.0.attentions.0.
    transformer_blocks.0.attn2.to_v`); iteration order is the order of `layer_shapes`, which also fixes the
    order of `parameters()` and so of the optimizer state.
    """

    def __init__(
        self,
        layer_shapes: dict[str, tuple[int, int]],
        rank: int,
        alpha: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Create A ~ N(0, (1/r)²) and B = 0 for every layer (method §2.5).

        Args:
            layer_shapes: layer key -> (d, C), the text width and the layer's channel width.
            rank: r.
            alpha: None = r, so the scale alpha / r is 1 (method §2.5).
            generator: CPU generator for the A init; layers are drawn in `layer_shapes` order.

        Raises:
            ConceptSplitError: rank below 1, no layers, or two keys that map to the same parameter name.
        """
        super().__init__()
        if rank < 1 or not layer_shapes:
            raise ConceptSplitError.build(
                "A ToVA adapter needs a rank of at least 1 and at least one layer",
                seen=f"rank {rank}, {len(layer_shapes)} layers",
                expected="rank >= 1 and the model's cross-attention layers",
                fix="use rank 64 (paper) on a supported UNet",
            )
        names = [_parameter_name(key) for key in layer_shapes]
        if len(set(names)) != len(names):
            raise ConceptSplitError.build(
                "Two ToVA layer keys collide",
                seen=", ".join(layer_shapes),
                expected="distinct layer keys",
                fix="name each layer by its full path",
            )
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self._names = dict(zip(layer_shapes, names))  # layer key -> ParameterDict key
        self.lora_A = torch.nn.ParameterDict()
        self.lora_B = torch.nn.ParameterDict()
        for key, (in_features, out_features) in layer_shapes.items():
            lora_a, lora_b = init_lora_pair(rank, in_features, out_features, generator)
            self.lora_A[self._names[key]] = torch.nn.Parameter(lora_a)  # (r, d) fp32
            self.lora_B[self._names[key]] = torch.nn.Parameter(lora_b)  # (C, r) fp32

    def __deepcopy__(self, memo: dict) -> "ToVALoraSet":
        # ComfyUI deep-copies model_options on every clone (integration §1.1); the trained weights must be shared.
        return self

    @property
    def layer_keys(self) -> tuple[str, ...]:
        return tuple(self._names)

    def pairs(self) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """Layer key -> (A (r, d), B (C, r)), the live parameters."""
        return {key: (self.lora_A[name], self.lora_B[name]) for key, name in self._names.items()}

    def state_for_saving(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer key -> (A, B) as detached CPU fp32 clones, for adapter files (method §2.7) and checkpoints."""
        return {
            key: (a.detach().to("cpu", torch.float32).clone(), b.detach().to("cpu", torch.float32).clone())
            for key, (a, b) in self.pairs().items()
        }

    @torch.no_grad()
    def load_pairs(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy saved (A, B) values into the parameters in place, keeping parameter identity for the optimizer.

        Raises:
            ConceptSplitError: the layer set or a shape differs.
        """
        if set(pairs) != set(self._names):
            missing, extra = sorted(set(self._names) - set(pairs)), sorted(set(pairs) - set(self._names))
            raise ConceptSplitError.build(
                "Saved ToVA weights do not match this adapter's layers",
                seen=f"missing {missing[:3]}, unexpected {extra[:3]}",
                expected=f"the same {len(self._names)} layers",
                fix="resume with the same base model and rank",
            )
        for key, (a, b) in self.pairs().items():
            saved_a, saved_b = pairs[key]
            if saved_a.shape != a.shape or saved_b.shape != b.shape:
                raise ConceptSplitError.build(
                    f'Saved ToVA weights for "{key}" have other shapes',
                    seen=f"A {tuple(saved_a.shape)}, B {tuple(saved_b.shape)}",
                    expected=f"A {tuple(a.shape)}, B {tuple(b.shape)}",
                    fix="resume with the same base model and rank",
                )
            a.copy_(saved_a)
            b.copy_(saved_b)


@dataclass
class TrainingState:
    """Everything a resumed run needs to continue bit-identically (method §2.6; our checkpoint format [choice]).

    Attributes:
        step: optimizer steps already taken; the next step to run is `step`.
        lora: layer key -> (A (r, d), B (C, r)), as `ToVALoraSet.state_for_saving()`.
        optimizer: `torch.optim.AdamW.state_dict()` (exp_avg, exp_avg_sq and step tensors, param_groups).
        rng: JSON scalars (seed, ...) and tensors (e.g. `torch.Generator.get_state()`), by name.
        loss_history: the loss of every step taken so far.
        extra: JSON-serialisable run description (config, identifier word, base model).
    """

    step: int
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    optimizer: dict[str, Any]
    rng: dict[str, Any] = field(default_factory=dict)
    loss_history: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _tensor_for_file(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous().clone()


def save_training_checkpoint(path: str | Path, state: TrainingState, *, overwrite: bool = True) -> Path:
    """Write `state` atomically as one safetensors file; scalars go into a JSON string in its metadata.

    Tensors: `lora.<i>.A/B` (layer order kept in the JSON), `optimizer.<param index>.<name>` for every tensor in the
    AdamW state (the step counts included), `rng.<name>`. No pickle anywhere.
    """
    tensors: dict[str, torch.Tensor] = {}
    layer_keys = list(state.lora)
    for index, key in enumerate(layer_keys):
        tensors[f"lora.{index}.A"] = _tensor_for_file(state.lora[key][0])
        tensors[f"lora.{index}.B"] = _tensor_for_file(state.lora[key][1])
    optimizer_scalars: dict[str, dict[str, Any]] = {}
    for param_index, param_state in state.optimizer.get("state", {}).items():
        scalars = optimizer_scalars.setdefault(str(param_index), {})
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param_index}.{name}"] = _tensor_for_file(value)
            else:
                scalars[name] = value
    rng_scalars = {}
    for name, value in state.rng.items():
        if isinstance(value, torch.Tensor):
            tensors[f"rng.{name}"] = _tensor_for_file(value)
        else:
            rng_scalars[name] = value
    record = {
        "version": CHECKPOINT_VERSION,
        "step": state.step,
        "layer_keys": layer_keys,
        "param_groups": state.optimizer.get("param_groups", []),
        "optimizer_scalars": optimizer_scalars,
        "rng": rng_scalars,
        "loss_history": state.loss_history,
        "extra": state.extra,
    }
    # json writes floats with repr(), which round-trips every float64 exactly.
    metadata = {"format": "pt", CHECKPOINT_FORMAT: json.dumps(record, allow_nan=True)}
    data = safetensors.torch.save(tensors, metadata=metadata)
    return atomic_write_bytes(path, data, overwrite=overwrite)


def load_training_checkpoint(path: str | Path) -> TrainingState:
    """Read a checkpoint written by `save_training_checkpoint` (safetensors only, never pickle).

    Raises:
        ConceptSplitError: the file is missing, not safetensors, or not a ConceptSplit training checkpoint.
    """
    source = Path(path)
    try:
        with safe_open(str(source), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ConceptSplitError.build(
            f'Cannot read the training checkpoint "{source.name}"',
            seen=f"{type(err).__name__}: {err}",
            expected="a .safetensors checkpoint saved by ConceptSplit training",
            fix="pick a checkpoint from the training output folder or start fresh",
        ) from err
    if CHECKPOINT_FORMAT not in metadata:
        raise ConceptSplitError.build(
            f'"{source.name}" is not a ConceptSplit training checkpoint',
            seen=f"metadata keys {sorted(metadata)}",
            expected=f'a "{CHECKPOINT_FORMAT}" metadata entry',
            fix="resume from a checkpoint the training node wrote; adapters cannot be resumed",
        )
    try:
        record = json.loads(metadata[CHECKPOINT_FORMAT])
    except ValueError as err:
        raise _damaged_checkpoint(source, f"unreadable record: {err}") from err
    if not isinstance(record, dict) or record.get("version") != CHECKPOINT_VERSION:
        raise ConceptSplitError.build(
            f'Training checkpoint "{source.name}" has an unsupported version',
            seen=str(record.get("version") if isinstance(record, dict) else type(record).__name__),
            expected=str(CHECKPOINT_VERSION),
            fix="update the pack or start the training again",
        )
    try:
        state = _checkpoint_state(record, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a field missing or of the wrong kind
        raise _damaged_checkpoint(source, f"{type(err).__name__}: {err}") from err
    _check_checkpoint_numbers(source, state)
    return state


def _damaged_checkpoint(source: Path, seen: str) -> ConceptSplitError:
    return ConceptSplitError.build(
        f'The training checkpoint "{source.name}" is damaged',
        seen=seen,
        expected="a checkpoint written by ConceptSplit training, with finite weights, optimizer state and losses",
        fix="turn resume off to start the run again (or delete the checkpoint)",
    )


def _check_checkpoint_numbers(source: Path, state: TrainingState) -> None:
    """Every number a resume would compute with: finite tensors, a non-negative step and second moment, finite
    losses and optimizer settings. A NaN there would silently turn the resumed adapter into NaN."""
    if state.step < 0:
        raise _damaged_checkpoint(source, f"step {state.step}")
    named = [(f"lora {key} {part}", tensor) for key, pair in state.lora.items() for part, tensor in zip("AB", pair)]
    named += [
        (f"optimizer state {index} {name}", value)
        for index, entry in state.optimizer["state"].items()
        for name, value in entry.items()
        if isinstance(value, torch.Tensor)
    ]
    for label, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _damaged_checkpoint(source, f"non-finite values in {label}")
        if label.endswith("exp_avg_sq") and bool((tensor < 0).any()):
            raise _damaged_checkpoint(source, f"negative values in {label} (a second moment is >= 0)")
    for value in state.loss_history:
        if not math.isfinite(value):
            raise _damaged_checkpoint(source, f"loss history holds {value!r}")
    for group in state.optimizer["param_groups"]:
        for key in ("lr", "eps", "weight_decay", "betas"):
            values = group.get(key, ())
            for value in values if isinstance(values, tuple) else (values,):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise _damaged_checkpoint(source, f"optimizer setting {key} = {group.get(key)!r}")


def _checkpoint_state(record: dict, tensors: dict[str, torch.Tensor]) -> TrainingState:
    lora = {key: (tensors[f"lora.{i}.A"], tensors[f"lora.{i}.B"]) for i, key in enumerate(record["layer_keys"])}
    optimizer_state: dict[int, dict[str, Any]] = {}
    for param_index, scalars in record["optimizer_scalars"].items():
        optimizer_state[int(param_index)] = dict(scalars)
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, param_index, state_name = name.split(".", 2)
            optimizer_state.setdefault(int(param_index), {})[state_name] = tensor
    param_groups = [
        {key: tuple(value) if key == "betas" else value for key, value in group.items()}
        for group in record["param_groups"]
    ]
    rng = dict(record["rng"])
    rng.update({name.removeprefix("rng."): tensor for name, tensor in tensors.items() if name.startswith("rng.")})
    return TrainingState(
        step=int(record["step"]),
        lora=lora,
        optimizer={"state": dict(sorted(optimizer_state.items())), "param_groups": param_groups},
        rng=rng,
        loss_history=[float(value) for value in record["loss_history"]],
        extra=record["extra"],
    )
