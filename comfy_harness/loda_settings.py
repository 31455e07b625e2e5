"""The LODA node settings the tests and benchmarks run with: the paper's defaults except a short stage 1 and strong
fixing (boost 5, suppression -1e8), so an effect shows in 2-6 steps on the tiny models. Each user adds its own
`loda_steps` (and words), e.g. `dict(LODA_NODE_SETTINGS, loda_steps=1)`."""

from __future__ import annotations

LODA_NODE_SETTINGS = dict(
    inner_iterations=1,
    kl_threshold=1.0,
    step_scale=40.0,
    step_schedule="linear",
    smoothing_sigma=1.5,
    kl_pairs="ordered",
    mask_percentile=0.9,
    mask_sigma=1.5,
    boost=5.0,
    suppression=-1e8,
    fixing_layers="all",
    fixing_branches="both",
    mask_source="cond",
)
