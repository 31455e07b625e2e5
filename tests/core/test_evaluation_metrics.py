"""CLIP-T / DINO math of method §7 against an independent numpy transcription of the official dino.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.evaluation_metrics import (
    ConceptReference,
    build_concept_reference,
    clip_t_scores,
    combine_concept_references,
    dino_scores,
    normalize_features,
)
from comfy_harness.tolerance import float32_tolerance

WIDTH = 16  # feature width of _features
# float32 unit vectors and cosines against float64: a norm sums WIDTH squares, a cosine WIDTH products, of values
# ≤ 1, plus the square root and divisions: ≤ 2·(WIDTH + 4) roundings of values ≤ 1 (4.8e-6). A wrong formula
# (raw mean, renormalised average, background included) is off by ≥ 1e-3, asserted below.
UNIT = float32_tolerance(1.0, 2 * (WIDTH + 4))


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.sqrt((rows**2).sum(axis=-1, keepdims=True))


def _numpy_reference(photos: np.ndarray) -> np.ndarray:
    mean = _unit(photos.astype(np.float64)).mean(axis=0)
    return mean / np.linalg.norm(mean)


def _features(seed: int, rows: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * 3.0 + 0.5


def test_normalize_features_gives_unit_rows_like_numpy():
    raw = _features(0, 5)
    out = normalize_features(raw)
    np.testing.assert_allclose(out.numpy(), _unit(raw.double().numpy()), atol=UNIT)
    np.testing.assert_allclose(out.norm(dim=-1).numpy(), np.ones(5), atol=UNIT)


def test_normalize_features_computes_in_fp32_from_half():
    raw = _features(1, 3).half()
    out = normalize_features(raw)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _unit(raw.double().numpy()), atol=UNIT)


def test_concept_reference_is_the_renormalised_mean_of_normalised_features():
    photos = _features(2, 4)
    reference = build_concept_reference(photos)
    np.testing.assert_allclose(reference.numpy(), _numpy_reference(photos.numpy()), atol=UNIT)
    assert abs(float(reference.norm()) - 1.0) < UNIT
    # normalising each photo first matters: a plain mean of raw features points elsewhere
    raw_mean = photos.numpy().mean(axis=0)
    assert not np.allclose(reference.numpy(), raw_mean / np.linalg.norm(raw_mean), atol=1e-3)


def test_multi_concept_reference_is_averaged_without_renormalising():
    dog, cat = build_concept_reference(_features(3, 4)), build_concept_reference(_features(4, 6))
    combined = combine_concept_references(
        [ConceptReference("dog", "object", dog), ConceptReference("cat", "object", cat)]
    )
    expected = (dog.numpy() + cat.numpy()) / 2
    np.testing.assert_allclose(combined.numpy(), expected, atol=1e-7)  # the same 2 float32 ops: ≤ 1 ulp at ≤ 1
    assert float(combined.norm()) < 0.99  # two different unit vectors: the mean is shorter, and stays so


def test_clip_t_is_the_mean_raw_cosine_per_image():
    images, text = _features(5, 6), _features(6, 1)
    scores = clip_t_scores(images, text)
    expected = _unit(images.double().numpy()) @ _unit(text.double().numpy())[0]
    np.testing.assert_allclose(scores.numpy(), expected, atol=UNIT)
    assert float(scores.mean()) == pytest.approx(float(expected.mean()), abs=UNIT)
    assert scores.abs().max() <= 1.0  # a raw cosine, not ×100


def test_clip_t_pairs_each_image_with_its_own_prompt():
    images, texts = _features(7, 3), _features(8, 3)
    expected = (_unit(images.double().numpy()) * _unit(texts.double().numpy())).sum(axis=-1)
    np.testing.assert_allclose(clip_t_scores(images, texts).numpy(), expected, atol=UNIT)


def test_dino_score_uses_the_unrenormalised_average_and_skips_background():
    photos = {"dog": _features(9, 4), "cat": _features(10, 3), "beach": _features(11, 5)}
    generated = _features(12, 5)
    concepts = [
        ConceptReference(name, "background" if name == "beach" else "object", build_concept_reference(feats))
        for name, feats in photos.items()
    ]
    scores = dino_scores(generated, concepts)

    average = (_numpy_reference(photos["dog"].numpy()) + _numpy_reference(photos["cat"].numpy())) / 2
    expected = _unit(generated.double().numpy()) @ average  # dino.py: (ref_mean * feat).sum(), no renormalising
    np.testing.assert_allclose(scores.numpy(), expected, atol=UNIT)
    # equals the mean of the per-concept cosines, and is not the cosine with the renormalised average
    per_concept = [_unit(generated.double().numpy()) @ _numpy_reference(photos[n].numpy()) for n in ("dog", "cat")]
    np.testing.assert_allclose(scores.numpy(), np.mean(per_concept, axis=0), atol=UNIT)
    assert not np.allclose(scores.numpy(), _unit(generated.double().numpy()) @ _unit(average), atol=1e-3)
    with_background = (average * 2 + _numpy_reference(photos["beach"].numpy())) / 3
    assert not np.allclose(scores.numpy(), _unit(generated.double().numpy()) @ with_background, atol=1e-3)


def test_dino_score_of_one_concept_is_the_cosine():
    photos, generated = _features(13, 3), _features(14, 2)
    scores = dino_scores(generated, [ConceptReference("dog", "object", build_concept_reference(photos))])
    np.testing.assert_allclose(
        scores.numpy(), _unit(generated.double().numpy()) @ _numpy_reference(photos.numpy()), atol=UNIT
    )


def test_image_that_is_the_reference_scores_one():
    photos = _features(15, 3)
    reference = build_concept_reference(photos)
    scores = dino_scores(reference[None] * 7.0, [ConceptReference("dog", "object", reference)])
    assert float(scores[0]) == pytest.approx(1.0, abs=UNIT)


def test_only_background_concepts_is_refused():
    reference = build_concept_reference(_features(16, 2))
    with pytest.raises(ConceptSplitError, match="at least one object concept.*beach \\(background\\)"):
        dino_scores(_features(17, 2), [ConceptReference("beach", "background", reference)])


def test_unknown_role_is_refused():
    reference = build_concept_reference(_features(18, 2))
    with pytest.raises(ConceptSplitError, match='unknown role.*"subject"'):
        combine_concept_references([ConceptReference("dog", "subject", reference)])


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(0, 4), "non-empty \\(M, C\\)"),
        (torch.ones(4), "non-empty \\(M, C\\)"),
        (torch.tensor([[1.0, float("nan")]]), "NaN or infinite"),
        (torch.tensor([[0.0, 0.0], [1.0, 0.0]]), "all zeros.*1 zero rows out of 2"),
    ],
)
def test_bad_features_are_refused(bad, match):
    with pytest.raises(ConceptSplitError, match=match):
        normalize_features(bad)


def test_mismatched_widths_are_refused():
    with pytest.raises(ConceptSplitError, match="do not pair up"):
        clip_t_scores(_features(19, 3, width=16), _features(20, 1, width=8))
    with pytest.raises(ConceptSplitError, match="do not pair up"):
        clip_t_scores(_features(21, 3), _features(22, 2))
    reference = ConceptReference("dog", "object", build_concept_reference(_features(23, 2, width=8)))
    with pytest.raises(ConceptSplitError, match="different widths"):
        dino_scores(_features(24, 2, width=16), [reference])
    other = ConceptReference("cat", "object", build_concept_reference(_features(25, 2, width=16)))
    with pytest.raises(ConceptSplitError, match="one common \\(C,\\) shape"):
        combine_concept_references([reference, other])


def test_opposite_photos_have_no_reference_direction():
    photo = _features(26, 1)
    with pytest.raises(ConceptSplitError, match="cancel out"):
        build_concept_reference(torch.cat([photo, -photo]))
