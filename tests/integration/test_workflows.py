"""Every example workflow in workflows/ is served to the template browser and runs on the real server.

A workflow is converted to an API prompt with the server's /object_info (comfy_harness/workflow_format.py), then made
cheap with the explicit substitutions below: the checkpoint loader becomes the test helper pack's tiny-model loader
(of the family in the workflow's `extra.conceptsplit.family`; a DiT family's diffusion-model, text-encoder and VAE
loaders become one Tiny DiT Loader, each link rewired to its MODEL, CLIP or VAE output), adapters become tiny random
ones with the same identifier word, LoRAs bound to a concept become tiny random kohya LoRAs for the tiny model, photo
folders get three small photos, and sizes and step counts shrink.

Z-Image and Flux.2 have model classes from ComfyUI 0.33.0 on (capability: the class in this ComfyUI's source, as
tests/integration/test_dit_server.py reads it). On a ComfyUI without the class their workflows are tested for what a
user sees there instead (NEEDS_NEWER_COMFYUI): the node types the server lacks, and the error the first run gives.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_harness.comfy_server import PACK_FOLDER
from comfy_harness.tiny_dit_models import DIT_MODEL_CLASSES, dit_families_in_source
from comfy_harness.workflow_format import node_types, ui_to_api

WORKFLOWS_DIR = Path(__file__).resolve().parents[2] / "workflows"
WORKFLOW_FILES = sorted(WORKFLOWS_DIR.glob("*.json"))
UNET_FAMILIES = ("sd15", "sd21", "sdxl")
# nodes/families names of the DiTs (flux, flux2, zimage, qwenimage); the helper pack's Tiny DiT Loader builds those
# its TINY_DITS lists and this ComfyUI has
DIT_FAMILIES = tuple(DIT_MODEL_CLASSES)
FAMILIES = UNET_FAMILIES + DIT_FAMILIES
# A DiT family whose model class this ComfyUI lacks -> what its example workflow meets there: `missing` the core node
# types the server does not have (0.3.64: Empty Flux 2 Latent arrived with Flux.2), and `run`: "missing node" (the
# server refuses the prompt, naming the missing type) or "refused" (every node exists; the model cannot be a Z-Image
# one, so the tiny loader gives a plain Lumina2, Z-Image's base class, and the pack's nodes refuse it, naming
# Z-Image and the ComfyUI version to update to).
NEEDS_NEWER_COMFYUI = {
    "zimage": dict(missing=set(), run="refused"),
    "flux2": dict(missing={"EmptyFlux2LatentImage"}, run="missing node"),
}


def family_available(family: str) -> bool:
    """Whether this ComfyUI has the family's model class (the UNet families: every supported version)."""
    from comfy_harness.comfy_bootstrap import comfyui_path

    if family not in DIT_FAMILIES:
        return True
    present = dit_families_in_source(comfyui_path())
    assert present is not None, "COMFYUI_PATH names no ComfyUI"
    return family in present


# The loaders a DiT workflow may use -> {their output slot: the Tiny DiT Loader's slot (MODEL 0, CLIP 1, VAE 2)}.
DIT_LOADER_SLOTS = {
    "UNETLoader": {0: 0},
    "CheckpointLoaderSimple": {0: 0, 1: 1, 2: 2},
    "DualCLIPLoader": {0: 1},
    "CLIPLoader": {0: 1},
    "TripleCLIPLoader": {0: 1},
    "VAELoader": {0: 2},
}

# class_type -> inputs replaced for a CPU run on tiny models (the rest of each node stays as the user gets it).
TINY_INPUTS = {
    "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
    "EmptySD3LatentImage": {"width": 64, "height": 64, "batch_size": 1},
    "EmptyFlux2LatentImage": {"width": 64, "height": 64, "batch_size": 1},
    "KSampler": {"steps": 2},
    "BasicScheduler": {"steps": 2},
    "ConceptSplitLodaSampler": {"steps": 3, "loda_steps": 1},
    "ConceptSplitLoda": {"loda_steps": 1},
    "ConceptSplitCaptureAttention": {"layers": "all"},  # the tiny models have no latent/4 cross-attention
    "ConceptSplitTrainToVA": {
        "steps": 2,
        "rank": 4,
        "resolution": 64,
        "overwrite": True,
        "save_name": "workflow_test_adapter",
    },
    "ConceptSplitLoadTrainingImages": {"resolution": 64},
}
LODA_TYPES = ("ConceptSplitLodaSampler", "ConceptSplitLoda")
# LODA needs maps of at least 7x7: latent / 4 in the tiny UNets, latent / 2 (image tokens) in the DiTs
LODA_LATENT = {"width": 112, "height": 112}
LATENT_TYPES = ("EmptyLatentImage", "EmptySD3LatentImage", "EmptyFlux2LatentImage")


def workflow_family(workflow: dict) -> str:
    family = workflow.get("extra", {}).get("conceptsplit", {}).get("family")
    assert family in FAMILIES, f"extra.conceptsplit.family must be one of {FAMILIES}, got {family!r}"
    return family


def adapter_word(adapter_name: str) -> str:
    """`dog_sd21.safetensors` -> `dog` (the naming rule of scripts/build_workflows.py)."""
    return Path(adapter_name).stem.split("_")[0]


def tiny_dit_loaders(prompt: dict, family: str, tiny_family: str | None = None) -> dict:
    """The prompt with its DiT loaders replaced by one Tiny DiT Loader (the first loader's id), links rewired."""
    loaders = [nid for nid, node in prompt.items() if node["class_type"] in DIT_LOADER_SLOTS]
    assert loaders, f"a {family} workflow without a loader of {sorted(DIT_LOADER_SLOTS)}"
    tiny = loaders[0]
    slots = {nid: DIT_LOADER_SLOTS[prompt[nid]["class_type"]] for nid in loaders}
    out = {nid: node for nid, node in prompt.items() if nid not in loaders}
    tiny_family = tiny_family or family
    out[tiny] = {"class_type": "ConceptSplitTestTinyDitLoader", "inputs": {"family": tiny_family, "seed": 0}}
    for node in out.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in slots:
                node["inputs"][name] = [tiny, slots[value[0]][value[1]]]
    return out


def tiny_prompt(
    workflow: dict, object_info: dict, serve_adapter, photo_folder, serve_lora, tiny_family: str | None = None
) -> dict:
    family = workflow_family(workflow)
    prompt = ui_to_api(workflow, object_info)
    if family in DIT_FAMILIES:
        prompt = tiny_dit_loaders(prompt, family, tiny_family)
    uses_loda = any(node["class_type"] in LODA_TYPES for node in prompt.values())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = "ConceptSplitTestTinyModelLoader", {"arch": family, "seed": 0}
            continue
        if node["class_type"] == "ConceptSplitLoadAdapter":
            inputs["adapter_name"] = serve_adapter(family, adapter_word(inputs["adapter_name"]))
        if node["class_type"] == "ConceptSplitBindLora":
            inputs["lora_name"] = serve_lora(family, adapter_word(inputs["lora_name"]))
        if node["class_type"] == "ConceptSplitLoadTrainingImages":
            inputs["folder"] = photo_folder(inputs["folder"])
        inputs.update(TINY_INPUTS.get(node["class_type"], {}))
        if uses_loda and node["class_type"] in LATENT_TYPES:
            inputs.update(LODA_LATENT)
        if node["class_type"] == "ConceptSplitCaptureAttention" and inputs.get("first_step", 0) > 0:
            inputs["first_step"] = TINY_INPUTS["ConceptSplitLodaSampler"]["loda_steps"]  # from LODA's stage 1 on
    return prompt


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def serve_adapter(comfy_server, pack, tmp_path_factory):
    """serve_adapter(family, word) -> the name of a tiny adapter in the server's models/tova (made once)."""
    from comfy_harness.tiny_adapters import write_tiny_adapter
    from comfy_harness.tiny_models import build_tiny_model

    folder, served = tmp_path_factory.mktemp("workflow_adapters"), {}

    def serve(family: str, word: str) -> str:
        if (family, word) not in served:
            model, _, _ = build_tiny_model(family, seed=0)  # the server's tiny loader builds the same weights
            path = write_tiny_adapter(
                folder / f"workflow_{family}_{word}.safetensors", model, word, seed=len(served) + 1
            )
            served[(family, word)] = comfy_server.add_model("tova", path)
        return served[(family, word)]

    return serve


@pytest.fixture(scope="module")
def serve_lora(comfy_server, pack, tmp_path_factory):
    """serve_lora(family, word) -> the name of a tiny random kohya LoRA in the server's models/loras (made once)."""
    from comfy_harness.tiny_loras import write_tiny_lora
    from comfy_harness.tiny_models import build_tiny_model

    folder, served = tmp_path_factory.mktemp("workflow_loras"), {}

    def serve(family: str, word: str) -> str:
        if (family, word) not in served:
            model, _, _ = build_tiny_model(family, seed=0)  # the server's tiny loader builds the same weights
            path = folder / f"workflow_{family}_{word}_lora.safetensors"
            write_tiny_lora(path, model, seed=len(served) + 1, kind="lora")
            served[(family, word)] = comfy_server.add_model("loras", path)
        return served[(family, word)]

    return serve


@pytest.fixture(scope="module")
def photo_folder(comfy_server):
    """photo_folder(name) -> `name`, a folder of three small photos in the server's input directory."""

    def make(name: str) -> str:
        folder = comfy_server.base_dir / "input" / name
        if not folder.is_dir():
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (72, 64), (60 * i, 120, 200 - 50 * i)).save(folder / f"photo_{i}.png")
        return name

    return make


def test_there_are_example_workflows():
    assert [p.stem for p in WORKFLOW_FILES if p.stem == "two_concepts_tova_sd21"], "workflows/ lost its main example"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=[p.stem for p in WORKFLOW_FILES])
def test_workflow_file_is_complete(path, object_info):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4 and workflow["nodes"] and workflow["links"]
    missing = node_types(workflow) - set(object_info)
    family = workflow_family(workflow)
    expected = set() if family_available(family) else NEEDS_NEWER_COMFYUI[family]["missing"]
    assert missing == expected, f"{path.name} uses node types the server does not have: {sorted(missing)}"
    assert not any(t.startswith("ConceptSplit") for t in missing)
    assert any(n["type"] in ("Note", "MarkdownNote") and n["widgets_values"][0].strip() for n in workflow["nodes"])
    workflow_family(workflow)
    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), (
        f"{path.name} has no thumbnail {thumbnail.name} (scripts/build_workflows.py --thumbnails)"
    )
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and 300 <= image.width <= 800


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=[p.stem for p in WORKFLOW_FILES])
def test_workflow_runs_to_completion_on_tiny_models(
    path, comfy_server, object_info, serve_adapter, photo_folder, serve_lora
):
    workflow = json.loads(path.read_text())
    family = workflow_family(workflow)
    if not family_available(family):
        check_needs_newer_comfyui(path, workflow, comfy_server, object_info, serve_adapter, photo_folder, serve_lora)
        return
    prompt = tiny_prompt(workflow, object_info, serve_adapter, photo_folder, serve_lora)
    entry = comfy_server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success"
    image_nodes = [nid for nid, node in prompt.items() if node["class_type"] in ("SaveImage", "PreviewImage")]
    assert image_nodes, "an example workflow must show its result"
    for nid in image_nodes:
        images = comfy_server.output_images(entry, nid)
        assert images and all(img.width >= 64 and img.height >= 64 for img in images), f"node {nid}"
    for nid, node in prompt.items():
        if node["class_type"] == "ConceptSplitAttentionViewer" and "concept_masks" in node["inputs"]:
            check_mask_shares(entry["outputs"][nid]["text"][0])


def check_needs_newer_comfyui(path, workflow, comfy_server, object_info, serve_adapter, photo_folder, serve_lora):
    """A DiT workflow on a ComfyUI without its family's model class: what the user sees (NEEDS_NEWER_COMFYUI)."""
    family = workflow_family(workflow)
    expect = NEEDS_NEWER_COMFYUI[family]
    if expect["run"] == "missing node":
        # the workflow's own API graph (scripts/build_workflows.py; the same node types as the file) as queued
        from test_workflow_format import build_workflows_module

        graph = build_workflows_module().WORKFLOWS[path.stem].build()
        assert {n["class_type"] for n in graph.values()} == node_types(workflow)
        message = comfy_server.run_expect_error(graph)
        (missing,) = expect["missing"]  # the server stops at the first node type it lacks
        assert message.splitlines()[0] == f"Cannot execute because node {missing} does not exist.", message
        return
    # every node type exists: the tiny loader's plain Lumina2 stands in for the model, and the pack refuses it
    prompt = tiny_prompt(workflow, object_info, serve_adapter, photo_folder, serve_lora, tiny_family="lumina2")
    message = comfy_server.run_expect_error(prompt, timeout=300)
    assert message.split(" (node ")[0].startswith("ConceptSplit"), message  # a ConceptSplit node stopped the run
    assert "ConceptSplit supports" in message and "a Lumina2 model" in message, message
    assert "Z-Image" in message.split("models only", 1)[1] and "update ComfyUI to 0.33.0" in message, message


def check_mask_shares(report: str) -> None:
    """A viewer given LODA's masks reports each word's attention share inside its own mask, and attention fixing
    (which ran in the captured steps: Capture Attention's first_step = LODA's stage-1 steps) put the word's attention
    there: boost +5 inside the own mask and -1e8 for the other words. On the tiny DiTs (masks of 5 of 49 cells) the
    shares are 0.82-0.93 with fixing and 0.09-0.18 without (tests/integration/test_dit_server.py); 0.5 separates them.
    """
    header = "Attention inside each word's own mask"
    assert header in report, report
    rows = report.split(header, 1)[1].splitlines()[2:]
    rows = rows[: next(i for i, row in enumerate(rows) if row.startswith("share:"))]
    assert len(rows) >= 2, report
    for row in rows:
        _, share, area = row.split()
        assert float(share) > 0.5 > float(area), row


def test_template_browser_lists_and_serves_every_workflow(comfy_server):
    # every version lists every workflow, the 0.33.0-only ones too: their Notes name the ComfyUI they need, and the
    # tests above check what opening and running them gives where it is older
    listed = comfy_server._get("/workflow_templates")
    assert sorted(listed.get(PACK_FOLDER, [])) == sorted(p.stem for p in WORKFLOW_FILES)
    for path in WORKFLOW_FILES:
        url = f"{comfy_server.url}/api/workflow_templates/{PACK_FOLDER}/{path.name}"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert json.loads(response.read()) == json.loads(path.read_text())


BOUND_LORA_WORKFLOWS = [p for p in WORKFLOW_FILES if "ConceptSplitBindLora" in node_types(json.loads(p.read_text()))]


def test_there_is_a_bound_lora_workflow():
    assert [p.stem for p in BOUND_LORA_WORKFLOWS] == ["bound_loras_sdxl"]


@pytest.mark.parametrize("path", BOUND_LORA_WORKFLOWS, ids=[p.stem for p in BOUND_LORA_WORKFLOWS])
def test_bound_lora_workflow_applies_its_loras(
    path, comfy_server, object_info, serve_adapter, photo_folder, serve_lora
):
    """The served LoRAs act: the info text names each binding with patches, and the saved image differs from the
    same graph with every Bind LoRA at strength 0 (which the pack documents as the model unchanged)."""
    prompt = tiny_prompt(json.loads(path.read_text()), object_info, serve_adapter, photo_folder, serve_lora)
    binds = {nid: node["inputs"] for nid, node in prompt.items() if node["class_type"] == "ConceptSplitBindLora"}
    assert sorted(inputs["concept_word"] for inputs in binds.values()) == ["cat", "dog"]
    (info_node,) = [nid for nid, node in prompt.items() if node["class_type"] == "PreviewAny"]
    (save_node,) = [nid for nid, node in prompt.items() if node["class_type"] == "SaveImage"]

    entry = comfy_server.run(prompt, timeout=300)
    info = "\n".join(entry["outputs"][info_node]["text"])
    for inputs in binds.values():
        (line,) = [ln for ln in info.splitlines() if f'-> "{inputs["concept_word"]}"' in ln]
        assert line.startswith(inputs["lora_name"]), info
        image_side = int(line.split(": ", 1)[1].split(" image-side")[0])
        assert image_side > 0, info
    patched = np.asarray(comfy_server.output_images(entry, save_node)[0].convert("RGB"), dtype=np.int16)

    for nid in binds:
        prompt[nid]["inputs"]["strength"] = 0.0
    entry = comfy_server.run(prompt, timeout=300)
    assert "unchanged" in "\n".join(entry["outputs"][info_node]["text"])
    plain = np.asarray(comfy_server.output_images(entry, save_node)[0].convert("RGB"), dtype=np.int16)
    assert patched.shape == plain.shape
    # Same seed, same graph: with strength 0 the model is the unpatched one (bit-identical, tested elsewhere), so the
    # images differ only through the LoRAs; more than one 8-bit level rules out a rounding flip. The tiny random
    # LoRAs (magnitude-1 factors on every transformer and resnet layer) move pixels by tens of levels (seen: max 60).
    assert np.abs(patched - plain).max() > 1, "the bound LoRAs did not change the image"
