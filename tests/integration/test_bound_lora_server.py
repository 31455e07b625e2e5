"""Bound LoRAs as workflow JSON through a real ComfyUI server: checkpoint -> two Bind LoRA to Concept -> Apply Bound
LoRAs -> LODA Sampler -> decode on SD1.5 and SDXL, also with ToVA adapters and the SamplerCustom path; bad input
fails with the pack's message before sampling and the server goes on."""

from __future__ import annotations

import numpy as np
import pytest

from comfy_harness.tiny_adapters import write_tiny_adapter
from comfy_harness.tiny_loras import write_tiny_lora
from comfy_harness.tiny_models import build_tiny_model
from comfy_harness.loda_settings import LODA_NODE_SETTINGS

ARCHS = ("sd15", "sdxl")
PROMPT = "a dog and a cat"
SIZE = 112
SETTINGS = dict(LODA_NODE_SETTINGS, loda_steps=1)


@pytest.fixture(scope="module")
def lora_server(pack, comfyui, tmp_path_factory):
    """A server with a kohya dog LoRA and a LoHa cat LoRA per arch (models/loras), a ToVA dog adapter for sd15,
    and a damaged LoRA file."""
    from comfy_harness.comfy_server import ComfyServer

    folder = tmp_path_factory.mktemp("bound_loras")
    loras, tova = [], []
    for arch in ARCHS:
        model, _, _ = build_tiny_model(arch, 0)
        for word, kind, seed in (("dog", "lora", 1), ("cat", "loha", 2)):
            path = folder / f"{arch}_{word}.safetensors"
            write_tiny_lora(path, model, seed=seed, kind=kind)
            loras.append(path)
        if arch == "sd15":
            tova.append(write_tiny_adapter(folder / "sd15_tova_dog.safetensors", model, "dog", seed=3))
    damaged = folder / "damaged.safetensors"
    damaged.write_bytes(b"not a safetensors file" * 20)
    loras.append(damaged)
    server = ComfyServer(comfyui, models={"loras": loras, "tova": tova})
    server.start()
    yield server
    server.stop()


def graph(arch: str, dog: str | None = None, tova: bool = False) -> dict:
    g = {
        "1": {"class_type": "ConceptSplitTestTinyModelLoader", "inputs": {"arch": arch, "seed": 0}},
        "2": {"class_type": "ConceptSplitTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 2}},
        "20": {
            "class_type": "ConceptSplitBindLora",
            "inputs": {"lora_name": dog or f"{arch}_dog.safetensors", "concept_word": "dog", "strength": 1.0},
        },
        "21": {
            "class_type": "ConceptSplitBindLora",
            "inputs": {
                "lora_name": f"{arch}_cat.safetensors",
                "concept_word": "cat",
                "strength": 0.8,
                "bound_loras": ["20", 0],
            },
        },
    }
    model, positive = ["1", 0], ["2", 0]
    if tova:  # the dog is a ToVA adapter too; the model chain: ToVA first, then the bound LoRAs
        g["22"] = {
            "class_type": "ConceptSplitLoadAdapter",
            "inputs": {
                "adapter_name": "sd15_tova_dog.safetensors",
                "identifier_word": "",
                "strength": 1.0,
                "role": "from file",
            },
        }
        g["23"] = {
            "class_type": "ConceptSplitApplyToVA",
            "inputs": {"model": ["1", 0], "adapters": ["22", 0], "clip": ["1", 1], "text": PROMPT},
        }
        model, positive = ["23", 0], ["23", 1]
    g["24"] = {
        "class_type": "ConceptSplitApplyBoundLoras",
        "inputs": {"model": model, "bound_loras": ["21", 0], "positive": positive},
    }
    g["5"] = {
        "class_type": "ConceptSplitLodaSampler",
        "inputs": {
            "model": ["24", 0],
            "seed": 0,
            "steps": 3,
            "cfg": 7.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "positive": positive,
            "negative": ["3", 0],
            "latent_image": ["4", 0],
            "denoise": 1.0,
            "concept_words": "dog, cat",
            **SETTINGS,
        },
    }
    g["6"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}
    g["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}
    g["8"] = {"class_type": "MaskToImage", "inputs": {"mask": ["5", 1]}}
    g["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    g["10"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}}
    g["11"] = {
        "class_type": "ConceptSplitLoda",
        "inputs": {"sampler": ["10", 0], "concept_words": "dog, cat", **SETTINGS},
    }
    g["12"] = {
        "class_type": "BasicScheduler",
        "inputs": {"model": ["24", 0], "scheduler": "normal", "steps": 3, "denoise": 1.0},
    }
    g["13"] = {
        "class_type": "SamplerCustom",
        "inputs": {
            "model": ["24", 0],
            "add_noise": True,
            "noise_seed": 0,
            "cfg": 7.0,
            "positive": positive,
            "negative": ["3", 0],
            "sampler": ["11", 0],
            "sigmas": ["12", 0],
            "latent_image": ["4", 0],
        },
    }
    g["17"] = {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}}
    g["18"] = {"class_type": "PreviewImage", "inputs": {"images": ["17", 0]}}
    return g


@pytest.mark.parametrize("arch,tova", [("sd15", False), ("sdxl", False), ("sd15", True)])
def test_two_bound_loras_run_as_workflow_json(lora_server, arch, tova):
    entry = lora_server.run(graph(arch, tova=tova), timeout=240)
    for node in ("7", "18"):
        images = lora_server.output_images(entry, node)
        assert len(images) == 2 and all(image.size == (SIZE, SIZE) for image in images)
    masks = lora_server.output_images(entry, "9")  # 2 images × 2 concepts
    assert len(masks) == 4
    assert all(0 < int((np.asarray(m.convert("L")) > 127).sum()) < SIZE * SIZE // 2 for m in masks)


def test_a_damaged_lora_file_fails_with_the_pack_message_and_the_server_goes_on(lora_server):
    message = lora_server.run_expect_error(graph("sd15", dog="damaged.safetensors"), timeout=240)
    assert "ApplyBoundLoras" in message or "Apply Bound LoRAs" in message
    assert "cannot be read" in message and "Seen:" in message and "Fix:" in message
    assert lora_server._get("/queue") == {"queue_running": [], "queue_pending": []}
    lora_server.run(graph("sd15"), timeout=240)  # the next prompt runs


def with_drawn_masks(g: dict, mode: str = "replace") -> dict:
    """The graph with drawn concept masks into both LODA samplers, from core nodes only (both versions): dog = the red
    channel of a PNG (Load Image (as Mask)), cat = a Solid Mask minus dog (Mask Composite), batched dog first through
    Mask To Image → Batch Images → Image To Mask, into the LODA Sampler and ConceptSplit LODA (SamplerCustom), whose
    masks ConceptSplit LODA Results outputs (node 16)."""
    g = dict(g)
    g["30"] = {"class_type": "LoadImageMask", "inputs": {"image": "dog_mask.png", "channel": "red"}}
    g["31"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": SIZE, "height": SIZE}}
    g["32"] = {
        "class_type": "MaskComposite",
        "inputs": {"destination": ["31", 0], "source": ["30", 0], "x": 0, "y": 0, "operation": "subtract"},
    }
    g["33"] = {"class_type": "MaskToImage", "inputs": {"mask": ["30", 0]}}
    g["34"] = {"class_type": "MaskToImage", "inputs": {"mask": ["32", 0]}}
    g["35"] = {"class_type": "ImageBatch", "inputs": {"image1": ["33", 0], "image2": ["34", 0]}}
    g["36"] = {"class_type": "ImageToMask", "inputs": {"image": ["35", 0], "channel": "red"}}
    g["5"] = {**g["5"], "inputs": {**g["5"]["inputs"], "concept_masks": ["36", 0], "mask_mode": mode}}
    g["11"] = {**g["11"], "inputs": {**g["11"]["inputs"], "concept_masks": ["36", 0], "mask_mode": mode}}
    g["14"] = {"class_type": "ConceptSplitLodaResults", "inputs": {"latent": ["13", 0], "loda_result": ["11", 1]}}
    g["15"] = {"class_type": "MaskToImage", "inputs": {"mask": ["14", 0]}}
    g["16"] = {"class_type": "PreviewImage", "inputs": {"images": ["15", 0]}}
    return g


def test_masks_drawn_with_core_mask_nodes_drive_both_loda_samplers(lora_server):
    """Replace, in both samplers: the MASK output is the drawn split (dog = left 40 of 112 px, cat = the rest), for
    both images of the batch (constrain's intersection is checked with numbers in test_user_masks.py)."""
    from PIL import Image

    edge = 40  # 5 latent pixels: on the 8-px grid, so the latent-grid masks are exactly the drawn ones
    picture = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    picture[:, :edge, 0] = 255
    folder = lora_server.base_dir / "input"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(folder / "dog_mask.png")
    entry = lora_server.run(with_drawn_masks(graph("sd15")), timeout=240)
    dog = np.zeros((SIZE, SIZE), dtype=bool)
    dog[:, :edge] = True
    masks = [np.asarray(m.convert("L")) > 127 for m in lora_server.output_images(entry, "9")]
    assert len(masks) == 4  # 2 images × (dog, cat), image-major
    for index, mask in enumerate(masks):
        assert np.array_equal(mask, dog if index % 2 == 0 else ~dog), index
    custom = [np.asarray(m.convert("L")) > 127 for m in lora_server.output_images(entry, "16")]
    assert len(custom) == 4
    for index, mask in enumerate(custom):
        assert np.array_equal(mask, dog if index % 2 == 0 else ~dog), index
    for node in ("7", "18"):
        assert len(lora_server.output_images(entry, node)) == 2


def test_a_mask_of_another_aspect_ratio_fails_before_sampling_and_the_server_goes_on(lora_server):
    g = with_drawn_masks(graph("sd15"))
    g["31"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 2 * SIZE, "height": SIZE}}
    g["30"] = {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 2 * SIZE, "height": SIZE}}
    message = lora_server.run_expect_error(g, timeout=240)
    assert "aspect ratio" in message and "112×224 px" in message and "Fix:" in message
    assert lora_server._get("/queue") == {"queue_running": [], "queue_pending": []}
