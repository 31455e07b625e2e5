"""Test-only ComfyUI node pack: loaders that build the seeded tiny models of ``comfy_harness/tiny_models.py`` (SD1.5,
SD2.1, SDXL) and of ``comfy_harness/tiny_dit_models.py`` with a VAE of ``comfy_harness/tiny_dit_vaes.py`` (DiTs).

ComfyUI imports this folder as ``custom_nodes.<folder>`` without the repo on ``sys.path``, so the tiny-model
modules are loaded by file path: from env CONCEPTSPLIT_REPO (set by ``comfy_harness.comfy_server``), else two levels
above this file's real path. V1 API on purpose: it is not shipped, and it keeps this file self-contained.
"""

import importlib.util
import os
from pathlib import Path

_REPO = Path(os.environ.get("CONCEPTSPLIT_REPO") or Path(__file__).resolve().parents[2])


def _load(name: str):
    """comfy_harness/<name>.py under a private module name, so it never collides with a `comfy_harness` package
    elsewhere on sys.path."""
    path = _REPO / "comfy_harness" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"conceptsplit_test_helpers_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}; set CONCEPTSPLIT_REPO to the ComfyUI-ConceptSplit repo root")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_models = _load("tiny_models")
tiny_dit_models = _load("tiny_dit_models")
tiny_dit_vaes = _load("tiny_dit_vaes")

# DiT family (nodes/families) -> (its builder in tiny_dit_models, the latent format of its VAE in tiny_dit_vaes).
# A new family is one line here; the loader offers the families this ComfyUI has (available_dit_families).
TINY_DITS = {
    "flux": ("build_tiny_flux", "flux16"),
    "qwenimage": ("build_tiny_qwenimage", "wan21"),
    "flux2": ("build_tiny_flux2", "flux2"),
    "zimage": ("build_tiny_zimage", "flux16"),
}
# Models no family of the pack describes, offered on every version: "lumina2" is a plain Lumina2 (Z-Image's base
# class, what a ComfyUI without Z-Image knows of that architecture) with the tiny Flux.1 CLIP (a ComfyUI without
# Z-Image has no Qwen3 text encoder either) and a Flux VAE: it exercises the pack's refusal, nothing else.
TINY_STAND_INS = {"lumina2": "build_tiny_lumina2"}


class ConceptSplitTestTinyModelLoader:
    """Seeded tiny MODEL/CLIP/VAE (recipe A); built fresh per execution, ComfyUI caches node outputs itself."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "arch": (list(tiny_models.TINY_ARCHS), {"default": "sd15"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            },
            "optional": {  # 1.0 = the plain seeded model; tiny_models.SHARPEN_FACTORS gives maps far from flat
                "attn2_qk_scale": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 100.0, "step": 0.01}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "ConceptSplit/testing"
    DESCRIPTION = (
        "Test only: random tiny SD1.5 / SD2.1 (v-pred) / SDXL models with real layer names; "
        "attn2_qk_scale multiplies the cross-attention q and k weights (sharper attention)."
    )

    def load(self, arch, seed, attn2_qk_scale=1.0):
        model, clip, vae = tiny_models.build_tiny_model(arch, seed)
        if attn2_qk_scale != 1.0:
            tiny_models.sharpen_cross_attention(model, attn2_qk_scale)
        return model, clip, vae


def tiny_dit_families() -> list:
    """The TINY_DITS families whose model class this ComfyUI has, in TINY_DITS order."""
    present = set(tiny_dit_models.available_dit_families())
    return [name for name in TINY_DITS if name in present]


def tiny_dit_choices() -> list:
    """The loader's `family` choices: this ComfyUI's TINY_DITS families, then the TINY_STAND_INS."""
    return tiny_dit_families() + list(TINY_STAND_INS)


class ConceptSplitTestTinyDitLoader:
    """Seeded tiny DiT MODEL and CLIP (comfy_harness/tiny_dit_models.py) and a tiny VAE of the family's latent
    format (comfy_harness/tiny_dit_vaes.py): what UNETLoader + the CLIP loader + VAELoader give a user."""

    @classmethod
    def INPUT_TYPES(cls):
        families = tiny_dit_choices()
        return {
            "required": {
                "family": (families, {"default": families[0]}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            }
        }

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "ConceptSplit/testing"
    DESCRIPTION = (
        "Test only: random tiny DiT models (Flux.1, Qwen-Image, ...) with ComfyUI's own classes; lumina2: a plain "
        "Lumina2 model the pack refuses."
    )

    def load(self, family, seed):
        if family not in tiny_dit_choices():
            raise ValueError(f"no tiny {family!r} model in this ComfyUI; choose one of {tiny_dit_choices()}")
        if family in TINY_STAND_INS:
            model = getattr(tiny_dit_models, TINY_STAND_INS[family])(seed)
            _, clip = tiny_dit_models.build_tiny_flux(seed)
            return model, clip, tiny_dit_vaes.TINY_DIT_VAES["flux16"](seed)
        builder, latent_format = TINY_DITS[family]
        model, clip = getattr(tiny_dit_models, builder)(seed)
        return model, clip, tiny_dit_vaes.TINY_DIT_VAES[latent_format](seed)


NODE_CLASS_MAPPINGS = {
    "ConceptSplitTestTinyModelLoader": ConceptSplitTestTinyModelLoader,
    "ConceptSplitTestTinyDitLoader": ConceptSplitTestTinyDitLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConceptSplitTestTinyModelLoader": "ConceptSplit Test Tiny Model Loader",
    "ConceptSplitTestTinyDitLoader": "ConceptSplit Test Tiny DiT Loader",
}
