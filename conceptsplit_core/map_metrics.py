"""Numbers the Attention Map Viewer shows per word and per pair: entropy (paper Table 1), KL and LODA's harmonic mean
(method §3.2), an overlap score, and with LODA's masks each word's attention share inside its own mask (what attention
fixing, method §4.3, raises).

All functions take per-concept maps `(K, h, w)` (attention probabilities averaged over layers and heads, method §3.1),
compute in fp32 on the maps' device, and never track gradients for the caller (they are read-outs, not the loss).
The per-pair KLs are read on the maps as given (no smoothing), so they show the maps the viewer draws. The report's
harmonic mean is LODA's own number: `loda_loss.separation_loss` on the maps (smoothing, crop and epsilon of spec
§3.2), the value LODA's report prints for the same maps; maps under 7×7 cannot be smoothed and get a plainly
labelled unsmoothed harmonic mean instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import ConceptSplitError
from .loda_config import LODA_DEFAULTS
from .loda_loss import AE_KERNEL_SIZE, separation_loss

EPSILON = 1e-10  # added after sum-normalising, not renormalised (method §3.2 step 3)
_WORD_WIDTH = 16  # max characters of a word in the report; longer words are cut with "…"


def _check_maps(maps: torch.Tensor, labels: list[str] | None = None) -> None:
    if maps.dim() != 3 or maps.shape[0] == 0:
        raise ConceptSplitError.build(
            "Attention metrics need one (h, w) map per word",
            seen=f"maps of shape {tuple(maps.shape)}",
            expected="a (K, h, w) tensor with K >= 1",
            fix="pass the per-concept maps from the attention store",
        )
    names = labels if labels is not None else [f"map {k}" for k in range(maps.shape[0])]
    maps = maps.detach().float()
    for k, name in enumerate(names):
        bad = None
        if not torch.isfinite(maps[k]).all():
            bad = "NaN or infinite values"
        elif (maps[k] < 0).any():
            bad = f"negative values (min {maps[k].min().item():.3g})"
        elif maps[k].sum() <= 0:
            bad = "no attention at all (sums to 0)"
        if bad is not None:
            raise ConceptSplitError.build(
                f'The attention map of "{name}" cannot be read as a distribution',
                seen=bad,
                expected="finite, non-negative attention that sums to more than 0",
                fix="check the word's token position and that the sampler ran without overflow",
            )


def spatial_distribution(maps: torch.Tensor, epsilon: float = EPSILON) -> torch.Tensor:
    """Sum-normalise each map over its h·w positions, then add epsilon (method §3.2 step 3: P_k = M_k / ΣM_k + 1e-10).

    Shapes: maps `(K, h, w)` any float dtype -> `(K, h, w)` float32; each map sums to `1 + h·w·epsilon`.
    Raises: ConceptSplitError on non-finite or negative maps, or a map that sums to 0.
    """
    _check_maps(maps)
    maps = maps.detach().float()
    return maps / maps.sum(dim=(1, 2), keepdim=True) + epsilon  # (K, h, w)


def entropy(maps: torch.Tensor) -> torch.Tensor:
    """Entropy of each sum-normalised map, `H = −Σ P ln P` in nats; ln(h·w) when uniform, about 0 when one-hot.

    This is Table 1's entropy without the paper's softmax (see paper_softmax_entropy): a sharp map scores low.
    Shapes: maps `(K, h, w)` -> `(K,)` float32.
    """
    P = spatial_distribution(maps).flatten(1)  # (K, N)
    return -(P * P.log()).sum(dim=1)  # (K,)


def paper_softmax_entropy(maps: torch.Tensor) -> torch.Tensor:
    """The paper's Table 1 entropy (method §7): softmax over the h·w positions of the averaged map, then `−Σ Â ln Â`.

    Quirk kept on purpose: the softmax acts on small averaged probabilities, so Â is nearly uniform and H stays just
    below ln(h·w) (6.356 at 24×24). Only its change across steps (Table 1's ΔH) is informative.
    Shapes: maps `(K, h, w)` raw (not normalised) -> `(K,)` float32.
    """
    _check_maps(maps)
    log_A = torch.log_softmax(maps.detach().float().flatten(1), dim=1)  # (K, N)
    return -(log_A.exp() * log_A).sum(dim=1)  # (K,)


def pairwise_kl_matrix(maps: torch.Tensor) -> torch.Tensor:
    """`KL[a, b] = Σ P_a ln(P_a / P_b)` on spatial_distribution's P (method §3.2 step 4), in both directions.

    The diagonal is 0. LODA's loss uses the entries above the diagonal (a < b).
    Shapes: maps `(K, h, w)` -> `(K, K)` float32.
    """
    P = spatial_distribution(maps).flatten(1)  # (K, N)
    log_P = P.log()  # (K, N)
    kl = (P[:, None, :] * (log_P[:, None, :] - log_P[None, :, :])).sum(dim=-1)  # (K, 1, N) vs (1, K, N) -> (K, K)
    return kl.fill_diagonal_(0.0)


def overlap(maps: torch.Tensor) -> torch.Tensor:
    """Histogram intersection `O[a, b] = Σ min(p_a, p_b)` of the sum-normalised maps (no epsilon), in [0, 1].

    1 means the two words attend to the same place with the same weights, 0 means disjoint regions; it equals
    1 − total-variation distance. Symmetric, with ones on the diagonal.
    Shapes: maps `(K, h, w)` -> `(K, K)` float32.
    """
    p = spatial_distribution(maps, epsilon=0.0).flatten(1)  # (K, N)
    return torch.minimum(p[:, None, :], p[None, :, :]).sum(dim=-1)  # (K, 1, N) vs (1, K, N) -> (K, K)


def harmonic_mean_kl(maps: torch.Tensor) -> torch.Tensor:
    """LODA's `HM = n_pairs / Σ_{a<b} 1 / KL_ab` over the ordered pairs (method §3.2 step 5); 0 if any KL is 0.

    Shapes: maps `(K, h, w)`, K >= 2 -> scalar `()` float32.
    Raises: ConceptSplitError for fewer than 2 maps.
    """
    if maps.dim() == 3 and maps.shape[0] < 2:
        raise ConceptSplitError.build(
            "The KL harmonic mean needs at least 2 words",
            seen=f"{maps.shape[0]} map",
            expected="2 or more maps",
            fix="add a second identifier word, or read the entropy only",
        )
    kl = pairwise_kl_matrix(maps)  # (K, K)
    upper = torch.triu_indices(kl.shape[0], kl.shape[1], offset=1, device=kl.device)  # (2, n_pairs)
    ordered = kl[upper[0], upper[1]]  # (n_pairs,)
    if (ordered <= 0).any():
        return torch.zeros((), device=kl.device)
    return ordered.numel() / (1.0 / ordered).sum()


def loda_harmonic_mean(maps: torch.Tensor) -> torch.Tensor:
    """LODA's HM exactly as its loss and report compute it: smooth, crop, normalise + 1e-10, KL over a < b, harmonic
    mean (`loda_loss.separation_loss` with the paper defaults, method §3.2 steps 2-5).

    Shapes: maps `(K, h, w)`, K >= 2, h and w >= 7 (the smoothing kernel) -> scalar `()` float32.
    Raises: ConceptSplitError for fewer than 2 maps or maps smaller than 7×7.
    """
    return separation_loss(maps.detach().float(), LODA_DEFAULTS)[1].harmonic_mean


def _harmonic_mean_line(maps: torch.Tensor) -> str:
    _, h, w = maps.shape
    if h >= AE_KERNEL_SIZE and w >= AE_KERNEL_SIZE:
        return (
            f"LODA harmonic mean of KL a->b (a < b), maps smoothed as LODA's loss: "
            f"{loda_harmonic_mean(maps).item():.5f}"
        )
    return (
        f"KL harmonic mean (a < b), unsmoothed, NOT LODA's number ({h}x{w} maps are smaller than LODA's "
        f"{AE_KERNEL_SIZE}x{AE_KERNEL_SIZE} smoothing kernel): {harmonic_mean_kl(maps).item():.5f}"
    )


def _cell(word: str, width: int) -> str:
    return word if len(word) <= width else word[: width - 1] + "…"


def check_report_maps(labels: list[str], maps: torch.Tensor) -> None:
    """The checks of format_metrics_report, without computing anything, so a node can fail before any work.

    Shapes: maps `(K, h, w)` with K = len(labels).
    Raises: ConceptSplitError on an empty word list, a word/map count mismatch, or maps that are not distributions.
    """
    if len(labels) == 0:
        raise ConceptSplitError.build(
            "The attention viewer got no words",
            seen="an empty word list",
            expected="at least one identifier word",
            fix="connect an adapter or type the words to inspect",
        )
    if maps.dim() != 3 or maps.shape[0] != len(labels):
        raise ConceptSplitError.build(
            "Each word needs exactly one attention map",
            seen=f"{len(labels)} words and maps of shape {tuple(maps.shape)}",
            expected=f"maps of shape ({len(labels)}, h, w)",
            fix="pass the words in the same order as the maps",
        )
    _check_maps(maps, labels)


def format_metrics_report(labels: list[str], maps: torch.Tensor) -> str:
    """A fixed-width text table for the viewer node: per word entropy (ours and the paper's), per pair KL a→b, b→a
    and overlap (unsmoothed maps), then LODA's harmonic mean (loda_harmonic_mean; maps under 7×7: the unsmoothed
    harmonic mean, labelled as not LODA's). Paper: Table 1 entropy, §3.2 KL.

    Shapes: maps `(K, h, w)` with K = len(labels).
    Raises: ConceptSplitError on an empty word list, a word/map count mismatch, or maps that are not distributions.
    """
    check_report_maps(labels, maps)
    K, h, w = maps.shape
    width = min(_WORD_WIDTH, max(len(label) for label in labels))
    words = [_cell(label, width) for label in labels]
    H, H_paper = entropy(maps).tolist(), paper_softmax_entropy(maps).tolist()
    lines = [
        f"Attention metrics: {K} word{'s' if K > 1 else ''}, {h}x{w} maps, ln(h*w) = {math.log(h * w):.4f}",
        f"{'word':<{width}}  {'H':>9}  {'H_paper':>10}",
    ]
    # H_paper gets 6 decimals: Table 1's per-step changes are of order 1e-4 (method §7).
    lines += [f"{words[k]:<{width}}  {H[k]:9.5f}  {H_paper[k]:10.6f}" for k in range(K)]
    lines.append("H: entropy of the sum-normalised map (nats). H_paper: Table 1, softmax over positions first.")
    if K < 2:
        lines.append("One word: no pairs to compare.")
        return "\n".join(lines)
    kl, shared = pairwise_kl_matrix(maps).tolist(), overlap(maps).tolist()
    pair_width = 2 * width + 3
    lines += ["", f"{'pair a / b':<{pair_width}}  {'KL a->b':>9}  {'KL b->a':>9}  {'overlap':>9}"]
    for a in range(K):
        for b in range(a + 1, K):
            pair = f"{words[a]} / {words[b]}"
            lines.append(f"{pair:<{pair_width}}  {kl[a][b]:9.5f}  {kl[b][a]:9.5f}  {shared[a][b]:9.5f}")
    lines.append("overlap: histogram intersection sum(min(p_a, p_b)), 0 = disjoint, 1 = identical.")
    lines.append(_harmonic_mean_line(maps))
    return "\n".join(lines)


def check_share_masks(maps: torch.Tensor, masks: torch.Tensor) -> None:
    """The mask checks of mask_attention_share, without computing anything, so a node can fail before any work.

    Shapes: maps `(K, h, w)`, masks `(K, H, W)`.
    Raises: ConceptSplitError on a mask count other than K or values outside 0..1.
    """
    words = maps.shape[0]
    if masks.dim() != 3 or masks.shape[0] != words:
        raise ConceptSplitError.build(
            "Each word needs exactly one mask",
            seen=f"{words} word(s) and masks of shape {tuple(masks.shape)}",
            expected=f"masks of shape ({words}, H, W), word k's mask at index k",
            fix="connect the LODA Sampler's concept_masks, with the same words in the same order as its concepts",
        )
    values = masks.detach().float()
    if not torch.isfinite(values).all() or (values < 0).any() or (values > 1).any():
        raise ConceptSplitError.build(
            "The concept masks are not masks",
            seen=f"values from {values.min().item():.3g} to {values.max().item():.3g}",
            expected="values between 0 and 1 (LODA's concept_masks are 0 or 1)",
            fix="connect the LODA Sampler's concept_masks output, not an image or a latent",
        )


def mask_attention_share(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each word's attention share inside its own mask, and that mask's area: the share a flat map would have.

    `share_k = Σ M_k · c_k / Σ M_k`, with c_k the part of each map cell that mask k covers (the mask area-averaged
    onto the maps' grid: exactly 0 or 1 for LODA's masks on maps of LODA's level, method §4.1), and `area_k = mean c_k`.
    Attention fixing (method §4.3) adds +p to word k's logits inside mask k and m to it inside the other masks, which
    moves word k's attention into its mask: the share rises above what the same run without fixing gives.
    Shapes: maps `(K, h, w)` attention (not normalised), masks `(K, H, W)` in 0..1 (any H, W; usually the image's)
    -> share `(K,)` and area `(K,)` float32.
    Raises: ConceptSplitError on maps that are not distributions, a mask count other than K, or values outside 0..1.
    """
    _check_maps(maps)
    check_share_masks(maps, masks)
    maps = maps.detach().float()  # (K, h, w)
    cover = F.interpolate(masks.detach().float()[None], size=tuple(maps.shape[-2:]), mode="area")[0]  # (K, h, w)
    share = (maps * cover).sum(dim=(1, 2)) / maps.sum(dim=(1, 2))  # (K,)
    return share, cover.mean(dim=(1, 2))


def format_mask_share_report(labels: list[str], maps: torch.Tensor, masks: torch.Tensor) -> str:
    """The viewer's lines for mask_attention_share: per word its share inside its own mask and the mask's area.

    Shapes: maps `(K, h, w)` with K = len(labels), masks `(K, H, W)` in 0..1, word k's mask at index k.
    Raises: ConceptSplitError as check_report_maps and mask_attention_share.
    """
    check_report_maps(labels, maps)
    share, area = (values.tolist() for values in mask_attention_share(maps, masks))
    width = min(_WORD_WIDTH, max(len(label) for label in labels))
    lines = [
        "Attention inside each word's own mask (concept_masks, word k -> mask k):",
        f"{'word':<{width}}  {'share':>9}  {'mask area':>9}",
    ]
    lines += [f"{_cell(label, width):<{width}}  {share[k]:9.5f}  {area[k]:9.5f}" for k, label in enumerate(labels)]
    lines.append("share: the part of the word's attention inside its mask; mask area: what a flat map would give.")
    return "\n".join(lines)
