"""Each word's attention share inside its own mask (map_metrics.mask_attention_share), against numpy in float64."""

import numpy as np
import pytest
import torch

from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.map_metrics import check_share_masks, format_mask_share_report, mask_attention_share

U32 = 2.0**-24  # float32 unit roundoff


def _maps_and_masks(K=2, h=7, w=7, scale=16, seed=0):
    """Random positive maps (K, h, w) float32, and 0/1 masks at map level nearest-upsampled ×scale as LODA's
    concept_masks are: (K, h·scale, w·scale) float32."""
    rng = np.random.default_rng(seed)
    maps = torch.from_numpy(rng.random((K, h, w)) ** 3).float()
    cells = torch.from_numpy(rng.random((K, h, w)) < 0.25)
    cells[:, 0, 0] = True  # never empty
    masks = cells.repeat_interleave(scale, 1).repeat_interleave(scale, 2).float()
    return maps, cells, masks


def test_share_is_the_attention_inside_the_mask_over_all_of_it():
    maps, cells, masks = _maps_and_masks()
    share, area = mask_attention_share(maps, masks)
    reference = [maps[k].double()[cells[k]].sum() / maps[k].double().sum() for k in range(2)]
    # Area-averaging 16×16 blocks of equal 0/1 values is exact, so the products are too; left are two float32 sums of
    # 49 positive terms (each within 48 u relative of the exact sum) and one division.
    torch.testing.assert_close(share.double(), torch.stack(reference), rtol=(2 * 48 + 1) * U32, atol=0)
    assert torch.equal(area, cells.float().mean(dim=(1, 2)))  # k/49 exactly: the cover is 0 or 1 per cell


def test_a_flat_map_gets_the_mask_area_also_for_soft_masks_on_another_grid():
    maps = torch.ones(2, 7, 7)
    soft = torch.from_numpy(np.random.default_rng(1).random((2, 10, 10))).float()  # 10 -> 7: cells cover parts
    share, area = mask_attention_share(maps, soft)
    # Σ c / 49 against mean(c): the same 49 terms summed in two orders, ≤ 48 u relative each
    torch.testing.assert_close(share, area, rtol=2 * 48 * U32, atol=0)
    assert ((0 < share) & (share < 1)).all()


def test_moving_attention_into_the_mask_raises_the_share():
    """What attention fixing does to one call's probabilities: more weight inside the word's own mask."""
    maps, cells, masks = _maps_and_masks(seed=2)
    before, _ = mask_attention_share(maps, masks)
    after, _ = mask_attention_share(maps * (1 + 9 * cells.float()), masks)
    assert (after > before).all()  # a strict rise, by construction: Σ inside grows, Σ outside stays


@pytest.mark.parametrize(
    "masks, message",
    [
        (torch.ones(3, 7, 7), r"Each word needs exactly one mask.*2 word\(s\) and masks of shape \(3, 7, 7\)"),
        (torch.ones(2, 7), r"Each word needs exactly one mask"),
        (torch.full((2, 7, 7), 2.0), r"The concept masks are not masks.*values from 2 to 2"),
        (torch.full((2, 7, 7), float("nan")), r"The concept masks are not masks"),
    ],
)
def test_bad_masks_raise_one_error(masks, message):
    maps, _, _ = _maps_and_masks()
    with pytest.raises(ConceptSplitError, match=message):
        check_share_masks(maps, masks)
    with pytest.raises(ConceptSplitError, match=message):
        mask_attention_share(maps, masks)


def test_report_lists_each_words_share_and_mask_area():
    maps, _, masks = _maps_and_masks()
    share, area = mask_attention_share(maps, masks)
    report = format_mask_share_report(["dog", "cat"], maps, masks)
    assert report.startswith("Attention inside each word's own mask")
    for k, word in enumerate(("dog", "cat")):
        assert f"{word}  {share[k].item():9.5f}  {area[k].item():9.5f}" in report
    with pytest.raises(ConceptSplitError, match="Each word needs exactly one attention map"):
        format_mask_share_report(["dog"], maps, masks)
