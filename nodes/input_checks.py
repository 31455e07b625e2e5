"""Every INT and FLOAT input of a node, checked against its own widget's range before the node does anything.

ComfyUI's prompt validation compares typed-in values with min/max using `<` and `>`, which NaN passes, and skips
values linked from another node entirely (execution.py validate_inputs, both supported versions), so a node cannot
rely on its widget limits. The limits are read from the node's own schema, so they cannot drift from the UI.
"""

from __future__ import annotations

from typing import Mapping

from comfy_api.latest import io

from ..conceptsplit_core.number_checks import check_number

_LIMITS: dict[type, tuple[str, tuple[tuple[str, object, object, bool], ...]]] = {}


def _number_limits(node_cls) -> tuple[str, tuple[tuple[str, object, object, bool], ...]]:
    """(display name, ((input id, min, max, integer), ...)) of a node's number widgets, read once per class."""
    if node_cls not in _LIMITS:
        schema = node_cls.define_schema()
        limits = tuple(
            (spec.id, spec.min, spec.max, isinstance(spec, io.Int.Input))
            for spec in schema.inputs
            if isinstance(spec, (io.Int.Input, io.Float.Input))
        )
        _LIMITS[node_cls] = (schema.display_name or schema.node_id, limits)
    return _LIMITS[node_cls]


def check_number_inputs(node_cls, values: Mapping[str, object]) -> None:
    """Raise ConceptSplitError for the first INT/FLOAT input in `values` that is NaN, Inf, not an integer where one
    is declared, or outside the node's widget min/max. Inputs absent from `values` or None (optional, unset) pass."""
    display, limits = _number_limits(node_cls)
    for name, minimum, maximum, integer in limits:
        value = values.get(name)
        if value is not None:
            check_number(f"{display} input {name}", value, minimum, maximum, integer=integer)
