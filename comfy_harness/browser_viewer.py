"""Drive the interactive Attention Map Viewer (web/js/attention_viewer.js) in the real frontend, and compute what it
must draw from the server's own numbers (issue 15).

Builds on comfy_harness/browser.py (FrontendPage, frontend()). The page side reads the widget through its `data-cs`
attributes; the Python side decodes the node's UI output (conceptsplit_core/viewer_payload.py) and renders the
expected overlay with map_render, the functions the node's grid uses.
"""

from __future__ import annotations

import io
import json
import urllib.parse
import urllib.request

import numpy as np
import torch
from PIL import Image

from conceptsplit_core import viewer_payload
from comfy_harness import viewer_reference
from conceptsplit_core.map_render import apply_colormap, colormap_lut, maps_to_masks, overlay_heatmap

VIEWER_TYPE = "ConceptSplitAttentionViewer"
VIEWER_SELECTOR = "[data-cs=viewer]"
READY_MS = 120_000  # a tiny-model run on 2 shared CPU cores, plus the image load

# Put the node at the top left of the canvas at scale 1, so its DOM widget is on screen for hovering.
_FOCUS_NODE_JS = """(id) => {
    const node = window.app.graph.getNodeById(id);
    const ds = window.app.canvas.ds;
    ds.scale = 1;
    ds.offset[0] = 160 - node.pos[0];  // clear of the sidebar
    ds.offset[1] = 140 - node.pos[1];  // clear of the menu bar, with the title bar visible
    window.app.canvas.setDirty(true, true);
}"""
_QUEUE_JS = "async () => { await window.app.queuePrompt(0, 1); }"
_CANVAS_PIXELS_JS = """(id) => {
    const node = window.app.graph.getNodeById(id);
    const root = node.__conceptsplitViewer.root;
    const canvas = root.querySelector('[data-cs=overlay]');
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    return {width: canvas.width, height: canvas.height, rgba: Array.from(data),
            state: JSON.parse(root.dataset.state || 'null'),
            metrics: JSON.parse(root.querySelector('[data-cs=metrics]').dataset.values || 'null')};
}"""
_STATUS_JS = """(id) => {
    const node = window.app.graph.getNodeById(id);
    const root = node && node.__conceptsplitViewer && node.__conceptsplitViewer.root;
    if (!root) return null;
    const message = root.querySelector('[data-cs=message]');
    return {status: root.dataset.status || 'empty', message: message.style.display === 'none' ? '' :
            message.textContent};
}"""
_SHOW_JS = "([id, output]) => { window.app.graph.getNodeById(id).onExecuted(output); }"


class PageErrors:
    """Uncaught errors of a page from now on, with their stacks (the console line has only the message).

    `ours()`: those whose stack passes through the viewer's script. Frontend 1.27 throws one of its own while it
    starts (a settings onChange handler), with or without this pack, so phases that include a page load check only
    ours; the others check that no uncaught error happened at all.
    """

    SCRIPT = "attention_viewer.js"

    def __init__(self, page):
        self.stacks: list[str] = []
        page.page.on("pageerror", lambda error: self.stacks.append(error.stack or str(error)))

    def ours(self) -> list[str]:
        return [stack for stack in self.stacks if self.SCRIPT in stack]


def focus_node(page, node_id: int) -> None:
    page.page.evaluate(_FOCUS_NODE_JS, node_id)
    page.page.wait_for_timeout(300)  # the frontend positions DOM widgets on the next frames


def queue_in_browser(page) -> None:
    """Queue the loaded workflow from the page, as the Run button does (results come back over the websocket)."""
    page.page.evaluate(_QUEUE_JS)


def viewer_status(page, node_id: int) -> dict | None:
    return page.page.evaluate(_STATUS_JS, node_id)


def wait_for_status(page, node_id: int, status: str, timeout_ms: int = READY_MS) -> dict:
    page.page.wait_for_function(
        f"(id) => ({_STATUS_JS})(id)?.status === {json.dumps(status)}", arg=node_id, timeout=timeout_ms
    )
    return viewer_status(page, node_id)


def show_output(page, node_id: int, output: dict) -> None:
    """Hand the node a UI output as the frontend does for an "executed" message (for malformed-data tests)."""
    page.page.evaluate(_SHOW_JS, [node_id, output])


def canvas_pixels(page, node_id: int) -> tuple[np.ndarray, dict, dict]:
    """The overlay canvas as (H, W, 3) uint8, the widget's state and its metrics."""
    got = page.page.evaluate(_CANVAS_PIXELS_JS, node_id)
    rgba = np.asarray(got["rgba"], dtype=np.uint8).reshape(got["height"], got["width"], 4)
    return rgba[..., :3], got["state"], got["metrics"]


def latest_viewer_output(server_url: str, node_id: int) -> dict:
    """The newest history entry's UI output of the viewer node `node_id` (from ComfyUI's /history)."""
    with urllib.request.urlopen(server_url.rstrip("/") + "/history", timeout=30) as response:
        history = json.loads(response.read())
    entries = [
        e
        for e in history.values()
        if viewer_payload.VIEWER_KEY in e.get("outputs", {}).get(str(node_id), {})
        and e["prompt"][2].get(str(node_id), {}).get("class_type") == VIEWER_TYPE
    ]
    if not entries:
        raise AssertionError(f"no finished run in the history has viewer output for node {node_id}")
    return max(entries, key=lambda e: e["prompt"][0])["outputs"][str(node_id)]


def fetch_image(server_url: str, ref: dict) -> np.ndarray:
    """An image the server saved, through /view, as (H, W, 3) float32 in 0..1 (the 8-bit PNG the browser loads)."""
    query = urllib.parse.urlencode({k: ref.get(k, "") for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{server_url.rstrip('/')}/view?{query}", timeout=30) as response:
        image = Image.open(io.BytesIO(response.read())).convert("RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


def decoded_step_maps(payload: dict, b: int) -> torch.Tensor:
    """Image b's per-step maps from the payload. Shapes: -> (S_rec, K, h, w) fp32."""
    h, w = payload["grid"]
    return viewer_reference.decode_f32(payload["maps"][b], (len(payload["steps"]), len(payload["labels"]), h, w))


def expected_overlay(
    payload: dict, image: np.ndarray | None, b: int, word: int, first: int, last: int, alpha: float, colormap: str
) -> np.ndarray:
    """What the widget must draw, rendered by map_render from the server's maps: (H, W, 3) float64 in 0..255."""
    mean = viewer_reference.range_mean(decoded_step_maps(payload, b), payload["step_weights"], first, last)  # (K, h, w)
    if image is None:
        raise NotImplementedError("the browser test always connects the image")
    H, W = image.shape[:2]
    mask = maps_to_masks(mean[word : word + 1].float(), H, W)  # (1, H, W): min-max normalised, bilinear, clamped
    heat = apply_colormap(mask, colormap)[0]  # (H, W, 3)
    return overlay_heatmap(torch.from_numpy(image), heat, alpha).double().numpy() * 255.0


def pixel_tolerance(alpha: float, colormap: str) -> float:
    """Largest allowed |browser − expected| per channel, in 0..255 units, derived from what differs:

    - the browser writes 8-bit values rounded to nearest: 0.5;
    - it interpolates in float64, the node in float32: a map value within float32 rounding (~1e-7) of a LUT bin
      edge can land in the neighbouring bin, which moves the pixel by alpha × (largest step between adjacent LUT
      entries) × 255.
    """
    lut = colormap_lut(colormap).double()  # (256, 3)
    largest_step = float((lut[1:] - lut[:-1]).abs().max())
    return 0.5 + alpha * largest_step * 255.0 + 1e-6
