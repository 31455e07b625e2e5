"""Issue 11 #4 as a user meets it: API-format prompts posted to the real ComfyUI server. A KSampler (or LODA Sampler)
whose positive is CLIP Text Encode of another text than Apply ToVA's is refused with the pack's message; the same
text through CLIP Text Encode samples exactly what Apply ToVA's own positive samples."""

from __future__ import annotations

import pytest
import torch
from test_loda_server import SETTINGS
from test_tova_server import saved_latent, tova_graph

from comfy_harness.tiny_adapters import write_tiny_adapter
from comfy_harness.tiny_models import build_tiny_model

PROMPT = "a dog and a cat"
REFUSED = "The positive prompt being sampled is not the prompt Apply ToVA located"
ARCHS = ("sd15", "sdxl")


@pytest.fixture(scope="module")
def adapters(comfy_server, pack, tmp_path_factory):
    """Per tiny family, a dog and a cat adapter in the server's models/tova folder."""
    folder = tmp_path_factory.mktemp("recognition_tova")
    names = {}
    for arch in ARCHS:
        model, _, _ = build_tiny_model(arch, seed=0)  # the server's loader builds identical weights
        for word, seed in (("dog", 1), ("cat", 2)):
            path = write_tiny_adapter(folder / f"recognition_{arch}_{word}.safetensors", model, word, seed=seed)
            names[(arch, word)] = comfy_server.add_model("tova", path)
    return names


def with_plain_positive(graph: dict, text: str) -> dict:
    """The graph with the KSampler's positive from a CLIP Text Encode of `text` (Apply ToVA keeps its own text)."""
    graph["10"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}}
    graph["7"]["inputs"]["positive"] = ["10", 0]
    return graph


@pytest.mark.parametrize("arch", ARCHS)
def test_another_text_is_refused_and_the_same_text_samples_like_apply_tovas_positive(comfy_server, adapters, arch):
    dog, cat = adapters[(arch, "dog")], adapters[(arch, "cat")]
    message = comfy_server.run_expect_error(with_plain_positive(tova_graph(arch, dog, cat, PROMPT), "a cat"))
    assert message.startswith("KSampler")  # raised at the sampler's first model call, before any step
    assert REFUSED in message and 'text features other than those of "a dog and a cat"' in message
    assert "Fix: connect Apply ToVA's positive output to the sampler" in message
    # The server still answers; the same text through CLIP Text Encode is Apply ToVA's prompt. Same process, same
    # CLIP call on the same tokens: bit-identical features, so the same operations give bit-identical latents.
    own = saved_latent(comfy_server, comfy_server.run(tova_graph(arch, dog, cat, PROMPT)))
    same = saved_latent(comfy_server, comfy_server.run(with_plain_positive(tova_graph(arch, dog, cat, PROMPT), PROMPT)))
    assert torch.equal(same, own)


def test_loda_sampler_on_a_tova_model_refuses_another_text_the_same_way(comfy_server, adapters):
    dog, cat = adapters[("sd15", "dog")], adapters[("sd15", "cat")]
    graph = with_plain_positive(tova_graph("sd15", dog, cat, PROMPT), "a cat and a dog")
    sampler = graph.pop("7")["inputs"]
    graph["6"]["inputs"].update(width=112, height=112)  # 7×7 maps in the tiny models
    graph["7"] = {
        "class_type": "ConceptSplitLodaSampler",
        "inputs": {
            **{
                key: sampler[key]
                for key in (
                    "model",
                    "seed",
                    "steps",
                    "cfg",
                    "sampler_name",
                    "scheduler",
                    "positive",
                    "negative",
                    "latent_image",
                    "denoise",
                )
            },
            "concept_words": "",
            **SETTINGS,
        },
    }
    message = comfy_server.run_expect_error(graph)
    assert message.startswith("ConceptSplitLodaSampler")
    assert REFUSED in message and 'text features other than those of "a dog and a cat"' in message
    assert comfy_server.object_info("ConceptSplitLodaSampler")  # still answering
