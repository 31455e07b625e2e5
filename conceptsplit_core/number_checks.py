"""Numbers that come from outside the pack (node inputs, adapter metadata, settings): finite and in range, or one
clear error (issue 11).

ComfyUI checks a widget value against its min/max only with `<` and `>`, which NaN passes, and only for values typed
into the prompt: a value linked from another node is not checked at all. So every number input is checked here
again, before anything runs. The same holds for a combo's choice (`check_choice`).
"""

from __future__ import annotations

import math
import numbers

from .errors import ConceptSplitError

WIDGET_FIX = (
    "enter a value in that range; NaN, Inf or out-of-range values come from a workflow edited by hand, "
    "an API-format prompt or a node linked to this input"
)


def check_number(
    label: str,
    value,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    integer: bool = False,
    fix: str | None = None,
) -> float | int:
    """Return `value` if it is a finite number (an integer when `integer`) in [minimum, maximum]; else raise.

    Args:
        label: what the number is, for the message, e.g. "Load ToVA Adapter input strength".
        minimum, maximum: inclusive limits; None = unbounded on that side.
        integer: require an integer (bool is refused either way).
        fix: the message's fix; default: enter a value in the range.
    Raises:
        ConceptSplitError: not a number, not an integer, NaN or infinite, or out of range.
    """
    expected = _expected(minimum, maximum, integer)
    fix = fix or (WIDGET_FIX if minimum is not None or maximum is not None else "enter a finite number")
    wanted = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, wanted):
        kind = "an integer" if integer else "a number"
        raise ConceptSplitError.build(
            f"{label} is not {kind}", seen=f"{value!r} ({type(value).__name__})", expected=expected, fix=fix
        )
    if not integer and not math.isfinite(float(value)):
        raise ConceptSplitError.build(
            f"{label} is not a finite number", seen=repr(float(value)), expected=expected, fix=fix
        )
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ConceptSplitError.build(f"{label} is out of range", seen=repr(value), expected=expected, fix=fix)
    return value


def check_choice(label: str, value, choices) -> str:
    """Return `value` if it is one of `choices` (a combo widget's list); else raise ConceptSplitError naming them.

    `label`: what is chosen, for the message "Unknown {label}", e.g. "mask_mode".
    """
    if value not in choices:
        raise ConceptSplitError.build(
            f"Unknown {label}", seen=repr(value), expected=", ".join(choices), fix="pick one from the list"
        )
    return value


def _expected(minimum: float | None, maximum: float | None, integer: bool) -> str:
    kind = "an integer" if integer else "a finite number"
    if minimum is not None and maximum is not None:
        return f"{kind} from {_shown(minimum)} to {_shown(maximum)}"
    if minimum is not None:
        return f"{kind} of at least {_shown(minimum)}"
    if maximum is not None:
        return f"{kind} of at most {_shown(maximum)}"
    return kind


def _shown(limit: float) -> str:
    return str(limit) if isinstance(limit, numbers.Integral) else f"{limit:g}"
