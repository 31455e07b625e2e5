"""LODA hyperparameters: paper defaults, widget ranges and validation (method §3, §4, §6, §8).

Nodes read defaults, min/max/step and the recommended-range text from here, so the UI and the algorithm agree.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, Optional

from .errors import ConceptSplitError
from .number_checks import check_number
from .widgets import WidgetRange

# N = round(0.2·S) when `loda_steps` is AUTO_LODA_STEPS: 10 LODA steps at S = 50 (method §3.3, §8 #7).
LODA_STEPS_FRACTION = 0.2
AUTO_LODA_STEPS = -1  # loda_steps value meaning "round(0.2·S)"; 0 means stage 1 off (attention fixing only)

StepSchedule = Literal["linear", "sqrt"]
KlPairs = Literal["ordered", "symmetric"]
FixingLayers = Literal["all", "map_level"]
FixingBranches = Literal["both", "cond"]
MaskSource = Literal["cond", "cond_and_uncond"]

# Allowed strings of the option fields, first = default. Combo widgets read these.
UI_OPTIONS: dict[str, tuple[str, ...]] = {
    "step_schedule": ("linear", "sqrt"),
    "kl_pairs": ("ordered", "symmetric"),
    "fixing_layers": ("all", "map_level"),
    "fixing_branches": ("both", "cond"),
    "mask_source": ("cond", "cond_and_uncond"),
}

# Numeric widgets: field -> WidgetRange(min, max, step, recommended range for the tooltip). The widget limits are wider
# than the recommended range on purpose (ablations); `LodaConfig.validate` enforces only what is mathematically
# required. `loda_steps`: -1 = auto, 0 = stage 1 off, >= 1 = N.
UI_RANGES: dict[str, WidgetRange] = {
    "loda_steps": WidgetRange(
        AUTO_LODA_STEPS,
        1000,
        1,
        "-1 = auto, round(0.2·steps): 10 at 50 steps as in the paper; "
        "5 to 15 at 50 steps; 0 = stage 1 off (attention fixing only)",
    ),
    "inner_iterations": WidgetRange(1, 20, 1, "1 as in the paper; the official pipeline uses 10"),
    "kl_threshold": WidgetRange(
        0.0, 10.0, 0.05, "0.5 to 3; 1.0 is the paper (τ); higher pushes concepts further apart"
    ),
    "step_scale": WidgetRange(0.0, 200.0, 0.5, "20 to 40; 40 is the paper's η at step 0, 20 the official code's"),
    "smoothing_sigma": WidgetRange(0.1, 5.0, 0.05, "1.0 to 2.0; 1.5 is the paper (the official pipeline uses 1.0)"),
    "mask_percentile": WidgetRange(
        0.5, 0.999, 0.005, "0.80 to 0.99; 0.90 is the paper (γ); lower masks over-remove overlap"
    ),
    "mask_sigma": WidgetRange(0.1, 5.0, 0.05, "1.0 to 2.0; 1.5 is the official code"),
    "boost": WidgetRange(0.0, 20.0, 0.5, "0 to 10; +5 is the paper (p)"),
    "suppression": WidgetRange(-1e8, 0.0, 1.0, "-1e8 (the paper's m) removes the other concepts' tokens; 0 disables"),
}

# What each LodaConfig field means, for its widget's tooltip (every field needs one: the nodes build a widget per
# field and refuse a field without a meaning).
MEANINGS: dict[str, str] = {
    "loda_steps": "N: sampling steps 0..N-1 get a latent update (stage 1); attention fixing runs from step N. "
    "Stage 1 runs the sampler one step at a time, so multistep samplers (dpmpp_2m, deis, ipndm, ...) "
    "run first-order on those steps; uni_pc cannot, use it with 0.",
    "inner_iterations": "Gradient steps per stage-1 sampling step.",
    "kl_threshold": "τ: updates stop once the harmonic mean of the concepts' pairwise KL reaches it.",
    "step_scale": "η at step 0; the step size falls linearly to half of it over the steps (paper schedule).",
    "step_schedule": "Step-size schedule: linear = the paper (40 − 20·i/S), sqrt = the official code.",
    "smoothing_sigma": "σ of the 7×7 Gaussian that smooths the maps before the KL.",
    "kl_pairs": "ordered: KL for a < b (official code); symmetric: both directions (Algorithm 1).",
    "mask_percentile": "γ: each concept's mask is its smoothed map above this quantile (0.90 = top 10 %).",
    "mask_sigma": "σ_m of the Gaussian that smooths the maps before the percentile.",
    "boost": "p: added to the concept token's attention logits inside its own mask.",
    "suppression": "m: added to the other concept tokens' logits inside a concept's mask.",
    "fixing_layers": "all cross-attention layers (paper reconstruction) or only the map-level layers.",
    "fixing_branches": "both CFG branches (official processors) or only the conditional one.",
    "mask_source": "cond: masks from the conditional maps; cond_and_uncond: both, as the official code.",
}


def default_loda_steps(total_steps: int) -> int:
    """N = round(0.2·S), the number of LODA stage-1 steps for S sampling steps (method §6, §8 #7).

    Args:
        total_steps: S, the sampler's step count.
    Returns:
        N; 10 at S = 50. Small S can give 0, which `LodaConfig.validate` rejects for auto.
    """
    return round(LODA_STEPS_FRACTION * total_steps)


@dataclass(frozen=True)
class LodaConfig:
    """LODA settings (method §3 stage 1, §4 stage 2). Defaults are the paper's reference run (method §5, §6)."""

    # --- stage 1: latent optimisation (method §3) ---
    # N, steps 0..N-1 get a latent update; -1 (AUTO_LODA_STEPS) -> round(0.2·S); 0 = stage 1 off; <= S
    loda_steps: int = AUTO_LODA_STEPS
    inner_iterations: int = 1  # gradient steps per sampling step; paper and script 1, pipeline 10 (§3.3); 1..20
    kl_threshold: float = 1.0  # τ in L = max(0, τ − HM); paper and script 1.0, pipeline 3 (§3.2); >= 0, 0.5..3
    step_scale: float = 40.0  # η at step 0 of the paper schedule η_i = 40 − 20·i/S (Supp. §A, §3.3); >= 0
    step_schedule: StepSchedule = "linear"  # "linear" = paper; "sqrt" = official 20·sqrt(linspace(1, .5, S)) (§3.3)
    smoothing_sigma: float = 1.5  # σ of the Attend-and-Excite 7×7 kernel, width σ·√2 (§3.2, §8 #18); > 0
    kl_pairs: KlPairs = "ordered"  # "ordered": a < b as the code; "symmetric": i ≠ j as Algorithm 1 (§3.2, §8 #6)
    # --- stage 2: attention fixing (method §4) ---
    mask_percentile: float = 0.90  # γ as a fraction: θ_k = γ-quantile of the smoothed map (§4.2); in (0, 1)
    mask_sigma: float = 1.5  # σ_m of the true Gaussian (symmetric boundary, truncate 4) before the percentile; > 0
    boost: float = 5.0  # p, added to the own token's logit inside the own mask; paper +5, pipeline 3 (§4.3)
    suppression: float = -1e8  # m, added to other concepts' token logits inside a mask; paper −1e8; <= 0 (§4.3)
    fixing_layers: FixingLayers = "all"  # "all" cross-attention layers (resized masks) or only "map_level" (§8 #2)
    fixing_branches: FixingBranches = "both"  # bias in "both" CFG branches, as the official processors (§8 #3)
    mask_source: MaskSource = "cond"  # maps for the masks: "cond" or "cond_and_uncond" as the official code (§8 #4)

    def loda_steps_for(self, total_steps: int) -> int:
        """N for S = `total_steps`: the explicit `loda_steps` (0 = stage 1 off), else round(0.2·S) (method §8 #7)."""
        if self.loda_steps == AUTO_LODA_STEPS:
            return default_loda_steps(total_steps)
        return self.loda_steps

    def validate(self, total_steps: Optional[int] = None) -> None:
        """Check every field; with `total_steps` (S) also check N against S.

        Args:
            total_steps: S, the sampler's step count, when known.
        Raises:
            ConceptSplitError: an option string is unknown, a number is out of its valid range, or N does not
                fit in S steps.
        """
        for name, allowed in UI_OPTIONS.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConceptSplitError.build(
                    f"Unknown LODA option {name}",
                    seen=repr(value),
                    expected="one of " + ", ".join(repr(a) for a in allowed),
                    fix=f"set {name} to one of the listed values",
                )
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name not in UI_OPTIONS:  # every number field: NaN would pass the range checks below
                check_number(
                    f"LODA setting {field.name}",
                    value,
                    integer=isinstance(field.default, int),
                    fix=f"enter a finite value for {field.name}",
                )
        self._check(
            isinstance(self.loda_steps, int) and self.loda_steps >= AUTO_LODA_STEPS,
            "loda_steps",
            "-1 (auto, round(0.2·steps)), 0 (stage 1 off) or a step count >= 1",
            "use -1 for round(0.2·steps), 0 to turn stage 1 off, or a positive step count",
        )
        self._check(self.inner_iterations >= 1, "inner_iterations", "an integer >= 1", "set it to 1 (the paper)")
        self._check(self.kl_threshold >= 0, "kl_threshold", "τ >= 0", "set τ to 1.0 (the paper)")
        self._check(
            self.step_scale >= 0,
            "step_scale",
            ">= 0 (a negative η would merge the concepts)",
            "set it to 40 (the paper)",
        )
        self._check(self.smoothing_sigma > 0, "smoothing_sigma", "> 0", "set it to 1.5 (the paper)")
        self._check(
            0 < self.mask_percentile < 1,
            "mask_percentile",
            "γ as a fraction strictly between 0 and 1 (0.90 = 90th percentile)",
            "write the percentile as a fraction, e.g. 0.90 instead of 90",
        )
        self._check(self.mask_sigma > 0, "mask_sigma", "> 0", "set it to 1.5 (the official code)")
        self._check(
            self.suppression <= 0,
            "suppression",
            "m <= 0 (it removes the other concepts' tokens)",
            "set m to -1e8 (the paper) or 0 to disable suppression",
        )
        if total_steps is None:
            return
        if total_steps < 1:
            raise ConceptSplitError.build(
                "The sampler has no steps to run LODA on",
                seen=f"steps = {total_steps}",
                expected="steps >= 1",
                fix="give the sampler at least one step",
            )
        loda_steps = self.loda_steps_for(total_steps)
        if loda_steps > total_steps:
            raise ConceptSplitError.build(
                "More LODA steps than sampling steps",
                seen=f"loda_steps N = {loda_steps} with {total_steps} sampling steps",
                expected=f"N <= {total_steps}",
                fix=f"lower loda_steps to at most {total_steps} (paper: 20 % of the steps) or raise the steps",
            )
        if loda_steps < 1 and self.loda_steps == AUTO_LODA_STEPS:
            raise ConceptSplitError.build(
                "Automatic LODA steps round to zero",
                seen=f"round(0.2·{total_steps}) = {loda_steps} with {total_steps} sampling steps",
                expected="at least 1 LODA step",
                fix="set loda_steps explicitly (0 turns stage 1 off) or use at least 3 sampling steps",
            )

    def _check(self, ok: bool, name: str, expected: str, fix: str) -> None:
        if not ok:
            raise ConceptSplitError.build(
                f"LODA setting {name} is out of range",
                seen=f"{name} = {getattr(self, name)!r}",
                expected=expected,
                fix=fix,
            )


LODA_DEFAULTS = LodaConfig()
