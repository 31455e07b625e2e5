"""LODA as workflow JSON through a real ComfyUI server: the "LODA Sampler" node and the "ConceptSplit LODA" SAMPLER
inside SamplerCustom, for SD1.5, SD2.1 and SDXL, with and without ToVA (recipe C, integration §6)."""

from __future__ import annotations

import numpy as np
import pytest

from comfy_harness.tiny_adapters import write_tiny_adapter
from comfy_harness.tiny_models import build_tiny_model
from comfy_harness.loda_settings import LODA_NODE_SETTINGS

ARCHS = ("sd15", "sd21", "sdxl")
PROMPT = "a dog and a cat"
SIZE = 112  # 7×7 maps in the tiny models
SETTINGS = dict(LODA_NODE_SETTINGS, loda_steps=1)


@pytest.fixture(scope="module")
def loda_server(pack, comfyui, tmp_path_factory):
    """A server whose models/tova holds a dog and a cat adapter for every tiny arch (seed 0 models)."""
    from comfy_harness.comfy_server import ComfyServer

    folder = tmp_path_factory.mktemp("loda_tova")
    files = []
    for arch in ARCHS:
        model, _, _ = build_tiny_model(arch, 0)
        for word, seed in (("dog", 1), ("cat", 2)):
            files.append(write_tiny_adapter(folder / f"{arch}_{word}.safetensors", model, word, seed=seed))
    server = ComfyServer(comfyui, models={"tova": files})
    server.start()
    yield server
    server.stop()


def graph(arch: str, tova: bool) -> dict:
    """Both LODA paths in one API-format graph, sharing the loader, prompt and latent."""
    g = {
        "1": {"class_type": "ConceptSplitTestTinyModelLoader", "inputs": {"arch": arch, "seed": 0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
    }
    if tova:
        g["20"] = {
            "class_type": "ConceptSplitLoadAdapter",
            "inputs": {
                "adapter_name": f"{arch}_dog.safetensors",
                "identifier_word": "",
                "strength": 1.0,
                "role": "from file",
            },
        }
        g["21"] = {
            "class_type": "ConceptSplitLoadAdapter",
            "inputs": {
                "adapter_name": f"{arch}_cat.safetensors",
                "identifier_word": "",
                "strength": 1.0,
                "role": "from file",
                "adapters": ["20", 0],
            },
        }
        g["2"] = {
            "class_type": "ConceptSplitApplyToVA",
            "inputs": {"model": ["1", 0], "adapters": ["21", 0], "clip": ["1", 1], "text": PROMPT},
        }
        model, positive, words = ["2", 0], ["2", 1], ""
    else:
        g["2"] = {"class_type": "ConceptSplitTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}}
        model, positive, words = ["1", 0], ["2", 0], "dog, cat"
    g["5"] = {
        "class_type": "ConceptSplitLodaSampler",
        "inputs": {
            "model": model,
            "seed": 0,
            "steps": 3,
            "cfg": 7.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "positive": positive,
            "negative": ["3", 0],
            "latent_image": ["4", 0],
            "denoise": 1.0,
            "concept_words": words,
            **SETTINGS,
        },
    }
    g["6"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}
    g["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}
    g["8"] = {"class_type": "MaskToImage", "inputs": {"mask": ["5", 1]}}
    g["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    g["10"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}}
    g["11"] = {"class_type": "ConceptSplitLoda", "inputs": {"sampler": ["10", 0], "concept_words": words, **SETTINGS}}
    g["12"] = {
        "class_type": "BasicScheduler",
        "inputs": {"model": model, "scheduler": "normal", "steps": 3, "denoise": 1.0},
    }
    g["13"] = {
        "class_type": "SamplerCustom",
        "inputs": {
            "model": model,
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
    g["14"] = {"class_type": "ConceptSplitLodaResults", "inputs": {"latent": ["13", 0], "loda_result": ["11", 1]}}
    g["15"] = {"class_type": "MaskToImage", "inputs": {"mask": ["14", 0]}}
    g["16"] = {"class_type": "PreviewImage", "inputs": {"images": ["15", 0]}}
    g["17"] = {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}}
    g["18"] = {"class_type": "PreviewImage", "inputs": {"images": ["17", 0]}}
    return g


@pytest.mark.parametrize("tova", [False, True], ids=["plain", "tova"])
@pytest.mark.parametrize("arch", ARCHS)
def test_both_loda_nodes_run_as_workflow_json(loda_server, arch, tova):
    entry = loda_server.run(graph(arch, tova), timeout=240)
    for node in ("7", "18"):
        (image,) = loda_server.output_images(entry, node)
        assert image.size == (SIZE, SIZE)
    for node in ("9", "16"):  # one mask per concept, each with a few pixels set (about the top 10 % of 7×7)
        masks = loda_server.output_images(entry, node)
        assert len(masks) == 2
        assert all(0 < int((np.asarray(m.convert("L")) > 127).sum()) < SIZE * SIZE // 2 for m in masks)


def test_bad_words_fail_with_the_pack_message(loda_server):
    g = graph("sd15", False)
    g["5"]["inputs"]["concept_words"] = "dog, horse"
    for node in ("11", "12", "13", "14", "15", "16", "17", "18"):
        del g[node]
    message = loda_server.run_expect_error(g, timeout=240)
    assert "LodaSampler" in message or "ConceptSplitLodaSampler" in message
    assert '"horse"' in message and "is not in the prompt" in message


def test_gradient_checkpointing_through_the_server_gives_the_same_images_and_masks(loda_server):
    """The prompt without the input (as saved before it existed) and with it on: same pictures, same masks."""
    plain = graph("sd21", False)
    assert "gradient_checkpointing" not in plain["5"]["inputs"]  # an API prompt from before the input existed
    checkpointed = graph("sd21", False)
    for node in ("5", "11"):
        checkpointed[node]["inputs"]["gradient_checkpointing"] = True
    entries = [loda_server.run(g, timeout=240) for g in (plain, checkpointed)]
    for node in ("7", "9", "16", "18"):
        first, second = (
            [np.asarray(image, dtype=np.int16) for image in loda_server.output_images(entry, node)] for entry in entries
        )
        assert len(first) == len(second) > 0
        assert all(np.abs(a - b).max() <= 1 for a, b in zip(first, second)), node  # 8-bit rounding at most
