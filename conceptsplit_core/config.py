"""ToVA defaults and widget ranges (method §2, §6). Nodes read their defaults from here so UI and algorithm agree."""

from __future__ import annotations

from dataclasses import dataclass

from .widgets import WidgetRange

# Model families the pack knows (method §2.2). The key is what adapter metadata stores in `conceptsplit.base_model`
# after the optional "-v" suffix is removed.
FAMILY_SD15 = "sd1.5"
FAMILY_SD21 = "sd2.1"
FAMILY_SDXL = "sdxl"
FAMILIES = (FAMILY_SD15, FAMILY_SD21, FAMILY_SDXL)
FAMILY_DISPLAY = {FAMILY_SD15: "SD1.5", FAMILY_SD21: "SD2.1", FAMILY_SDXL: "SDXL"}
# Text feature width d of the full-size models (method §0); used to name the family of a file without metadata.
FAMILY_TEXT_WIDTH = {FAMILY_SD15: 768, FAMILY_SD21: 1024, FAMILY_SDXL: 2048}

ROLE_OBJECT = "object"  # ToVA + LODA + attention fixing (method §5)
ROLE_BACKGROUND = "background"  # ToVA only (method §5)
ROLES = (ROLE_OBJECT, ROLE_BACKGROUND)
ROLE_FROM_FILE = "from file"  # node choice: the role stored in the adapter's metadata (object for official files)

PREDICTION_EPS = "eps"
PREDICTION_V = "v"
PREDICTION_FLOW = "flow"  # flow matching (ComfyUI's CONST: x_σ = (1 − σ)·x0 + σ·ε), the DiT families


@dataclass(frozen=True)
class ToVAConfig:
    """Inference-time ToVA settings (method §2.1, §2.3)."""

    strength: float = 1.0  # λ_k multiplier on alpha/r; 1.0 = the paper (method §2.1); useful range 0..1.5
    apply_to_uncond: bool = True  # add the delta in the unconditional CFG branch too, as the official code does (§2.3)


TOVA_DEFAULTS = ToVAConfig()

TOKEN_INDEX_AUTO = -1  # "find the identifier word in the prompt" (method §2.4)
TOKEN_INDEX_MAX = 77 * 8 - 1  # ComfyUI allows long prompts as several 77-token windows

# Widget ranges of the ToVA nodes; "recommended" is what the tooltip tells the user.
UI_RANGES: dict[str, WidgetRange] = {
    "strength": WidgetRange(-4.0, 4.0, 0.05, "0.0 to 1.5; 1.0 reproduces the paper"),
    "token_index": WidgetRange(TOKEN_INDEX_AUTO, TOKEN_INDEX_MAX, 1),
}
# Folders of ComfyUI/models that hold ToVA adapter files, in search order: models/tova (registered by the pack, where
# training saves), then models/loras.
ADAPTER_FOLDERS = ("tova", "loras")
TOVA_FOLDER = ADAPTER_FOLDERS[0]

# Native adapter file format (method §2.7).
NATIVE_FORMAT_NAME = "tova"
NATIVE_FORMAT_VERSION = 1
