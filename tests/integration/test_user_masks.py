"""Masks the user draws (issue 13), through the real ComfyUI in process: the LODA sampler's optional concept_masks
(a MASK batch, one per concept or per image and concept) with mask_mode replace / constrain. The masks used come out
as the MASK output, equal to the drawn masks area-resized to the latent grid (reference: a block mean by reshape);
the fixing bias and the bound-LoRA residuals act exactly inside them; constrain gives the intersection with LODA's
masks; bad masks are refused before any model call. Also: bound LoRAs with batch 2 (each image its own masks), next
to a ControlNet and next to another pack's attn2 patch / attn2 replace (chained, both act).
"""

from __future__ import annotations

import math

import pytest
import torch
from pack_nodes import apply_bound, bind, encode
from test_bound_lora import PROMPT, SIZE, Spy, assert_layer, loda_sample, spied, text_token_rows, tiny
from test_loda import attn2_blocks, sample_custom

from comfy_harness.tiny_loras import write_tiny_lora

LATENT = SIZE // 8  # 14: the latent grid the drawn masks are resized to
POSITIONS = (2, 5)  # dog, cat in PROMPT


def drawn_masks(side=SIZE):
    """(2, side, side) float: dog = the left 52/112 of the image (its edge covers exactly half of latent column 6),
    cat = a disk on the right overlapping dog's region a little."""
    masks = torch.zeros(2, side, side)
    masks[0, :, : side * 52 // SIZE] = 1.0
    yy, xx = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    masks[1] = (((yy - 0.5 * side) ** 2 + (xx - 0.62 * side) ** 2) <= (0.3 * side) ** 2).float()
    return masks


def by_blocks(masks):
    """Reference resize, by another route than the pack's F.interpolate(area): a latent pixel is inside when the mean
    over its block of mask pixels is ≥ 1/2. masks (M, H, W) with H, W multiples of LATENT -> (M, 14, 14) bool."""
    m, height, width = masks.shape
    block = masks.double().reshape(m, LATENT, height // LATENT, LATENT, width // LATENT)
    return block.mean(dim=(2, 4)) >= 0.5


def to_image(latent_masks):
    """(M, 14, 14) bool -> (M, SIZE, SIZE) float, each latent pixel repeated 8×8 (the MASK output's layout)."""
    return latent_masks.float().repeat_interleave(8, -2).repeat_interleave(8, -1)


class CountingCalls:
    """DIFFUSION_MODEL wrapper counting model calls: refusals must come before the first one."""

    def __init__(self):
        self.calls = 0

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        self.calls += 1
        return executor(*args, **kwargs)


def counted(model, counter):
    import comfy.patcher_extension

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_count", counter)
    return clone


@pytest.mark.parametrize("side", [56, SIZE, 224])
def test_replace_outputs_the_drawn_masks_resized_to_the_latent_grid(pack, side):
    model, clip = tiny("sd15")
    positive = encode(pack, clip, PROMPT)
    drawn = drawn_masks(side)
    latent, masks, maps, report = loda_sample(pack, model, clip, positive, concept_masks=drawn, mask_mode="replace")
    expected = to_image(by_blocks(drawn))
    assert masks.shape == (2, SIZE, SIZE) and torch.equal(masks, expected)
    row = by_blocks(drawn)[0, 0]  # the half-covered latent column 6 is in (the ≥ 1/2 rule), 7 and on are out
    assert row[:7].all() and not row[7:].any()
    assert "the drawn masks (mask_mode replace)" in report and "14×14" in report
    assert maps.masks.shape == maps.maps.shape  # the viewer's copy: at the map grid, as those layers see them
    assert torch.equal(maps.masks[0], by_blocks(drawn)[:, ::2, ::2])
    again = loda_sample(pack, model, clip, positive, concept_masks=drawn, mask_mode="replace")
    assert torch.equal(again[0]["samples"], latent["samples"]) and torch.equal(again[1], masks)


def test_the_fixing_bias_acts_exactly_inside_the_drawn_masks(pack, monkeypatch):
    """boost 5, suppression −3 (exact in float32): at every biased layer, column s_k holds 5·M_k − 3·Σ_{j≠k} M_j
    with M the drawn masks at the latent grid sampled to the layer's grid, and every other column 0."""
    loda_core = pack.core("loda")
    original = loda_core.FixingBias.attention_bias
    recorded = []

    def recording(self, call, q, k):
        bias = original(self, call, q, k)
        if self.active and bias is not None:
            recorded.append((call, bias.detach().clone()))
        return bias

    monkeypatch.setattr(loda_core.FixingBias, "attention_bias", recording)
    model, clip = tiny("sd15")
    drawn = drawn_masks()
    loda_sample(pack, model, clip, encode(pack, clip, PROMPT), concept_masks=drawn, boost=5.0, suppression=-3.0)
    reference = by_blocks(drawn).float()  # (K, 14, 14)
    grids = set()
    for call, bias in recorded:
        step = LATENT // call.grid[0]  # nearest resize by an integer factor: every step-th pixel from the first
        at_layer = reference[:, ::step, ::step].flatten(1)  # (K, N)
        expected = torch.zeros(at_layer.shape[1], call.context_length)
        for k, position in enumerate(POSITIONS):
            others = at_layer.sum(0) - at_layer[k]
            expected[:, position] = 5.0 * at_layer[k] - 3.0 * others
        assert call.context_length == 77
        per = call.rows_per_chunk
        for index, branch in enumerate(call.cond_or_uncond):
            chunk = bias[index * per : (index + 1) * per]
            assert torch.equal(chunk, expected.expand_as(chunk)), (call.key, branch)
        grids.add(call.grid)
    assert grids == {(14, 14), (7, 7)}  # both levels of the tiny UNet were biased


def test_replace_with_the_runs_own_masks_is_bit_identical_and_unset_inputs_change_nothing(pack, loras_folder):
    """LODA's MASK output fed back as concept_masks (replace) gives the very same latent (with two bound LoRAs), and
    mask_mode without concept_masks is today's run: the new inputs' defaults are the old behaviour."""
    model, clip = tiny("sd15")
    write_tiny_lora(loras_folder / "dog.safetensors", model, seed=1)
    write_tiny_lora(loras_folder / "cat.safetensors", model, seed=2, kind="loha")
    positive = encode(pack, clip, PROMPT)
    patched, _ = apply_bound(
        pack, model, bind(pack, [("dog.safetensors", "dog", 1.0), ("cat.safetensors", "cat", 0.8)]), positive
    )
    found = loda_sample(pack, patched, clip, positive, batch=2)
    for mode in ("replace", "constrain"):
        unset = loda_sample(pack, patched, clip, positive, batch=2, mask_mode=mode, concept_masks=None)
        assert torch.equal(unset[0]["samples"], found[0]["samples"]) and torch.equal(unset[1], found[1])
    fed = loda_sample(pack, patched, clip, positive, batch=2, concept_masks=found[1], mask_mode="replace")
    assert torch.equal(fed[1], found[1])
    assert torch.equal(fed[0]["samples"], found[0]["samples"])
    # and a different drawn mask does change the image (the comparison above is not blind)
    other = loda_sample(pack, patched, clip, positive, batch=2, concept_masks=drawn_masks())
    assert not torch.equal(other[0]["samples"], found[0]["samples"])


def test_constrain_gives_the_intersection_of_loda_masks_and_the_drawn_ones(pack):
    model, clip = tiny("sd15")
    positive = encode(pack, clip, PROMPT)
    found = loda_sample(pack, model, clip, positive)[1]  # (2, SIZE, SIZE): LODA's masks at image size
    # a band of latent rows per concept through the middle of its found mask: overlaps it, neither holds the other
    drawn = torch.zeros(2, SIZE, SIZE)
    for k in range(2):
        rows = found[k].amax(-1).nonzero().flatten()
        middle = int(rows[len(rows) // 2]) // 8 * 8
        drawn[k, middle : middle + 16] = 1.0
    latent, masks, _, report = loda_sample(pack, model, clip, positive, concept_masks=drawn, mask_mode="constrain")
    expected = found * drawn  # image-size intersection, both on 8-px latent pixel boundaries
    assert torch.equal(masks, expected) and expected.flatten(1).any(1).all()
    assert (expected.flatten(1).sum(1) < found.flatten(1).sum(1)).all()  # it did constrain
    assert "inside the drawn masks (mask_mode constrain)" in report
    again = loda_sample(pack, model, clip, positive, concept_masks=drawn, mask_mode="constrain")
    assert torch.equal(again[0]["samples"], latent["samples"]) and torch.equal(again[1], masks)
    # drawn where LODA's mask never reaches (each found mask's complement): one clear error at step N
    away = 1.0 - found
    assert away.flatten(1).any(1).all()
    with pytest.raises(pack.error, match="wholly outside the mask drawn for it"):
        loda_sample(pack, model, clip, positive, concept_masks=away, mask_mode="constrain")


def run_bound_with_masks(pack, folder, batch, drawn, **overrides):
    """tiny sd15, a kohya LoRA on dog and a LoHa on cat, LODA with `drawn` (replace); returns what the spy saw."""
    model, clip = tiny("sd15")
    deltas = [
        write_tiny_lora(folder / "dog.safetensors", model, seed=10, kind="lora"),
        write_tiny_lora(folder / "cat.safetensors", model, seed=11, kind="loha"),
    ]
    positive = overrides.pop("positive", None) or encode(pack, clip, PROMPT)
    bound = bind(pack, [("dog.safetensors", "dog", 1.0), ("cat.safetensors", "cat", 0.7)])
    patched, _ = apply_bound(pack, overrides.pop("model", model), bound, positive)
    spy = Spy(pack, sorted(set(deltas[0]) | set(deltas[1])))
    result = loda_sample(pack, spied(pack, patched, spy), clip, positive, batch=batch, concept_masks=drawn, **overrides)
    return model, spy, deltas, result, patched


def check_residuals(model, spy, deltas, reference):
    """Every spied layer of every stage-2 call: each LoRA's residual exactly inside its own drawn region (minus the
    other's), the base output elsewhere. reference: (B, K, 14, 14) bool, the drawn masks at the latent grid."""
    unet = model.model.diffusion_model
    acted = 0
    assert spy.records, "no stage-2 model call was recorded"
    for call in spy.records:
        assert torch.equal(call["masks"].cpu(), reference)  # the masks published to the bound LoRAs
        own = reference & (reference.sum(1, keepdim=True) == 1)  # (B_img, K, 14, 14): overlap belongs to neither
        for path, (x, output, base) in call["layers"].items():
            batch = output.shape[0]
            if path.endswith(("attn2.to_k", "attn2.to_v")):
                regions = text_token_rows(call["branches"], batch, output.shape[1], POSITIONS)
            else:
                tokens = output.shape[-2] * output.shape[-1] if output.dim() == 4 else output.shape[1]
                step = 1 if tokens == LATENT * LATENT else 2
                at_layer = own[..., ::step, ::step].flatten(2)  # (B_img, K, N)
                regions = at_layer[torch.arange(batch) % own.shape[0]]  # rows of each CFG chunk are the images
            deltas_here = [d.get(path) for d in deltas]
            acted += assert_layer(unet.get_submodule(path), x, output, base, regions, deltas_here, (1.0, 0.7), path)
    assert acted > 0


@pytest.mark.parametrize("batch", [1, 2])
def test_bound_lora_residuals_act_exactly_inside_the_drawn_masks_per_image(pack, loras_folder, batch):
    """batch 1: two masks (one per concept); batch 2: four, image-major, image 1's mirrored, so image i's LoRA
    residual must land in image i's mask only."""
    drawn = drawn_masks()
    if batch == 2:
        drawn = torch.cat([drawn, drawn.flip(-1)])
    model, spy, deltas, result, _ = run_bound_with_masks(pack, loras_folder, batch, drawn)
    reference = by_blocks(drawn).unflatten(0, (batch, 2)) if batch == 2 else by_blocks(drawn)[None]
    assert torch.equal(result[1], to_image(reference.flatten(0, 1)))
    check_residuals(model, spy, deltas, reference)


def test_bound_loras_with_a_controlnet_both_act_and_the_residuals_stay_exact(pack, loras_folder):
    import nodes

    from comfy_harness.tiny_controlnet import build_tiny_controlnet
    from comfy_harness.tiny_models import build_tiny_model

    with torch.inference_mode():
        _, clip, vae = build_tiny_model("sd15", 0)
        control = build_tiny_controlnet("sd15")
        plain_positive = encode(pack, clip, PROMPT)
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        hint = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(5))
        positive, _ = nodes.ControlNetApplyAdvanced().apply_controlnet(
            plain_positive, negative, control, hint, 1.0, 0.0, 1.0, vae=vae
        )
    drawn = drawn_masks()
    model, spy, deltas, result, patched = run_bound_with_masks(pack, loras_folder, 1, drawn, positive=positive)
    check_residuals(model, spy, deltas, by_blocks(drawn)[None])
    loras_only = loda_sample(pack, patched, clip, plain_positive, concept_masks=drawn)[0]["samples"]
    control_only = loda_sample(pack, model, clip, positive, concept_masks=drawn)[0]["samples"]
    both = result[0]["samples"]
    assert not torch.equal(both, loras_only) and not torch.equal(both, control_only)
    assert all(not m._forward_hooks for m in control.control_model.modules())


class ScaleValues:
    """Another pack's attn2 patch (IPAdapter-style, before attention): scales the values, counted."""

    def __init__(self):
        self.calls = 0

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        self.calls += 1
        return n, context, value * 1.5


class ScaleAttention:
    """Another pack's attn2 replace (as IPAdapter installs one): attention of the projected q, k, v, scaled ×1.5
    (so its effect shows), counted."""

    def __init__(self):
        self.calls = 0

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention

        self.calls += 1
        return 1.5 * attention.optimized_attention(q, k, v, extra_options["n_heads"])


@pytest.mark.parametrize("kind", ["attn2 patch", "attn2 replace"])
def test_bound_loras_chain_after_another_packs_attention_patch_and_both_act(pack, loras_folder, kind):
    """The other pack's patch is set on the model before Apply Bound LoRAs: it stays (the same object), runs, and
    the LoRA residuals (hooks on to_q/to_k/to_v/to_out, which ComfyUI calls around an attn2 replace too) stay exact.
    A foreign attn2 replace cannot take LODA's bias, so that case runs with fixing off (masks still made)."""
    model, clip = tiny("sd15")
    foreign = ScaleValues() if kind == "attn2 patch" else ScaleAttention()
    other = model.clone()
    if kind == "attn2 patch":
        other.set_model_attn2_patch(foreign)
    else:
        for block in attn2_blocks(model):
            other.set_model_attn2_replace(foreign, block[0], block[1], 0)
    settings = {} if kind == "attn2 patch" else dict(boost=0.0, suppression=0.0)
    drawn = drawn_masks()
    _, spy, deltas, result, patched = run_bound_with_masks(pack, loras_folder, 1, drawn, model=other, **settings)
    options = patched.model_options["transformer_options"]
    if kind == "attn2 patch":
        assert any(p is foreign for p in options["patches"]["attn2_patch"])
    else:
        assert all(p is foreign for p in options["patches_replace"]["attn2"].values())
    assert foreign.calls > 0
    check_residuals(model, spy, deltas, by_blocks(drawn)[None])
    positive = encode(pack, clip, PROMPT)
    calls = foreign.calls
    patch_only = loda_sample(pack, other, clip, positive, concept_masks=drawn, **settings)[0]["samples"]
    assert foreign.calls > calls
    loras, _ = apply_bound(
        pack, model, bind(pack, [("dog.safetensors", "dog", 1.0), ("cat.safetensors", "cat", 0.7)]), positive
    )
    loras_only = loda_sample(pack, loras, clip, positive, concept_masks=drawn, **settings)[0]["samples"]
    both = result[0]["samples"]
    assert not torch.equal(both, patch_only) and not torch.equal(both, loras_only)


def _bad(case):
    masks = drawn_masks()
    if case == "one mask":
        return masks[:1], {}
    if case == "three masks":
        return torch.cat([masks, masks[:1]]), {}
    if case == "three masks, batch 2":
        return torch.cat([masks, masks[:1]]), {"batch": 2}
    if case == "aspect":
        return torch.ones(2, SIZE, 2 * SIZE), {}
    if case == "all zero":
        masks[1] = 0
        return masks, {}
    if case == "too small":
        masks[1] = 0
        masks[1, 10:13, 10:13] = 1.0  # 9 px: under half of an 8×8 latent pixel wherever it lies
        return masks, {}
    if case == "nan":
        masks[0, 3, 3] = math.nan
        return masks, {}
    if case == "above one":
        return masks * 255, {}
    if case == "not a mask batch":
        return masks[None], {}
    if case == "mode":
        return masks, {"mask_mode": "guide"}
    raise AssertionError(case)


BAD = [
    ("one mask", r"number of concept masks.*1 mask\(s\) for 2 concepts \(dog, cat\).*2 masks, one per concept"),
    ("three masks", r"3 mask\(s\) for 2 concepts"),
    ("three masks, batch 2", r"3 mask\(s\) for 2 concepts \(dog, cat\) and 2 image\(s\).*or 4 \(image-major"),
    ("aspect", r"aspect ratio.*masks of 112×224 px.*latent of 14×14.*e\.g\. 112×112 px"),
    ("all zero", r"empty: its concept would act nowhere.*mask 2 of 2 is all zero"),
    ("too small", r'mask of "cat" is too small.*covering no latent pixel by half'),
    ("nan", r"not numbers.*NaN or Inf in mask 1 of 2"),
    ("above one", r"outside 0\.\.1.*values from 0 to 255"),
    ("not a mask batch", r"not a MASK batch.*\(1, 2, 112, 112\)"),
    ("mode", r"Unknown mask_mode.*'guide'.*replace, constrain"),
]


@pytest.mark.parametrize("case,message", BAD, ids=[case for case, _ in BAD])
def test_bad_masks_are_refused_before_any_model_call(pack, case, message):
    model, clip = tiny("sd15")
    counter = CountingCalls()
    masks, extra = _bad(case)
    with pytest.raises(pack.error, match=message) as raised:
        loda_sample(pack, counted(model, counter), clip, encode(pack, clip, PROMPT), concept_masks=masks, **extra)
    assert counter.calls == 0
    text = str(raised.value)
    assert "Seen:" in text and "Expected:" in text and "Fix:" in text


def test_the_samplercustom_path_checks_the_masks_against_its_latent_before_any_model_call(pack):
    import comfy.samplers

    nodes_module = pack.glue("loda_nodes")
    from comfy_harness.loda_settings import LODA_NODE_SETTINGS

    model, clip = tiny("sd15")
    counter = CountingCalls()
    drawn = torch.cat([drawn_masks(), drawn_masks().flip(-1)])  # 4 masks: 2 images × 2 concepts
    sampler, result = nodes_module.LodaSamplerSelect.execute(
        comfy.samplers.sampler_object("euler"),
        "dog, cat",
        **dict(LODA_NODE_SETTINGS, loda_steps=1, concept_masks=drawn, mask_mode="replace"),
    ).result
    with pytest.raises(pack.error, match=r"4 mask\(s\) for 2 concepts \(dog, cat\) and 3 image\(s\)"):
        sample_custom(counted(model, counter), clip, sampler, encode(pack, clip, PROMPT), steps=3, batch=3)
    assert counter.calls == 0
    sample_custom(model, clip, sampler, encode(pack, clip, PROMPT), steps=3, batch=2)  # B·K masks: image-major
    assert torch.equal(result.masks, by_blocks(drawn).unflatten(0, (2, 2)))
    with pytest.raises(pack.error, match="mask 2 of 2 is all zero"):  # value errors already at the node
        nodes_module.LodaSamplerSelect.execute(
            comfy.samplers.sampler_object("euler"),
            "dog, cat",
            **dict(LODA_NODE_SETTINGS, loda_steps=1, concept_masks=drawn[:2] * torch.tensor([1.0, 0.0])[:, None, None]),
        )


def test_replace_with_loda_steps_0_acts_from_step_0_without_the_extra_mask_forward(pack, loras_folder):
    """With the masks drawn there is nothing to find: loda_steps 0 fixes and applies the bound LoRAs from step 0,
    every model call of the run carries the drawn masks, and the one extra forward LODA otherwise spends on finding
    masks at step 0 is not run (3 steps × 2 CFG halves in one batch = 3 calls). Two masks for two images: both
    images get them."""
    drawn = drawn_masks()
    model, clip = tiny("sd15")
    write_tiny_lora(loras_folder / "dog.safetensors", model, seed=1)
    positive = encode(pack, clip, PROMPT)
    patched, _ = apply_bound(pack, model, bind(pack, [("dog.safetensors", "dog", 1.0)]), positive)
    counter, spy = CountingCalls(), Spy(pack, ())
    latent, masks, _, report = loda_sample(
        pack, counted(spied(pack, patched, spy), counter), clip, positive, batch=2, loda_steps=0, concept_masks=drawn
    )
    assert counter.calls == 3 and len(spy.records) == 3  # every call saw the masks (the spy skips mask-less ones)
    # K masks for 2 images: both images get them (MASK output image-major)
    assert "fixing from step 0" in report and torch.equal(masks, to_image(by_blocks(drawn)).repeat(2, 1, 1))
    assert torch.isfinite(latent["samples"]).all()
