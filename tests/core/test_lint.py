"""The whole tree passes the linter configured in pyproject.toml ([tool.ruff]: unused imports, undefined names,
line length) and is formatted by its formatter (`ruff format`). Part of the README's test command, so CI checks it on
every run; ruff comes with the `test` extra (scripts/setup_env.sh installs it). Without ruff (a bare `pytest` in
another environment) the tests are skipped, except on CI, where a missing linter must not pass."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("ruff") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("ruff is not installed; on CI the `test` extra (pip install -e '.[test]') must provide it")
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO_ROOT, capture_output=True, text=True)


def test_the_tree_passes_the_linter():
    result = _ruff("check", "--no-cache", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_tree_is_formatted():
    result = _ruff("format", "--check", "--no-cache", ".")
    assert result.returncode == 0, "run `ruff format .`:\n" + result.stdout + result.stderr
