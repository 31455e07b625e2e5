"""Qwen-Image (ComfyUI's model_base.QwenImage, MMDiT with Qwen2.5-VL text): everything the pack knows about it.

- Joint attention: every transformer block ("double": separate text and image weights, one softmax over
  [text, image tokens of the 2×2-patchified latent, edit reference tokens]). ComfyUI 0.33 hands q, k to the override
  post-RoPE as (B, H, L, D); 0.3.64 as (B, L, H·D) (no skip_reshape): the seam reads either.
- Maps: every block by default (one stream type; the pass stops after the last map block, so choosing early blocks
  shortens it). The text attention mask (padding) is part of the joint softmax as the model applies it.
- Tokens: the Qwen2.5-VL chat template; the text encoder drops the system preamble and "<|im_start|>user\n", so
  context row = token position − template end (found from the ids, never a fixed offset). The template's tokens
  after the prompt ("<|im_end|>\n<|im_start|>assistant\n") stay in the context with empty pieces: a concept word
  never matches them.
- Gradients: inference weights (AutogradWeights) and ComfyUI's fused RoPE (in_training); residuals are not in place.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

import comfy.supported_models

from ...conceptsplit_core.config import PREDICTION_FLOW
from ...conceptsplit_core.model_layout import LayerKey, ModelLayout
from ...conceptsplit_core.prompt_tokens import PromptTokens
from .dit_attention import DitFamily, JointGeometry
from .flux import training_flag

QWEN_KEY = "qwen25_7b"
IM_START, USER, NEWLINE = 151644, 872, 198  # Qwen2 ids of "<|im_start|>", "user", "\n"
IM_END = 151645  # Qwen2 id of "<|im_end|>"
FIRST_SPECIAL = 151643  # Qwen2's special tokens (pad, im_start, im_end, vision ...) are ids from here on


class QwenImageFamily(DitFamily):
    name = "qwenimage"
    comfy_class = "QwenImage"
    display = "Qwen-Image"
    # Bound LoRAs: the image stream (img_in, attn.to_q/k/v/to_out, img_mlp, proj_out) holds [latent tokens | edit
    # reference tokens], the text stream (txt_in, attn.add_q/k/v_proj, to_add_out, txt_mlp) the prompt rows; there
    # is no joint-sequence layer. Modulation (img_mod, txt_mod, norm_out), the time embedding and norms: global.
    bound_lora_sites = (
        (r"img_in|proj_out", "image"),
        (r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)", "image"),
        (r"transformer_blocks\.\d+\.img_mlp\.net\.(0\.proj|2)", "image"),
        (r"txt_in", "text"),
        (r"transformer_blocks\.\d+\.attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)", "text"),
        (r"transformer_blocks\.\d+\.txt_mlp\.net\.(0\.proj|2)", "text"),
    )

    def matches(self, model_patcher) -> bool:
        config = getattr(getattr(model_patcher, "model", None), "model_config", None)
        cls = getattr(comfy.supported_models, "QwenImage", None)
        return cls is not None and isinstance(config, cls)

    def matches_clip(self, clip) -> bool:
        """Qwen-Image's Qwen2.5-VL text encoder."""
        return type(getattr(clip, "tokenizer", None)).__name__ == "QwenImageTokenizer"

    def layout(self, model_patcher) -> ModelLayout:
        dm = model_patcher.model.diffusion_model
        block = dm.transformer_blocks[0]
        heads = int(block.attn.heads)
        patch = int(getattr(dm, "patch_size", 2))
        keys = tuple(("double", i, 0) for i in range(len(dm.transformer_blocks)))
        sites = self.sites(keys, keys, patch, heads, int(dm.txt_in.weight.shape[0]))  # every block holds maps
        return ModelLayout(
            family=self.name,
            display=self.display,
            prediction=PREDICTION_FLOW,
            text_width=int(dm.txt_in.weight.shape[1]),
            joint=True,
            layers=sites,
        )

    def geometry(self, layout: ModelLayout, x: torch.Tensor, context: torch.Tensor) -> JointGeometry:
        """x (B, C, T, h, w) or (B, C, h, w), context (B, T_txt, d): text rows first, then the image tokens."""
        text = int(context.shape[1])
        return JointGeometry(text, text, self.patch_grid(layout, tuple(x.shape[-2:])))

    def block_key(self, layout: ModelLayout, transformer_options: dict, geometry: JointGeometry) -> LayerKey:
        index = geometry.calls
        geometry.calls += 1
        if transformer_options.get("block_type") == "double" and "block_index" in transformer_options:
            return ("double", int(transformer_options["block_index"]), 0)
        return ("double", index, 0)  # versions without block info: one joint call per block, in order

    def prompt_tokens(self, clip, text: str) -> PromptTokens:
        """Qwen2.5-VL tokens of `text` as the context rows see them: the template's preamble dropped."""
        inner = clip.tokenizer.qwen25_7b
        entries = [entry for chunk in clip.tokenize(text, return_word_ids=True)[QWEN_KEY] for entry in chunk]
        start = template_end([entry[0] for entry in entries])
        prompt = bpe_prompt(inner.tokenizer, text, entries[start:])
        ids = [entry[0] for entry in entries[start:]]
        return blank_rows(prompt, range(after_prompt(ids), len(ids)))  # "<|im_end|>\n<|im_start|>assistant\n"

    @contextlib.contextmanager
    def gradient_fixes(self, model_patcher):
        """ComfyUI's eager, differentiable RoPE (in_training, where ComfyUI has it)."""
        with training_flag():
            yield


def template_end(ids) -> int:
    """First context row of a Qwen-Image prompt: the text encoder keeps the tokens from the second "<|im_start|>"
    (the user turn), without "<|im_start|>user\\n" when those follow; 0 when the ids hold no chat template."""
    starts = [i for i, token in enumerate(ids) if token == IM_START][:2]
    if not starts:
        return 0
    end = starts[-1]
    if len(ids) > end + 3 and ids[end + 1] == USER and ids[end + 2] == NEWLINE:
        end += 3
    return end


def after_prompt(ids) -> int:
    """First row of the chat template after the prompt (its last "<|im_end|>"); len(ids) when there is none."""
    ends = [row for row, token in enumerate(ids) if token == IM_END]
    return ends[-1] if ends else len(ids)


def blank_rows(prompt: PromptTokens, rows) -> PromptTokens:
    """`prompt` with empty pieces and no word start on `rows` (chat-template tokens such as "user", "assistant"),
    so a concept word never matches them; the rows themselves stay (they are context rows)."""
    rows = frozenset(rows)
    return dataclasses.replace(
        prompt,
        pieces=tuple("" if row in rows else piece for row, piece in enumerate(prompt.pieces)),
        word_starts=tuple(start and row not in rows for row, start in enumerate(prompt.word_starts)),
    )


def bpe_prompt(tokenizer, text: str, entries) -> PromptTokens:
    """PromptTokens of a byte-level BPE (Qwen2) tokenization; `entries` are (id, weight, ...) per context row.
    Pieces are the decoded text of each id; a piece starting with whitespace, or after whitespace or punctuation,
    begins a word; special tokens have the empty piece."""
    ids, starts, pieces = [], [], []
    previous = ""
    for entry in entries:
        token = entry[0]
        if not isinstance(token, int) or token >= FIRST_SPECIAL:
            ids.append(token if isinstance(token, int) else None)
            starts.append(False)
            pieces.append("")
            previous = " "
            continue
        decoded = tokenizer.decode([token])
        ids.append(token)
        starts.append(not previous or decoded[:1].isspace() or previous[-1:].isspace() or not previous[-1:].isalnum())
        pieces.append(decoded.strip())
        previous = decoded
    return PromptTokens(
        text=text, token_ids=tuple(ids), word_starts=tuple(starts), window_length=len(ids) or 1, pieces=tuple(pieces)
    )


QWEN_IMAGE = QwenImageFamily()
