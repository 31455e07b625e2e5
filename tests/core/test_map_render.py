"""Attention map rendering: colormap LUTs, normalisation, upsampling, overlay, labelled grid layout, masks."""

import numpy as np
import pytest
import torch

from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.map_render import (
    COLORMAPS,
    apply_colormap,
    colormap_lut,
    maps_to_masks,
    normalize_for_display,
    overlay_heatmap,
    render_attention_grid,
    render_attention_grids,
    render_labeled_grid,
    upsample_maps,
)

# Independent reference: matplotlib `_cm_listed.py` first/last rows and its well-known 8-bit quartile colours
# (index 64, 128, 192): viridis #3b528b #21918c #5ec962, inferno #57106e #bc3754 #f98e09.
TRUE_ENDPOINTS = {
    "inferno": ((0.001462, 0.000466, 0.013866), (0.988362, 0.998364, 0.644924)),
    "viridis": ((0.267004, 0.004874, 0.329415), (0.993248, 0.906157, 0.143936)),
}
QUARTILES = {
    "inferno": ("57106e", "bc3754", "f98e09"),
    "viridis": ("3b528b", "21918c", "5ec962"),
}
BACKGROUND = torch.tensor([0.1, 0.1, 0.1])


def _hex_to_rgb(code):
    return [int(code[i : i + 2], 16) / 255 for i in (0, 2, 4)]


def _relative_luminance(rgb):
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)  # sRGB decode
    return linear @ np.array([0.2126, 0.7152, 0.0722])


@pytest.mark.parametrize("name", COLORMAPS)
def test_colormap_endpoints_quartiles_and_luminance(name):
    lut = colormap_lut(name).numpy()
    assert lut.shape == (256, 3)
    first, last = TRUE_ENDPOINTS[name]
    np.testing.assert_allclose(lut[0], first, atol=1e-6)  # pinned to the true ends: float32 storage only (≤ 1 ulp)
    np.testing.assert_allclose(lut[-1], last, atol=1e-6)
    for index, code in zip((64, 128, 192), QUARTILES[name]):
        np.testing.assert_allclose(lut[index], _hex_to_rgb(code), atol=10 / 255)  # fit error is ≤ 8.5/255
    assert np.all(np.diff(_relative_luminance(lut)) > 0)
    mapped = apply_colormap(torch.tensor([[0.0, 1.0], [-3.0, 7.0]]), name)  # out-of-range values clamp
    assert mapped.shape == (2, 2, 3)
    assert torch.equal(mapped[0, 0], torch.from_numpy(lut[0])) and torch.equal(mapped[1, 0], mapped[0, 0])
    assert torch.equal(mapped[0, 1], torch.from_numpy(lut[-1])) and torch.equal(mapped[1, 1], mapped[0, 1])


def test_colormap_errors():
    with pytest.raises(ConceptSplitError, match='Unknown colormap "jet"'):
        apply_colormap(torch.zeros(2, 2), "jet")
    with pytest.raises(ConceptSplitError, match="NaN or infinite"):
        apply_colormap(torch.tensor([[float("nan")]]))


def test_normalize_for_display_min_max_and_constant_map():
    maps = torch.stack([torch.tensor([[1.0, 2.0], [3.0, 5.0]]), torch.full((2, 2), 0.7)])
    shown = normalize_for_display(maps)
    assert torch.allclose(shown[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]), rtol=0, atol=1e-7)  # ≤ 1 ulp at ≤ 1
    assert torch.equal(shown[1], torch.zeros(2, 2))


def test_upsample_shape_range_and_nearest_replication():
    maps = torch.rand(2, 24, 24, generator=torch.Generator().manual_seed(0))
    big = upsample_maps(maps, 100, 150)
    assert big.shape == (2, 100, 150)
    assert big.min() >= maps.min() - 1e-6 and big.max() <= maps.max() + 1e-6
    nearest = upsample_maps(maps, 48, 72, mode="nearest")
    assert torch.equal(nearest, maps.repeat_interleave(2, dim=1).repeat_interleave(3, dim=2))
    with pytest.raises(ConceptSplitError, match="mode 'bicubic'"):
        upsample_maps(maps, 10, 10, mode="bicubic")


def test_overlay_alpha_exact_endpoints_and_mean():
    image = torch.rand(6, 8, 3, generator=torch.Generator().manual_seed(1))
    values = torch.zeros(6, 8)
    values[:, 4:] = 1.0  # left half → first LUT colour, right half → last
    heat = apply_colormap(values, "inferno")
    lut = colormap_lut("inferno")
    assert torch.equal(heat[0, 0], lut[0]) and torch.equal(heat[5, 7], lut[-1])
    assert torch.equal(overlay_heatmap(image, heat, 0.0), image)
    assert torch.equal(overlay_heatmap(image, heat, 1.0), heat)
    assert torch.allclose(overlay_heatmap(image, heat, 0.5), (image + heat) / 2, atol=1e-7)  # ≤ 1 ulp at ≤ 1
    with pytest.raises(ConceptSplitError, match="alpha 1.5"):
        overlay_heatmap(image, heat, 1.5)
    with pytest.raises(ConceptSplitError, match="sizes differ"):
        overlay_heatmap(image, heat[:3], 0.5)


# (K, expected (H_grid, W_grid)) for 20x20 tiles, label strips of 16 px, padding 2 px, columns = ceil(sqrt(K)).
GRID_SIZES = [(1, (40, 24)), (2, (40, 46)), (3, (78, 46)), (4, (78, 46)), (5, (78, 68))]


@pytest.mark.parametrize("K, expected_size", GRID_SIZES)
def test_grid_size_and_tile_positions(K, expected_size):
    colors = torch.rand(K, 3, generator=torch.Generator().manual_seed(K)) * 0.5 + 0.5  # bright, unlike background
    tiles = colors[:, None, None, :].expand(K, 20, 20, 3)
    grid = render_labeled_grid(tiles, [f"w{k}" for k in range(K)], label_height=16, padding=2)
    assert tuple(grid.shape) == (*expected_size, 3)
    columns = int(np.ceil(np.sqrt(K)))
    for k in range(K):
        y, x = 2 + (k // columns) * 38, 2 + (k % columns) * 22
        assert torch.equal(grid[y : y + 20, x : x + 20], tiles[k])
    assert torch.allclose(grid[0, 0], BACKGROUND, rtol=0, atol=1e-7)  # outer padding: the fill value, ≤ 1 ulp
    if K == 3:  # the fourth cell of the 2x2 layout stays empty
        assert torch.allclose(grid[40:60, 24:44], BACKGROUND.expand(20, 20, 3), rtol=0, atol=1e-7)


def test_labels_are_drawn_under_each_tile_and_differ_by_word():
    tiles = torch.full((3, 32, 48, 3), 0.6)
    grid = render_labeled_grid(tiles, ["dog", "sofa", "dog"], columns=3, label_height=16, padding=2)
    strips = [grid[34:50, x : x + 48] for x in (2, 52, 102)]  # the 16 px under each tile
    for strip in strips:
        assert (strip - BACKGROUND).abs().amax() > 0.3  # text pixels present
    assert not torch.equal(strips[0], strips[1])  # "dog" and "sofa" render differently
    assert torch.equal(strips[0], strips[2])  # the same word renders the same
    long_grid = render_labeled_grid(tiles[:1], ["a very long identifier word indeed"], label_height=16, padding=2)
    assert long_grid.shape == (52, 52, 3)  # a long word never widens the tile


def test_grid_errors():
    with pytest.raises(ConceptSplitError, match="3 tiles and 2 labels"):
        render_labeled_grid(torch.zeros(3, 8, 8, 3), ["a", "b"])
    with pytest.raises(ConceptSplitError, match=r"Seen: shape \(8, 8, 3\)"):
        render_labeled_grid(torch.zeros(8, 8, 3), ["a"])
    with pytest.raises(ConceptSplitError, match="columns 0"):
        render_labeled_grid(torch.zeros(1, 8, 8, 3), ["a"], columns=0)


def test_attention_grid_with_and_without_image():
    maps = torch.rand(2, 24, 32, generator=torch.Generator().manual_seed(2))
    image = torch.rand(96, 128, 3, generator=torch.Generator().manual_seed(3))
    grid, masks = render_attention_grid(image, maps, ["dog", "cat"], alpha=1.0)
    assert masks.shape == (2, 96, 128) and masks.min() >= 0 and masks.max() <= 1
    assert torch.equal(masks, maps_to_masks(maps, 96, 128))
    L, P = 16, 2  # defaults for 96x128 tiles: max(16, round(0.09·96)), max(2, round(0.02·96))
    assert grid.shape == (96 + L + 2 * P, 2 * 128 + 3 * P, 3)
    assert torch.equal(grid[P : P + 96, P : P + 128], apply_colormap(masks[0]))  # alpha 1: the heatmap itself
    map_only, map_masks = render_attention_grid(None, maps, ["dog", "cat"])
    assert map_masks.shape == (2, 192, 256)  # 256 px on the long side, maps' aspect ratio
    assert map_only.shape == (192 + 17 + 2 * 4, 2 * 256 + 3 * 4, 3)  # L = round(0.09·192), P = round(0.02·192)
    with pytest.raises(ConceptSplitError, match="2 maps and 1 words"):
        render_attention_grid(image, maps, ["dog"])


def test_masks_soft_and_thresholded():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    soft = maps_to_masks(maps, 2, 2)
    assert torch.allclose(soft, torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]), rtol=0, atol=1e-7)  # ≤ 1 ulp at ≤ 1
    assert torch.equal(maps_to_masks(maps, 2, 2, threshold=0.5), torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]))
    with pytest.raises(ConceptSplitError, match="threshold"):
        maps_to_masks(maps, 2, 2, threshold=0.0)


def test_batch_grids_and_batch_mismatch():
    maps = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    images = torch.rand(2, 40, 40, 3, generator=torch.Generator().manual_seed(5))
    grids = render_attention_grids(images, maps, ["a", "b", "c"])
    assert grids.shape == (2, 2 * (40 + 16) + 3 * 2, 2 * 40 + 3 * 2, 3)
    first, _ = render_attention_grid(images[1], maps[1], ["a", "b", "c"])
    assert torch.equal(grids[1], first)
    with pytest.raises(ConceptSplitError, match="2 images and 3 sets of maps.*Fix: connect"):
        render_attention_grids(images, torch.rand(3, 3, 8, 8), ["a", "b", "c"])
    with pytest.raises(ConceptSplitError, match=r"\(B, K, h, w\)"):
        render_attention_grids(images, maps[0], ["a", "b", "c"])
