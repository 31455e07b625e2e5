"""Training photos from a folder: every image file, upright and RGB, as the ToVA trainer takes them (method §2.6).

"Load Training Photos" (nodes/training_photos.py) and scripts/train_tova.py read photos here. The node squares each
photo the way the trainer's centre crop does (`preprocess_images`), so photos of any size make one IMAGE batch;
the CLI keeps each photo's own size and lets the trainer draw its random crops.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import ConceptSplitError
from .training_data import preprocess_images
from .widgets import WidgetRange

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Widget limits of the loader's square size; the trainer resizes again to its own resolution R (method §2.6).
PHOTO_RESOLUTION = WidgetRange(
    64,
    4096,
    8,
    "1024: at least the training resolution (768 SD2.1, 1024 SDXL, 512 SD1.5), so the trainer only scales down",
)
PHOTO_RESOLUTION_DEFAULT = 1024


def resolve_photo_folder(root: str | os.PathLike, folder: str) -> Path:
    """The folder `folder` (relative, as ComfyUI's folder lists name it: "my_dog", "people/anna") inside `root`.

    Symlinks are resolved first, so a link inside `root` that points elsewhere counts as outside.

    Raises:
        ConceptSplitError: the name is empty or absolute, or the folder lies outside `root`.
    """
    base = Path(root).resolve()
    if not folder.strip() or "\x00" in folder:
        raise ConceptSplitError.build(
            "No photo folder was chosen",
            seen=repr(folder),
            expected=f"the name of a folder inside {base}",
            fix="put the photos in a folder under ComfyUI's input folder and pick it in the folder list",
        )
    target = (base / folder).resolve()
    if os.path.isabs(folder) or not target.is_relative_to(base):
        raise ConceptSplitError.build(
            f'The photo folder "{folder}" is outside ComfyUI\'s input folder',
            seen=f"{folder!r} resolves to {target}",
            expected=f"a folder inside {base}",
            fix="move or copy the photos into a folder under ComfyUI's input folder and pick that folder",
        )
    return target


def photo_files(folder: Path) -> list[Path]:
    """The image files directly inside `folder`, sorted by name; hidden files (".name", "._name" that macOS
    writes next to copied files) and sub-folders are skipped.

    Raises:
        ConceptSplitError: the folder does not exist or holds no image file.
    """
    if not folder.is_dir():
        raise ConceptSplitError.build(
            f'The photo folder "{folder.name}" does not exist',
            seen=str(folder),
            expected="a folder of photos",
            fix="check the folder name, or create it and copy the photos into it",
        )
    entries = sorted(folder.iterdir(), key=lambda path: path.name)
    files = [
        path
        for path in entries
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    ]
    if not files:
        others = [path.name for path in entries][:5]
        raise ConceptSplitError.build(
            f'The photo folder "{folder.name}" holds no photos',
            seen=f"{len(entries)} entries"
            + (f" ({', '.join(others)}{', …' if len(entries) > 5 else ''})" if others else ""),
            expected=f"image files ({', '.join(IMAGE_SUFFIXES)}) directly in {folder}",
            fix="copy 3-20 photos of the concept into that folder (sub-folders are not read)",
        )
    return files


def read_photo(path: Path) -> torch.Tensor:
    """One photo, turned upright by its EXIF orientation, in RGB (alpha dropped).

    Shapes: returns (H_img, W_img, 3) float32 in 0..1.
    Raises: ConceptSplitError naming the file when it cannot be read or decoded.
    """
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode.startswith("I"):  # 16-bit PNGs (I, I;16): 0..65535, which convert("RGB") clips
                image = image.convert("I").point(lambda value: value / 257)  # 65535 / 257 = 255
            rgb = image.convert("RGB")
    except MemoryError:
        raise
    except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise ConceptSplitError.build(
            f'The photo "{path.name}" cannot be read',
            seen=f"{type(err).__name__}: {err}",
            expected="a complete PNG, JPEG, WebP or BMP file",
            fix=f"open {path} in an image viewer; re-export or remove it",
        ) from err
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)  # (H_img, W_img, 3)


def load_photos(folder: Path) -> list[torch.Tensor]:
    """Every photo of `folder` at its own size (see `photo_files`, `read_photo`).

    Shapes: returns a list of (1, H_img, W_img, 3) float32 in 0..1, sizes may differ.
    """
    return [read_photo(path)[None] for path in photo_files(folder)]


def load_square_photos(folder: Path, resolution: int) -> torch.Tensor:
    """Every photo of `folder`, its shorter side resized to `resolution` and centre-cropped square, as one batch.

    The resize and crop are the trainer's own (`preprocess_images`, crop="center"); one photo is held at full size
    at a time.

    Shapes: returns (n, R, R, 3) float32 in 0..1, R = resolution.
    Raises: ConceptSplitError: no photos, an unreadable photo, resolution below 1.
    """
    if resolution < 1:
        raise ConceptSplitError.build(
            "The photo resolution must be positive",
            seen=f"resolution = {resolution}",
            expected=f"{int(PHOTO_RESOLUTION.min)}..{int(PHOTO_RESOLUTION.max)} pixels",
            fix=f"set resolution to {PHOTO_RESOLUTION_DEFAULT}",
        )
    squares = []
    for path in photo_files(folder):
        square = preprocess_images(read_photo(path)[None], resolution, crop="center")  # (1, 3, R, R) in [-1, 1]
        squares.append(((square + 1) / 2).clamp(0, 1).movedim(1, -1))  # (1, R, R, 3) in 0..1
    return torch.cat(squares)  # (n, R, R, 3)


def folder_fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime in ns) of each photo of `folder`: changes when a photo is added, removed or edited."""
    stats = [(path.name, path.stat()) for path in photo_files(folder)]
    return tuple((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats)
