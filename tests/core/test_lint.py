"""The whole tree passes the linter configured in pyproject.toml ([tool.ruff]): unused imports, undefined names,
import order, line length. Part of the README's test command, so CI checks it on every run; ruff comes with the
`test` extra (scripts/setup_env.sh installs it). Without ruff (a bare `pytest` in another environment) the test is
skipped, except on CI, where a missing linter must not pass."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_tree_passes_ruff():
    if importlib.util.find_spec("ruff") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("ruff is not installed; on CI the `test` extra (pip install -e '.[test]') must provide it")
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
