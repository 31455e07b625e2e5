"""Tests for conceptsplit_core.tova_lora and atomic_file: init, targets, checkpoints, atomic writes (method
§2.5-§2.7)."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from conceptsplit_core.atomic_file import atomic_replace, atomic_write_bytes, safe_save_name
from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.training_data import TrainConfig, sample_training_noise
from conceptsplit_core.tova_lora import (
    CHECKPOINT_FORMAT,
    ToVALoraSet,
    TrainingState,
    init_lora_pair,
    load_training_checkpoint,
    save_training_checkpoint,
)

# SD2.1's 16 attn2.to_v layers (method §2.2): (diffusers path, C).
_SD21_LAYERS = (
    [(f"down_blocks.{b}.attentions.{a}", c) for b, c in ((0, 320), (1, 640), (2, 1280)) for a in (0, 1)]
    + [("mid_block.attentions.0", 1280)]
    + [(f"up_blocks.{b}.attentions.{a}", c) for b, c in ((1, 1280), (2, 640), (3, 320)) for a in (0, 1, 2)]
)
_TOY_SHAPES = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": (8, 6), "mid_block.attn2.to_v": (8, 4)}


# --- init and the parameter set ----------------------------------------------------------------------------------


def test_init_statistics():
    rank = 64
    lora_a, lora_b = init_lora_pair(rank, 1024, 1280, torch.Generator().manual_seed(0))
    assert lora_a.shape == (64, 1024) and lora_b.shape == (1280, 64) and lora_a.dtype == torch.float32
    # 65536 draws: the sample std is off by ~1/√(2N) = 0.3 % and the mean by σ/√N = 0.4 % of σ; 5 % is > 10 of those
    assert abs(lora_a.std().item() - 1 / rank) < 0.05 / rank
    assert abs(lora_a.mean().item()) < 0.05 / rank
    assert torch.count_nonzero(lora_b) == 0
    row = torch.randn(3, 1024)
    assert torch.count_nonzero((row @ lora_a.T) @ lora_b.T) == 0  # delta exactly zero at step 0 (method §2.5)
    again, _ = init_lora_pair(rank, 1024, 1280, torch.Generator().manual_seed(0))
    assert torch.equal(lora_a, again)
    assert init_lora_pair(4, 8, 8, dtype=torch.float16)[0].dtype == torch.float16


def test_sd21_adapter_size_matches_paper():
    shapes = {f"{path}.transformer_blocks.0.attn2.to_v": (1024, c) for path, c in _SD21_LAYERS}
    lora = ToVALoraSet(shapes, rank=64, generator=torch.Generator().manual_seed(0))
    assert len(lora.layer_keys) == 16
    assert sum(p.numel() for p in lora.parameters()) == 1_847_296  # method §2.2: 7.39 MB in fp32


def test_lora_set_layout_and_scale():
    lora = ToVALoraSet(_TOY_SHAPES, rank=4, generator=torch.Generator().manual_seed(1))
    assert (lora.rank, lora.alpha, lora.scale) == (4, 4.0, 1.0)
    assert ToVALoraSet(_TOY_SHAPES, rank=4, alpha=2).scale == 0.5
    pairs = lora.pairs()
    assert list(pairs) == list(_TOY_SHAPES)
    lora_a, lora_b = pairs["mid_block.attn2.to_v"]
    assert lora_a.shape == (4, 8) and lora_b.shape == (4, 4)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora.parameters())
    assert len(list(lora.parameters())) == 4
    assert all("." not in key for key in [*lora.lora_A.keys(), *lora.lora_B.keys()])


def test_lora_set_rejects_bad_arguments():
    with pytest.raises(ConceptSplitError, match="rank"):
        ToVALoraSet(_TOY_SHAPES, rank=0)
    with pytest.raises(ConceptSplitError, match="collide"):
        ToVALoraSet({"a.b": (2, 2), "a__b": (2, 2)}, rank=1)


def test_state_for_saving_is_detached_clone():
    lora = ToVALoraSet(_TOY_SHAPES, rank=4, generator=torch.Generator().manual_seed(1))
    saved = lora.state_for_saving()
    key = "mid_block.attn2.to_v"
    saved[key][0].add_(1.0)
    assert not torch.equal(saved[key][0], lora.pairs()[key][0])
    assert not saved[key][0].requires_grad and saved[key][0].device.type == "cpu"


def test_deepcopy_keeps_identity():
    lora = ToVALoraSet(_TOY_SHAPES, rank=4)
    options = {"transformer_options": {"conceptsplit_adapters": [lora]}}
    assert copy.deepcopy(options)["transformer_options"]["conceptsplit_adapters"][0] is lora


def test_load_pairs_round_trip_and_mismatch():
    source = ToVALoraSet(_TOY_SHAPES, rank=4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for _, lora_b in source.pairs().values():
            lora_b.normal_()
    target = ToVALoraSet(_TOY_SHAPES, rank=4, generator=torch.Generator().manual_seed(2))
    parameter_ids = [id(p) for p in target.parameters()]
    target.load_pairs(source.state_for_saving())
    assert [id(p) for p in target.parameters()] == parameter_ids
    for key, (a, b) in source.pairs().items():
        assert torch.equal(a, target.pairs()[key][0]) and torch.equal(b, target.pairs()[key][1])
    with pytest.raises(ConceptSplitError, match="do not match"):
        target.load_pairs({"mid_block.attn2.to_v": source.pairs()["mid_block.attn2.to_v"]})
    wrong_rank = ToVALoraSet(_TOY_SHAPES, rank=2).state_for_saving()
    with pytest.raises(ConceptSplitError, match="other shapes"):
        target.load_pairs(wrong_rank)


# --- checkpoints -------------------------------------------------------------------------------------------------


def _train(lora: ToVALoraSet, optimizer: torch.optim.Optimizer, steps: range, losses: list[float]) -> None:
    """Toy quadratic loss with the recipe's clip and step-seeded inputs: fit B A c to fixed targets."""
    targets = {
        key: torch.randn(3, c, generator=torch.Generator().manual_seed(i))
        for i, (key, (_, c)) in enumerate(_TOY_SHAPES.items())
    }
    for step in steps:
        _, features = sample_training_noise(step, seed=9, shape=(3, 8))  # (3, d), changes every step
        loss = sum(
            ((features @ a.T @ b.T) * lora.scale - targets[key]).pow(2).mean() for key, (a, b) in lora.pairs().items()
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(lora.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())


def _optimizer(lora: ToVALoraSet) -> torch.optim.AdamW:
    config = TrainConfig()
    return torch.optim.AdamW(
        lora.parameters(), lr=0.05, betas=config.adam_betas, weight_decay=config.weight_decay, eps=config.adam_eps
    )


def test_resume_is_bitwise_identical(tmp_path):
    straight = ToVALoraSet(_TOY_SHAPES, rank=4, generator=torch.Generator().manual_seed(0))
    straight_opt, straight_losses = _optimizer(straight), []
    _train(straight, straight_opt, range(10), straight_losses)

    first = ToVALoraSet(_TOY_SHAPES, rank=4, generator=torch.Generator().manual_seed(0))
    first_opt, losses = _optimizer(first), []
    _train(first, first_opt, range(5), losses)
    path = tmp_path / "checkpoint-5.safetensors"
    generator_state = torch.Generator().manual_seed(3).get_state()
    save_training_checkpoint(
        path,
        TrainingState(
            5,
            first.state_for_saving(),
            first_opt.state_dict(),
            rng={"seed": 9, "crop_generator": generator_state},
            loss_history=losses,
            extra={"identifier_word": "dog"},
        ),
    )

    state = load_training_checkpoint(path)
    resumed = ToVALoraSet(_TOY_SHAPES, rank=4, generator=torch.Generator().manual_seed(123))  # other init
    resumed.load_pairs(state.lora)
    resumed_opt = _optimizer(resumed)
    resumed_opt.load_state_dict(state.optimizer)
    assert state.step == 5 and state.rng["seed"] == 9 and state.extra == {"identifier_word": "dog"}
    assert torch.equal(state.rng["crop_generator"], generator_state)
    resumed_losses = list(state.loss_history)
    _train(resumed, resumed_opt, range(state.step, 10), resumed_losses)

    assert resumed_losses == straight_losses
    for key, (a, b) in straight.pairs().items():
        assert torch.equal(a, resumed.pairs()[key][0]) and torch.equal(b, resumed.pairs()[key][1])
    for p_straight, p_resumed in zip(straight.parameters(), resumed.parameters()):
        s_state, r_state = straight_opt.state[p_straight], resumed_opt.state[p_resumed]
        assert torch.equal(s_state["exp_avg"], r_state["exp_avg"])
        assert torch.equal(s_state["exp_avg_sq"], r_state["exp_avg_sq"])
        assert torch.equal(s_state["step"], r_state["step"])
    assert not torch.equal(straight.pairs()["mid_block.attn2.to_v"][1], torch.zeros(4, 4))  # it did train


def test_checkpoint_file_is_plain_safetensors(tmp_path):
    lora = ToVALoraSet(_TOY_SHAPES, rank=4, generator=torch.Generator().manual_seed(0))
    optimizer = _optimizer(lora)
    _train(lora, optimizer, range(2), [])
    path = save_training_checkpoint(
        tmp_path / "c.safetensors", TrainingState(2, lora.state_for_saving(), optimizer.state_dict())
    )
    with safe_open(str(path), framework="pt") as handle:
        record = json.loads(handle.metadata()[CHECKPOINT_FORMAT])
        names = set(handle.keys())
    assert record["step"] == 2 and record["layer_keys"] == list(_TOY_SHAPES)
    assert {"lora.0.A", "lora.1.B", "optimizer.0.exp_avg", "optimizer.3.exp_avg_sq", "optimizer.3.step"} <= names
    assert record["param_groups"][0]["betas"] == [0.9, 0.999]
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    with pytest.raises(ConceptSplitError, match="already exists"):
        save_training_checkpoint(
            path, TrainingState(2, lora.state_for_saving(), optimizer.state_dict()), overwrite=False
        )


def test_load_rejects_other_files(tmp_path):
    adapter = tmp_path / "adapter.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(adapter), metadata={"conceptsplit.format": "tova"})
    with pytest.raises(ConceptSplitError, match="not a ConceptSplit training checkpoint"):
        load_training_checkpoint(adapter)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ConceptSplitError, match="Cannot read"):
        load_training_checkpoint(garbage)
    with pytest.raises(ConceptSplitError, match="Cannot read"):
        load_training_checkpoint(tmp_path / "missing.safetensors")


# --- atomic writes and save names --------------------------------------------------------------------------------


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.safetensors"

    def failing_writer(handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_replace(target, failing_writer)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"original")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_replace(target, failing_writer)
    assert target.read_bytes() == b"original" and list(tmp_path.iterdir()) == [target]


def test_atomic_write_overwrite_rules(tmp_path):
    target = tmp_path / "dog.safetensors"
    assert atomic_write_bytes(target, b"one") == target and target.read_bytes() == b"one"
    with pytest.raises(
        ConceptSplitError, match=r'"dog.safetensors" already exists.*another save name or enable overwrite'
    ):
        atomic_write_bytes(target, b"two", overwrite=False)
    assert target.read_bytes() == b"one"
    atomic_write_bytes(target, b"three")
    assert target.read_bytes() == b"three" and list(tmp_path.iterdir()) == [target]
    with pytest.raises(ConceptSplitError, match="folder does not exist"):
        atomic_write_bytes(tmp_path / "missing" / "x.bin", b"x")


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "", "   ", "a\\b", "..", "x/../../y"])
def test_safe_save_name_rejects(tmp_path, name):
    with pytest.raises(ConceptSplitError, match="not allowed"):
        safe_save_name(tmp_path, name)


def test_safe_save_name_accepts_plain_names(tmp_path):
    root = tmp_path.resolve()
    assert safe_save_name(tmp_path, "dog") == root / "dog.safetensors"
    assert safe_save_name(tmp_path, "dog.safetensors") == root / "dog.safetensors"
    assert safe_save_name(tmp_path, "my dog v2", suffix=".ckpt.safetensors") == root / "my dog v2.ckpt.safetensors"
