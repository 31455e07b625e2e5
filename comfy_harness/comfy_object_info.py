"""`/object_info` without a server: the same per-node dict that ComfyUI 0.3.64's `server.py` builds.

`PromptServer.__init__` defines `node_info` as a local function of its routes, so it cannot be imported; this is
that function, for a process where `comfy_harness.comfy_bootstrap` has imported ComfyUI and loaded the pack.
"""

from __future__ import annotations


def node_info(node_class: str) -> dict:
    """One node's `/object_info` entry (V3 nodes describe themselves; V1 nodes as server.py reads them)."""
    import nodes
    from comfy_api.internal import _ComfyNodeInternal

    obj_class = nodes.NODE_CLASS_MAPPINGS[node_class]
    if issubclass(obj_class, _ComfyNodeInternal):
        return obj_class.GET_NODE_INFO_V1()
    input_types = obj_class.INPUT_TYPES()
    info = {
        "input": input_types,
        "input_order": {key: list(value.keys()) for key, value in input_types.items()},
        "output": obj_class.RETURN_TYPES,
        "output_is_list": getattr(obj_class, "OUTPUT_IS_LIST", [False] * len(obj_class.RETURN_TYPES)),
        "output_name": getattr(obj_class, "RETURN_NAMES", obj_class.RETURN_TYPES),
        "name": node_class,
        "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_class, node_class),
        "description": getattr(obj_class, "DESCRIPTION", ""),
        "python_module": getattr(obj_class, "RELATIVE_PYTHON_MODULE", "nodes"),
        "category": getattr(obj_class, "CATEGORY", "sd"),
        "output_node": getattr(obj_class, "OUTPUT_NODE", False) is True,
    }
    for attr, key in (("OUTPUT_TOOLTIPS", "output_tooltips"), ("API_NODE", "api_node")):
        if hasattr(obj_class, attr):
            info[key] = getattr(obj_class, attr)
    for attr, key in (("DEPRECATED", "deprecated"), ("EXPERIMENTAL", "experimental")):
        if getattr(obj_class, attr, False):
            info[key] = True
    return info


def object_info(node_classes: list[str] | None = None) -> dict:
    """`/object_info` for the given node classes (default: every registered one)."""
    import nodes

    return {name: node_info(name) for name in (node_classes or list(nodes.NODE_CLASS_MAPPINGS))}
