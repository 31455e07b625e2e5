"""conceptsplit_core never imports ComfyUI; the glue imports the pack only relatively."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "..",
    "comfy",
    "comfy_api",
    "comfy_execution",
    "comfy_extras",
    "folder_paths",
    "nodes",
    "server",
    "execution",
    "node_helpers",
    "latent_preview",
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level >= 2:
            roots.add("..")  # climbs out of the package: from ..nodes import x
    return roots


def test_core_imports_no_comfyui_module():
    files = sorted((REPO / "conceptsplit_core").rglob("*.py"))
    assert len(files) >= 8
    offenders = {str(f.relative_to(REPO)): sorted(imported_roots(f) & FORBIDDEN) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_glue_imports_pack_modules_only_relatively():
    files = sorted((REPO / "nodes").rglob("*.py")) + [REPO / "__init__.py"]
    offenders = {
        str(f.relative_to(REPO)): sorted(imported_roots(f) & {"conceptsplit_core", "comfy_harness"}) for f in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_forbidden_detector_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import comfy.utils\nfrom folder_paths import x\nfrom . import ok\nfrom ..nodes import y\n")
    assert imported_roots(bad) & FORBIDDEN == {"comfy", "folder_paths", ".."}
