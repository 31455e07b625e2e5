"""LODA stage 1: the concept-separation loss, step sizes and latent updates (method §3.2-§3.4, Algorithm 1).

Smoothing kernel as in Attend-and-Excite `utils/gaussian_smoothing.py` (`GaussianSmoothing`), which the official
ConceptSplit code imports. Core functions here need autograd where they say so; they never toggle grad modes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from .errors import ConceptSplitError
from .loda_config import LODA_DEFAULTS, UI_OPTIONS, LodaConfig, default_loda_steps

__all__ = [
    "SeparationDiagnostics",
    "attend_excite_kernel",
    "default_loda_steps",
    "flow_latent_update",
    "harmonic_mean_kl",
    "kdiffusion_latent_update",
    "normalize_map",
    "pair_indices",
    "pairwise_kl",
    "separation_loss",
    "smooth_attention_map",
    "step_size",
    "vp_latent_update",
]

# Fixed quirks of the reference smoothing, replicated exactly (method §3.2, §8 #18); not user options.
AE_KERNEL_SIZE = 7  # 7 taps per axis, centred at x = 3
AE_REFLECT_PAD = 1  # torch 'reflect' padding before the valid convolution: 24×24 -> 26×26 -> 20×20
NORMALIZE_EPS = 1e-10  # added after dividing by the sum, not renormalised (method §3.2 step 3)
# The paper's schedule η_i = 40 − 20·i/S starts at 40 and falls by half of that over S steps; the official
# sqrt schedule is 20·sqrt(linspace(1, 0.5, S)) (method §3.3). `step_scale` multiplies both relative to 40.
PAPER_STEP_SCALE = 40.0
SCHEDULE_END_RATIO = 0.5


def attend_excite_kernel(
    sigma: float = LODA_DEFAULTS.smoothing_sigma,
    size: int = AE_KERNEL_SIZE,
    dtype: torch.dtype = torch.float32,
    device: Union[torch.device, str, None] = None,
) -> torch.Tensor:
    """The separable smoothing kernel g(x)·g(y) of method §3.2 step 2 (Attend-and-Excite `GaussianSmoothing`).

    g(x) ∝ exp(−((x − c) / (2σ))²) with c = (size − 1)/2, normalised to sum 1. Note the 2σ inside the square
    (continuous width σ·√2); for σ = 1.5, g = [0.0765, 0.1334, 0.1861, 0.2080, 0.1861, 0.1334, 0.0765].

    Shapes:
        returns (size, size), sums to 1, in `dtype` on `device`.
    """
    # Built in float64 on the CPU (some devices lack float64), then moved: a 7×7 tensor per call.
    taps = torch.arange(size, dtype=torch.float64)  # (size,)
    centre = (size - 1) / 2
    g = torch.exp(-(((taps - centre) / (2 * sigma)) ** 2))  # (size,)
    g = g / g.sum()
    return torch.outer(g, g).to(device=device, dtype=dtype)  # (size, size)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 at least: half/bfloat16 inputs are promoted, float64 stays float64 (method §3.2 "all of this in fp32").
    return torch.promote_types(dtype, torch.float32)


def smooth_attention_map(maps: torch.Tensor, sigma: float = LODA_DEFAULTS.smoothing_sigma) -> torch.Tensor:
    """M̃_k: reflect-pad 1, then a valid 7×7 convolution with `attend_excite_kernel` (method §3.2 step 2).

    Differentiable. Computed in fp32 (float64 stays float64).

    Shapes:
        maps: (K, h, w), any float dtype.
        returns: (K, h − 4, w − 4), fp32 or float64. 24×24 -> 20×20.
    Raises:
        ConceptSplitError: a map side is smaller than the 7-pixel kernel.
    """
    if maps.dim() != 3:
        raise ConceptSplitError.build(
            "Attention maps for the LODA loss have the wrong number of dimensions",
            seen=f"shape {tuple(maps.shape)}",
            expected="(K, h, w): one map per concept",
            fix="stack one (h, w) map per object concept",
        )
    _, h, w = maps.shape
    if h < AE_KERNEL_SIZE or w < AE_KERNEL_SIZE:
        raise ConceptSplitError.build(
            "Attention maps are smaller than the LODA smoothing kernel",
            seen=f"map resolution {h}×{w}",
            expected=f"at least {AE_KERNEL_SIZE}×{AE_KERNEL_SIZE} (the map level is latent/4: 24×24 at 768 px)",
            fix=f"raise the image size to at least {AE_KERNEL_SIZE * 32} px per side",
        )
    dtype = _compute_dtype(maps.dtype)
    kernel = attend_excite_kernel(sigma, AE_KERNEL_SIZE, dtype, maps.device)  # (7, 7)
    x = maps.to(dtype).unsqueeze(1)  # (K, 1, h, w)
    pad = AE_REFLECT_PAD
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (K, 1, h + 2, w + 2), mirror without the edge
    out = F.conv2d(x, kernel[None, None])  # (K, 1, h − 4, w − 4), valid convolution
    return out.squeeze(1)  # (K, h − 4, w − 4)


def normalize_map(maps: torch.Tensor) -> torch.Tensor:
    """P_k = M̃_k / Σ M̃_k + 1e-10 (method §3.2 step 3): the epsilon is added after normalising, not renormalised.

    Shapes:
        maps: (K, h, w); returns (K, h, w) in the input dtype.
    """
    total = maps.sum(dim=(-2, -1), keepdim=True)  # (K, 1, 1)
    return maps / total + NORMALIZE_EPS  # (K, h, w)


def pair_indices(num_concepts: int, pairs: str = LODA_DEFAULTS.kl_pairs) -> list[tuple[int, int]]:
    """The (a, b) concept pairs of the KL sum: a < b ("ordered", the code) or all a ≠ b ("symmetric", Alg. 1)."""
    if pairs not in UI_OPTIONS["kl_pairs"]:
        raise ConceptSplitError.build(
            "Unknown KL pair mode",
            seen=repr(pairs),
            expected="one of " + ", ".join(repr(p) for p in UI_OPTIONS["kl_pairs"]),
            fix="set kl_pairs to 'ordered' (the official code) or 'symmetric' (Algorithm 1)",
        )
    if pairs == "ordered":
        return [(a, b) for a in range(num_concepts) for b in range(a + 1, num_concepts)]
    return [(a, b) for a in range(num_concepts) for b in range(num_concepts) if a != b]


def pairwise_kl(probs: torch.Tensor, pairs: str = LODA_DEFAULTS.kl_pairs) -> torch.Tensor:
    """KL_ab = Σ_xy P_a · ln(P_a / P_b) for each pair of `pair_indices` (method §3.2 step 4).

    Shapes:
        probs: (K, h, w), normalised maps P_k.
        returns: (n_pairs,); n_pairs = K(K−1)/2 ("ordered") or K(K−1) ("symmetric"), in `pair_indices` order.
    """
    index = pair_indices(probs.shape[0], pairs)
    first = torch.tensor([a for a, _ in index], device=probs.device, dtype=torch.long)  # (n_pairs,)
    second = torch.tensor([b for _, b in index], device=probs.device, dtype=torch.long)  # (n_pairs,)
    p_a = probs[first]  # (n_pairs, h, w)
    p_b = probs[second]  # (n_pairs, h, w)
    return (p_a * (p_a.log() - p_b.log())).sum(dim=(-2, -1))  # (n_pairs,)


def harmonic_mean_kl(kls: torch.Tensor) -> torch.Tensor:
    """HM = n_pairs / Σ (1 / KL_ab) (method §3.2 step 5, Algorithm 1). For one pair, HM = KL.

    A KL of exactly 0 (identical maps) gives HM = 0, like `statistics.harmonic_mean`, with an undefined gradient.

    Shapes:
        kls: (n_pairs,); returns a scalar () in the same dtype.
    """
    return kls.shape[0] / (1.0 / kls).sum()


@dataclass(frozen=True)
class SeparationDiagnostics:
    """Detached values of one `separation_loss` call, for logs and the viewer node."""

    pairs: tuple[tuple[int, int], ...]  # (a, b) concept indices of each KL, in order
    pairwise_kl: torch.Tensor  # (n_pairs,) KL_ab, detached
    harmonic_mean: torch.Tensor  # () HM, detached
    loss: torch.Tensor  # () L = max(0, τ − HM), detached


def separation_loss(
    concept_maps: torch.Tensor, config: LodaConfig = LODA_DEFAULTS
) -> tuple[torch.Tensor, SeparationDiagnostics]:
    """L = max(0, τ − HM) over the object concepts' maps (method §3.2, Algorithm 1).

    Smooth (§3.2 step 2), normalise (step 3), pairwise KL (step 4), harmonic mean (step 5), hinge at τ (step 6).
    Differentiable with respect to `concept_maps` (keep them in the autograd graph to update the latent).

    Shapes:
        concept_maps: (K, h, w), M_k = Ā[:, :, s_k] in concept order, K >= 2, any float dtype.
        returns: L as a scalar () in fp32 (float64 for float64 input), and detached diagnostics.
    Raises:
        ConceptSplitError: fewer than 2 concepts, or maps smaller than the smoothing kernel.
    """
    if concept_maps.dim() != 3 or concept_maps.shape[0] < 2:
        raise ConceptSplitError.build(
            "LODA separates concepts and needs at least 2 object concept maps",
            seen=f"maps of shape {tuple(concept_maps.shape)}",
            expected="(K, h, w) with K >= 2",
            fix="connect a second object adapter, or turn LODA off",
        )
    smoothed = smooth_attention_map(concept_maps, config.smoothing_sigma)  # (K, h − 4, w − 4), fp32
    probs = normalize_map(smoothed)  # (K, h − 4, w − 4)
    kls = pairwise_kl(probs, config.kl_pairs)  # (n_pairs,)
    harmonic_mean = harmonic_mean_kl(kls)  # ()
    loss = torch.relu(config.kl_threshold - harmonic_mean)  # ()
    diagnostics = SeparationDiagnostics(
        pairs=tuple(pair_indices(concept_maps.shape[0], config.kl_pairs)),
        pairwise_kl=kls.detach(),
        harmonic_mean=harmonic_mean.detach(),
        loss=loss.detach(),
    )
    return loss, diagnostics


def step_size(step_index: int, total_steps: int, config: LodaConfig = LODA_DEFAULTS) -> float:
    """η_i, the gradient step of LODA stage 1 at 0-based sampling step i (method §3.3, §8 #5).

    "linear" (paper, Supp. §A): η_i = (40 − 20·i/S) · step_scale/40 → 40.0, 39.6, …, 36.4 for i = 0..9, S = 50.
    "sqrt" (official code): η_i = step_scale/2 · sqrt(r_i), r = linspace(1, 0.5, S) → 20.0 … 19.06.

    Raises:
        ConceptSplitError: S < 1, i outside 0..S−1, or an unknown schedule.
    """
    if total_steps < 1 or not 0 <= step_index < total_steps:
        raise ConceptSplitError.build(
            "LODA step index is outside the sampling steps",
            seen=f"step {step_index} of {total_steps}",
            expected="0 <= step < steps, steps >= 1",
            fix="pass the 0-based index of the current sampling step and the total step count",
        )
    relative = config.step_scale / PAPER_STEP_SCALE
    drop = 1.0 - SCHEDULE_END_RATIO  # 0.5: both schedules end at half (η) or half under the root (sqrt)
    if config.step_schedule == "linear":
        return PAPER_STEP_SCALE * relative * (1.0 - drop * step_index / total_steps)
    if config.step_schedule == "sqrt":
        # linspace(1, 0.5, S)[i]; with S = 1 linspace holds only its start, 1.0.
        ratio = 1.0 if total_steps == 1 else 1.0 - drop * step_index / (total_steps - 1)
        return PAPER_STEP_SCALE * relative * SCHEDULE_END_RATIO * math.sqrt(ratio)
    raise ConceptSplitError.build(
        "Unknown LODA step schedule",
        seen=repr(config.step_schedule),
        expected="one of " + ", ".join(repr(s) for s in UI_OPTIONS["step_schedule"]),
        fix="set step_schedule to 'linear' (the paper) or 'sqrt' (the official code)",
    )


def vp_latent_update(z: torch.Tensor, grad_z: torch.Tensor, eta: float) -> torch.Tensor:
    """z ← z − η_i · ∇_z L in the variance-preserving (DDIM) scale (method §3.3). Plain gradient descent.

    Shapes:
        z, grad_z: (1, 4, H_lat, W_lat) or any equal shape; returns the same shape and dtype as `z`.
    """
    return z - eta * grad_z.to(z.dtype)


def kdiffusion_latent_update(
    x: torch.Tensor, grad_x: torch.Tensor, sigma: Union[float, torch.Tensor], eta: float
) -> torch.Tensor:
    """x ← x − η_i · (1 + σ_i²) · ∇_x L for a k-diffusion state x = z · sqrt(1 + σ²) (method §3.4).

    Equivalence with `vp_latent_update`: the model input is z = x / sqrt(1 + σ²), so by the chain rule
    ∇_x L = ∇_z L / sqrt(1 + σ²). The VP step Δz = −η ∇_z L, mapped back to the state, is
    Δx = sqrt(1 + σ²) · Δz = −η · sqrt(1 + σ²) · ∇_z L = −η · (1 + σ²) · ∇_x L. So x' / sqrt(1 + σ²) equals the
    VP update of z exactly, provided `grad_x` was taken through the input scaling. The result must replace the
    sampler's state (method §3.4).

    Shapes:
        x, grad_x: (B, 4, H_lat, W_lat) or any equal shape; sigma: float, () or (B,); returns x's shape and dtype.
    """
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.to(device=x.device, dtype=x.dtype)
        if sigma.dim() == 1:
            sigma = sigma.reshape(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)
    return x - eta * (1 + sigma**2) * grad_x.to(x.dtype)


def flow_latent_update(x: torch.Tensor, grad_x: torch.Tensor, eta: float) -> torch.Tensor:
    """x ← x − η_i · ∇_x L for a flow-matching (ComfyUI CONST) state x_σ = (1 − σ)·x0 + σ·ε (docs/method.md).

    ComfyUI's CONST model sampling feeds the sampler state to the model unchanged (calculate_input is the identity),
    so the model input z equals x and ∇_z L = ∇_x L: the paper's step Δz = −η ∇_z L is the state step, with no
    (1 + σ²) factor (that factor exists only because the k-diffusion state is z·sqrt(1 + σ²)).
    Shapes: x, grad_x: any equal shape; returns x's shape and dtype.
    """
    return x - eta * grad_x.to(x.dtype)
