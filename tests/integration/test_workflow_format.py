"""UI <-> API workflow conversion (comfy_harness/workflow_format.py) against the real node definitions of ComfyUI
0.3.64."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest

from comfy_harness.workflow_format import (
    Note,
    WorkflowFormatError,
    api_to_ui,
    complete_api_graph,
    node_types,
    ui_to_api,
)

REPO = Path(__file__).resolve().parents[2]


def build_workflows_module():
    spec = importlib.util.spec_from_file_location("build_workflows", REPO / "scripts" / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def info(pack):
    from comfy_harness.comfy_object_info import object_info

    return object_info()


TOVA = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd21.safetensors"}},
    "3": {
        "class_type": "ConceptSplitLoadAdapter",
        "inputs": {
            "adapter_name": "dog.safetensors",
            "identifier_word": "",
            "strength": 1.0,
            "role": "from file",
            "token_index": -1,
        },
    },
    "4": {
        "class_type": "ConceptSplitLoadAdapter",
        "inputs": {
            "adapter_name": "cat.safetensors",
            "identifier_word": "kitty",
            "strength": 0.8,
            "role": "object",
            "token_index": -1,
            "adapters": ["3", 0],
        },
    },
    "5": {
        "class_type": "ConceptSplitApplyToVA",
        "inputs": {
            "model": ["1", 0],
            "adapters": ["4", 0],
            "clip": ["1", 1],
            "text": "a dog and a kitty",
            "apply_to_uncond": False,
        },
    },
    "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
    "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 768, "height": 768, "batch_size": 1}},
    "8": {
        "class_type": "KSampler",
        "inputs": {
            "model": ["5", 0],
            "positive": ["5", 1],
            "negative": ["6", 0],
            "latent_image": ["7", 0],
            "seed": 42,
            "steps": 50,
            "cfg": 7.5,
            "sampler_name": "ddim",
            "scheduler": "ddim_uniform",
            "denoise": 1.0,
        },
    },
    "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
    "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "tova"}},
}

# SamplerCustom's noise_seed (control widget), LoadImage (upload widget), a widget input fed by a link
# (PrimitiveInt -> steps), an output used twice, and a node with an optional socket left unconnected.
CUSTOM = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "2": {"class_type": "PrimitiveInt", "inputs": {"value": 7}},
    "3": {
        "class_type": "BasicScheduler",
        "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": ["2", 0], "denoise": 0.75},
    },
    "4": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}},
    "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
    "6": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
    "7": {"class_type": "VAEEncode", "inputs": {"pixels": ["6", 0], "vae": ["1", 2]}},
    "8": {
        "class_type": "SamplerCustom",
        "inputs": {
            "model": ["1", 0],
            "add_noise": True,
            "noise_seed": 123,
            "cfg": 6.0,
            "positive": ["5", 0],
            "negative": ["5", 0],
            "sampler": ["4", 0],
            "sigmas": ["3", 0],
            "latent_image": ["7", 0],
        },
    },
    "9": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
}


@pytest.mark.parametrize("graph", [TOVA, CUSTOM], ids=["tova", "custom_sampling"])
def test_api_to_ui_to_api_is_the_identity(info, graph):
    ui = api_to_ui(graph, info, notes=[Note("set the checkpoint")])
    assert ui_to_api(ui, info) == graph
    assert ui["version"] == 0.4 and ui["last_link_id"] == len(ui["links"])
    assert ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    assert node_types(ui) == {n["class_type"] for n in graph.values()}  # the Note is not a node type
    assert [n["widgets_values"] for n in ui["nodes"] if n["type"] == "Note"] == [["set the checkpoint"]]


def test_every_example_workflow_definition_round_trips(info):
    module = build_workflows_module()
    built = 0
    for definition in module.WORKFLOWS.values():
        if module.missing_node_types(definition, info):
            continue  # a node another engineer has not registered yet; test_workflows.py fails for the saved file
        graph = complete_api_graph(definition.build(), info)
        assert ui_to_api(module.build_ui_workflow(definition, info), info) == graph, definition.name
        built += 1
    assert built >= 1


def test_widget_values_follow_the_frontend_layout(info):
    ui = api_to_ui(CUSTOM, info)
    by_type = {n["type"]: n for n in ui["nodes"]}
    assert by_type["SamplerCustom"]["widgets_values"] == [True, 123, "fixed", 6.0]  # control after noise_seed
    assert by_type["LoadImage"]["widgets_values"] == ["photo.png", "image"]  # the upload button's value
    scheduler = by_type["BasicScheduler"]
    assert scheduler["widgets_values"] == ["karras", 20, 0.75]  # a linked widget keeps its default value
    assert [(i["name"], i.get("widget")) for i in scheduler["inputs"]] == [
        ("model", None),
        ("steps", {"name": "steps"}),
    ]
    train = info.get("ConceptSplitTrainToVA")
    if train is not None:  # control_after_generate=False: no control widget, although the input is named seed
        seed = train["input"]["required"]["seed"]
        assert seed[1]["control_after_generate"] is False
    # the layout runs left to right: every link goes from a column to a later one
    x = {n["id"]: n["pos"][0] for n in ui["nodes"]}
    assert all(x[link[1]] < x[link[3]] for link in ui["links"])


def frontend_style_workflow() -> dict:
    """A UI workflow as the frontend saves it, with a Note, a Reroute, a PrimitiveNode, a muted and a bypassed node."""

    def node(node_id, node_type, inputs=(), outputs=(), widgets=None, mode=0):
        out = {
            "id": node_id,
            "type": node_type,
            "pos": [0, 0],
            "size": [200, 100],
            "flags": {},
            "order": 0,
            "mode": mode,
            "inputs": list(inputs),
            "outputs": list(outputs),
            "properties": {},
        }
        if widgets is not None:
            out["widgets_values"] = widgets
        return out

    return {
        "last_node_id": 10,
        "last_link_id": 10,
        "version": 0.4,
        "groups": [],
        "config": {},
        "extra": {},
        "nodes": [
            node(
                1,
                "CheckpointLoaderSimple",
                outputs=[
                    {"name": "MODEL", "type": "MODEL", "links": [1]},
                    {"name": "CLIP", "type": "CLIP", "links": [2, 3]},
                    {"name": "VAE", "type": "VAE", "links": []},
                ],
                widgets=["sd15.safetensors"],
            ),
            node(
                2,
                "Reroute",
                inputs=[{"name": "", "type": "*", "link": 2}],
                outputs=[{"name": "", "type": "CLIP", "links": [4]}],
            ),
            node(
                3,
                "CLIPTextEncode",
                inputs=[{"name": "clip", "type": "CLIP", "link": 4}],
                outputs=[{"name": "CONDITIONING", "type": "CONDITIONING", "links": [5, 6]}],
                widgets=["a cat"],
            ),
            node(
                4,
                "ModelSamplingDiscrete",
                inputs=[{"name": "model", "type": "MODEL", "link": 1}],
                outputs=[{"name": "MODEL", "type": "MODEL", "links": [7]}],
                widgets=["v_prediction", False],
                mode=4,
            ),
            node(
                5,
                "EmptyLatentImage",
                outputs=[{"name": "LATENT", "type": "LATENT", "links": [8]}],
                widgets=[512, 512, 1],
                mode=2,
            ),
            node(
                6,
                "PrimitiveNode",
                outputs=[{"name": "INT", "type": "INT", "links": [9], "widget": {"name": "steps"}}],
                widgets=[12, "fixed"],
            ),
            node(
                7,
                "KSampler",
                inputs=[
                    {"name": "model", "type": "MODEL", "link": 7},
                    {"name": "positive", "type": "CONDITIONING", "link": 5},
                    {"name": "negative", "type": "CONDITIONING", "link": 6},
                    {"name": "latent_image", "type": "LATENT", "link": 8},
                    {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 9},
                ],
                outputs=[{"name": "LATENT", "type": "LATENT", "links": []}],
                widgets=[5, "randomize", 20, 8.0, "euler", "normal", 1.0],
            ),
            node(8, "Note", widgets=["read me"]),
            node(9, "MarkdownNote", widgets=["# read me"]),
            node(
                10,
                "CLIPTextEncode",
                inputs=[{"name": "clip", "type": "CLIP", "link": 3}],
                outputs=[{"name": "CONDITIONING", "type": "CONDITIONING", "links": []}],
                widgets=["muted"],
                mode=2,
            ),
        ],
        "links": [
            [1, 1, 0, 4, 0, "MODEL"],
            [2, 1, 1, 2, 0, "CLIP"],
            [3, 1, 1, 10, 0, "CLIP"],
            [4, 2, 0, 3, 0, "CLIP"],
            [5, 3, 0, 7, 1, "CONDITIONING"],
            [6, 3, 0, 7, 2, "CONDITIONING"],
            [7, 4, 0, 7, 0, "MODEL"],
            [8, 5, 0, 7, 3, "LATENT"],
            [9, 6, 0, 7, 4, "INT"],
        ],
    }


def test_ui_to_api_handles_virtual_muted_and_bypassed_nodes(info):
    prompt = ui_to_api(frontend_style_workflow(), info)
    assert set(prompt) == {"1", "3", "7"}  # no Note, Reroute, PrimitiveNode, muted or bypassed node
    assert prompt["3"]["inputs"] == {"text": "a cat", "clip": ["1", 1]}  # through the Reroute
    assert prompt["7"]["inputs"] == {
        "seed": 5,
        "steps": 12,
        "cfg": 8.0,
        "sampler_name": "euler",
        "scheduler": "normal",
        "denoise": 1.0,
        "model": ["1", 0],  # the bypassed ModelSamplingDiscrete passes its MODEL input through
        "positive": ["3", 0],
        "negative": ["3", 0],  # latent_image came from a muted node: dropped
    }


def test_ui_to_api_rejects_missing_nodes_and_stale_widget_values(info):
    workflow = frontend_style_workflow()
    workflow["nodes"][2]["type"] = "NoSuchNode"
    with pytest.raises(WorkflowFormatError, match="NoSuchNode.*not registered"):
        ui_to_api(workflow, info)
    workflow = frontend_style_workflow()
    workflow["nodes"][6]["widgets_values"] = [5, 20, 8.0, "euler", "normal", 1.0]  # saved without the control value
    with pytest.raises(WorkflowFormatError, match=r"node 7 \(KSampler\): 6 widget values.*out of date"):
        ui_to_api(workflow, info)


def test_api_to_ui_rejects_bad_graphs(info):
    bad_input = copy.deepcopy(TOVA)
    bad_input["6"]["inputs"]["txt"] = "typo"
    with pytest.raises(WorkflowFormatError, match=r"node 6 \(CLIPTextEncode\): unknown inputs \['txt'\]"):
        api_to_ui(bad_input, info)
    dangling = copy.deepcopy(TOVA)
    dangling["9"]["inputs"]["vae"] = ["99", 2]
    with pytest.raises(WorkflowFormatError, match="node 99, which is not in the graph"):
        api_to_ui(dangling, info)
    with pytest.raises(WorkflowFormatError, match="integer node ids"):
        api_to_ui({"a": TOVA["1"]}, info)
