"""Issue 11, items 1-3, through the real server: a damaged adapter (alpha NaN/Inf/1e38, weights too large), a rank-0 or
mis-shaped adapter, and NaN or out-of-range numbers in any node's inputs (typed into an API-format prompt, or linked
from a primitive node, which ComfyUI does not range-check) each fail with the pack's message, before anything is
sampled, trained or saved; the server goes on answering. And the largest values the pack accepts give finite latents.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfy_harness.tiny_adapters import write_tiny_adapter
from comfy_harness.tiny_models import build_tiny_model
from comfy_harness.loda_settings import LODA_NODE_SETTINGS

PROMPT = "a photo of a dog and a cat"
NAN = float("nan")
LODA_SETTINGS = dict(LODA_NODE_SETTINGS, concept_words="dog, cat", loda_steps=1)


def tova_graph(dog: str, cat: str, strength=1.0, prefix="damaged") -> dict:
    """tiny SD1.5 -> Load ToVA Adapter x2 -> Apply ToVA -> KSampler -> VAEDecode -> SaveImage, SaveLatent."""
    return {
        "1": {"class_type": "ConceptSplitTestTinyModelLoader", "inputs": {"arch": "sd15", "seed": 0}},
        "2": {
            "class_type": "ConceptSplitLoadAdapter",
            "inputs": {"adapter_name": dog, "identifier_word": "", "strength": strength, "role": "from file"},
        },
        "3": {
            "class_type": "ConceptSplitLoadAdapter",
            "inputs": {
                "adapter_name": cat,
                "identifier_word": "",
                "strength": strength,
                "role": "from file",
                "adapters": ["2", 0],
            },
        },
        "4": {
            "class_type": "ConceptSplitApplyToVA",
            "inputs": {"model": ["1", 0], "adapters": ["3", 0], "clip": ["1", 1], "text": PROMPT},
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
                "seed": 0,
                "steps": 3,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"latents/{prefix}"}},
    }


def rewrite(path, tensors_edit=None, **metadata):
    """Rewrite an adapter file in place: tensors through `tensors_edit(dict)`, metadata strings overridden."""
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = dict(handle.metadata() or {})
    if tensors_edit is not None:
        tensors_edit(tensors)
    meta.update({f"conceptsplit.{key}": value for key, value in metadata.items()})
    save_file(tensors, str(path), metadata=meta)


def scale_all(factor):
    def edit(tensors):
        for key in tensors:
            tensors[key] = tensors[key] * factor

    return edit


def rank_zero(tensors):
    for key in list(tensors):
        shape = list(tensors[key].shape)
        shape[0 if "lora_A" in key else 1] = 0
        tensors[key] = torch.zeros(shape)


def mismatched(tensors):
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)


# case -> (official format?, tensors edit, metadata overrides, failing node, message fragments)
DAMAGED = {
    "alpha nan": (
        False,
        None,
        {"alpha": "nan"},
        "ConceptSplitLoadAdapter",
        ["has an invalid alpha", "conceptsplit.alpha = 'nan'", "finite positive number"],
    ),
    "alpha inf": (
        False,
        None,
        {"alpha": "inf"},
        "ConceptSplitLoadAdapter",
        ["has an invalid alpha", "conceptsplit.alpha = 'inf'"],
    ),
    # alpha 1e38 (scale 2.5e37): scale·B·A ~ 2e38 still fits float32, so Apply ToVA refuses it by its size ...
    "alpha 1e38": (
        False,
        None,
        {"alpha": "1e38"},
        "ConceptSplitApplyToVA",
        ["times the layer's own weight", "1 · 2.5e+37 ·", "at most 1000 times"],
    ),
    # ... and alpha 1e39 overflows float32 already when the file is read
    "alpha 1e39": (
        False,
        None,
        {"alpha": "1e39"},
        "ConceptSplitLoadAdapter",
        ["too large to compute with: its delta overflows float32", "scale alpha/rank = 2.5e+38"],
    ),
    "weights x1e30": (False, scale_all(1e30), {}, "ConceptSplitLoadAdapter", ["overflows float32"]),
    "official weights x1e30": (True, scale_all(1e30), {}, "ConceptSplitLoadAdapter", ["overflows float32"]),
    # x1e6 on A and B: B·A x1e12 stays finite in float32, but dwarfs the model's own to_v weight
    "weights x1e6": (
        False,
        scale_all(1e6),
        {},
        "ConceptSplitApplyToVA",
        ["times the layer's own weight", "to_v weight", "at most 1000 times"],
    ),
    "official rank 0": (True, rank_zero, {}, "ConceptSplitLoadAdapter", ["has an empty layer", "(0, 32)"]),
    "native rank 0": (
        False,
        rank_zero,
        {"rank": "0"},
        "ConceptSplitLoadAdapter",
        ["metadata conceptsplit.rank is out of range", "at least 1"],
    ),
    "A and B mismatched": (True, mismatched, {}, "ConceptSplitLoadAdapter", ["has mis-shaped tensors"]),
}


@pytest.fixture(scope="module")
def good_adapters(comfy_server, tmp_path_factory):
    """An intact dog and cat adapter for the tiny SD1.5 the server loads (seed 0)."""
    folder = tmp_path_factory.mktemp("damaged_good")
    model, _, _ = build_tiny_model("sd15", seed=0)
    return {
        word: comfy_server.add_model(
            "tova", write_tiny_adapter(folder / f"intact_{word}.safetensors", model, word, seed=seed)
        )
        for word, seed in (("dog", 1), ("cat", 2))
    }


def written(server) -> dict[str, int]:
    """Every file under the server's output and models/tova folders, with its size."""
    found = {}
    for folder in (server.base_dir / "output", server.base_dir / "models" / "tova"):
        if folder.is_dir():
            found.update({str(p): p.stat().st_size for p in folder.rglob("*") if p.is_file()})
    return found


def expect_refusal(server, graph, node_type: str, fragments) -> str:
    before = written(server)
    message = server.run_expect_error(graph)
    assert message.startswith(node_type), message  # raised by that node: nothing downstream (sampler, save) ran
    for fragment in fragments:
        assert fragment in message, message
    assert "Seen:" in message and "Expected:" in message and "Fix:" in message
    assert written(server) == before  # nothing saved, no adapter or temp file left
    assert server._get("/queue") == {"queue_running": [], "queue_pending": []}  # the server goes on
    return message


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_adapter_is_refused_before_sampling(comfy_server, good_adapters, tmp_path, case):
    official, edit, metadata, node_type, fragments = DAMAGED[case]
    model, _, _ = build_tiny_model("sd15", seed=0)
    name = "damaged_" + case.replace(" ", "_") + ".safetensors"
    path = write_tiny_adapter(tmp_path / name, model, "dog", seed=1, official=official)
    rewrite(path, edit, **metadata)
    graph = tova_graph(comfy_server.add_model("tova", path), good_adapters["cat"])
    if official:
        graph["2"]["inputs"]["identifier_word"] = "dog"
    expect_refusal(comfy_server, graph, node_type, fragments)


def loda_graph(**overrides) -> dict:
    return {
        "1": {"class_type": "ConceptSplitTestTinyModelLoader", "inputs": {"arch": "sd15", "seed": 0}},
        "2": {"class_type": "ConceptSplitTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 112, "height": 112, "batch_size": 1}},
        "5": {
            "class_type": "ConceptSplitLodaSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": 0,
                "steps": 3,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
                **LODA_SETTINGS,
                **overrides,
            },
        },
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/loda_bad"}},
    }


def viewer_graph(alpha=0.5, first_step=0) -> dict:
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
                "first_step": first_step,
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
                "seed": 0,
                "steps": 2,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "7": {
            "class_type": "ConceptSplitAttentionViewer",
            "inputs": {"capture": ["4", 1], "samples": ["6", 0], "alpha": alpha, "colormap": "inferno"},
        },
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "viewer_bad"}},
    }


def training_graph(learning_rate=1e-3, steps=2) -> dict:
    return {
        "1": {"class_type": "ConceptSplitTestTinyModelLoader", "inputs": {"arch": "sd21", "seed": 0}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 3, "color": 0x806040}},
        "3": {
            "class_type": "ConceptSplitTrainToVA",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "vae": ["1", 2],
                "images": ["2", 0],
                "identifier_word": "dog",
                "steps": steps,
                "learning_rate": learning_rate,
                "rank": 4,
                "seed": 0,
                "resolution": 64,
                "save_name": "number_check",
                "overwrite": False,
                "checkpoint_every": 0,
                "resume": False,
            },
        },
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 1], "filename_prefix": "training_bad"}},
    }


def linked(graph: dict, node: str, name: str, primitive: str, value) -> dict:
    """Feed `name` of `node` from a PrimitiveFloat/PrimitiveInt: ComfyUI range-checks only typed-in values."""
    graph["90"] = {"class_type": primitive, "inputs": {"value": value}}
    graph[node]["inputs"][name] = ["90", 0]
    return graph


# case -> (graph builder, failing node, message fragments)
NUMBERS = {
    "strength nan": (
        lambda good: tova_graph(good["dog"], good["cat"], strength=NAN),
        "ConceptSplitLoadAdapter",
        ["Load ToVA Adapter input strength is not a finite number", "Seen: nan", "a finite number from -4 to 4"],
    ),
    "strength linked 100": (
        lambda good: linked(tova_graph(good["dog"], good["cat"]), "2", "strength", "PrimitiveFloat", 100.0),
        "ConceptSplitLoadAdapter",
        ["Load ToVA Adapter input strength is out of range", "Seen: 100.0"],
    ),
    # (an Inf typed into PrimitiveFloat is refused by ComfyUI itself: inf > its max; NaN passes and is forwarded)
    "strength linked nan": (
        lambda good: linked(tova_graph(good["dog"], good["cat"]), "2", "strength", "PrimitiveFloat", NAN),
        "ConceptSplitLoadAdapter",
        ["strength is not a finite number", "Seen: nan"],
    ),
    "token_index linked 100000": (
        lambda good: linked(tova_graph(good["dog"], good["cat"]), "2", "token_index", "PrimitiveInt", 100000),
        "ConceptSplitLoadAdapter",
        ["Load ToVA Adapter input token_index is out of range", "an integer from -1 to 615"],
    ),
    "loda cfg nan": (
        lambda good: loda_graph(cfg=NAN),
        "ConceptSplitLodaSampler",
        ["LODA Sampler input cfg is not a finite number"],
    ),
    "loda kl_threshold nan": (
        lambda good: loda_graph(kl_threshold=NAN),
        "ConceptSplitLodaSampler",
        ["LODA Sampler input kl_threshold is not a finite number"],
    ),
    "loda step_scale linked 1e9": (
        lambda good: linked(loda_graph(), "5", "step_scale", "PrimitiveFloat", 1e9),
        "ConceptSplitLodaSampler",
        ["LODA Sampler input step_scale is out of range", "from 0 to 200"],
    ),
    "loda steps linked 0": (
        lambda good: linked(loda_graph(), "5", "steps", "PrimitiveInt", 0),
        "ConceptSplitLodaSampler",
        ["LODA Sampler input steps is out of range"],
    ),
    "viewer alpha nan": (
        lambda good: viewer_graph(alpha=NAN),
        "ConceptSplitAttentionViewer",
        ["Attention Map Viewer input alpha is not a finite number", "from 0 to 1"],
    ),
    "capture first_step linked -5": (
        lambda good: linked(viewer_graph(), "4", "first_step", "PrimitiveInt", -5),
        "ConceptSplitCaptureAttention",
        ["Capture Attention input first_step is out of range"],
    ),
    "training learning_rate nan": (
        lambda good: training_graph(learning_rate=NAN),
        "ConceptSplitTrainToVA",
        ["Train ToVA Adapter input learning_rate is not a finite number"],
    ),
    "training steps linked 0": (
        lambda good: linked(training_graph(), "3", "steps", "PrimitiveInt", 0),
        "ConceptSplitTrainToVA",
        ["Train ToVA Adapter input steps is out of range"],
    ),
}


@pytest.mark.parametrize("case", list(NUMBERS))
def test_nan_and_out_of_range_numbers_are_refused_before_anything_runs(comfy_server, good_adapters, case):
    build, node_type, fragments = NUMBERS[case]
    expect_refusal(comfy_server, build(good_adapters), node_type, fragments)


def test_the_widget_limits_give_finite_latents(comfy_server, good_adapters):
    """Strength at both ends of its widget (±4) is accepted and samples finite latents; 0 is the plain model."""
    from safetensors.torch import load_file

    latents = {}
    for strength in (4.0, -4.0, 0.0):
        prefix = f"limits_{strength:+g}".replace("+", "p").replace("-", "m")
        entry = comfy_server.run(tova_graph(good_adapters["dog"], good_adapters["cat"], strength, prefix))
        info = entry["outputs"]["10"]["latents"][0]
        latent = load_file(str(comfy_server.base_dir / "output" / info["subfolder"] / info["filename"]))
        latents[strength] = latent["latent_tensor"]
        assert bool(torch.isfinite(latents[strength]).all()), strength
    # the adapters act at ±4 (not silently dropped); 1e-2 is far above float32 noise of a 3-step tiny run (~1e-6)
    assert (latents[4.0] - latents[0.0]).abs().max() > 1e-2 and (latents[-4.0] - latents[0.0]).abs().max() > 1e-2
