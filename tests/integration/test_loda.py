"""LODA through the real ComfyUI, in process: bit-identity, stage 1 and stage 2 effects, ToVA, bad inputs, interrupts.

Tiny models have two levels, so their map level is latent/2 (the deepest, method §3.1 [choice]); 128 px gives 8×8
maps. Stage-1 effects are measured on tiny SD2.1 with attn2 q/k weights scaled ×10, so attention is not uniform
(with N(0, 0.02) weights every token attends everywhere alike and the KL is ~1e-6). Models are built under
inference mode, as ComfyUI's executor loads them, so the gradient pass meets inference-tensor weights.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import sample

from comfy_harness.tiny_adapters import write_tiny_adapter
from comfy_harness.tiny_models import SHARPEN_FACTORS, build_tiny_model, sharpen_cross_attention
from comfy_harness.tolerance import float32_tolerance
from comfy_harness.loda_settings import LODA_NODE_SETTINGS

log = logging.getLogger(__name__)
PROMPT = "a dog and a cat"  # dog = token 2, cat = token 5
SIZE = 112  # 14×14 latent, 7×7 maps in the tiny models (the smallest the 7×7 kernel accepts)
SETTINGS = dict(LODA_NODE_SETTINGS, loda_steps=-1)


# Maps against the spy's recomputation: the very probabilities the collector saw, summed over layers and heads in
# another order. The terms are positive, so the float32 sums differ by ≤ n·eps32 relative (n = layers·heads, a few
# dozen in the tiny models: ≤ 1e-5 = 84 eps32); atol 1e-7 (one ulp at 1) only covers the division by the count.
SAME_PROBABILITIES = dict(rtol=1e-5, atol=1e-7)


class Spy:
    """An extra observer: records main-pass probabilities at `keys`, or raises `error` in the gradient pass."""

    def __init__(self, keys=(), error=None):
        self.keys, self.error, self.records, self.calls = frozenset(keys), error, [], 0

    def __deepcopy__(self, memo):
        return self

    def attention_bias(self, call, q, k):
        self.calls += 1
        if self.error is not None and torch.is_grad_enabled():
            raise self.error
        return None

    def needs_probabilities(self, call):
        return call.key in self.keys and not torch.is_grad_enabled()

    def observe_probabilities(self, call, probs):  # the processor calls every observer when any one needs them
        if self.needs_probabilities(call):
            self.records.append((float(call.sigmas[0]), call, probs.detach().clone()))

    def after_attention(self, call):
        return None


def tiny(arch="sd15", seed=0):
    """(MODEL, CLIP) with inference-tensor weights, as the executor loads them (integration §4.2)."""
    with torch.inference_mode():
        model, clip, _ = build_tiny_model(arch, seed)
    return model, clip


def with_spy(pack, model, spy):
    family = pack.family(model)
    spied = model.clone()
    spied.model_options = family.install_observers(spied.model_options, family.layout(model), (spy,))
    return spied


def encode(pack, clip, text=PROMPT):
    with torch.inference_mode():
        return pack.glue("prompt").ConceptSplitTextEncode.execute(clip, text).result[0]


def sample_custom(model, clip, sampler, positive, steps=4, seed=0, batch=1, cfg=7.0):
    """SamplerCustom's path (comfy.sample.sample_custom), under inference mode as the executor runs it."""
    import comfy.sample
    import comfy.samplers
    import nodes

    with torch.inference_mode():
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(SIZE, SIZE, batch)[0]["samples"]
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample_custom(
            model, noise, cfg, sampler, sigmas, positive, negative, latent, seed=seed
        ).clone()


def loda(pack, inner_name, n, words=("dog", "cat"), **config):
    import comfy.samplers

    run = pack.glue("loda_sampling")
    result = run.LodaResult()
    request = run.LodaRequest(pack.core("loda_config").LodaConfig(loda_steps=n, **config), tuple(words), result)
    return run.loda_sampler(comfy.samplers.sampler_object(inner_name), request), result


def all_in_one(
    pack,
    model,
    clip,
    positive=None,
    words="dog, cat",
    steps=4,
    size=SIZE,
    batch=1,
    denoise=1.0,
    sampler_name="euler",
    negative=None,
    noise_mask=None,
    **overrides,
):
    import nodes

    settings = dict(SETTINGS, **overrides)
    with torch.inference_mode():
        positive = encode(pack, clip) if positive is None else positive
        negative = nodes.CLIPTextEncode().encode(clip, "")[0] if negative is None else negative
        latent = nodes.EmptyLatentImage().generate(size, size, batch)[0]
        if noise_mask is not None:
            latent = {**latent, "noise_mask": noise_mask}
        return (
            pack.glue("loda_nodes")
            .LodaSampler.execute(
                model, 0, steps, 7.0, sampler_name, "normal", positive, negative, latent, denoise, words, **settings
            )
            .result
        )


def sharpened_sd21(seed=0):
    model, clip = tiny("sd21", seed)
    sharpen_cross_attention(model, SHARPEN_FACTORS["sd21"])
    return model, clip


def test_nodes_register_with_display_names_and_tooltips(pack):
    import nodes

    for node_id, display in (
        ("ConceptSplitLodaSampler", "LODA Sampler"),
        ("ConceptSplitLoda", "ConceptSplit LODA"),
        ("ConceptSplitLodaResults", "ConceptSplit LODA Results"),
    ):
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == display
        schema = nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        assert [i.id for i in schema.inputs if not i.tooltip] == [] and all(o.tooltip for o in schema.outputs)
    inputs = {i.id: i for i in nodes.NODE_CLASS_MAPPINGS["ConceptSplitLodaSampler"].GET_SCHEMA().inputs}
    assert inputs["mask_percentile"].default == 0.9 and "0.80 to 0.99" in inputs["mask_percentile"].tooltip
    assert inputs["boost"].default == 5.0 and inputs["suppression"].default == -1e8


@pytest.mark.parametrize(
    "sampler_name", ["euler", "euler_ancestral", "dpmpp_2m", "heun", "dpmpp_2m_sde", "ddim", "uni_pc"]
)
def test_no_stage_1_and_no_fixing_is_bit_identical_to_the_wrapped_sampler(pack, sampler_name):
    import comfy.samplers

    model, clip = tiny("sd15")
    positive = encode(pack, clip)
    plain = sample_custom(model, clip, comfy.samplers.sampler_object(sampler_name), positive)
    wrapped, _ = loda(pack, sampler_name, 0, boost=0.0, suppression=0.0)
    assert torch.equal(sample_custom(model, clip, wrapped, positive), plain)
    if sampler_name not in ("dpmpp_2m", "dpmpp_2m_sde", "uni_pc"):  # multistep restarts per slice (integration §4.3)
        sliced, result = loda(pack, sampler_name, 2, step_scale=0.0, boost=0.0, suppression=0.0)
        assert torch.equal(sample_custom(model, clip, sliced, positive), plain)  # same noise, zero update
        assert result.report.count(": updated") == 2


def test_stage_1_raises_the_harmonic_mean_kl_at_step_n(pack):
    loss = pack.core("loda_loss")
    model, clip = sharpened_sd21()
    hm = {}
    for scale in (0.0, 40.0):
        _, _, maps, report = all_in_one(
            pack, model, clip, steps=6, loda_steps=3, step_scale=scale, boost=0.0, suppression=0.0
        )
        hm[scale] = float(loss.separation_loss(maps.maps[0])[1].harmonic_mean)
    numbers = f"HM at step N=3 of 6: without stage 1 {hm[0.0]:.4f}, with stage 1 {hm[40.0]:.4f}"
    log.warning(numbers)
    assert hm[40.0] > 2 * hm[0.0], numbers


def test_fixing_raises_each_tokens_attention_share_inside_its_own_mask(pack):
    model, clip = sharpened_sd21()
    layers = pack.core("loda").select_map_layers(pack.layout(model), (SIZE // 8, SIZE // 8), "all")
    shares = {}
    for boost, suppression in ((0.0, 0.0), (5.0, -1e8)):
        spy = Spy(layers.mask_keys)
        sampler, result = loda(pack, "euler", 2, boost=boost, suppression=suppression)
        sample_custom(with_spy(pack, model, spy), clip, sampler, encode(pack, clip), steps=5)
        stage2 = sorted({s for s, _, _ in spy.records}, reverse=True)[1:]  # σ of steps 2.. (step 1 is stage 1)
        values = []
        for sigma, call, probs in spy.records:
            if sigma not in stage2:
                continue
            cond = probs[call.chunk_rows(0)].mean(1)  # (B_img, N, T), heads averaged
            for k, position in enumerate((2, 5)):
                column = cond[0, :, position]  # (N,)
                values.append(float(column[result.masks[0, k].flatten()].sum() / column.sum()))
        shares[boost] = sum(values) / len(values)
    numbers = (
        f"share of token k's attention inside mask k, stage 2: without fixing {shares[0.0]:.4f}, "
        f"with fixing {shares[5.0]:.4f}"
    )
    log.warning(numbers)
    assert shares[5.0] > shares[0.0] + 0.1, numbers


def test_batch_images_get_their_own_masks_and_outputs_have_the_documented_shapes(pack):
    model, clip = tiny("sd15")
    latent, masks, maps, report = all_in_one(pack, model, clip, steps=3, batch=2, loda_steps=1)
    assert latent["samples"].shape == (2, 4, 14, 14) and torch.isfinite(latent["samples"]).all()
    assert masks.shape == (4, SIZE, SIZE) and maps.maps.shape == (2, 2, 7, 7) and maps.labels == ("dog", "cat")
    assert not torch.equal(masks[0:2], masks[2:4])  # image 0's masks differ from image 1's
    assert "step 0 image 1" in report and "fixing from step 1" in report


def test_non_finite_gradient_skips_the_update_and_says_so(pack, monkeypatch):
    run = pack.glue("loda_sampling")
    model, clip = tiny("sd15")
    reference = all_in_one(pack, model, clip, steps=3, loda_steps=1, step_scale=0.0)[0]["samples"]
    original = run.separation_loss

    def poisoned(maps, config):  # same value, infinite gradient: d sqrt(u)/du at u = 0
        loss, diagnostics = original(maps, config)
        return loss + torch.sqrt(maps.sum() - maps.sum().detach()), diagnostics

    monkeypatch.setattr(run, "separation_loss", poisoned)
    latent, _, _, report = all_in_one(pack, model, clip, steps=3, loda_steps=1)
    assert "skipped: non-finite gradient" in report and "1 update(s) skipped" in report
    assert torch.equal(latent["samples"], reference)


def test_denoise_below_one_counts_the_steps_that_run(pack):
    model, clip = tiny("sd15")
    latent, _, _, report = all_in_one(pack, model, clip, steps=3, denoise=0.5, loda_steps=1)
    assert "stage 1 on steps 0..0 of 3" in report and torch.isfinite(latent["samples"]).all()


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_tova_model_with_empty_words_separates_its_object_concepts(pack, tova_folder, arch):
    model, clip = tiny(arch)
    adapters = pack.glue("adapters")
    chain = None
    for word, seed in (("dog", 1), ("cat", 2), ("sofa", 3)):
        write_tiny_adapter(
            tova_folder / f"{word}.safetensors",
            model,
            word,
            seed=seed,
            role="background" if word == "sofa" else "object",
        )
        chain = adapters.LoadToVAAdapter.execute(f"{word}.safetensors", "", 1.0, "from file", -1, chain).result[0]
    text = "a dog and a cat on a sofa"
    with torch.inference_mode():
        patched, positive, _ = adapters.ApplyToVA.execute(model, chain, clip, text, True).result
    latent, _, maps, report = all_in_one(pack, patched, clip, positive=positive, words="", steps=3, loda_steps=1)
    assert "dog (token 2), cat (token 5)" in report and "sofa" not in report and maps.labels == ("dog", "cat")
    assert torch.isfinite(latent["samples"]).all()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(words="dog"), r"at least 2 object concepts.*1 object concept"),
        (dict(words="dog, horse"), r'"horse".*is not in the prompt'),
        (dict(loda_steps=9), r"More LODA steps than sampling steps.*N = 9 with 4"),
        (dict(mask_percentile=1.0), r"mask_percentile is out of range"),
        (dict(size=96), r"Unsupported resolution.*6×6 maps"),
        (dict(words=""), r"at least 2 object concepts.*0 object concept"),
        (dict(plain_positive=True), r"carries no token record.*ConceptSplit Text Encode"),
    ],
)
def test_bad_inputs_raise_one_error_before_sampling(pack, overrides, message):
    import nodes

    model, clip = tiny("sd15")
    spy = Spy()
    if overrides.pop("plain_positive", False):
        with torch.inference_mode():
            overrides["positive"] = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    with pytest.raises(pack.error, match=message):
        all_in_one(pack, with_spy(pack, model, spy), clip, **overrides)
    assert spy.calls == 0  # no UNet call happened


def test_interrupt_in_stage_1_leaves_the_model_and_the_next_plain_run_untouched(pack):
    import comfy.model_management

    model, clip = tiny("sd21")
    before = sample(model, clip, size=SIZE)
    options = copy.deepcopy(model.model_options)
    spy = Spy(error=comfy.model_management.InterruptProcessingException())
    sampler, _ = loda(pack, "euler_ancestral", 2)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample_custom(with_spy(pack, model, spy), clip, sampler, encode(pack, clip))
    assert spy.calls > 0 and model.model_options == options
    assert torch.equal(sample(model, clip, size=SIZE), before)
    sampler, _ = loda(pack, "euler", 1)
    sample_custom(model, clip, sampler, encode(pack, clip), steps=2)  # a completed LODA run, then plain again
    assert torch.equal(sample(model, clip, size=SIZE), before)


def attn2_blocks(model):
    """(block name, block id) of every attn2 layer, for set_model_attn2_replace."""
    for name in dict(model.model.diffusion_model.named_modules()):
        if name.endswith(".attn2"):
            parts = name.split(".")
            yield ("middle", 0) if parts[0] == "middle_block" else (parts[0][:-7], int(parts[1]))


class ForeignReplace:
    """Another pack's attn2 replace (as IPAdapter installs one): plain attention, counted."""

    def __init__(self):
        self.calls = 0

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention

        self.calls += 1
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])


@pytest.mark.parametrize("sampler_name", ["uni_pc", "uni_pc_bh2"])
def test_uni_pc_with_stage_1_is_refused_before_sampling(pack, sampler_name):
    model, clip = tiny("sd15")
    spy = Spy()
    with pytest.raises(pack.error, match=r"cannot run with the uni_pc samplers.*order 0.*loda_steps to 0"):
        all_in_one(pack, with_spy(pack, model, spy), clip, sampler_name=sampler_name, steps=3, loda_steps=1)
    sampler, _ = loda(pack, sampler_name, 1)
    with pytest.raises(pack.error, match="cannot run with the uni_pc samplers"):
        sample_custom(with_spy(pack, model, spy), clip, sampler, encode(pack, clip), steps=3)
    assert spy.calls == 0
    latent, _, _, report = all_in_one(pack, model, clip, sampler_name=sampler_name, steps=3, loda_steps=0)
    assert "stage 1 off" in report and "fixing from step 0" in report and torch.isfinite(latent["samples"]).all()


def test_fixing_through_a_foreign_attention_replace_is_refused_before_sampling(pack):
    model, clip = tiny("sd15")
    foreign = ForeignReplace()
    patched = model.clone()
    for block in attn2_blocks(model):
        patched.set_model_attn2_replace(foreign, block[0], block[1], 0)
    with pytest.raises(pack.error, match=r"cannot pass a bias through another pack's.*ForeignReplace"):
        all_in_one(pack, patched, clip, steps=3, loda_steps=1)
    sampler, _ = loda(pack, "euler", 1)  # the SAMPLER path checks the per-run model options
    with pytest.raises(pack.error, match="cannot pass a bias through another pack's"):
        sample_custom(patched, clip, sampler, encode(pack, clip), steps=3)
    assert foreign.calls == 0
    latent, _, _, report = all_in_one(pack, patched, clip, steps=3, loda_steps=1, boost=0.0, suppression=0.0)
    assert foreign.calls > 0 and ": updated" in report and torch.isfinite(latent["samples"]).all()


def test_masks_come_from_the_first_forward_of_step_n_minus_1_not_from_heuns_corrector(pack):
    """Method §4.1: the main CFG pass of step N − 1 on the updated latent; heun's corrector runs at σ_N."""
    model, clip = sharpened_sd21()
    layers = pack.core("loda").select_map_layers(pack.layout(model), (SIZE // 8, SIZE // 8), "all")
    spy = Spy(layers.mask_keys)  # main passes only (no grad): stage 1's gradient pass is not recorded
    sampler, result = loda(pack, "heun", 1)
    sample_custom(with_spy(pack, model, spy), clip, sampler, encode(pack, clip), steps=3)
    sigma_0 = max(s for s, _, _ in spy.records)
    first = [(call, probs) for s, call, probs in spy.records if s == sigma_0]
    corrector = [(call, probs) for s, call, probs in spy.records if s != sigma_0][: len(layers.mask_keys)]
    assert len(first) == len(layers.mask_keys)  # heun's first evaluation of step 0

    def maps_of(calls):  # mean over heads and layers of the cond chunk's concept columns, (1, K, h, w)
        total = sum(probs[call.chunk_rows(0)][..., [2, 5]].sum(1) for call, probs in calls)  # (1, N, K)
        count = sum(call.heads for call, _ in calls)
        return (total / count).transpose(1, 2).unflatten(-1, layers.grid)

    expected = maps_of(first)
    torch.testing.assert_close(result.maps.maps, expected, **SAME_PROBABILITIES)
    default = pack.core("loda_config").LodaConfig()
    assert torch.equal(result.masks, pack.core("loda").build_concept_masks(expected, default))
    assert not torch.allclose(result.maps.maps, maps_of(corrector), rtol=1e-3)  # the last forward's: far off that


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "uni_pc"])
def test_node_with_stage_1_off_and_no_fixing_is_bit_identical_to_ksampler(pack, sampler_name):
    import nodes

    model, clip = tiny("sd15")
    positive = encode(pack, clip)
    latent, masks, _, report = all_in_one(
        pack, model, clip, positive=positive, sampler_name=sampler_name, loda_steps=0, boost=0.0, suppression=0.0
    )
    with torch.inference_mode():
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        empty = nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
        plain = nodes.common_ksampler(model, 0, 4, 7.0, sampler_name, "normal", positive, negative, empty)[0]
    assert torch.equal(latent["samples"], plain["samples"])
    assert "stage 1 off" in report and "attention fixing off" in report and not masks.any()


def test_denoise_zero_returns_the_input_latent_and_zero_masks_like_ksampler(pack):
    model, clip = tiny("sd15")
    spy = Spy()
    latent, masks, maps, report = all_in_one(pack, with_spy(pack, model, spy), clip, denoise=0.0, loda_steps=1)
    assert spy.calls == 0 and torch.equal(latent["samples"], torch.zeros(1, 4, SIZE // 8, SIZE // 8))
    assert masks.shape == (2, SIZE, SIZE) and not masks.any() and not maps.maps.any()
    assert "denoise 0" in report


def test_stage_1_with_a_controlnet_runs_on_its_inference_weights_and_leaves_them_in_place(pack):
    import nodes

    from comfy_harness.tiny_controlnet import build_tiny_controlnet

    with torch.inference_mode():
        model, clip, vae = build_tiny_model("sd15", 0)
        control = build_tiny_controlnet("sd15")
        positive = pack.glue("prompt").ConceptSplitTextEncode.execute(clip, PROMPT).result[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        hint = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(5))
        positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, control, hint, 1.0, 0.0, 1.0, vae=vae
        )
    before = [
        list(m.control_model.parameters()) if hasattr(m, "control_model") else list(m.model.parameters())
        for m in (control, model)
    ]
    assert all(p.is_inference() for p in before[0])
    latent, _, _, report = all_in_one(pack, model, clip, positive=positive, negative=negative, steps=3, loda_steps=1)
    assert ": updated" in report and torch.isfinite(latent["samples"]).all()
    after = [list(control.control_model.parameters()), list(model.model.parameters())]
    for old, new in zip(before, after):  # the very same tensor objects, still inference tensors: nothing swapped
        assert len(old) == len(new) and all(a is b for a, b in zip(old, new))
    assert all(p.is_inference() for p in after[0])


def test_inpainting_mask_zeroes_the_stage_1_update_outside_the_mask(pack, monkeypatch):
    run = pack.glue("loda_sampling")
    model, clip = sharpened_sd21()
    original, deltas = run.kdiffusion_latent_update, []

    def recording(x, grad, sigma, eta):
        updated = original(x, grad, sigma, eta)
        deltas.append((updated - x).detach().clone())  # (1, 4, h, w)
        return updated

    monkeypatch.setattr(run, "kdiffusion_latent_update", recording)
    mask = torch.zeros(1, SIZE, SIZE)
    mask[..., : SIZE // 2] = 1.0  # repaint the left half of the image only
    latent, _, _, report = all_in_one(
        pack, model, clip, steps=3, loda_steps=2, boost=0.0, suppression=0.0, noise_mask=mask
    )
    assert len(deltas) == 2 and report.count(": updated") == 2
    for delta in deltas:
        assert delta[..., SIZE // 16 + 1 :].abs().max() == 0  # right half: untouched (bilinear edge column aside)
        assert delta[..., : SIZE // 16 - 1].abs().max() > 0


def test_result_is_reset_when_a_run_starts(pack):
    model, clip = tiny("sd15")
    sampler, result = loda(pack, "euler", 1)
    sample_custom(model, clip, sampler, encode(pack, clip), steps=3)
    assert result.masks is not None and "step 0" in result.report
    with pytest.raises(pack.error, match='"cat".*is not in the prompt'):
        sample_custom(model, clip, sampler, encode(pack, clip, "a dog on a sofa"), steps=3)
    assert result.masks is None and result.maps is None and result.report == ""  # nothing stale from run 1


def test_empty_words_with_another_recorded_positive_than_apply_tovas_is_refused(pack, tova_folder):
    model, clip = tiny("sd15")
    adapters = pack.glue("adapters")
    chain = None
    for word, seed in (("dog", 1), ("cat", 2)):
        write_tiny_adapter(tova_folder / f"{word}.safetensors", model, word, seed=seed)
        chain = adapters.LoadToVAAdapter.execute(f"{word}.safetensors", "", 1.0, "from file", -1, chain).result[0]
    with torch.inference_mode():
        patched, _, _ = adapters.ApplyToVA.execute(model, chain, clip, PROMPT, True).result
    spy = Spy()
    other = encode(pack, clip, "a cat and a dog")  # same length, other token order: positions would be wrong
    with pytest.raises(pack.error, match=r"not the prompt Apply ToVA located \"dog\" in.*a cat and a dog"):
        all_in_one(pack, with_spy(pack, patched, spy), clip, positive=other, words="", steps=3, loda_steps=1)
    assert spy.calls == 0


def test_gradient_checkpointing_gives_the_same_updates_and_checkpoints_only_non_loss_blocks(pack, monkeypatch):
    import torch.utils.checkpoint

    from comfy.ldm.modules.attention import SpatialTransformer

    autograd = pack.glue("comfy_autograd")
    model, clip = sharpened_sd21()
    unet = model.model.diffusion_model
    wrapped, calls = [], []
    original_enter = autograd.GradientCheckpointing.__enter__

    def enter(self):
        wrapped.append([m for m in self.modules])
        return original_enter(self)

    def counting(function, *args, **kwargs):
        calls.append(function)
        return original_checkpoint(function, *args, **kwargs)

    original_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(autograd.GradientCheckpointing, "__enter__", enter)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    runs = {}
    for checkpointing in (False, True):
        calls.clear()
        latent, _, maps, report = all_in_one(
            pack, model, clip, steps=4, loda_steps=2, gradient_checkpointing=checkpointing
        )
        runs[checkpointing] = (latent["samples"], maps.maps, report, len(calls))
    plain, checkpointed = runs[False], runs[True]
    assert plain[3] == 0 and checkpointed[3] > 0  # the recompute path really ran, and only when asked
    assert checkpointed[2].count(": updated") == 2
    # Checkpointing recomputes the same float32 ops in the same order, so the results are bit-identical. The
    # tolerance only lets autograd sum a gradient in another order (≈ one ulp per model output, carried through
    # 4 euler steps at cfg 7: the bound of test_tova.sampled_tolerance, relative to each tensor's magnitude). A
    # recompute that lost the bias or the capture changes the stage-1 update by the order of LODA's effect.
    for checked, reference in zip(checkpointed[:2], plain[:2]):  # latent, maps
        torch.testing.assert_close(checked, reference, rtol=0, atol=float32_tolerance(reference, 4 * (2 * 7 + 1)))
    # the SpatialTransformers holding loss layers (the deepest level of the tiny model) are never wrapped
    layers = pack.core("loda").select_map_layers(pack.layout(model), (SIZE // 8, SIZE // 8), "all")
    loss_blocks = {key[:2] for key in layers.loss_keys}
    kept = {
        id(m)
        for block in loss_blocks
        for m in pack.glue("families.unet")._block_module(unet, block).modules()
        if isinstance(m, SpatialTransformer)
    }
    assert kept and wrapped and all(id(m) not in kept for m in wrapped[-1])
    assert any(isinstance(m, SpatialTransformer) for m in wrapped[-1])  # the others are
    assert not any("forward" in m.__dict__ for m in unet.modules())  # every forward restored


def test_autograd_weights_view_the_same_memory_and_restore_the_originals_even_on_error(pack):
    autograd = pack.glue("comfy_autograd")
    model, _ = tiny("sd15")
    unet = model.model.diffusion_model
    originals = {name: p for name, p in unet.named_parameters()}
    buffers = {name: b for name, b in unet.named_buffers()}
    assert originals and all(p.is_inference() for p in originals.values())
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="stop"):
        with torch.inference_mode(), autograd.AutogradWeights([unet, unet]) as weights:  # twice: swapped once
            assert weights.count == len(originals) + sum(b.is_inference() for b in buffers.values())
            views = dict(unet.named_parameters())
            for name, view in views.items():
                assert not view.is_inference() and not view.requires_grad
                assert view.data_ptr() == originals[name].data_ptr() and torch.equal(view, originals[name])
            with torch.inference_mode(False), torch.enable_grad():
                out = unet.input_blocks[0](x, None, None)  # conv_in on the views: autograd accepts them
                (grad,) = torch.autograd.grad(out.square().sum(), x)
            weight = originals["input_blocks.0.0.weight"].detach().clone()
            bias = originals["input_blocks.0.0.bias"].detach().clone()
            reference = torch.nn.grad.conv2d_input(
                x.shape, weight, 2 * torch.nn.functional.conv2d(x.detach(), weight, bias, padding=1), padding=1
            )
            # float32 convolutions: the forward sums 9·4 products and the bias, the input gradient 9·64 products; in
            # another summation order each side is within that many eps32 of Σ|terms| (the same kernels: identical).
            terms = torch.nn.grad.conv2d_input(
                x.shape,
                weight.abs(),
                2 * torch.nn.functional.conv2d(x.detach().abs(), weight.abs(), bias.abs(), padding=1),
                padding=1,
            )  # Σ|terms| of both sums
            torch.testing.assert_close(grad, reference, rtol=0, atol=float32_tolerance(terms, 2 * (9 * 64 + 9 * 4 + 1)))
            raise ValueError("stop")
    assert all(p is originals[name] for name, p in unet.named_parameters())
    assert all(b is buffers[name] for name, b in unet.named_buffers())
    assert weights.count == 0


def test_interrupt_in_a_checkpointed_stage_1_restores_the_forwards_and_weights(pack):
    import comfy.model_management
    import comfy.samplers

    model, clip = tiny("sd21")
    unet = model.model.diffusion_model
    params = list(unet.parameters())
    before = sample(model, clip, size=SIZE)
    run = pack.glue("loda_sampling")
    request = run.LodaRequest(
        pack.core("loda_config").LodaConfig(loda_steps=2), ("dog", "cat"), run.LodaResult(), gradient_checkpointing=True
    )
    spy = Spy(error=comfy.model_management.InterruptProcessingException())
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample_custom(
            with_spy(pack, model, spy),
            clip,
            run.loda_sampler(comfy.samplers.sampler_object("euler"), request),
            encode(pack, clip),
        )
    assert spy.calls > 0
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert all(p is q and p.is_inference() for p, q in zip(params, unet.parameters()))
    assert torch.equal(sample(model, clip, size=SIZE), before)


def test_a_second_positive_prompt_in_the_batch_does_not_enter_the_maps_or_get_the_bias(pack):
    """ConditioningCombine: the other prompt's chunk has another word at s_k; LODA reads and biases its own only."""
    import nodes

    model, clip = sharpened_sd21()
    layers = pack.core("loda").select_map_layers(pack.layout(model), (SIZE // 8, SIZE // 8), "all")
    ours, other = encode(pack, clip), encode(pack, clip, "a red house on a green hill")
    with torch.inference_mode():
        combined = nodes.ConditioningCombine().combine(ours, other)[0]
    ours_ids = tuple(ours[0][1][pack.glue("comfy_conditioning").PROMPT_TOKENS_KEY].token_ids)
    spy = Spy(layers.mask_keys)
    sampler, result = loda(pack, "euler", 1)
    sample_custom(with_spy(pack, model, spy), clip, sampler, combined, steps=3)
    sigma_0 = max(s for s, _, _ in spy.records)
    first = [(call, probs) for s, call, probs in spy.records if s == sigma_0][: len(layers.mask_keys)]
    chunks = first[0][0].chunk_prompts
    assert len(chunks) == len(first[0][0].cond_or_uncond) and all(c is not None for c in chunks)

    def maps_of(pick):  # (1, K, h, w): mean over layers and heads of the picked positive chunks' columns 2 and 5
        total, count = 0, 0
        for call, probs in first:
            per = call.rows_per_chunk
            for index, branch in enumerate(call.cond_or_uncond):
                if branch == 0 and pick(call.chunk_prompts[index]):
                    total = total + probs[index * per : (index + 1) * per][..., [2, 5]].sum(1)  # (1, N, K)
                    count += call.heads
        return (total / count).transpose(1, 2).unflatten(-1, layers.grid)

    expected = maps_of(lambda chunk: chunk.prompt_ids == ours_ids)
    torch.testing.assert_close(result.maps.maps, expected, **SAME_PROBABILITIES)
    mixed = maps_of(lambda chunk: True)  # what a chunk-blind collector would average
    assert not torch.allclose(result.maps.maps, mixed, rtol=1e-3)  # 100× SAME_PROBABILITIES' rtol


def test_an_area_prompt_running_first_neither_ends_the_gradient_pass_nor_enters_maps_and_bias(pack):
    """ConditioningCombine(area prompt, LODA prompt): ComfyUI runs the cropped area prompt in its own model calls,
    first. Stage 1 must still see its own prompt, and masks and bias must not land on the crop."""
    import nodes

    model, clip = sharpened_sd21()
    layers = pack.core("loda").select_map_layers(pack.layout(model), (SIZE // 8, SIZE // 8), "all")
    ours = encode(pack, clip)
    with torch.inference_mode():
        area = nodes.ConditioningSetArea().append(encode(pack, clip, "a red house on a green hill"), 64, 64, 0, 0, 1.0)[
            0
        ]
        combined = nodes.ConditioningCombine().combine(area, ours)[0]
    spy = Spy(layers.mask_keys)
    biased = []
    fixer_bias = pack.core("loda").FixingBias.attention_bias

    def recording(self, call, q, k):
        bias = fixer_bias(self, call, q, k)
        if self.active:
            biased.append((call, None if bias is None else bias.detach().clone()))
        return bias

    sampler, result = loda(pack, "euler", 1)
    original = pack.core("loda").FixingBias.attention_bias
    pack.core("loda").FixingBias.attention_bias = recording
    try:
        sample_custom(with_spy(pack, model, spy), clip, sampler, combined, steps=3)
    finally:
        pack.core("loda").FixingBias.attention_bias = original
    assert ": updated" in result.report
    assert any(call.grid != layers.grid for _, call, _ in spy.records if call.key == layers.mask_keys[0])  # crops
    for call, bias in biased:  # crops (and the negatives paired with them) are never biased, the rest always
        for index, chunk in enumerate(call.chunk_prompts):
            rows = None if bias is None else bias[index * call.rows_per_chunk : (index + 1) * call.rows_per_chunk]
            assert (rows is None or rows.abs().sum() == 0) == chunk.area
    areas = [call for call, _ in biased if any(chunk.area for chunk in call.chunk_prompts)]
    assert areas and len(areas) < len(biased)
    sigma_0 = max(s for s, _, _ in spy.records)
    first = [(call, probs) for s, call, probs in spy.records if s == sigma_0 and call.grid == layers.grid]
    total = sum(
        probs[index * call.rows_per_chunk : (index + 1) * call.rows_per_chunk][..., [2, 5]].sum(1)
        for call, probs in first[: len(layers.mask_keys)]
        for index, branch in enumerate(call.cond_or_uncond)
        if branch == 0
    )
    count = sum(call.heads for call, _ in first[: len(layers.mask_keys)])
    expected = (total / count).transpose(1, 2).unflatten(-1, layers.grid)
    torch.testing.assert_close(result.maps.maps, expected, **SAME_PROBABILITIES)
