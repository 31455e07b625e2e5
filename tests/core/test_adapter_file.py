"""Adapter files (method §2.7): native round trip, official format, and every refusal with its message."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from safetensors.torch import save_file

from conceptsplit_core.adapter_file import (
    FLOAT32_MAX,
    FORMAT_NATIVE,
    FORMAT_OFFICIAL,
    AdapterMetadata,
    delta_frobenius_norm,
    read_adapter_file,
    write_adapter_file,
)
from conceptsplit_core.errors import ConceptSplitError

# A small SD2.1-shaped layer set: (diffusers path, C) with d = 16.
LAYERS = [
    ("down_blocks.0.attentions.0.transformer_blocks.0", 8),
    ("mid_block.attentions.0.transformer_blocks.0", 12),
    ("up_blocks.1.attentions.2.transformer_blocks.0", 8),
]
WIDTH, RANK = 16, 4


def make_layers(seed=0, rank=RANK):
    g = torch.Generator().manual_seed(seed)
    return {path: (torch.randn(rank, WIDTH, generator=g), torch.randn(c, rank, generator=g)) for path, c in LAYERS}


def make_metadata(**overrides):
    values = dict(
        base_model="sd2.1-v",
        text_width=WIDTH,
        rank=RANK,
        alpha=RANK,
        identifier_word="dog",
        role="object",
        prediction="v",
        layers=len(LAYERS),
        training={"train_steps": "300", "train_lr": "0.0001"},
    )
    values.update(overrides)
    return AdapterMetadata(**values)


def raw_native_file(path, layers, metadata):
    """A native-format file written without the validating writer (to build damaged files on purpose)."""
    tensors = {
        f"tova.{p}.attn2.to_v.lora_{part}.weight": t for p, (a, b) in layers.items() for part, t in (("A", a), ("B", b))
    }
    save_file(tensors, str(path), metadata=metadata.to_strings())
    return path


def official_state(layers):
    out = {}
    for path, (a, b) in layers.items():
        out[f"unet.{path}.attn2.to_v.original_linear.lora_A.weight"] = a
        out[f"unet.{path}.attn2.to_v.original_linear.lora_B.weight"] = b
    return out


def test_native_round_trip_keeps_tensors_and_metadata(tmp_path):
    layers = make_layers()
    path = write_adapter_file(tmp_path / "dog.safetensors", layers, make_metadata())
    loaded = read_adapter_file(path)
    assert loaded.file_format == FORMAT_NATIVE
    assert (loaded.rank, loaded.text_width, loaded.alpha, loaded.scale) == (RANK, WIDTH, 4.0, 1.0)
    assert loaded.metadata.identifier_word == "dog" and loaded.metadata.family == "sd2.1"
    assert loaded.metadata.training == {"train_steps": "300", "train_lr": "0.0001"}
    for key, (a, b) in layers.items():
        assert torch.equal(loaded.layers[key][0], a) and torch.equal(loaded.layers[key][1], b)


def test_native_keys_are_tova_prefixed_and_fp16_option_halves_the_file(tmp_path):
    layers = make_layers()
    p32 = write_adapter_file(tmp_path / "a32.safetensors", layers, make_metadata())
    p16 = write_adapter_file(tmp_path / "a16.safetensors", layers, make_metadata(), dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(str(p16), "pt") as f:
        keys = list(f.keys())
        assert all(k.startswith("tova.") and ".attn2.to_v.lora_" in k for k in keys)
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}
        assert f.metadata()["conceptsplit.format"] == "tova" and f.metadata()["conceptsplit.format_version"] == "1"
    n_params = sum(a.numel() + b.numel() for a, b in layers.values())
    header = lambda p: 8 + int.from_bytes(p.read_bytes()[:8], "little")  # noqa: E731 - safetensors header length
    assert p32.stat().st_size - header(p32) == 4 * n_params and p16.stat().st_size - header(p16) == 2 * n_params
    loaded = read_adapter_file(p16)
    a, _ = loaded.layers[LAYERS[0][0]]
    assert a.dtype == torch.float32 and torch.equal(a, layers[LAYERS[0][0]][0].half().float())


def test_write_refuses_to_overwrite_unless_asked(tmp_path):
    path = write_adapter_file(tmp_path / "dog.safetensors", make_layers(0), make_metadata())
    before = path.read_bytes()
    with pytest.raises(ConceptSplitError, match="already exists"):
        write_adapter_file(path, make_layers(1), make_metadata())
    assert path.read_bytes() == before
    write_adapter_file(path, make_layers(1), make_metadata(), overwrite=True)
    assert path.read_bytes() != before


def test_official_format_loads_with_alpha_equal_rank(tmp_path):
    layers = make_layers()
    save_file(official_state(layers), str(tmp_path / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    loaded = read_adapter_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert loaded.file_format == FORMAT_OFFICIAL and loaded.metadata is None
    assert loaded.scale == 1.0 and loaded.rank == RANK
    for key, (a, b) in layers.items():
        assert torch.equal(loaded.layers[key][0], a) and torch.equal(loaded.layers[key][1], b)


def test_official_pt_with_plain_tensors_loads_via_weights_only(tmp_path):
    layers = make_layers()
    torch.save(official_state(layers), tmp_path / "official.pt")
    loaded = read_adapter_file(tmp_path / "official.pt")
    assert loaded.file_format == FORMAT_OFFICIAL and len(loaded.layers) == len(LAYERS)


class Payload:  # a pickled object: torch.load(weights_only=True) must refuse it
    def __reduce__(self):
        return (print, ("pickle executed",))


def test_pickle_with_objects_is_refused(tmp_path):
    with open(tmp_path / "evil.ckpt", "wb") as handle:
        pickle.dump({"x": Payload()}, handle)
    with pytest.raises(ConceptSplitError, match="cannot be loaded safely.*weights_only") as caught:
        read_adapter_file(tmp_path / "evil.ckpt")
    message = str(caught.value)
    # PyTorch's own message says re-running with weights_only=False "will likely succeed"; the pack's says don't.
    assert "will likely succeed" not in message and "add_safe_globals" not in message
    assert "do not load it with weights_only=False" in message and "run any code the file contains" in message


@pytest.mark.parametrize(
    "keys, message",
    [
        (
            {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.lora_down.weight": (4, 16)},
            "regular LoRA, not a token-wise ToVA adapter.*Load LoRA",
        ),
        (
            {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight": (4, 16)},
            "regular LoRA",
        ),  # PEFT / diffusers keys without original_linear
        ({"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.lora_up.weight": (8, 4)}, "regular LoRA"),
        (
            {"tova.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 16)},
            "more than the cross-attention value projection",
        ),
        (
            {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.original_linear.lora_A.weight": (4, 16)},
            "more than the cross-attention value projection",
        ),
        ({"model.weight": (4, 4)}, "is not a ToVA adapter"),
    ],
)
def test_non_tova_files_are_refused(tmp_path, keys, message):
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ConceptSplitError, match=message):
        read_adapter_file(tmp_path / "x.safetensors")


def test_truncated_file_is_refused(tmp_path):
    path = write_adapter_file(tmp_path / "dog.safetensors", make_layers(), make_metadata())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConceptSplitError, match="truncated or corrupt"):
        read_adapter_file(path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ConceptSplitError, match="truncated or corrupt"):
        read_adapter_file(path)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(ConceptSplitError, match="does not exist"):
        read_adapter_file(tmp_path / "nope.safetensors")
    (tmp_path / "a.txt").write_text("hi")
    with pytest.raises(ConceptSplitError, match="unsupported file type"):
        read_adapter_file(tmp_path / "a.txt")


def test_nan_weights_are_refused(tmp_path):
    layers = make_layers()
    layers[LAYERS[1][0]][1][0, 0] = float("nan")
    path = raw_native_file(tmp_path / "nan.safetensors", layers, make_metadata())
    with pytest.raises(ConceptSplitError, match="NaN or Inf.*1 non-finite values in lora_B"):
        read_adapter_file(path)


def test_mixed_ranks_missing_half_and_bad_metadata(tmp_path):
    layers = make_layers()
    layers[LAYERS[0][0]] = (torch.randn(2, WIDTH), torch.randn(8, 2))
    save_file(official_state(layers), str(tmp_path / "mixed.safetensors"))
    with pytest.raises(ConceptSplitError, match=r"mixes ranks.*ranks \[2, 4\]"):
        read_adapter_file(tmp_path / "mixed.safetensors")

    state = official_state(make_layers())
    state.pop(f"unet.{LAYERS[2][0]}.attn2.to_v.original_linear.lora_B.weight")
    save_file(state, str(tmp_path / "half.safetensors"))
    with pytest.raises(ConceptSplitError, match="missing lora_B"):
        read_adapter_file(tmp_path / "half.safetensors")

    path = raw_native_file(tmp_path / "lying.safetensors", make_layers(), make_metadata(rank=8))
    with pytest.raises(ConceptSplitError, match="metadata that does not match its tensors"):
        read_adapter_file(path)

    path = raw_native_file(tmp_path / "flux.safetensors", make_layers(), make_metadata(base_model="flux"))
    with pytest.raises(ConceptSplitError, match="Unknown base model 'flux'"):
        read_adapter_file(path)


def test_native_without_metadata_is_refused(tmp_path):
    tensors = {
        f"tova.{p}.attn2.to_v.lora_{part}.weight": t
        for p, (a, b) in make_layers().items()
        for part, t in (("A", a), ("B", b))
    }
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ConceptSplitError, match="lacks metadata field conceptsplit.format"):
        read_adapter_file(tmp_path / "bare.safetensors")


def test_writer_refuses_metadata_that_contradicts_the_tensors_and_fills_in_layers(tmp_path):
    with pytest.raises(ConceptSplitError, match="metadata does not match the tensors"):
        write_adapter_file(tmp_path / "x.safetensors", make_layers(), make_metadata(rank=8))
    assert not (tmp_path / "x.safetensors").exists()
    path = write_adapter_file(tmp_path / "x.safetensors", make_layers(), make_metadata(layers=0))
    assert read_adapter_file(path).metadata.layers == len(LAYERS)


def test_sft_extension_is_read_as_safetensors(tmp_path):
    path = write_adapter_file(tmp_path / "dog.sft", make_layers(), make_metadata())
    assert read_adapter_file(path).file_format == FORMAT_NATIVE


# --- damaged numbers (issue 11, items 1-2): metadata, shapes, and a delta float32 cannot hold ----------------------


def raw_native_strings(path, tensor_layers, **fields):
    """A native file whose conceptsplit.* metadata strings are overridden as given (field=text), unvalidated."""
    meta = make_metadata().to_strings() | {f"conceptsplit.{key}": text for key, text in fields.items()}
    tensors = {
        f"tova.{p}.attn2.to_v.lora_{part}.weight": t
        for p, (a, b) in tensor_layers.items()
        for part, t in (("A", a), ("B", b))
    }
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf", "-4", "0"])
def test_alpha_that_is_not_a_finite_positive_number_is_refused(tmp_path, alpha):
    path = raw_native_strings(tmp_path / "a.safetensors", make_layers(), alpha=alpha)
    with pytest.raises(ConceptSplitError, match=f"invalid alpha.*conceptsplit.alpha = '{alpha}'.*finite positive"):
        read_adapter_file(path)


def test_huge_alpha_is_refused_because_the_scaled_delta_overflows_float32(tmp_path):
    layers = make_layers()
    smallest = min(delta_frobenius_norm(a, b) for a, b in layers.values())
    assert 1e38 / RANK * smallest > FLOAT32_MAX  # the premise: every layer's scaled delta is past float32's range
    path = raw_native_strings(tmp_path / "a.safetensors", layers, alpha="1e38")
    with pytest.raises(
        ConceptSplitError,
        match=r"too large to compute with: its delta overflows float32.*"
        r"scale alpha/rank = 2\.5e\+37",
    ):
        read_adapter_file(path)


@pytest.mark.parametrize("official", [False, True])
def test_finite_weights_whose_product_overflows_float32_are_refused(tmp_path, official):
    # x1e20 on A and on B: every entry stays finite in float32 (|x| < 3.4e38), but B·A grows by 1e40.
    layers = {path: (a * 1e20, b * 1e20) for path, (a, b) in make_layers().items()}
    assert all(bool(torch.isfinite(t).all()) for pair in layers.values() for t in pair)
    assert not bool(torch.isfinite(next(iter(layers.values()))[1] @ next(iter(layers.values()))[0]).all())
    if official:
        save_file(official_state(layers), str(tmp_path / "big.safetensors"))
        path = tmp_path / "big.safetensors"
    else:
        path = raw_native_file(tmp_path / "big.safetensors", layers, make_metadata())
    with pytest.raises(ConceptSplitError, match="overflows float32 at layer down_blocks.0"):
        read_adapter_file(path)


def test_delta_norm_is_the_frobenius_norm_of_b_times_a():
    from fractions import Fraction

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 16, generator=g).double(), torch.randn(8, 4, generator=g).double()
    # Exact reference: float64 values are rationals, so ||B·A||_F² is computed without rounding.
    fa, fb = [[Fraction(x) for x in row] for row in a.tolist()], [[Fraction(x) for x in row] for row in b.tolist()]
    exact = math.sqrt(float(sum(sum(fb[i][k] * fa[k][j] for k in range(4)) ** 2 for i in range(8) for j in range(16))))
    # The Gram form sums r² = 16 signed products of sums of C = 8 and d = 16 terms: a float64 sum of n terms errs by
    # at most n·eps times the sum of the terms' magnitudes (n = 8 + 16 + 16 = 40 along any chain), so the squared
    # norm is off by at most 40·eps·sum|G∘H|, the norm by half that relative to it (plus the final sqrt's half ulp).
    gram_terms = float(((b.T @ b) * (a @ a.T)).abs().sum())
    eps = torch.finfo(torch.float64).eps
    bound = (40 * eps * gram_terms / exact**2 / 2 + eps) * exact
    assert abs(delta_frobenius_norm(a, b) - exact) <= bound
    assert delta_frobenius_norm(a, torch.zeros(8, 4)) == 0.0


def test_read_adapter_records_each_layers_delta_norm(tmp_path):
    layers = make_layers()
    loaded = read_adapter_file(write_adapter_file(tmp_path / "dog.safetensors", layers, make_metadata()))
    assert loaded.delta_norms == {path: delta_frobenius_norm(a, b) for path, (a, b) in layers.items()}


@pytest.mark.parametrize("official", [False, True])
def test_rank_zero_adapter_is_refused_with_the_packs_message(tmp_path, official):
    layers = {path: (torch.zeros(0, WIDTH), torch.zeros(c, 0)) for path, c in LAYERS}
    if official:
        save_file(official_state(layers), str(tmp_path / "r0.safetensors"))
        match = r"empty layer at down_blocks.0.*lora_A \(0, 16\), lora_B \(8, 0\)"
    else:
        raw_native_strings(tmp_path / "r0.safetensors", layers, rank="0")
        match = r"metadata conceptsplit.rank is out of range.*Seen: 0.*at least 1"
    with pytest.raises(ConceptSplitError, match=match):
        read_adapter_file(tmp_path / "r0.safetensors")


def test_rank_zero_tensors_with_a_positive_metadata_rank_are_refused(tmp_path):
    layers = {path: (torch.zeros(0, WIDTH), torch.zeros(c, 0)) for path, c in LAYERS}
    raw_native_strings(tmp_path / "r0.safetensors", layers)  # metadata still says rank 4
    with pytest.raises(ConceptSplitError, match="empty layer"):
        read_adapter_file(tmp_path / "r0.safetensors")


@pytest.mark.parametrize(
    "shapes", [((4, WIDTH), (8, 3)), ((4, WIDTH, 1), (8, 4)), ((4,), (8, 4)), ((4, WIDTH), (8, 4, 1))]
)
def test_mismatched_or_wrong_dimensional_tensors_are_refused(tmp_path, shapes):
    layers = make_layers()
    layers[LAYERS[0][0]] = (torch.ones(shapes[0]), torch.ones(shapes[1]))
    save_file(official_state(layers), str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConceptSplitError, match="mis-shaped tensors at down_blocks.0"):
        read_adapter_file(tmp_path / "bad.safetensors")


def test_integer_tensors_are_refused(tmp_path):
    layers = make_layers()
    a, b = layers[LAYERS[0][0]]
    layers[LAYERS[0][0]] = (a.to(torch.int32), b)
    save_file(official_state(layers), str(tmp_path / "int.safetensors"))
    with pytest.raises(ConceptSplitError, match="stores lora_A of layer down_blocks.0.* as torch.int32"):
        read_adapter_file(tmp_path / "int.safetensors")


@pytest.mark.parametrize(
    "field, text, message",
    [
        ("text_width", "-16", "metadata conceptsplit.text_width is out of range"),
        ("layers", "0", "metadata conceptsplit.layers is out of range"),
        ("rank", "four", "non-numeric metadata"),
        ("format_version", "0", "uses format version 0"),
        ("format_version", "\u00b2", "uses format version"),  # a digit to str.isdigit, not to int()
        ("train_lr", "nan", "metadata conceptsplit.train_lr is not a finite number"),
        ("train_steps", "-3", "metadata conceptsplit.train_steps is out of range"),
        ("train_steps", "many", "metadata conceptsplit.train_steps is not an integer"),
    ],
)
def test_every_other_numeric_metadata_field_is_checked(tmp_path, field, text, message):
    path = raw_native_strings(tmp_path / "m.safetensors", make_layers(), **{field: text})
    with pytest.raises(ConceptSplitError, match=message):
        read_adapter_file(path)


def test_writer_refuses_a_rank_zero_adapter(tmp_path):
    layers = {path: (torch.zeros(0, WIDTH), torch.zeros(c, 0)) for path, c in LAYERS}
    with pytest.raises(ConceptSplitError, match="empty layer"):
        write_adapter_file(tmp_path / "r0.safetensors", layers, make_metadata(rank=0))
    assert not (tmp_path / "r0.safetensors").exists()
