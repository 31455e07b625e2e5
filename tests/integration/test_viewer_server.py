"""The attention viewer as a user runs it: an API-format workflow posted to the real ComfyUI server (issue 4)."""

from __future__ import annotations

import numpy as np
import pytest

PROMPT = "a photo of a dog and a cat"


def viewer_graph(arch, words="dog, cat", size=64, batch=2, seed=0, steps=3, layers="all"):
    """tiny loader -> ConceptSplit Text Encode -> Capture Attention -> KSampler -> VAEDecode -> Attention Map
    Viewer -> PreviewImage (API format)."""
    return {
        "1": {"class_type": "ConceptSplitTestTinyModelLoader", "inputs": {"arch": arch, "seed": 0}},
        "2": {"class_type": "ConceptSplitTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {
            "class_type": "ConceptSplitCaptureAttention",
            "inputs": {
                "model": ["1", 0],
                "words": words,
                "positive": ["2", 0],
                "token_mode": "first token",
                "first_step": 0,
                "last_step": -1,
                "layers": layers,
                "blocks": "",
            },
        },
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["5", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {
            "class_type": "ConceptSplitAttentionViewer",
            "inputs": {
                "capture": ["4", 1],
                "samples": ["6", 0],
                "image": ["7", 0],
                "alpha": 0.5,
                "colormap": "inferno",
            },
        },
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


def test_viewer_nodes_register_with_tooltips(comfy_server):
    for node_id, display in (
        ("ConceptSplitCaptureAttention", "Capture Attention"),
        ("ConceptSplitAttentionViewer", "Attention Map Viewer"),
    ):
        info = comfy_server.object_info(node_id)[node_id]
        assert info["display_name"] == display
        inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
        assert [name for name, spec in inputs.items() if not spec[1].get("tooltip")] == []
    assert comfy_server.object_info("ConceptSplitAttentionViewer")["ConceptSplitAttentionViewer"]["output_node"]


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_workflow_renders_a_labeled_grid_per_image_and_shows_metrics(comfy_server, arch, tmp_path):
    entry = comfy_server.run(viewer_graph(arch))
    viewer = entry["outputs"]["8"]
    report = viewer["text"][0]
    assert "Image 2 of 2" in report and "dog / cat" in report and "LODA harmonic mean" in report
    assert "steps 0-2 (3 steps)" in report
    images = comfy_server.output_images(entry, "9")
    assert len(images) == 2 and len(viewer["images"]) == 2  # a grid per image, in the viewer and in PreviewImage
    for image in images:
        assert image.size == (134, 84)  # 2 tiles of 64 px: W = 2·64 + 3·2, H = 64 + 16 label + 2·2
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        tile = pixels[2:66, 2:66]
        assert tile.std() > 1.0  # a heatmap over an image, not a flat tile
        label = pixels[66:82, 2:66]
        assert label.max() > 200 and np.median(label) < 40  # light text on the dark strip
    images[0].save(tmp_path / f"viewer_{arch}.png")


def test_a_word_missing_from_the_prompt_fails_with_its_message(comfy_server):
    message = comfy_server.run_expect_error(viewer_graph("sd15", words="dog, horse"))
    assert 'Word "horse" is not in the prompt' in message and 'Fix: add "horse" to the prompt' in message


def test_changing_only_the_viewer_reuses_the_cached_run_and_shows_its_maps(comfy_server):
    graph = viewer_graph("sd21", seed=5, batch=1)
    first = comfy_server.run(graph)["outputs"]["8"]["text"][0]
    graph["8"]["inputs"]["alpha"] = 0.8  # only the viewer reruns; the capture still holds the sampler's run
    second = comfy_server.run(graph)["outputs"]["8"]["text"][0]
    assert second == first
    graph["6"]["inputs"]["seed"] = 6  # a new sampling run: new maps, matched by the new LATENT
    third = comfy_server.run(graph)["outputs"]["8"]["text"][0]
    assert third != first
