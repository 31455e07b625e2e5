"""LODA stage 2, attention fixing (method §3.1, §4) against independent numpy references written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conceptsplit_core.attention_fixing import (
    aggregate_maps,
    build_fixing_bias,
    build_fixing_masks,
    concept_maps,
    gaussian_smooth_symmetric,
    percentile_threshold,
    resize_masks_nearest,
)
from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.loda_config import LodaConfig

# ---------- independent numpy references ----------


def _symmetric(i: int, n: int) -> int:
    """Half-sample symmetric index `d c b a | a b c d | d c b a`, reflecting as often as needed."""
    while i < 0 or i >= n:
        i = -i - 1 if i < 0 else 2 * n - 1 - i
    return i


def _ref_gaussian(maps: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(map, sigma) defaults, as a full 2-D weighted sum."""
    radius = int(truncate * sigma + 0.5)
    offsets = range(-radius, radius + 1)
    g = np.array([math.exp(-0.5 * (t / sigma) ** 2) for t in offsets])
    g = g / g.sum()
    k, h, w = maps.shape
    out = np.zeros_like(maps, dtype=np.float64)
    for a, ga in zip(offsets, g):
        for b, gb in zip(offsets, g):
            rows = [_symmetric(y + a, h) for y in range(h)]
            cols = [_symmetric(x + b, w) for x in range(w)]
            out += ga * gb * maps[:, rows][:, :, cols]
    return out


def _ref_nearest(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    h0, w0 = mask.shape
    out = np.zeros((h, w), dtype=bool)
    for y in range(h):
        for x in range(w):
            out[y, x] = mask[min(int(math.floor(y * h0 / h)), h0 - 1), min(int(math.floor(x * w0 / w)), w0 - 1)]
    return out


# ---------- Gaussian with symmetric boundary ----------


def test_gaussian_matches_symmetric_reference():
    maps = np.random.default_rng(0).random((3, 24, 24))
    out = gaussian_smooth_symmetric(torch.tensor(maps, dtype=torch.float32), 1.5)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    # float32 against float64: two 13-tap passes on values ≤ 1, ≤ 2·13 + 2 roundings ≈ 3.3e-6 below 1e-5 (84 eps32)
    np.testing.assert_allclose(out.numpy(), _ref_gaussian(maps, 1.5), atol=1e-5)


@pytest.mark.parametrize("shape, sigma", [((2, 4, 3), 1.5), ((1, 1, 5), 2.0), ((1, 9, 13), 0.7)])
def test_gaussian_reflects_repeatedly_when_kernel_exceeds_map(shape, sigma):
    maps = np.random.default_rng(1).random(shape)
    out = gaussian_smooth_symmetric(torch.tensor(maps), sigma)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), _ref_gaussian(maps, sigma), atol=1e-12)  # float64 both: ~30 eps64 ≈ 7e-15


def test_gaussian_is_not_torch_reflect_convention():
    maps = np.zeros((1, 8, 8))
    maps[0, 0, 0] = 1.0  # a corner impulse: the symmetric boundary folds the edge pixel back onto itself
    out = gaussian_smooth_symmetric(torch.tensor(maps), 1.5).numpy()
    g = np.array([math.exp(-0.5 * (t / 1.5) ** 2) for t in range(-6, 7)])
    g = g / g.sum()
    assert out[0, 0, 0] == pytest.approx((g[6] + g[5]) ** 2, abs=1e-12)  # offsets 0 and the mirror −1 -> 0 (float64)


def test_gaussian_rejects_bad_sigma_and_shape():
    with pytest.raises(ConceptSplitError, match=r"sigma must be positive.*mask_sigma = 0"):
        gaussian_smooth_symmetric(torch.rand(1, 8, 8), 0)
    with pytest.raises(ConceptSplitError, match=r"wrong number of dimensions.*\(8, 8\)"):
        gaussian_smooth_symmetric(torch.rand(8, 8), 1.5)


# ---------- percentile ----------


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 1.0])
def test_percentile_matches_numpy(q):
    rng = np.random.default_rng(2)
    maps = rng.random((3, 24, 24))
    maps[1] = np.round(maps[1] * 5) / 5  # heavy ties
    got = percentile_threshold(torch.tensor(maps), q).numpy()
    expected = [np.percentile(m, 100 * q) for m in maps]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)  # float64: one interpolation, a few eps64


def test_percentile_fp32_matches_numpy():
    maps = np.random.default_rng(3).random((2, 7, 5)).astype(np.float32)
    got = percentile_threshold(torch.tensor(maps), 0.9).numpy()
    # float32 interpolation between two order statistics ≤ 1 against float64: ≤ 3 roundings; 1e-6 ≈ 8 eps32
    np.testing.assert_allclose(got, [np.percentile(m.astype(np.float64), 90) for m in maps], atol=1e-6)


@pytest.mark.parametrize("q", [90.0, -0.1, 1.01])
def test_percentile_rejects_non_fraction(q):
    with pytest.raises(ConceptSplitError, match=rf"percentile must be a fraction.*q = {q}"):
        percentile_threshold(torch.rand(2, 4, 4), q)


# ---------- masks ----------


def test_masks_are_top_ten_percent_of_smoothed_maps():
    maps = np.random.default_rng(4).random((3, 24, 24))
    masks = build_fixing_masks(torch.tensor(maps, dtype=torch.float32), LodaConfig())
    assert masks.dtype == torch.bool and masks.shape == (3, 24, 24)
    smoothed = _ref_gaussian(maps, 1.5)
    for k in range(3):
        assert len(np.unique(smoothed[k])) == 576
        expected = smoothed[k] >= np.percentile(smoothed[k], 90)
        assert expected.sum() == 58
        np.testing.assert_array_equal(masks[k].numpy(), expected)


def test_masks_follow_config_percentile_and_ties():
    maps = np.random.default_rng(5).random((2, 24, 24))
    maps[1] = 0.25  # constant map: every pixel ties at the threshold
    masks = build_fixing_masks(torch.tensor(maps), LodaConfig(mask_percentile=0.8))
    smoothed = _ref_gaussian(maps[:1], 1.5)[0]
    np.testing.assert_array_equal(masks[0].numpy(), smoothed >= np.percentile(smoothed, 80))
    assert int(masks[0].sum()) == 576 - 460  # θ = sorted[0.8·575] = sorted[460]: indices 460..575
    assert int(masks[1].sum()) == 576


def test_masks_reject_non_finite_maps():
    maps = torch.rand(2, 24, 24)
    maps[1, 3, 3] = float("nan")
    with pytest.raises(ConceptSplitError, match=r"NaN or inf"):
        build_fixing_masks(maps, LodaConfig())


@pytest.mark.parametrize("size", [(48, 48), (12, 12), (96, 96), (7, 10), (24, 24)])
def test_resize_masks_nearest_matches_reference(size):
    masks = torch.rand(2, 24, 24) > 0.7
    out = resize_masks_nearest(masks, *size)
    assert out.dtype == torch.bool and out.shape == (2, *size)
    for k in range(2):
        np.testing.assert_array_equal(out[k].numpy(), _ref_nearest(masks[k].numpy(), *size))


# ---------- logit bias ----------


def _bias_case():
    # pixel 0: mask of concept 0 only; 1: concept 1 only; 2: both; 3: none. Concept 0 is tiled at 2 and 12.
    masks = torch.tensor([[True, False, True, False], [False, True, True, False]])  # (K = 2, N = 4)
    positions = [[2, 12], [3]]
    return masks, positions


def test_bias_values_at_chosen_pixels():
    masks, positions = _bias_case()
    p, m = 5.0, -1e8
    bias = build_fixing_bias(masks, positions, 20, p, m, torch.float64).numpy()  # (N, T)
    assert bias.shape == (4, 20)
    assert bias[0, 2] == p and bias[0, 12] == p and bias[0, 3] == m
    assert bias[1, 3] == p and bias[1, 2] == m and bias[1, 12] == m
    assert bias[2, 2] == p + m and bias[2, 12] == p + m and bias[2, 3] == p + m  # overlap removes both
    assert not bias[3].any() and not bias[:, 0].any()
    expected = np.zeros((4, 20))  # Σ_k R_k ⊗ (p·e_{s_k} + m·Σ_{j≠k} e_{s_j}) by loops
    for k, own in enumerate(positions):
        for n in range(4):
            if masks[k, n]:
                for s in own:
                    expected[n, s] += p
                for j, other in enumerate(positions):
                    if j != k:
                        for s in other:
                            expected[n, s] += m
    np.testing.assert_array_equal(bias, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_stays_finite_in_low_precision(dtype):
    masks = torch.ones(3, 5, dtype=torch.bool)  # every pixel in all three masks: p + 2m per token
    bias = build_fixing_bias(masks, [[1], [2], [3]], 8, 5.0, -1e8, dtype)
    floor = torch.finfo(dtype).min / 2
    assert bias.dtype == dtype and bool(torch.isfinite(bias).all())
    expected = torch.tensor(max(5.0 - 2e8, floor)).to(dtype).item()  # fp16: floored; bf16: −2e8 fits
    assert bias[:, 1:4].float().unique().tolist() == [expected]
    assert (floor < -1e8) == (dtype == torch.bfloat16)
    logits = torch.randn(2, 5, 8).to(dtype) * 10  # (B·H, N, T)
    attn = torch.softmax(logits + bias, dim=-1)
    assert bool(torch.isfinite(attn).all()) and float(attn[:, :, 1:4].max()) == 0.0


def test_bias_fp32_keeps_paper_suppression():
    masks, positions = _bias_case()
    bias = build_fixing_bias(masks, positions, 20, 5.0, -1e8, torch.float32)
    assert bias.dtype == torch.float32 and bias[0, 3].item() == -1e8 and bias[0, 2].item() == 5.0


@pytest.mark.parametrize(
    "masks, positions, pattern",
    [
        (torch.ones(3, 4, dtype=torch.bool), [[2], [3]], r"masks of shape \(3, 4\) for 2 concepts"),
        (torch.ones(2, 4, dtype=torch.bool), [[0], [3]], r"position 0 with T = 20.*SOT"),
        (torch.ones(2, 4, dtype=torch.bool), [[2], [20]], r"position 20 with T = 20"),
        (torch.ones(2, 4, dtype=torch.bool), [[2, 7], [7]], r"share a token position.*position 7"),
        (torch.ones(2, 4, dtype=torch.bool), [[2], []], r"Concept 1 has no token position"),
    ],
)
def test_bias_rejects_bad_input(masks, positions, pattern):
    with pytest.raises(ConceptSplitError, match=pattern):
        build_fixing_bias(masks, positions, 20)


# ---------- aggregation ----------


def test_aggregate_pools_heads_and_layers():
    rng = np.random.default_rng(6)
    layers = [rng.random((4, 12, 5)), rng.random((2, 12, 5)), rng.random((12, 5))]  # (B·H, N, T) / (N, T)
    tensors = [torch.tensor(layers[0], requires_grad=True), torch.tensor(layers[1]).half(), torch.tensor(layers[2])]
    out = aggregate_maps(tensors, (3, 4))
    assert out.shape == (3, 4, 5) and out.dtype == torch.float64 and out.requires_grad
    stacked = [layers[0][i] for i in range(4)] + [layers[1][i].astype(np.float16) for i in range(2)] + [layers[2]]
    expected = np.zeros((3, 4, 5))
    for y in range(3):
        for x in range(4):
            for t in range(5):
                expected[y, x, t] = sum(float(m[y * 4 + x, t]) for m in stacked) / 7
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-12)  # float64 sums of 7 values ≤ 1 (fp16 exact)
    same = aggregate_maps(tensors, [(3, 4), (3, 4), (3, 4)])
    np.testing.assert_array_equal(same.detach().numpy(), out.detach().numpy())


def test_aggregate_rejects_bad_layers():
    with pytest.raises(ConceptSplitError, match=r"No attention maps.*empty list"):
        aggregate_maps([], (24, 24))
    with pytest.raises(ConceptSplitError, match=r"does not match the 24×24 grid.*\(20, 560, 77\).*576"):
        aggregate_maps([torch.rand(20, 560, 77)], (24, 24))
    with pytest.raises(ConceptSplitError, match=r"different grids.*\(24, 24\), \(12, 12\)"):
        aggregate_maps([torch.rand(2, 576, 77), torch.rand(2, 144, 77)], [(24, 24), (12, 12)])
    with pytest.raises(ConceptSplitError, match=r"layer 1 does not match.*\(2, 576, 76\)"):
        aggregate_maps([torch.rand(2, 576, 77), torch.rand(2, 576, 76)], (24, 24))


def test_concept_maps_pick_token_columns():
    aggregated = torch.rand(6, 5, 77)
    out = concept_maps(aggregated, [5, 2])
    assert out.shape == (2, 6, 5)
    np.testing.assert_array_equal(out[0].numpy(), aggregated.numpy()[:, :, 5])
    np.testing.assert_array_equal(out[1].numpy(), aggregated.numpy()[:, :, 2])
    for bad in (0, 77):
        with pytest.raises(ConceptSplitError, match=rf"position {bad} with T = 77"):
            concept_maps(aggregated, [2, bad])
