"""Draw a training loss curve as a ComfyUI IMAGE with torch alone (ComfyUI ships no matplotlib; integration §5).

White background, light grid at quarters, the raw loss of every step in light blue and its moving average in dark
blue. The vertical axis spans [min, max] of the losses; no text, the node reports the numbers separately.
"""

from __future__ import annotations

from typing import Sequence

import torch

_RAW = torch.tensor([0.62, 0.75, 0.95])  # light blue, RGB in 0..1
_SMOOTH = torch.tensor([0.05, 0.20, 0.60])  # dark blue
_GRID = torch.tensor([0.88, 0.88, 0.88])
_MARGIN = 8  # pixels around the plot area


def moving_average(values: torch.Tensor, window: int) -> torch.Tensor:
    """Trailing mean over up to `window` values (shorter at the start). Shapes: (n,) -> (n,)."""
    sums = torch.cumsum(torch.cat([values.new_zeros(1), values]), dim=0)  # (n + 1,)
    index = torch.arange(1, values.numel() + 1)
    start = (index - window).clamp(min=0)
    return (sums[index] - sums[start]) / (index - start)


def _draw_polyline(image: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, color: torch.Tensor, thick: int) -> None:
    """Set the pixels of the segments (xs[i], ys[i]) -> (xs[i+1], ys[i+1]) in `image` (H, W, 3), in place."""
    height, width, _ = image.shape
    if xs.numel() == 1:
        xs, ys = xs.repeat(2), ys.repeat(2)
    span = torch.maximum((xs[1:] - xs[:-1]).abs(), (ys[1:] - ys[:-1]).abs()).max()
    t = torch.linspace(0, 1, int(span.item()) + 2)  # (S,) samples per segment, dense enough to leave no gaps
    px = xs[:-1, None] + (xs[1:] - xs[:-1])[:, None] * t  # (n-1, S)
    py = ys[:-1, None] + (ys[1:] - ys[:-1])[:, None] * t
    for dy in range(thick):
        rows = (py.round().long() + dy).clamp(0, height - 1).flatten()
        cols = px.round().long().clamp(0, width - 1).flatten()
        image[rows, cols] = color


def render_loss_curve(losses: Sequence[float], height: int = 256, width: int = 512) -> torch.Tensor:
    """The loss curve as an IMAGE batch of one.

    Shapes: returns (1, height, width, 3) float32 in 0..1 (ComfyUI IMAGE layout).
    """
    image = torch.ones(height, width, 3)
    inner_h, inner_w = height - 2 * _MARGIN, width - 2 * _MARGIN
    for quarter in range(5):
        image[_MARGIN + round(quarter * (inner_h - 1) / 4), _MARGIN : width - _MARGIN] = _GRID
    values = torch.tensor([float(v) for v in losses if v == v], dtype=torch.float32)  # drop NaN
    if values.numel() == 0:
        return image[None]
    low, high = values.min(), values.max()
    scale = (high - low) if high > low else torch.tensor(1.0)
    xs = _MARGIN + torch.linspace(0, inner_w - 1, values.numel())  # (n,)

    def to_rows(v: torch.Tensor) -> torch.Tensor:
        return _MARGIN + (1 - (v - low) / scale) * (inner_h - 2)  # high loss at the top

    _draw_polyline(image, xs, to_rows(values), _RAW, thick=1)
    window = max(1, values.numel() // 20)
    _draw_polyline(image, xs, to_rows(moving_average(values, window)), _SMOOTH, thick=2)
    return image[None]
