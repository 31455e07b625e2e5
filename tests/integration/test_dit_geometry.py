"""Where the text and image tokens sit in each DiT family's joint attention calls, at a grid and with prompts where
a family's padding shows, and which attention calls are joint at all.

Z-Image is the family these cases are about (docs/method.md §10.1): its text rows are padded with a learned token to
a multiple of 32 (the pad columns are keys the image attends to), its image tokens too (rows after them are neither
text nor image), cond and uncond of different lengths run with different geometries, and its context and noise
refiners send text-only and image-only attention through the same override. The same checks run on every other DiT
family present (no padding, every call joint), so each case is a test on every supported ComfyUI. The Z-Image model
here is the dim-256 one with the real model's z_image_modulation.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_dit_families import PROMPT, SETTINGS, SPECS, families_to_test, joint_text, softmax_bound, spied

from comfy_harness.tiny_dit_models import ZIMAGE_FULL_MODULATION, build_tiny_zimage
from comfy_harness.tolerance import EPS32

ODD = 18  # an 18×18 latent: a 9×9 grid, 81 image tokens (Z-Image pads them to 96)
LONG_NEGATIVE = " ".join(["blurry, low quality, watermark"] * 12)  # > 32 tokens: Z-Image pads it to 64


def _zimage_geometry(text: int, image: int) -> tuple[int, int]:
    return 32 * math.ceil(text / 32), (-image) % 32  # pad_tokens_multiple of every released Z-Image


# family -> (T text rows, N image tokens) -> (image_start, padding rows after the image tokens), written out here
# independently of the pack's geometry code
GEOMETRY = {
    "flux": lambda text, image: (text, 0),
    "qwenimage": lambda text, image: (text, 0),
    "zimage": _zimage_geometry,
}
# lengths of the attention calls of one forward that are not joint (sorted): Z-Image's context refiner (text only,
# 16 rows padded to 32) and noise refiner (image only, 64 tokens), one refiner layer each
NOT_JOINT = {"flux": [], "qwenimage": [], "zimage": [32, 64]}
BUILDS = {"zimage": lambda: build_tiny_zimage(**ZIMAGE_FULL_MODULATION)}


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", tuple(name for name in families_to_test() if name in GEOMETRY))


def build(family, full=False):
    with torch.inference_mode():
        return BUILDS[family]() if full and family in BUILDS else SPECS[family]["build"]()


def encode(pack, clip, text):
    with torch.inference_mode():
        return pack.glue("prompt").ConceptSplitTextEncode.execute(clip, text).result[0]


def latent(size: int) -> dict:
    return {"samples": torch.zeros(1, 16, size, size)}


def test_the_geometry_cases_run_on_every_dit_family_this_comfyui_has():
    assert {"flux", "qwenimage"} <= set(name for name in families_to_test() if name in GEOMETRY)
    assert set(families_to_test()) & {"zimage"} <= set(GEOMETRY)


def test_captured_maps_at_an_odd_grid_read_the_familys_image_rows_of_cond_and_uncond(pack, family):
    import nodes

    model, clip = build(family, full=True)
    positive, negative = encode(pack, clip, PROMPT), encode(pack, clip, LONG_NEGATIVE)
    text, text_negative = positive[0][0].shape[1], negative[0][0].shape[1]
    rows = SPECS[family]["rows"]
    image = (ODD // 2) ** 2
    spy_model, spy = spied(model)
    patched, capture = (
        pack.glue("viewer")
        .CaptureAttention.execute(spy_model, "cat, dog", "first token", 0, -1, "all", positive=positive)
        .result
    )
    with torch.inference_mode():
        samples = nodes.common_ksampler(patched, 0, 2, 2.0, "euler", "simple", positive, negative, latent(ODD))[0]
    maps = capture.maps_for(samples["samples"])
    assert maps.maps.shape == (1, 2, 9, 9)
    start, padding = GEOMETRY[family](text, image)
    start_negative, padding_negative = GEOMETRY[family](text_negative, image)
    lengths = {c["q"].shape[2] for c in spy.calls}
    assert start + image + padding in lengths and start_negative + image + padding_negative in lengths
    cond = [c for c in spy.calls if 0 in c["chunks"] and c["q"].shape[2] == start + image + padding]
    assert len(cond) == 2 * len(SPECS[family]["keys"])  # 2 steps × every joint block
    columns = [rows["cat"], rows["dog"]]

    def reference(keep_padding_keys: bool) -> torch.Tensor:
        """float64 softmax over every key (or without the padding keys), image rows × the words' columns."""
        total = 0
        for call in cond:
            row = call["chunks"].index(0)  # Flux runs cond and uncond in one batch (same text length)
            q, k = call["q"][row : row + 1].double(), call["k"][row : row + 1].double()  # (1, H, L, D)
            if not keep_padding_keys:
                keys = [*range(text), *range(start, start + image)]
                k = k[:, :, keys]
            probs = (q[:, :, start : start + image] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
            total = total + probs[..., columns].mean(1).transpose(1, 2).reshape(1, 2, 9, 9)
        return total / len(cond)

    expected = reference(True)
    # each call's probabilities are within the float32 softmax bound of float64; their mean keeps that bound, plus
    # the float32 sum of ≤ 6 calls × 2 heads (≤ 12·eps32 relative on values ≤ 1)
    bound = max(softmax_bound(c) for c in cond) + 12 * EPS32
    difference = float((maps.maps.double() - expected).abs().max())
    assert difference <= bound, f"max |diff| {difference:.3e} > {bound:.3e}"
    assert float(expected.sum()) < 0.99 * 2 * image  # the joint softmax: image keys take a share
    if start > text or padding:  # the padding keys are part of the model's softmax, and so of the pack's maps:
        # maps computed without them would be within `bound` of that softmax; these are not
        without = float((maps.maps.double() - reference(False)).abs().max())
        assert without > bound, f"maps without the padding keys: |diff| {without:.3e} ≤ {bound:.3e}"


def test_fixing_bias_at_an_odd_grid_is_on_image_rows_and_concept_columns_only(pack, family):
    model, clip = build(family)
    positive = encode(pack, clip, PROMPT)
    negative = encode(pack, clip, "")
    text = positive[0][0].shape[1]
    rows = SPECS[family]["rows"]
    image = (ODD // 2) ** 2
    start, padding = GEOMETRY[family](text, image)
    length = start + image + padding
    spy_model, spy = spied(model)
    with torch.inference_mode():
        pack.glue("loda_nodes").LodaSampler.execute(
            spy_model,
            0,
            3,
            1.0,
            "euler",
            "simple",
            positive,
            negative,
            latent(ODD),
            1.0,
            "cat, dog",
            **dict(SETTINGS, loda_steps=1, boost=5.0, suppression=-1e8),
        )
    biased = [c for c in spy.calls if not c["grad"] and c["mask"] is not None]
    assert biased and all(c["q"].shape[2] == length for c in biased)
    for call in biased:
        bias = call["mask"].double()[0, 0]  # (L, L)
        nonzero_rows = torch.nonzero(bias.abs().sum(1)).flatten()
        nonzero_columns = torch.nonzero(bias.abs().sum(0)).flatten()
        assert int(nonzero_rows.min()) >= start and int(nonzero_rows.max()) < start + image  # no padding row
        assert set(nonzero_columns.tolist()) <= {rows["cat"], rows["dog"]}  # no pad or image column
        assert float(bias[start : start + image, rows["cat"]].max()) == 5.0


class Recorder:
    """An observer that records every call the hook reports, and the probabilities' shape."""

    def __init__(self):
        self.calls, self.shapes = [], []

    def attention_bias(self, call, q, k):
        return None

    def needs_probabilities(self, call):
        return True

    def observe_probabilities(self, call, probs):
        self.shapes.append(tuple(probs.shape))

    def after_attention(self, call):
        self.calls.append(call)


def test_only_the_joint_calls_reach_the_observers(pack, family):
    model, clip = build(family)
    positive = encode(pack, clip, PROMPT)
    found = pack.glue("families").model_family(model)
    layout = found.layout(model)
    recorder = Recorder()
    spy_model, spy = spied(model)  # installed first: the pack chains it, so it sees every call
    options = found.install_observers(spy_model.model_options, layout, (recorder,))
    context, extras = positive[0]
    text = context.shape[1]
    with torch.inference_mode():
        x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
        SPECS[family]["forward"](model.model.diffusion_model, x, context, extras, dict(options["transformer_options"]))
    start, padding = GEOMETRY[family](text, 64)
    joint = [c for c in spy.calls if c["q"].shape[2] == start + 64 + padding]
    others = sorted(c["q"].shape[2] for c in spy.calls if c["q"].shape[2] != start + 64 + padding)
    assert others == NOT_JOINT[family] and len(joint) == len(recorder.calls)
    assert tuple(call.key for call in recorder.calls) == SPECS[family]["keys"]
    assert all(call.context_length == text and call.grid == (8, 8) for call in recorder.calls)
    assert set(recorder.shapes) == {(1, layout.layers[0].heads, 64, text)}  # (B, H, N, T): text columns only
    assert start == joint_text(family)
    last = layout.keys[-1]  # Capture Attention's `blocks` names a joint block as "<name> <index>"
    assert pack.core("attention_capture").select_layout_layers(layout, "blocks", f"{last[0]} {last[1]}") == {last}


def test_template_tokens_never_match_a_concept_word(pack, family):
    _, clip = build(family)
    text_module, tokens = pack.glue("comfy_text"), pack.core("prompt_tokens")
    prompt = text_module.prompt_tokens(clip, PROMPT)
    for word in ("user", "assistant", "im_start", "im_end"):  # Qwen chat-template tokens (Qwen-Image, Z-Image)
        with pytest.raises(pack.error, match=f'Word "{word}" is not in the prompt'):
            tokens.locate_words_in_pieces(prompt, (word,))
    asked = text_module.prompt_tokens(clip, "a user asks an assistant")
    (user,), (assistant,) = tokens.locate_words_in_pieces(asked, ("user", "assistant"))
    assert asked.pieces[user] == "user" and asked.pieces[assistant] == "assistant"
    words_before = [row for row in range(user) if asked.word_starts[row] and asked.pieces[row]]
    assert len(words_before) == 1  # the prompt's own "user": after "a" only, never a template token
    if family == "zimage":  # the template is kept in the context: 3 rows before the prompt, 5 after it
        assert (user, assistant) == (4, 7) and len(asked.token_ids) == 3 + 5 + 5


# Reference latents (ReferenceLatent node: Flux Kontext, Qwen-Image edit, Z-Image Omni): Flux.1 and Qwen-Image append
# their tokens after the image tokens (the geometry is unchanged); Z-Image puts reference captions and images before
# the prompt's, which the pack does not read yet, so it refuses them. With the dims of the family's latent format
# (Qwen-Image's is a video one: (B, C, T, h, w)).
REFERENCES = {"flux": ("read", 4), "qwenimage": ("read", 5), "zimage": ("refused", 4)}


def test_reference_latents_are_read_after_the_image_tokens_or_refused(pack, family):
    import node_helpers
    import nodes

    model, clip = build(family)
    positive = encode(pack, clip, PROMPT)
    handled, dims = REFERENCES[family]
    reference = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    reference = reference.unsqueeze(2) if dims == 5 else reference
    positive = node_helpers.conditioning_set_values(positive, {"reference_latents": [reference]}, append=True)
    text = positive[0][0].shape[1]
    rows = SPECS[family]["rows"]
    spy_model, spy = spied(model)
    patched, capture = (
        pack.glue("viewer")
        .CaptureAttention.execute(spy_model, "cat, dog", "first token", 0, -1, "all", positive=positive)
        .result
    )

    def run():
        with torch.inference_mode():
            return nodes.common_ksampler(patched, 0, 1, 1.0, "euler", "simple", positive, positive, latent(16))[0]

    if handled == "refused":
        with pytest.raises(pack.error, match="do not support Z-Image with reference images"):
            run()
        return
    samples = run()["samples"]
    joint = [c for c in spy.calls if c["q"].shape[2] == text + 64 + 64]  # text, image, the reference's 8×8 tokens
    assert len(joint) == len(SPECS[family]["keys"])
    expected = 0
    for call in joint:
        q, k = call["q"].double(), call["k"].double()
        probs = (q[:, :, text : text + 64] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        expected = expected + probs[..., [rows["cat"], rows["dog"]]].mean(1).transpose(1, 2).reshape(1, 2, 8, 8)
    expected = expected / len(joint)
    bound = max(softmax_bound(c) for c in joint) + 6 * EPS32  # ≤ 3 calls × 2 heads summed in float32
    difference = float((capture.maps_for(samples).maps.double() - expected).abs().max())
    assert difference <= bound, f"max |diff| {difference:.3e} > {bound:.3e}"
