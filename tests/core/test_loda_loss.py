"""LODA stage 1 (method §3.2-§3.4) against independent numpy references written out here."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.loda_config import UI_OPTIONS, UI_RANGES, LodaConfig
from conceptsplit_core.loda_loss import (
    attend_excite_kernel,
    default_loda_steps,
    harmonic_mean_kl,
    kdiffusion_latent_update,
    normalize_map,
    pairwise_kl,
    separation_loss,
    smooth_attention_map,
    step_size,
    vp_latent_update,
)
from comfy_harness.tolerance import float32_tolerance, float64_tolerance

SPEC_G = [0.0765, 0.1334, 0.1861, 0.2080, 0.1861, 0.1334, 0.0765]  # method §3.2, σ = 1.5


def _random_maps(seed: int, k: int = 3, h: int = 24, w: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).random((k, h, w)) + 0.01  # (K, h, w), positive like attention


# ---------- independent numpy references ----------


def _ref_kernel(sigma: float) -> np.ndarray:
    g = np.array([math.exp(-(((x - 3) / (2 * sigma)) ** 2)) for x in range(7)])
    g = g / g.sum()
    return np.outer(g, g)  # (7, 7)


def _ref_smooth(maps: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Mirror-without-edge pad of 1, then a valid 7×7 correlation, by explicit loops."""
    kern = _ref_kernel(sigma)
    k, h, w = maps.shape

    def mirror(i: int, n: int) -> int:
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    out = np.zeros((k, h - 4, w - 4))
    for c in range(k):
        for y in range(h - 4):
            for x in range(w - 4):
                acc = 0.0
                for dy in range(7):
                    for dx in range(7):
                        acc += kern[dy, dx] * maps[c, mirror(y + dy - 1, h), mirror(x + dx - 1, w)]
                out[c, y, x] = acc
    return out


def _ref_normalize(maps: np.ndarray) -> np.ndarray:
    return np.stack([m / m.sum() + 1e-10 for m in maps])


def _ref_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(a * math.log(a / b) for a, b in zip(p.ravel(), q.ravel())))


def _ref_loss(maps: np.ndarray, tau: float, symmetric: bool = False) -> float:
    probs = _ref_normalize(_ref_smooth(maps))
    k = len(probs)
    pairs = [(a, b) for a in range(k) for b in range(k) if (a != b if symmetric else a < b)]
    kls = [_ref_kl(probs[a], probs[b]) for a, b in pairs]
    return max(0.0, tau - statistics.harmonic_mean(kls))


# ---------- kernel, smoothing, normalisation ----------


def test_kernel_matches_spec_reference_values():
    kernel = attend_excite_kernel(1.5, 7, torch.float64).numpy()
    np.testing.assert_allclose(kernel.sum(axis=1), SPEC_G, atol=1e-4)  # rows sum to g (spec's 4 decimals)
    np.testing.assert_allclose(kernel, _ref_kernel(1.5), atol=1e-12)  # float64 both: a few eps64 of values ≤ 1
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)  # float64: 49 terms, ≤ 49 eps64


def test_smoothing_matches_loop_reference_and_shape():
    maps = _random_maps(0)
    out = smooth_attention_map(torch.tensor(maps, dtype=torch.float32))
    assert out.shape == (3, 20, 20) and out.dtype == torch.float32
    # float32 against float64: a 49-term weighted sum of values ≤ 1.01 per cell, ≤ 50 roundings ≈ 6e-6 < 1e-5
    np.testing.assert_allclose(out.numpy(), _ref_smooth(maps), atol=1e-5)


def test_smoothing_promotes_half_precision_to_fp32():
    maps = _random_maps(1, k=2, h=9, w=11)
    out = smooth_attention_map(torch.tensor(maps).to(torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (2, 5, 7)
    # bf16 input rounding only: ≤ 2⁻⁹ relative (3.9e-3 · 1.01 at most) of each value, and a convex sum keeps that
    np.testing.assert_allclose(out.numpy(), _ref_smooth(maps), atol=1e-2)


def test_smoothing_rejects_maps_smaller_than_kernel():
    with pytest.raises(ConceptSplitError, match=r"smaller than the LODA smoothing kernel.*6×24.*at least 7×7"):
        smooth_attention_map(torch.rand(2, 6, 24))
    with pytest.raises(ConceptSplitError, match=r"wrong number of dimensions.*\(24, 24\)"):
        smooth_attention_map(torch.rand(24, 24))


def test_normalize_divides_by_sum_then_adds_epsilon():
    maps = _random_maps(2, h=20, w=20)
    out = normalize_map(torch.tensor(maps)).numpy()
    np.testing.assert_allclose(out, _ref_normalize(maps), rtol=0, atol=1e-15)  # float64: a 400-term sum, values ≤ 5e-3
    np.testing.assert_allclose(out.sum(axis=(1, 2)), 1 + 400e-10, rtol=0, atol=1e-12)  # not renormalised; 400 eps64


# ---------- KL, harmonic mean, loss ----------


def test_pairwise_kl_ordered_and_symmetric():
    probs = _ref_normalize(_random_maps(3, k=3, h=20, w=20) ** 4)
    ordered = pairwise_kl(torch.tensor(probs), "ordered").numpy()
    expected = [_ref_kl(probs[a], probs[b]) for a, b in [(0, 1), (0, 2), (1, 2)]]
    np.testing.assert_allclose(ordered, expected, rtol=1e-10)  # float64 sums of 400 terms, KL ~1: ≤ 1e-13 relative
    symmetric = pairwise_kl(torch.tensor(probs), "symmetric").numpy()
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    np.testing.assert_allclose(symmetric, [_ref_kl(probs[a], probs[b]) for a, b in pairs], rtol=1e-10)
    assert not np.allclose(symmetric[0], symmetric[2])  # KL is not symmetric: the option matters (by ~10 %)


def test_pairwise_kl_rejects_unknown_mode():
    with pytest.raises(ConceptSplitError, match=r"Unknown KL pair mode.*'both'"):
        pairwise_kl(torch.rand(2, 4, 4), "both")


@pytest.mark.parametrize("kls", [[0.5, 2.0, 4.0], [0.2, 2.0, 4.0], [0.7], [0.01, 3.0, 1.0, 9.0, 0.4, 2.5]])
def test_harmonic_mean_matches_statistics(kls):
    value = harmonic_mean_kl(torch.tensor(kls, dtype=torch.float64)).item()
    assert value == pytest.approx(statistics.harmonic_mean(kls), abs=1e-12)  # float64, a few ops on values ≤ 100


@pytest.mark.parametrize("kls, hm, loss", [((0.5, 2.0, 4.0), 3 / 2.75, 0.0), ((0.2, 2.0, 4.0), 3 / 5.75, 1 - 3 / 5.75)])
def test_spec_worked_example(kls, hm, loss):
    value = harmonic_mean_kl(torch.tensor(kls, dtype=torch.float64))
    assert value.item() == pytest.approx(hm, abs=1e-12)  # float64, a few ops
    assert round(value.item(), 2) == (1.09 if loss == 0 else 0.52)
    assert torch.relu(1.0 - value).item() == pytest.approx(loss, abs=1e-12)
    assert round(loss, 2) in (0.0, 0.48)


@pytest.mark.parametrize("pairs", ["ordered", "symmetric"])
def test_separation_loss_matches_reference(pairs):
    maps = _random_maps(4) ** 6  # peaky maps: KLs near 1
    config = LodaConfig(kl_threshold=5.0, kl_pairs=pairs)
    loss, diag = separation_loss(torch.tensor(maps, dtype=torch.float32), config)
    assert loss.dtype == torch.float32 and loss.shape == ()
    expected = _ref_loss(maps, 5.0, symmetric=pairs == "symmetric")
    assert expected > 0
    # The maths in float64: smoothing (49-term sums), normalising and KL (400-term sums), values ≤ 5: ≤ ~10³ eps64.
    # Ordered and symmetric pairs differ by 4e-4 in the loss, far outside it.
    loss64, diag64 = separation_loss(torch.tensor(maps), config)
    exact = float64_tolerance(5.0, 49 + 2 * 400 + 10)
    assert loss64.item() == pytest.approx(expected, abs=exact)
    assert diag64.loss.item() == pytest.approx(expected, abs=exact)
    assert diag64.harmonic_mean.item() == pytest.approx(5.0 - expected, abs=exact)
    # The float32 path LODA runs: the same chain, within that many eps32 of values ≤ 5 (5e-4, a worst-case bound;
    # the float64 check above is the sharp one)
    rounded = float32_tolerance(5.0, 49 + 2 * 400 + 10)
    assert loss.item() == pytest.approx(expected, abs=rounded)
    assert diag.loss.item() == pytest.approx(expected, abs=rounded)
    assert diag.harmonic_mean.item() == pytest.approx(5.0 - expected, abs=rounded)
    assert len(diag.pairs) == diag.pairwise_kl.shape[0] == (3 if pairs == "ordered" else 6)
    assert not diag.pairwise_kl.requires_grad


def test_separation_loss_fp16_input_computed_in_fp32():
    maps = torch.tensor(_random_maps(5, k=2) ** 6)
    loss_half, _ = separation_loss(maps.half(), LodaConfig(kl_threshold=5.0))
    loss_ref, _ = separation_loss(maps.half().float(), LodaConfig(kl_threshold=5.0))
    assert loss_half.dtype == torch.float32
    assert loss_half.item() == pytest.approx(loss_ref.item(), abs=1e-6)  # the same float32 ops: ≤ 1 ulp at 5 (6e-7)


def test_separation_loss_is_zero_above_threshold():
    loss, diag = separation_loss(torch.tensor(_random_maps(6) ** 6), LodaConfig(kl_threshold=0.0))
    assert loss.item() == 0.0 and diag.harmonic_mean.item() > 0


def test_separation_loss_gradient_matches_finite_differences():
    maps = _random_maps(7, k=3, h=8, w=8) ** 3  # (3, 8, 8) -> smoothed (3, 4, 4)
    tau = 10.0
    x = torch.tensor(maps, dtype=torch.float64, requires_grad=True)
    loss, _ = separation_loss(x, LodaConfig(kl_threshold=tau))
    (grad,) = torch.autograd.grad(loss, x)
    step = 1e-6
    numeric = np.zeros_like(maps)
    for index in np.ndindex(*maps.shape):
        plus, minus = maps.copy(), maps.copy()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (_ref_loss(plus, tau) - _ref_loss(minus, tau)) / (2 * step)
    assert np.abs(numeric).max() > 1e-3
    # float64 central differences at h = 1e-6: rounding ≈ eps64·|L|/h ≈ 1e-9, truncation ≈ h²·|L'''| is smaller still;
    # 1e-5 is 1 % of the gradient's size, which a wrong chain rule misses by order 1
    np.testing.assert_allclose(grad.numpy(), numeric, atol=1e-5)


def test_separation_loss_needs_two_concepts():
    with pytest.raises(ConceptSplitError, match=r"at least 2 object concept maps.*\(1, 24, 24\)"):
        separation_loss(torch.rand(1, 24, 24))


# ---------- step sizes and default N ----------


def test_linear_step_sizes_match_paper():
    expected = [40.0, 39.6, 39.2, 38.8, 38.4, 38.0, 37.6, 37.2, 36.8, 36.4]
    got = [step_size(i, 50) for i in range(10)]
    np.testing.assert_allclose(got, expected, atol=1e-12)  # float64, a few ops on values ≤ 40: ~1e-14
    assert step_size(3, 50, LodaConfig(step_scale=20.0)) == pytest.approx((40 - 20 * 3 / 50) / 2, abs=1e-12)


def test_sqrt_step_sizes_match_official_code():
    config = LodaConfig(step_schedule="sqrt")
    got = [step_size(i, 50, config) for i in range(10)]
    ratios = np.linspace(1.0, 0.5, 50)
    np.testing.assert_allclose(got, [20 * math.sqrt(r) for r in ratios[:10]], atol=1e-12)  # float64 on values ≤ 20
    assert got[0] == 20.0 and round(got[9], 2) == 19.06
    assert step_size(0, 1, config) == 20.0


def test_step_size_rejects_index_outside_steps():
    with pytest.raises(ConceptSplitError, match=r"outside the sampling steps.*step 50 of 50"):
        step_size(50, 50)
    with pytest.raises(ConceptSplitError, match=r"step 0 of 0"):
        step_size(0, 0)


def test_step_size_rejects_unknown_schedule():
    with pytest.raises(ConceptSplitError, match=r"Unknown LODA step schedule.*'cosine'"):
        step_size(0, 50, LodaConfig(step_schedule="cosine"))


@pytest.mark.parametrize("steps, n", [(50, 10), (20, 4), (30, 6), (25, 5), (8, 2), (3, 1)])
def test_default_loda_steps(steps, n):
    assert default_loda_steps(steps) == n
    assert LodaConfig().loda_steps_for(steps) == n


# ---------- latent updates (method §3.4) ----------


def test_kdiffusion_update_equals_vp_update_on_toy_loss():
    rng = np.random.default_rng(8)
    z = rng.standard_normal((1, 4, 6, 5))
    a = rng.standard_normal((1, 4, 6, 5))
    sigma, eta = 3.7, 38.8
    scale = math.sqrt(1 + sigma**2)

    def toy_loss(latent: torch.Tensor) -> torch.Tensor:  # L(z) = Σ a·sin z + (Σ z)² / 100
        return (torch.tensor(a) * torch.sin(latent)).sum() + latent.sum() ** 2 / 100

    grad_z_ref = a * np.cos(z) + 2 * z.sum() / 100  # ∇_z L by hand
    x = torch.tensor(z * scale, requires_grad=True)
    (grad_x,) = torch.autograd.grad(toy_loss(x / scale), x)
    x_new = kdiffusion_latent_update(x.detach(), grad_x, sigma, eta)
    # float64: autograd's Σz over 120 values (≤ 120 eps64·Σ|z|, times 2η/100 in the gradient step: ~2e-12) and a few
    # roundings of values ≤ 80; 1e-9 is far above that and far below a wrong σ scaling (a factor √(1 + σ²) ≈ 3.8)
    np.testing.assert_allclose(x_new.numpy() / scale, z - eta * grad_z_ref, atol=1e-9)
    z_new = vp_latent_update(torch.tensor(z), torch.tensor(grad_z_ref), eta)
    np.testing.assert_allclose(z_new.numpy(), z - eta * grad_z_ref, atol=1e-12)  # the same float64 ops: exact here


def test_kdiffusion_update_per_row_sigma():
    x = torch.ones(2, 1, 2, 2, dtype=torch.float64)
    grad = torch.full_like(x, 0.5)
    out = kdiffusion_latent_update(x, grad, torch.tensor([0.0, 2.0]), 2.0)
    assert out[0].unique().tolist() == [1 - 2 * 1 * 0.5] and out[1].unique().tolist() == [1 - 2 * 5 * 0.5]


# ---------- config ----------


def test_config_defaults_match_spec():
    c = LodaConfig()
    stage_1 = (c.loda_steps, c.inner_iterations, c.kl_threshold, c.step_scale, c.step_schedule, c.smoothing_sigma)
    assert stage_1 == (-1, 1, 1.0, 40.0, "linear", 1.5)  # -1 = auto, round(0.2·S)
    assert (c.kl_pairs, c.mask_percentile, c.mask_sigma, c.boost, c.suppression) == ("ordered", 0.90, 1.5, 5.0, -1e8)
    assert (c.fixing_layers, c.fixing_branches, c.mask_source) == ("all", "both", "cond")
    c.validate(50)
    for name, (low, high, _, _) in UI_RANGES.items():
        default = getattr(c, name)
        assert low <= default <= high, name
    for name, options in UI_OPTIONS.items():
        assert getattr(c, name) == options[0], name


@pytest.mark.parametrize("field", sorted(UI_OPTIONS))
def test_config_rejects_unknown_option(field):
    with pytest.raises(ConceptSplitError, match=rf"Unknown LODA option {field}.*'bogus'"):
        LodaConfig(**{field: "bogus"}).validate()


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"mask_percentile": 90.0}, r"mask_percentile.*90\.0.*fraction"),
        ({"mask_percentile": 0.0}, r"mask_percentile = 0\.0"),
        ({"mask_percentile": 1.0}, r"mask_percentile = 1\.0"),
        ({"kl_threshold": -0.5}, r"kl_threshold = -0\.5.*τ >= 0"),
        ({"loda_steps": -2}, r"loda_steps = -2.*-1 \(auto"),
        ({"inner_iterations": 0}, r"inner_iterations = 0"),
        ({"step_scale": -1.0}, r"step_scale = -1\.0"),
        ({"smoothing_sigma": 0.0}, r"smoothing_sigma = 0\.0"),
        ({"mask_sigma": -1.0}, r"mask_sigma = -1\.0"),
        ({"suppression": 5.0}, r"suppression = 5\.0.*m <= 0"),
        ({"boost": float("nan")}, r"boost is not a finite number"),
    ],
)
def test_config_rejects_out_of_range(kwargs, pattern):
    with pytest.raises(ConceptSplitError, match=pattern):
        LodaConfig(**kwargs).validate()


def test_config_checks_loda_steps_against_sampling_steps():
    LodaConfig(loda_steps=20).validate(20)
    with pytest.raises(ConceptSplitError, match=r"More LODA steps than sampling steps.*N = 21 with 20.*N <= 20"):
        LodaConfig(loda_steps=21).validate(20)
    with pytest.raises(ConceptSplitError, match=r"round to zero.*round\(0\.2·2\) = 0"):
        LodaConfig().validate(2)
    with pytest.raises(ConceptSplitError, match=r"no steps.*steps = 0"):
        LodaConfig().validate(0)


def test_loda_steps_minus_one_is_auto_zero_is_off_and_positive_is_explicit():
    assert LodaConfig(loda_steps=-1).loda_steps_for(50) == 10
    assert LodaConfig(loda_steps=0).loda_steps_for(50) == 0
    assert LodaConfig(loda_steps=7).loda_steps_for(50) == 7
    LodaConfig(loda_steps=0).validate(2)  # stage 1 off needs no minimum step count (auto would round to 0)
    assert UI_RANGES["loda_steps"][0] == -1 and "0 = stage 1 off" in UI_RANGES["loda_steps"][3]
