""" "Load Training Photos": a folder of photos under ComfyUI's input folder as one square IMAGE batch for Train ToVA
Adapter. The pack's own loader, so the training workflow opens on every supported ComfyUI (0.33 removed the core
LoadImageSetFromFolderNode; its LoadImageDataSetFromFolder gives a list, which the trainer also takes).
"""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.training_photos import (
    IMAGE_SUFFIXES,
    PHOTO_RESOLUTION,
    PHOTO_RESOLUTION_DEFAULT,
    folder_fingerprint,
    load_square_photos,
    resolve_photo_folder,
)
from .input_checks import check_number_inputs
from .widgets import number_input


class LoadTrainingPhotos(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptSplitLoadTrainingImages",
            display_name="Load Training Photos",
            category="ConceptSplit/training",
            description="Load every photo of a folder under ComfyUI/input as one IMAGE batch for Train ToVA Adapter: "
            "upright (EXIF), RGB, shorter side resized and centre-cropped square.",
            inputs=[
                # The folder list is read each time the node list is (as ComfyUI's own dataset loaders do).
                io.Combo.Input(
                    "folder",
                    options=folder_paths.get_input_subfolders(),
                    tooltip="A folder under ComfyUI/input holding 3-20 photos of the concept "
                    f"({', '.join(IMAGE_SUFFIXES)}); sub-folders and hidden files are not "
                    "read. Press R after adding a folder.",
                ),
                number_input(
                    "resolution",
                    PHOTO_RESOLUTION_DEFAULT,
                    PHOTO_RESOLUTION,
                    "Square size in pixels: each photo's shorter side is resized to it, then the centre is cropped.",
                    integer=True,
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="images",
                    tooltip="The photos as one batch (n, resolution, resolution), sorted by file "
                    "name: connect to Train ToVA Adapter's images.",
                )
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, resolution: int):
        # Re-read when a photo is added, removed or edited, although the folder name stayed the same.
        try:
            return folder_fingerprint(resolve_photo_folder(folder_paths.get_input_directory(), folder))
        except ConceptSplitError:
            return None  # execute raises the same error

    @classmethod
    def execute(cls, folder: str, resolution: int) -> io.NodeOutput:
        check_number_inputs(cls, {"resolution": resolution})
        path = resolve_photo_folder(folder_paths.get_input_directory(), folder)
        return io.NodeOutput(load_square_photos(path, resolution))  # (n, R, R, 3)
