"""Test-only ComfyUI node pack: a loader that builds the seeded tiny models of ``comfy_harness/tiny_models.py``.

ComfyUI imports this folder as ``custom_nodes.<folder>`` without the repo on ``sys.path``, so the tiny-model
module is loaded by file path: from env CONCEPTSPLIT_REPO (set by ``comfy_harness.comfy_server``), else two levels
above this file's real path. V1 API on purpose: it is not shipped, and it keeps this file self-contained.
"""

import importlib.util
import os
from pathlib import Path

_REPO = Path(os.environ.get("CONCEPTSPLIT_REPO") or Path(__file__).resolve().parents[2])
_TINY_MODELS_FILE = _REPO / "comfy_harness" / "tiny_models.py"

# A private module name, so it never collides with a `comfy_harness` package elsewhere on sys.path.
_spec = importlib.util.spec_from_file_location("conceptsplit_test_helpers_tiny_models", _TINY_MODELS_FILE)
if _spec is None or _spec.loader is None:
    raise ImportError(f"cannot load {_TINY_MODELS_FILE}; set CONCEPTSPLIT_REPO to the ComfyUI-ConceptSplit repo root")
tiny_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_models)


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


NODE_CLASS_MAPPINGS = {"ConceptSplitTestTinyModelLoader": ConceptSplitTestTinyModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"ConceptSplitTestTinyModelLoader": "ConceptSplit Test Tiny Model Loader"}
