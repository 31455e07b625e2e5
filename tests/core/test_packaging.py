"""Registry readiness: pyproject metadata, no runtime requirements beyond ComfyUI's, files the README shows exist."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_has_registry_fields():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", project["name"]) and "comfyui" not in project["name"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["dependencies"] == []  # torch, numpy, safetensors, einops, Pillow come with ComfyUI
    assert project["license"] == {"file": "LICENSE"} and (REPO / "LICENSE").is_file()
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=0.3.64")


def test_requirements_txt_adds_nothing_to_comfyui():
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == []


def test_every_image_the_readme_shows_exists():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (REPO / "README.md").read_text())
    assert images and [path for path in images if not (REPO / path).is_file()] == []


def test_the_frontend_extension_is_served_once_and_loads_nothing_from_outside():
    """web/ is registered by WEB_DIRECTORY (both supported ComfyUI versions read it, V3 packs too); a `web` key in
    [tool.comfy] would register it a second time under the project name and run the extension twice."""
    init = (REPO / "__init__.py").read_text()
    match = re.search(r'^WEB_DIRECTORY = "([^"]+)"', init, re.MULTILINE)
    assert match and (REPO / match.group(1)).resolve() == REPO / "web"
    assert "web" not in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]
    scripts = sorted((REPO / "web").rglob("*.js"))
    assert [p.relative_to(REPO).as_posix() for p in scripts] == ["web/js/attention_viewer.js"]
    for path in scripts:
        text = path.read_text()
        assert re.findall(r"https?://", text) == []  # no external scripts, fonts or requests
        imports = re.findall(r'^import .* from "([^"]+)";', text, re.MULTILINE)
        assert imports and all(re.fullmatch(r"\.\./\.\./\.\./scripts/\w+\.js", spec) for spec in imports)
