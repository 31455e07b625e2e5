"""Bound LoRAs (issue 13) through the real ComfyUI, in process: each LoRA acts only inside its concept's LODA mask
(image layers) or on its own token rows (cross-attention keys/values), equal there to ΔW·x computed by hand from
the file's factors; bit-identical elsewhere; two LoRAs never mix; the shared model is untouched; bad input refused.

The spy is a second DIFFUSION_MODEL wrapper installed after the bound LoRAs' one, so its forward hooks run after
theirs and see the final layer output; the base output is the module's own forward on the same input (no hooks).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pack_nodes import apply_bound, bind, encode

from comfy_harness.tiny_loras import write_tiny_lora
from comfy_harness.tiny_models import build_tiny_model
from comfy_harness.tolerance import float32_tolerance
from comfy_harness.loda_settings import LODA_NODE_SETTINGS

PROMPT = "a dog and a cat"  # dog = token 2, cat = token 5
SIZE = 112  # 14×14 latent, 7×7 LODA maps in the tiny models
SETTINGS = dict(LODA_NODE_SETTINGS, loda_steps=1)


def tiny(arch):
    with torch.inference_mode():
        model, clip, _ = build_tiny_model(arch, 0)
    return model, clip


def loda_sample(pack, model, clip, positive, seed=0, steps=3, size=SIZE, batch=1, **overrides):
    import nodes

    with torch.inference_mode():
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(size, size, batch)[0]
        return (
            pack.glue("loda_nodes")
            .LodaSampler.execute(
                model,
                seed,
                steps,
                7.0,
                "euler",
                "normal",
                positive,
                negative,
                latent,
                1.0,
                "dog, cat",
                **dict(SETTINGS, **overrides),
            )
            .result
        )


class Spy:
    """DIFFUSION_MODEL wrapper recording (input, final output, base output) of `paths` in stage-2 model calls."""

    def __init__(self, pack, paths):
        self.key = pack.glue("comfy_lora").REGIONS_KEY
        self.paths, self.records = tuple(paths), []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        regions = transformer_options.get(self.key)
        if regions is None or regions.masks is None or torch.is_grad_enabled():
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        unet = executor.class_obj
        call = dict(masks=regions.masks.clone(), branches=tuple(transformer_options["cond_or_uncond"]), layers={})

        def recorder(path):
            def hook(module, args, output):
                call["layers"][path] = (
                    args[0].detach().clone(),
                    output.detach().clone(),
                    module.forward(args[0]).detach().clone(),
                )

            return hook

        handles = [unet.get_submodule(path).register_forward_hook(recorder(path)) for path in self.paths]
        try:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            self.records.append(call)


def spied(pack, model, spy):
    import comfy.patcher_extension

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_spy", spy)
    return clone


def reference_residual(module, x, delta):
    """ΔW·x in float64 (delta: the hand-made ΔW, strength included) and the magnitude of its float32 terms."""
    if isinstance(module, torch.nn.Conv2d):
        args = (None, module.stride, module.padding, module.dilation, module.groups)
        weight = module.weight.detach().double()
        return (F.conv2d(x.double(), delta, *args), F.conv2d(x.double().abs(), weight.abs() + delta.abs(), *args))
    weight = module.weight.detach().double()
    return x.double() @ delta.T, x.double().abs() @ (weight.abs() + delta.abs()).T


def positions_of(output):
    """(B, N) view helper: output (B, N, C) or (B, C, H, W) -> per position max |value| over channels."""
    return output.abs().amax(-1) if output.dim() == 3 else output.abs().amax(1).flatten(1)


def exclusive_layer_masks(masks, grid, batch):
    """(B, J, N) bool: each concept's mask minus overlaps, nearest-resized to `grid`, per batch row (by hand)."""
    count = masks.sum(1, keepdim=True)
    own = masks & (count == 1)  # (B_img, K, h, w)
    resized = F.interpolate(own.float(), size=grid, mode="nearest") > 0.5
    return resized.flatten(2)[torch.arange(batch) % masks.shape[0]]


def text_token_rows(branches, batch: int, context_length: int, positions) -> torch.Tensor:
    """(B, K, T) bool, an independent reference for the text side: concept k acts on its token's rows (position
    mod 77, every 77-token chunk) of the CFG chunks that hold the prompt (cond, branch 0), on no row of the others."""
    rows = torch.zeros(batch, len(positions), context_length, dtype=torch.bool)
    per = batch // len(branches)
    for index, branch in enumerate(branches):
        if branch == 0:
            for j, position in enumerate(positions):
                rows[index * per : (index + 1) * per, j, position::77] = True
    return rows


def _max(values) -> float:
    return float(values.max()) if values.numel() else 0.0


def assert_layer(module, x, output, base, regions, deltas, strengths, kind_mask):
    """regions: (B, J, N) bool per concept (image or token rows). deltas: per concept ΔW (float64) or None."""
    changed = output != base
    changed = changed.any(-1) if output.dim() == 3 else changed.any(1).flatten(1)  # (B, N)
    allowed = torch.zeros_like(changed)
    for j, delta in enumerate(deltas):
        if delta is None:
            continue
        allowed |= regions[:, j]
    assert not (changed & ~allowed).any(), f"{kind_mask}: changed outside the concepts' regions"
    acted = 0
    for j, delta in enumerate(deltas):
        if delta is None:
            continue
        reference, terms = reference_residual(module, x, strengths[j] * delta)
        inner = module.weight[0].numel()
        # float32: the residual's own sum of `inner` terms (ΔW·x, or the low-rank h(x) chain: fewer terms), ΔW's
        # subtraction W + ΔW − W (one rounding of |W|), and the final add to the base output (|base|): each term
        # and partial sum rounds by ≤ eps32 relative (comfy_harness/tolerance.py)
        tol = float32_tolerance(terms.max() + base.abs().max(), inner + 4)
        got = output.double() - base.double()
        error = (got - reference).abs()
        error = error.amax(-1) if output.dim() == 3 else error.amax(1).flatten(1)
        size = positions_of(reference)
        region = regions[:, j]
        assert _max(error[region]) <= tol, f"{kind_mask} concept {j}: off the reference"
        acted += int(region.sum())
        # not vacuous: the residual there is 10× the worst-case rounding bound (so a missing one would fail)
        assert _max(size[region]) > 10 * tol or not region.any()
    return acted


def run_two_bound(pack, arch, kinds, folder, strengths=(1.0, 0.7)):
    """tiny `arch`, LoRA kinds[0] on dog, kinds[1] on cat, LODA for 3 steps; returns model, patched, spy, deltas."""
    model, clip = tiny(arch)
    deltas = []
    for index, (kind, word) in enumerate(zip(kinds, ("dog", "cat"))):
        deltas.append(write_tiny_lora(folder / f"{word}_{kind}.safetensors", model, seed=10 + index, kind=kind))
    positive = encode(pack, clip, PROMPT)
    bound = bind(pack, [(f"{w}_{k}.safetensors", w, s) for w, k, s in zip(("dog", "cat"), kinds, strengths)])
    patched, info = apply_bound(pack, model, bound, positive)
    paths = sorted(set(deltas[0]) | set(deltas[1]))
    spy = Spy(pack, paths)
    result = loda_sample(pack, spied(pack, patched, spy), clip, positive)
    return model, clip, positive, patched, spy, deltas, result, info


@pytest.mark.parametrize(
    "arch,kinds", [("sd15", ("lora", "lora")), ("sdxl", ("loha", "lokr")), ("sd21", ("lora", "loha"))]
)
def test_each_bound_lora_acts_only_in_its_region_and_equals_the_hand_computed_residual(pack, loras_folder, arch, kinds):
    model, clip, positive, patched, spy, deltas, result, info = run_two_bound(pack, arch, kinds, loras_folder)
    strengths = (1.0, 0.7)
    assert spy.records, "no stage-2 model call was recorded"
    unet = model.model.diffusion_model
    acted = {"image": 0, "text": 0}
    for call in spy.records:
        masks = call["masks"]  # (B_img, K, 7, 7)
        assert masks.any(), "empty LODA masks: the test would be vacuous"
        for path, (x, output, base) in call["layers"].items():
            module = unet.get_submodule(path)
            layer_deltas = [d.get(path) for d in deltas]
            batch = output.shape[0]
            if path.endswith(("attn2.to_k", "attn2.to_v")):
                regions, kind = text_token_rows(call["branches"], batch, output.shape[1], (2, 5)), "text"
            else:
                grid = (
                    tuple(output.shape[-2:])
                    if output.dim() == 4
                    else next((h, w) for h, w in ((14, 14), (7, 7)) if h * w == output.shape[1])
                )
                regions, kind = exclusive_layer_masks(masks, grid, batch), "image"
            acted[kind] += assert_layer(module, x, output, base, regions, layer_deltas, strengths, f"{arch} {path}")
    assert acted["image"] > 0 and acted["text"] > 0
    assert "image-side" in info and "text-side" in info


def test_shared_model_is_bit_identical_after_a_bound_run_and_no_hook_stays(pack, loras_folder):
    model, clip = tiny("sd15")
    write_tiny_lora(loras_folder / "dog.safetensors", model, seed=1)
    write_tiny_lora(loras_folder / "cat.safetensors", model, seed=2)
    positive = encode(pack, clip, PROMPT)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    options_before = repr(model.model_options)
    plain = loda_sample(pack, model, clip, positive)[0]["samples"]
    patched, _ = apply_bound(
        pack, model, bind(pack, [("dog.safetensors", "dog", 1.0), ("cat.safetensors", "cat", 1.0)]), positive
    )
    bound = loda_sample(pack, patched, clip, positive)[0]["samples"]
    assert not torch.equal(bound, plain)
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert repr(model.model_options) == options_before
    assert all(not m._forward_hooks for m in model.model.diffusion_model.modules())
    assert torch.equal(loda_sample(pack, model, clip, positive)[0]["samples"], plain)
    # chained: a second Apply on the patched clone keeps the first one's wrapper
    again, _ = apply_bound(pack, patched, bind(pack, [("dog.safetensors", "dog", 0.0)]), positive)
    assert torch.equal(loda_sample(pack, again, clip, positive)[0]["samples"], bound)


def test_empty_bindings_or_zero_strength_are_bit_identical_to_the_plain_sampler(pack, loras_folder):
    model, clip = tiny("sd15")
    write_tiny_lora(loras_folder / "dog.safetensors", model, seed=1)
    positive = encode(pack, clip, PROMPT)
    plain = loda_sample(pack, model, clip, positive)[0]["samples"]
    for bindings in ((), [("dog.safetensors", "dog", 0.0)]):
        patched, info = apply_bound(pack, model, bind(pack, bindings) if bindings else (), positive)
        assert torch.equal(loda_sample(pack, patched, clip, positive)[0]["samples"], plain), info


def test_same_inputs_give_the_same_masks_and_latents_after_another_seed_and_size(pack, loras_folder):
    model, clip = tiny("sd15")
    write_tiny_lora(loras_folder / "dog.safetensors", model, seed=1)
    write_tiny_lora(loras_folder / "cat.safetensors", model, seed=2)
    positive = encode(pack, clip, PROMPT)
    patched, _ = apply_bound(
        pack, model, bind(pack, [("dog.safetensors", "dog", 1.0), ("cat.safetensors", "cat", 1.0)]), positive
    )
    first = loda_sample(pack, patched, clip, positive)
    loda_sample(pack, patched, clip, positive, seed=5, size=128)
    second = loda_sample(pack, patched, clip, positive)
    assert torch.equal(first[0]["samples"], second[0]["samples"]) and torch.equal(first[1], second[1])


def test_without_a_loda_sampler_the_bound_model_is_refused_at_the_first_call(pack, loras_folder):
    from conftest import sample

    model, clip = tiny("sd15")
    write_tiny_lora(loras_folder / "dog.safetensors", model, seed=1)
    patched, _ = apply_bound(pack, model, bind(pack, [("dog.safetensors", "dog", 1.0)]), encode(pack, clip, PROMPT))
    with pytest.raises(pack.error, match="without a LODA sampler"):
        sample(patched, clip)


def test_a_bound_word_that_loda_does_not_separate_is_refused(pack, loras_folder):
    model, clip = tiny("sd15")
    write_tiny_lora(loras_folder / "sofa.safetensors", model, seed=1)
    positive = encode(pack, clip, "a dog and a cat on a sofa")
    patched, _ = apply_bound(pack, model, bind(pack, [("sofa.safetensors", "sofa", 1.0)]), positive)
    with pytest.raises(pack.error, match="not one of the concepts LODA separates"):
        loda_sample(pack, patched, clip, positive)


def _write_garbage(path):
    path.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)


def _write_other_model(path):
    from safetensors.torch import save_file

    save_file(
        {
            "lora_unet_some_block_that_is_not_here.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_some_block_that_is_not_here.lora_up.weight": torch.zeros(8, 4),
        },
        str(path),
    )


@pytest.mark.parametrize(
    "case,message",
    [
        ("word not in prompt", "not in the prompt|not found|does not appear"),
        ("bound twice", "bound twice"),
        ("no key matches", "matches no layer"),
        ("wrong shapes", "does not fit"),
        ("corrupt file", "cannot be read"),
        ("nan strength", "strength"),
        ("nan strength in a list from elsewhere", "bound to .dog. is not a finite number"),
        ("unknown stage1 policy", r"Unknown stage1 policy.*'sometimes'.*off"),
        ("strength out of range in a list from elsewhere", "bound to .dog. is out of range"),
        ("plain positive", "no token record"),
    ],
)
def test_bad_input_is_refused_before_sampling(pack, loras_folder, case, message):
    import nodes

    model, clip = tiny("sd15")
    write_tiny_lora(loras_folder / "good.safetensors", model, seed=1)
    positive = encode(pack, clip, PROMPT)
    bindings = [("good.safetensors", "dog", 1.0)]
    with pytest.raises(pack.error, match=message) as raised:
        if case == "word not in prompt":
            bindings = [("good.safetensors", "horse", 1.0)]
        elif case == "bound twice":
            bindings = [("good.safetensors", "dog", 1.0), ("good.safetensors", "Dog", 0.5)]
        elif case == "no key matches":
            _write_other_model(loras_folder / "other.safetensors")
            bindings = [("other.safetensors", "dog", 1.0)]
        elif case == "wrong shapes":
            sd21, _ = tiny("sd21")
            write_tiny_lora(loras_folder / "sd21.safetensors", sd21, seed=1)
            bindings = [("sd21.safetensors", "dog", 1.0)]
        elif case == "corrupt file":
            _write_garbage(loras_folder / "bad.safetensors")
            bindings = [("bad.safetensors", "dog", 1.0)]
        elif case == "nan strength":
            bindings = [("good.safetensors", "dog", math.nan)]
        elif case == "unknown stage1 policy":
            apply_bound(pack, model, bind(pack, bindings), positive, stage1="sometimes")
        elif case.endswith("in a list from elsewhere"):  # BOUND_LORAS another node built: Apply checks again
            binding = pack.glue("bound_lora").LoraBinding
            strength = math.nan if case.startswith("nan") else 5.0  # the widget's range is −4 .. 4
            bound = (binding("good.safetensors", "dog", strength),)
            apply_bound(pack, model, bound, positive)
        elif case == "plain positive":
            with torch.inference_mode():
                positive = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        apply_bound(pack, model, bind(pack, bindings), positive)
    text = str(raised.value)
    assert "Seen:" in text and "Expected:" in text and "Fix:" in text


def test_stage1_policies_before_the_masks_exist(pack, loras_folder):
    """Stage 1 on steps 0..1 of 3: with "off" LODA's masks are bit-identical to those of the LoRA-free run (the LoRA
    never acted before them); "text_rows" and "unmasked" act in stage 1 (its gradient pass too), so the latents at
    the mask step differ, and all three differ from the LoRA-free image."""
    model, clip = tiny("sd15")
    write_tiny_lora(loras_folder / "dog.safetensors", model, seed=1)
    positive = encode(pack, clip, PROMPT)
    plain = loda_sample(pack, model, clip, positive, loda_steps=2)
    bound = bind(pack, [("dog.safetensors", "dog", 1.0)])
    results = {}
    for policy in ("off", "text_rows", "unmasked"):
        patched, _ = apply_bound(pack, model, bound, positive, stage1=policy)
        results[policy] = loda_sample(pack, patched, clip, positive, loda_steps=2)
        assert not torch.equal(results[policy][0]["samples"], plain[0]["samples"]), policy
    assert torch.equal(results["off"][1], plain[1])  # the MASK output: the same masks
    assert torch.equal(results["off"][2].maps, plain[2].maps)  # and the same maps they came from
    for policy in ("text_rows", "unmasked"):
        assert not torch.equal(results[policy][2].maps, plain[2].maps), policy


def test_additive_adapters_use_comfyuis_bypass_h_where_it_exists(pack, loras_folder):
    """Capability, not version: with comfy.weight_adapter.bypass the LoRA/LoHa/LoKr residual is the adapter's own
    h(x); without it (0.3.64) ΔW from ComfyUI's calculate_weight. Both are checked against ΔW·x above."""
    import importlib.util

    import comfy.patcher_extension

    lora = pack.glue("comfy_lora")
    has_bypass = importlib.util.find_spec("comfy.weight_adapter.bypass") is not None
    assert lora.HAS_BYPASS == has_bypass
    model, clip = tiny("sd15")
    for kind in ("lora", "loha", "lokr"):
        write_tiny_lora(loras_folder / f"{kind}.safetensors", model, seed=1, kind=kind)
        patched, _ = apply_bound(
            pack, model, bind(pack, [(f"{kind}.safetensors", "dog", 1.0)]), encode(pack, clip, PROMPT)
        )
        wrappers = patched.wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL][lora.WRAPPER_KEY]
        assert all(layer.residual.bypass == has_bypass for layer in wrappers[0].layers), kind


@pytest.mark.parametrize(
    "overrides",
    [dict(loda_steps=0, boost=0.0, suppression=0.0), dict(loda_steps=3)],
    ids=["stage 1 and fixing off", "no stage 2"],
)
def test_a_loda_run_that_never_makes_masks_is_refused_with_bound_loras(pack, loras_folder, overrides):
    model, clip = tiny("sd15")
    write_tiny_lora(loras_folder / "dog.safetensors", model, seed=1)
    positive = encode(pack, clip, PROMPT)
    patched, _ = apply_bound(pack, model, bind(pack, [("dog.safetensors", "dog", 1.0)]), positive)
    with pytest.raises(pack.error, match="never makes them"):
        loda_sample(pack, patched, clip, positive, **overrides)
