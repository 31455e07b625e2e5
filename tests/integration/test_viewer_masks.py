"""The Attention Map Viewer's concept_masks input inside a real ComfyUI: each word's attention share inside its own
LODA mask, per image of a batch, and the bad inputs refused before anything is rendered."""

from __future__ import annotations

import pytest
import torch

SIZE = 112  # LODA's smallest images on the tiny models: 7×7 maps, masks at image size (×16)


def view(pack, **sources):
    with torch.inference_mode():
        return pack.glue("viewer").AttentionMapViewer.execute(0.5, "inferno", **sources)


def record_and_masks(pack):
    """Maps (2 images, 2 words, 7×7) and LODA-style masks (B·K, 112, 112): 0/1 cells nearest-upsampled ×16."""
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 2, 7, 7, generator=generator) ** 3  # (B, K, h, w)
    cells = torch.zeros(2, 2, 7, 7, dtype=torch.bool)
    cells[0, 0, :2, :3] = cells[0, 1, 4:, 4:] = cells[1, 0, 3, :] = cells[1, 1, :, 6] = True  # image 1 differs
    masks = cells.repeat_interleave(SIZE // 7, 2).repeat_interleave(SIZE // 7, 3).flatten(0, 1).float()
    return pack.core("attention_record").ConceptMaps(labels=("dog", "cat"), maps=maps), cells, masks


HEADER = "Attention inside each word's own mask"


def shares_in(text: str) -> list[tuple[float, float]]:
    """(share, mask area) of each word, from the first mask-share table in `text` (the rows after the column names)."""
    rows = text.split(HEADER, 1)[1].splitlines()[2:4]
    return [(float(row.split()[1]), float(row.split()[2])) for row in rows]


def test_metrics_give_each_words_share_inside_its_own_mask_per_image(pack):
    record, cells, masks = record_and_masks(pack)
    report = view(pack, maps=record, concept_masks=masks).result[2]
    images = report.split("Image 2 of 2")
    assert len(images) == 2
    for b, text in enumerate(images):
        got = shares_in(text)
        for k in range(2):
            map_k = record.maps[b, k].double()
            share = float(map_k[cells[b, k]].sum() / map_k.sum())  # float64 reference
            area = float(cells[b, k].double().mean())
            # printed with 5 decimals (half a unit of the last one), computed in float32: two sums of 49 positive
            # terms and a division, ≤ 97 u relative on a share ≤ 1
            assert got[k] == pytest.approx((share, area), abs=5e-6 + 97 * 2.0**-24), (b, k, got, share, area)
    assert shares_in(images[0]) != shares_in(images[1])  # image 1 read its own masks (image-major order)


def test_without_concept_masks_there_is_no_share_table(pack):
    record, _, _ = record_and_masks(pack)
    assert HEADER not in view(pack, maps=record).result[2]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda masks: masks[:3],
            r"The concept masks do not match the attention maps.*\(3, 112, 112\) for 2 image\(s\) "
            r"× 2 word\(s\) \(dog, cat\)",
        ),
        (lambda masks: masks * 0, r"The concept masks are empty"),
        (lambda masks: masks * 3, r"The concept masks are not masks"),
    ],
)
def test_bad_concept_masks_fail_before_any_rendering(pack, monkeypatch, change, message):
    record, _, masks = record_and_masks(pack)
    viewer = pack.glue("viewer")
    rendered = []
    original = viewer.render_attention_grid
    monkeypatch.setattr(viewer, "render_attention_grid", lambda *a, **k: rendered.append(1) or original(*a, **k))
    with pytest.raises(pack.error, match=message):
        view(pack, maps=record, concept_masks=change(masks))
    assert rendered == []
