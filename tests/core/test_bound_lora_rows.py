"""conceptsplit_core.bound_lora.sequence_rows: a DiT layer's rows from its text and image parts (plain torch)."""

from __future__ import annotations

import pytest
import torch

from conceptsplit_core.bound_lora import sequence_rows
from conceptsplit_core.errors import ConceptSplitError


def test_parts_land_at_their_starts_and_every_other_row_is_false():
    text = torch.tensor([[False, True, False], [False, False, False]])  # (B, T): token 1 in the cond row only
    image = torch.tensor([[True, False, True, True], [False, True, False, False]])  # (B, N)
    rows = sequence_rows(((0, text), (3, image)), length=9, batch=2, device="cpu")  # [text 3 | image 4 | ref 2]
    expected = torch.zeros(2, 9, dtype=torch.bool)
    expected[:, :3], expected[:, 3:7] = text, image
    assert torch.equal(rows, expected) and not rows[:, 7:].any()
    assert not sequence_rows(((0, None), (3, None)), 9, 2, "cpu").any()  # parts off: nowhere


def test_a_part_that_does_not_fit_the_layer_is_refused():
    with pytest.raises(ConceptSplitError, match="token rows do not match"):
        sequence_rows(((3, torch.ones(1, 64, dtype=torch.bool)),), length=66, batch=1, device="cpu")
    with pytest.raises(ConceptSplitError, match="token rows do not match"):
        sequence_rows(((0, torch.ones(2, 4, dtype=torch.bool)),), length=8, batch=1, device="cpu")
