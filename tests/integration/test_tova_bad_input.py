"""Every bad ToVA input raises the pack's one error type through the real nodes, before sampling, patching nothing."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfy_harness.tiny_adapters import write_tiny_adapter
from comfy_harness.tiny_models import build_tiny_model

DISPLAY = {"sd15": "SD1.5", "sd21": "SD2.1", "sdxl": "SDXL"}


def load(pack, name, word="", **kwargs):
    node = pack.glue("adapters").LoadToVAAdapter
    args = dict(strength=1.0, role="from file", token_index=-1, adapters=None) | kwargs
    return node.execute(name, word, args["strength"], args["role"], args["token_index"], args["adapters"]).result[0]


def apply(pack, model, adapters, clip, text="a dog and a cat"):
    return pack.glue("adapters").ApplyToVA.execute(model, adapters, clip, text, True).result


@pytest.mark.parametrize("adapter_arch, model_arch", [(a, m) for a in DISPLAY for m in DISPLAY if a != m])
def test_every_family_mismatch_is_named(pack, tova_folder, adapter_arch, model_arch):
    adapter_model, _, _ = build_tiny_model(adapter_arch)
    model, clip, _ = build_tiny_model(model_arch)
    path = write_tiny_adapter(tova_folder / "dog.safetensors", adapter_model, "dog", seed=1)
    options_before = copy.deepcopy(model.model_options)
    with pytest.raises(
        pack.error,
        match=f"trained for {DISPLAY[adapter_arch]} .* but the model is "
        f"{DISPLAY[model_arch]}.*Fix: load a {DISPLAY[model_arch]} adapter",
    ):
        apply(pack, model, load(pack, path.name), clip)
    assert model.model_options == options_before


def rewrite(path, edit):
    """Rewrite an adapter file's tensors through `edit(dict)`, keeping its metadata."""
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = handle.metadata()
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


def test_missing_misshaped_and_non_value_layers(pack, tova_folder):
    model, clip, _ = build_tiny_model("sd21")
    path = write_tiny_adapter(tova_folder / "dog.safetensors", model, "dog", seed=1)

    def drop_middle(t):
        for key in [k for k in t if "mid_block" in k]:
            t.pop(key)

    rewrite(path, drop_middle)
    with pytest.raises(pack.error, match="metadata that does not match its tensors"):
        load(pack, path.name)

    path = write_tiny_adapter(tova_folder / "dog2.safetensors", model, "dog", seed=1, official=True)
    rewrite(path, drop_middle)
    with pytest.raises(pack.error, match="does not cover this model's cross-attention layers.*missing mid_block"):
        apply(pack, model, load(pack, path.name, "dog"), clip)

    path = write_tiny_adapter(tova_folder / "dog3.safetensors", model, "dog", seed=1, official=True)

    def widen(t):
        key = next(k for k in t if k.endswith("lora_B.weight"))
        t[key] = torch.zeros(t[key].shape[0] * 2, t[key].shape[1])

    rewrite(path, widen)
    with pytest.raises(pack.error, match="shaped for another model"):
        apply(pack, model, load(pack, path.name, "dog"), clip)

    path = write_tiny_adapter(tova_folder / "dog4.safetensors", model, "dog", seed=1)

    def add_key(t):
        t["tova.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.lora_A.weight"] = torch.zeros(4, 64)

    rewrite(path, add_key)
    with pytest.raises(pack.error, match="more than the cross-attention value projection.*attn1"):
        load(pack, path.name)


def test_regular_lora_corrupt_pickle_and_nan_files(pack, tova_folder):
    save_file(
        {
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v.lora_down.weight": torch.zeros(4, 64),
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v.lora_up.weight": torch.zeros(64, 4),
        },
        str(tova_folder / "kohya.safetensors"),
    )
    with pytest.raises(pack.error, match='"kohya.safetensors" is a regular LoRA.*Load LoRA'):
        load(pack, "kohya.safetensors")

    model, _, _ = build_tiny_model("sd21")
    path = write_tiny_adapter(tova_folder / "cut.safetensors", model, "dog", seed=1)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(pack.error, match="truncated or corrupt"):
        load(pack, "cut.safetensors")

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    with open(tova_folder / "evil.pt", "wb") as handle:
        pickle.dump({"a": Evil()}, handle)
    with pytest.raises(pack.error, match="cannot be loaded safely"):
        load(pack, "evil.pt")

    path = write_tiny_adapter(tova_folder / "nan.safetensors", model, "dog", seed=1)
    rewrite(path, lambda t: t[next(iter(sorted(t)))].view(-1).__setitem__(3, float("inf")))
    with pytest.raises(pack.error, match="NaN or Inf"):
        load(pack, "nan.safetensors")


def test_word_problems(pack, tova_folder):
    model, clip, _ = build_tiny_model("sd15")
    dog = write_tiny_adapter(tova_folder / "dog.safetensors", model, "dog", seed=1)
    cat = write_tiny_adapter(tova_folder / "cat.safetensors", model, "cat", seed=2)
    with pytest.raises(
        pack.error,
        match='Identifier word "dog" of "dog.safetensors" is not in the prompt.*'
        'Seen: prompt "a cat on a sofa".*Fix: add "dog" to the prompt',
    ):
        apply(pack, model, load(pack, dog.name), clip, text="a cat on a sofa")
    with pytest.raises(pack.error, match="no free occurrence"):
        apply(pack, model, load(pack, dog.name, adapters=load(pack, dog.name)), clip, text="a dog and a cat")
    # the same word twice in the prompt serves two concepts, in order
    info = apply(pack, model, load(pack, dog.name, adapters=load(pack, dog.name)), clip, text="a dog and a dog")[2]
    assert '"dog" -> token 2' in info and '"dog" -> token 5' in info
    with pytest.raises(pack.error, match='"dogs".*do not match'):
        apply(pack, model, load(pack, dog.name), clip, text="two dogs")
    with pytest.raises(pack.error, match="Unknown concept role"):
        load(pack, cat.name, role="foreground")
    with pytest.raises(pack.error, match="not found"):
        load(pack, "missing.safetensors")
    with pytest.raises(pack.error, match="Two concepts use token index 2"):
        apply(pack, model, load(pack, cat.name, token_index=2, adapters=load(pack, dog.name, token_index=2)), clip)
    _, other_clip, _ = build_tiny_model("sd21")
    with pytest.raises(pack.error, match="The CLIP does not belong to this model"):
        apply(pack, model, load(pack, dog.name), other_clip)
