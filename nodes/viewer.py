"""Attention viewer nodes: "Capture Attention" and "Attention Map Viewer" (ConceptSplit, ICCV 2025, method §3.1, §7).

See where each word attends during sampling, as heatmaps and as the paper's numbers (Table 1 entropy, LODA's KL).
Capture patches a model clone so any sampler records the words' cross-attention maps; the viewer renders them after
sampling, from the capture (matched to the sampler's LATENT) or from the LODA Sampler's maps.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..conceptsplit_core import attention_capture as capture_core
from ..conceptsplit_core import viewer_payload
from ..conceptsplit_core.concept_words import capture_words
from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.map_metrics import (
    check_report_maps,
    check_share_masks,
    format_mask_share_report,
    format_metrics_report,
)
from ..conceptsplit_core.map_render import ALPHA_DEFAULT, ALPHA_RANGE, COLORMAPS, render_attention_grid
from . import comfy_conditioning, comfy_sampling
from .families import model_family
from .input_checks import check_number_inputs
from .sockets import AttentionCaptureType as AttentionCaptureSocket
from .sockets import ConceptMaps as ConceptMapsSocket
from .widgets import number_input

DEFAULTS = capture_core.CAPTURE_DEFAULTS
RANGES = capture_core.UI_RANGES


class CaptureAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptSplitCaptureAttention",
            display_name="Capture Attention",
            category="ConceptSplit",
            description="Record the cross-attention maps of chosen words during any sampling run (running means over "
            "steps, layers and heads), for the Attention Map Viewer. ConceptSplit, Lim et al., ICCV 2025.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="SD1.5, SD2.1 or SDXL model, with or without ToVA. It is cloned; the "
                    "input is untouched and sampling gives the same image.",
                ),
                io.String.Input(
                    "words",
                    default="",
                    tooltip="Comma-separated words of the positive prompt to watch, e.g. 'dog, cat'. "
                    "Empty = the ToVA identifier words. A repeated word takes its next "
                    "occurrence.",
                ),
                io.Conditioning.Input(
                    "positive",
                    optional=True,
                    tooltip="The positive prompt from ConceptSplit Text Encode or Apply ToVA (they "
                    "record its tokens). Needed for words that are not ToVA identifiers.",
                ),
                io.Combo.Input(
                    "token_mode",
                    options=list(capture_core.TOKEN_MODES),
                    default=DEFAULTS.token_mode,
                    tooltip="first token: the token ToVA and LODA use (method §2.4). all tokens: sum the "
                    "attention of every BPE token of the word (for long or rare words).",
                ),
                number_input(
                    "first_step",
                    DEFAULTS.first_step,
                    RANGES["first_step"],
                    "First sampling step to average, 0-based, inclusive. 0 = from the start.",
                    integer=True,
                    step=False,
                ),
                number_input(
                    "last_step",
                    DEFAULTS.last_step,
                    RANGES["last_step"],
                    "Last sampling step to average, inclusive; -1 = the run's last step. Early steps show "
                    "the layout, late steps the details.",
                    integer=True,
                    step=False,
                ),
                io.Combo.Input(
                    "layers",
                    options=list(capture_core.LAYER_CHOICES),
                    default=DEFAULTS.layers,
                    tooltip="Which cross-attention layers to average. latent/4: LODA's level (16x16 at "
                    "SD1.5 512 px; method §3.1). all: every layer, upsampled to the finest grid. "
                    "latent/N: layers with grid latent/N. blocks: the blocks typed below.",
                ),
                io.String.Input(
                    "blocks",
                    default="",
                    optional=True,
                    tooltip="With layers = blocks: ComfyUI block names, e.g. 'input 7, middle, output "
                    "3'; add '.d' for depth d of an SDXL block ('output 0.3').",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="model", tooltip="The model clone that records attention. Sample with it."
                ),
                AttentionCaptureSocket.Output(
                    display_name="capture",
                    tooltip="The recorded maps. Connect to Attention Map Viewer, together with the sampler's LATENT.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        words: str,
        token_mode: str,
        first_step: int,
        last_step: int,
        layers: str,
        positive=None,
        blocks: str = "",
    ) -> io.NodeOutput:
        check_number_inputs(cls, {"first_step": first_step, "last_step": last_step})
        family = model_family(model)
        layout = family.layout(model)
        layer_keys = capture_core.select_layout_layers(layout, layers, blocks)
        prompt = None if positive is None else comfy_conditioning.conditioning_prompt_tokens(positive)
        found = capture_words(
            words, prompt, comfy_conditioning.located_concepts(model), family.default_word_token_ids, token_mode
        )
        if last_step != -1 and last_step < first_step:
            raise ConceptSplitError.build(
                "Capture Attention's step range is empty",
                seen=f"first_step {first_step}, last_step {last_step}",
                expected="last_step >= first_step, or -1 for the last step",
                fix="swap the two values",
            )
        request = capture_core.CaptureRequest(
            labels=found.labels,
            token_positions=found.positions,
            prompt_length=found.prompt_length,
            layer_keys=layer_keys,
            first_step=first_step,
            last_step=last_step,
            prompt_ids=found.prompt_ids,
            prompt_text=found.prompt_text,
        )
        capture = capture_core.AttentionCapture(request)
        patched = model.clone()
        comfy_sampling.install_attention_capture(
            patched, family, layout, capture, comfy_conditioning.conditioning_encodings(positive)
        )
        return io.NodeOutput(patched, capture)


class AttentionMapViewer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptSplitAttentionViewer",
            display_name="Attention Map Viewer",
            category="ConceptSplit",
            description="Show where each word attends: heatmaps over the image in a labeled grid, a mask per word, and "
            "the entropy, KL and overlap numbers of the paper's Table 1 and LODA. ConceptSplit, ICCV 2025.",
            inputs=[
                AttentionCaptureSocket.Input(
                    "capture",
                    optional=True,
                    tooltip="From Capture Attention. Also connect the sampler's LATENT (or "
                    "IMAGE), so the viewer runs after sampling and shows that run.",
                ),
                io.Latent.Input(
                    "samples",
                    optional=True,
                    tooltip="The LATENT output of the sampler that used Capture Attention's model: picks "
                    "the matching run and orders the viewer after sampling.",
                ),
                ConceptMapsSocket.Input(
                    "maps", optional=True, tooltip="Maps from the LODA Sampler (instead of a capture)."
                ),
                io.Image.Input(
                    "image",
                    optional=True,
                    tooltip="The decoded image(s), to draw the heatmaps over; same batch size as the maps. "
                    "Without it the heatmaps are shown alone.",
                ),
                number_input(
                    "alpha",
                    ALPHA_DEFAULT,
                    ALPHA_RANGE,
                    "Heatmap opacity over the image: 0 = image only, 1 = heatmap only.",
                ),
                io.Combo.Input(
                    "colormap",
                    options=list(COLORMAPS),
                    default=COLORMAPS[0],
                    tooltip="Perceptual colormap; dark = little attention, bright = most (per map).",
                ),
                io.Mask.Input(
                    "concept_masks",
                    optional=True,
                    tooltip="The LODA Sampler's concept_masks, with the same words in the same order as its "
                    "concepts: the metrics add each word's attention share inside its own mask "
                    "(what attention fixing raises). Capture Attention from step N shows stage 2.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="grid", tooltip="One labeled grid per image: a heatmap tile per word."),
                io.Mask.Output(
                    display_name="masks",
                    tooltip="One soft mask (0..1, min-max normalised) per image and "
                    "word, image-major: image 0's words, then image 1's.",
                ),
                io.String.Output(
                    display_name="metrics",
                    tooltip="The numbers shown in the node: entropy per word, "
                    "KL and overlap per pair, LODA's harmonic mean.",
                ),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls, alpha: float, colormap: str, capture=None, samples=None, maps=None, image=None, concept_masks=None
    ) -> io.NodeOutput:
        check_number_inputs(cls, {"alpha": alpha})
        record = _concept_maps(capture, samples, maps, image)
        labels = list(record.labels)
        _check_viewable(record, labels, image)  # every error before any rendering
        word_masks = _word_masks(concept_masks, record, labels)  # B x (K, H, W), or None
        grids, masks, reports = [], [], [capture_core.describe_coverage(record)]
        for b in range(record.maps.shape[0]):
            grid, mask = render_attention_grid(
                None if image is None else image[b], record.maps[b], labels, alpha, colormap
            )  # (H_grid, W_grid, 3), (K, H_img, W_img)
            grids.append(grid)
            masks.append(mask)
            header = f"Image {b + 1} of {record.maps.shape[0]}\n" if record.maps.shape[0] > 1 else ""
            report = format_metrics_report(labels, record.maps[b])
            if word_masks is not None:
                report += "\n\n" + format_mask_share_report(labels, record.maps[b], word_masks[b])
            reports.append(header + report)
        grid_batch = torch.stack(grids)  # (B, H_grid, W_grid, 3)
        report = "\n\n".join(reports)
        shown = {**ui.PreviewImage(grid_batch, cls=cls).as_dict(), **ui.PreviewText(report).as_dict()}
        shown[viewer_payload.VIEWER_KEY] = [
            viewer_payload.viewer_payload(record, _saved_images(image, cls), alpha, colormap)
        ]  # the interactive viewer (web/js), issue 15
        return io.NodeOutput(grid_batch, torch.cat(masks), report, ui=shown)  # masks (B·K, H_img, W_img)


def _saved_images(image, cls) -> list[dict] | None:
    """The decoded images saved as PNGs in ComfyUI's temp folder (its preview mechanism), for the interactive viewer.

    Shapes: image (B, H, W, 3) or None. Returns per image {filename, subfolder, type, width, height}, or None.
    """
    if image is None:
        return None
    saved = ui.PreviewImage(image, cls=cls).as_dict()["images"]
    return [{**dict(ref), "width": int(image.shape[2]), "height": int(image.shape[1])} for ref in saved]


def _concept_maps(capture, samples, maps, image):
    """The maps to show: the LODA Sampler's, or the capture's run that produced `samples` (latest run for IMAGE)."""
    if (capture is None) == (maps is None):
        raise ConceptSplitError.build(
            "Attention Map Viewer needs exactly one source of maps",
            seen="both capture and maps connected" if capture is not None else "neither capture nor maps connected",
            expected="capture (from Capture Attention) or maps (from the LODA Sampler)",
            fix="connect one of them",
        )
    if maps is not None:
        return maps
    if samples is None and image is None:
        raise ConceptSplitError.build(
            "Attention Map Viewer would not wait for sampling",
            seen="capture connected without a LATENT or IMAGE",
            expected="the sampler's LATENT (or the decoded IMAGE) connected too, so the viewer runs after it",
            fix="connect the sampler's LATENT output to the viewer's samples input",
        )
    return capture.maps_for(None if samples is None else samples["samples"])


def _check_viewable(record, labels: list[str], image) -> None:
    """Image batch and shape, and every image's maps, checked before the first tile is drawn."""
    batch = record.maps.shape[0]
    if image is not None and image.shape[0] != batch:
        raise ConceptSplitError.build(
            "The image and the attention maps have different batch sizes",
            seen=f"{image.shape[0]} image(s) and maps for {batch}",
            expected="one image per set of maps",
            fix="connect the images decoded from the same sampler run",
        )
    if image is not None and (image.dim() != 4 or image.shape[-1] != 3):
        raise ConceptSplitError.build(
            "The image input is not an RGB IMAGE batch",
            seen=f"shape {tuple(image.shape)}",
            expected="(B, H, W, 3)",
            fix="connect VAE Decode's IMAGE (drop an alpha channel first)",
        )
    if not bool((record.maps != 0).any()):
        raise ConceptSplitError.build(
            "The maps hold no attention at all (every value is 0)",
            seen=f"maps of shape {tuple(record.maps.shape)} for {', '.join(labels)}",
            expected="maps recorded during sampling; the LODA Sampler records maps only when stage 1 runs "
            "(loda_steps > 0) or attention fixing is on (boost or suppression non-zero)",
            fix="raise loda_steps or boost/suppression, or use Capture Attention on the model instead",
        )
    for b in range(batch):
        check_report_maps(labels, record.maps[b])


def _word_masks(concept_masks, record, labels: list[str]):
    """The LODA Sampler's MASK (B·K, H, W), image-major, split per image into (K, H, W); checked before rendering."""
    if concept_masks is None:
        return None
    batch, words = record.maps.shape[:2]
    if concept_masks.dim() != 3 or concept_masks.shape[0] != batch * words:
        raise ConceptSplitError.build(
            "The concept masks do not match the attention maps",
            seen=f"masks of shape {tuple(concept_masks.shape)} for {batch} image(s) × {words} word(s) "
            f"({', '.join(labels)})",
            expected=f"{batch * words} masks (B·K, H, W), image-major, as the LODA Sampler's concept_masks",
            fix="connect the concept_masks of the LODA run whose model the capture watched, and capture the same "
            "words in the same order as its concepts",
        )
    if not bool(concept_masks.any()):
        raise ConceptSplitError.build(
            "The concept masks are empty (every value is 0)",
            seen=f"masks of shape {tuple(concept_masks.shape)}",
            expected="the masks LODA built at step N; it builds them only when stage 1 runs (loda_steps > 0) or "
            "attention fixing is on (boost or suppression non-zero)",
            fix="raise loda_steps or boost/suppression on the LODA Sampler, or disconnect concept_masks",
        )
    per_image = [concept_masks[b * words : (b + 1) * words] for b in range(batch)]  # B x (K, H, W)
    for b, masks in enumerate(per_image):
        check_share_masks(record.maps[b], masks)
    return per_image
