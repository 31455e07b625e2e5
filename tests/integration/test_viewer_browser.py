"""The interactive Attention Map Viewer (web/js/attention_viewer.js) in the real frontend, on a real run (issue 15).

Headless Debian chromium (comfy_harness/browser.py) opens a workflow of the tiny SD1.5 model, queues it from the page
(the server runs it; the result comes back over the websocket), hovers two words and moves the step slider. Each
time the widget's overlay canvas must equal, within a derived tolerance, the overlay map_render draws from the
maps in the node's UI output on the server's /history. Malformed or missing data must show a message in the widget
with no uncaught error in the page; a reload shows the last run again.

`CONCEPTSPLIT_DOCS_SCREENSHOT=1` also copies the screenshot into docs/images/attention_viewer.png (for the README).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptsplit_core import viewer_payload
from conceptsplit_core.map_metrics import entropy, overlap, pairwise_kl_matrix
from comfy_harness import viewer_reference
from comfy_harness.browser import browser_unavailable_reason, frontend
from comfy_harness.browser_viewer import (
    PageErrors,
    canvas_pixels,
    decoded_step_maps,
    expected_overlay,
    fetch_image,
    focus_node,
    latest_viewer_output,
    pixel_tolerance,
    queue_in_browser,
    show_output,
    wait_for_status,
)
from comfy_harness.workflow_format import api_to_ui

KEY = viewer_payload.VIEWER_KEY
VIEWER = 8
PROMPT = "a photo of a dog and a cat"
STEPS = 3
DOCS_IMAGE = Path(__file__).resolve().parents[2] / "docs" / "images" / "attention_viewer.png"


def viewer_graph(seed: int = 3) -> dict:
    """tiny SD1.5 -> ConceptSplit Text Encode -> Capture Attention (dog, cat) -> KSampler -> VAE Decode -> viewer."""
    return {
        "1": {"class_type": "ConceptSplitTestTinyModelLoader", "inputs": {"arch": "sd15", "seed": 0}},
        "2": {"class_type": "ConceptSplitTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {
            "class_type": "ConceptSplitCaptureAttention",
            "inputs": {
                "model": ["1", 0],
                "words": "dog, cat",
                "positive": ["2", 0],
                "token_mode": "first token",
                "first_step": 0,
                "last_step": -1,
                "layers": "all",
                "blocks": "",
            },
        },
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["5", 0],
                "seed": seed,
                "steps": STEPS,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        str(VIEWER): {
            "class_type": "ConceptSplitAttentionViewer",
            "inputs": {
                "capture": ["4", 1],
                "samples": ["6", 0],
                "image": ["7", 0],
                "alpha": 0.5,
                "colormap": "inferno",
            },
        },
    }


@pytest.fixture(scope="module")
def page(comfy_server):
    reason = browser_unavailable_reason()
    if reason:
        pytest.skip(f"browser test needs Debian chromium and playwright: {reason}")
    with frontend(comfy_server.url) as tab:
        tab.page.set_default_timeout(20_000)
        tab.errors = PageErrors(tab)  # from here on: after the app started
        yield tab


@pytest.fixture(scope="module")
def ran(page, comfy_server):
    """The workflow loaded in the page, queued from it, and the viewer's UI output from the server's history."""
    page.load_json(api_to_ui(viewer_graph(), comfy_server.object_info()), "attention_viewer")
    focus_node(page, VIEWER)
    empty = wait_for_status(page, VIEWER, "message")
    assert "No run shown yet" in empty["message"]
    queue_in_browser(page)
    wait_for_status(page, VIEWER, "ready")
    output = latest_viewer_output(comfy_server.url, VIEWER)
    payload = output[KEY][0]
    return output, payload, fetch_image(comfy_server.url, payload["images"][0])


def check_canvas(page, payload, image, word, first, last):
    pixels, state, shown_metrics = canvas_pixels(page, VIEWER)
    assert (state["word"], state["first"], state["last"]) == (word, first, last)
    expected = expected_overlay(payload, image, 0, word, first, last, state["alpha"], state["colormap"])
    assert pixels.shape == expected.shape == (64, 64, 3)
    difference = np.abs(pixels.astype(np.float64) - expected)
    assert difference.max() <= pixel_tolerance(state["alpha"], state["colormap"])
    # the mean of the overlay region: within the 8-bit rounding (0.5) of the server's numbers
    assert abs(pixels.astype(np.float64).mean() - expected.mean()) <= 0.5
    return pixels.astype(np.float64), shown_metrics


def test_the_viewer_shows_words_and_steps_as_the_node_computed_them(page, ran, tmp_path):
    _, payload, image = ran
    assert payload["labels"] == ["dog", "cat"] and payload["steps"] == list(range(STEPS))
    assert [w["text"] for w in payload["words"] if w["word"] >= 0] == ["dog", "cat"]
    last = STEPS - 1
    page.page.hover("[data-cs=viewer] [data-cs-word='0']")
    dog, dog_metrics = check_canvas(page, payload, image, 0, 0, last)
    page.page.hover("[data-cs=viewer] [data-cs-word='1']")
    cat, cat_metrics = check_canvas(page, payload, image, 1, 0, last)
    # the check can tell the words apart: the dog canvas is outside the tolerance of the cat overlay
    tolerance = pixel_tolerance(0.5, "inferno")
    assert np.abs(dog - expected_overlay(payload, image, 0, 1, 0, last, 0.5, "inferno")).max() > 2 * tolerance
    assert dog_metrics == cat_metrics  # the metrics are of the step range, not of the hovered word
    page.page.focus("[data-cs=viewer] [data-cs=first]")
    page.page.keyboard.press("End")  # first step slider to the last step: the range is the last step alone
    late, late_metrics = check_canvas(page, payload, image, 1, last, last)
    # the last step's map is not the average of all steps, by more than the tolerance
    assert np.abs(late - expected_overlay(payload, image, 0, 1, 0, last, 0.5, "inferno")).max() > 2 * tolerance
    # the metrics shown are the range's: map_metrics on the same maps (fp32 there, fp64 in the browser:
    # tolerance N · 2^-23 · |value|, N = h·w terms summed)
    for first, shown in ((0, cat_metrics), (last, late_metrics)):
        maps = viewer_reference.range_mean(decoded_step_maps(payload, 0), payload["step_weights"], first, last)
        n = maps.shape[-1] * maps.shape[-2]
        expected_h = entropy(maps.float()).double()
        shown_h = torch.tensor(shown["entropy"], dtype=torch.float64)
        assert torch.allclose(shown_h, expected_h, rtol=n * 2**-23, atol=0)
        pair = shown["pairs"][0]
        kl, shared = pairwise_kl_matrix(maps.float()).double(), overlap(maps.float()).double()
        assert math.isclose(pair["kl_ab"], kl[0, 1], rel_tol=n * 2**-23 * 10, abs_tol=n * 2**-23)
        assert math.isclose(pair["overlap"], shared[0, 1], abs_tol=n * 2**-23)
    box = page.page.locator("[data-cs=viewer]").bounding_box()
    shot = tmp_path / "attention_viewer.png"
    pad = 50  # the node's title bar and widgets above the DOM widget
    page.page.screenshot(
        path=str(shot),
        clip={
            "x": max(box["x"] - 10, 0),
            "y": max(box["y"] - pad - 120, 0),
            "width": box["width"] + 20,
            "height": box["height"] + pad + 130,
        },
    )
    assert shot.stat().st_size > 10_000
    if os.environ.get("CONCEPTSPLIT_DOCS_SCREENSHOT") == "1":
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_IMAGE)
    assert page.errors.stacks == []


def test_malformed_or_missing_data_show_a_message_and_break_nothing(page, ran):
    output, payload, _ = ran
    errors_before = len(page.errors.stacks)
    truncated = {**payload, "maps": [payload["maps"][0][:40]]}
    cases = {
        "no viewer data": {KEY: []},
        "unknown viewer data version": {KEY: [{**payload, "version": 99}]},
        "labels must be": {KEY: [{**payload, "labels": "dog"}]},
        "maps of image 1 holds": {KEY: [truncated]},
        "not valid base64": {KEY: [{**payload, "maps": ["%%%"]}]},
        "could not be loaded": {KEY: [{**payload, "images": [{**payload["images"][0], "filename": "missing.png"}]}]},
    }
    for reason, bad in cases.items():
        show_output(page, VIEWER, bad)
        shown = wait_for_status(page, VIEWER, "error", timeout_ms=10_000)
        assert reason in shown["message"] and shown["message"].startswith("Attention viewer:"), (reason, shown)
        # the canvas still draws every node
        assert page.page.evaluate(
            "() => { window.app.canvas.draw(true, true); return window.app.graph.nodes.length; }"
        ) == len(viewer_graph())
    show_output(page, VIEWER, {"text": ["an output without viewer data is left alone"]})
    assert wait_for_status(page, VIEWER, "error")["message"]  # unchanged, no exception
    show_output(page, VIEWER, output)  # the good data again
    wait_for_status(page, VIEWER, "ready")
    assert page.errors.stacks[errors_before:] == []


def test_after_a_reload_the_viewer_shows_the_last_run_again(page, ran, comfy_server):
    _, payload, image = ran
    # A later prompt with a NaN input (refused by the pack) stays in ComfyUI's history as posted, and the server's
    # json.dumps writes it as a bare NaN that JSON.parse rejects: the restore must read past it.
    bad = viewer_graph()
    bad[str(VIEWER)]["inputs"]["alpha"] = float("nan")
    assert "not a finite number" in comfy_server.run_expect_error(bad)
    history_text = comfy_server.get_text("/history?max_items=1")
    assert "NaN" in history_text  # the history really holds a token JSON.parse refuses
    page.open()  # navigates to the app again: a reload
    page.page.wait_for_function(f"() => !!window.app.graph.getNodeById({VIEWER})", timeout=20_000)
    focus_node(page, VIEWER)
    wait_for_status(page, VIEWER, "ready", timeout_ms=20_000)
    check_canvas(page, payload, image, 0, 0, STEPS - 1)
    assert page.errors.ours() == []
