"""The README's main job: scripts/demo.py runs the real server headless and writes its images where it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def test_demo_writes_plain_and_tova_images(comfyui, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"COMFYUI_PATH": str(comfyui)}
    done = subprocess.run([sys.executable, "scripts/demo.py", "--arch", "sd21", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["tiny_sd21_plain.png", "tiny_sd21_plain_vs_tova.png", "tiny_sd21_tova.png"]
    assert f"ConceptSplit demo: 3 images in {tmp_path.resolve()}" in done.stdout
    assert Image.open(tmp_path / "tiny_sd21_plain_vs_tova.png").size == (64 * 2 + 8, 64)
