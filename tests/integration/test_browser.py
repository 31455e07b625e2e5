"""The real ComfyUI frontend (comfyui-frontend-package) in headless Debian chromium opens every example workflow.

The session's ComfyUI server serves the frontend on 127.0.0.1; Playwright drives /usr/bin/chromium (never a
downloaded browser) and aborts every request that would leave the machine. Each workflow is fetched through the
template route and loaded with `app.loadGraphData`, as the template browser does; the frontend must know every
node type, create every node, mark no node with an error other than for a file this machine lacks (no weights on a
test machine: frontend 1.49 marks a missing checkpoint or adapter, 1.27 does not), and queue exactly the prompt
that comfy_harness/workflow_format.py computes. What the frontend made of a graph is read from its own LiteGraph state
(comfy_harness/browser.py), not from dialog text, so the same checks hold on frontend 1.27 (ComfyUI 0.3.64) and 1.49
(ComfyUI 0.33.0).

Outside CI a missing chromium or playwright skips these tests with the install command; on CI (CI=true) the skip
is a failure (tests/conftest.py), and .ci/run installs both.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest

from comfy_harness.browser import browser_unavailable_reason, frontend
from comfy_harness.comfy_server import PACK_FOLDER
from comfy_harness.workflow_format import api_to_ui, node_types, ui_to_api

WORKFLOWS_DIR = Path(__file__).resolve().parents[2] / "workflows"
BUDGET_S = 60.0
MODEL_LOADERS = ("CheckpointLoaderSimple", "ConceptSplitLoadAdapter")  # in two_concepts_tova_sd21.json


# Widgets a frontend adds on its own and queues although the node declares no such input (the server ignores them):
# frontend 1.27 (ComfyUI 0.3.64) serializes PreviewAny's text display as `preview`; 1.49 does not.
FRONTEND_ONLY_INPUTS = {"PreviewAny": {"preview"}}


def without_meta(prompt: dict) -> dict:
    """The queued prompt without `_meta` and without the frontend-only inputs above."""
    return {
        nid: {
            "class_type": node["class_type"],
            "inputs": {
                name: value
                for name, value in node["inputs"].items()
                if name not in FRONTEND_ONLY_INPUTS.get(node["class_type"], ())
            },
        }
        for nid, node in prompt.items()
    }


@pytest.fixture(scope="module")
def page(comfy_server):
    reason = browser_unavailable_reason()
    if reason:
        pytest.skip(f"browser test needs Debian chromium and playwright: {reason}")
    started = time.monotonic()
    with frontend(comfy_server.url) as tab:
        tab.page.set_default_timeout(20_000)
        yield tab
    assert time.monotonic() - started < BUDGET_S, "the browser tests must stay under a minute"


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


def test_every_example_workflow_opens_without_missing_nodes(page, object_info):
    """On a ComfyUI without a DiT family's model class (test_workflows.NEEDS_NEWER_COMFYUI) the frontend shows
    exactly the core node types that version lacks as missing, and never a ConceptSplit node."""
    from test_workflows import NEEDS_NEWER_COMFYUI, family_available, workflow_family

    paths = sorted(WORKFLOWS_DIR.glob("*.json"))
    assert paths
    for path in paths:
        workflow = page.load_template(PACK_FOLDER, path.stem)
        assert workflow == json.loads(path.read_text())
        report = page.inspect(sorted(node_types(workflow)))
        family = workflow_family(workflow)
        missing = set() if family_available(family) else NEEDS_NEWER_COMFYUI[family]["missing"]
        if missing:
            page.close_dialogs()  # frontend 1.27 names the missing types in a dialog
            assert report.unregistered == sorted(missing), path.name
            assert report.broken_nodes == [
                f"{n['id']}:{n['type']}" for n in workflow["nodes"] if n["type"] in missing
            ], path.name
            assert report.node_count == len(workflow["nodes"])
            continue
        assert report.unregistered == [], f"{path.name}: node types unknown to the frontend"
        assert report.broken_nodes == [], f"{path.name}: nodes the frontend could not create"
        assert report.unexplained_errors == [], f"{path.name}: nodes marked with an error: {report}"
        assert report.node_count == len(workflow["nodes"])
        # the prompt the frontend would queue is the one the server tests run
        assert without_meta(report.prompt) == ui_to_api(workflow, object_info), path.name


def test_frontend_reads_generated_widget_layouts_like_the_converter(page, object_info):
    from test_workflow_format import CUSTOM, TOVA

    for name, graph in (("tova", TOVA), ("custom_sampling", CUSTOM)):
        page.load_json(api_to_ui(graph, object_info), name)
        report = page.inspect(sorted({n["class_type"] for n in graph.values()}))
        assert report.unregistered == [] and report.broken_nodes == [], name
        assert report.unexplained_errors == [], f"{name}: {report}"
        # every value, the missing checkpoint and adapter names included, is queued as written: the frontend read
        # each widget where the converter put it
        assert without_meta(report.prompt) == graph, name


def test_a_missing_node_type_is_reported(page):
    """The negative control: the checks above do see a node pack that is not installed, and only that node.

    The workflow also references a checkpoint and adapters this machine does not have (frontend 1.49 marks those
    nodes with errors): they are not reported as missing nodes.
    """
    workflow = json.loads((WORKFLOWS_DIR / "two_concepts_tova_sd21.json").read_text())
    broken = copy.deepcopy(workflow)
    target = next(n for n in broken["nodes"] if n["type"] == "ConceptSplitApplyToVA")
    target["type"] = "ConceptSplitNoSuchNode"
    page.load_json(broken, "broken")
    report = page.inspect(sorted(node_types(broken)))
    page.close_dialogs()  # frontend 1.27 names the missing type in a dialog
    assert report.unregistered == ["ConceptSplitNoSuchNode"]
    assert report.broken_nodes == [f"{target['id']}:ConceptSplitNoSuchNode"]
    assert report.node_count == len(broken["nodes"])  # the placeholder keeps its place in the graph
    assert report.problems and all("ConceptSplitNoSuchNode" in problem for problem in report.problems)
    # the control does hold nodes with missing model files, and they count neither as broken nor as errors
    model_nodes = {f"{n['id']}:{n['type']}" for n in broken["nodes"] if n["type"] in MODEL_LOADERS}
    assert set(report.missing_model_files) == model_nodes
    assert set(report.error_nodes) <= model_nodes and report.unexplained_errors == []

    # the same graph with the node's type restored opens cleanly: what was reported is the one renamed node
    page.load_json(workflow, "restored")
    restored = page.inspect(sorted(node_types(workflow)))
    assert restored.unregistered == [] and restored.broken_nodes == [] and restored.problems == []


def test_screenshot_of_the_main_workflow_shows_the_graph(page):
    page.load_template(PACK_FOLDER, "two_concepts_tova_sd21")
    full, graph = page.screenshot(), page.screenshot(graph_only=True)
    assert full.size == (1600, 900)
    assert 600 <= graph.width <= 1600 and 300 <= graph.height <= 900
    # not a blank canvas: node bodies, wires and text give many distinct colours
    assert len(graph.convert("RGB").getcolors(maxcolors=1 << 24)) > 200
    assert all(url.startswith(("http://", "https://")) and "127.0.0.1" not in url for url in page.blocked)
