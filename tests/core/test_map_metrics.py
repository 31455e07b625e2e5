"""Map metrics against hand-written numpy references (Table 1 entropy, method §3.2 KL and harmonic mean)."""

import math
import re
import statistics

import numpy as np
import pytest
import torch

from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.loda_loss import separation_loss
from conceptsplit_core.map_metrics import (
    EPSILON,
    entropy,
    format_metrics_report,
    harmonic_mean_kl,
    overlap,
    pairwise_kl_matrix,
    paper_softmax_entropy,
    spatial_distribution,
)


def _random_maps(K=3, h=24, w=24, seed=0):
    generator = np.random.default_rng(seed)
    return generator.random((K, h, w)) ** 3  # (K, h, w) float64, skewed like attention


def _np_distribution(maps):
    flat = maps.reshape(maps.shape[0], -1)  # (K, N)
    return flat / flat.sum(axis=1, keepdims=True) + 1e-10


# float32 results against float64 numpy on maps of 576 cells: torch sums float32 by cascade (pairwise) summation,
# within ~(log2 576 + 8)·eps32 ≈ 2e-6 of the sum of |terms|; the terms are positive (entropy, overlap, the
# normaliser) or sum to the order of the result (KL of maps this different). rtol 1e-5 (84 eps32) covers that.
RTOL_576 = 1e-5


def test_spatial_distribution_matches_spec_step_3():
    maps = _random_maps()
    P = spatial_distribution(torch.tensor(maps, dtype=torch.float32))
    assert P.shape == (3, 24, 24)
    np.testing.assert_allclose(P.flatten(1).numpy(), _np_distribution(maps), rtol=RTOL_576, atol=1e-9)
    np.testing.assert_allclose(P.sum(dim=(1, 2)).numpy(), 1 + 576 * EPSILON, rtol=1e-6)  # a sum ≈ 1: ≤ ~2e-6, see above


def test_entropy_uniform_is_log_positions_and_one_hot_is_zero():
    uniform = torch.ones(1, 24, 24)
    assert entropy(uniform).item() == pytest.approx(math.log(576), abs=RTOL_576 * math.log(576))
    one_hot = torch.zeros(1, 24, 24)
    one_hot[0, 5, 7] = 1.0
    # (N−1)·1e-10·ln(1e10) ≈ 1.3e-6 from the epsilon; the remaining ≈ 0.
    assert abs(entropy(one_hot).item()) < 1e-5


def test_entropy_matches_numpy_reference():
    maps = _random_maps(K=4, h=16, w=20, seed=1)
    P = _np_distribution(maps)
    expected = -(P * np.log(P)).sum(axis=1)
    np.testing.assert_allclose(entropy(torch.tensor(maps, dtype=torch.float32)).numpy(), expected, rtol=RTOL_576)


def test_paper_entropy_stays_near_log_576_for_small_averaged_maps():
    # Averaged attention probabilities are small (about 1/77 per token), the regime of method §7.
    maps = _random_maps(K=2, seed=2) / 77.0
    H_paper = paper_softmax_entropy(torch.tensor(maps, dtype=torch.float32)).numpy()
    flat = maps.reshape(2, -1)
    softmax = np.exp(flat) / np.exp(flat).sum(axis=1, keepdims=True)
    expected = -(softmax * np.log(softmax)).sum(axis=1)
    np.testing.assert_allclose(H_paper, expected, rtol=RTOL_576)
    assert np.all(H_paper < math.log(576))
    assert np.all(math.log(576) - H_paper < 1e-3)
    # The plain entropy of the same maps is far lower: the softmax is what flattens the paper's numbers.
    assert np.all(entropy(torch.tensor(maps, dtype=torch.float32)).numpy() < math.log(576) - 0.1)


def test_pairwise_kl_matches_numpy_reference_both_directions():
    maps = _random_maps(K=3, seed=3)
    P = _np_distribution(maps)
    expected = np.array([[np.sum(P[a] * np.log(P[a] / P[b])) for b in range(3)] for a in range(3)])
    kl = pairwise_kl_matrix(torch.tensor(maps, dtype=torch.float32)).numpy()
    assert kl.shape == (3, 3)
    np.testing.assert_allclose(kl, expected, rtol=RTOL_576, atol=1e-6)  # atol: 10⁻⁶ of KLs ~1, for the 0 diagonal
    assert np.all(np.diag(kl) == 0.0)
    assert not np.allclose(kl, kl.T)  # KL is asymmetric (by ~10 %); both directions are reported


def test_overlap_matches_numpy_histogram_intersection():
    maps = _random_maps(K=3, seed=4)
    flat = maps.reshape(3, -1)
    p = flat / flat.sum(axis=1, keepdims=True)
    expected = np.array([[np.minimum(p[a], p[b]).sum() for b in range(3)] for a in range(3)])
    shared = overlap(torch.tensor(maps, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(shared, expected, rtol=RTOL_576)
    np.testing.assert_allclose(np.diag(shared), 1.0, rtol=RTOL_576)
    disjoint = torch.zeros(2, 4, 4)
    disjoint[0, :2] = 1.0
    disjoint[1, 2:] = 1.0
    assert overlap(disjoint)[0, 1].item() == 0.0


def test_harmonic_mean_matches_statistics_over_ordered_pairs():
    maps = _random_maps(K=3, seed=5)
    kl = pairwise_kl_matrix(torch.tensor(maps, dtype=torch.float32)).numpy()
    expected = statistics.harmonic_mean([kl[0, 1], kl[0, 2], kl[1, 2]])
    # the same float32 KLs combined in float32 against Python's float64: a few roundings of values ~1
    assert harmonic_mean_kl(torch.tensor(maps, dtype=torch.float32)).item() == pytest.approx(expected, rel=1e-5)
    same = torch.tensor(maps[:1], dtype=torch.float32).repeat(2, 1, 1)
    assert harmonic_mean_kl(same).item() == 0.0
    with pytest.raises(ConceptSplitError, match="at least 2 words"):
        harmonic_mean_kl(torch.ones(1, 4, 4))


def test_report_lists_words_pairs_and_numbers():
    maps = torch.tensor(_random_maps(K=3, seed=6), dtype=torch.float32)
    report = format_metrics_report(["dog", "cat", "sofa"], maps)
    H = entropy(maps)
    kl = pairwise_kl_matrix(maps)
    shared = overlap(maps)
    lines = report.splitlines()
    dog_row = next(line for line in lines if line.startswith("dog "))
    assert f"{H[0].item():9.5f}" in dog_row
    assert f"{paper_softmax_entropy(maps)[0].item():10.6f}" in dog_row
    pair_row = next(line for line in lines if line.startswith("cat / sofa "))
    assert pair_row.split()[-3:] == [f"{kl[1, 2].item():.5f}", f"{kl[2, 1].item():.5f}", f"{shared[1, 2].item():.5f}"]
    loda_hm = separation_loss(maps)[1].harmonic_mean.item()  # what LODA's report prints for these maps
    assert lines[-1].startswith("LODA harmonic mean") and lines[-1].endswith(f": {loda_hm:.5f}")
    assert f"{loda_hm:.5f}" != f"{harmonic_mean_kl(maps).item():.5f}"  # smoothing matters: the old number differs
    assert sum(re.match(r"\S+ / \S+ +\d", line) is not None for line in lines) == 3  # K(K−1)/2 pairs
    single = format_metrics_report(["dog"], maps[:1])
    assert "no pairs" in single and "KL" not in single


def test_report_names_the_unsmoothed_harmonic_mean_below_lodas_kernel_size():
    maps = torch.tensor(_random_maps(K=2, h=6, w=9, seed=3), dtype=torch.float32)
    last = format_metrics_report(["dog", "cat"], maps).splitlines()[-1]
    assert "NOT LODA's number" in last and "6x9 maps" in last and not last.startswith("LODA")
    assert last.endswith(f": {harmonic_mean_kl(maps).item():.5f}")
    with pytest.raises(ConceptSplitError, match="smaller than the LODA smoothing kernel"):
        separation_loss(maps)


def test_report_cuts_long_words_to_a_fixed_width():
    report = format_metrics_report(["a" * 40, "b"], torch.rand(2, 8, 8) + 0.1)
    assert "a" * 15 + "…" in report and "a" * 17 not in report


def test_report_errors():
    maps = torch.rand(2, 8, 8)
    with pytest.raises(ConceptSplitError, match="no words"):
        format_metrics_report([], maps)
    with pytest.raises(ConceptSplitError, match=r"3 words and maps of shape \(2, 8, 8\)"):
        format_metrics_report(["a", "b", "c"], maps)
    bad = maps.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ConceptSplitError, match='map of "b".*NaN'):
        format_metrics_report(["a", "b"], bad)
    with pytest.raises(ConceptSplitError, match='map of "a".*sums to 0'):
        format_metrics_report(["a", "b"], torch.cat([torch.zeros(1, 8, 8), maps[1:]]))
    with pytest.raises(ConceptSplitError, match="negative"):
        entropy(-maps)
    with pytest.raises(ConceptSplitError, match=r"Seen: maps of shape \(8, 8\)"):
        entropy(maps[0])
