"""The README's main job: scripts/demo.py runs the real server headless, writes its images where it says, and prints
LODA's separation as the Attention Map Viewer measured it on the tiny SD2.1 model."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]
# The viewer's grid without an image (conceptsplit_core.map_render): 2 tiles of 256 px, padding 2 % of 256 (5 px)
# around and between them, a label strip of 9 % of 256 (23 px) under them.
GRID = (2 * 256 + 3 * 5, 256 + 23 + 2 * 5)
HM = re.compile(
    r"harmonic-mean KL at step N=3 \(LODA's concept_maps\): without stage 1 (\S+), with stage 1 (\S+)$", re.MULTILINE
)
SHARE = re.compile(r"^ {4}(dog|cat): without fixing (\S+), with fixing (\S+) \(mask area ([^)]+)\)$", re.MULTILINE)


def test_demo_writes_plain_tova_and_attention_images_and_prints_lodas_separation(comfyui, tmp_path):
    """What is checked, and why not the direction of the effect.

    Guaranteed by construction, and asserted: the five images exist with their sizes; the output is free of import
    tracebacks on every supported ComfyUI; the numbers are the viewer's (finite, HM ≥ 0, shares in 0..1); the runs
    without and with fixing have the same masks (the same stage 1, and fixing starts only after the masks are built),
    so the demo prints one mask area per word.

    Not asserted: that stage 1 raises the harmonic mean at step N and that fixing raises the share. Both hold on the
    demo's run with a wide margin (HM 0.006 -> 0.095, shares 0.18 -> 0.43 and 0.23 -> 0.54; on seeds 0-7 HM ×7 to
    ×16 and shares +0.24 to +0.37), but neither follows from the construction: stage 1 takes gradient steps of a
    fixed size on random weights and the maps are read after further sampling steps, and fixing biases every
    cross-attention layer, so the captured layers see other inputs than in the run without it. Those effects are
    asserted in tests/integration/test_loda.py (stage 1 and fixing on the same sharpened tiny SD2.1).
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"COMFYUI_PATH": str(comfyui)}
    done = subprocess.run(
        [sys.executable, "scripts/demo.py", "--arch", "sd21", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for marker in ("Traceback", "IMPORT FAILED"):  # issue 10: import failures printed in the middle of the demo
        assert marker not in done.stdout + done.stderr, done.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "tiny_sd21_attention_with_loda.png",
        "tiny_sd21_attention_without_loda.png",
        "tiny_sd21_plain.png",
        "tiny_sd21_plain_vs_tova.png",
        "tiny_sd21_tova.png",
    ]
    assert f"ConceptSplit demo: 5 images in {tmp_path.resolve()}" in done.stdout
    assert Image.open(tmp_path / "tiny_sd21_plain_vs_tova.png").size == (64 * 2 + 8, 64)
    for name in ("without", "with"):
        assert Image.open(tmp_path / f"tiny_sd21_attention_{name}_loda.png").size == GRID

    (hm,) = HM.findall(done.stdout)
    assert all(math.isfinite(float(v)) and float(v) >= 0 for v in hm), hm
    shares = SHARE.findall(done.stdout)
    assert [word for word, *_ in shares] == ["dog", "cat"], done.stdout
    for word, without, fixed, area in shares:
        assert " / " not in area, (word, area)  # one area: the same masks with and without fixing
        assert all(0 <= float(v) <= 1 for v in (without, fixed, area)), (word, without, fixed, area)
        assert 0 < float(area) < 1, (word, area)  # LODA's top-10 % mask: neither empty nor the whole image
