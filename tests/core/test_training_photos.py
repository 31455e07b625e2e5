"""Training photos from a folder (conceptsplit_core/training_photos.py): every photo upright and RGB, squared the way
the trainer crops, one clear error for an empty folder, a damaged file or a folder outside the input folder."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.training_photos import (
    folder_fingerprint,
    load_photos,
    load_square_photos,
    photo_files,
    read_photo,
    resolve_photo_folder,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
# Bilinear weights sum to 1 in float32, so a pixel whose whole filter support has one value comes back equal to it
# up to the rounding of that sum: a few float32 eps at values <= 1.
FLAT_TOLERANCE = 8 * torch.finfo(torch.float32).eps


def stripes(width: int, height: int) -> Image.Image:
    """Three vertical stripes red | green | blue of width/3 each."""
    pixels = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    pixels[:, :third], pixels[:, third : 2 * third], pixels[:, 2 * third :] = RED, GREEN, BLUE
    return Image.fromarray(pixels)


def test_photos_of_any_size_and_mode_become_one_square_batch_in_name_order(tmp_path):
    stripes(96, 32).save(tmp_path / "b_wide.png")  # 96x32: no resize at R=32, the middle stripe is the crop
    stripes(192, 64).save(tmp_path / "a_wide_large.jpg", quality=100)  # halved, then the middle stripe
    stripes(96, 32).convert("RGBA").save(tmp_path / "c_alpha.png")
    stripes(96, 32).convert("P").save(tmp_path / "d_palette.png")
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(tmp_path / "e_16bit.png")  # opens as mode I;16
    (tmp_path / "notes.txt").write_text("not a photo")
    Image.new("RGB", (8, 8)).save(tmp_path / ".hidden.png")  # hidden files (macOS ._ copies) are skipped
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "nested.png")  # sub-folders are not read
    assert [p.name for p in photo_files(tmp_path)] == [
        "a_wide_large.jpg",
        "b_wide.png",
        "c_alpha.png",
        "d_palette.png",
        "e_16bit.png",
    ]
    batch = load_square_photos(tmp_path, 32)
    assert batch.shape == (5, 32, 32, 3) and batch.dtype == torch.float32
    green = torch.tensor([0.0, 1.0, 0.0])
    for index in (1, 2, 3):  # exact stripes: the centre crop is the green stripe
        assert (batch[index] - green).abs().max() <= FLAT_TOLERANCE, index
    # JPEG at quality 100 keeps flat stripes within a few levels; 2 columns at each edge see the filter's blend.
    assert (batch[0, :, 2:-2] - green).abs().max() < 8 / 255
    # 16-bit: 40000 / 65535 of white, quantised to 8 bits (40000 // 257 = 155)
    assert torch.equal(batch[4], torch.full((32, 32, 3), 155 / 255))


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), RED)
    image.paste(BLUE, (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    image.save(tmp_path / "rotated.png", exif=exif)
    pixels = read_photo(tmp_path / "rotated.png")
    assert pixels.shape == (40, 20, 3)  # displayed upright: 20 wide, 40 high
    assert torch.equal(pixels[:20], torch.tensor([1.0, 0, 0]).expand(20, 20, 3))  # the left half is now on top
    assert torch.equal(pixels[20:], torch.tensor([0, 0, 1.0]).expand(20, 20, 3))


def test_load_photos_keeps_each_size(tmp_path):
    Image.new("RGB", (80, 64), GREEN).save(tmp_path / "one.png")
    Image.new("RGB", (64, 96), BLUE).save(tmp_path / "two.png")
    photos = load_photos(tmp_path)
    assert [tuple(p.shape) for p in photos] == [(1, 64, 80, 3), (1, 96, 64, 3)]


def test_an_empty_folder_is_one_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    Image.new("RGB", (8, 8)).save(tmp_path / "._photo.png")
    with pytest.raises(ConceptSplitError, match="holds no photos.*notes.txt.*Fix: copy 3-20 photos"):
        load_square_photos(tmp_path, 32)
    with pytest.raises(ConceptSplitError, match="does not exist"):
        load_photos(tmp_path / "missing")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_photo_is_named(tmp_path, damage):
    Image.new("RGB", (64, 64), GREEN).save(tmp_path / "good.png")
    stripes(300, 300).save(tmp_path / "bad.jpg")
    data = (tmp_path / "bad.jpg").read_bytes()
    (tmp_path / "bad.jpg").write_bytes(
        {"garbage": b"not an image at all", "truncated": data[: len(data) // 3], "empty": b""}[damage]
    )
    with pytest.raises(ConceptSplitError, match='The photo "bad.jpg" cannot be read') as info:
        load_square_photos(tmp_path, 32)
    assert "Seen:" in str(info.value) and "re-export or remove it" in str(info.value)


def test_folders_outside_the_input_folder_are_refused(tmp_path):
    root = tmp_path / "input"
    (root / "people" / "anna").mkdir(parents=True)
    (tmp_path / "private").mkdir()
    os.symlink(tmp_path / "private", root / "link")
    assert resolve_photo_folder(root, "people/anna") == (root / "people" / "anna").resolve()
    for name in ("../private", str(tmp_path / "private"), "link", "people/../../private"):
        with pytest.raises(ConceptSplitError, match="outside ComfyUI's input folder"):
            resolve_photo_folder(root, name)
    for name in ("", "  "):
        with pytest.raises(ConceptSplitError, match="No photo folder was chosen"):
            resolve_photo_folder(root, name)


def test_fingerprint_changes_when_a_photo_changes(tmp_path):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "a.png")
    first = folder_fingerprint(tmp_path)
    assert folder_fingerprint(tmp_path) == first
    Image.new("RGB", (8, 8), GREEN).save(tmp_path / "b.png")
    second = folder_fingerprint(tmp_path)
    assert second != first
    Image.new("RGB", (9, 8), BLUE).save(tmp_path / "a.png")  # edited: another size, so another byte count
    assert folder_fingerprint(tmp_path) != second
