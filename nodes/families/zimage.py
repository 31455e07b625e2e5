"""Z-Image (Turbo, base and fine-tunes; ComfyUI's supported_models.ZImage, a Lumina2 NextDiT with a Qwen3-4B text
encoder, ComfyUI 0.33+): everything the pack knows about it, in one place.

- Structure: `context_refiner` blocks run on the text alone and `noise_refiner` blocks on the image alone (both
  call the same attention, with no block_type; the hook skips them: their sequences are shorter than a joint one),
  then every `layers` block runs ONE stream over [text, image] with shared weights (ComfyUI sets block_type "double"
  there; the pack calls them "layer i", their module name). q and k reach the attention override post-RoPE
  (B, H, L, D); the mask argument is positional and None in the joint layers.
- Geometry of a joint call (`zimage_geometry`): the T context rows, then the learned `cap_pad_token` up to a
  multiple of the model's `pad_tokens_multiple` (32 in every released model, read from the model, never assumed):
  image_start = that padded length, and the pad columns are keys the image queries attend to, so they stay in the
  joint softmax as the model computes it; then the h·w image tokens (2×2 patches, raster order), then `x_pad_token`
  rows up to a multiple too, which are neither text nor image rows. cond and uncond may differ in T (they run in
  separate forwards, each with its own geometry).
- Maps [choice]: the first third of the joint layers (10 of Z-Image's 30; at least one). In a single-stream layer
  the text tokens are mixed with the image from the first joint layer on, so (as for Flux.1, whose defaults are its
  19 double blocks before the 38 single ones, also the first third) the early layers are where a text column is
  still closest to "the word"; and the stage-1 gradient pass stops after the last map layer, so it runs the two
  refiners and a third of the joint layers instead of the whole model. The map is the image-token grid: latent/2,
  64×64 at 1024 px (4096 image tokens). Not yet compared with other choices on real Z-Image weights.
- Tokens: ComfyUI's Qwen3 tokenizer with the template "<|im_start|>user\\n{}<|im_end|>\\n<|im_start|>assistant\\n";
  every template token is kept and there is no padding, so context row = token position. The template's own tokens
  ("user", "assistant", the newlines) have empty pieces: a concept word never matches them.
- Gradients: inference weights (AutogradWeights) and the fused qk-RMSNorm + RoPE kernel (rms_rope, no backward):
  in_training selects the eager norms and RoPE. Residuals are not in place (x = x + ...), so nothing else.
- Refused: reference latents (Z-Image Omni / edit: the sequence then holds reference captions and images before the
  prompt and the image, a geometry the pack does not read yet), and the pixel-space variant (ZImagePixelSpace).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

import comfy.patcher_extension
import comfy.supported_models

from ...conceptsplit_core.config import PREDICTION_FLOW
from ...conceptsplit_core.errors import ConceptSplitError
from ...conceptsplit_core.model_layout import LayerKey, ModelLayout
from ...conceptsplit_core.prompt_tokens import PromptTokens
from .dit_attention import DitFamily, JointGeometry
from .flux import training_flag
from .qwenimage import IM_START, NEWLINE, USER, after_prompt, blank_rows, bpe_prompt

QWEN3_KEY = "qwen3_4b"
REFERENCES_WRAPPER_KEY = "conceptsplit_zimage_references"


@dataclass(frozen=True)
class ZImageLayout(ModelLayout):
    """A Z-Image ModelLayout plus the token padding of its joint sequence (the model's pad_tokens_multiple; 1 for
    a model that pads nothing)."""

    pad_tokens_multiple: int = 1


def padded_length(tokens: int, multiple: int) -> int:
    """`tokens` rounded up to a multiple of `multiple` (ComfyUI's pad_zimage)."""
    return tokens + (-tokens) % multiple


def zimage_geometry(text_tokens: int, grid: tuple[int, int], multiple: int) -> JointGeometry:
    """Where the tokens of one Z-Image forward sit in its joint calls: text rows 0 .. T − 1, cap_pad_token rows up to
    a multiple of `multiple` (keys the image attends to, not text columns), image rows from there, h·w of them."""
    return JointGeometry(text_tokens, padded_length(text_tokens, multiple), grid)


class ZImageFamily(DitFamily):
    name = "zimage"
    comfy_class = "ZImage"
    display = "Z-Image"
    # Bound LoRAs, by the module's place in the forward (each call's rows from the JointGeometry of zimage_geometry):
    # - "text": cap_embedder.1 on the T context rows, context_refiner blocks on [T text | cap_pad rows] (text-only
    #   calls): the concept's token rows, never a pad row;
    # - "image": x_embedder on the h·w image tokens, noise_refiner blocks on [image | x_pad rows] (image-only calls):
    #   the mask, never a pad row;
    # - "joint": the `layers` blocks (one set of weights for both parts) on [text | cap_pad | image | x_pad]: text
    #   rows 0..T−1 (or none, text_rows off) and the mask on the image rows from the padded text length;
    # - "joint_image": final_layer.linear, which runs on the whole joint sequence (unpatchify keeps the image rows):
    #   the mask on the image rows only.
    # adaLN modulations (t-only inputs), t_embedder, the norms and the pad tokens have no positions: global.
    bound_lora_sites = (
        (r"x_embedder|noise_refiner\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])", "image"),
        (r"cap_embedder\.1|context_refiner\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])", "text"),
        (r"layers\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])", "joint"),
        (r"final_layer\.linear", "joint_image"),
    )

    def matches(self, model_patcher) -> bool:
        """A Z-Image model: ComfyUI's ZImage config, not a plain Lumina2 (its base class), not the pixel-space one."""
        config = getattr(getattr(model_patcher, "model", None), "model_config", None)
        cls = getattr(comfy.supported_models, "ZImage", None)
        pixel = getattr(comfy.supported_models, "ZImagePixelSpace", None)
        return cls is not None and isinstance(config, cls) and not (pixel and isinstance(config, pixel))

    def matches_clip(self, clip) -> bool:
        """Z-Image's Qwen3-4B text encoder (its tokenizer adds the chat template)."""
        return type(getattr(clip, "tokenizer", None)).__name__ == "ZImageTokenizer"

    def layout(self, model_patcher) -> ZImageLayout:
        dm = model_patcher.model.diffusion_model
        heads = int(dm.layers[0].attention.n_local_heads)
        patch = int(dm.patch_size)
        keys = tuple(("layer", i, 0) for i in range(len(dm.layers)))
        maps = keys[: max(1, len(keys) // 3)]  # the first third (module docstring)
        sites = self.sites(keys, maps, patch, heads, int(dm.dim))
        return ZImageLayout(
            family=self.name,
            display=self.display,
            prediction=PREDICTION_FLOW,
            text_width=int(dm.cap_embedder[1].weight.shape[1]),  # Linear(cap_feat_dim -> dim)
            joint=True,
            layers=sites,
            pad_tokens_multiple=int(getattr(dm, "pad_tokens_multiple", None) or 1),
        )

    def geometry(self, layout: ModelLayout, x: torch.Tensor, context: torch.Tensor) -> JointGeometry:
        """x (B, C, h, w) the latent, context (B, T, d): text rows, caption padding, then the image tokens."""
        multiple = getattr(layout, "pad_tokens_multiple", 1)
        return zimage_geometry(int(context.shape[1]), self.patch_grid(layout, tuple(x.shape[-2:])), multiple)

    def block_key(self, layout: ModelLayout, transformer_options: dict, geometry: JointGeometry) -> LayerKey:
        """The joint layer of this call: ComfyUI's block_index (set for the joint layers), else the call count of
        this forward (refiner calls never get here: their sequences are shorter than a joint one)."""
        index = geometry.calls
        geometry.calls += 1
        if transformer_options.get("block_type") == "double" and "block_index" in transformer_options:
            return ("layer", int(transformer_options["block_index"]), 0)
        return ("layer", index, 0)

    def install_observers(self, model_options: dict, layout: ModelLayout, observers: tuple) -> dict:
        """The shared DiT hook, plus a DIFFUSION_MODEL wrapper that refuses reference latents (Omni / edit)."""
        options = super().install_observers(model_options, layout, observers)
        transformer_options = options["transformer_options"]
        wrappers = dict(transformer_options.get("wrappers", {}))
        call_type = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
        by_key = dict(wrappers.get(call_type, {}))
        if refuse_reference_latents not in by_key.get(REFERENCES_WRAPPER_KEY, []):
            by_key[REFERENCES_WRAPPER_KEY] = [*by_key.get(REFERENCES_WRAPPER_KEY, []), refuse_reference_latents]
        wrappers[call_type] = by_key
        transformer_options["wrappers"] = wrappers
        return options

    def prompt_tokens(self, clip, text: str) -> PromptTokens:
        """Qwen3 tokens of `text` exactly as the context rows hold them (template kept: row = position), the
        template's own tokens with empty pieces."""
        inner = clip.tokenizer.qwen3_4b
        entries = [entry for chunk in clip.tokenize(text, return_word_ids=True)[QWEN3_KEY] for entry in chunk]
        return blank_rows(bpe_prompt(inner.tokenizer, text, entries), template_rows([entry[0] for entry in entries]))

    @contextlib.contextmanager
    def gradient_fixes(self, model_patcher):
        """ComfyUI's eager, differentiable qk-RMSNorm and RoPE (in_training) instead of the fused rms_rope."""
        with training_flag():
            yield


def template_rows(ids) -> frozenset:
    """Rows of Z-Image's chat template around the prompt: "<|im_start|>", "user", "\\n" before it and, from the last
    "<|im_end|>" on, "<|im_end|>", "\\n", "<|im_start|>", "assistant", "\\n" after it; none for ids without it."""
    before = range(3) if tuple(ids[:3]) == (IM_START, USER, NEWLINE) else range(0)
    return frozenset(before) | frozenset(range(after_prompt(ids), len(ids)))


def refuse_reference_latents(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: raise for a forward with reference latents (Z-Image Omni / ReferenceLatent), whose
    joint sequence puts reference captions and images before the prompt's; else run the model unchanged."""
    if kwargs.get("ref_latents"):
        raise ConceptSplitError.build(
            "LODA and Capture Attention do not support Z-Image with reference images yet",
            seen=f"{len(kwargs['ref_latents'])} reference latent(s) in the conditioning (Z-Image Omni / edit)",
            expected="a text-to-image Z-Image conditioning",
            fix="remove the ReferenceLatent / reference image from the positive and negative conditioning",
        )
    return executor(*args, **kwargs)


Z_IMAGE = ZImageFamily()
