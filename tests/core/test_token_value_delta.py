"""Token-wise value delta (spec §2.1) against the merged-weight reference, on exactly the identifier rows."""

from __future__ import annotations

import torch

from conceptsplit_core.token_value_delta import TokenDelta, apply_token_value_delta, identifier_rows

B, T, D, C, R = 4, 77, 16, 24, 4


def setup(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(B, T, D, generator=g)  # (B, T, d)
    weight = torch.randn(C, D, generator=g) / D ** 0.5  # W_v (C, d)
    lora_a, lora_b = torch.randn(R, D, generator=g), torch.randn(C, R, generator=g)
    value = torch.nn.functional.linear(context, weight).to(dtype)  # (B, T, C)
    return context, weight, lora_a, lora_b, value


def test_delta_equals_merged_weight_on_identifier_rows_and_nothing_else():
    context, weight, lora_a, lora_b, value = setup()
    scale, position = 0.75, 5
    rows = torch.tensor([True, False, True, True])
    out = apply_token_value_delta(value, context, TokenDelta(lora_a, lora_b, scale, position, 77), rows)
    merged = weight + scale * lora_b @ lora_a  # W + λ·B·A, (C, d)
    reference = torch.nn.functional.linear(context, merged)  # (B, T, C)
    changed = torch.zeros(B, T, dtype=torch.bool)
    changed[rows, position] = True
    assert torch.allclose(out[changed], reference[changed], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[~changed], value[~changed])  # bit-identical elsewhere
    assert (out[changed] - value[changed]).abs().max() > 0.1  # the delta is not vacuous
    assert out.data_ptr() != value.data_ptr() and torch.equal(value, setup()[4])  # input untouched


def test_two_concepts_write_their_own_rows_only():
    context, weight, lora_a, lora_b, value = setup()
    g = torch.Generator().manual_seed(9)
    a2, b2 = torch.randn(R, D, generator=g), torch.randn(C, R, generator=g)
    rows = torch.ones(B, dtype=torch.bool)
    out = apply_token_value_delta(value, context, TokenDelta(lora_a, lora_b, 1.0, 2, 77), rows)
    out = apply_token_value_delta(out, context, TokenDelta(a2, b2, 1.0, 5, 77), rows)
    ref2 = torch.nn.functional.linear(context, weight + lora_b @ lora_a)
    ref5 = torch.nn.functional.linear(context, weight + b2 @ a2)
    assert torch.allclose(out[:, 2], ref2[:, 2], atol=1e-5) and torch.allclose(out[:, 5], ref5[:, 5], atol=1e-5)
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
    out = apply_token_value_delta(value, context, TokenDelta(lora_a, lora_b, 1.0, 4, 77), torch.ones(2, dtype=bool),
                                  slice(4, 154, 154))
    assert set(torch.nonzero((out - value).abs().amax(dim=(0, 2))).flatten().tolist()) == {4}


def test_position_beyond_context_changes_nothing():
    context, _, lora_a, lora_b, value = setup()
    out = apply_token_value_delta(value, context, TokenDelta(lora_a, lora_b, 1.0, 80, 154), torch.ones(B, dtype=bool))
    assert out is value


def test_empty_row_mask_returns_value_unchanged():
    context, _, lora_a, lora_b, value = setup()
    out = apply_token_value_delta(value, context, TokenDelta(lora_a, lora_b, 1.0, 3, 77), torch.zeros(B, dtype=bool))
    assert torch.equal(out, value)
