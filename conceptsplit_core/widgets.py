"""The one type for a node widget's limits (defaults and ranges come from the core, so the UI and the
algorithm agree). Each core module keeps its options' defaults, ranges and meanings side by side; the nodes build
their widgets from them (nodes/widgets.py)."""

from __future__ import annotations

from typing import NamedTuple


class WidgetRange(NamedTuple):
    """Limits of one number widget; `recommended` is the tooltip's advice ("" = none)."""

    min: float
    max: float
    step: float
    recommended: str = ""
