"""Recognise the conditioning of a located prompt by its content (issue 11 #4; method §2.3, §2.4).

ToVA, LODA and the attention capture use token positions s_k found in one prompt. A conditioning sampled with them
must hold that prompt's tokens, or the delta, the loss and the maps land on whatever word sits at s_k. A
conditioning made by the pack (Apply ToVA's positive, ConceptSplit Text Encode) carries its token record; one from
any other text encode node carries only its text features, the tensor the UNet's cross-attention reads.

The rule, one for all three users:
- A recorded conditioning is the prompt whose token ids it records (the record is exact; prompt weights and blends
  of the tensor keep the positions).
- An unrecorded one is the prompt of a `PromptEncoding` the pack made when its text features begin with that
  encoding's, equal up to float rounding (`same_encoding`). The same text through the same CLIP gives the same
  features in any encode node; another text, other prompt weights, another CLIP (clip skip, a LoRA on the CLIP)
  give other features, so such a conditioning is not the prompt. ComfyUI's CLIP is causal, so a row depends on its
  token and the tokens before it: a different token changes its own row and the rows after it by the size of the
  features themselves, far above rounding.
- "Begin with": ConditioningConcat appends text after the prompt's windows; the prompt's rows are still at s_k.
- A conditioning matching nothing holds no known prompt. Negative prompts are never matched: ToVA adds its delta at
  s_k of the negative branch by the paper's rule, whatever the negative holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

# Per row, two encodings of the same text may differ by this many ulps of the coarsest dtype involved, times the
# row's largest feature: casting either tensor to the coarser dtype rounds each feature by ≤ ½ ulp (1 ulp for both),
# and a last operation summed in another order (another kernel or device for the same encoder) adds a few ulps of
# the partial sums, which are bounded by the row's largest feature; 4 covers both. A different token moves its row
# by the order of the features themselves (O(1) relative), so even at bfloat16 (4·2⁻⁷ ≈ 0.03) the two cases are far
# apart.
ENCODING_ULPS = 4.0


@dataclass(frozen=True, eq=False)
class PromptEncoding:
    """The text features the pack encoded one prompt to: the reference its conditioning is recognised by.

    `context` is the CONDITIONING tensor itself (shared, not copied). `compute_eps` is the float eps of the dtype
    the text encoder ran in (its weights' dtype, at least 16 bits), so rounding of that dtype is tolerated too.
    `__deepcopy__` returns self: ComfyUI deep-copies model_options on every clone() (integration §1.1).
    """

    prompt_ids: tuple  # PromptTokens.token_ids of the prompt
    text: str
    context: torch.Tensor  # (1, L, d) text features, L = 77 · windows (SDXL: CLIP-L and CLIP-G concatenated, d 2048)
    compute_eps: float = 0.0
    _on_device: dict = field(default_factory=dict, repr=False)  # device -> (reference (1, L, d) fp32, (L, 1) scale)

    def __deepcopy__(self, memo):
        return self

    @property
    def length(self) -> int:
        return int(self.context.shape[1])

    def reference_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(context as fp32 on `device` (1, L, d), per-row largest |feature| (L, 1)); cached per device, so a model
        call on the GPU copies the reference there once, not at every call."""
        cached = self._on_device.get(device)
        if cached is None:
            reference = self.context[:1].detach().to(device=device, dtype=torch.float32)  # (1, L, d)
            cached = (reference, reference[0].abs().amax(dim=-1, keepdim=True))  # (L, 1)
            self._on_device[device] = cached
        return cached


def rounding_eps(*dtypes: torch.dtype, compute_eps: float = 0.0) -> float:
    """The float eps of the coarsest of `dtypes` (and of the encoder's compute dtype)."""
    return max([compute_eps] + [torch.finfo(dtype).eps for dtype in dtypes if dtype.is_floating_point])


def same_encoding(candidate: torch.Tensor, encoding: PromptEncoding) -> torch.Tensor | None:
    """Whether a conditioning's text features begin with `encoding`'s (see the module rule), as a 0-dim bool tensor
    on the candidate's device (no host sync here), or None when the shapes alone rule it out.

    Shapes: candidate (n, L_c, d), any float dtype, n ≥ 1 (every batch row must match); L_c ≥ L of the encoding.
    Per row r: |candidate[:, r] − reference[r]| ≤ ENCODING_ULPS · eps · max_j |reference[r, j]|, compared in fp32
    after casting both (the subtraction adds ≤ ½ fp32 ulp of the difference, negligible against that bound).
    """
    if candidate.dim() != 3 or candidate.shape[-1] != encoding.context.shape[-1]:
        return None
    if candidate.shape[1] < encoding.length:
        return None
    reference, row_scale = encoding.reference_on(candidate.device)  # (1, L, d), (L, 1)
    eps = rounding_eps(candidate.dtype, encoding.context.dtype, compute_eps=encoding.compute_eps)
    difference = (candidate[:, : encoding.length].detach().to(torch.float32) - reference).abs()  # (n, L, d)
    return (difference <= ENCODING_ULPS * eps * row_scale).all()


def identify_conditionings(
    candidates: Sequence[torch.Tensor | None], encodings: Sequence[PromptEncoding]
) -> list[tuple | None]:
    """For each candidate (text features (n, L, d), or None), the token ids of the first encoding it matches, or None.

    All comparisons are read back to the host together: one sync per call on an accelerator, none on the CPU.
    """
    found: list[tuple | None] = [None] * len(candidates)
    pending: list[tuple[int, tuple, torch.Tensor]] = []
    for index, candidate in enumerate(candidates):
        if candidate is None:
            continue
        for encoding in encodings:
            flag = same_encoding(candidate, encoding)
            if flag is not None:
                pending.append((index, tuple(encoding.prompt_ids), flag))
    if not pending:
        return found
    matched = [False] * len(pending)
    by_device: dict[torch.device, list[int]] = {}
    for slot, (_, _, flag) in enumerate(pending):
        by_device.setdefault(flag.device, []).append(slot)
    for slots in by_device.values():  # one read per device
        for slot, value in zip(slots, torch.stack([pending[slot][2] for slot in slots]).tolist()):
            matched[slot] = value
    for (index, ids, _), value in zip(pending, matched):
        if value and found[index] is None:
            found[index] = ids
    return found
