"""Fixtures for tests that run the pack inside a real ComfyUI process (loaded by ComfyUI's own loader)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))  # tova_reference.py and other test helpers


class PackModules:
    """The pack as ComfyUI loaded it: `pack.core("adapter_file")`, `pack.glue("comfy_text")`.

    Its classes (ConceptSplitError included) are the ones the nodes raise, not those of a second import of
    `conceptsplit_core` from the repo root.
    """

    def __init__(self, module):
        self.module = module
        self.name = module.__name__

    def core(self, name: str):
        return importlib.import_module(f"{self.name}.conceptsplit_core.{name}")

    def glue(self, name: str):
        return importlib.import_module(f"{self.name}.nodes.{name}")

    def family(self, model):
        """The model family (nodes/families) of a MODEL."""
        return self.glue("families").model_family(model)

    def layout(self, model):
        """The ModelLayout of a MODEL, as its family builds it."""
        return self.family(model).layout(model)

    @property
    def error(self):
        return self.core("errors").ConceptSplitError


@pytest.fixture(scope="session")
def pack(comfyui) -> PackModules:
    from comfy_harness.comfy_bootstrap import load_pack_in_process

    return PackModules(load_pack_in_process())


def _registered_folder(kind: str, tmp_path):
    """A fresh folder registered first in ComfyUI's `kind` model folder list, removed again afterwards."""
    import folder_paths

    folder = tmp_path / kind
    folder.mkdir()
    paths = folder_paths.folder_names_and_paths[kind][0]
    paths.insert(0, str(folder))
    folder_paths.filename_list_cache.clear()
    yield folder
    paths.remove(str(folder))
    folder_paths.filename_list_cache.clear()


@pytest.fixture
def tova_folder(pack, tmp_path):
    """A fresh folder registered as ComfyUI's `tova` model folder for this test."""
    yield from _registered_folder("tova", tmp_path)


@pytest.fixture
def loras_folder(pack, tmp_path):
    """A fresh folder registered first in ComfyUI's `loras` folder list for this test."""
    yield from _registered_folder("loras", tmp_path)


def sample(
    model,
    clip,
    positive_text="a dog and a cat",
    negative_text="",
    seed=0,
    steps=3,
    cfg=7.0,
    batch=1,
    positive=None,
    sampler="euler",
    size=64,
):
    """KSampler exactly as the node runs it, under inference mode like ComfyUI's executor. Returns (B, 4, h, w)."""
    import nodes

    with torch.inference_mode():
        if positive is None:
            positive = nodes.CLIPTextEncode().encode(clip, positive_text)[0]
        negative = nodes.CLIPTextEncode().encode(clip, negative_text)[0]
        latent = nodes.EmptyLatentImage().generate(size, size, batch)[0]
        return nodes.common_ksampler(model, seed, steps, cfg, sampler, "normal", positive, negative, latent)[0][
            "samples"
        ].clone()
