"""scripts/evaluate.py end to end on tiny seeded CLIP and DINO models saved as safetensors (shape and flow, method §7).

The expected numbers come from an independent path: torchvision's transforms (as dino.py and clip.load preprocess),
transformers' own feature getters, and numpy for the metric math. Needs transformers and torchvision, which ComfyUI
installs (scripts/setup_env.sh); outside CI the module is skipped without them, on CI that is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PROMPT = "a photo of a dog and a cat on a beach"


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{module} is missing: it comes with ComfyUI's requirements; run scripts/setup_env.sh"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message, allow_module_level=True)


transformers = _require("transformers")
T = _require("torchvision.transforms")


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode table: the 256 single-byte symbols of a byte-level BPE vocabulary."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in kept]
    return [chr(c) for c in kept] + [chr(256 + i) for i in range(len(extra))]


def _write_tiny_clip(folder: Path) -> None:
    """A seeded 2-layer CLIPModel (image 32 px) plus a character-level CLIP tokenizer (514 tokens, no merges)."""
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513  # the end token has the highest id, as in CLIP
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77})
    )
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=514,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(str(folder))


def _write_tiny_dino(folder: Path) -> None:
    """A seeded 2-layer ViTModel at the spec's 224 px crop (patch 32, so 49 patches)."""
    config = transformers.ViTConfig(
        image_size=224, patch_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    torch.manual_seed(1)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(str(folder))


def _write_images(folder: Path, sizes: list[tuple[int, int]], seed: int, suffix: str = ".png") -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, (width, height) in enumerate(sizes):
        base = rng.integers(0, 256, size=(1, 1, 3))  # a per-image tint, so the images differ in more than noise
        pixels = np.clip(base + rng.integers(-60, 60, size=(height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:02d}{suffix}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    _write_tiny_clip(root / "clip")
    _write_tiny_dino(root / "dino")
    _write_images(root / "generated", [(64, 64), (300, 260), (40, 90)], seed=0)
    _write_images(root / "photos" / "dog", [(256, 300), (120, 80)], seed=1, suffix=".jpg")
    _write_images(root / "photos" / "cat", [(500, 256), (224, 224)], seed=2)
    _write_images(root / "photos" / "beach", [(320, 240)], seed=3)
    return {"root": root}


def _args(root: Path, *extra: str) -> list[str]:
    return [
        "--clip",
        str(root / "clip"),
        "--dino",
        str(root / "dino"),
        "--generated",
        str(root / "generated"),
        "--concept",
        f"dog={root / 'photos' / 'dog'}",
        "--concept",
        f"cat={root / 'photos' / 'cat'}",
        "--concept",
        f"beach={root / 'photos' / 'beach'}:background",
        "--device",
        "cpu",
        *extra,
    ]


def _load_script():
    """scripts/evaluate.py as a module (registered first: its dataclasses look their module up)."""
    name = "conceptsplit_evaluate_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "evaluate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _features(output) -> torch.Tensor:
    # get_*_features returns a tensor in transformers 4 and an output object (projected pooler_output) in 5
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


@torch.no_grad()
def _expected(root: Path, prompts: list[str]) -> dict:
    """The scores recomputed independently: torchvision preprocessing, transformers getters, numpy math."""
    from PIL import Image

    clip = transformers.CLIPModel.from_pretrained(str(root / "clip"), local_files_only=True).float().eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / "clip"), local_files_only=True)
    dino = (
        transformers.ViTModel.from_pretrained(str(root / "dino"), local_files_only=True, add_pooling_layer=False)
        .float()
        .eval()
    )
    clip_tf = T.Compose(
        [
            T.Resize(32, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(32),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    dino_tf = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    def images(folder: Path, transform) -> torch.Tensor:
        files = sorted(p for p in folder.iterdir())
        return torch.stack([transform(Image.open(f).convert("RGB")) for f in files])

    def dino_features(folder: Path) -> np.ndarray:
        hidden = dino(pixel_values=images(folder, dino_tf), output_hidden_states=True).hidden_states[-1]
        return _unit(dino.layernorm(hidden)[:, 0].double().numpy())  # CLS after the final LayerNorm

    clip_images = _unit(
        _features(clip.get_image_features(pixel_values=images(root / "generated", clip_tf))).double().numpy()
    )
    texts = _unit(
        np.concatenate(
            [_features(clip.get_text_features(**tokenizer(p, return_tensors="pt"))).double().numpy() for p in prompts]
        )
    )
    clip_t = (clip_images * texts).sum(axis=-1)

    references = {}
    for name in ("dog", "cat"):
        mean = dino_features(root / "photos" / name).mean(axis=0)
        references[name] = mean / np.linalg.norm(mean)
    generated = dino_features(root / "generated")
    dino_t = generated @ ((references["dog"] + references["cat"]) / 2)  # not renormalised; beach left out
    return {
        "clip_t": clip_t,
        "dino": dino_t,
        "per_concept": {name: generated @ ref for name, ref in references.items()},
    }


def test_script_scores_match_an_independent_computation(setup, tmp_path):
    root, out = setup["root"], tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "scripts/evaluate.py", *_args(root, "--prompt", PROMPT, "--out", str(out))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "CLIP-T" in done.stdout and "mean of 3 images" in done.stdout
    assert "excluded: beach" in done.stdout

    results = json.loads(out.read_text())
    assert set(results) == {"definitions", "models", "concepts", "images", "summary"}
    assert [c["name"] for c in results["concepts"]] == ["dog", "cat", "beach"]
    assert [c["in_dino"] for c in results["concepts"]] == [True, True, False]
    assert [c["photos"] for c in results["concepts"]] == [2, 2, 1]
    assert [Path(i["file"]).name for i in results["images"]] == ["img_00.png", "img_01.png", "img_02.png"]
    assert all(i["prompt"] == PROMPT for i in results["images"])
    assert set(results["images"][0]["dino_per_concept"]) == {"dog", "cat"}

    values = [v for i in results["images"] for v in (i["clip_t"], i["dino"], *i["dino_per_concept"].values())]
    assert all(np.isfinite(values)) and all(-1.0 <= v <= 1.0 for v in values)

    expected = _expected(root, [PROMPT] * 3)
    # The same tiny float32 models, run by the script and by transformers here in other batch shapes: the features
    # differ by float32 rounding of a few layers (~1e-7 relative), so cosines ≤ 1 agree far inside 1e-5; a wrong
    # preprocessing, getter or normalisation moves them by the spread between images (> 1e-4, asserted below).
    np.testing.assert_allclose([i["clip_t"] for i in results["images"]], expected["clip_t"], atol=1e-5)
    np.testing.assert_allclose([i["dino"] for i in results["images"]], expected["dino"], atol=1e-5)
    for name in ("dog", "cat"):
        np.testing.assert_allclose(
            [i["dino_per_concept"][name] for i in results["images"]], expected["per_concept"][name], atol=1e-5
        )
    assert results["summary"]["clip_t"] == pytest.approx(float(expected["clip_t"].mean()), abs=1e-5)
    assert results["summary"]["dino"] == pytest.approx(float(expected["dino"].mean()), abs=1e-5)
    assert results["summary"]["images"] == 3
    # the scores are not a constant: the tiny models tell the images apart
    assert np.ptp(expected["clip_t"]) > 1e-4 and np.ptp(expected["dino"]) > 1e-4


def test_prompts_file_gives_each_image_its_own_prompt(setup, tmp_path, capsys):
    root = setup["root"]
    prompts = ["a dog", "a cat on sand", "two animals"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    out = tmp_path / "results.json"
    assert _load_script().main(_args(root, "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out))) == 0
    results = json.loads(out.read_text())
    assert [i["prompt"] for i in results["images"]] == prompts
    np.testing.assert_allclose(
        [i["clip_t"] for i in results["images"]], _expected(root, prompts)["clip_t"], atol=1e-5
    )  # as in the test above
    assert "wrote" in capsys.readouterr().out


def _break_folder(root: Path, tmp_path: Path, kind: str) -> list[str]:
    """Arguments for one bad input."""
    args = _args(root, "--prompt", PROMPT)
    if kind == "missing generated":
        return args + ["--generated", str(tmp_path / "nowhere")]
    if kind == "no images":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("not an image")
        return args + ["--generated", str(tmp_path / "empty")]
    if kind == "no weights":
        (tmp_path / "clip_no_weights").mkdir()
        (tmp_path / "clip_no_weights" / "config.json").write_text((root / "clip" / "config.json").read_text())
        return args + ["--clip", str(tmp_path / "clip_no_weights")]
    if kind == "wrong model":
        return args + ["--dino", str(root / "clip")]
    if kind == "incomplete weights":
        from safetensors.torch import load_file, save_file

        folder = tmp_path / "dino_partial"
        folder.mkdir()
        (folder / "config.json").write_text((root / "dino" / "config.json").read_text())
        tensors = load_file(str(root / "dino" / "model.safetensors"))
        dropped = next(k for k in sorted(tensors) if k.endswith("layernorm.weight"))
        save_file(
            {k: v for k, v in tensors.items() if k != dropped},
            str(folder / "model.safetensors"),
            metadata={"format": "pt"},
        )
        return args + ["--dino", str(folder)]
    if kind == "unreadable image":
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "img.png").write_bytes(b"not a png")
        return args + ["--generated", str(tmp_path / "broken")]
    if kind == "long prompt":
        return args + ["--prompt", "a dog " * 20]  # one token per letter: 20 × 4 + 2 = 82
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing generated", "generated images path does not exist"),
        ("no images", "No images found for the generated images"),
        ("no weights", "--clip folder holds no transformers model with safetensors weights.*config.json"),
        ("wrong model", '--dino folder holds the wrong kind of model. Seen: model_type "clip"'),
        ("incomplete weights", "--dino weights are incomplete.*1 missing tensors"),
        ("unreadable image", 'Cannot read the image ".*img.png"'),
        ("long prompt", "prompt is too long for CLIP. Seen: 82 tokens.*at most 77 tokens"),
    ],
)
def test_bad_inputs_exit_2_with_the_message(setup, tmp_path, capsys, kind, message):
    import re

    assert _load_script().main(_break_folder(setup["root"], tmp_path, kind)) == 2
    captured = capsys.readouterr()
    assert re.search(message, captured.err), captured.err
    assert captured.err.splitlines()[-1].startswith("error: ") and "Fix: " in captured.err


@pytest.mark.parametrize(
    "concepts, message",
    [
        (["--concept", "beach={photos}/beach:background"], "at least one object concept.*beach \\(background\\)"),
        ([], "at least one object concept.*no --concept"),
        (["--concept", "dog"], 'Cannot read the concept "dog"'),
        (["--concept", "dog={photos}/dog", "--concept", "dog={photos}/cat"], "concept is given twice. Seen: dog"),
        (["--concept", "dog={photos}/wolf"], 'concept "dog" photos path does not exist'),
    ],
)
def test_bad_concepts_exit_2_before_loading_models(setup, tmp_path, capsys, concepts, message):
    import re

    root = setup["root"]
    argv = [
        "--clip",
        str(tmp_path / "no_clip"),
        "--dino",
        str(tmp_path / "no_dino"),
        "--generated",
        str(root / "generated"),
        "--prompt",
        PROMPT,
        "--device",
        "cpu",
        *[c.format(photos=root / "photos") for c in concepts],
    ]
    assert _load_script().main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "model folder does not exist" not in err  # concepts are checked before any model is touched


def test_prompt_count_mismatch_is_refused(setup, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a dog\na cat\n")
    assert _load_script().main(_args(setup["root"], "--prompts", str(tmp_path / "prompts.txt"))) == 2
    assert "2 prompts for 3 images" in capsys.readouterr().err


def test_concept_role_is_split_only_at_the_end():
    script = _load_script()
    assert script.parse_concept("beach=C:\\photos\\beach:background") == script.ConceptArgument(
        "beach", Path("C:\\photos\\beach"), "background"
    )
    assert script.parse_concept("dog=/data/a:b/dog").role == "object"
    assert script.parse_concept("dog=/data/dog:object").folder == Path("/data/dog")


def test_subprocess_error_exits_2(setup, tmp_path):
    args = _args(setup["root"], "--prompt", PROMPT) + ["--clip", str(tmp_path / "missing_clip")]
    done = subprocess.run(
        [sys.executable, "scripts/evaluate.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "error: The --clip model folder does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_generated_files_and_folders_are_merged_sorted_and_deduplicated(setup):
    generated = setup["root"] / "generated"
    found = _load_script().find_images([generated / "img_02.png", generated], "generated images")
    assert [p.name for p in found] == ["img_00.png", "img_01.png", "img_02.png"]
