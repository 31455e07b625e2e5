"""Render per-word attention maps as IMAGE heatmaps and MASKs for the Attention Map Viewer (method §3.1 maps).

Pure torch + Pillow (text only). Maps come in the canonical per-concept form `(K, h, w)`; outputs follow ComfyUI's
IMAGE `(…, H_img, W_img, 3)` and MASK `(…, H_img, W_img)` conventions, float32 in 0..1.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .errors import ConceptSplitError
from .widgets import WidgetRange

# Polynomial fits of matplotlib's perceptual colormaps by Matt Zucker, "Colormaps" (Shadertoy WlfXRN, CC0),
# fitted to the BIDS/colormap data: c(t) = Σ_n coeff[n]·tⁿ per channel, rows n = 0..6, columns (R, G, B).
# The fits are minimax, so they oscillate around the true maps by up to ±8.5/255 (inferno blue) and miss the ends.
_POLYNOMIAL_FITS = {
    "inferno": (
        (0.0002189403691192265, 0.001651004631001012, -0.01948089843709184),
        (0.1065134194856116, 0.5639564367884091, 3.932712388889277),
        (11.60249308247187, -3.972853965665698, -15.9423941062914),
        (-41.70399613139459, 17.43639888205313, 44.35414519872813),
        (77.162935699427, -33.40235894210092, -81.80730925738993),
        (-71.31942824499214, 32.62606426397723, 73.20951985803202),
        (25.13112622477341, -12.24266895238567, -23.07032500287172),
    ),
    "viridis": (
        (0.2777273272234177, 0.005407344544966578, 0.3340998053353061),
        (0.1050930431085774, 1.404613529898575, 1.384590162594685),
        (-0.3308618287255563, 0.214847559468213, 0.09509516302823659),
        (-4.634230498983486, -5.799100973351585, -19.33244095627987),
        (6.228269936347081, 14.17993336680509, 56.69055260068105),
        (4.776384997670288, -13.74514537774601, -65.35303263337234),
        (-5.435455855934631, 4.645852612178535, 26.3124352495832),
    ),
}
# True first and last entries of matplotlib `_cm_listed.py` (`_inferno_data`, `_viridis_data`, from BIDS/colormap).
_TRUE_ENDPOINTS = {
    "inferno": ((0.001462, 0.000466, 0.013866), (0.988362, 0.998364, 0.644924)),
    "viridis": ((0.267004, 0.004874, 0.329415), (0.993248, 0.906157, 0.143936)),
}
# Turbo is left out on purpose: Google's published polynomial (Ruofei Du) is off by 12/255 on average and 32/255 at
# t = 0, and turbo's lightness is not monotone, so it would misrepresent attention strength.
COLORMAPS = ("inferno", "viridis")  # first = default; the viewer node offers these names
ALPHA_DEFAULT = 0.5  # heatmap opacity over the image: half and half
ALPHA_RANGE = WidgetRange(0.0, 1.0, 0.05)
_LUT_SIZE = 256
_ENDPOINT_RAMP = 8  # LUT entries over which the fit is pinned to the true endpoints (keeps interior error ≤ the fit's)

_BACKGROUND = (0.1, 0.1, 0.1)  # dark grid background, RGB 0..1
_TEXT_COLOR = (0.95, 0.95, 0.95)  # label colour, RGB 0..1
_LABEL_HEIGHT_FRACTION = 0.09  # label strip height as a fraction of the tile height
_MIN_LABEL_HEIGHT = 16  # px; below this the default font is unreadable
_FONT_TO_STRIP = 0.7  # font size as a fraction of the label strip height
_MIN_FONT_SIZE = 8  # px; labels shrink to this before they are truncated with "..."
_PADDING_FRACTION = 0.02  # gap between tiles as a fraction of the smaller tile side
_MIN_PADDING = 2  # px
_MAP_ONLY_LONG_SIDE = 256  # px; tile size on the long side when no image is given
_UPSAMPLE_MODES = ("bilinear", "nearest")


@functools.lru_cache(maxsize=None)
def _colormap_lut_cached(name: str) -> torch.Tensor:
    t = np.linspace(0.0, 1.0, _LUT_SIZE)[:, None]  # (256, 1)
    coefficients = np.asarray(_POLYNOMIAL_FITS[name], dtype=np.float64)  # (7, 3)
    lut = (t ** np.arange(coefficients.shape[0])) @ coefficients  # (256, 7) x (7, 3) -> (256, 3)
    # Pin both ends to the true colours with a short linear ramp, so 0 and 1 map to the colormap's real endpoints.
    index = np.arange(_LUT_SIZE)[:, None]  # (256, 1)
    weight_first = np.clip(1.0 - index / _ENDPOINT_RAMP, 0.0, None)
    weight_last = np.clip(1.0 - (_LUT_SIZE - 1 - index) / _ENDPOINT_RAMP, 0.0, None)
    first, last = (np.asarray(end) for end in _TRUE_ENDPOINTS[name])
    lut = lut + weight_first * (first - lut[0]) + weight_last * (last - lut[-1])
    return torch.from_numpy(np.clip(lut, 0.0, 1.0)).to(torch.float32)


def colormap_lut(name: str = "inferno") -> torch.Tensor:
    """The 256-entry lookup table of a colormap.

    Shapes: returns `(256, 3)` float32 RGB in 0..1 on the CPU; entry 0 is the colour of 0, entry 255 of 1.
    Raises: ConceptSplitError for a name not in COLORMAPS.
    """
    if name not in COLORMAPS:
        raise ConceptSplitError.build(
            f'Unknown colormap "{name}"',
            seen=repr(name),
            expected=f"one of {', '.join(COLORMAPS)}",
            fix="pick a colormap from the viewer's list",
        )
    return _colormap_lut_cached(name).clone()


def apply_colormap(values: torch.Tensor, name: str = "inferno") -> torch.Tensor:
    """Map scalars in [0, 1] to RGB through a 256-entry LUT (nearest entry; values outside are clamped).

    Shapes: values `(…, h, w)` any float dtype -> `(…, h, w, 3)` float32 on the same device.
    Raises: ConceptSplitError for an unknown colormap or non-finite values.
    """
    if not torch.isfinite(values).all():
        raise ConceptSplitError.build(
            "Cannot colour a map with NaN or infinite values",
            seen=f"non-finite entries in a {tuple(values.shape)} map",
            expected="finite values in 0..1",
            fix="normalise the maps with normalize_for_display first",
        )
    lut = colormap_lut(name).to(values.device)  # (256, 3)
    index = (values.float().clamp(0.0, 1.0) * (_LUT_SIZE - 1)).round().long()  # (…, h, w)
    return lut[index]  # (…, h, w, 3)


def _check_maps(maps: torch.Tensor) -> None:
    if maps.dim() != 3 or maps.shape[0] == 0:
        raise ConceptSplitError.build(
            "Attention maps must be one (h, w) map per word",
            seen=f"shape {tuple(maps.shape)}",
            expected="a (K, h, w) tensor with K >= 1",
            fix="pass the per-concept maps from the attention store",
        )
    if not torch.isfinite(maps).all():
        raise ConceptSplitError.build(
            "Attention maps contain NaN or infinite values",
            seen=f"non-finite entries in shape {tuple(maps.shape)}",
            expected="finite attention probabilities",
            fix="check the sampler ran in a precision without overflow",
        )


def normalize_for_display(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each map to [0, 1] for display; a constant map becomes zeros (no NaN).

    Shapes: maps `(K, h, w)` any float dtype -> `(K, h, w)` float32.
    """
    _check_maps(maps)
    maps = maps.float()
    low = maps.amin(dim=(1, 2), keepdim=True)  # (K, 1, 1)
    span = maps.amax(dim=(1, 2), keepdim=True) - low  # (K, 1, 1)
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (maps - low) / safe_span, torch.zeros_like(maps))


def upsample_maps(maps: torch.Tensor, H_img: int, W_img: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize latent-grid maps to the image size; bilinear (align_corners=False) and nearest stay in the input range.

    Shapes: maps `(K, h, w)` -> `(K, H_img, W_img)` float32.
    Raises: ConceptSplitError for an unknown mode or a non-positive size.
    """
    _check_maps(maps)
    if mode not in _UPSAMPLE_MODES or H_img < 1 or W_img < 1:
        raise ConceptSplitError.build(
            "Cannot resize attention maps",
            seen=f"mode {mode!r}, size {H_img}x{W_img}",
            expected=f"mode in {_UPSAMPLE_MODES} and a positive size",
            fix="use bilinear and the image's own size",
        )
    options = {"align_corners": False} if mode == "bilinear" else {}
    resized = F.interpolate(maps.float()[:, None], size=(H_img, W_img), mode=mode, **options)  # (K, 1, H_img, W_img)
    return resized[:, 0]  # (K, H_img, W_img)


def maps_to_masks(maps: torch.Tensor, H_img: int, W_img: int, threshold: float | None = None) -> torch.Tensor:
    """MASK per word: the min-max normalised map upsampled bilinearly (soft, 0..1), or binary `>= threshold`.

    A batch `(B, K, h, w)` can be flattened to `(B·K, h, w)` first; the result is then ComfyUI's MASK batch.
    Shapes: maps `(K, h, w)` -> `(K, H_img, W_img)` float32 in 0..1.
    Raises: ConceptSplitError when threshold is outside (0, 1].
    """
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ConceptSplitError.build(
            "Mask threshold out of range",
            seen=str(threshold),
            expected="a value in (0, 1], or None for soft masks",
            fix="use e.g. 0.5, or leave it empty",
        )
    soft = upsample_maps(normalize_for_display(maps), H_img, W_img).clamp(0.0, 1.0)  # (K, H_img, W_img)
    return soft if threshold is None else (soft >= threshold).float()


def overlay_heatmap(image: torch.Tensor, heat_rgb: torch.Tensor, alpha: float) -> torch.Tensor:
    """Blend a heatmap over an image: (1 − α)·image + α·heat; α = 0 gives the image, α = 1 the heatmap, exactly.

    Shapes: image `(H_img, W_img, 3)`, heat_rgb `(…, H_img, W_img, 3)` -> `(…, H_img, W_img, 3)` float32.
    Raises: ConceptSplitError when alpha is outside [0, 1] or the sizes differ.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConceptSplitError.build(
            "Heatmap opacity out of range",
            seen=f"alpha {alpha}",
            expected="a value in [0, 1]",
            fix="use 0 for the image only, 1 for the heatmap only, 0.5 to see both",
        )
    if image.shape[-3:] != heat_rgb.shape[-3:] or image.shape[-1] != 3:
        raise ConceptSplitError.build(
            "Image and heatmap sizes differ",
            seen=f"image {tuple(image.shape)}, heatmap {tuple(heat_rgb.shape)}",
            expected="both (H_img, W_img, 3)",
            fix="upsample the maps to the image size first",
        )
    return (1.0 - alpha) * image.float() + alpha * heat_rgb.float()  # (…, H_img, W_img, 3)


def _load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable Aileron when FreeType is built in
    except TypeError:
        return ImageFont.load_default()  # older Pillow: fixed-size bitmap font


def _fit_label(draw: ImageDraw.ImageDraw, text: str, width: int, height: int, font) -> tuple[str, object]:
    """Shrink the default font, then truncate with "...", until the label fits the strip."""

    def size_of(candidate: str, candidate_font) -> tuple[int, int]:
        left, top, right, bottom = draw.textbbox((0, 0), candidate, font=candidate_font)
        return right - left, bottom - top

    if font is None:
        size = max(_MIN_FONT_SIZE, round(height * _FONT_TO_STRIP))
        font = _load_font(size)
        while size > _MIN_FONT_SIZE and isinstance(font, ImageFont.FreeTypeFont) and size_of(text, font)[0] > width:
            size -= 1
            font = _load_font(size)
    shown = text
    while shown and size_of(shown if shown == text else shown + "...", font)[0] > width:
        shown = shown[:-1]
    return (shown if shown == text else shown + "..."), font


def _render_label(text: str, width: int, height: int, font, device: torch.device) -> torch.Tensor:
    """One label strip: light text centred on the dark background. Returns `(height, width, 3)` float32."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    shown, used_font = _fit_label(draw, text, width - 2, height, font)
    left, _, right, _ = draw.textbbox((0, 0), shown, font=used_font)
    _, top, _, bottom = draw.textbbox((0, 0), "Ag", font=used_font)  # same baseline for every word, descenders or not
    origin = ((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top)
    draw.text(origin, shown, fill=255, font=used_font)
    coverage = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).to(device)  # (height, width)
    coverage = coverage[..., None]  # (height, width, 1)
    background = torch.tensor(_BACKGROUND, device=device)
    text_color = torch.tensor(_TEXT_COLOR, device=device)
    return background * (1.0 - coverage) + text_color * coverage  # (height, width, 3)


def render_labeled_grid(
    tiles: torch.Tensor,
    labels: list[str],
    columns: int | None = None,
    label_height: int | None = None,
    font=None,
    padding: int | None = None,
) -> torch.Tensor:
    """Lay tiles out row-major on a dark background, each word drawn under its tile with Pillow.

    Layout: `columns = ceil(sqrt(K))` by default, `rows = ceil(K / columns)`. Tile k sits at row `k // columns`,
    column `k % columns`, top-left `(y, x) = (P + row·(H + L + P), P + column·(W + P))`, its label strip of height L
    directly below it. Grid size: `H_grid = rows·(H + L) + (rows + 1)·P`, `W_grid = columns·W + (columns + 1)·P`.
    Defaults: `L = max(16, round(0.09·H))`, `P = max(2, round(0.02·min(H, W)))`. Unused cells stay background.
    Labels use Pillow's default font sized to the strip (any Pillow font may be passed as `font`); a label too wide is
    shrunk, then truncated with "...". Tiles are copied unchanged.

    Shapes: tiles `(K, H, W, 3)` in 0..1 -> `(H_grid, W_grid, 3)` float32 on the tiles' device.
    Raises: ConceptSplitError on a label count that is not K, no tiles, or non-positive layout numbers.
    """
    if tiles.dim() != 4 or tiles.shape[-1] != 3 or tiles.shape[0] == 0:
        raise ConceptSplitError.build(
            "Grid tiles must be K RGB images",
            seen=f"shape {tuple(tiles.shape)}",
            expected="(K, H, W, 3) with K >= 1",
            fix="pass one (H, W, 3) tile per word",
        )
    K, H, W, _ = tiles.shape
    if len(labels) != K:
        raise ConceptSplitError.build(
            "Each tile needs exactly one label",
            seen=f"{K} tiles and {len(labels)} labels",
            expected="as many labels as tiles",
            fix="pass one word per attention map, in concept order",
        )
    columns = math.ceil(math.sqrt(K)) if columns is None else columns
    label_height = max(_MIN_LABEL_HEIGHT, round(_LABEL_HEIGHT_FRACTION * H)) if label_height is None else label_height
    padding = max(_MIN_PADDING, round(_PADDING_FRACTION * min(H, W))) if padding is None else padding
    if columns < 1 or label_height < 1 or padding < 0:
        raise ConceptSplitError.build(
            "Invalid grid layout",
            seen=f"columns {columns}, label_height {label_height}, padding {padding}",
            expected="columns >= 1, label_height >= 1, padding >= 0",
            fix="leave them empty for the defaults",
        )
    rows = math.ceil(K / columns)
    H_grid = rows * (H + label_height) + (rows + 1) * padding
    W_grid = columns * W + (columns + 1) * padding
    grid = torch.tensor(_BACKGROUND, device=tiles.device).expand(H_grid, W_grid, 3).clone()  # (H_grid, W_grid, 3)
    for k in range(K):
        y = padding + (k // columns) * (H + label_height + padding)
        x = padding + (k % columns) * (W + padding)
        grid[y : y + H, x : x + W] = tiles[k].float()
        grid[y + H : y + H + label_height, x : x + W] = _render_label(labels[k], W, label_height, font, tiles.device)
    return grid


def render_attention_grid(
    image: torch.Tensor | None,
    maps: torch.Tensor,
    labels: list[str],
    alpha: float = 0.5,
    colormap: str = "inferno",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-word heatmaps (min-max normalised, upsampled, colormapped, overlaid) in one labelled grid, plus masks.

    Without an image the colormapped maps alone are shown, `256` px on the long side at the maps' aspect ratio.
    Shapes: image `(H_img, W_img, 3)` in 0..1 or None, maps `(K, h, w)` -> grid `(H_grid, W_grid, 3)` float32 and
    masks `(K, H_img, W_img)` float32 in 0..1 (see maps_to_masks).
    Raises: ConceptSplitError on a label count that is not K, non-finite maps or a bad image shape.
    """
    _check_maps(maps)
    K, h, w = maps.shape
    if len(labels) != K:
        raise ConceptSplitError.build(
            "Each attention map needs exactly one word",
            seen=f"{K} maps and {len(labels)} words",
            expected="as many words as maps",
            fix="pass the identifier words in concept order",
        )
    if image is None:
        scale = _MAP_ONLY_LONG_SIDE / max(h, w)
        H_img, W_img = max(1, round(h * scale)), max(1, round(w * scale))
    elif image.dim() == 3 and image.shape[-1] == 3:
        H_img, W_img = image.shape[0], image.shape[1]
    else:
        raise ConceptSplitError.build(
            "The image must be one RGB picture",
            seen=f"shape {tuple(image.shape)}",
            expected="(H_img, W_img, 3)",
            fix="pass one image of the IMAGE batch, or use render_attention_grids for a batch",
        )
    masks = maps_to_masks(maps, H_img, W_img)  # (K, H_img, W_img)
    heat = apply_colormap(masks, colormap)  # (K, H_img, W_img, 3)
    tiles = heat if image is None else overlay_heatmap(image.to(heat.device), heat, alpha)  # (K, H_img, W_img, 3)
    return render_labeled_grid(tiles, labels), masks


def render_attention_grids(
    images: torch.Tensor | None,
    maps: torch.Tensor,
    labels: list[str],
    alpha: float = 0.5,
    colormap: str = "inferno",
) -> torch.Tensor:
    """render_attention_grid over a batch, for the viewer's IMAGE output (masks: maps_to_masks on `(B·K, h, w)`).

    Shapes: images `(B, H_img, W_img, 3)` or None, maps `(B, K, h, w)` -> `(B, H_grid, W_grid, 3)` float32.
    Raises: ConceptSplitError when the batch sizes differ or maps is not 4-D.
    """
    if maps.dim() != 4 or maps.shape[0] == 0:
        raise ConceptSplitError.build(
            "Batched attention maps must be 4-D",
            seen=f"shape {tuple(maps.shape)}",
            expected="(B, K, h, w), B >= 1",
            fix="add a batch axis with maps[None] for a single image",
        )
    if images is not None and images.shape[0] != maps.shape[0]:
        raise ConceptSplitError.build(
            "Images and attention maps have different batch sizes",
            seen=f"{images.shape[0]} images and {maps.shape[0]} sets of maps",
            expected="one set of maps per image",
            fix="connect the images the maps were recorded for",
        )
    grids = [
        render_attention_grid(None if images is None else images[b], maps[b], labels, alpha, colormap)[0]
        for b in range(maps.shape[0])
    ]
    return torch.stack(grids)  # (B, H_grid, W_grid, 3)
