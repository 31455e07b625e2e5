"""The Python side of the viewer's browser code, for tests: decoding the payload's fp32 maps and the step-range
mean the frontend (web/js/attention_viewer.js) shows; compared with what the page draws."""

from __future__ import annotations

import base64
from typing import Sequence

import numpy as np
import torch


def decode_f32(text: str, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of encode_f32. Shapes: returns `shape` fp32."""
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype="<f4").copy()).reshape(tuple(shape))


def range_mean(step_maps: torch.Tensor, weights: Sequence[int], first: int, last: int) -> torch.Tensor:
    """The maps the viewer shows for slider entries first..last (inclusive): the weighted mean of those steps,
    as the browser computes it (in float64). Shapes: step_maps (S_rec, K, h, w) -> (K, h, w) float64."""
    w = torch.tensor(list(weights[first : last + 1]), dtype=torch.float64)  # (n,)
    return (step_maps[first : last + 1].double() * w[:, None, None, None]).sum(0) / w.sum()
