"""Drive the real ComfyUI frontend in headless Debian chromium with Playwright (no browser downloads, no network).

Used by tests/integration/test_browser.py and `scripts/build_workflows.py --thumbnails`. Chromium is the system one
(`apt-get install chromium`, /usr/bin/chromium) started with the flags that work on a closed network; Playwright
gives it a fresh, empty profile. Every request that is not to the ComfyUI server on 127.0.0.1 is aborted and
recorded (the frontend asks api.comfy.org for release notes, for example).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image

logger = logging.getLogger(__name__)

CHROMIUM = os.environ.get("CONCEPTSPLIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
VIEWPORT = {"width": 1600, "height": 900}
APP_READY_MS = 45_000
# Settings of a user who has seen the first-run template browser; the minimap would cover part of a screenshot.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}
# For pictures of the example workflows: frontend 1.49 outlines nodes whose model file is missing in red and shows an
# errors overlay (a user who has the models sees neither); this setting turns both off (1.27 ignores it).
SCREENSHOT_SETTINGS = {**FRONTEND_SETTINGS, "Comfy.RightSidePanel.ShowErrorsTab": False}
LOCAL_SCHEMES = ("data:", "blob:", "about:")
# File extensions frontend 1.49 treats as model files when it looks for missing models (its isModelFileName).
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".onnx", ".gguf")

_APP_READY_JS = (
    "() => !!(window.app && window.app.graph && window.LiteGraph && window.app.vueAppReady !== false"
    " && Object.keys(window.LiteGraph.registered_node_types).length > 50)"
)
_LOAD_TEMPLATE_JS = """async ([module, name]) => {
    const response = await window.app.api.fetchApi(`/workflow_templates/${module}/${name}.json`);
    if (!response.ok) throw new Error(`template ${module}/${name}: HTTP ${response.status}`);
    const workflow = await response.json();
    await window.app.loadGraphData(workflow, true, true, name);
    return workflow;
}"""
_LOAD_JSON_JS = "async ([workflow, name]) => { await window.app.loadGraphData(workflow, true, true, name); }"
_FOCUS_MODE_JS = "() => window.app.extensionManager.command.execute('Workspace.ToggleFocusMode')"
# The nodes' bounding box in page pixels (title bars included), clamped to the viewport.
_GRAPH_BOUNDS_JS = """() => {
    const ds = window.app.canvas.ds, title = window.LiteGraph.NODE_TITLE_HEIGHT, pad = 16;
    const rect = window.app.canvas.canvas.getBoundingClientRect();
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of window.app.graph.nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const [sx0, sy0] = ds.convertOffsetToCanvas([x0, y0]), [sx1, sy1] = ds.convertOffsetToCanvas([x1, y1]);
    const left = Math.max(0, rect.left + sx0 - pad), top = Math.max(0, rect.top + sy0 - pad);
    const right = Math.min(window.innerWidth, rect.left + sx1 + pad);
    const bottom = Math.min(window.innerHeight, rect.top + sy1 + pad);
    return {x: left, y: top, width: right - left, height: bottom - top};
}"""
# What the frontend made of the loaded graph, read from its own LiteGraph state (not from dialog text, which differs
# between frontends: 1.27 names missing node types in a dialog, 1.49 in a side panel). Both frontends, when
# LGraph.configure meets a type that createNode cannot build, add a bare LGraphNode carrying the saved type and
# `last_serialization`: a node that is not an instance of its registered class is such a placeholder. Frontend 1.49
# also sets `has_errors` on nodes whose model file is missing (a combo value the server does not list); 1.27 does not.
_INSPECT_JS = """async (types) => {
    const registered = window.LiteGraph.registered_node_types;
    const nodes = window.app.graph._nodes;
    const label = (n) => `${n.id}:${n.type}`;
    const placeholder = (n) => { const cls = registered[n.type]; return !cls || !(n instanceof cls); };
    const choices = (w, n) => {
        const values = w.options && w.options.values;
        return typeof values === 'function' ? values(w, n) : values;
    };
    const missing = {};
    for (const n of nodes) {
        for (const w of n.widgets || []) {
            const values = w.type === 'combo' ? choices(w, n) : null;
            if (Array.isArray(values) && !values.includes(w.value)) (missing[label(n)] ??= {})[w.name] = w.value;
        }
    }
    const dialogs = Array.from(document.querySelectorAll('.p-dialog, [role=dialog]'))
        .map((d) => d.innerText.trim()).filter((t) => t.length > 0);
    const prompt = await window.app.graphToPrompt();
    return {
        unregistered: types.filter((t) => !(t in registered)),
        broken_nodes: nodes.filter(placeholder).map(label),
        node_count: nodes.length,
        dialogs: dialogs,
        prompt: prompt.output,
        error_nodes: nodes.filter((n) => n.has_errors && !placeholder(n)).map(label),
        missing_values: missing,
    };
}"""


def browser_unavailable_reason() -> str | None:
    """None when Playwright and chromium are both there, else what is missing and how to install it."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (pip install -e '.[test]')"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        return f"{CHROMIUM} not found (as root: apt-get update && apt-get install -y chromium)"
    return None


@dataclass
class LoadReport:
    """The frontend's view of one loaded workflow; nodes are named `"<id>:<type>"`.

    - `unregistered`: of the node types asked about, those the frontend has no class for.
    - `broken_nodes`: nodes the frontend could not create (a missing node type, or a constructor that threw): the
      placeholders LiteGraph puts in their place. A missing model file does not make a node broken.
    - `error_nodes`: the other nodes the frontend marks with `has_errors` (frontend 1.49: a missing model file).
    - `missing_values`: per node, the combo widgets whose value is not among the choices the server sent
      ({widget name: value}): files this machine does not have (checkpoints, adapters, image folders), or a
      value the node no longer offers.
    - `prompt`: the API prompt `app.graphToPrompt()` would queue (`output`, with `_meta`).
    - `dialogs`: text of the open dialogs (for messages to a person; the checks above do not depend on it).
    """

    unregistered: list[str]
    broken_nodes: list[str]
    node_count: int
    dialogs: list[str]
    prompt: dict
    console_errors: list[str] = field(default_factory=list)
    error_nodes: list[str] = field(default_factory=list)
    missing_values: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def missing_node_dialogs(self) -> list[str]:
        """Open dialogs that mention something missing (frontend 1.27 names missing node types in one; 1.49 does
        not show a dialog: use `broken_nodes`)."""
        return [d for d in self.dialogs if "missing" in d.lower()]

    @property
    def missing_model_files(self) -> dict[str, dict[str, str]]:
        """The `missing_values` that name a model file (by its extension, the rule frontend 1.49 uses)."""
        found = {}
        for node, widgets in self.missing_values.items():
            files = {
                name: value
                for name, value in widgets.items()
                if isinstance(value, str) and value.lower().endswith(MODEL_FILE_SUFFIXES)
            }
            if files:
                found[node] = files
        return found

    @property
    def unexplained_errors(self) -> list[str]:
        """Error-marked nodes that are neither placeholders nor missing a value the server does not list: an
        error the frontend found in the graph itself."""
        return [node for node in self.error_nodes if node not in self.missing_values]

    @property
    def problems(self) -> list[str]:
        """Why the workflow does not open cleanly in this frontend (empty when it does); missing files are not a
        problem (a test machine has no weights)."""
        found = [f"node type unknown to the frontend: {t}" for t in self.unregistered]
        found += [
            f"node the frontend could not create: {n}"
            for n in self.broken_nodes
            if n.split(":", 1)[1] not in self.unregistered
        ]
        found += [f"node marked with an error: {n}" for n in self.unexplained_errors]
        return found


class FrontendPage:
    """One browser tab with the ComfyUI app loaded from `server_url`."""

    def __init__(self, page, server_url: str):
        self.page = page
        self.server_url = server_url.rstrip("/")
        self.blocked: list[str] = []
        self.console: list[str] = []
        page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))
        page.on("pageerror", lambda err: self.console.append(f"pageerror: {err}"))
        page.route("**/*", self._route)

    def _route(self, route) -> None:
        url = route.request.url
        if url.startswith(self.server_url) or url.startswith(LOCAL_SCHEMES):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def open(self) -> None:
        self.page.goto(self.server_url + "/", wait_until="domcontentloaded")
        self.page.wait_for_function(_APP_READY_JS, timeout=APP_READY_MS)

    def load_template(self, module: str, name: str) -> dict:
        """Fetch `/api/workflow_templates/<module>/<name>.json` in the page and load it, as the template browser
        does."""
        return self.page.evaluate(_LOAD_TEMPLATE_JS, [module, name])

    def load_json(self, workflow: dict, name: str) -> None:
        """Load a UI-format workflow into the app as a tab called `name` (`app.loadGraphData`, awaited)."""
        self.page.evaluate(_LOAD_JSON_JS, [workflow, name])

    def inspect(self, node_types: list[str]) -> LoadReport:
        """What the frontend made of the loaded graph (see LoadReport); `node_types` are the types to check for
        registration. Console errors logged while inspecting are included."""
        errors_before = len(self.console)
        report = self.page.evaluate(_INSPECT_JS, sorted(node_types))
        errors = [m for m in self.console[errors_before:] if m.startswith(("error", "pageerror"))]
        return LoadReport(**report, console_errors=errors)

    def close_dialogs(self) -> None:
        """Press Escape, which closes the frontend's open dialog."""
        self.page.keyboard.press("Escape")

    def screenshot(self, graph_only: bool = False) -> Image.Image:
        """The app as the user sees it (the workflow's `extra.ds` decides the view), or with `graph_only` the
        canvas in focus mode (no menus) cropped to the nodes."""
        if graph_only:
            self.page.evaluate(_FOCUS_MODE_JS)
        try:
            self.page.wait_for_timeout(400)  # a few animation frames for the canvas
            clip = self.page.evaluate(_GRAPH_BOUNDS_JS) if graph_only else None
            image = Image.open(io.BytesIO(self.page.screenshot(type="png", clip=clip)))
            image.load()
        finally:
            if graph_only:
                self.page.evaluate(_FOCUS_MODE_JS)
        return image


def set_frontend_settings(server_url: str, settings: dict = FRONTEND_SETTINGS) -> None:
    """POST /settings on the server, so the app starts without the first-run template dialog."""
    import urllib.request

    request = urllib.request.Request(
        server_url.rstrip("/") + "/settings",
        data=json.dumps(settings).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


@contextmanager
def frontend(server_url: str, viewport: dict = VIEWPORT, settings: dict = FRONTEND_SETTINGS) -> Iterator[FrontendPage]:
    """Launch chromium, open the app at `server_url` (after storing `settings` on the server) and yield the page;
    everything is closed afterwards.

    Raises:
        RuntimeError: Playwright or chromium is missing (see browser_unavailable_reason).
    """
    reason = browser_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    from playwright.sync_api import sync_playwright

    set_frontend_settings(server_url, settings)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_FLAGS), timeout=30_000)
        try:
            context = browser.new_context(viewport=viewport, service_workers="block")
            page = FrontendPage(context.new_page(), server_url)
            page.open()
            yield page
        finally:
            browser.close()


def to_thumbnail(image: Image.Image, width: int) -> Image.Image:
    height = round(image.height * width / image.width)
    return image.convert("RGB").resize((width, height), Image.LANCZOS)


def render_thumbnails(
    workflows_dir: Path, names: list[str], width: int, readme_image: Path | None, readme_name: str
) -> list[Path]:
    """Screenshot each workflow in the real frontend: `<name>.jpg` (`width` px wide) beside its JSON, and the
    full-size README picture of `readme_name`. Starts its own ComfyUI server (COMFYUI_PATH) with this pack.

    Raises:
        RuntimeError: the browser is missing, or a workflow does not open cleanly (LoadReport.problems).
    """
    from .comfy_bootstrap import comfyui_path
    from .comfy_server import ComfyServer

    written = []
    names = sorted(names, key=lambda n: n != readme_name)  # the README picture first, with only its own tab open
    with ComfyServer(comfyui_path()) as server, frontend(server.url, settings=SCREENSHOT_SETTINGS) as page:
        for name in names:
            workflow = json.loads((workflows_dir / f"{name}.json").read_text())
            page.load_json(workflow, name)  # the file just written; the server serves the repo's workflows/
            report = page.inspect(sorted({n["type"] for n in workflow["nodes"]}))
            if report.problems:
                raise RuntimeError(f"{name}: the frontend does not open it cleanly: {report.problems}")
            thumb = workflows_dir / f"{name}.jpg"
            to_thumbnail(page.screenshot(graph_only=True), width).save(thumb, quality=88)
            written.append(thumb)
            if readme_image is not None and name == readme_name:
                readme_image.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot().convert("RGB").save(readme_image, optimize=True)
                written.append(readme_image)
        logger.info("blocked non-local requests: %s", sorted(set(page.blocked)))
    return written
