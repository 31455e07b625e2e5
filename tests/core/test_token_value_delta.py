"""Token-wise value delta (method §2.1) against the merged-weight reference, on exactly the identifier rows."""

from __future__ import annotations

import torch

from conceptsplit_core.token_value_delta import TokenDelta, apply_token_value_delta, identifier_rows
from comfy_harness.tolerance import float32_tolerance

B, T, D, C, R = 4, 77, 16, 24, 4


def merged_reference(context, weight, lora_a, lora_b, scale):
    """V from the merged weight W + λ·B·A in float64, and the bound on the float32 delta path against it: V = c·Wᵀ
    (D terms), then (c·Aᵀ)·Bᵀ (D, then R terms), scaled and added, each term bounded by |c||W| + λ|c||A||B|."""
    merged = weight.double() + scale * lora_b.double() @ lora_a.double()  # (C, d)
    reference = torch.nn.functional.linear(context.double(), merged)  # (B, T, C)
    magnitude = torch.nn.functional.linear(context.abs(), weight.abs()) + scale * torch.nn.functional.linear(
        context.abs() @ lora_a.abs().T, lora_b.abs()
    )  # (B, T, C)
    return reference, float32_tolerance(magnitude, D + R + 3)


def setup(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(B, T, D, generator=g)  # (B, T, d)
    weight = torch.randn(C, D, generator=g) / D**0.5  # W_v (C, d)
    lora_a, lora_b = torch.randn(R, D, generator=g), torch.randn(C, R, generator=g)
    value = torch.nn.functional.linear(context, weight).to(dtype)  # (B, T, C)
    return context, weight, lora_a, lora_b, value


def test_delta_equals_merged_weight_on_identifier_rows_and_nothing_else():
    context, weight, lora_a, lora_b, value = setup()
    scale, position = 0.75, 5
    rows = torch.tensor([True, False, True, True])
    out = apply_token_value_delta(value, context, TokenDelta(lora_a, lora_b, scale, position, 77), rows)
    reference, tolerance = merged_reference(context, weight, lora_a, lora_b, scale)  # W + λ·B·A
    changed = torch.zeros(B, T, dtype=torch.bool)
    changed[rows, position] = True
    assert (out[changed].double() - reference[changed]).abs().max() <= tolerance
    assert torch.equal(out[~changed], value[~changed])  # bit-identical elsewhere
    assert (out[changed] - value[changed]).abs().max() > 0.1  # the delta is not vacuous (> 500× the tolerance)
    assert out.data_ptr() != value.data_ptr() and torch.equal(value, setup()[4])  # input untouched


def test_two_concepts_write_their_own_rows_only():
    context, weight, lora_a, lora_b, value = setup()
    g = torch.Generator().manual_seed(9)
    a2, b2 = torch.randn(R, D, generator=g), torch.randn(C, R, generator=g)
    rows = torch.ones(B, dtype=torch.bool)
    out = apply_token_value_delta(value, context, TokenDelta(lora_a, lora_b, 1.0, 2, 77), rows)
    out = apply_token_value_delta(out, context, TokenDelta(a2, b2, 1.0, 5, 77), rows)
    (ref2, tolerance2), (ref5, tolerance5) = (
        merged_reference(context, weight, lora_a, lora_b, 1.0),
        merged_reference(context, weight, a2, b2, 1.0),
    )
    assert (out[:, 2].double() - ref2[:, 2]).abs().max() <= tolerance2
    assert (out[:, 5].double() - ref5[:, 5]).abs().max() <= tolerance5
    others = [t for t in range(T) if t not in (2, 5)]
    assert torch.equal(out[:, others], value[:, others])


def test_fp16_value_gets_fp32_delta_then_cast():
    context, weight, lora_a, lora_b, value = setup(dtype=torch.float16)
    out = apply_token_value_delta(value, context, TokenDelta(lora_a, lora_b, 1.0, 3, 77), torch.ones(B, dtype=bool))
    assert out.dtype == torch.float16
    expected = (value[:, 3].float() + (context[:, 3] @ lora_a.T) @ lora_b.T).half()
    assert torch.equal(out[:, 3], expected)


def test_identifier_rows_follow_each_conditionings_own_length():
    # ComfyUI repeats a 77-token cond to 154 next to a 154-token uncond (LCM padding): token 4 sits at 4 and 81.
    assert identifier_rows(4, 77, 154) == slice(4, 154, 77)
    assert identifier_rows(80, 154, 154) == slice(80, 154, 154)  # one row
    assert identifier_rows(4, 77, 100) == slice(4, 100, 100)  # not a multiple: no repetition assumed
    assert identifier_rows(85, 77, 77) is None  # a one-window negative has no token 85
    assert identifier_rows(85, 154, 77) is None  # a split call that only carries a shorter context


def test_repeated_context_gets_the_delta_at_every_copy():
    g = torch.Generator().manual_seed(1)
    context = torch.randn(2, 154, D, generator=g)
    value = torch.randn(2, 154, C, generator=g)
    lora_a, lora_b = torch.randn(R, D, generator=g), torch.randn(C, R, generator=g)
    out = apply_token_value_delta(value, context, TokenDelta(lora_a, lora_b, 1.0, 4, 77), torch.ones(2, dtype=bool))
    diff = (out - value).abs().amax(dim=(0, 2))  # (T,)
    assert set(torch.nonzero(diff).flatten().tolist()) == {4, 81}
    # explicit rows: only the first copy (a 154-token conditioning of its own)
    out = apply_token_value_delta(
        value, context, TokenDelta(lora_a, lora_b, 1.0, 4, 77), torch.ones(2, dtype=bool), slice(4, 154, 154)
    )
    assert set(torch.nonzero((out - value).abs().amax(dim=(0, 2))).flatten().tolist()) == {4}


def test_position_beyond_context_changes_nothing():
    context, _, lora_a, lora_b, value = setup()
    out = apply_token_value_delta(value, context, TokenDelta(lora_a, lora_b, 1.0, 80, 154), torch.ones(B, dtype=bool))
    assert out is value


def test_empty_row_mask_returns_value_unchanged():
    context, _, lora_a, lora_b, value = setup()
    out = apply_token_value_delta(value, context, TokenDelta(lora_a, lora_b, 1.0, 3, 77), torch.zeros(B, dtype=bool))
    assert torch.equal(out, value)
