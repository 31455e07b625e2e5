"""ToVA as a user runs it: workflow JSON posted to the real ComfyUI server with this pack installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import sample
from safetensors.torch import save_file

from comfy_harness.tiny_adapters import write_tiny_adapter
from comfy_harness.tiny_models import build_tiny_model
from comfy_harness.tolerance import effect_tolerance

PROMPT = "a photo of a dog and a cat"


def tova_graph(arch, dog, cat, text=PROMPT, seed=0, steps=3):
    """tiny loader -> Load ToVA Adapter x2 -> Apply ToVA -> KSampler -> VAEDecode -> SaveImage (API format)."""
    return {
        "1": {"class_type": "ConceptSplitTestTinyModelLoader", "inputs": {"arch": arch, "seed": 0}},
        "2": {
            "class_type": "ConceptSplitLoadAdapter",
            "inputs": {"adapter_name": dog, "identifier_word": "", "strength": 1.0, "role": "from file"},
        },
        "3": {
            "class_type": "ConceptSplitLoadAdapter",
            "inputs": {
                "adapter_name": cat,
                "identifier_word": "",
                "strength": 1.0,
                "role": "from file",
                "adapters": ["2", 0],
            },
        },
        "4": {
            "class_type": "ConceptSplitApplyToVA",
            "inputs": {"model": ["1", 0], "adapters": ["3", 0], "clip": ["1", 1], "text": text},
        },
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "positive": ["4", 1],
                "negative": ["5", 0],
                "latent_image": ["6", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": f"tova_{arch}"}},
        "11": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"latents/tova_{arch}"}},
    }


def saved_latent(server, entry, node_id="11") -> torch.Tensor:
    """The LATENT a SaveLatent node wrote, read back from the server's output folder. (B, 4, h, w)"""
    from safetensors.torch import load_file

    info = entry["outputs"][node_id]["latents"][0]
    return load_file(str(server.base_dir / "output" / info["subfolder"] / info["filename"]))["latent_tensor"]


def plain_graph(arch, text=PROMPT):
    graph = tova_graph(arch, "unused", "unused", text)
    for node in ("2", "3", "4"):
        graph.pop(node)
    graph["10"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}}
    graph["7"]["inputs"].update(model=["1", 0], positive=["10", 0])
    graph["9"]["inputs"]["filename_prefix"] = f"plain_{arch}"
    graph["11"]["inputs"]["filename_prefix"] = f"latents/plain_{arch}"
    return graph


@pytest.fixture(scope="module")
def served_adapters(comfy_server, pack, tmp_path_factory):
    """Per tiny family, a dog and a cat adapter in the server's models/tova folder."""
    folder = tmp_path_factory.mktemp("served_tova")
    names = {}
    for arch in ("sd15", "sd21", "sdxl"):
        model, _, _ = build_tiny_model(arch, seed=0)  # the server's loader builds identical weights
        for word, seed in (("dog", 1), ("cat", 2)):
            path = write_tiny_adapter(folder / f"server_{arch}_{word}.safetensors", model, word, seed=seed)
            names[(arch, word)] = comfy_server.add_model("tova", path)
    return names


def test_pack_loads_and_registers_its_nodes(comfy_server):
    info = comfy_server.object_info()
    for node_id, display in (
        ("ConceptSplitLoadAdapter", "Load ToVA Adapter"),
        ("ConceptSplitApplyToVA", "Apply ToVA to Model"),
        ("ConceptSplitTextEncode", "ConceptSplit Text Encode"),
    ):
        assert info[node_id]["display_name"] == display
        assert info[node_id]["python_module"].startswith("custom_nodes.")
    log = comfy_server.log_text()
    ours = [line for line in log.splitlines() if "ComfyUI-ConceptSplit" in line]
    assert ours and not [
        line
        for line in ours
        if "Cannot import" in line or "IMPORT FAILED" in line or "Error while calling comfy_entrypoint" in line
    ]


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_tova_workflow_runs_differs_from_plain_and_matches_in_process(
    comfy_server, served_adapters, pack, arch, tova_folder
):
    entry = comfy_server.run(tova_graph(arch, served_adapters[(arch, "dog")], served_adapters[(arch, "cat")]))
    tova_image = np.asarray(comfy_server.output_images(entry, "9")[0], dtype=np.int16)
    plain = comfy_server.run(plain_graph(arch))
    plain_image = np.asarray(comfy_server.output_images(plain, "9")[0], dtype=np.int16)
    assert tova_image.shape == (64, 64, 3)
    tova_latent, plain_latent = saved_latent(comfy_server, entry), saved_latent(comfy_server, plain)
    assert (tova_latent - plain_latent).abs().max() > 1e-2  # the adapters change the result
    assert tova_image.shape == plain_image.shape

    # The same graph in this process (same seeds, CPU) decodes to the same pixels, up to PNG rounding.
    import nodes

    model, clip, vae = build_tiny_model(arch, seed=0)
    for word, seed in (("dog", 1), ("cat", 2)):
        write_tiny_adapter(tova_folder / f"{word}.safetensors", model, word, seed=seed)
    adapters_node = pack.glue("adapters")
    adapters = adapters_node.LoadToVAAdapter.execute("dog.safetensors", "", 1.0, "from file").result[0]
    adapters = adapters_node.LoadToVAAdapter.execute("cat.safetensors", "", 1.0, "from file", -1, adapters).result[0]
    patched, positive, _ = adapters_node.ApplyToVA.execute(model, adapters, clip, PROMPT).result
    latent = sample(patched, clip, positive=positive)
    # Same code, another process: float32 rounding may differ (thread count) and grows through the UNet and the
    # sampler; a graph that differs (adapter, strength, token) moves the latent by the order of the effect.
    assert (latent - tova_latent).abs().max() <= effect_tolerance(tova_latent, plain_latent)
    with torch.inference_mode():
        image = nodes.VAEDecode().decode(vae, {"samples": latent})[0][0]
    local = np.clip(255.0 * image.numpy(), 0, 255).astype(np.int16)
    assert np.abs(local - tova_image).max() <= 1  # 8-bit rounding of nearly equal floats: one level at most


def test_bad_inputs_through_the_server_report_the_message(comfy_server, served_adapters, tmp_path):
    graph = tova_graph(
        "sd21", served_adapters[("sd21", "dog")], served_adapters[("sd21", "cat")], text="a cat on a sofa"
    )
    message = comfy_server.run_expect_error(graph)
    assert message.startswith("ConceptSplitApplyToVA")  # raised by Apply ToVA, before the KSampler ran
    assert 'Identifier word "dog"' in message and "is not in the prompt" in message

    graph = tova_graph("sd21", served_adapters[("sdxl", "dog")], served_adapters[("sd21", "cat")])
    message = comfy_server.run_expect_error(graph)
    assert message.startswith("ConceptSplitApplyToVA")
    assert "trained for SDXL" in message and "the model is SD2.1" in message

    kohya = tmp_path / "kohya_style.safetensors"
    save_file(
        {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v.lora_down.weight": torch.zeros(4, 64)}, str(kohya)
    )
    graph = tova_graph("sd21", comfy_server.add_model("tova", kohya), served_adapters[("sd21", "cat")])
    message = comfy_server.run_expect_error(graph)
    assert message.startswith("ConceptSplitLoadAdapter")
    assert "is a regular LoRA, not a token-wise ToVA adapter" in message and "Load LoRA" in message
