"""Flux.2 (FLUX.2 klein) beyond the per-family tests of test_dit_families.py: the model's left pad of a short context,
the chat template's tokens, the text encoders the pack does not read, and the error on a ComfyUI without Flux.2.

Which tests run follows the ComfyUI under test (read from its source at collection time, like test_dit_families):
with comfy.supported_models.Flux2 (0.33.0) the Flux.2 tests, without it (0.3.64) the error naming Flux.2 and the
version it needs. Nothing is skipped either way.
"""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import pytest
import torch

from comfy_harness.tiny_dit_models import build_tiny_flux2, dit_families_in_source, tiny_latent
from comfy_harness.tolerance import EPS32

from test_dit_families import (  # helpers only (no test functions: they would be collected here again)
    IMAGE_TOKENS,
    PROMPT,
    encode,
    joint_reference,
    ksample,
    loda_sample,
    negative_of,
    softmax_bound,
    spied,
)

TEXT = 512  # model_base.Flux2.extra_conds pads every context to this many rows
# "<|im_start|>", "user", "\n", "a", " photo", " of", " a", " cat", " and", " a", " dog", "<|im_end|>", "\n",
# "<|im_start|>", "assistant", "\n", "<think>", "\n\n", "</think>", "\n\n": the unpadded templated prompt
SHORT = 20
ROWS = {"cat": 7, "dog": 10}  # positions in the tokenization
SHIFTED = {word: TEXT - SHORT + row for word, row in ROWS.items()}  # 499, 502: rows of the left-padded context


def _comfyui_has_flux2() -> bool:
    from comfy_harness.comfy_bootstrap import comfyui_path

    try:
        present = dit_families_in_source(comfyui_path())
    except RuntimeError:  # COMFYUI_PATH set but wrong: the comfyui fixture reports it
        present = None
    return present is None or "flux2" in present  # unset: collected, and the fixtures skip (fail on CI)


HAS_FLUX2 = _comfyui_has_flux2()


def _unsupported_model():
    """A MODEL no family describes (a ModelPatcher-like object around a config of no supported class)."""
    return SimpleNamespace(model=SimpleNamespace(model_config=SimpleNamespace()))


def test_flux2_is_registered_before_flux1_and_available_only_where_comfyui_has_it(pack):
    import comfy.supported_models

    families = pack.glue("families")
    names = [family.name for family in families.FAMILIES]
    flux2 = families.FAMILIES[names.index("flux2")]
    assert names.index("flux2") < names.index("flux")  # Flux2's config subclasses Flux's
    assert (flux2.display, flux2.comfy_class) == ("Flux.2", "Flux2")
    assert flux2.available() == hasattr(comfy.supported_models, "Flux2") == HAS_FLUX2
    assert (flux2 in families.available_families()) == HAS_FLUX2


def test_an_unsupported_model_error_names_flux2_as_supported_or_as_needing_comfyui_0_33(pack):
    families = pack.glue("families")
    with pytest.raises(pack.error) as caught:
        families.model_family(_unsupported_model())
    message = str(caught.value)
    supported, _, missing = message.partition("a newer ComfyUI")
    if HAS_FLUX2:  # listed among the supported families, never as missing
        assert "Flux.2" in message.split("models only")[0] and "Flux.2" not in missing.split("(the pack")[0]
    else:  # ComfyUI 0.3.64: Flux.2 named with the version to update to
        assert "Flux.2" not in message.split("models only")[0]
        assert missing, message
        assert "Flux.2" in supported.split("models only")[1]
        assert "update ComfyUI to 0.33.0 or newer for" in message and "0.33.0" in message


class TestFlux2:
    """Needs comfy.supported_models.Flux2 (collected only where the ComfyUI under test has it)."""

    __test__ = HAS_FLUX2

    def test_a_context_shorter_than_512_rows_is_read_where_the_model_left_pads_it(self, pack):
        """klein's tokenizer with min_length 1 gives the unpadded 20-token context; the model left-pads it to 512
        rows (extra_conds, before the DIFFUSION_MODEL wrapper): the words' rows are 512 − 20 + position, in the
        token record, in Capture Attention's maps and in LODA's bias."""
        with torch.inference_mode():
            model, clip = build_tiny_flux2()
        short = clip.clone()
        short.set_tokenizer_option("qwen3_4b_min_length", 1)
        positive, negative = encode(pack, short), negative_of(clip)
        assert positive[0][0].shape[1] == SHORT  # the conditioning itself is not padded
        prompt = positive[0][1]["conceptsplit_prompt"]
        tokens = pack.core("prompt_tokens")
        assert len(prompt.token_ids) == TEXT and prompt.token_ids[: TEXT - SHORT] == (None,) * (TEXT - SHORT)
        assert tokens.locate_words_in_pieces(prompt, ("cat", "dog")) == ((SHIFTED["cat"],), (SHIFTED["dog"],))

        spy_model, spy = spied(model)
        patched, capture = (
            pack.glue("viewer")
            .CaptureAttention.execute(
                spy_model, "cat, dog", "first token", 0, -1, "all", positive=positive
            )  # all blocks
            .result
        )
        latent = ksample(patched, positive, negative, steps=2)
        maps = capture.maps_for(latent).maps  # (1, 2, 8, 8)
        joint = [c for c in spy.calls if c["q"].shape[2] == TEXT + IMAGE_TOKENS]
        assert len(joint) == 2 * 3  # the model saw 512 text rows at every joint call (2 steps × 3 blocks)
        reference = sum(joint_reference(c, [SHIFTED["cat"], SHIFTED["dog"]]) for c in joint) / len(joint)
        unshifted = sum(joint_reference(c, [ROWS["cat"], ROWS["dog"]]) for c in joint) / len(joint)
        # float32 softmax bound per call, plus the float32 mean of 6 calls × 2 heads (≤ 12·eps32 on values ≤ 1)
        bound = max(softmax_bound(c) for c in joint) + 12 * EPS32
        assert torch.allclose(maps.double(), reference, rtol=0, atol=bound), float((maps - reference).abs().max())
        # the unshifted rows 7, 10 (zero-padding columns here) are read by no tolerance that accepts the right ones:
        # 10× the bound the right columns meet (measured: 0.0077, 69× the bound)
        assert (maps.double() - unshifted).abs().max() > 10 * bound

        spy_model, spy = spied(model)
        latent, masks, _, report = loda_sample(
            pack, spy_model, positive, negative, steps=3, cfg=2.0, loda_steps=1, boost=5.0, suppression=-1e8
        )
        assert f"row {SHIFTED['cat']} ('cat')" in report and f"row {SHIFTED['dog']} ('dog')" in report
        biased = [c for c in spy.calls if c["mask"] is not None]
        assert biased and all(c["q"].shape[2] == TEXT + IMAGE_TOKENS for c in biased)
        for call in biased:  # (B, 1, L, L): only image rows × the two shifted columns carry the bias
            columns = call["mask"][..., TEXT:, :].ne(0).any(-2).flatten(0, -2).any(0).nonzero().flatten().tolist()
            assert columns == [SHIFTED["cat"], SHIFTED["dog"]] and not call["mask"][..., :TEXT, :].any()
        assert masks.shape == (2, 128, 128)  # the decoded image's size: 8 latent px × 16 (Flux.2 VAE)

    def test_a_short_prompt_combined_with_a_full_one_is_read_in_its_own_chunk_at_its_padded_rows(self, pack):
        """ConditioningCombine(short prompt, 512-token prompt): both reach the model as 512 rows and run in one
        batch; Capture Attention reads the short prompt's chunk only, at rows 499 and 502 (each chunk's own length
        is the model's 512, not the conditioning's 20)."""
        import nodes

        with torch.inference_mode():
            model, clip = build_tiny_flux2()
        short = clip.clone()
        short.set_tokenizer_option("qwen3_4b_min_length", 1)
        ours, other = encode(pack, short), encode(pack, clip, "a red house on a green hill")
        with torch.inference_mode():
            combined = nodes.ConditioningCombine().combine(ours, other)[0]
        spy_model, spy = spied(model)
        values = []
        original = spy.__call__

        def recording(func, q, k, v, heads, *args, **kwargs):  # also keep v: the padded rows' values are equal
            values.append(v.detach().clone())
            return original(func, q, k, v, heads, *args, **kwargs)

        spy_model.model_options["transformer_options"]["optimized_attention_override"] = recording
        patched, capture = (
            pack.glue("viewer")
            .CaptureAttention.execute(spy_model, "cat, dog", "first token", 0, -1, "all", positive=ours)
            .result
        )
        latent = ksample(patched, combined, negative_of(clip), steps=2)
        maps = capture.maps_for(latent).maps  # (1, 2, 8, 8)
        joint = [(c, v) for c, v in zip(spy.calls, values) if c["q"].shape[2] == TEXT + IMAGE_TOKENS]
        assert len(joint) == 6 and all(c["q"].shape[0] == 2 for c, _ in joint)  # both prompts in one batch
        # the short prompt's row: its 492 zero-padding rows enter every double block with equal values (V has no
        # RoPE); the other prompt's 512 rows are its tokens and right padding, not all equal
        rows = set()
        for call, v in joint[:1]:
            for b in range(2):
                pad = v[b, :, : TEXT - SHORT]  # (H, 492, D)
                if torch.equal(pad, pad[:, :1].expand_as(pad)):
                    rows.add(b)
        assert len(rows) == 1
        (row,) = rows
        columns = [SHIFTED["cat"], SHIFTED["dog"]]
        reference = sum(joint_reference(c, columns)[row : row + 1] for c, _ in joint) / len(joint)
        wrong = sum(joint_reference(c, columns)[1 - row : 2 - row] for c, _ in joint) / len(joint)
        bound = max(softmax_bound(c) for c, _ in joint) + 12 * EPS32  # as in the test above
        assert torch.allclose(maps.double(), reference, rtol=0, atol=bound), float((maps - reference).abs().max())
        assert (maps.double() - wrong).abs().max() > 10 * bound  # the other prompt's chunk is not read

    def test_template_tokens_never_match_a_concept_word(self, pack):
        with torch.inference_mode():
            _, clip = build_tiny_flux2()
        text, tokens = pack.glue("comfy_text"), pack.core("prompt_tokens")
        prompt = text.prompt_tokens(clip, "a user and an assistant")
        # "<|im_start|>", "user", "\n" | "a", " user", " and", " an", " assistant" | "<|im_end|>", "\n", ...
        assert tokens.locate_words_in_pieces(prompt, ("user", "assistant")) == ((4,), (7,))
        assert [i for i, piece in enumerate(prompt.pieces) if piece] == [3, 4, 5, 6, 7]
        other = text.prompt_tokens(clip, "a photo of a cat")
        for word in ("user", "assistant", "think"):
            with pytest.raises(pack.error, match=rf'Word "{word}" is not in the prompt.*7:\'cat\''):
                tokens.locate_words_in_pieces(other, (word,))
        # a prompt starting with a newline: the template's "\n" and it merge into one token, still template
        leading = text.prompt_tokens(clip, "\ncat and dog")
        assert tokens.locate_words_in_pieces(leading, ("cat", "dog")) == ((3,), (5,))

    def test_klein_9b_tokenizer_gives_the_same_rows(self, pack):
        import comfy.text_encoders.flux

        tokenizer = comfy.text_encoders.flux.KleinTokenizer8B()
        clip = SimpleNamespace(
            tokenizer=tokenizer,
            tokenize=lambda text, return_word_ids=False: tokenizer.tokenize_with_weights(text, return_word_ids),
        )
        prompt = pack.glue("comfy_text").prompt_tokens(clip, PROMPT)
        assert len(prompt.token_ids) == TEXT
        assert pack.core("prompt_tokens").locate_words_in_pieces(prompt, ("cat", "dog")) == ((7,), (10,))

    def test_flux2_dev_mistral_text_encoder_is_refused_naming_klein(self, pack):
        """FLUX.2 dev's Mistral tokenizer (built here from a tiny tekken vocabulary: the real one comes with the
        checkpoint) is recognised as Flux.2's and refused before anything is encoded."""
        import comfy.text_encoders.flux

        specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
        tekken = {
            "config": {"default_num_special_tokens": 16, "default_vocab_size": 16 + 256},
            "vocab": [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode()} for i in range(256)],
            "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(specials)],
        }
        tokenizer = comfy.text_encoders.flux.Flux2Tokenizer(tokenizer_data={"tekken_model": json.dumps(tekken)})
        encoded = []
        clip = SimpleNamespace(
            tokenizer=tokenizer,
            tokenize=lambda text, return_word_ids=False: tokenizer.tokenize_with_weights(text, return_word_ids),
            encode_from_tokens_scheduled=lambda tokens: encoded.append(tokens),
        )
        assert pack.glue("families").clip_family(clip).name == "flux2"
        with pytest.raises(pack.error, match="FLUX.2 klein's Qwen3 text encoder only.*Mistral"):
            pack.glue("prompt").ConceptSplitTextEncode.execute(clip, PROMPT)
        assert encoded == []

    def test_default_map_blocks_are_the_double_blocks_and_the_map_is_the_latent_grid(self, pack):
        with torch.inference_mode():
            model, _ = build_tiny_flux2()
        family = pack.family(model)
        layout = family.layout(model)
        latent = tiny_latent(model, pixels=1024)["samples"]  # (1, 128, 64, 64)
        hw = tuple(latent.shape[-2:])
        assert latent.shape[1] == 128 and hw == (64, 64)
        assert family.default_map_layers(layout, hw) == {("double", 0, 0), ("double", 1, 0)}
        assert {family.map_grid(layout, key, hw) for key in layout.keys} == {(64, 64)}  # patch 1
        assert layout.text_width == 96 and {site.level for site in layout.layers} == {0}  # 2^0 = patch 1
