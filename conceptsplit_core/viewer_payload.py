"""What the interactive Attention Map Viewer in the frontend receives (issue 15): one JSON-safe dict per node run.

The dict travels in the node's UI output (key VIEWER_KEY, a one-item list) over ComfyUI's own websocket and history;
the frontend extension (web/js/attention_viewer.js) validates it and draws from it. Maps are raw fp32 bytes in
base64 (little-endian), so the browser works on exactly the numbers the node computed; the colormap LUTs are the
ones map_render uses, so the browser's pixels can be compared with the node's. Images are references to PNGs the node
saved in ComfyUI's temp folder ({filename, subfolder, type}, read through /view).

Layout (version 1):
    labels       K tracked words, concept order
    words        the prompt's words for the strip: [{"text", "word": index into labels or -1}]
    grid         [h, w] of the maps
    steps        S_rec recorded sampling steps (0-based); step_weights: (call, layer) maps averaged per step
    total_steps  S of the run (0 = unknown); stage1_steps / mask_step: LODA marks or None
    maps         per image: base64 fp32 (S_rec, K, h, w), row-major
    masks        per image: base64 uint8 (K, h, w) 0/1, or None
    images       per image: {"filename", "subfolder", "type", "width", "height"} or None (maps shown alone)
    luts         {colormap: base64 fp32 (256, 3)}; alpha, colormap: the node's widget values
"""

from __future__ import annotations

import base64
import re
from typing import Sequence

import torch

from .attention_record import ConceptMaps
from .map_render import COLORMAPS, colormap_lut

VIEWER_KEY = "conceptsplit_viewer"
PAYLOAD_VERSION = 1
_WORD = re.compile(r"[\w'-]+")


def encode_f32(values: torch.Tensor) -> str:
    """Base64 of the tensor's fp32 values, little-endian, row-major (JS: new Float32Array on the decoded bytes)."""
    return base64.b64encode(values.detach().float().cpu().contiguous().numpy().astype("<f4").tobytes()).decode()


def prompt_words(prompt: str, labels: Sequence[str]) -> list[dict]:
    """The prompt's words for the strip, each tracked word tied to its label by the capture's rule (labels in order,
    each takes the first free occurrence, any case). Labels not found (no prompt text) are appended."""
    words = [{"text": m.group(0), "word": -1} for m in _WORD.finditer(prompt)]
    for k, label in enumerate(labels):
        slot = next((w for w in words if w["word"] == -1 and w["text"].lower() == label.lower()), None)
        if slot is None:
            words.append({"text": label, "word": k})
        else:
            slot["word"] = k
    return words


def viewer_payload(record: ConceptMaps, images: Sequence[dict] | None, alpha: float, colormap: str) -> dict:
    """The frontend viewer's data for one node run (see the module docstring for the layout).

    Without per-step maps (LODA Sampler maps, or a capture from before issue 15) the whole record is one entry of
    the slider, at its steps' last step (LODA: the mask step).
    Shapes: record.maps (B, K, h, w), record.step_maps (B, S_rec, K, h, w) or None; images: B references or None.
    """
    B, K, h, w = record.maps.shape
    if record.step_maps is not None:
        per_step, steps, weights = record.step_maps, list(record.steps), list(record.step_weights)
    else:
        last = record.mask_step if record.mask_step is not None else (record.steps[-1] if record.steps else 0)
        per_step, steps, weights = record.maps[:, None], [int(last)], [1]  # (B, 1, K, h, w)
    return {
        "version": PAYLOAD_VERSION,
        "labels": list(record.labels),
        "words": prompt_words(record.prompt, record.labels),
        "grid": [h, w],
        "steps": [int(s) for s in steps],
        "step_weights": [int(n) for n in weights],
        "total_steps": int(record.total_steps),
        "stage1_steps": record.stage1_steps,
        "mask_step": record.mask_step,
        "maps": [encode_f32(per_step[b]) for b in range(B)],
        "masks": None
        if record.masks is None
        else [
            base64.b64encode(record.masks[b].to(torch.uint8).contiguous().numpy().tobytes()).decode() for b in range(B)
        ],
        "images": list(images) if images is not None else [None] * B,
        "luts": {name: encode_f32(colormap_lut(name)) for name in COLORMAPS},
        "alpha": float(alpha),
        "colormap": colormap,
    }
