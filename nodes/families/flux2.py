"""Flux.2 (FLUX.2 klein 4B / 9B and dev; ComfyUI's model_base.Flux2, ComfyUI 0.33.0 and newer): what the pack knows
about it beyond Flux.1, in one place.

- Model: the same class as Flux.1 (comfy.ldm.flux.model.Flux) with 4 RoPE axes, 128 latent channels and patch 1,
  so the map grid is the latent grid (a /16 latent: 64×64 maps at 1024 px, the size of Flux.1's 2×2-patched /8
  latent). Joint attention in every double and single block, text first: [text (512+ rows), image tokens, reference
  tokens]; q and k reach the override post-RoPE as (B, H, L, D), as for Flux.1 (FluxFamily's layout, geometry and
  block keys are reused).
- Maps: the default map blocks are the double blocks (klein 4B: 5 of 25; klein 9B and dev: 8), for Flux.1's reason:
  text keeps its own stream there, so a text column is still "the word", while a single block's text rows have been
  mixed with the image by every block before. They are also the cheapest stage-1 pass: it stops after the last
  double block, before all single blocks.
- Conditioning: the context only (no pooled vector). model_base.Flux2.extra_conds LEFT-pads a context shorter than
  512 rows with zeros before the model runs (so the DIFFUSION_MODEL wrapper and the override see the padded one):
  row j of an L-row conditioning is row 512 − L + j of the model's context. The text encoder's attention mask is
  not used: padded rows are keys of the joint softmax like any other.
- Tokens: klein's Qwen3 (4B or 8B) text encoder, prompt in the chat template
  "<|im_start|>user\\n{}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n", every template token kept
  and right-padded to 512 by the tokenizer: row = token position. Template tokens ("user", "assistant") never match
  a concept word. A tokenization shorter than 512 (a min_length tokenizer option) is left-padded like the model
  does, so positions are the model's rows. FLUX.2 dev's Mistral Small 3 text encoder is refused with an error
  naming klein's: its pieces are not read by the pack.
- Gradients: as Flux.1 (inference weights, ComfyUI's fused RoPE, in-place residual adds: FluxFamily.gradient_fixes).
"""

from __future__ import annotations

import comfy.supported_models

from ...conceptsplit_core.errors import ConceptSplitError
from ...conceptsplit_core.prompt_tokens import PromptTokens
from .flux import FluxFamily
from .qwenimage import bpe_prompt

# model_base.Flux2.extra_conds (ComfyUI 0.33.0 model_base.py:1089): contexts are left-padded to this many rows
TEXT_LENGTH = 512
IM_START, IM_END, USER = 151644, 151645, 872  # Qwen2/3 ids of "<|im_start|>", "<|im_end|>", "user"
KLEIN_TOKENIZERS = ("KleinTokenizer", "KleinTokenizer8B")  # klein 4B (qwen3_4b), klein 9B (qwen3_8b)
MISTRAL_TOKENIZER = "Flux2Tokenizer"  # FLUX.2 dev (mistral3_24b)


class Flux2Family(FluxFamily):
    name = "flux2"
    comfy_class = "Flux2"
    # Bound LoRAs: Flux.1's table, checked on Flux.2's modules (tests/integration/test_bound_lora_dit.py): the same
    # img_in / txt_in / double_blocks.N.{img,txt}_{attn.qkv,attn.proj,mlp.0,mlp.2} / single_blocks.N.linear1,2 /
    # final_layer.linear paths, the same rows (text = the 512-row padded context, image = the latent's tokens at
    # patch 1, reference tokens after them). Flux.2's shared modulation (double_stream_modulation_img/txt,
    # single_stream_modulation) and final adaLN match no pattern: global, left out.
    bound_lora_sites = FluxFamily.bound_lora_sites
    display = "Flux.2"

    def matches(self, model_patcher) -> bool:
        config = getattr(getattr(model_patcher, "model", None), "model_config", None)
        cls = getattr(comfy.supported_models, "Flux2", None)  # absent before ComfyUI 0.33
        return cls is not None and isinstance(config, cls)

    def matches_clip(self, clip) -> bool:
        """Flux.2's text encoders: klein's Qwen3, dev's Mistral Small 3 (refused in prompt_tokens)."""
        return _tokenizer_name(clip) in KLEIN_TOKENIZERS + (MISTRAL_TOKENIZER,)

    def prompt_tokens(self, clip, text: str) -> PromptTokens:
        """klein's Qwen3 tokens of `text` as the model's context rows hold them: every template token kept (row =
        position), template pieces blanked so they never match a word, left-padded to 512 rows as
        model_base.Flux2.extra_conds pads a shorter context.

        Raises: ConceptSplitError for FLUX.2 dev's Mistral text encoder.
        """
        if _tokenizer_name(clip) not in KLEIN_TOKENIZERS:
            raise ConceptSplitError.build(
                "ConceptSplit reads Flux.2 prompts from FLUX.2 klein's Qwen3 text encoder only; FLUX.2 dev's "
                "Mistral Small 3 text encoder is not supported",
                seen=f"a {_tokenizer_name(clip)} (Mistral) text encoder",
                expected="a FLUX.2 klein checkpoint's Qwen3 4B / 8B text encoder (KleinTokenizer)",
                fix="load FLUX.2 klein with its Qwen3 text encoder (CLIPLoader type flux2 with qwen_3_4b / "
                "qwen_3_8b), or use Flux.1 or Qwen-Image",
            )
        key = clip.tokenizer.clip_name  # "qwen3_4b" or "qwen3_8b"
        inner = getattr(clip.tokenizer, clip.tokenizer.clip)
        entries = [entry for chunk in clip.tokenize(text, return_word_ids=True)[key] for entry in chunk]
        ids = [entry[0] for entry in entries]
        tokens = bpe_prompt(inner.tokenizer, text, entries)
        start, end = prompt_span(ids)
        outside = [row < start or row >= end for row in range(len(ids))]  # template rows: never a word
        pieces = tuple("" if out else piece for piece, out in zip(tokens.pieces, outside))
        starts = tuple(False if out else flag for flag, out in zip(tokens.word_starts, outside))
        pad = max(0, TEXT_LENGTH - len(ids))  # the model's zero rows in front (extra_conds), no token
        return PromptTokens(
            text=text,
            token_ids=(None,) * pad + tokens.token_ids,
            word_starts=(False,) * pad + starts,
            window_length=pad + len(ids) or 1,
            pieces=("",) * pad + pieces,
        )


def prompt_span(ids) -> tuple[int, int]:
    """[start, end) of the user's text in klein's templated ids: after "<|im_start|>user" and the newline token that
    follows (it may hold the prompt's own leading newlines), up to the last "<|im_end|>"; (0, len) without a
    template (nothing blanked)."""
    first = next((i for i in range(len(ids) - 1) if ids[i] == IM_START and ids[i + 1] == USER), None)
    last = max((i for i, token in enumerate(ids) if token == IM_END), default=None)
    if first is None or last is None or last < first + 2:
        return 0, len(ids)
    return first + 3, last


def _tokenizer_name(clip) -> str:
    return type(getattr(clip, "tokenizer", None)).__name__


FLUX2 = Flux2Family()
