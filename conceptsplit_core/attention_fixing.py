"""LODA stage 2, attention fixing: aggregated maps, per-concept masks and the cross-attention logit bias (method §3.1,
§4).

Mask smoothing replicates `scipy.ndimage.gaussian_filter` with its defaults (the official code), built in torch.
The bias is the reconstruction of method §4.3 (the official `ptp_utils_LODA.py` is missing).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange

from .errors import ConceptSplitError
from .loda_config import LODA_DEFAULTS, LodaConfig
from .loda_loss import _compute_dtype

__all__ = [
    "aggregate_maps",
    "build_fixing_bias",
    "build_fixing_masks",
    "concept_maps",
    "gaussian_smooth_symmetric",
    "percentile_threshold",
    "resize_masks_nearest",
]

# scipy.ndimage.gaussian_filter's default truncation: radius = int(4·σ + 0.5), 13 taps at σ = 1.5 (method §4.2).
MASK_TRUNCATE = 4.0
# Keep biased logits finite: half of the dtype's lowest value leaves room to add the logits themselves (method §4.3).
BIAS_FLOOR_FRACTION = 0.5
SOT_POSITION = 0  # the start-of-text column is never biased, so no softmax row is all −inf (method §4.3)


def _symmetric_index(length: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source index of each padded position under half-sample symmetric extension `d c b a | a b c d | d c b a`.

    Repeats the reflection for any radius (period 2·length), as scipy does when the kernel is wider than the map.
    """
    index = torch.arange(-radius, length + radius, device=device) % (2 * length)  # (length + 2·radius,)
    return torch.where(index >= length, 2 * length - 1 - index, index)


def gaussian_smooth_symmetric(
    maps: torch.Tensor, sigma: float = LODA_DEFAULTS.mask_sigma, truncate: float = MASK_TRUNCATE
) -> torch.Tensor:
    """True Gaussian of σ_m before the mask percentile (method §4.2): `scipy.ndimage.gaussian_filter` defaults.

    Weights exp(−x² / (2σ²)) for |x| <= int(truncate·σ + 0.5), normalised; applied along h then along w;
    half-sample symmetric boundary (not torch's 'reflect'); same-size output.

    Shapes:
        maps: (K, h, w), any float dtype; returns (K, h, w) in fp32 (float64 stays float64).
    Raises:
        ConceptSplitError: σ <= 0 or maps that are not (K, h, w).
    """
    if maps.dim() != 3:
        raise ConceptSplitError.build(
            "Attention maps for the fixing masks have the wrong number of dimensions",
            seen=f"shape {tuple(maps.shape)}",
            expected="(K, h, w): one map per concept",
            fix="stack one (h, w) map per object concept",
        )
    if not sigma > 0:
        raise ConceptSplitError.build(
            "Mask smoothing sigma must be positive",
            seen=f"mask_sigma = {sigma}",
            expected="σ_m > 0",
            fix="set mask_sigma to 1.5 (the official code)",
        )
    _, h, w = maps.shape
    dtype = _compute_dtype(maps.dtype)
    radius = int(truncate * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=dtype, device=maps.device)  # (2r + 1,)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    weights = weights / weights.sum()  # (2r + 1,)
    x = maps.to(dtype).unsqueeze(1)  # (K, 1, h, w)
    x = x[:, :, _symmetric_index(h, radius, maps.device), :]  # (K, 1, h + 2r, w)
    x = F.conv2d(x, weights.view(1, 1, -1, 1))  # (K, 1, h, w), along h first, as scipy's axis order
    x = x[:, :, :, _symmetric_index(w, radius, maps.device)]  # (K, 1, h, w + 2r)
    x = F.conv2d(x, weights.view(1, 1, 1, -1))  # (K, 1, h, w)
    return x.squeeze(1)  # (K, h, w)


def percentile_threshold(maps: torch.Tensor, q: float) -> torch.Tensor:
    """θ_k, the q-quantile of each map with linear interpolation, equal to `numpy.percentile(map, 100·q)` (§4.2).

    Shapes:
        maps: (..., h, w), any float dtype; returns (...) in fp32 (float64 stays float64).
    Raises:
        ConceptSplitError: q outside [0, 1].
    """
    if not 0.0 <= q <= 1.0:
        raise ConceptSplitError.build(
            "Mask percentile must be a fraction",
            seen=f"q = {q}",
            expected="0 <= q <= 1 (0.90 = 90th percentile, γ)",
            fix="write the percentile as a fraction, e.g. 0.90 instead of 90",
        )
    flat = maps.to(_compute_dtype(maps.dtype)).flatten(-2)  # (..., h·w)
    values = flat.sort(dim=-1).values  # (..., h·w), ascending
    count = values.shape[-1]
    position = q * (count - 1)
    lower = math.floor(position)
    upper = min(lower + 1, count - 1)
    fraction = position - lower
    below = values[..., lower]  # (...)
    above = values[..., upper]  # (...)
    # numpy's _lerp: interpolate from the nearer end, so q = 1 returns the maximum exactly.
    if fraction >= 0.5:
        return above - (above - below) * (1.0 - fraction)
    return below + (above - below) * fraction


def build_fixing_masks(concept_maps: torch.Tensor, config: LodaConfig = LODA_DEFAULTS) -> torch.Tensor:
    """mask_k = G_σm(Ā[:, :, s_k]) >= θ_k, θ_k its γ-quantile: about the top 10 % (method §4.2).

    Shapes:
        concept_maps: (K, h, w), Ā[:, :, s_k] at the map level, in concept order; any float dtype.
        returns: (K, h, w) bool. 58 of 576 pixels per concept at 24×24 when values are distinct, more with ties.
    Raises:
        ConceptSplitError: maps that are not (K, h, w) or hold NaN/inf.
    """
    if concept_maps.dim() == 3 and not bool(torch.isfinite(concept_maps).all()):
        raise ConceptSplitError.build(
            "Attention maps for the fixing masks hold NaN or inf",
            seen="non-finite values in the maps of the last LODA step",
            expected="finite attention probabilities",
            fix="run the model in fp32 or lower LODA's step_scale; the latent update diverged",
        )
    smoothed = gaussian_smooth_symmetric(concept_maps.detach(), config.mask_sigma, MASK_TRUNCATE)  # (K, h, w)
    threshold = percentile_threshold(smoothed, config.mask_percentile)  # (K,)
    return smoothed >= threshold[:, None, None]  # (K, h, w) bool


def resize_masks_nearest(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Masks at another layer's grid, nearest neighbour as `F.interpolate(mode='nearest')` (method §4.3 "Layers").

    Shapes:
        masks: (K, h0, w0) bool; returns (K, h, w) bool.
    """
    resized = F.interpolate(masks[None].float(), size=(h, w), mode="nearest")  # (1, K, h, w)
    return resized[0] > 0.5  # (K, h, w)


def build_fixing_bias(
    masks_at_layer: torch.Tensor,
    token_positions: Sequence[Sequence[int]],
    num_tokens: int,
    boost: float = LODA_DEFAULTS.boost,
    suppression: float = LODA_DEFAULTS.suppression,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive pre-softmax bias Σ_k R_k ⊗ (p·e_{s_k} + m·Σ_{j≠k} e_{s_j}) (method §4.3, reconstructed).

    Inside concept k's mask, +p goes to every column of k's token and m to every column of the other concepts'
    tokens. A pixel in two masks gets p + m on both tokens, so both are removed there (method §4.3). Sums are
    formed in fp32 (float64 stays float64) and floored at finfo(dtype).min / 2 before the cast, so m = −1e8
    stays finite in fp16/bf16 and adding the bias to logits cannot overflow. Column 0 (SOT) is never biased.

    Args:
        masks_at_layer: R_k, flattened to this layer's N pixels.
        token_positions: per concept, its columns s_k, including repeats when the host tiles the context
            (one per 77-token window copy).
        num_tokens: T, the key length of this layer's cross-attention.
        boost: p. suppression: m.
        dtype: dtype of the logits the bias is added to.
    Shapes:
        masks_at_layer: (K, N) bool; returns (N, T) in `dtype`, on the masks' device; broadcast over B·H.
    Raises:
        ConceptSplitError: concept counts disagree, a position is SOT or >= T, or two concepts share a column.
    """
    if masks_at_layer.dim() != 2 or masks_at_layer.shape[0] != len(token_positions):
        raise ConceptSplitError.build(
            "Fixing masks and token positions disagree",
            seen=f"masks of shape {tuple(masks_at_layer.shape)} for {len(token_positions)} concepts' positions",
            expected="masks (K, N) with one row per concept, K = number of position lists",
            fix="flatten the masks to the layer's pixels and pass one position list per object concept",
        )
    claimed: dict[int, int] = {}
    for concept, positions in enumerate(token_positions):
        if len(positions) == 0:
            raise ConceptSplitError.build(
                f"Concept {concept} has no token position for attention fixing",
                seen="an empty position list",
                expected="at least one column s_k",
                fix="compute the identifier positions from the prompt before sampling",
            )
        for position in positions:
            if not SOT_POSITION < position < num_tokens:
                raise ConceptSplitError.build(
                    f"Token position of concept {concept} is outside the attention's text tokens",
                    seen=f"position {position} with T = {num_tokens} tokens",
                    expected=f"{SOT_POSITION + 1} <= position < {num_tokens} (column {SOT_POSITION} is SOT)",
                    fix="recompute the identifier positions from the prompt the model actually receives",
                )
            if claimed.setdefault(position, concept) != concept:
                raise ConceptSplitError.build(
                    "Two concepts share a token position",
                    seen=f"position {position} for concepts {claimed[position]} and {concept}",
                    expected="a distinct identifier token per concept",
                    fix="give each concept its own word occurrence in the prompt",
                )
    compute = _compute_dtype(dtype)
    device = masks_at_layer.device
    num_pixels = masks_at_layer.shape[1]
    own = torch.zeros(len(token_positions), num_tokens, dtype=compute, device=device)  # (K, T), e_{s_k}
    for concept, positions in enumerate(token_positions):
        own[concept, list(positions)] = 1.0
    others = own.sum(dim=0, keepdim=True) - own  # (K, T), Σ_{j≠k} e_{s_j}
    bias = torch.zeros(num_pixels, num_tokens, dtype=compute, device=device)  # (N, T)
    zero = torch.zeros((), dtype=compute, device=device)
    for concept in range(len(token_positions)):
        row = boost * own[concept] + suppression * others[concept]  # (T,)
        bias = bias + torch.where(masks_at_layer[concept, :, None], row[None, :], zero)  # (N, T)
    floor = torch.finfo(dtype).min * BIAS_FLOOR_FRACTION
    return bias.clamp(min=floor).to(dtype)  # (N, T)


def aggregate_maps(
    probs_list: Sequence[torch.Tensor], grid_sizes: Union[Sequence[tuple[int, int]], tuple[int, int]]
) -> torch.Tensor:
    """Ā: mean of cross-attention probabilities over heads and layers, one uniform vote per map (method §3.1).

    All maps are pooled before averaging (Attend-and-Excite `aggregate_attention`), so a layer with more heads
    weighs more. Pass only the rows you want: the conditional rows, or cond and uncond for `mask_source`.
    Differentiable; keep stage 1's maps in the graph.

    Args:
        probs_list: per layer, softmax(QKᵀ/√D) over all T keys (SOT included), head rows or one averaged map.
        grid_sizes: each layer's (h, w), or one (h, w) for all; all must be the same level.
    Shapes:
        probs_list[l]: (B·H, N, T) or (N, T), any float dtype. returns: (h, w, T) in fp32 (float64 stays).
    Raises:
        ConceptSplitError: no layers, N != h·w, layers at different grids, or differing T.
    """
    if len(probs_list) == 0:
        raise ConceptSplitError.build(
            "No attention maps were captured at the map level",
            seen="an empty list of layers",
            expected="at least one cross-attention layer at latent/4",
            fix="check that the model has cross-attention layers at latent/4 (24×24 at 768 px for SD2.1)",
        )
    if len(grid_sizes) == 2 and all(isinstance(side, int) for side in grid_sizes):
        grid_sizes = [tuple(grid_sizes)] * len(probs_list)
    if len(grid_sizes) != len(probs_list) or len(set(map(tuple, grid_sizes))) != 1:
        raise ConceptSplitError.build(
            "Attention maps of different grids cannot be averaged",
            seen=f"{len(probs_list)} layers with grids {list(grid_sizes)}",
            expected="one (h, w) per layer, all equal (the latent/4 level)",
            fix="capture only the layers at the map level",
        )
    h, w = grid_sizes[0]
    total = None
    count = 0
    num_tokens = probs_list[0].shape[-1]
    for layer, probs in enumerate(probs_list):
        if probs.dim() == 2:
            probs = probs[None]  # (1, N, T)
        if probs.dim() != 3 or probs.shape[1] != h * w or probs.shape[2] != num_tokens:
            raise ConceptSplitError.build(
                f"Attention map of layer {layer} does not match the {h}×{w} grid",
                seen=f"shape {tuple(probs.shape)}",
                expected=f"(B·H, N = {h}·{w} = {h * w}, T = {num_tokens})",
                fix="derive (h, w) from the latent's aspect ratio, ceil at each downsampling",
            )
        layer_sum = probs.to(_compute_dtype(probs.dtype)).sum(dim=0)  # (N, T)
        total = layer_sum if total is None else total + layer_sum.to(total.dtype)
        count += probs.shape[0]
    return rearrange(total / count, "(h w) T -> h w T", h=h, w=w)  # (h, w, T)


def concept_maps(aggregated: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """M_k = Ā[:, :, s_k] for each object concept, in concept order (method §3.2 step 1, §4.2).

    Shapes:
        aggregated: (h, w, T); returns (K, h, w) in the same dtype, differentiable.
    Raises:
        ConceptSplitError: a position is SOT or outside 0..T−1.
    """
    num_tokens = aggregated.shape[-1]
    for position in positions:
        if not SOT_POSITION < position < num_tokens:
            raise ConceptSplitError.build(
                "Concept token position is outside the attention map's tokens",
                seen=f"position {position} with T = {num_tokens}",
                expected=f"{SOT_POSITION + 1} <= position < {num_tokens} (column {SOT_POSITION} is SOT)",
                fix="recompute the identifier positions from the prompt the model actually receives",
            )
    return rearrange(aggregated[:, :, list(positions)], "h w K -> K h w")  # (K, h, w)
