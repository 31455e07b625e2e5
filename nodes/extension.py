"""The V3 extension: registers the `tova` model folder and lists every ConceptSplit node."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import ComfyExtension, io

from ..conceptsplit_core.config import TOVA_FOLDER
from .adapters import ApplyToVA, LoadToVAAdapter
from .bound_lora import ApplyBoundLoras, BindLoraToConcept
from .loda_nodes import LodaResults, LodaSampler, LodaSamplerSelect
from .prompt import ConceptSplitTextEncode
from .training import TrainToVAAdapter
from .training_photos import LoadTrainingPhotos
from .viewer import AttentionMapViewer, CaptureAttention


def register_tova_folder() -> None:
    """Add models/tova (first) without dropping paths the user set in extra_model_paths.yaml (integration §5)."""
    folder_paths.add_model_folder_path(TOVA_FOLDER, os.path.join(folder_paths.models_dir, TOVA_FOLDER), is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[TOVA_FOLDER]
    folder_paths.folder_names_and_paths[TOVA_FOLDER] = (paths, set(folder_paths.supported_pt_extensions))


class ConceptSplitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.64 never calls on_load, so the folder is registered here, before any node runs.
        register_tova_folder()
        return [
            LoadToVAAdapter,
            ApplyToVA,
            ConceptSplitTextEncode,
            LodaSampler,
            LodaSamplerSelect,
            LodaResults,
            CaptureAttention,
            AttentionMapViewer,
            LoadTrainingPhotos,
            TrainToVAAdapter,
            BindLoraToConcept,
            ApplyBoundLoras,
        ]
