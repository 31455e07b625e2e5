"""Adapter files (spec §2.7): native round trip, official format, and every refusal with its message."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from conceptsplit_core.adapter_file import (
    FORMAT_NATIVE,
    FORMAT_OFFICIAL,
    AdapterMetadata,
    read_adapter_file,
    write_adapter_file,
)
from conceptsplit_core.errors import ConceptSplitError

# A small SD2.1-shaped layer set: (diffusers path, C) with d = 16.
LAYERS = [("down_blocks.0.attentions.0.transformer_blocks.0", 8), ("mid_block.attentions.0.transformer_blocks.0", 12),
          ("up_blocks.1.attentions.2.transformer_blocks.0", 8)]
WIDTH, RANK = 16, 4


def make_layers(seed=0, rank=RANK):
    g = torch.Generator().manual_seed(seed)
    return {path: (torch.randn(rank, WIDTH, generator=g), torch.randn(c, rank, generator=g)) for path, c in LAYERS}


def make_metadata(**overrides):
    values = dict(base_model="sd2.1-v", text_width=WIDTH, rank=RANK, alpha=RANK, identifier_word="dog",
                  role="object", prediction="v", layers=len(LAYERS),
                  training={"train_steps": "300", "train_lr": "0.0001"})
    values.update(overrides)
    return AdapterMetadata(**values)


def raw_native_file(path, layers, metadata):
    """A native-format file written without the validating writer (to build damaged files on purpose)."""
    tensors = {f"tova.{p}.attn2.to_v.lora_{part}.weight": t for p, (a, b) in layers.items()
               for part, t in (("A", a), ("B", b))}
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
    with pytest.raises(ConceptSplitError, match="cannot be loaded safely.*weights_only"):
        read_adapter_file(tmp_path / "evil.ckpt")


@pytest.mark.parametrize("keys, message", [
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.lora_down.weight": (4, 16)},
     "regular LoRA, not a token-wise ToVA adapter.*Load LoRA"),
    ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight": (4, 16)},
     "regular LoRA"),  # PEFT / diffusers keys without original_linear
    ({"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.lora_up.weight": (8, 4)}, "regular LoRA"),
    ({"tova.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 16)},
     "more than the cross-attention value projection"),
    ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.original_linear.lora_A.weight": (4, 16)},
     "more than the cross-attention value projection"),
    ({"model.weight": (4, 4)}, "is not a ToVA adapter"),
])
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
    tensors = {f"tova.{p}.attn2.to_v.lora_{part}.weight": t for p, (a, b) in make_layers().items()
               for part, t in (("A", a), ("B", b))}
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
