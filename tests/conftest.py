"""Shared pytest setup: the `integration` marker, ComfyUI fixtures, and "no silent skips on CI".

tests/core must run without ComfyUI (and this file must import without it), so everything that touches
ComfyUI is imported inside fixtures. Integration tests skip with a message naming COMFYUI_PATH when it is
unset; under CI=true such a skip is turned into a failure, because a CI run that skipped the integration
suite proves nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"

# `import comfy_harness` must work under a bare `pytest` too; append, so the repo root never shadows ComfyUI's root.
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

SKIP_MESSAGE = "COMFYUI_PATH is not set: integration tests need a real ComfyUI; run scripts/test.sh"


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: needs a real ComfyUI (COMFYUI_PATH)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (_on_ci() and report.skipped and item.get_closest_marker("integration")):
        return
    if hasattr(report, "wasxfail"):  # an xfail is reported as a skip; it is not a missing ComfyUI
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"CI=true: integration tests must not skip, but this one did: {reason}"


@pytest.fixture(scope="session")
def comfyui() -> Path:
    """ComfyUI's root, bootstrapped into this process (sys.path, args parsing, ComfyUI's `nodes`)."""
    from comfy_harness.comfy_bootstrap import bootstrap_comfyui, comfyui_path

    try:
        path = comfyui_path()
    except RuntimeError as err:  # set but wrong: skipped like unset (so failed on CI), with the reason
        pytest.skip(str(err))
    if path is None:
        pytest.skip(SKIP_MESSAGE)
    bootstrap_comfyui(path)
    return path


@pytest.fixture
def tiny_model(request, comfyui):
    """A fresh seeded (MODEL, CLIP, VAE); parametrize indirectly with the arch, default sd15."""
    from comfy_harness.tiny_models import build_tiny_model

    return build_tiny_model(getattr(request, "param", "sd15"), seed=0)


@pytest.fixture(scope="session")
def tiny_sd15_checkpoint(comfyui, tmp_path_factory):
    """A ~285 MB seeded SD1.5 checkpoint that ComfyUI's real loader detects (recipe B); written once per session."""
    from comfy_harness.tiny_checkpoint import write_tiny_sd15_checkpoint

    path = write_tiny_sd15_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny_sd15.safetensors", seed=0)
    yield path
    path.unlink(missing_ok=True)  # pytest keeps the last 3 base temp dirs; do not keep 289 MB in each


@pytest.fixture(scope="session")
def comfy_server(comfyui):
    """One real ComfyUI server per session, with this pack and the test helper pack installed."""
    from comfy_harness.comfy_server import ComfyServer

    server = ComfyServer(comfyui)
    server.start()
    yield server
    server.stop()
