"""Convert ComfyUI workflows between the frontend's UI format (nodes + links, version 0.4) and the API format.

The UI format is what the frontend saves and what `/workflow_templates` serves; `POST /prompt` needs the API format
(`{"id": {"class_type", "inputs"}}`). Both directions follow comfyui-frontend-package 1.27 (`graphToPrompt`,
`ExecutableNodeDTO`, the widget constructors), read from its bundle:

- widgets are created in `input_order` (required, then optional) for every input of a widget type that is not
  `forceInput`; `widgets_values` holds one value per widget, plus the values of helper widgets the frontend adds after
  some of them (see `helper_widget_values`);
- a linked widget input appears in the node's `inputs` with `"widget": {"name": ...}`; unlinked ones are left out;
- Note, MarkdownNote, Reroute and PrimitiveNode are virtual (never sent); a muted node (mode 2) is dropped together
  with the inputs it fed; a bypassed node (mode 4) passes an input of the matching type through.

`object_info` is the server's `/object_info` dict (or `node_info_from_mappings` for an in-process ComfyUI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
NOTE_TYPES = ("Note", "MarkdownNote")
VIRTUAL_TYPES = (*NOTE_TYPES, "Reroute", "PrimitiveNode")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
SEED_NAMES = ("seed", "noise_seed")  # INT inputs the frontend gives a control widget unless the flag says otherwise
WORKFLOW_VERSION = 0.4


class WorkflowFormatError(ValueError):
    """A workflow that cannot be converted: unknown node type, broken link, widget count that does not match."""


# -- node definitions ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str  # "COMBO" for a list of options
    options: dict
    optional: bool

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def default(self) -> Any:
        if "default" in self.options:
            return self.options["default"]
        if self.type == "COMBO":
            values = self.options.get("options") or []
            return values[0] if values else None
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(self.type)

    def helper_widget_values(self) -> list:
        """Values the frontend stores after this widget's own: its control_after_generate (and filter) widgets."""
        control = self.options.get("control_after_generate")
        if self.type == "INT" and (control if control is not None else self.name in SEED_NAMES):
            return ["fixed"]
        if self.type == "COMBO" and control:
            return ["fixed", ""]  # the control combo and its filter-list string
        if self.type == "COMBO" and any(self.options.get(flag) for flag in UPLOAD_FLAGS):
            return ["image"]  # the upload button
        return []


def input_specs(node_def: dict) -> list[InputSpec]:
    """A node's inputs in the frontend's order (required, then optional), hidden inputs left out."""
    specs = []
    for group in ("required", "optional"):
        declared = node_def.get("input", {}).get(group, {}) or {}
        for name in node_def.get("input_order", {}).get(group, list(declared)):
            raw = declared[name]
            kind, options = raw[0], (raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {})
            if isinstance(kind, list):  # a V1 combo: the type is the list of options
                kind, options = "COMBO", {**options, "options": kind}
            specs.append(InputSpec(name, kind, options, group == "optional"))
    return specs


def node_definition(object_info: dict, node_type: str, node_id: Any) -> dict:
    try:
        return object_info[node_type]
    except KeyError:
        raise WorkflowFormatError(f"node {node_id}: node type {node_type!r} is not registered (missing node)") from None


def types_match(a: str, b: str) -> bool:
    """LiteGraph.isValidConnection for plain and comma-separated type names ("*" and "" match anything)."""
    if a in ("*", "") or b in ("*", "") or a == b:
        return True
    return bool(set(str(a).split(",")) & set(str(b).split(",")))


# -- UI -> API -------------------------------------------------------------------------------------------------
_MUTED = object()  # a link from a muted node: the input is dropped, widget value included


@dataclass
class _UiGraph:
    nodes: dict[int, dict]
    links: dict[int, tuple]  # id -> (from_node, from_slot, to_node, to_slot, type)

    @classmethod
    def parse(cls, workflow: dict) -> "_UiGraph":
        links = {}
        for link in workflow.get("links", []):
            if isinstance(link, dict):
                link = [
                    link["id"],
                    link["origin_id"],
                    link["origin_slot"],
                    link["target_id"],
                    link["target_slot"],
                    link.get("type", "*"),
                ]
            links[link[0]] = tuple(link[1:6])
        return cls({node["id"]: node for node in workflow.get("nodes", [])}, links)

    def source_of(self, link_id: int | None, target_type: str, seen: frozenset = frozenset()) -> Any:
        """Where a link's value comes from: (node_id, slot), ("value", v) from a PrimitiveNode, _MUTED, or None."""
        if link_id is None or link_id not in self.links:
            return None
        from_id, from_slot = self.links[link_id][0], self.links[link_id][1]
        if (from_id, from_slot) in seen:
            raise WorkflowFormatError(f"link cycle through node {from_id}")
        seen = seen | {(from_id, from_slot)}
        node = self.nodes.get(from_id)
        if node is None:
            raise WorkflowFormatError(f"link {link_id} comes from node {from_id}, which is not in the workflow")
        if node["type"] == "Reroute":
            inputs = node.get("inputs") or [{}]
            return self.source_of(inputs[0].get("link"), target_type, seen)
        if node["type"] == "PrimitiveNode":
            return ("value", (node.get("widgets_values") or [None])[0])
        mode = node.get("mode", MODE_ALWAYS)
        if mode == MODE_NEVER:
            return _MUTED
        if mode == MODE_BYPASS:
            slot = self._bypass_slot(node, from_slot, target_type)
            return None if slot < 0 else self.source_of(node["inputs"][slot].get("link"), target_type, seen)
        return (from_id, from_slot)

    @staticmethod
    def _bypass_slot(node: dict, slot: int, target_type: str) -> int:
        """ExecutableNodeDTO#getBypassSlotIndex: the input a bypassed node passes to output `slot`."""
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        output_type = outputs[slot]["type"] if slot < len(outputs) else "*"
        if target_type in ("*", ""):
            return slot if len(inputs) > slot else 0
        if (
            slot < len(inputs)
            and types_match(inputs[slot]["type"], output_type)
            and types_match(inputs[slot]["type"], target_type)
        ):
            return slot
        for i, inp in enumerate(inputs):
            if inp["type"] == target_type:
                return i
        for i, inp in enumerate(inputs):
            if types_match(inp["type"], output_type) and types_match(inp["type"], target_type):
                return i
        return -1


def widget_inputs_from_values(node: dict, node_def: dict) -> dict:
    """Map a UI node's `widgets_values` to input names.

    Raises:
        WorkflowFormatError: the number of values does not match the node's current widgets (schema drift).
    """
    values = node.get("widgets_values")
    widgets = [spec for spec in input_specs(node_def) if spec.is_widget]
    if values is None:
        return {}
    if isinstance(values, dict):  # some custom nodes save a name -> value dict
        return {spec.name: values[spec.name] for spec in widgets if spec.name in values}
    expected = sum(1 + len(spec.helper_widget_values()) for spec in widgets)
    if len(values) != expected:
        names = [spec.name for spec in widgets]
        raise WorkflowFormatError(
            f"node {node['id']} ({node['type']}): {len(values)} widget values, but the node "
            f"has {expected} widget slots for {names}; the workflow is out of date"
        )
    out, i = {}, 0
    for spec in widgets:
        out[spec.name] = values[i]
        i += 1 + len(spec.helper_widget_values())
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt the frontend would queue for this UI workflow (without `_meta`).

    Raises:
        WorkflowFormatError: a node type is not in `object_info`, a link is broken, or widget values do not fit.
    """
    graph = _UiGraph.parse(workflow)
    prompt: dict[str, dict] = {}
    for node_id, node in graph.nodes.items():
        if node["type"] in VIRTUAL_TYPES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        node_def = node_definition(object_info, node["type"], node_id)
        inputs = widget_inputs_from_values(node, node_def)
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            source = graph.source_of(slot["link"], slot.get("type", "*"))
            if source is _MUTED:
                inputs.pop(slot["name"], None)
            elif source is None:
                continue
            elif source[0] == "value":
                inputs[slot["name"]] = source[1]
            else:
                inputs[slot["name"]] = [str(source[0]), int(source[1])]
        prompt[str(node_id)] = {"class_type": node["type"], "inputs": inputs}
    for entry in prompt.values():  # as graphToPrompt: drop links to nodes that are not sent
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


# -- API -> UI -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Note:
    """A Note node with `text`, placed above the first column (or at `pos` when given)."""

    text: str
    title: str = "Note"
    width: float = 420
    height: float | None = None
    pos: tuple[float, float] | None = None
    markdown: bool = False


@dataclass(frozen=True)
class Layout:
    """Left-to-right layout by graph depth: one column per depth, nodes stacked top to bottom."""

    origin: tuple[float, float] = (40.0, 40.0)
    column_gap: float = 70.0
    row_gap: float = 40.0
    node_width: float = 320.0
    wide_types: dict = field(default_factory=dict)  # class_type -> width
    # the canvas area `extra.ds` fits the graph into: a 1600x900 window less the frontend's side bar and top menu
    viewport: tuple[float, float] = (1440.0, 780.0)


SLOT_HEIGHT, WIDGET_HEIGHT, TITLE_HEIGHT, MULTILINE_HEIGHT = 22.0, 24.0, 30.0, 96.0


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _node_size(specs: list[InputSpec], api_inputs: dict, n_outputs: int, width: float) -> list[float]:
    sockets = sum(1 for s in specs if not s.is_widget) + sum(
        1 for s in specs if s.is_widget and _is_link(api_inputs.get(s.name))
    )
    height = TITLE_HEIGHT + SLOT_HEIGHT * max(sockets, n_outputs) + 8
    for spec in (s for s in specs if s.is_widget):
        multiline = spec.type == "STRING" and spec.options.get("multiline")
        height += MULTILINE_HEIGHT if multiline else WIDGET_HEIGHT * (1 + len(spec.helper_widget_values()))
    return [width, height]


def _depths(api_graph: dict) -> dict[str, int]:
    depths: dict[str, int] = {}

    def depth(node_id: str, stack: tuple = ()) -> int:
        if node_id in depths:
            return depths[node_id]
        if node_id in stack:
            raise WorkflowFormatError(f"the API graph has a cycle through node {node_id}")
        sources = [v[0] for v in api_graph[node_id]["inputs"].values() if _is_link(v)]
        for src in sources:
            if src not in api_graph:
                raise WorkflowFormatError(f"node {node_id} links to node {src}, which is not in the graph")
        depths[node_id] = 1 + max((depth(s, stack + (node_id,)) for s in sources), default=-1)
        return depths[node_id]

    for node_id in api_graph:
        depth(node_id)
    return depths


def api_to_ui(
    api_graph: dict, object_info: dict, layout: Layout | None = None, notes: list[Note] = (), extra: dict | None = None
) -> dict:
    """A frontend-loadable UI workflow (schema 0.4) for an API-format graph whose node ids are integers.

    Widget inputs the graph leaves out get their defaults; `_meta.title` becomes the node title. `extra` is merged
    into the workflow's `extra` (the frontend keeps unknown keys).

    Raises:
        WorkflowFormatError: unknown node type, non-integer id, unknown input name, a link to a missing node or output.
    """
    layout = layout or Layout()
    for node_id in api_graph:
        if not str(node_id).isdigit():
            raise WorkflowFormatError(f"node id {node_id!r}: UI workflows need integer node ids")
    specs = {nid: input_specs(node_definition(object_info, n["class_type"], nid)) for nid, n in api_graph.items()}
    for nid, node in api_graph.items():
        unknown = set(node["inputs"]) - {s.name for s in specs[nid]}
        if unknown:
            raise WorkflowFormatError(f"node {nid} ({node['class_type']}): unknown inputs {sorted(unknown)}")
    depths = _depths(api_graph)
    order = sorted(api_graph, key=lambda nid: (depths[nid], int(nid)))

    links: list[list] = []
    ui_nodes: dict[str, dict] = {}
    for nid in order:
        node, node_def = api_graph[nid], object_info[api_graph[nid]["class_type"]]
        outputs = [
            {"name": name, "type": kind, "links": [], "slot_index": i}
            for i, (kind, name) in enumerate(
                zip(node_def.get("output", []), node_def.get("output_name") or node_def.get("output", []))
            )
        ]
        width = layout.wide_types.get(node["class_type"], layout.node_width)
        ui_nodes[nid] = {
            "id": int(nid),
            "type": node["class_type"],
            "pos": [0.0, 0.0],
            "size": _node_size(specs[nid], node["inputs"], len(outputs), width),
            "flags": {},
            "order": 0,
            "mode": MODE_ALWAYS,
            "inputs": [],
            "outputs": outputs,
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": [],
        }
        title = (node.get("_meta") or {}).get("title")
        if title and title != node_def.get("display_name", node["class_type"]):
            ui_nodes[nid]["title"] = title

    for position, nid in enumerate(order):
        node, ui = api_graph[nid], ui_nodes[nid]
        ui["order"] = position
        socket_inputs, widget_sockets = [], []
        for spec in specs[nid]:
            value = node["inputs"].get(spec.name)
            if spec.is_widget:
                ui["widgets_values"].extend(
                    [spec.default if value is None or _is_link(value) else value, *spec.helper_widget_values()]
                )
                if _is_link(value):
                    widget_sockets.append(
                        {"name": spec.name, "type": spec.type, "widget": {"name": spec.name}, "link": value}
                    )
            else:
                socket_inputs.append({"name": spec.name, "type": spec.type, "link": value if _is_link(value) else None})
        ui["inputs"] = socket_inputs + widget_sockets
        for slot_index, slot in enumerate(ui["inputs"]):
            if slot["link"] is None:
                continue
            src_id, src_slot = slot["link"]
            source = ui_nodes.get(src_id)
            if source is None or src_slot >= len(source["outputs"]):
                raise WorkflowFormatError(
                    f"node {nid} input {slot['name']!r} links to a missing output {src_id}:{src_slot}"
                )
            link_id = len(links) + 1
            links.append([link_id, int(src_id), src_slot, int(nid), slot_index, source["outputs"][src_slot]["type"]])
            source["outputs"][src_slot]["links"].append(link_id)
            slot["link"] = link_id

    note_nodes = _note_nodes(notes, first_id=max((int(n) for n in api_graph), default=0) + 1)
    bounds = _place(order, depths, ui_nodes, note_nodes, layout)
    workflow_extra = {"ds": _fit_view(bounds, layout.viewport)}
    workflow_extra.update(extra or {})
    all_nodes = [ui_nodes[nid] for nid in order] + note_nodes
    return {
        "last_node_id": max((n["id"] for n in all_nodes), default=0),
        "last_link_id": len(links),
        "nodes": all_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": workflow_extra,
        "version": WORKFLOW_VERSION,
    }


def _note_nodes(notes: list[Note], first_id: int) -> list[dict]:
    out = []
    for i, note in enumerate(notes):
        height = note.height or TITLE_HEIGHT + 20 + 18 * sum(
            max(1, math.ceil(len(line) / 52)) for line in note.text.splitlines() or [""]
        )
        out.append(
            {
                "id": first_id + i,
                "type": "MarkdownNote" if note.markdown else "Note",
                "pos": list(note.pos) if note.pos else None,
                "size": [note.width, height],
                "flags": {},
                "order": 0,
                "mode": MODE_ALWAYS,
                "inputs": [],
                "outputs": [],
                "properties": {},
                "widgets_values": [note.text],
                "title": note.title,
                "color": "#432",
                "bgcolor": "#653",
            }
        )
    return out


def _place(
    order: list[str], depths: dict[str, int], ui_nodes: dict[str, dict], note_nodes: list[dict], layout: Layout
) -> tuple[float, float, float, float]:
    """Set every node's `pos`; return the bounding box (x0, y0, x1, y1)."""
    x0, y0 = layout.origin
    columns: dict[int, list[str]] = {}
    for nid in order:
        columns.setdefault(depths[nid], []).append(nid)
    x, max_y = x0, y0
    free_notes = [n for n in note_nodes if n["pos"] is None]
    for depth in sorted(columns):
        y = y0
        if depth == 0:  # the notes go at the top of the first column, where a user starts reading
            for note in free_notes:
                note["pos"] = [x, y]
                y += note["size"][1] + layout.row_gap
        width = max(
            [ui_nodes[n]["size"][0] for n in columns[depth]]
            + ([n["size"][0] for n in free_notes] if depth == 0 else [])
        )
        for nid in columns[depth]:
            ui_nodes[nid]["pos"] = [x, y]
            y += ui_nodes[nid]["size"][1] + layout.row_gap
        max_y = max(max_y, y - layout.row_gap)
        x += width + layout.column_gap
    boxes = [(n["pos"], n["size"]) for n in [*ui_nodes.values(), *note_nodes]]
    if not boxes:
        return (x0, y0, x0, y0)
    return (
        min(p[0] for p, _ in boxes),
        min(p[1] for p, _ in boxes) - TITLE_HEIGHT,
        max(p[0] + s[0] for p, s in boxes),
        max(p[1] + s[1] for p, s in boxes),
    )


def _fit_view(bounds: tuple[float, float, float, float], viewport: tuple[float, float]) -> dict:
    """`extra.ds` (canvas scale and offset) that shows the whole graph in `viewport`, scaled down only."""
    x0, y0, x1, y1 = bounds
    margin = 40.0
    scale = min(1.0, (viewport[0] - 2 * margin) / max(x1 - x0, 1.0), (viewport[1] - 2 * margin) / max(y1 - y0, 1.0))
    return {"scale": round(scale, 4), "offset": [round(margin / scale - x0, 2), round(margin / scale - y0, 2)]}


# -- helpers ---------------------------------------------------------------------------------------------------
def node_types(workflow: dict) -> set[str]:
    """Every node type a UI workflow uses, virtual ones (Note, Reroute, ...) left out."""
    return {n["type"] for n in workflow.get("nodes", []) if n["type"] not in VIRTUAL_TYPES}


def complete_api_graph(api_graph: dict, object_info: dict) -> dict:
    """A copy of an API graph with every omitted widget input set to its default (as the frontend would send it)."""
    out = {}
    for nid, node in api_graph.items():
        inputs = dict(node["inputs"])
        for spec in input_specs(node_definition(object_info, node["class_type"], nid)):
            if spec.is_widget and spec.name not in inputs:
                inputs[spec.name] = spec.default
        out[nid] = {"class_type": node["class_type"], "inputs": inputs}
    return out
