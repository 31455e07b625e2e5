"""LODA, attention fixing, Capture Attention and the viewer on DiT models (issue 14), in a real ComfyUI process.

Families are parametrized by what the installed ComfyUI has (comfy_harness.tiny_dit_models.available_dit_families), and
the pack's own registry; Flux.1 exists in every supported version and must run on each. Tiny random-weight models
(2 double + 1 single blocks, 2 heads, matrices N(0, 1/fan_in) so attention is far from uniform) built with
ComfyUI's own classes under inference mode, as the executor loads them. A 128 px latent gives 8×8 image tokens
(16×16 at /8 with 2×2 patches; Flux.2: 8×8 at /16, patch 1).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from comfy_harness.tiny_dit_models import (
    available_dit_families,
    build_tiny_flux,
    build_tiny_flux2,
    build_tiny_qwenimage,
    build_tiny_zimage,
    dit_families_in_source,
    tiny_latent,
)
from comfy_harness.tolerance import EPS32, float32_softmax_tolerance, float32_tolerance
from comfy_harness.loda_settings import LODA_NODE_SETTINGS

log = logging.getLogger(__name__)
PROMPT = "a photo of a cat and a dog"
IMAGE_TOKENS = 64  # 128 px: (16 / 2)² (Flux.1, Qwen-Image: /8 latent, 2×2 patches), 8² (Flux.2: /16, patch 1)
DOUBLE = (("double", 0, 0), ("double", 1, 0))


def _flux_forward(dm, x, context, extras, options):
    return dm(
        x,
        torch.tensor([0.7]),
        context,
        y=extras["pooled_output"],
        guidance=torch.tensor([3.5]),
        transformer_options=options,
    )


def _flux2_forward(dm, x, context, extras, options):
    return dm(x, torch.tensor([0.7]), context, y=None, guidance=None, transformer_options=options)  # no pooled vector


def _qwen_forward(dm, x, context, extras, options):
    return dm(x.unsqueeze(2), torch.tensor([0.7]), context, transformer_options=options)  # (B, C, T, h, w)


def _zimage_forward(dm, x, context, extras, options):
    return dm(x, torch.tensor([0.7]), context, context.shape[1], transformer_options=options)  # num_tokens = T


# Per family: builder, the words' context rows (T5: '▁','a','▁photo','▁of','▁','a','▁cat','▁and','▁','a','▁dog' ->
# 6, 10; Qwen-Image: the chat preamble dropped, so row = word position 4, 7; Flux.2: every template token kept,
# "<|im_start|>", "user", "\n" first, so 7, 10), text tokens per joint call, blocks, latent side at 128 px, patch.
SPECS = {
    "flux": dict(
        build=build_tiny_flux,
        rows={"cat": 6, "dog": 10},
        text=256,
        keys=DOUBLE + (("single", 0, 0),),
        maps=DOUBLE,
        display="Flux.1",
        forward=_flux_forward,
        latent=16,
        patch=2,
    ),
    "flux2": dict(
        build=build_tiny_flux2,
        rows={"cat": 7, "dog": 10},
        text=512,
        keys=DOUBLE + (("single", 0, 0),),
        maps=DOUBLE,
        display="Flux.2",
        forward=_flux2_forward,
        latent=8,
        patch=1,
    ),
    "qwenimage": dict(
        build=build_tiny_qwenimage,
        rows={"cat": 4, "dog": 7},
        text=13,
        keys=DOUBLE,
        maps=DOUBLE,
        display="Qwen-Image",
        forward=_qwen_forward,
        latent=16,
        patch=2,
    ),
    # Z-Image: the chat template kept ('<|im_start|>','user','\n' first), so 'cat' is row 3 + 4; the 16 text rows
    # are padded with cap_pad_token to 32 in the joint calls (joint_text: where the image rows start).
    "zimage": dict(
        build=build_tiny_zimage,
        rows={"cat": 7, "dog": 10},
        text=16,
        joint_text=32,
        keys=(("layer", 0, 0), ("layer", 1, 0), ("layer", 2, 0)),
        maps=(("layer", 0, 0),),
        display="Z-Image",
        forward=_zimage_forward,
        latent=16,
        patch=2,
    ),
}
SETTINGS = dict(LODA_NODE_SETTINGS, loda_steps=-1)
BOUND_LORA_FAMILIES = ("flux", "flux2", "qwenimage", "zimage")  # the DiT families whose bound-LoRA sites are tested


def families_to_test() -> tuple[str, ...]:
    """The SPECS families whose model classes the ComfyUI under test has (read from its source at collection time:
    Flux.2 and Z-Image exist only in newer versions; tests/integration/test_dit_families_missing.py covers the
    error on the others). Every SPECS family when COMFYUI_PATH is unset (the tests then skip, or fail on CI)."""
    from comfy_harness.comfy_bootstrap import comfyui_path

    try:
        present = dit_families_in_source(comfyui_path())
    except RuntimeError:  # COMFYUI_PATH set but wrong: the comfyui fixture reports it
        present = None
    return tuple(sorted(name for name in SPECS if present is None or name in present))


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", families_to_test())


def test_the_tested_families_are_the_ones_this_comfyui_and_the_pack_have(pack):
    """The collection-time reading of ComfyUI's source agrees with its imported classes, every family the pack
    registers and this ComfyUI has is tested here, and Flux.1 and Qwen-Image run on every supported version."""
    available = available_dit_families()
    registered = {f.name for f in pack.glue("families").available_families()}
    assert set(families_to_test()) == set(available) & set(SPECS)
    assert {"flux", "qwenimage"} <= set(families_to_test())
    assert set(available) & {f.name for f in pack.glue("families").FAMILIES} <= set(families_to_test())
    assert set(families_to_test()) <= registered


def spec(family):
    return SPECS[family]


def joint_text(family) -> int:
    """Rows before the image tokens in a joint call: the text, plus its padding where the family pads it."""
    return SPECS[family].get("joint_text", SPECS[family]["text"])


def build(family):
    with torch.inference_mode():
        return SPECS[family]["build"]()


class QKSpy:
    """An attention override installed BEFORE the pack's (which must chain it): records q, k, the mask it is handed
    and the block info of every attention call, then attends unchanged."""

    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        mask = kwargs.get("mask", args[0] if args else None)
        qh, kh = q, k
        if not kwargs.get("skip_reshape", False) and q.dim() == 3:  # ComfyUI 0.3.64 Qwen-Image: (B, L, H·D)
            b, length, inner = q.shape
            qh = q.reshape(b, length, heads, inner // heads).transpose(1, 2)
            kh = k.reshape(b, length, heads, inner // heads).transpose(1, 2)
        self.calls.append(
            dict(
                q=qh.detach().clone(),
                k=kh.detach().clone(),
                mask=None if mask is None else mask.clone(),
                chunks=list(options.get("cond_or_uncond") or ()),
                sigma=float(options["sigmas"][0]) if "sigmas" in options else None,
                grad=torch.is_grad_enabled(),
            )
        )
        return func(q, k, v, heads, *args, **kwargs)


def spied(model):
    spy = QKSpy()
    clone = model.clone()
    clone.model_options["transformer_options"]["optimized_attention_override"] = spy
    return clone, spy


def encode(pack, clip, text=PROMPT):
    with torch.inference_mode():
        return pack.glue("prompt").ConceptSplitTextEncode.execute(clip, text).result[0]


def ksample(model, positive, negative, steps=2, cfg=1.0, sampler="euler", batch=1, seed=0):
    import nodes

    with torch.inference_mode():
        return nodes.common_ksampler(
            model, seed, steps, cfg, sampler, "simple", positive, negative, tiny_latent(model, batch)
        )[0]["samples"].clone()


def negative_of(clip):
    import nodes

    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, "")[0]


def loda_sample(
    pack,
    model,
    positive,
    negative,
    steps=4,
    cfg=1.0,
    sampler="euler",
    words="cat, dog",
    batch=1,
    scheduler="simple",
    denoise=1.0,
    **overrides,
):
    with torch.inference_mode():
        return (
            pack.glue("loda_nodes")
            .LodaSampler.execute(
                model,
                0,
                steps,
                cfg,
                sampler,
                scheduler,
                positive,
                negative,
                tiny_latent(model, batch),
                denoise,
                words,
                **dict(SETTINGS, **overrides),
            )
            .result
        )


def joint_reference(call, columns) -> torch.Tensor:
    """float64 softmax(q kᵀ/√D) over ALL keys, image rows × the given text columns, heads averaged: (B, K, 8, 8)."""
    q, k = call["q"].double(), call["k"].double()  # (B, H, L, D)
    n_txt = q.shape[2] - IMAGE_TOKENS
    probs = (q[:, :, n_txt:] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # (B, H, N, L)
    return probs[..., columns].mean(1).transpose(1, 2).reshape(q.shape[0], len(columns), 8, 8)


def softmax_bound(call) -> float:
    """float32_softmax_tolerance for this call's q, k in its (B, L, H·D) layout (every key, text and image)."""
    q, k = call["q"], call["k"]
    b, h, n, d = q.shape
    return float32_softmax_tolerance(q.transpose(1, 2).reshape(b, n, h * d), k.transpose(1, 2).reshape(b, n, h * d), h)


def test_dit_family_detected_and_layout_has_every_joint_block(pack, family):
    model, _ = build(family)
    found = pack.glue("families").model_family(model)
    layout = found.layout(model)
    assert found.name == family and layout.joint and layout.prediction == "flow"
    assert layout.keys == spec(family)["keys"]
    side, patch = spec(family)["latent"], spec(family)["patch"]
    first = spec(family)["keys"][0]
    assert found.default_map_layers(layout, (side, side)) == set(spec(family)["maps"])
    assert found.map_grid(layout, first, (side, side)) == (8, 8)
    # ComfyUI pads to the patch size: (15, 17) -> (8, 9) with 2×2 patches, (15, 17) with patch 1
    assert found.map_grid(layout, first, (15, 17)) == (-(-15 // patch), -(-17 // patch))


def test_token_rows_come_from_the_tokenizer_pieces_not_word_counts(pack, family):
    _, clip = build(family)
    prompt = pack.glue("comfy_text").prompt_tokens(clip, PROMPT)
    tokens = pack.core("prompt_tokens")
    rows = spec(family)["rows"]
    with torch.inference_mode():  # the context the model sees has one row per token slot
        context = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))[0][0]
    assert len(prompt.token_ids) == context.shape[1] == spec(family)["text"]
    assert tokens.locate_words_in_pieces(prompt, ("cat", "dog")) == ((rows["cat"],), (rows["dog"],))
    # a word T5 splits into several pieces: rows of every piece with all_tokens, the first piece by default
    split = pack.glue("comfy_text").prompt_tokens(clip, "a photo of a xylophonist")
    pieces = tokens.locate_words_in_pieces(split, ("xylophonist",), all_tokens=True)[0]
    assert len(pieces) > 1 and "".join(split.pieces[r] for r in pieces) == "xylophonist"
    assert tokens.locate_words_in_pieces(split, ("xylophonist",)) == ((pieces[0],),)
    with pytest.raises(pack.error, match=rf"not in the prompt.*{rows['cat']}:'cat'"):
        tokens.locate_words_in_pieces(prompt, ("cats",))


def test_captured_maps_equal_a_float64_joint_softmax_of_the_hooks_q_and_k(pack, family):
    model, clip = build(family)
    positive, negative = encode(pack, clip), negative_of(clip)
    rows, text = spec(family)["rows"], joint_text(family)
    spy_model, spy = spied(model)
    viewer = pack.glue("viewer")
    patched, capture = viewer.CaptureAttention.execute(
        spy_model, "cat, dog", "first token", 0, -1, "all", positive=positive
    ).result
    latent = ksample(patched, positive, negative, steps=2)
    maps = capture.maps_for(latent)
    assert maps.maps.shape == (1, 2, 8, 8) and maps.layers == spec(family)["keys"]
    joint = [c for c in spy.calls if c["q"].shape[2] == text + IMAGE_TOKENS]
    assert len(joint) == 2 * len(spec(family)["keys"])  # 2 steps × every joint block, CFG 1: cond only
    reference = sum(joint_reference(c, [rows["cat"], rows["dog"]]) for c in joint) / len(joint)
    # each call's probabilities are within the float32 softmax bound of float64; a mean keeps that bound, plus the
    # float32 sum of ≤ 6 calls × 2 heads (≤ 12·eps32 relative on values ≤ 1)
    bound = max(softmax_bound(c) for c in joint) + 12 * EPS32
    assert torch.allclose(maps.maps.double(), reference, rtol=0, atol=bound), (
        f"max |diff| {(maps.maps.double() - reference).abs().max():.3e} > {bound:.3e}"
    )
    # a text-only renormalised map would differ: the joint softmax is what the model uses
    assert float(reference.sum()) < 0.99 * 2 * 64
    grid, masks, report = viewer.AttentionMapViewer.execute(
        0.5, "inferno", capture=capture, samples={"samples": latent}
    ).result
    assert grid.shape[0] == 1 and grid.shape[-1] == 3 and masks.shape[0] == 2 and "cat" in report


def test_capture_keeps_sampling_and_the_unpatched_model_bit_identical(pack, family):
    model, clip = build(family)
    positive, negative = encode(pack, clip), negative_of(clip)
    before = ksample(model, positive, negative, cfg=2.0)
    patched, capture = (
        pack.glue("viewer")
        .CaptureAttention.execute(model, "cat, dog", "first token", 0, -1, "latent/4", positive=positive)
        .result
    )
    assert torch.equal(ksample(patched, positive, negative, cfg=2.0), before)
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})
    assert torch.equal(ksample(model, positive, negative, cfg=2.0), before)
    assert capture.maps_for(None).layers == spec(family)["maps"]  # the default map blocks


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_loda_with_nothing_to_do_is_bit_identical_to_ksampler_and_leaves_the_model_as_it_was(pack, family, sampler):
    model, clip = build(family)
    positive, negative = encode(pack, clip), negative_of(clip)
    plain = ksample(model, positive, negative, steps=3, cfg=2.0, sampler=sampler)
    latent, *_ = loda_sample(
        pack, model, positive, negative, steps=3, cfg=2.0, sampler=sampler, loda_steps=0, boost=0.0, suppression=0.0
    )
    assert torch.equal(latent["samples"], plain)
    if sampler != "dpmpp_2m":  # multistep history restarts per stage-1 slice (integration §4.3)
        latent, _, _, report = loda_sample(
            pack,
            model,
            positive,
            negative,
            steps=3,
            cfg=2.0,
            sampler=sampler,
            loda_steps=2,
            step_scale=0.0,
            boost=0.0,
            suppression=0.0,
        )
        assert torch.equal(latent["samples"], plain) and report.count(": updated") == 2  # zero step, same noise
    assert torch.equal(ksample(model, positive, negative, steps=3, cfg=2.0, sampler=sampler), plain)


def test_stage_1_raises_the_harmonic_mean_kl_at_step_n(pack, family):
    loss = pack.core("loda_loss")
    model, clip = build(family)
    positive, negative = encode(pack, clip), negative_of(clip)
    hm = {}
    for scale in (0.0, 40.0, 200.0):
        _, _, maps, report = loda_sample(
            pack, model, positive, negative, steps=6, loda_steps=3, step_scale=scale, boost=0.0, suppression=0.0
        )
        hm[scale] = float(loss.separation_loss(maps.maps[0])[1].harmonic_mean)
    numbers = (
        f"{family}: HM at step N=3 of 6: without stage 1 {hm[0.0]:.5f}, with stage 1 (eta 40) "
        f"{hm[40.0]:.5f}, (eta 200) {hm[200.0]:.5f}"
    )
    log.warning(numbers)
    # The runs are deterministic (same ops, same order), so without the updates the HM would be the same to the
    # float32 rounding of its own computation: a sum of h·w·K² = 256 KL terms per pair, ≤ 256·eps32 relative.
    rounding = float32_tolerance(hm[0.0], 256)
    assert hm[40.0] > hm[0.0] + rounding and hm[200.0] > hm[40.0] + rounding, numbers
    rows = spec(family)["rows"]
    assert f"row {rows['cat']} ('cat')" in report and f"row {rows['dog']} ('dog')" in report  # the bound tokens


def test_stage_1_update_on_a_flow_model_is_the_plain_gradient_step(pack, family):
    """The property the flow update relies on: ComfyUI's CONST sampling feeds the state to the model unchanged, so
    ∇_z L = ∇_x L and the paper's step on z is x − η ∇_x L (docs/method.md)."""
    model, _ = build(family)
    sampling = model.get_model_object("model_sampling")
    x = torch.randn(tiny_latent(model)["samples"].shape)
    assert type(sampling).__name__.startswith("ModelSamplingDiscreteFlow") or "CONST" in [
        c.__name__ for c in type(sampling).__mro__
    ]
    for sigma in (1.0, 0.5, 0.1):
        assert torch.equal(sampling.calculate_input(torch.tensor([sigma]), x), x)
    grad = torch.randn_like(x)
    assert torch.equal(pack.core("loda_loss").flow_latent_update(x, grad, 3.0), x - 3.0 * grad)


def test_fixing_bias_touches_only_image_rows_of_the_concept_columns_and_raises_each_share(pack, family):
    model, clip = build(family)
    positive, negative = encode(pack, clip), negative_of(clip)
    rows, text = spec(family)["rows"], joint_text(family)  # the image rows start after `text` rows
    length = text + IMAGE_TOKENS
    shares = {}
    for boost, suppression in ((0.0, 0.0), (5.0, -1e8)):
        spy_model, spy = spied(model)
        latent, masks, maps, report = loda_sample(
            pack, spy_model, positive, negative, steps=4, loda_steps=1, boost=boost, suppression=suppression
        )
        stage2 = [c for c in spy.calls if not c["grad"] and c["sigma"] is not None and c["q"].shape[2] == length]
        stage2 = [c for c in stage2 if c["sigma"] < max(s["sigma"] for s in stage2)]  # steps 1.. (0 is stage 1)
        result_masks = masks.reshape(1, 2, 128, 128)[:, :, ::16, ::16].bool()  # back to the 8×8 token grid
        values = []
        for call in stage2:
            if boost == 0.0:
                assert call["mask"] is None  # p = m = 0: no mask passed at all
                continue
            bias = call["mask"].double()[0, 0]  # (L, L)
            text_rows, columns = bias[:text], bias[:, [c for c in range(length) if c not in rows.values()]]
            assert not text_rows.any() and not columns.any()  # only image rows × concept columns are biased
            assert bias[text:, rows["cat"]].max() == 5.0 and bias[text:, rows["cat"]].min() == -1e8
        for call in stage2:
            q, k = call["q"].double(), call["k"].double()
            probs = (q[:, :, text:] @ k.transpose(-1, -2) / math.sqrt(32)).softmax(-1).mean(1)[0]  # (N, L)
            if call["mask"] is not None:  # with the bias the model used
                probs = (
                    ((q[:, :, text:] @ k.transpose(-1, -2) / math.sqrt(32)) + call["mask"].double()[:, :, text:])
                    .softmax(-1)
                    .mean(1)[0]
                )
            for index, word in enumerate(("cat", "dog")):
                column = probs[:, rows[word]]
                values.append(float(column[result_masks[0, index].flatten()].sum() / column.sum()))
        shares[boost] = sum(values) / len(values)
    numbers = (
        f"{family}: share of each word's attention inside its own mask, stage 2: without fixing "
        f"{shares[0.0]:.4f}, with fixing {shares[5.0]:.4f}"
    )
    log.warning(numbers)
    assert shares[5.0] > shares[0.0] + 0.1, numbers


def test_gradient_of_the_loss_wrt_the_latent_matches_finite_differences(pack, family):
    loda, loss_core = pack.core("loda"), pack.core("loda_loss")
    families, autograd = pack.glue("families"), pack.glue("comfy_autograd")
    model, clip = build(family)
    positive = encode(pack, clip)
    found = families.model_family(model)
    layout = found.layout(model)
    prompt = positive[0][1]["conceptsplit_prompt"]
    rows, text = spec(family)["rows"], spec(family)["text"]
    concepts = loda.LodaConcepts(("cat", "dog"), (rows["cat"], rows["dog"]), text, tuple(prompt.token_ids))
    shape = tiny_latent(model)["samples"].shape  # (1, C, h, w)
    layers = loda.select_map_layers(layout, tuple(shape[-2:]), "all")
    assert layers.grid == (8, 8) and set(layers.loss_keys) == found.default_map_layers(layout, tuple(shape[-2:]))
    collector = loda.MapCollector(concepts, layers)
    options = found.install_observers({"transformer_options": {}}, layout, (collector,))
    config = pack.core("loda_config").LodaConfig()
    context, extras = positive[0]  # (1, T, d), {"pooled_output": ...}

    def loss_at(x):  # the diffusion model itself, with the pack's observers (its DIFFUSION_MODEL wrapper runs too)
        collector.start(layers.loss_keys, (0,), truncate=True)
        loda.run_truncated(
            lambda: spec(family)["forward"](
                model.model.diffusion_model, x, context, extras, dict(options["transformer_options"])
            )
        )
        maps = collector.maps()[0]
        collector.stop()
        return loss_core.separation_loss(maps, config)[0]  # L = max(0, τ − HM), what stage 1 differentiates

    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    direction = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        autograd.AutogradWeights([model.model.diffusion_model]),
        found.differentiable(model),
    ):
        x = x0.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_at(x), x)
        with torch.no_grad():
            eps = 1e-2
            fd = float((loss_at(x0 + eps * direction) - loss_at(x0 - eps * direction)) / (2 * eps))
    analytic = float((grad * direction).sum())
    log.warning(f"{family}: directional derivative: finite difference {fd:.6e}, autograd {analytic:.6e}")
    assert analytic != 0 and torch.isfinite(grad).all()
    assert context.shape[1] == text
    # central differences are exact to O(eps²) for a smooth loss; at eps = 1e-2 that leaves ~1e-4 relative, and the
    # float32 forward adds ≤ ~1e-6·|L|/eps; 2 % covers both with room and still catches a missing or wrong term
    assert abs(fd - analytic) <= 0.02 * abs(analytic), f"finite difference {fd:.6e} vs autograd {analytic:.6e}"
    norms = [m for m in model.model.diffusion_model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and not any(m._forward_pre_hooks for m in norms)  # Flux's input clones are removed on exit


def test_tova_and_training_refuse_dit_models_with_a_clear_error(pack, family, tmp_path):
    model, clip = build(family)
    display = spec(family)["display"]
    with pytest.raises(pack.error, match=f"defined on UNet cross-attention; {display} is not supported yet"):
        pack.glue("adapters").ApplyToVA.execute(model, [], clip, PROMPT)
    training, data = pack.glue("training"), pack.core("training_data")
    request = training.TrainingRequest("dog", data.TrainConfig(steps=1, resolution=64), "dog_flux")
    with pytest.raises(pack.error, match=f"UNet cross-attention; {display} is not supported yet"):
        training.train_adapter(model, clip, None, torch.zeros(1, 64, 64, 3), request, tmp_path)
    assert not any(tmp_path.iterdir())
    # bound LoRAs, by contrast, work on the DiTs with a bound-LoRA site table (tests/integration/test_bound_lora_dit.py)
    found = pack.glue("families").model_family(model)
    assert found.supports_bound_loras == (family in BOUND_LORA_FAMILIES)
    if not found.supports_bound_loras:
        bound = pack.glue("bound_lora")
        binding = (bound.LoraBinding("dog.safetensors", "dog", 1.0),)
        with pytest.raises(pack.error, match=f"Bound LoRAs are not supported on {display} yet"):
            bound.ApplyBoundLoras.execute(model, binding, encode(pack, clip))


def test_bad_inputs_raise_before_sampling(pack, family):
    model, clip = build(family)
    positive, negative = encode(pack, clip), negative_of(clip)
    cat = spec(family)["rows"]["cat"]
    with pytest.raises(pack.error, match=rf'Word "bird" is not in the prompt.*{cat}:\'cat\''):
        loda_sample(pack, model, positive, negative, words="cat, bird")
    with pytest.raises(pack.error, match="smaller than the smoothing kernel"):
        with torch.inference_mode():
            pack.glue("loda_nodes").LodaSampler.execute(
                model,
                0,
                4,
                1.0,
                "euler",
                "simple",
                positive,
                negative,
                tiny_latent(model, 1, pixels=96),  # 6×6 tokens for every family
                1.0,
                "cat, dog",
                **SETTINGS,
            )
    with pytest.raises(pack.error, match=f"Gradient checkpointing is not available for {spec(family)['display']}"):
        loda_sample(pack, model, positive, negative, gradient_checkpointing=True)
