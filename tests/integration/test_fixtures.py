"""The test fixtures themselves: tiny models (recipe A), the tiny checkpoint (recipe B), the server (recipe C).

Everything else in tests/integration builds on these, so each promise in comfy_harness/ is checked with numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from comfy_harness.tiny_models import CONTEXT_WIDTHS, TINY_ARCHS

EXPECTED_MODEL_TYPE = {"sd15": "EPS", "sd21": "V_PREDICTION", "sdxl": "EPS"}
SIZE = 64  # image side; latent side is SIZE / 8


def _encode(clip, text):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def _sample(model, clip, seed, steps=3):
    import nodes

    latent = nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
    out = nodes.KSampler().sample(
        model, seed, steps, 7.0, "euler", "normal", _encode(clip, "a photo of a dog"), _encode(clip, ""), latent
    )
    return out[0]["samples"]


def _api_graph(loader: dict, steps: int = 3, seed: int = 1) -> dict:
    """Loader node "1" (outputs MODEL, CLIP, VAE) -> encode x2 -> KSampler -> VAEDecode -> SaveImage "7"."""
    return {
        "1": loader,
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a dog"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "conceptsplit_test"}},
    }


def _tiny_loader(arch: str, seed: int = 0) -> dict:
    return {"class_type": "ConceptSplitTestTinyModelLoader", "inputs": {"arch": arch, "seed": seed}}


# -- recipe A: tiny models in process -------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_builds_with_expected_layout(comfyui, arch):
    from comfy_harness.tiny_models import build_tiny_model

    model, clip, vae = build_tiny_model(arch)  # no timing assert: speed is measured in bench/, never by a test
    assert model.model.model_type.name == EXPECTED_MODEL_TYPE[arch]
    assert model.model.model_config.unet_config["context_dim"] == CONTEXT_WIDTHS[arch]
    cond = _encode(clip, "a photo of a dog")
    assert tuple(cond[0][0].shape) == (1, 77, CONTEXT_WIDTHS[arch])
    if arch == "sdxl":
        assert tuple(cond[0][1]["pooled_output"].shape) == (1, 64)
    # No parameter may be left as torch.empty garbage, and norm scales must be 1 (a 0 scale silences the UNet).
    for module in (model.model, clip.cond_stage_model, vae.first_stage_model):
        assert all(torch.isfinite(p).all() for p in module.parameters())
    norm_scales = [p for n, p in model.model.diffusion_model.named_parameters() if "norm" in n and n.endswith("weight")]
    assert norm_scales and all(bool((p == 1).all()) for p in norm_scales)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_samples_and_decodes_under_inference_mode(comfyui, arch):
    import nodes

    from comfy_harness.tiny_models import build_tiny_model

    # The executor builds and runs everything under inference mode; so do we.
    with torch.inference_mode():
        model, clip, vae = build_tiny_model(arch)
        latent_1 = _sample(model, clip, seed=1)
        latent_2 = _sample(model, clip, seed=2)
        image = nodes.VAEDecode().decode(vae, {"samples": latent_1})[0]
    assert tuple(latent_1.shape) == (1, 4, SIZE // 8, SIZE // 8)
    assert torch.isfinite(latent_1).all() and latent_1.std() > 0
    assert not torch.equal(latent_1, latent_2), "the sampler seed must change the latent"
    assert tuple(image.shape) == (1, SIZE, SIZE, 3)
    assert image.min() >= 0.0 and image.max() <= 1.0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_same_seed_gives_bit_identical_weights(comfyui, arch):
    from comfy_harness.tiny_models import build_tiny_model

    def weights(seed):
        model, clip, vae = build_tiny_model(arch, seed=seed)
        return [t for m in (model.model, clip.cond_stage_model, vae.first_stage_model) for t in m.state_dict().values()]

    first, again, other = weights(0), weights(0), weights(1)
    assert len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other)), "a different seed must change the weights"


@pytest.mark.parametrize("tiny_model", ["sd21"], indirect=True)
def test_tiny_model_fixture_is_parametrizable(tiny_model):
    model, _, _ = tiny_model
    assert model.model.model_type.name == "V_PREDICTION"


def test_bootstrap_imports_comfyuis_nodes(comfyui):
    assert Path(sys.modules["nodes"].__file__).resolve() == comfyui / "nodes.py"
    assert sys.path.index(str(comfyui)) < min(
        (i for i, e in enumerate(sys.path) if Path(e or ".").resolve() == Path(__file__).resolve().parents[2]),
        default=len(sys.path),
    ), "the repo root must never come before ComfyUI's root on sys.path"


def test_load_pack_in_process_uses_comfyuis_loader(comfyui, tmp_path):
    import nodes

    from comfy_harness.comfy_bootstrap import REPO_ROOT, load_pack_in_process

    module = load_pack_in_process()
    assert Path(module.__file__).resolve() == REPO_ROOT / "__init__.py"
    assert load_pack_in_process() is module, "loading twice must not re-import the pack"
    # comfy_extras/nodes_images.py imports ComfyUI's `server`, which needs its top-level `utils` package.
    assert "ImageCrop" in nodes.NODE_CLASS_MAPPINGS
    with pytest.raises(RuntimeError, match="No pack to load"):
        load_pack_in_process(tmp_path)


# -- recipe B: the real checkpoint loader -------------------------------------------------------------


def test_tiny_checkpoint_loads_as_sd15_and_samples(tiny_sd15_checkpoint):
    import comfy.sd
    import comfy.supported_models

    size_mb = tiny_sd15_checkpoint.stat().st_size / 1e6
    assert 250 < size_mb < 320, f"tiny checkpoint is {size_mb:.0f} MB; the module docstring promises ~285 MB"
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_checkpoint))
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert model.model.model_type.name == "EPS"
    assert vae is not None and vae.first_stage_model is not None, "the loader found no VAE weights"
    with torch.inference_mode():
        assert tuple(_encode(clip, "a dog")[0][0].shape) == (1, 77, 768)
        latent = _sample(model, clip, seed=1, steps=2)
    assert torch.isfinite(latent).all() and latent.std() > 0


def test_tiny_checkpoint_through_checkpoint_loader_node(comfy_server, tiny_sd15_checkpoint):
    name = comfy_server.add_model("checkpoints", tiny_sd15_checkpoint)
    graph = _api_graph({"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}, steps=2)
    images = comfy_server.output_images(comfy_server.run(graph), "7")
    assert [im.size for im in images] == [(SIZE, SIZE)]


# -- recipe C: the real server ---------------------------------------------------------------------------


def test_server_registers_helper_pack_and_imports_it_cleanly(comfy_server):
    info = comfy_server.object_info("ConceptSplitTestTinyModelLoader")["ConceptSplitTestTinyModelLoader"]
    assert info["python_module"] == "custom_nodes.conceptsplit_test_helpers"
    assert list(info["input"]["required"]["arch"][0]) == list(TINY_ARCHS)
    assert info["output"] == ["MODEL", "CLIP", "VAE"]
    # Core nodes come from ComfyUI's own nodes.py, not from the pack's nodes/ package.
    assert comfy_server.object_info("KSampler")["KSampler"]["python_module"] == "nodes"
    log = comfy_server.log_text()
    loaded = [line for line in log.splitlines() if "seconds" in line and "conceptsplit_test_helpers" in line]
    assert len(loaded) == 1 and "IMPORT FAILED" not in loaded[0], loaded


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_server_runs_tiny_workflow_to_a_png(comfy_server, arch):
    entry = comfy_server.run(_api_graph(_tiny_loader(arch)))
    assert entry["status"]["status_str"] == "success"
    images = comfy_server.output_images(entry, "7")
    assert [(im.format, im.size) for im in images] == [("PNG", (SIZE, SIZE))]


def test_server_reports_validation_and_execution_errors(comfy_server):
    invalid = _api_graph(_tiny_loader("sd99"))
    assert "'sd99' not in" in comfy_server.run_expect_error(invalid)
    # An sd15 text encoder (width 32) feeding an SDXL UNet (context 96) passes validation and fails in attention.
    mismatched = _api_graph(_tiny_loader("sdxl"))
    mismatched["8"] = _tiny_loader("sd15")
    for node_id in ("2", "3"):
        mismatched[node_id]["inputs"]["clip"] = ["8", 1]
    message = comfy_server.run_expect_error(mismatched)
    assert message.startswith("KSampler (node 5):"), message
