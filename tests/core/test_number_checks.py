"""Numbers from outside the pack (issue 11, item 3 and the same class): the shared check, the settings that use it,
and the numbers a resumed training run reads back from its checkpoint."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.loda_config import LodaConfig
from conceptsplit_core.number_checks import check_choice, check_number
from conceptsplit_core.tova_lora import (
    CHECKPOINT_FORMAT,
    ToVALoraSet,
    TrainingState,
    load_training_checkpoint,
    save_training_checkpoint,
)
from conceptsplit_core.training import CheckpointPlan, train_tova
from conceptsplit_core.training_data import TrainConfig

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_nan_and_inf_are_refused_although_they_pass_min_max_comparisons(value):
    if value != value:  # the premise of issue 11: NaN passes ComfyUI's `val < min` and `val > max` checks
        assert not (value < -4.0) and not (value > 4.0)
    with pytest.raises(
        ConceptSplitError,
        match=r"strength is not a finite number.*Expected: a finite number from "
        r"-4 to 4.*Fix: enter a value in that range",
    ):
        check_number("Load ToVA Adapter input strength", value, -4.0, 4.0)


def test_range_is_inclusive_and_named():
    assert check_number("x", -4.0, -4.0, 4.0) == -4.0 and check_number("x", 4, -4.0, 4.0) == 4
    with pytest.raises(ConceptSplitError, match=r"x is out of range.*Seen: 4.000001.*from -4 to 4"):
        check_number("x", 4.000001, -4.0, 4.0)
    with pytest.raises(ConceptSplitError, match=r"x is out of range.*Seen: -1.*at least 0"):
        check_number("x", -1, 0)


def test_integers_are_required_where_declared():
    assert check_number("steps", 3, 1, 10000, integer=True) == 3
    for value in (3.0, 2.5, "3", True, None):
        with pytest.raises(ConceptSplitError, match="steps is not an integer"):
            check_number("steps", value, 1, 10000, integer=True)
    with pytest.raises(ConceptSplitError, match=r"out of range.*an integer from 1 to 18446744073709551615"):
        check_number("seed", 0, 1, 0xFFFFFFFFFFFFFFFF, integer=True)
    for value in ("0.5", None, [1.0], True):
        with pytest.raises(ConceptSplitError, match="alpha is not a number"):
            check_number("alpha", value, 0.0, 1.0)


@pytest.mark.parametrize(
    "field", ["kl_threshold", "step_scale", "smoothing_sigma", "mask_percentile", "mask_sigma", "boost", "suppression"]
)
@pytest.mark.parametrize("value", [NAN, INF])
def test_every_float_loda_setting_must_be_finite(field, value):
    with pytest.raises(ConceptSplitError, match=f"LODA setting {field} is not a finite number"):
        LodaConfig(**{field: value}).validate()


@pytest.mark.parametrize("field", ["learning_rate", "alpha", "grad_clip", "weight_decay", "adam_eps"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_every_float_training_setting_must_be_finite(field, value):
    with pytest.raises(ConceptSplitError, match=f"Training setting {field} is not a finite number"):
        TrainConfig(**{field: value}).validate()
    with pytest.raises(ConceptSplitError, match="Training setting adam_betas is not a finite number"):
        TrainConfig(adam_betas=(0.9, value)).validate()


# --- a damaged training checkpoint must not resume into NaN weights -------------------------------------------------

SHAPES = {"down.attn2.to_v": (8, 6), "mid.attn2.to_v": (8, 4)}  # layer -> (d, C)


def checkpoint(tmp_path, edit=None, record_edit=None):
    """A real 2-step checkpoint, then `edit(tensors)` / `record_edit(record)` applied to the saved file."""
    lora = ToVALoraSet(SHAPES, rank=2, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-2)
    for _ in range(2):
        loss = sum((b @ a).pow(2).sum() + a.sum() for a, b in lora.pairs().values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = save_training_checkpoint(
        tmp_path / "run.tova-checkpoint",
        TrainingState(2, lora.state_for_saving(), optimizer.state_dict(), loss_history=[0.5, 0.25]),
    )
    with safe_open_pt(path) as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = dict(handle.metadata())
    record = json.loads(metadata[CHECKPOINT_FORMAT])
    if edit:
        edit(tensors)
    if record_edit:
        record_edit(record)
    metadata[CHECKPOINT_FORMAT] = json.dumps(record)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def safe_open_pt(path):
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")


def test_an_intact_checkpoint_loads(tmp_path):
    state = load_training_checkpoint(checkpoint(tmp_path))
    assert state.step == 2 and state.loss_history == [0.5, 0.25]


def _set(name, index, value):
    def edit(tensors):
        tensors[name].view(-1)[index] = value

    return edit


@pytest.mark.parametrize(
    "edit, record_edit, seen",
    [
        (_set("lora.0.A", 3, NAN), None, "non-finite values in lora down.attn2.to_v A"),
        (_set("optimizer.1.exp_avg", 0, INF), None, "non-finite values in optimizer state 1 exp_avg"),
        (_set("optimizer.0.exp_avg_sq", 0, -1.0), None, "negative values in optimizer state 0 exp_avg_sq"),
        (None, lambda r: r["param_groups"][0].__setitem__("lr", NAN), "optimizer setting lr = nan"),
        (None, lambda r: r["param_groups"][0].__setitem__("betas", [0.9, INF]), r"optimizer setting betas"),
        (None, lambda r: r.__setitem__("loss_history", [0.5, NAN]), "loss history holds nan"),
        (None, lambda r: r.__setitem__("step", -1), "step -1"),
        (None, lambda r: r.__setitem__("step", "two"), "ValueError"),
        (lambda t: t.pop("lora.1.B"), None, "KeyError"),
    ],
)
def test_damaged_checkpoints_are_refused_before_resuming(tmp_path, edit, record_edit, seen):
    path = checkpoint(tmp_path, edit, record_edit)
    with pytest.raises(ConceptSplitError, match=f'checkpoint "run.tova-checkpoint" is damaged.*Seen: .*{seen}'):
        load_training_checkpoint(path)


def test_unreadable_checkpoint_record_is_refused(tmp_path):
    path = checkpoint(tmp_path)
    with safe_open_pt(path) as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    safetensors.torch.save_file(tensors, str(path), metadata={CHECKPOINT_FORMAT: "{not json"})
    with pytest.raises(ConceptSplitError, match="is damaged.*unreadable record"):
        load_training_checkpoint(path)


def test_a_checkpoint_past_the_runs_end_is_refused(tmp_path):
    """Resuming a 5-step checkpoint into a 3-step run would save the 5-step weights as the 3-step adapter."""
    from conceptsplit_core.training import NoiseSchedule, TrainingData

    lora = ToVALoraSet(SHAPES, rank=2, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-4)
    record = {"word": "dog"}
    path = save_training_checkpoint(
        tmp_path / "run.tova-checkpoint",
        TrainingState(5, lora.state_for_saving(), optimizer.state_dict(), loss_history=[1.0] * 5, extra=record),
    )
    data = TrainingData(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), (2,))
    schedule = NoiseSchedule(torch.linspace(0.03, 14.6, 1000), "eps", 1.0)

    def denoise(*_):
        raise AssertionError("no step may run")

    with pytest.raises(ConceptSplitError, match=r"past the end of this run.*step 5, steps = 3.*set steps to 5"):
        train_tova(
            lora,
            data,
            schedule,
            denoise,
            TrainConfig(steps=3),
            run_record=record,
            checkpoint=CheckpointPlan(path, 0, True),
        )


def test_check_choice_returns_a_listed_value_and_names_the_list_otherwise():
    assert check_choice("mask_mode", "constrain", ("replace", "constrain")) == "constrain"
    with pytest.raises(ConceptSplitError, match=r"Unknown mask_mode") as raised:
        check_choice("mask_mode", "guide", ("replace", "constrain"))
    text = str(raised.value)
    assert "'guide'" in text and "replace, constrain" in text and "pick one from the list" in text
