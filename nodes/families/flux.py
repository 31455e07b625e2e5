"""Flux.1 (dev, schnell, fine-tunes; ComfyUI's model_base.Flux): everything the pack knows about it, in one place.

- Joint attention: every double block (separate text and image weights, one softmax) and every single block (one
  stream). In both the sequence is [text (T5 context), image tokens of the 2×2-patchified latent, Kontext reference
  tokens]; q and k reach the attention override post-RoPE as (B, H, L, D).
- Maps: the default map blocks are the double blocks (text keeps its own stream there, so a text column is still
  "the word"; in single blocks the text tokens have been mixed with the image for 19 blocks). The stage-1 gradient
  pass stops after the last double block: the 38 single blocks never run in it.
- Tokens: the context is T5-XXL's output padded to 256 (no start token; sentencepiece pieces, "a" = "▁" + "a").
- Gradients: inference weights (AutogradWeights), ComfyUI's fused RoPE has no backward (in_training selects the eager
  one where that flag exists), in-place residual adds (txt += ...) are made safe by cloning every norm's input.
"""

from __future__ import annotations

import contextlib

import torch

import comfy.model_management
import comfy.supported_models

from ...conceptsplit_core.config import PREDICTION_FLOW
from ...conceptsplit_core.model_layout import LayerKey, ModelLayout
from ...conceptsplit_core.prompt_tokens import PromptTokens
from .dit_attention import DitFamily, JointGeometry

T5_KEY = "t5xxl"


class FluxFamily(DitFamily):
    name = "flux"
    comfy_class = "Flux"
    display = "Flux.1"
    # Bound LoRAs: the image stream (img_in on the patchified latent, the double blocks' img_* layers, the final
    # projection) holds [latent tokens | Kontext reference tokens], the text stream (txt_in, txt_*) the T5 rows, the
    # single blocks' linear1/linear2 the joint [text | image | reference] sequence. Modulation (img_mod, txt_mod,
    # modulation, final adaLN), time/guidance/pooled-vector embeddings and the q/k norms have no positions: global.
    bound_lora_sites = (
        (r"img_in|final_layer\.linear", "image"),
        (r"double_blocks\.\d+\.img_(attn\.qkv|attn\.proj|mlp\.\d+)", "image"),
        (r"txt_in", "text"),
        (r"double_blocks\.\d+\.txt_(attn\.qkv|attn\.proj|mlp\.\d+)", "text"),
        (r"single_blocks\.\d+\.linear[12]", "joint"),
    )

    def matches(self, model_patcher) -> bool:
        config = getattr(getattr(model_patcher, "model", None), "model_config", None)
        flux2 = getattr(comfy.supported_models, "Flux2", None)
        return isinstance(config, comfy.supported_models.Flux) and not (flux2 and isinstance(config, flux2))

    def matches_clip(self, clip) -> bool:
        """Flux's CLIP (T5-XXL + CLIP-L; the context rows are T5's)."""
        tokenizer = getattr(clip, "tokenizer", None)
        return (
            hasattr(tokenizer, "t5xxl") and hasattr(tokenizer, "clip_l") and type(tokenizer).__name__ == "FluxTokenizer"
        )

    def layout(self, model_patcher) -> ModelLayout:
        dm = model_patcher.model.diffusion_model
        params = dm.params
        heads = int(params.num_heads)
        patch = int(getattr(dm, "patch_size", 2))
        keys = tuple(("double", i, 0) for i in range(len(dm.double_blocks))) + tuple(
            ("single", i, 0) for i in range(len(dm.single_blocks))
        )
        maps = tuple(key for key in keys if key[0] == "double")  # text keeps its own stream in the double blocks
        sites = self.sites(keys, maps, patch, heads, int(dm.txt_in.weight.shape[0]))
        return ModelLayout(
            family=self.name,
            display=self.display,
            prediction=PREDICTION_FLOW,
            text_width=int(params.context_in_dim),
            joint=True,
            layers=sites,
        )

    def geometry(self, layout: ModelLayout, x: torch.Tensor, context: torch.Tensor) -> JointGeometry:
        """x (B, C, h, w) the latent, context (B, T, d): text rows first, then the image tokens."""
        text = int(context.shape[1])
        return JointGeometry(text, text, self.patch_grid(layout, tuple(x.shape[-2:])))

    def block_key(self, layout: ModelLayout, transformer_options: dict, geometry: JointGeometry) -> LayerKey:
        """The block of this joint call: ComfyUI's block_type/block_index where it sets them (0.33+), else the call
        count of this forward (double blocks run first, then single blocks, one attention call each)."""
        index = geometry.calls
        geometry.calls += 1
        block_type = transformer_options.get("block_type")
        if block_type in ("double", "single") and "block_index" in transformer_options:
            return (block_type, int(transformer_options["block_index"]), 0)
        doubles = sum(1 for key in layout.keys if key[0] == "double")
        return ("double", index, 0) if index < doubles else ("single", index - doubles, 0)

    def prompt_tokens(self, clip, text: str) -> PromptTokens:
        """T5's tokens of `text` exactly as the context sees them: row = position (no start token), padded to 256."""
        inner = clip.tokenizer.t5xxl
        chunks = clip.tokenize(text, return_word_ids=True)[T5_KEY]
        return sentencepiece_prompt(inner, text, [entry for chunk in chunks for entry in chunk])

    @contextlib.contextmanager
    def gradient_fixes(self, model_patcher):
        """Gradient-safe forward: eager RoPE (in_training, where ComfyUI has it) and cloned norm inputs (Flux adds
        residuals in place into tensors a norm saved). Both undone on exit; forward values are unchanged."""
        with training_flag(), cloned_norm_inputs(model_patcher.model.diffusion_model):
            yield


def sentencepiece_prompt(inner, text: str, entries) -> PromptTokens:
    """PromptTokens of a sentencepiece (T5) tokenization: `entries` are (id, weight, word id) per context row."""
    ids, starts, pieces = [], [], []
    specials = {
        getattr(inner, "end_token", None),
        getattr(inner, "pad_token", None),
        getattr(inner, "start_token", None),
    }
    for entry in entries:
        token = entry[0]
        if not isinstance(token, int):  # an embedding slot
            ids.append(None)
            starts.append(False)
            pieces.append("")
            continue
        piece = "" if token in specials else str(inner.tokenizer.convert_ids_to_tokens(token))
        ids.append(token)
        starts.append(piece.startswith("▁") or (bool(piece) and (not pieces or not pieces[-1])))
        pieces.append(piece.replace("▁", ""))
    return PromptTokens(
        text=text, token_ids=tuple(ids), word_starts=tuple(starts), window_length=len(ids) or 1, pieces=tuple(pieces)
    )


@contextlib.contextmanager
def training_flag():
    """comfy.model_management.in_training = True inside (selects ComfyUI's eager, differentiable RoPE and norms);
    ComfyUI versions without the flag have only the eager kernels."""
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = previous


@contextlib.contextmanager
def cloned_norm_inputs(module: torch.nn.Module):
    """A forward pre-hook on every LayerNorm / RMSNorm of `module` that hands it a copy of its input, so an in-place
    residual add after it does not change a tensor autograd saved."""
    handles = []
    for sub in module.modules():
        if isinstance(sub, torch.nn.LayerNorm) or type(sub).__name__ in ("LayerNorm", "RMSNorm"):
            handles.append(sub.register_forward_pre_hook(lambda _m, args: (args[0].clone(), *args[1:])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


FLUX = FluxFamily()
