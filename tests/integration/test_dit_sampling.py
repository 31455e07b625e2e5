"""LODA on DiT models with what users sample them with (issue 14): ComfyUI's samplers and schedulers, CFG 1 and
CFG > 1, batch > 1, denoise < 1, SamplerCustomAdvanced with the ConceptSplit LODA SAMPLER, and interrupts.

Same tiny models and family parametrization as test_dit_families.py (the families this ComfyUI has classes for).
"""

from __future__ import annotations

import copy

import pytest
import torch

from comfy_harness.tiny_dit_models import tiny_latent
from test_dit_families import SETTINGS, build, encode, families_to_test, loda_sample, negative_of, spec

IMAGE_GRID = (8, 8)  # a 16×16 latent, 2×2 patches


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", families_to_test())


def plain(model, positive, negative, steps=4, cfg=1.0, sampler="euler", scheduler="simple", batch=1, denoise=1.0):
    import nodes

    with torch.inference_mode():
        return nodes.common_ksampler(
            model, 0, steps, cfg, sampler, scheduler, positive, negative, tiny_latent(model, batch), denoise=denoise
        )[0]["samples"].clone()


class Interrupter:
    """An attention override installed before the pack's (which chains it): attends unchanged, and raises ComfyUI's
    interrupt at the first joint call that runs with gradients (inside a stage-1 update)."""

    def __init__(self):
        self.calls = 0

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        import comfy.model_management

        self.calls += 1
        if torch.is_grad_enabled():
            raise comfy.model_management.InterruptProcessingException()
        return func(q, k, v, heads, *args, **kwargs)


@pytest.mark.parametrize(
    "sampler, scheduler, cfg",
    [
        ("euler_ancestral", "simple", 1.0),  # fresh noise each step: LODA must keep the plain run's noise stream
        ("dpmpp_2m_sde", "beta", 1.0),
        ("res_multistep", "sgm_uniform", 2.5),  # Z-Image's usual sampler
        ("heun", "normal", 2.5),
    ],
)
def test_stage_1_and_fixing_run_with_the_sampler_and_scheduler_and_nothing_to_do_is_the_plain_run(
    pack, family, sampler, scheduler, cfg
):
    model, clip = build(family)
    positive, negative = encode(pack, clip), negative_of(clip)
    reference = plain(model, positive, negative, cfg=cfg, sampler=sampler, scheduler=scheduler)
    run = dict(cfg=cfg, sampler=sampler, scheduler=scheduler)
    nothing, *_ = loda_sample(pack, model, positive, negative, **run, loda_steps=0, boost=0.0, suppression=0.0)
    latent, masks, maps, report = loda_sample(pack, model, positive, negative, **run, loda_steps=1)
    assert torch.equal(nothing["samples"], reference)  # N = 0, p = m = 0: the plain run, bit for bit
    samples = latent["samples"]
    assert samples.shape == reference.shape and torch.isfinite(samples).all()
    assert report.count(": updated") >= 1 and "fixing from step 1" in report
    assert not torch.equal(samples, reference)  # stage 1 and fixing changed the result
    assert maps.maps.shape == (1, 2, *IMAGE_GRID) and masks.shape == (2, 128, 128)
    assert torch.equal(plain(model, positive, negative, cfg=cfg, sampler=sampler, scheduler=scheduler), reference)


def test_uni_pc_refuses_stage_1_clearly_and_runs_attention_fixing(pack, family):
    """UniPC sets its order from the number of sigmas it is given (0 on stage 1's one-step slices), so stage 1
    refuses it before sampling; attention fixing alone (loda_steps 0) runs it over the whole schedule."""
    model, clip = build(family)
    positive, negative = encode(pack, clip), negative_of(clip)
    with pytest.raises(pack.error, match="LODA stage 1 cannot run with the uni_pc samplers"):
        loda_sample(pack, model, positive, negative, sampler="uni_pc", loda_steps=1)
    latent, masks, _, report = loda_sample(pack, model, positive, negative, sampler="uni_pc", loda_steps=0)
    assert torch.isfinite(latent["samples"]).all() and "fixing from step 0" in report and masks.any()


def test_batch_images_get_their_own_masks_and_updates(pack, family):
    model, clip = build(family)
    positive, negative = encode(pack, clip), negative_of(clip)
    latent, masks, maps, report = loda_sample(pack, model, positive, negative, steps=4, batch=2, loda_steps=1)
    assert latent["samples"].shape[0] == 2 and torch.isfinite(latent["samples"]).all()
    assert maps.maps.shape == (2, 2, *IMAGE_GRID) and masks.shape == (4, 128, 128)
    assert not torch.equal(maps.maps[0], maps.maps[1])  # each image's own maps (its own noise)
    assert "step 0 image 0" in report and "step 0 image 1" in report
    # each image's masks come from its own maps: image 1's masks are those of its maps alone
    loda = pack.core("loda")
    config = pack.core("loda_config").LodaConfig()
    alone = loda.build_concept_masks(maps.maps[1:2], config)  # (1, K, 8, 8) from image 1's maps only
    assert torch.equal(
        masks.reshape(2, 2, 128, 128)[1:2, :, ::16, ::16].bool(), alone.bool()
    )  # nearest upsampling of the 8×8 token grid: every 16th pixel is the token's value


def test_denoise_below_one_runs_stage_1_on_the_steps_that_run(pack, family):
    model, clip = build(family)
    positive, negative = encode(pack, clip), negative_of(clip)
    latent, _, _, report = loda_sample(pack, model, positive, negative, denoise=0.5, loda_steps=1)
    assert "stage 1 on steps 0..0 of 4" in report and torch.isfinite(latent["samples"]).all()
    nothing, *_ = loda_sample(pack, model, positive, negative, denoise=0.5, loda_steps=0, boost=0.0, suppression=0.0)
    assert torch.equal(nothing["samples"], plain(model, positive, negative, steps=4, denoise=0.5))


def test_sampler_custom_advanced_with_the_loda_sampler_and_a_cfg_guider(pack, family):
    import comfy_extras.nodes_custom_sampler as custom

    model, clip = build(family)
    positive, negative = encode(pack, clip), negative_of(clip)
    nodes = pack.glue("loda_nodes")
    with torch.inference_mode():
        inner = _node(custom.KSamplerSelect, "get_sampler", "euler")
        sampler, result = nodes.LodaSamplerSelect.execute(inner, "cat, dog", **dict(SETTINGS, loda_steps=1)).result
        guider = _node(custom.CFGGuider, "get_guider", model, positive, negative, 2.0)
        sigmas = _node(custom.BasicScheduler, "get_sigmas", model, "simple", 4, 1.0)
        noise = _node(custom.RandomNoise, "get_noise", 0)
        out = _node(custom.SamplerCustomAdvanced, "sample", noise, guider, sampler, sigmas, tiny_latent(model))
        masks, maps, report = nodes.LodaResults.execute(out, result).result[:3]
    assert out["samples"].shape[0] == 1 and torch.isfinite(out["samples"]).all()
    assert maps.maps.shape == (1, 2, *IMAGE_GRID) and masks.shape == (2, 128, 128)
    assert report.count(": updated") == 1 and "fixing from step 1" in report


def _node(cls, legacy_function, *args):
    """A ComfyUI node's first output, on both node APIs (V3 `execute` classmethod; V1 instance method)."""
    if hasattr(cls, "execute") and not hasattr(cls, legacy_function):
        return cls.execute(*args).result[0]
    return getattr(cls(), legacy_function)(*args)[0]


def test_interrupt_in_stage_1_leaves_the_model_untouched(pack, family):
    import comfy.model_management

    model, clip = build(family)
    positive, negative = encode(pack, clip), negative_of(clip)
    before = plain(model, positive, negative)
    options = copy.deepcopy(model.model_options)
    flags = [p.requires_grad for p in model.model.diffusion_model.parameters()]
    interrupted = model.clone()
    spy = Interrupter()
    interrupted.model_options["transformer_options"]["optimized_attention_override"] = spy
    training = getattr(comfy.model_management, "in_training", None)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        loda_sample(pack, interrupted, positive, negative, loda_steps=2)
    assert spy.calls > 0 and model.model_options == options
    assert getattr(comfy.model_management, "in_training", None) == training  # the eager-kernel flag is restored
    norms = [m for m in model.model.diffusion_model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in norms)  # Flux's input clones are removed
    assert [p.requires_grad for p in model.model.diffusion_model.parameters()] == flags  # AutogradWeights undone
    assert torch.equal(plain(model, positive, negative), before)
    assert spec(family)["display"]  # the family the run was on
