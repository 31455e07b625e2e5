"""LODA through the real ComfyUI, in process: bit-identity, stage 1 and stage 2 effects, ToVA, bad inputs, interrupts.

Tiny models have two levels, so their map level is latent/2 (the deepest, spec §3.1 [choice]); 128 px gives 8×8
maps. Stage-1 effects are measured on tiny SD2.1 with attn2 q/k weights scaled ×10, so attention is not uniform
(with N(0, 0.02) weights every token attends everywhere alike and the KL is ~1e-6).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import sample

from testing.tiny_adapters import write_tiny_adapter
from testing.tiny_models import build_tiny_model

log = logging.getLogger(__name__)
PROMPT = "a dog and a cat"  # dog = token 2, cat = token 5
SIZE = 112  # 14×14 latent, 7×7 maps in the tiny models (the smallest the 7×7 kernel accepts)
SETTINGS = dict(loda_steps=0, inner_iterations=1, kl_threshold=1.0, step_scale=40.0, step_schedule="linear",
                smoothing_sigma=1.5, kl_pairs="ordered", mask_percentile=0.9, mask_sigma=1.5, boost=5.0,
                suppression=-1e8, fixing_layers="all", fixing_branches="both", mask_source="cond")


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

    def observe_probabilities(self, call, probs):
        self.records.append((float(call.sigmas[0]), call, probs.detach().clone()))

    def after_attention(self, call):
        return None


def with_spy(pack, model, spy):
    hooks = pack.glue("comfy_hooks")
    spied = model.clone()
    spied.model_options = hooks.with_observers(spied.model_options, hooks.unet_layout(model), (spy,))
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
        return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                          seed=seed).clone()


def loda(pack, inner_name, n, words=("dog", "cat"), **config):
    import comfy.samplers

    run = pack.glue("loda_sampling")
    result = run.LodaResult()
    request = run.LodaRequest(pack.core("loda_config").LodaConfig(**config), tuple(words), n, result)
    return run.loda_sampler(comfy.samplers.sampler_object(inner_name), request), result


def all_in_one(pack, model, clip, positive=None, words="dog, cat", steps=4, size=SIZE, batch=1, denoise=1.0,
               **overrides):
    import nodes

    settings = dict(SETTINGS, **overrides)
    with torch.inference_mode():
        positive = encode(pack, clip) if positive is None else positive
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(size, size, batch)[0]
        return pack.glue("loda_nodes").LodaSampler.execute(model, 0, steps, 7.0, "euler", "normal", positive,
                                                           negative, latent, denoise, words, **settings).result


def sharpened_sd21(seed=0, factor=10.0):
    model, clip, vae = build_tiny_model("sd21", seed)
    with torch.no_grad():
        for name, p in model.model.diffusion_model.named_parameters():
            if ".attn2.to_q." in name or ".attn2.to_k." in name:
                p.mul_(factor)
    return model, clip


def test_nodes_register_with_display_names_and_tooltips(pack):
    import nodes

    for node_id, display in (("ConceptSplitLodaSampler", "LODA Sampler"), ("ConceptSplitLoda", "ConceptSplit LODA"),
                             ("ConceptSplitLodaResults", "ConceptSplit LODA Results")):
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == display
        schema = nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        assert [i.id for i in schema.inputs if not i.tooltip] == [] and all(o.tooltip for o in schema.outputs)
    inputs = {i.id: i for i in nodes.NODE_CLASS_MAPPINGS["ConceptSplitLodaSampler"].GET_SCHEMA().inputs}
    assert inputs["mask_percentile"].default == 0.9 and "0.80 to 0.99" in inputs["mask_percentile"].tooltip
    assert inputs["boost"].default == 5.0 and inputs["suppression"].default == -1e8


@pytest.mark.parametrize("sampler_name", ["euler", "euler_ancestral", "dpmpp_2m", "heun", "dpmpp_2m_sde"])
def test_no_stage_1_and_no_fixing_is_bit_identical_to_the_wrapped_sampler(pack, sampler_name):
    import comfy.samplers

    model, clip, _ = build_tiny_model("sd15", 0)
    positive = encode(pack, clip)
    plain = sample_custom(model, clip, comfy.samplers.sampler_object(sampler_name), positive)
    wrapped, _ = loda(pack, sampler_name, 0, boost=0.0, suppression=0.0)
    assert torch.equal(sample_custom(model, clip, wrapped, positive), plain)
    if sampler_name not in ("dpmpp_2m", "dpmpp_2m_sde"):  # multistep history restarts per slice (notes §4.3)
        sliced, result = loda(pack, sampler_name, 2, step_scale=0.0, boost=0.0, suppression=0.0)
        assert torch.equal(sample_custom(model, clip, sliced, positive), plain)  # same noise, zero update
        assert result.report.count(": updated") == 2


def test_stage_1_raises_the_harmonic_mean_kl_at_step_n(pack):
    loss = pack.core("loda_loss")
    model, clip = sharpened_sd21()
    hm = {}
    for scale in (0.0, 40.0):
        _, _, maps, report = all_in_one(pack, model, clip, steps=6, loda_steps=3, step_scale=scale,
                                        boost=0.0, suppression=0.0)
        hm[scale] = float(loss.separation_loss(maps.maps[0])[1].harmonic_mean)
    numbers = f"HM at step N=3 of 6: without stage 1 {hm[0.0]:.4f}, with stage 1 {hm[40.0]:.4f}"
    log.warning(numbers)
    assert hm[40.0] > 2 * hm[0.0], numbers


def test_fixing_raises_each_tokens_attention_share_inside_its_own_mask(pack):
    model, clip = sharpened_sd21()
    layers = pack.core("loda").select_map_layers(
        pack.glue("comfy_hooks").layer_levels(model, pack.glue("comfy_hooks").unet_layout(model)), "sd2.1",
        (SIZE // 8, SIZE // 8), "all")
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
    numbers = (f"share of token k's attention inside mask k, stage 2: without fixing {shares[0.0]:.4f}, "
               f"with fixing {shares[5.0]:.4f}")
    log.warning(numbers)
    assert shares[5.0] > shares[0.0] + 0.1, numbers


def test_batch_images_get_their_own_masks_and_outputs_have_the_documented_shapes(pack):
    model, clip, _ = build_tiny_model("sd15", 0)
    latent, masks, maps, report = all_in_one(pack, model, clip, steps=3, batch=2, loda_steps=1)
    assert latent["samples"].shape == (2, 4, 14, 14) and torch.isfinite(latent["samples"]).all()
    assert masks.shape == (4, SIZE, SIZE) and maps.maps.shape == (2, 2, 7, 7) and maps.labels == ("dog", "cat")
    assert not torch.equal(masks[0:2], masks[2:4])  # image 0's masks differ from image 1's
    assert "step 0 image 1" in report and "fixing from step 1" in report


def test_non_finite_gradient_skips_the_update_and_says_so(pack, monkeypatch):
    run = pack.glue("loda_sampling")
    model, clip, _ = build_tiny_model("sd15", 0)
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
    model, clip, _ = build_tiny_model("sd15", 0)
    latent, _, _, report = all_in_one(pack, model, clip, steps=3, denoise=0.5, loda_steps=1)
    assert "stage 1 on steps 0..0 of 3" in report and torch.isfinite(latent["samples"]).all()


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_tova_model_with_empty_words_separates_its_object_concepts(pack, tova_folder, arch):
    model, clip, _ = build_tiny_model(arch, 0)
    adapters = pack.glue("adapters")
    chain = None
    for word, seed in (("dog", 1), ("cat", 2), ("sofa", 3)):
        write_tiny_adapter(tova_folder / f"{word}.safetensors", model, word, seed=seed,
                           role="background" if word == "sofa" else "object")
        chain = adapters.LoadToVAAdapter.execute(f"{word}.safetensors", "", 1.0, "from file", -1, chain).result[0]
    text = "a dog and a cat on a sofa"
    with torch.inference_mode():
        patched, positive, _ = adapters.ApplyToVA.execute(model, chain, clip, text, True).result
    latent, _, maps, report = all_in_one(pack, patched, clip, positive=positive, words="", steps=3, loda_steps=1)
    assert "dog (token 2), cat (token 5)" in report and "sofa" not in report and maps.labels == ("dog", "cat")
    assert torch.isfinite(latent["samples"]).all()


@pytest.mark.parametrize("overrides, message", [
    (dict(words="dog"), r"at least 2 object concepts.*1 object concept"),
    (dict(words="dog, horse"), r'"horse".*is not in the prompt'),
    (dict(loda_steps=9), r"More LODA steps than sampling steps.*N = 9 with 4"),
    (dict(mask_percentile=1.0), r"mask_percentile is out of range"),
    (dict(size=96), r"Unsupported resolution.*6×6 maps"),
    (dict(words=""), r"at least 2 object concepts.*0 object concept"),
    (dict(plain_positive=True), r"carries no token record.*ConceptSplit Text Encode"),
])
def test_bad_inputs_raise_one_error_before_sampling(pack, overrides, message):
    import nodes

    model, clip, _ = build_tiny_model("sd15", 0)
    spy = Spy()
    if overrides.pop("plain_positive", False):
        with torch.inference_mode():
            overrides["positive"] = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    with pytest.raises(pack.error, match=message):
        all_in_one(pack, with_spy(pack, model, spy), clip, **overrides)
    assert spy.calls == 0  # no UNet call happened


def test_interrupt_in_stage_1_leaves_the_model_and_the_next_plain_run_untouched(pack):
    import comfy.model_management

    model, clip, _ = build_tiny_model("sd21", 0)
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
