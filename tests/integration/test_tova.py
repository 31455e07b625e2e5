"""ToVA through the real ComfyUI, in process: nodes, token positions, the delta inside sampling, isolation, chaining."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import sample
from tova_reference import ReferenceToVA, ValueSpy, adapter_tensors_by_module, spy_model

from comfy_harness.tiny_adapters import write_tiny_adapter
from comfy_harness.tiny_models import build_tiny_model
from comfy_harness.tolerance import float32_tolerance

ARCHS = ("sd15", "sd21", "sdxl")
PROMPT = "a dog and a cat"  # [SOT, a, dog, and, a, cat, EOT]: dog = 2, cat = 5 (method §2.4)


def load(pack, name, word="", strength=1.0, role="from file", token_index=-1, adapters=None):
    node = pack.glue("adapters").LoadToVAAdapter
    return node.execute(name, word, strength, role, token_index, adapters).result[0]


def apply(pack, model, adapters, clip, text=PROMPT, apply_to_uncond=True):
    return pack.glue("adapters").ApplyToVA.execute(model, adapters, clip, text, apply_to_uncond).result


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def two_adapters(pack, arch, tova_folder):
    model, clip, vae = build_tiny_model(arch, seed=0)
    dog = write_tiny_adapter(tova_folder / f"{arch}_dog.safetensors", model, "dog", seed=1)
    cat = write_tiny_adapter(tova_folder / f"{arch}_cat.safetensors", model, "cat", seed=2)
    return model, clip, vae, dog, cat


def sampled_tolerance(reference, steps=3, cfg=7.0):
    """Bound on |pack − hand-written reference| for latents sampled (conftest.sample: euler) with a float64 UNet.

    The pack and the reference do the same maths in another order (the delta on the token rows vs a merged weight,
    ComfyUI's attention vs an explicit softmax). In float32 that rounding, amplified through the UNet and the sampler,
    reaches ~1e-5 of the latents and varies with the machine, so these comparisons build the UNet in float64. The
    float32 roundings left are ComfyUI's cast of every model output to float32 (model_base._apply_model), the float32
    sampler state, the pack's float32 delta rows and SD2's float32 attention precision: each model output of the
    two runs can differ by about one float32 ulp. CFG weighs cond and uncond by cfg and 1 + cfg (≤ 2·cfg + 1 ulp per
    step) and each Euler step passes that on with a factor |Δσ/σ| ≤ 1, so the latents differ by at most
    steps·(2·cfg + 1)·eps32·max|latent| (45 eps32; runs show 0 to 5 eps32, the same with 1 or 2 threads).
    """
    return float32_tolerance(reference, steps * (2 * cfg + 1))


def test_nodes_register_with_tooltips_and_comfy_nodes_module_is_comfyuis(pack, comfyui):
    import sys

    import nodes

    assert sys.modules["nodes"].__file__ == str(comfyui / "nodes.py")
    for node_id, display in (
        ("ConceptSplitLoadAdapter", "Load ToVA Adapter"),
        ("ConceptSplitApplyToVA", "Apply ToVA to Model"),
    ):
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == display
        schema = nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        assert [i.id for i in schema.inputs if not i.tooltip] == []
        assert all(o.tooltip for o in schema.outputs)


@pytest.mark.parametrize("arch_name", ARCHS)
def test_positions_match_comfyuis_own_token_sequence(pack, arch_name):
    hooks = pack.glue("comfy_text")
    _, clip, _ = build_tiny_model(arch_name)
    key = "h" if arch_name == "sd21" else "l"
    cases = [
        ("A photo of my Dog, next to a CAT.", "dog"),
        ("(dog:1.3) and a cat", "dog"),
        ("cat " * 80 + "and a dog", "dog"),
        ("a catdog and a dog", "dog"),
    ]
    for text, word in cases:
        flat = [t[0] for window in clip.tokenize(text)[key] for t in window]
        word_id = hooks.word_token_ids(clip, word)
        position = pack.core("prompt_tokens").locate_identifier_positions(
            hooks.prompt_tokens(clip, text), [pack.core("prompt_tokens").IdentifierRequest("x", word, word_id)]
        )[0]
        assert flat[position] == word_id[0] and len(flat) % 77 == 0
        with torch.inference_mode():
            assert clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0].shape[1] == len(flat)
        if text.startswith("cat"):
            assert position >= 77  # second window
        if "catdog" in text:  # "catdog" is BPE cat + dog</w>: that dog is inside a word and must not match
            assert flat[position - 1] == 320 and position == 6  # [SOT, a, cat, dog, and, a, dog]
    if arch_name == "sdxl":  # CLIP-G sees the same positions (method §2.4)
        text = "A photo of my Dog, next to a CAT."
        g = [t[0] for window in clip.tokenize(text)["g"] for t in window]
        l_ids = [t[0] for window in clip.tokenize(text)["l"] for t in window]
        content = [i for i, t in enumerate(l_ids) if t not in (49406, 49407)]
        assert [g[i] for i in content] == [l_ids[i] for i in content]


@pytest.mark.parametrize("apply_to_uncond", [True, False])
def test_delta_inside_a_real_sampling_run_matches_merged_weight_reference(
    pack, two_adapters, tova_folder, apply_to_uncond
):
    model, clip, _, dog, cat = two_adapters
    spy, spied = spy_model(model)
    modules = dict(model.model.diffusion_model.named_modules())
    adapters = load(pack, dog.name, strength=0.8, adapters=load(pack, cat.name))
    patched, positive, info = apply(pack, spied, adapters, clip, apply_to_uncond=apply_to_uncond)
    assert 'cat" -> token 5' in info and 'dog" -> token 2' in info
    import nodes

    with torch.inference_mode():  # batch 2 and two positive conditionings: chunks [uncond, cond, cond]
        two_positives = nodes.ConditioningCombine().combine(positive, copy.deepcopy(positive))[0]
    sample(patched, clip, positive=two_positives, batch=2, steps=2)
    tensors = {p.name: adapter_tensors_by_module(p, model) for p in (dog, cat)}
    scales = {dog.name: 0.8, cat.name: 1.0}
    positions = {dog.name: 2, cat.name: 5}
    assert len(spy.calls) >= 2 * len(tensors[dog.name])  # every attn2 layer, every step
    seen_chunks = set()
    with torch.no_grad():  # the recorded tensors are inference tensors
        for name, v, context, chunks in spy.calls:
            weight = modules[name].to_v.weight
            base = torch.nn.functional.linear(context, weight)  # V without ToVA, (B, T, C)
            per = v.shape[0] // len(chunks)
            changed = torch.zeros(v.shape[:2], dtype=torch.bool)
            for file, position in positions.items():
                lora_a, lora_b = tensors[file][name]
                merged = weight.double() + scales[file] * lora_b.double() @ lora_a.double()  # W + λ·B·A, float64
                # The pack's float32 V row: to_v's dot product over d, then (c·Aᵀ)·Bᵀ over d and r, scaled and added;
                # each term is bounded by |W||c| + λ|B||A||c|, so it is within (d + r + 3)·eps32 of that of the
                # float64 reference.
                magnitude = torch.nn.functional.linear(context.abs(), weight.abs()) + scales[
                    file
                ] * torch.nn.functional.linear(context.abs() @ lora_a.abs().T, lora_b.abs())  # (B, T, C)
                tolerance = float32_tolerance(magnitude[:, position], weight.shape[1] + lora_a.shape[0] + 3)
                for i, chunk in enumerate(chunks):
                    seen_chunks.add(chunk)
                    rows = slice(i * per, (i + 1) * per)
                    if chunk == 1 and not apply_to_uncond:
                        continue
                    reference = torch.nn.functional.linear(context[rows, position].double(), merged)
                    assert (v[rows, position].double() - reference).abs().max() <= tolerance
                    changed[rows, position] = True
            assert torch.equal(v[~changed], base[~changed])  # every other row bit-identical
            assert (v[changed] - base[changed]).abs().max() > 1e-3  # not vacuous: ~1000× each row's tolerance
    assert seen_chunks == {0, 1}


def test_unpatched_model_is_bit_identical_after_a_patched_run(pack, two_adapters):
    model, clip, _, dog, cat = two_adapters
    weights_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    options_before = copy.deepcopy(model.model_options)
    plain_before = sample(model, clip)
    patched = apply(pack, model, load(pack, cat.name, adapters=load(pack, dog.name)), clip)[0]
    tova = sample(patched, clip)
    plain_after = sample(model, clip)
    assert torch.equal(plain_before, plain_after)
    assert not torch.equal(tova, plain_before)
    assert model.model_options == options_before and model.model_options["transformer_options"] == {}
    assert all(torch.equal(weights_before[k], v) for k, v in model.model.state_dict().items())
    assert model.clone().model_options["transformer_options"] == {}  # a fresh clone carries no ConceptSplit patch


def test_graph_equals_hand_written_reference_and_differs_from_plain(pack, arch, tova_folder):
    import nodes

    model, clip, vae = build_tiny_model(arch, seed=0, dtype=torch.float64)  # see sampled_tolerance
    dog = write_tiny_adapter(tova_folder / f"{arch}_dog.safetensors", model, "dog", seed=1)
    cat = write_tiny_adapter(tova_folder / f"{arch}_cat.safetensors", model, "cat", seed=2)
    patched, positive, _ = apply(pack, model, load(pack, cat.name, strength=0.5, adapters=load(pack, dog.name)), clip)
    reference = ReferenceToVA(model, [(dog, 2, 1.0), (cat, 5, 0.5)]).install(model)
    tova = sample(patched, clip, positive=positive)
    ref = sample(reference, clip)
    plain = sample(model, clip)
    tolerance = sampled_tolerance(ref)
    assert (tova - ref).abs().max() <= tolerance, ((tova - ref).abs().max(), tolerance)
    assert (tova - plain).abs().max() > 1e-2
    # The smallest error this exists to catch, one adapter at the wrong strength (cat 1.0, not 0.5), is far outside it
    wrong_strength = sample(ReferenceToVA(model, [(dog, 2, 1.0), (cat, 5, 1.0)]).install(model), clip)
    assert (wrong_strength - ref).abs().max() > 10 * tolerance
    with torch.inference_mode():
        image = nodes.VAEDecode().decode(vae, {"samples": tova})[0]
    assert image.shape == (1, 64, 64, 3) and 0 <= image.min() and image.max() <= 1


def test_native_and_official_formats_give_identical_outputs(pack, arch, tova_folder):
    model, clip, _ = build_tiny_model(arch)
    native = write_tiny_adapter(tova_folder / "dog_native.safetensors", model, "dog", seed=3)
    official = write_tiny_adapter(tova_folder / "dog_official.safetensors", model, "dog", seed=3, official=True)
    out_native = sample(apply(pack, model, load(pack, native.name), clip)[0], clip)
    with pytest.raises(pack.error, match="needs an identifier word"):
        load(pack, official.name)
    out_official = sample(apply(pack, model, load(pack, official.name, word="dog"), clip)[0], clip)
    assert torch.equal(out_native, out_official)
    assert not torch.equal(out_native, sample(model, clip))


def test_chained_apply_nodes_equal_one_node_with_both(pack, two_adapters):
    model, clip, _, dog, cat = two_adapters
    both = apply(pack, model, load(pack, cat.name, adapters=load(pack, dog.name)), clip)[0]
    chained = apply(pack, apply(pack, model, load(pack, dog.name), clip)[0], load(pack, cat.name), clip)[0]
    assert torch.equal(sample(both, clip), sample(chained, clip))
    stash = pack.glue("comfy_attention").stash_value_input
    assert chained.model_options["transformer_options"]["patches"]["attn2_patch"].count(stash) == 1


def test_chains_with_a_weight_lora_on_to_v(pack, tova_folder):
    """A regular LoRA on attn2.to_v (LoraLoader) keeps working under ToVA, which adds on top of the patched W."""
    import comfy.sd

    model, clip, _ = build_tiny_model("sd21", dtype=torch.float64)  # see sampled_tolerance
    dog = write_tiny_adapter(tova_folder / "dog.safetensors", model, "dog", seed=1)
    g = torch.Generator().manual_seed(7)
    lora = {}
    for name, module in model.model.diffusion_model.named_modules():
        if name.endswith("attn2.to_v"):
            out_f, in_f = module.weight.shape
            key = "lora_unet_" + name.replace(".", "_")
            lora[f"{key}.lora_down.weight"] = torch.randn(2, in_f, generator=g) * 0.3
            lora[f"{key}.lora_up.weight"] = torch.randn(out_f, 2, generator=g) * 0.3
    with torch.inference_mode():
        lora_model, _ = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 0.0)
    both = sample(apply(pack, lora_model, load(pack, dog.name), clip)[0], clip)
    reference = sample(ReferenceToVA(lora_model, [(dog, 2, 1.0)]).install(lora_model), clip)
    only_lora = sample(lora_model, clip)
    only_tova = sample(apply(pack, model, load(pack, dog.name), clip)[0], clip)
    tolerance = sampled_tolerance(reference)
    assert (both - reference).abs().max() <= tolerance, ((both - reference).abs().max(), tolerance)
    assert (both - only_lora).abs().max() > 1e-2 and (both - only_tova).abs().max() > 1e-2
    assert (both - only_tova).abs().max() > 10 * tolerance  # ToVA on the unpatched W: what this exists to catch


def test_zero_strength_is_bit_identical_to_plain(pack, two_adapters):
    model, clip, _, dog, _ = two_adapters
    patched = apply(pack, model, load(pack, dog.name, strength=0.0), clip)[0]
    assert torch.equal(sample(patched, clip), sample(model, clip))


def test_chains_with_controlnet(pack, tova_folder):
    """ControlNet's model never sees the attention patches; ToVA and the control both act on the result."""
    import nodes

    from comfy_harness.tiny_controlnet import build_tiny_controlnet

    model, clip, vae = build_tiny_model("sd15", dtype=torch.float64)  # see sampled_tolerance
    dog = write_tiny_adapter(tova_folder / "dog.safetensors", model, "dog", seed=1)
    control = build_tiny_controlnet("sd15")
    with torch.inference_mode():
        positive = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
        positive, _ = nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, control, hint, 1.0, 0.0, 1.0, vae=vae
        )
    patched = apply(pack, model, load(pack, dog.name), clip)[0]
    both = sample(patched, clip, positive=positive)
    reference = sample(ReferenceToVA(model, [(dog, 2, 1.0)]).install(model), clip, positive=positive)
    only_control = sample(model, clip, positive=positive)
    only_tova = sample(patched, clip)
    tolerance = sampled_tolerance(reference)  # the random control drives latents to ~1e2; it scales with them
    assert (both - reference).abs().max() <= tolerance, ((both - reference).abs().max(), tolerance)
    assert (both - only_control).abs().max() > 1e-2 and (both - only_tova).abs().max() > 1e-2
    assert (both - only_tova).abs().max() > 10 * tolerance  # the control dropped under ToVA: what this catches


def changed_rows_per_chunk(spy, model, encodings):
    """For every recorded call and chunk: (name of the conditioning it carries, set of token rows ToVA changed)."""
    modules = dict(model.model.diffusion_model.named_modules())
    seen = []
    with torch.no_grad():
        for name, v, context, chunks in spy.calls:
            base = torch.nn.functional.linear(context, modules[name].to_v.weight)  # (B, T, C)
            per = v.shape[0] // len(chunks)
            for i in range(len(chunks)):
                rows = slice(i * per, (i + 1) * per)
                chunk_context = context[rows][0]  # (T, d)
                label = next(key for key, enc in encodings.items() if torch.equal(chunk_context[: enc.shape[0]], enc))
                diff = (v[rows] - base[rows]).abs().amax(dim=(0, 2))  # (T,)
                seen.append((label, frozenset(torch.nonzero(diff).flatten().tolist())))
    return seen


def test_delta_follows_each_conditioning_in_combined_and_padded_batches(pack, tova_folder):
    """The ToVA prompt repeated to a longer batch gets every copy; another positive and a longer negative don't get
    the ToVA prompt's copies (integration §1.6: L is each conditioning's own length)."""
    import nodes

    model, clip, _ = build_tiny_model("sd15")
    dog = write_tiny_adapter(tova_folder / "dog.safetensors", model, "dog", seed=1)
    spy, spied = spy_model(model)
    patched, positive, _ = apply(pack, spied, load(pack, dog.name), clip, text="a photo of a dog")  # dog = 5
    other_text, negative_text = "cat " * 80, "blurry " * 80  # 2 windows each
    with torch.inference_mode():
        other = nodes.CLIPTextEncode().encode(clip, other_text)[0]
        both = nodes.ConditioningCombine().combine(positive, other)[0]
        encodings = {
            "tova": positive[0][0][0],
            "other": other[0][0][0],
            "negative": nodes.CLIPTextEncode().encode(clip, negative_text)[0][0][0][0],
        }
    sample(patched, clip, positive=both, negative_text=negative_text, steps=1)
    seen = set(changed_rows_per_chunk(spy, model, encodings))
    assert seen == {("tova", frozenset({5, 82})), ("other", frozenset()), ("negative", frozenset({5}))}


def test_split_cond_and_uncond_calls_with_a_long_prompt(pack, tova_folder, monkeypatch):
    """Low memory makes ComfyUI run cond and uncond in separate calls; a one-window negative has no token 85."""
    import comfy.model_management

    model, clip, _ = build_tiny_model("sd15")
    dog = write_tiny_adapter(tova_folder / "dog.safetensors", model, "dog", seed=1)
    spy, spied = spy_model(model)
    text = "cat " * 80 + "and a dog"
    patched, positive, info = apply(pack, spied, load(pack, dog.name), clip, text=text)
    position = int(info.split("-> token ")[1].split()[0])
    assert position > 77
    real = comfy.model_management.get_free_memory

    def scarce(device=None, torch_free_too=False):  # comfy.samplers asks without torch_free_too
        return real(device, torch_free_too) if torch_free_too else 1

    monkeypatch.setattr(comfy.model_management, "get_free_memory", scarce)
    with torch.inference_mode():
        encodings = {"tova": positive[0][0][0], "negative": pack_encode(clip, "")}
    sample(patched, clip, positive=positive, steps=1)
    calls = changed_rows_per_chunk(spy, model, encodings)
    assert {len(chunks) for _, _, _, chunks in spy.calls} == {1}  # really split
    assert set(calls) == {("tova", frozenset({position})), ("negative", frozenset())}


def pack_encode(clip, text):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0][0][0][0]


def test_sampling_another_positive_prompt_is_refused_at_the_first_model_call(pack, tova_folder):
    model, clip, _ = build_tiny_model("sd15")
    dog = write_tiny_adapter(tova_folder / "dog.safetensors", model, "dog", seed=1)
    patched = apply(pack, model, load(pack, dog.name), clip)[0]
    with pytest.raises(pack.error, match="positive prompt being sampled is not the prompt Apply ToVA located"):
        sample(patched, clip, positive_text="cat " * 80)  # another length, no token record
    import nodes

    with torch.inference_mode():
        recorded = pack.glue("comfy_text").encode_prompt(clip, "a cat on a sofa")  # recorded, other tokens
    with pytest.raises(pack.error, match="positive prompt being sampled is not the prompt Apply ToVA located"):
        sample(patched, clip, positive=recorded)
    with torch.inference_mode():  # the same text through plain CLIP Text Encode is accepted (same length)
        plain = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    assert torch.equal(sample(patched, clip, positive=plain), sample(patched, clip))


def test_patches_added_after_tova_are_refused_not_ignored(pack, tova_folder):
    model, clip, _ = build_tiny_model("sd15")
    dog = write_tiny_adapter(tova_folder / "dog.safetensors", model, "dog", seed=1)
    patched = apply(pack, model, load(pack, dog.name), clip)[0]
    processor = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
    with pytest.raises(pack.error, match="before Apply ToVA"):
        processor.add(lambda *a: None)  # what IPAdapter_plus does with a replace object it finds

    late_replace = patched.clone()
    late_replace.set_model_attn2_replace(ValueSpy(), "input", 1)  # a 2-part key that our 3-part key would shadow
    with pytest.raises(pack.error, match="would be ignored"):
        sample(late_replace, clip, steps=1)

    late_patch = patched.clone()
    late_patch.set_model_attn2_patch(lambda n, context, value, extra: (n, context * 2, value * 2))
    with pytest.raises(pack.error, match="added after Apply ToVA"):
        sample(late_patch, clip, steps=1)


def test_one_processor_call_per_cross_attention_layer_and_caches_freed(pack, tova_folder):
    model, clip, _ = build_tiny_model("sd15")
    dog = write_tiny_adapter(tova_folder / "dog.safetensors", model, "dog", seed=1)
    spy, spied = spy_model(model)
    patched = apply(pack, spied, load(pack, dog.name), clip)[0]
    sample(patched, clip, steps=2)
    layers = [name for name in dict(model.model.diffusion_model.named_modules()) if name.endswith(".attn2")]
    per_layer = {name: sum(1 for call in spy.calls if call[0] == name) for name in layers}
    assert set(per_layer.values()) == {2}  # 2 steps x 1 batched CFG call, never on attn1 (no attn1 names recorded)
    replaces = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert all(not p._device_cache for p in replaces.values())  # GPU copies dropped when ComfyUI cleans up
