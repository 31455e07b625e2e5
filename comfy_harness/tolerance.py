"""Tolerances derived from what a test compares, so that the reason can be written next to each one.

Rules the tests follow (every tolerance is derived, never tuned to one run's numbers):

- The same operations in the same order on the same inputs: `torch.equal`, no tolerance.
- A float32 result against a float64 (or exact) reference: `float32_tolerance(magnitude, operations)`. Each float32
  operation rounds its result by at most eps32/2 (IEEE 754, round to nearest), so a chain of n of them, or a sum of
  n terms in any order (thread count, BLAS kernel, SIMD width), is off by at most about n·eps32 times the largest
  magnitude involved (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1). For a sum whose terms cancel,
  pass the magnitude of the terms (e.g. ``|a| @ |b|`` for ``a @ b``), not of the result.
- Two float32 implementations of the same maths compared in float64: the same, with eps64 for the float64 parts and
  eps32 for the float32 roundings that remain (e.g. ComfyUI casts every model output to float32).
- Two float32 runs of a whole network and sampler that differ only in rounding (another process, thread count,
  attention kernel): no useful a-priori bound exists (rounding is amplified through every layer and step), so compare
  against the size of the effect the test checks: `effect_tolerance`.
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2⁻²³ ≈ 1.19e-7: one float32 ulp at 1.0
EPS64 = torch.finfo(torch.float64).eps  # 2⁻⁵² ≈ 2.22e-16


def max_abs(values) -> float:
    """max |values| of a tensor, array, sequence or number (0.0 for an empty one)."""
    tensor = torch.as_tensor(values.detach() if torch.is_tensor(values) else values, dtype=torch.float64)
    return float(tensor.abs().max()) if tensor.numel() else 0.0


def float32_tolerance(magnitude, operations: int = 1) -> float:
    """eps32 · max|magnitude| · operations: the rounding bound of `operations` float32 operations on values (or
    summed terms) no larger than `magnitude` (a tensor, array or number)."""
    return EPS32 * max_abs(magnitude) * operations


def float64_tolerance(magnitude, operations: int = 1) -> float:
    """eps64 · max|magnitude| · operations, as `float32_tolerance` for float64 arithmetic."""
    return EPS64 * max_abs(magnitude) * operations


def float32_softmax_tolerance(q: torch.Tensor, k: torch.Tensor, heads: int) -> float:
    """Bound on the relative error of float32 softmax(q kᵀ/√D) per head against float64; probabilities are ≤ 1, so
    it bounds their absolute error too. q: (B, N, H·D), k: (B, T, H·D).

    Each logit is a D-term dot product, scaled and shifted by the row maximum: off by ≤ (D + 2)·eps32·Σ|q||k|/√D. A
    logit error δ moves its probability by a factor within e^{±2δ} (its own term and the normaliser); exp, the
    T-term normalising sum and the division add ≤ (T + 2)·eps32.
    """
    b, n, inner = q.shape
    d = inner // heads
    qh = q.detach().double().abs().reshape(b, n, heads, d).transpose(1, 2)  # (B, H, N, D)
    kh = k.detach().double().abs().reshape(b, -1, heads, d).transpose(1, 2)  # (B, H, T, D)
    terms = float((qh @ kh.transpose(-1, -2)).max()) / math.sqrt(d)  # max Σ|q||k|/√D
    return EPS32 * (2 * (d + 2) * terms + k.shape[1] + 2)


def effect_tolerance(with_effect, without_effect, fraction: float = 0.05) -> float:
    """fraction · max|with_effect − without_effect|: a tolerance relative to the size of the effect being tested.

    For whole-graph float32 comparisons (see the module docstring). A wrong token, scale, adapter or missing patch
    moves the result by the order of the effect itself, so 5 % of it still catches those, while float32 rounding of
    the same maths stays far smaller; the caller says which error the comparison exists to catch.
    """
    return fraction * max_abs(
        torch.as_tensor(with_effect, dtype=torch.float64) - torch.as_tensor(without_effect, dtype=torch.float64)
    )
