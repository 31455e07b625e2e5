"""Node widgets built from the core's option tables (conceptsplit_core.widgets.WidgetRange): limits, default and
tooltip in one call, so a widget cannot drift from the range and meaning its core module states."""

from __future__ import annotations

from comfy_api.latest import io

from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.widgets import WidgetRange


def number_input(
    name: str, default, widget: WidgetRange, tooltip: str, integer: bool = False, step: bool = True, **extra
):
    """An INT (integer) or FLOAT input with the limits of `widget`; the tooltip is `tooltip` followed by the
    range's recommendation. `step=False` leaves the widget's step to ComfyUI (INT inputs that never had one)."""
    if not tooltip.strip():
        raise ConceptSplitError.build(
            f"Widget {name} has no tooltip",
            seen="an empty tooltip",
            expected="what the option means",
            fix="write its meaning next to its range",
        )
    text = f"{tooltip} Recommended: {widget.recommended}." if widget.recommended else tooltip
    if integer:
        steps = {"step": int(widget.step)} if step else {}
        return io.Int.Input(
            name, default=default, min=int(widget.min), max=int(widget.max), tooltip=text, **steps, **extra
        )
    return io.Float.Input(
        name, default=default, min=widget.min, max=widget.max, step=widget.step, tooltip=text, **extra
    )


def choice_input(name: str, options, meaning: str, **extra):
    """A COMBO input whose default is the first option; the tooltip is `meaning` and the default."""
    if not meaning.strip():
        raise ConceptSplitError.build(
            f"Widget {name} has no tooltip",
            seen="an empty tooltip",
            expected="what the option means",
            fix="write its meaning next to its choices",
        )
    options = list(options)
    return io.Combo.Input(
        name, options=options, default=options[0], tooltip=f"{meaning} Default {options[0]}.", **extra
    )
