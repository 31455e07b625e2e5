"""Capture Attention and Attention Map Viewer inside a real ComfyUI (issue 4): maps against an independent softmax,
bit-identical sampling, rendering at the node level, bad inputs, long prompts and LCM-repeated contexts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import sample

from comfy_harness.tiny_adapters import write_tiny_adapter
from comfy_harness.tiny_models import SHARPEN_FACTORS, build_tiny_model, sharpen_cross_attention
from comfy_harness.tolerance import float32_softmax_tolerance, float32_tolerance

LONG_PROMPT = "a photo of " + "grass " * 80 + "and a dog next to a cat"  # dog and cat in the second window


class QKSpy:
    """A foreign attn2 replace installed before the capture patch: records q, k and the call layout, then attends."""

    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention

        block = extra_options["block"]
        self.calls.append(
            dict(
                key=(block[0], int(block[1]), int(extra_options.get("block_index", 0))),
                q=q.clone(),
                k=k.clone(),
                heads=extra_options["n_heads"],
                chunks=list(extra_options["cond_or_uncond"]),
                sigma=float(extra_options["sigmas"][0]),
                schedule=extra_options["sample_sigmas"].tolist(),
                grid=tuple(extra_options["activations_shape"][-2:]),
                latent=tuple(extra_options["original_shape"][-2:]),
                prompts=[
                    getattr((extra_options.get("conceptsplit_chunks") or {}).get(u), "prompt_ids", None)
                    for u in extra_options.get("uuids") or ()
                ],
            )
        )  # each chunk's recorded prompt, by cond uuid
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])


def spied(model):
    spy = QKSpy()
    clone = model.clone()
    for name, _ in model.model.diffusion_model.named_modules():
        if name.endswith(".attn2"):
            parts = name.split(".")
            block = ("middle", 0) if parts[0] == "middle_block" else (parts[0][: -len("_blocks")], int(parts[1]))
            depth = int(parts[parts.index("transformer_blocks") + 1])
            clone.set_model_attn2_replace(spy, block[0], block[1], depth)
    return clone, spy


def sharpened(arch):
    """A fresh tiny model whose attn2 logits are factor² larger, so maps are far from uniform (N(0, 0.02) weights
    give near-uniform attention, against which a 1e-5 comparison would prove little)."""
    model, clip, vae = build_tiny_model(arch)
    sharpen_cross_attention(model, SHARPEN_FACTORS[arch])
    return model, clip, vae


def encode(pack, clip, text):
    with torch.inference_mode():
        return pack.glue("prompt").ConceptSplitTextEncode.execute(clip, text).result[0]


def capture(pack, model, words, positive=None, token_mode="first token", first=0, last=-1, layers="all", blocks=""):
    node = pack.glue("viewer").CaptureAttention
    return node.execute(model, words, token_mode, first, last, layers, positive=positive, blocks=blocks).result


def view(pack, alpha=0.5, colormap="inferno", **sources):
    with torch.inference_mode():
        return pack.glue("viewer").AttentionMapViewer.execute(alpha, colormap, **sources)


def reference_maps(calls, keys, positions, prompt_length, first, last, prompt_ids=None):
    """Mean over calls in [first, last] and layers in `keys` of the head-mean softmax(q kᵀ/√D) of the cond rows
    (with `prompt_ids`, of the chunks recorded with those ids only), word columns and LCM copies summed, each call's
    map upsampled bilinearly to the finest grid; float64."""
    chosen = []
    for call in calls:
        step = call["schedule"].index(call["sigma"])  # euler calls the model exactly at the schedule's sigmas
        if call["key"] not in keys or not first <= step <= (len(call["schedule"]) - 2 if last == -1 else last):
            continue
        q, k, heads = call["q"].double(), call["k"].double(), call["heads"]
        B, N, _ = q.shape
        T = k.shape[1]
        qh = q.reshape(B, N, heads, -1).permute(0, 2, 1, 3)  # (B, H, N, D)
        kh = k.reshape(B, T, heads, -1).permute(0, 2, 1, 3)  # (B, H, T, D)
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1)  # (B, H, N, T)
        per = B // len(call["chunks"])
        cond = [
            probs[i * per : (i + 1) * per]
            for i, c in enumerate(call["chunks"])
            if c == 0 and (prompt_ids is None or call["prompts"][i] == prompt_ids)
        ]
        probs = torch.stack(cond).mean(0)  # (B_img, H, N, T)
        words = [
            sum(probs[..., p + c * prompt_length] for p in word for c in range(T // prompt_length))
            for word in positions
        ]  # K x (B_img, H, N)
        maps = torch.stack(words, 1).mean(2).reshape(per, len(positions), *call["grid"])  # (B_img, K, h, w)
        chosen.append(maps)
    finest = max((m.shape[-2:] for m in chosen), key=lambda s: s[0] * s[1])
    return torch.stack(
        [F.interpolate(m, size=tuple(finest), mode="bilinear", align_corners=False) for m in chosen]
    ).mean(0)


CASES = [  # arch, prompt, negative, words, token mode, steps, layers, batch
    ("sd15", "a dog and a cat", "", "dog, cat", "first token", (0, -1), "all", 2),
    ("sd21", "a blorptastic dog and a cat", "ugly " * 90, "blorptastic, cat", "all tokens", (1, 2), "latent", 1),
    ("sdxl", LONG_PROMPT, "", "cat, dog", "first token", (1, 1), "latent/2", 1),
]


@pytest.mark.parametrize(
    "arch, prompt, negative, words, mode, steps, layers, batch",
    CASES,
    ids=["sd15-batch2-all-layers", "sd21-long-negative-all-tokens", "sdxl-long-prompt"],
)
def test_captured_maps_equal_independent_softmax_inside_a_real_run(
    pack, arch, prompt, negative, words, mode, steps, layers, batch
):
    model, clip, _ = sharpened(arch)
    spy_model, spy = spied(model)
    positive = encode(pack, clip, prompt)
    patched, store = capture(pack, spy_model, words, positive, mode, *steps, layers=layers)
    latent = sample(patched, clip, positive=positive, negative_text=negative, steps=3, batch=batch)
    record = store.maps_for(latent)
    tokens = pack.glue("comfy_conditioning").conditioning_prompt_tokens(positive)
    hooks = pack.glue("comfy_text")
    positions = []
    for word in words.split(", "):  # positions found by plain search in ComfyUI's own token sequence
        ids = hooks.default_word_token_ids(word)
        flat = list(tokens.token_ids)
        start = next(p for p in range(len(flat)) if tuple(flat[p : p + len(ids)]) == ids)
        positions.append(list(range(start, start + len(ids))) if mode == "all tokens" else [start])
    if mode == "all tokens":
        assert len(positions[0]) > 1  # the made-up word really has several BPE tokens
    if arch == "sdxl":
        assert min(min(p) for p in positions) >= 77  # the words sit in the second window
    if negative:
        assert {c["k"].shape[1] for c in spy.calls} == {2 * len(tokens.token_ids)}  # cond LCM-repeated (×2)
    levels = pack.layout(model).levels()
    factor = {"all": None, "latent": 1, "latent/2": 2}[layers]
    keys = {key for key, level in levels.items() if factor is None or 2**level == factor}
    reference = reference_maps(spy.calls, keys, positions, len(tokens.token_ids), *steps)
    assert record.maps.shape == (batch, len(positions), *reference.shape[-2:])
    assert record.labels == tuple(words.split(", ")) and set(record.layers) == keys
    # float32 softmax of the same q, k against float64, then sums of positive terms (≤ 64 per call: heads, word
    # columns, LCM copies, 4 bilinear weights), each within n·eps32 relative: a relative bound, times the largest map.
    relative = max(float32_softmax_tolerance(c["q"], c["k"], c["heads"]) for c in spy.calls)
    tolerance = float(reference.max()) * (relative + float32_tolerance(1.0, 64 * len(spy.calls)))
    error = (record.maps.double() - reference).abs().max()
    assert error <= tolerance, (error, tolerance)
    first, last = steps
    assert record.steps == tuple(range(first, 3 if last == -1 else last + 1))
    assert reference.std() > 10 * tolerance  # the maps are far from flat: the comparison is not vacuous


def test_layer_levels_match_the_grids_seen_in_a_run(pack):
    for arch in ("sd15", "sdxl"):
        model, clip, _ = build_tiny_model(arch)
        spy_model, spy = spied(model)
        sample(spy_model, clip, steps=1, size=72)  # latent 9x9: odd, so the ceil rule matters
        levels = pack.layout(model).levels()
        seen = {call["key"]: call["grid"] for call in spy.calls}
        assert set(seen) == set(levels)
        for key, (h, w) in seen.items():
            size = 9
            for _ in range(levels[key]):
                size = math.ceil(size / 2)
            assert (h, w) == (size, size), key


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_capture_does_not_change_the_sampled_output(pack, arch):
    model, clip, _ = build_tiny_model(arch)
    positive = encode(pack, clip, "a dog and a cat")
    plain = sample(model, clip, positive=positive, batch=2)
    patched, store = capture(pack, model, "dog, cat", positive, layers="all")
    captured = sample(patched, clip, positive=positive, batch=2)
    assert torch.equal(plain, captured)
    assert store.maps_for(captured).maps.shape[:2] == (2, 2)
    assert model.model_options["transformer_options"] == {}  # the input model carries no patch


def test_capture_on_a_tova_model_uses_its_concepts_and_keeps_its_output(pack, tova_folder):
    model, clip, _ = build_tiny_model("sd15")
    dog = write_tiny_adapter(tova_folder / "dog.safetensors", model, "dog", seed=1)
    adapters = pack.glue("adapters")
    loaded = adapters.LoadToVAAdapter.execute(dog.name, "", 1.0, "from file", -1, None).result[0]
    tova, positive, _ = adapters.ApplyToVA.execute(model, loaded, clip, "a dog and a cat", True).result
    patched, store = capture(pack, tova, "", None, layers="latent")  # no words, no conditioning: ToVA's concepts
    out = sample(patched, clip, positive=positive)
    assert torch.equal(out, sample(tova, clip, positive=positive))
    record = store.maps_for(out)
    assert record.labels == ("dog",) and record.maps.shape[:2] == (1, 1)


def test_viewer_renders_known_maps_with_colormap_endpoints_overlay_and_metrics(pack):
    record_type = pack.core("attention_record").ConceptMaps
    render = pack.core("map_render")
    maps = torch.full((2, 2, 4, 4), 0.01)
    maps[0, 0, 0, 0] = maps[0, 1, 3, 3] = maps[1, 0, 1, 2] = maps[1, 1, 2, 1] = 0.5  # one peak per map
    record = record_type(labels=("dog", "cat"), maps=maps)
    image = torch.rand(2, 64, 64, 3)
    grid, masks, report = view(pack, alpha=0.25, maps=record, image=image).result
    assert grid.shape == (2, 84, 134, 3)  # 2 columns: H = 64 + 16 label + 2·2 pad, W = 2·64 + 3·2 pad
    assert masks.shape == (4, 64, 64) and masks[1, 63, 63] == 1.0 and masks[1, 0, 0] == 0.0
    lut = render.colormap_lut("inferno")
    # tile "cat" of image 0 starts at (2, 68); its bottom-right pixel is the peak: α·lut[255] + (1 − α)·image
    expected_peak = 0.25 * lut[255] + 0.75 * image[0, 63, 63]
    expected_low = 0.25 * lut[0] + 0.75 * image[0, 0, 0]
    # a·x + b·y in float32 on values ≤ 1: ≤ 3 roundings, 1e-6 ≈ 8 eps32; a wrong colour or α is off by ≥ 1/255
    assert torch.allclose(grid[0, 2 + 63, 68 + 63], expected_peak, atol=1e-6, rtol=0)
    assert torch.allclose(grid[0, 2, 68], expected_low, atol=1e-6, rtol=0)
    p = maps[1, 1].double().numpy().ravel()
    p = p / p.sum() + 1e-10
    assert f"{-(p * np.log(p)).sum():9.5f}" in report.split("Image 2 of 2")[1].split("cat")[1]
    ui = pack.glue("viewer").AttentionMapViewer.execute(0.5, "viridis", maps=record).ui
    assert len(ui["images"]) == 2 and "KL a->b" in ui["text"][0]


def test_bad_inputs_raise_one_clear_error_each(pack):
    model, clip, _ = build_tiny_model("sd15")
    positive = encode(pack, clip, "a dog and a cat")
    error = pack.error
    with pytest.raises(error, match=r'Word "horse" is not in the prompt.*Fix: add "horse"'):
        capture(pack, model, "dog, horse", positive)
    with pytest.raises(error, match=r'Word "dog" is not in the prompt 2 times'):
        capture(pack, model, "dog, dog", positive)
    with pytest.raises(error, match="got no words"):
        capture(pack, model, " , ", positive)
    with pytest.raises(error, match=r"no cross-attention layer at latent/4.*Expected: one of: all, latent, latent/2"):
        capture(pack, model, "dog", positive, layers="latent/4")
    with pytest.raises(error, match=r'no cross-attention block "input 7".*input 1, 3; middle 0; output 0, 1, 2, 3'):
        capture(pack, model, "dog", positive, layers="blocks", blocks="input 1, input 7")
    with pytest.raises(error, match='cannot find "dog" without the prompt\'s tokens'):
        capture(pack, model, "dog", None)
    patched, store = capture(pack, model, "dog, cat", positive, first=2, last=5)
    with pytest.raises(error, match=r"step range is outside the sampling run.*run of 3 steps"):
        sample(patched, clip, positive=positive, steps=3)
    patched, store = capture(pack, model, "dog, cat", positive)
    with pytest.raises(error, match="No attention was captured yet"):
        view(pack, capture=store, samples={"samples": torch.zeros(1, 4, 8, 8)})
    latent = sample(patched, clip, positive=positive, batch=2)
    with pytest.raises(error, match="would not wait for sampling"):
        view(pack, capture=store)
    with pytest.raises(error, match="LATENT was not sampled with this Capture Attention"):
        view(pack, capture=store, samples={"samples": latent + 1})
    with pytest.raises(error, match=r"different batch sizes.*3 image\(s\) and maps for 2"):
        view(pack, capture=store, samples={"samples": latent}, image=torch.rand(3, 64, 64, 3))
    with pytest.raises(error, match="exactly one source"):
        view(pack, capture=store, maps=store.maps_for(latent), samples={"samples": latent})


def test_image_only_connection_shows_the_latest_run_and_a_grid_per_image(pack):
    model, clip, vae = build_tiny_model("sd21")
    positive = encode(pack, clip, "a dog and a cat")
    patched, store = capture(pack, model, "dog, cat", positive, layers="all")
    sample(patched, clip, positive=positive, batch=2, seed=1)
    latent = sample(patched, clip, positive=positive, batch=2, seed=2)
    import nodes

    with torch.inference_mode():
        image = nodes.VAEDecode().decode(vae, {"samples": latent})[0]
    by_image = view(pack, capture=store, image=image).result
    by_latent = view(pack, capture=store, samples={"samples": latent}, image=image).result
    assert by_image[0].shape[0] == 2 and torch.equal(by_image[0], by_latent[0])
    assert by_image[1].shape == (4, 64, 64)


def test_sigma_is_read_once_per_model_call_not_per_layer(pack, monkeypatch):
    capture_core = pack.core("attention_capture")
    reads = []
    real_step_index = capture_core.step_index
    monkeypatch.setattr(
        capture_core, "step_index", lambda sigma, schedule: reads.append(sigma) or real_step_index(sigma, schedule)
    )
    model, clip, _ = build_tiny_model("sd15")
    positive = encode(pack, clip, "a dog and a cat")
    patched, store = capture(pack, model, "dog, cat", positive, layers="all")
    record = store.maps_for(sample(patched, clip, positive=positive, steps=3))  # euler: one model call per step
    assert len(record.layers) > 1 and record.steps == (0, 1, 2)
    assert len(reads) == 3  # one sigma read (one host sync on a GPU) per model call, none per attn2 layer


def _sample_with_extra_pass(pack, model, clip, positive, marked: bool | None):
    """Euler, preceded (unless marked is None) by a no-grad cond-only pass at σ0 on another latent, as LODA's mask
    pass when stage 1 is off; `marked` sets the auxiliary-pass key on it."""
    import comfy.samplers
    import nodes

    seam = pack.glue("comfy_sampling")
    euler = comfy.samplers.sampler_object("euler")

    def function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        if marked is not None:
            options = extra_args["model_options"]
            with torch.no_grad():
                seam.cond_forward(model_k, x + 1.0, sigmas[0], seam.mark_auxiliary_pass(options) if marked else options)
        return euler.sampler_function(model_k, x, sigmas, extra_args=extra_args, callback=callback, disable=disable)

    with torch.inference_mode():
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        sigmas = seam.ksampler_sigmas(model, 3, "euler", "normal", 1.0)
        out = seam.sample_latent_with_sampler(
            model, 0, 7.0, comfy.samplers.KSAMPLER(function), sigmas, positive, negative, latent
        )
    return out["samples"].clone()


def test_passes_marked_auxiliary_are_not_counted(pack):
    model, clip, _ = sharpened("sd15")
    positive = encode(pack, clip, "a dog and a cat")
    results = {}
    for marked in (None, True, False):
        patched, store = capture(pack, model, "dog, cat", positive, layers="all")
        latent = _sample_with_extra_pass(pack, patched, clip, positive, marked)
        results[marked] = (latent, store.maps_for(latent).maps)
    assert torch.equal(results[True][0], results[None][0])
    assert torch.equal(results[True][1], results[None][1])  # the marked pass left no trace
    # Unmarked, it would have counted: it moves the mean by its share (~1e-2), far above float32 rounding of maps ≤ 1.
    assert not torch.allclose(results[False][1], results[None][1], atol=1e-4)


def _loda_maps(pack, batch=2):
    record_type = pack.core("attention_record").ConceptMaps
    return record_type(labels=("dog", "cat"), maps=torch.rand(batch, 2, 8, 8) + 0.01)


@pytest.mark.parametrize(
    "case, match",
    [
        ("image batch", r"different batch sizes.*Seen: 3 image\(s\) and maps for 2"),
        ("image channels", r"not an RGB IMAGE batch.*\(2, 64, 64, 4\)"),
        ("zero maps", r"no attention at all.*loda_steps > 0"),
        ("nan in the last image", r'map of "cat" cannot be read as a distribution.*NaN'),
        ("both sources", "exactly one source"),
        ("no source", "exactly one source"),
    ],
)
def test_viewer_errors_with_loda_maps_come_before_any_rendering(pack, monkeypatch, case, match):
    viewer = pack.glue("viewer")
    rendered = []
    monkeypatch.setattr(viewer, "render_attention_grid", lambda *args, **kwargs: rendered.append(args))
    record, image = _loda_maps(pack), torch.rand(2, 64, 64, 3)
    sources = dict(maps=record, image=image)
    if case == "image batch":
        sources["image"] = torch.rand(3, 64, 64, 3)
    elif case == "image channels":
        sources["image"] = torch.rand(2, 64, 64, 4)
    elif case == "zero maps":
        sources["maps"] = type(record)(labels=record.labels, maps=torch.zeros_like(record.maps))
    elif case == "nan in the last image":
        bad = record.maps.clone()
        bad[1, 1, 3, 3] = float("nan")
        sources["maps"] = type(record)(labels=record.labels, maps=bad)
    elif case == "both sources":
        sources["capture"] = object()
    else:
        del sources["maps"]
    with pytest.raises(pack.error, match=match):
        view(pack, **sources)
    assert rendered == []  # nothing was drawn before the error


def test_lodas_mask_pass_with_stage_1_off_is_not_counted(pack):
    import comfy.sample
    import comfy.samplers
    import nodes

    model, clip, _ = build_tiny_model("sd15")
    positive = encode(pack, clip, "a dog and a cat")
    patched, store = capture(pack, model, "dog, cat", positive, layers="all")
    sigmas_seen = []
    begin = store.begin_model_call
    store.begin_model_call = lambda sigma: sigmas_seen.append(sigma) or begin(sigma)
    run = pack.glue("loda_sampling")
    config = pack.core("loda_config").LodaConfig(loda_steps=0, boost=5.0, suppression=-1e8)  # fixing on
    sampler = run.loda_sampler(
        comfy.samplers.sampler_object("euler"), run.LodaRequest(config, ("dog", "cat"), run.LodaResult())
    )
    with torch.inference_mode():
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(112, 112, 1)[0]["samples"]  # 7×7 maps: LODA's smallest
        sigmas = comfy.samplers.calculate_sigmas(patched.get_model_object("model_sampling"), "normal", 3)
        out = comfy.sample.sample_custom(
            patched, comfy.sample.prepare_noise(latent, 0), 7.0, sampler, sigmas, positive, negative, latent, seed=0
        ).clone()
    assert sigmas_seen[0] is None  # LODA's no-grad mask pass at σ0, marked auxiliary
    # Then one counted call per euler step: the same float32 sigmas, read back as floats (approx: 1e-6 relative).
    assert sigmas_seen[1:] == pytest.approx(sigmas[:-1].tolist())
    assert store.maps_for(out).steps == (0, 1, 2)


def test_a_second_positive_prompt_in_the_batch_is_left_out_of_the_maps(pack):
    """ConditioningCombine puts another prompt in the cond batch; its token s_k is another word."""
    import nodes

    model, clip, _ = sharpened("sd15")
    spy_model, spy = spied(model)
    ours, other = encode(pack, clip, "a dog and a cat"), encode(pack, clip, "a red house on a green hill")
    with torch.inference_mode():
        combined = nodes.ConditioningCombine().combine(ours, other)[0]
    patched, store = capture(pack, spy_model, "dog, cat", ours)
    latent = sample(patched, clip, positive=combined, steps=3)
    record = store.maps_for(latent)
    ids = tuple(ours[0][1][pack.glue("comfy_conditioning").PROMPT_TOKENS_KEY].token_ids)
    assert any(call["chunks"].count(0) == 2 for call in spy.calls)  # both positives share model calls
    keys = set(record.layers)
    reference = reference_maps(spy.calls, keys, [[2], [5]], 77, 0, -1, prompt_ids=ids)
    relative = max(float32_softmax_tolerance(c["q"], c["k"], c["heads"]) for c in spy.calls)  # as in the test above
    tolerance = float(reference.max()) * (relative + float32_tolerance(1.0, 64 * len(spy.calls)))
    error = (record.maps.double() - reference).abs().max()
    assert error <= tolerance, (error, tolerance)
    mixed = reference_maps(spy.calls, keys, [[2], [5]], 77, 0, -1)  # both positives averaged: what it must not be
    assert (record.maps.double() - mixed).abs().max() > 10 * tolerance


def test_a_loda_run_gives_the_interactive_viewer_its_stage1_steps_mask_step_and_masks(pack):
    """Issue 15: the LODA Sampler's maps carry what the viewer marks on its step bar, and the masks it toggles."""
    import base64

    import comfy.sample
    import comfy.samplers
    import nodes

    model, clip, _ = build_tiny_model("sd15")
    positive = encode(pack, clip, "a dog and a cat")
    run = pack.glue("loda_sampling")
    result = run.LodaResult()
    config = pack.core("loda_config").LodaConfig(loda_steps=2, boost=5.0, suppression=-1e8)
    sampler = run.loda_sampler(comfy.samplers.sampler_object("euler"), run.LodaRequest(config, ("dog", "cat"), result))
    with torch.inference_mode():
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(112, 112, 1)[0]["samples"]  # 7×7 maps: LODA's smallest
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4)
    comfy.sample.sample_custom(
        model, comfy.sample.prepare_noise(latent, 0), 7.0, sampler, sigmas, positive, negative, latent, seed=0
    )
    record = result.maps
    assert (record.total_steps, record.stage1_steps, record.mask_step) == (4, 2, 1)  # masks from step N − 1
    assert torch.equal(record.masks, result.masks) and record.masks.any()
    ui = view(pack, maps=record, image=torch.rand(1, 112, 112, 3)).ui
    payload = ui[pack.core("viewer_payload").VIEWER_KEY][0]
    assert payload["steps"] == [1] and payload["stage1_steps"] == 2 and payload["total_steps"] == 4
    assert list(base64.b64decode(payload["masks"][0])) == record.masks[0].flatten().int().tolist()
    image = payload["images"][0]
    assert image["type"] == "temp" and (image["width"], image["height"]) == (112, 112)
