"""Seam: ComfyUI's CLIP tokenizers and text encoding (integration §3): the prompt's token positions exactly as the
model's context holds them, a word's BPE ids, and CONDITIONING with the pack's token record attached.
"""

from __future__ import annotations

import torch

import comfy.sd1_clip

from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.model_layout import ModelLayout
from ..conceptsplit_core.prompt_encoding import PromptEncoding
from ..conceptsplit_core.prompt_tokens import PromptTokens
from .comfy_conditioning import PROMPT_ENCODING_KEY, PROMPT_TOKENS_KEY


def _position_tokenizer(clip) -> tuple[str, object]:
    """The tokenizer whose positions ComfyUI's context uses: CLIP-L for SD1.5/SDXL, OpenCLIP-H for SD2 (method §2.4)."""
    tokenizer = clip.tokenizer
    for key in ("l", "h", "g"):
        inner = getattr(tokenizer, f"clip_{key}", None)
        if inner is not None:
            return key, inner
    raise ConceptSplitError.build(
        "This CLIP has no CLIP-L/H/G tokenizer",
        seen=type(tokenizer).__name__,
        expected="the text encoder of an SD1.5, SD2.x or SDXL checkpoint",
        fix="connect the CLIP output of the same checkpoint loader as the MODEL",
    )


def prompt_tokens(clip, text: str) -> PromptTokens:
    """Tokenize `text` exactly as CLIPTextEncode does and flatten its 77-token windows (method §2.4, integration §3);
    a text
    encoder of a family of its own (a DiT's T5 or Qwen) is read by that family (families.clip_family).

    Shapes: one slot per context row; position = window · 77 + index in window.
    """
    from .families import clip_family  # the families import this module

    family = clip_family(clip)
    if family is not None:
        return family.prompt_tokens(clip, text)
    key, inner = _position_tokenizer(clip)
    windows = clip.tokenize(text)[key]  # list of windows, each a list of (token, weight)
    ids: list[int | None] = []
    starts: list[bool] = []
    previous_ends_word = True
    for window in windows:
        for entry in window:
            token = entry[0]
            if isinstance(token, int):
                special = token in (inner.start_token, inner.end_token, inner.pad_token)
                ids.append(token)
                starts.append(previous_ends_word and not special)
                previous_ends_word = special or inner.inv_vocab.get(token, "").endswith("</w>")
            else:  # a textual-inversion embedding vector occupies one slot
                ids.append(None)
                starts.append(False)
                previous_ends_word = True
    return PromptTokens(
        text=text, token_ids=tuple(ids), word_starts=tuple(starts), window_length=len(windows[0]) if windows else 77
    )


def word_token_ids(clip, word: str) -> tuple[int, ...]:
    """BPE ids of the word alone, without start/end tokens (lowercased and split by CLIP's own tokenizer)."""
    _, inner = _position_tokenizer(clip)
    ids = inner.tokenizer(word)["input_ids"]
    return tuple(i for i in ids if i not in (inner.start_token, inner.end_token, inner.pad_token))


def encode_prompt(clip, text: str, layout: ModelLayout | None = None):
    """CONDITIONING for `text`, exactly as CLIPTextEncode makes it, with its PromptTokens and PromptEncoding attached.

    Checks the CLIP matches the model's text width when a layout is given.
    Shapes: [[cond (1, 77·windows, d), {"pooled_output": ..., PROMPT_TOKENS_KEY: PromptTokens,
              PROMPT_ENCODING_KEY: PromptEncoding (the cond itself, not a copy)}]].
    """
    tokens = prompt_tokens(clip, text)  # first: a text encoder the pack cannot read is refused before encoding
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    eps = _encoder_eps(clip)
    conditioning = [
        [
            cond,
            {
                **extras,
                PROMPT_TOKENS_KEY: tokens,
                PROMPT_ENCODING_KEY: PromptEncoding(tuple(tokens.token_ids), text, cond, eps),
            },
        ]
        for cond, extras in conditioning
    ]
    width = conditioning[0][0].shape[-1]
    if layout is not None and width != layout.text_width:
        raise ConceptSplitError.build(
            "The CLIP does not belong to this model",
            seen=f"text features of width {width}",
            expected=f"width {layout.text_width} for this model",
            fix="connect the CLIP output of the same checkpoint loader as the MODEL",
        )
    return conditioning


def _encoder_eps(clip) -> float:
    """eps of the dtype the text encoder computes in: the coarsest of its weights' dtypes, at least 16 bits
    (8-bit weights are cast up for the matmuls). 0 when ComfyUI's CLIP does not say (the tensors' dtypes decide)."""
    dtypes = getattr(getattr(clip, "cond_stage_model", None), "dtypes", None) or ()
    eps = [torch.finfo(dtype).eps for dtype in dtypes if isinstance(dtype, torch.dtype) and dtype.is_floating_point]
    return min(max(eps), torch.finfo(torch.bfloat16).eps) if eps else 0.0


_DEFAULT_TOKENIZER = []


def default_word_token_ids(word: str) -> tuple[int, ...]:
    """BPE ids of a word with ComfyUI's CLIP tokenizer (the same vocabulary for SD1.5 CLIP-L, SD2 OpenCLIP-H and
    SDXL CLIP-L/G), for nodes that get CONDITIONING but no CLIP."""
    if not _DEFAULT_TOKENIZER:
        _DEFAULT_TOKENIZER.append(comfy.sd1_clip.SDTokenizer())
    inner = _DEFAULT_TOKENIZER[0]
    ids = inner.tokenizer(word)["input_ids"]
    return tuple(i for i in ids if i not in (inner.start_token, inner.end_token, inner.pad_token))
