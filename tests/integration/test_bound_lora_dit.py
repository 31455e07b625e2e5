"""Bound LoRAs on the DiT families Flux.1, Flux.2, Qwen-Image and Z-Image (issue 13 on issue 14's models), in a real
ComfyUI process. Flux.2 and Z-Image exist from ComfyUI 0.33.0 on: their cases are added where this ComfyUI has their
classes (read from its source at collection time, as test_dit_families.families_to_test), the others run everywhere.

Each LoRA acts only on its concept's rows of each patched layer: image-stream layers on the latent's image tokens
inside the concept's LODA mask (at the patch grid), text-stream layers on the concept's own token rows, the joint
layers (Flux single blocks, Z-Image's `layers`) on both parts of [text | image], Z-Image's final layer on the image
part of the joint sequence; never on padding rows (Z-Image's cap_pad / x_pad tokens, in its refiners and joint
layers); bit-identical elsewhere; equal there to x·ΔWᵀ with ΔW
written by hand from the file's factors (comfy_harness.tiny_loras.write_tiny_dit_lora, fused-weight rows included);
modulation and embedding layers untouched. The layer sites are this file's own table, not the pack's.

The spy is a second DIFFUSION_MODEL wrapper installed after the bound LoRAs' one, so its forward hooks run after
theirs and see the final output; the base output is the module's own forward on the same input (no hooks).
"""

from __future__ import annotations

import inspect
import logging
import re

import pytest
import torch
from pack_nodes import apply_bound, bind, encode

from comfy_harness.loda_settings import LODA_NODE_SETTINGS
from comfy_harness.tiny_dit_models import (
    build_tiny_flux,
    build_tiny_flux2,
    build_tiny_qwenimage,
    build_tiny_zimage,
    dit_families_in_source,
    flux_latent,
    tiny_latent,
)
from comfy_harness.tiny_loras import write_tiny_dit_lora, write_tiny_lora
from comfy_harness.tiny_models import build_tiny_model
from comfy_harness.tolerance import float32_tolerance

PROMPT = "a photo of a cat and a dog"
WORDS = "cat, dog"  # LODA's concept order: cat = 0, dog = 1
GRID = (8, 8)  # a 16×16 latent, 2×2 patches (Flux.2: an 8×8 /16 latent, patch 1)
SETTINGS = dict(LODA_NODE_SETTINGS, loda_steps=1)
log = logging.getLogger(__name__)

FLUX_SITES = (
    (r"img_in|final_layer\.linear|double_blocks\.\d+\.img_(attn\.qkv|attn\.proj|mlp\.[02])", "image"),
    (r"txt_in|double_blocks\.\d+\.txt_(attn\.qkv|attn\.proj|mlp\.[02])", "text"),
    (r"single_blocks\.\d+\.linear[12]", "joint"),
)
ZIMAGE_BLOCK = r"\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])"
# Per family: builder, the words' context rows (test_dit_families.py), the sites of its layers by hand, and where
# the image rows of a joint call start for T text rows (Z-Image: T padded with cap_pad_token to a multiple of 32).
SPECS = {
    "flux": dict(build=build_tiny_flux, rows={"cat": 6, "dog": 10}, sites=FLUX_SITES),
    "flux2": dict(build=build_tiny_flux2, rows={"cat": 7, "dog": 10}, sites=FLUX_SITES),  # global modulation
    "qwenimage": dict(
        build=build_tiny_qwenimage,
        rows={"cat": 4, "dog": 7},
        sites=(
            (
                r"img_in|proj_out|transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|img_mlp\.net\.(0\.proj|2))",
                "image",
            ),
            (
                r"txt_in|transformer_blocks\.\d+\.(attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)|txt_mlp\..*)",
                "text",
            ),
        ),
    ),
    "zimage": dict(
        build=build_tiny_zimage,
        rows={"cat": 7, "dog": 10},
        sites=(
            (r"x_embedder|noise_refiner" + ZIMAGE_BLOCK, "image"),  # image-only calls: [image | x_pad]
            (r"cap_embedder\.1|context_refiner" + ZIMAGE_BLOCK, "text"),  # text-only calls: [text | cap_pad]
            (r"layers" + ZIMAGE_BLOCK, "joint"),  # [text | cap_pad | image | x_pad]
            (r"final_layer\.linear", "joint_image"),  # the joint sequence, image rows kept by unpatchify
        ),
        image_start=lambda text: text + (-text) % 32,
    ),
}


def present(families):
    """The families among `families` whose model classes this ComfyUI has (Flux.2 and Z-Image: 0.33.0+); every one
    when COMFYUI_PATH is unset or wrong (the comfyui fixture then reports it)."""
    from comfy_harness.comfy_bootstrap import comfyui_path

    try:
        found = dit_families_in_source(comfyui_path())
    except RuntimeError:
        found = None
    return [f for f in families if found is None or f in found]


PRESENT = present(sorted(SPECS))
# (family, naming and kind of the dog LoRA, of the cat LoRA): every naming of each family, LoRA, LoHa and LoKr
CASES = [
    case
    for case in [
        ("flux", ("kohya", "lora"), ("diffusers", "lora")),
        ("flux", ("kohya", "loha"), ("lycoris", "lokr")),
        ("flux2", ("kohya", "lora"), ("diffusers", "lora")),
        ("flux2", ("lycoris", "loha"), ("kohya", "lokr")),
        ("qwenimage", ("diffusers", "lora"), ("kohya", "lora")),
        ("qwenimage", ("plain", "lora"), ("lycoris", "loha")),
        ("qwenimage", ("kohya", "lokr"), ("diffusers", "lora")),
        ("zimage", ("diffusers", "lora"), ("kohya", "lora")),
        ("zimage", ("kohya", "loha"), ("lycoris", "lokr")),
        ("zimage", ("diffusers", "lokr"), ("lycoris", "lora")),
    ]
    if case[0] in PRESENT
]


def site(family, path):
    return next((s for pattern, s in SPECS[family]["sites"] if re.fullmatch(pattern, path)), "global")


def build(family):
    with torch.inference_mode():
        return SPECS[family]["build"]()


def loda_sample(pack, model, clip, positive, cfg=2.0, steps=3, **overrides):
    import nodes

    with torch.inference_mode():
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        return (
            pack.glue("loda_nodes")
            .LodaSampler.execute(
                model,
                0,
                steps,
                cfg,
                "euler",
                "simple",
                positive,
                negative,
                flux_latent() if model.model.latent_format.latent_channels == 16 else tiny_latent(model),
                1.0,
                WORDS,
                **dict(SETTINGS, **overrides),
            )
            .result
        )


class Spy:
    """DIFFUSION_MODEL wrapper recording (input, final output, base output) of `paths` in stage-2 model calls, with
    the call's text length and CFG chunks; any diffusion model's signature (arguments read by name)."""

    def __init__(self, pack, paths):
        self.key = pack.glue("comfy_lora").REGIONS_KEY
        self.paths, self.records = tuple(paths), []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        arguments = inspect.signature(executor.original).bind_partial(*args, **kwargs).arguments
        options = arguments["transformer_options"]
        regions = options.get(self.key)
        if regions is None or regions.masks is None or torch.is_grad_enabled():
            return executor(*args, **kwargs)
        model = executor.class_obj
        call = dict(
            masks=regions.masks.clone(),
            branches=tuple(options["cond_or_uncond"]),
            text=int(arguments["context"].shape[1]),
            layers={},
        )

        def recorder(path):
            def hook(module, inputs, output):
                x = inputs[0].detach().clone()
                call["layers"][path] = (x, output.detach().clone(), module.forward(x).detach().clone())

            return hook

        handles = [model.get_submodule(path).register_forward_hook(recorder(path)) for path in self.paths]
        try:
            return executor(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            self.records.append(call)


def spied(model, spy):
    import comfy.patcher_extension

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_spy", spy)
    return clone


def expected_rows(family, kind, call, batch, length, concept, prompt_length):
    """(B, L) bool, by hand: the rows of `concept` (LODA index) in a layer of site `kind` for this call."""
    rows = torch.zeros(batch, length, dtype=torch.bool)
    per = batch // len(call["branches"])
    text = call["text"]
    masks = call["masks"]  # (B_img, K, 8, 8) at the patch grid
    own = (masks & (masks.sum(1, keepdim=True) == 1))[:, concept].flatten(1)  # (B_img, 64) minus the overlap
    word = WORDS.split(", ")[concept]
    position = SPECS[family]["rows"][word]
    image_start = SPECS[family].get("image_start", lambda t: t)(text)
    for index, branch in enumerate(call["branches"]):
        chunk = slice(index * per, (index + 1) * per)
        if kind in ("text", "joint") and branch == 0:
            stride = prompt_length if text % prompt_length == 0 else text  # ComfyUI repeats shorter contexts
            rows[chunk, position:text:stride] = True
        if kind in ("image", "joint", "joint_image"):
            start = image_start if kind in ("joint", "joint_image") else 0
            rows[chunk, start : start + 64] = own[torch.arange(per) % own.shape[0]]
    return rows


def check_layer(module, x, output, base, rows_by_concept, deltas, strengths, label):
    """Output == base bit for bit off every concept's rows; output − base within float32 rounding of x·(s·ΔW)ᵀ on
    each concept's rows; returns how many rows acted (each with a residual 10× its rounding bound)."""
    changed = (output != base).any(-1)  # (B, L)
    allowed = torch.zeros_like(changed)
    for rows in rows_by_concept:
        allowed |= rows
    assert not (changed & ~allowed).any(), f"{label}: changed outside its concepts' rows"
    acted = 0
    weight = module.weight.detach().double()
    for rows, delta, strength in zip(rows_by_concept, deltas, strengths):
        reference = x.double() @ (strength * delta).T  # (B, L, C_out)
        terms = x.double().abs() @ (weight.abs() + (strength * delta).abs()).T
        # float32: the residual's sum of C_in terms (or the low-rank chain: fewer), ΔW's own W + ΔW − W rounding
        # (0.3.64's path) and the add to the base output; each term and partial sum rounds by ≤ eps32 relative
        tol = float32_tolerance(terms.max() + base.abs().max(), weight.shape[1] + 4)
        error = ((output.double() - base.double()) - reference).abs().amax(-1)  # (B, L)
        assert float(error[rows].max()) <= tol if rows.any() else True, f"{label}: off the reference"
        size = reference.abs().amax(-1)
        assert not rows.any() or float(size[rows].min()) > 10 * tol, f"{label}: residual too small to prove it"
        acted += int(rows.sum())
    return acted


@pytest.mark.parametrize(
    "family,dog,cat", CASES, ids=[f"{c[0]}-{c[1][0]}+{c[2][0]}-{c[1][1]}+{c[2][1]}" for c in CASES]
)
def test_each_bound_lora_acts_only_on_its_concepts_rows_and_equals_the_hand_computed_residual(
    pack, loras_folder, family, dog, cat
):
    model, clip = build(family)
    files = {"dog": dog, "cat": cat}
    deltas = {}
    for seed, (word, (naming, kind)) in enumerate(files.items()):
        deltas[word] = write_tiny_dit_lora(
            loras_folder / f"{word}.safetensors", model, family, seed=10 + seed, naming=naming, kind=kind
        )
    positive = encode(pack, clip, PROMPT)
    strengths = {"dog": 1.0, "cat": 0.7}
    bound = bind(pack, [(f"{w}.safetensors", w, strengths[w]) for w in ("dog", "cat")])
    patched, info = apply_bound(pack, model, bound, positive)
    paths = sorted(set(deltas["dog"]) | set(deltas["cat"]))
    spy = Spy(pack, paths)
    loda_sample(pack, spied(patched, spy), clip, positive)
    assert spy.records, "no stage-2 model call was recorded"
    prompt_length = len(pack.glue("comfy_text").prompt_tokens(clip, PROMPT).token_ids)
    dm = model.model.diffusion_model
    acted = {"image": 0, "text": 0, "joint": 0, "joint_image": 0}
    for call in spy.records:
        masks = call["masks"]
        assert masks.shape[-2:] == GRID and masks[:, 0].any() and masks[:, 1].any(), "vacuous masks"
        for path, (x, output, base) in call["layers"].items():
            kind = site(family, path)
            if kind == "global":  # modulation, embeddings: left out, bit for bit
                assert torch.equal(output, base), f"{family} {path}: a global layer was changed"
                continue
            batch, length = output.shape[:2]
            words = [w for w in ("dog", "cat") if path in deltas[w]]
            rows = [
                expected_rows(family, kind, call, batch, length, WORDS.split(", ").index(w), prompt_length)
                for w in words
            ]
            acted[kind] += check_layer(
                dm.get_submodule(path),
                x,
                output,
                base,
                rows,
                [deltas[w][path] for w in words],
                [strengths[w] for w in words],
                f"{family} {path}",
            )
    log.warning(f"{family} {dog}+{cat}: rows acted on {acted} in {len(spy.records)} calls; {info}")
    assert acted["image"] > 0 and acted["text"] > 0
    assert (acted["joint"] > 0) == (family in ("flux", "flux2", "zimage"))
    assert (acted["joint_image"] > 0) == (family == "zimage")
    assert "image-side" in info and "text-side" in info and "left out" in info


@pytest.mark.parametrize("family", PRESENT)
def test_empty_or_zero_strength_bindings_are_bit_identical_and_the_shared_model_stays_as_it_was(
    pack, loras_folder, family
):
    model, clip = build(family)
    write_tiny_dit_lora(loras_folder / "dog.safetensors", model, family, seed=1, naming="diffusers")
    write_tiny_dit_lora(loras_folder / "cat.safetensors", model, family, seed=2, naming="kohya", kind="loha")
    positive = encode(pack, clip, PROMPT)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    options_before = repr(model.model_options)
    plain = loda_sample(pack, model, clip, positive)[0]["samples"]
    for bindings in ((), [("dog.safetensors", "dog", 0.0)]):
        patched, info = apply_bound(pack, model, bind(pack, bindings) if bindings else (), positive)
        assert torch.equal(loda_sample(pack, patched, clip, positive)[0]["samples"], plain), info
    both = bind(pack, [("dog.safetensors", "dog", 1.0), ("cat.safetensors", "cat", 1.0)])
    patched, _ = apply_bound(pack, model, both, positive)
    bound = loda_sample(pack, patched, clip, positive)[0]["samples"]
    assert not torch.equal(bound, plain)
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert repr(model.model_options) == options_before
    assert all(not m._forward_hooks for m in model.model.diffusion_model.modules())
    assert torch.equal(loda_sample(pack, model, clip, positive)[0]["samples"], plain)


@pytest.mark.parametrize("family", PRESENT)
def test_stage1_text_rows_acts_before_the_masks_and_off_keeps_them(pack, loras_folder, family):
    """Stage 1 on steps 0..1 of 3: with "off" LODA's masks are bit-identical to those of the LoRA-free run; with
    "text_rows" the LoRA's text-token layers (and the text rows of joint layers) act in stage 1, so the maps differ."""
    model, clip = build(family)
    write_tiny_dit_lora(loras_folder / "dog.safetensors", model, family, seed=1)
    positive = encode(pack, clip, PROMPT)
    plain = loda_sample(pack, model, clip, positive, loda_steps=2)
    bound = bind(pack, [("dog.safetensors", "dog", 1.0)])
    results = {}
    for policy in ("off", "text_rows"):
        patched, _ = apply_bound(pack, model, bound, positive, stage1=policy)
        results[policy] = loda_sample(pack, patched, clip, positive, loda_steps=2)
        assert not torch.equal(results[policy][0]["samples"], plain[0]["samples"]), policy
    assert torch.equal(results["off"][1], plain[1]) and torch.equal(results["off"][2].maps, plain[2].maps)
    assert not torch.equal(results["text_rows"][2].maps, plain[2].maps)


def _sdxl():
    with torch.inference_mode():
        model, clip, _ = build_tiny_model("sdxl", 0)
    return model, clip


@pytest.mark.parametrize(
    "lora_base,model_base",
    [
        pair
        for pair in [
            ("sdxl", "flux"),
            ("flux", "sdxl"),
            ("sdxl", "qwenimage"),
            ("qwenimage", "sdxl"),
            ("flux", "qwenimage"),
            ("qwenimage", "flux"),
            ("flux", "flux2"),  # same module names, other widths (context, latent channels, gated MLP)
            ("flux2", "flux"),
            ("sdxl", "zimage"),
            ("zimage", "flux2"),
            ("flux2", "zimage"),
            ("qwenimage", "zimage"),
        ]
        if all(base == "sdxl" or base in PRESENT for base in pair)
    ],
)
def test_a_lora_for_another_base_model_is_refused(pack, loras_folder, lora_base, model_base):
    """Other families' key names match no layer, or (diffusers Flux.1 and Qwen-Image names share
    transformer_blocks.N.attn.to_q, ...) only some: refused either way, with the pack's error, before sampling."""
    source = _sdxl()[0] if lora_base == "sdxl" else build(lora_base)[0]
    if lora_base == "sdxl":
        write_tiny_lora(loras_folder / "other.safetensors", source, seed=1)
    else:
        write_tiny_dit_lora(loras_folder / "other.safetensors", source, lora_base, seed=1, naming="diffusers")
    model, clip = _sdxl() if model_base == "sdxl" else build(model_base)
    with pytest.raises(pack.error, match="matches no layer|does not fit") as raised:
        apply_bound(pack, model, bind(pack, [("other.safetensors", "dog", 1.0)]), encode(pack, clip, PROMPT))
    text = str(raised.value)
    assert "Seen:" in text and "Expected:" in text and "Fix:" in text


@pytest.mark.parametrize("family", PRESENT)
def test_additive_adapters_use_comfyuis_bypass_h_where_it_exists_fused_rows_too(pack, loras_folder, family):
    """Capability, not version: with comfy.weight_adapter.bypass the residual of every LoRA/LoHa/LoKr patch (on
    fused-weight rows too) is the adapter's own h(x); without it (0.3.64) ΔW from ComfyUI's calculate_weight. Both
    are checked against x·ΔWᵀ above."""
    import importlib.util

    import comfy.patcher_extension

    lora = pack.glue("comfy_lora")
    has_bypass = importlib.util.find_spec("comfy.weight_adapter.bypass") is not None
    model, clip = build(family)
    naming = "plain" if family == "qwenimage" else "diffusers"
    write_tiny_dit_lora(loras_folder / "dog.safetensors", model, family, seed=1, naming=naming)
    patched, _ = apply_bound(pack, model, bind(pack, [("dog.safetensors", "dog", 1.0)]), encode(pack, clip, PROMPT))
    wrapper = patched.wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL][lora.WRAPPER_KEY][0]
    assert all(layer.residual.bypass == has_bypass for layer in wrapper.layers)
    assert any(layer.residual.offset is not None for layer in wrapper.layers) == (family != "qwenimage")


def test_a_family_without_bound_lora_sites_is_refused(pack, loras_folder, monkeypatch):
    model, clip = build("flux")
    write_tiny_dit_lora(loras_folder / "dog.safetensors", model, "flux", seed=1)
    flux = pack.glue("families").model_family(model)
    monkeypatch.setattr(type(flux), "bound_lora_sites", None)  # a DiT family that has not said where its rows are
    with pytest.raises(pack.error, match="not supported on Flux.1 yet") as raised:
        apply_bound(pack, model, bind(pack, [("dog.safetensors", "dog", 1.0)]), encode(pack, clip, PROMPT))
    assert "SDXL" in str(raised.value) and "Qwen-Image" in str(raised.value)
