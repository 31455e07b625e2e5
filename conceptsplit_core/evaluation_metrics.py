"""CLIP-T and DINO scores from feature tensors, as the paper's evaluation script `dino.py` defines them (method §7).

The models and image loading live in `scripts/evaluate.py`; this module is only the math, so it can be checked against
numpy. Definitions (method §7, "Quality metrics"):

- every image and text feature is L2-normalised first;
- CLIP-T of an image = dot product of its normalised CLIP image feature with its prompt's normalised text feature
  (a raw cosine, not ×100); the reported CLIP-T is the mean over images;
- a concept's DINO reference = the mean of its reference photos' normalised DINO features, renormalised;
- for an image with several concepts, the object concepts' references are averaged **without** renormalising, and the
  image's DINO score is the dot product of its normalised DINO feature with that average (`dino.py` computes
  `(a * b).sum()`; with one concept this is the cosine, with several it is the mean of the per-concept cosines);
  background concepts are left out. The reported DINO is the mean over images.

Every function computes in fp32 on the input's device and tracks no gradients for the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import ConceptSplitError

OBJECT_ROLE = "object"
BACKGROUND_ROLE = "background"
CONCEPT_ROLES = (OBJECT_ROLE, BACKGROUND_ROLE)


@dataclass(frozen=True)
class ConceptReference:
    """One concept's DINO reference for the image score.

    Attributes:
        name: the concept's name, as the user gave it (e.g. "dog").
        role: "object" (scored) or "background" (left out of DINO, method §7).
        reference: `(C,)` renormalised mean of the concept photos' normalised DINO features (`build_concept_reference`).
    """

    name: str
    role: str
    reference: torch.Tensor


def _check_features(features: torch.Tensor, what: str) -> None:
    if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ConceptSplitError.build(
            f"The {what} must be a non-empty (M, C) batch of feature vectors",
            seen=f"a tensor of shape {tuple(features.shape)}",
            expected="shape (M, C) with M >= 1 images or texts and C >= 1 channels",
            fix="pass one feature row per image or text",
        )
    if not torch.isfinite(features).all():
        raise ConceptSplitError.build(
            f"The {what} contain NaN or infinite values",
            seen=f"{int((~torch.isfinite(features)).sum())} non-finite entries",
            expected="finite features from the model",
            fix="check the model weights (a broken or half-converted checkpoint gives non-finite features)",
        )


def normalize_features(features: torch.Tensor, what: str = "features") -> torch.Tensor:
    """L2-normalise each row, as `dino.py` does to every image and text feature (method §7).

    Shapes:
        features: `(M, C)`, any float dtype; computed in fp32.
        returns: `(M, C)` fp32, each row of unit length.

    Raises:
        ConceptSplitError: not a non-empty `(M, C)` batch, non-finite values, or a zero row (no direction).
    """
    _check_features(features, what)
    features = features.detach().float()
    norms = features.norm(dim=-1, keepdim=True)  # (M, 1)
    if (norms == 0).any():
        raise ConceptSplitError.build(
            f"Some {what} are all zeros and have no direction to compare",
            seen=f"{int((norms == 0).sum())} zero rows out of {features.shape[0]}",
            expected="non-zero feature vectors",
            fix="check the model weights and that the images are not empty",
        )
    return features / norms


def build_concept_reference(reference_features: torch.Tensor) -> torch.Tensor:
    """One concept's DINO reference: the renormalised mean of its photos' normalised features (method §7).

    Shapes:
        reference_features: `(M, C)` raw DINO CLS features of the concept's M photos, any float dtype.
        returns: `(C,)` fp32, unit length.

    Raises:
        ConceptSplitError: no photos, bad shape, or a mean of zero length (photos with exactly opposite features).
    """
    mean = normalize_features(reference_features, "concept photo features").mean(dim=0)  # (C,)
    norm = mean.norm()
    if norm == 0:
        raise ConceptSplitError.build(
            "The concept photos' features cancel out and give no reference direction",
            seen="a mean feature of length 0",
            expected="photos of one concept, whose features point roughly the same way",
            fix="check that the concept folder holds photos of one subject",
        )
    return mean / norm


def combine_concept_references(concepts: Sequence[ConceptReference]) -> torch.Tensor:
    """The multi-concept DINO reference: the mean of the object concepts' references, NOT renormalised (method §7).

    Background concepts are left out, as `dino.py` drops its background concept ("barn").

    Shapes:
        concepts[i].reference: `(C,)` each, the same C.
        returns: `(C,)` fp32; its length is below 1 when the references differ.

    Raises:
        ConceptSplitError: no object concept, an unknown role, or references of different widths.
    """
    for concept in concepts:
        if concept.role not in CONCEPT_ROLES:
            raise ConceptSplitError.build(
                f'Concept "{concept.name}" has an unknown role',
                seen=f'role "{concept.role}"',
                expected=f"one of {', '.join(CONCEPT_ROLES)}",
                fix='leave the role out (object) or write ":background"',
            )
    objects = [concept for concept in concepts if concept.role == OBJECT_ROLE]
    if not objects:
        names = ", ".join(f"{c.name} ({c.role})" for c in concepts) or "no concepts"
        raise ConceptSplitError.build(
            "The DINO score needs at least one object concept; background concepts are left out of it (method §7)",
            seen=names,
            expected="one or more concepts without the :background role",
            fix="add an object concept, e.g. --concept dog=photos/dog",
        )
    widths = {tuple(c.reference.shape) for c in objects}
    if len(widths) != 1 or len(next(iter(widths))) != 1:
        raise ConceptSplitError.build(
            "The concept references do not have one common (C,) shape",
            seen=", ".join(f"{c.name}: {tuple(c.reference.shape)}" for c in objects),
            expected="one (C,) vector per concept, all from the same DINO model",
            fix="build every reference with the same model",
        )
    references = torch.stack([c.reference.detach().float() for c in objects])  # (K, C)
    return references.mean(dim=0)  # (C,), deliberately not renormalised: dino.py averages the unit references


def clip_t_scores(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Per-image CLIP-T: cosine of each image's CLIP feature with its prompt's CLIP text feature (method §7).

    Shapes:
        image_features: `(M, C)` raw CLIP image embeddings (after the visual projection), any float dtype.
        text_features: `(M, C)`, the prompt of each image, or `(1, C)` for one prompt shared by all images.
        returns: `(M,)` fp32 raw cosines in [-1, 1]; CLIP-T of the set is their mean.

    Raises:
        ConceptSplitError: bad shapes, or image and text widths that differ.
    """
    images = normalize_features(image_features, "CLIP image features")
    texts = normalize_features(text_features, "CLIP text features").to(images.device)
    if texts.shape[1] != images.shape[1] or texts.shape[0] not in (1, images.shape[0]):
        raise ConceptSplitError.build(
            "CLIP image and text features do not pair up",
            seen=f"images {tuple(images.shape)}, texts {tuple(texts.shape)}",
            expected="texts (M, C) with one prompt per image, or (1, C), and the images' width C",
            fix="give one prompt, or one prompt per generated image, and one CLIP model for both",
        )
    return (images * texts).sum(dim=-1)  # (M, C) * (M|1, C) -> (M,)


def dino_scores(generated_features: torch.Tensor, concepts: Sequence[ConceptReference]) -> torch.Tensor:
    """Per-image DINO: each generated image's normalised feature dotted with the combined reference (method §7).

    Shapes:
        generated_features: `(M, C)` raw DINO CLS features of the generated images, any float dtype.
        concepts[i].reference: `(C,)`.
        returns: `(M,)` fp32; DINO of the set is their mean. In [-1, 1] (a mean of cosines).

    Raises:
        ConceptSplitError: no object concept, or widths that differ.
    """
    generated = normalize_features(generated_features, "generated image DINO features")
    combined = combine_concept_references(concepts).to(generated.device)  # (C,)
    if combined.shape[0] != generated.shape[1]:
        raise ConceptSplitError.build(
            "Generated-image and concept-photo DINO features have different widths",
            seen=f"generated C={generated.shape[1]}, references C={combined.shape[0]}",
            expected="one DINO model for both",
            fix="compute both with the same DINO model",
        )
    return generated @ combined  # (M, C) x (C,) -> (M,)
