"""Score generated images against their prompt (CLIP-T) and their concept photos (DINO), as the paper does (method §7).

    python scripts/evaluate.py --clip models/clip-vit-large-patch14 --dino models/dino-vitb16 \
        --generated output/dog_and_cat/ --prompt "a photo of a dog and a cat on a beach" \
        --concept dog=photos/dog --concept cat=photos/cat --concept beach=photos/beach:background \
        --out results.json

The models are local folders in Hugging Face `transformers` format, with safetensors weights: `--clip` a CLIPModel
(the paper uses openai/clip-vit-large-patch14), `--dino` a ViTModel (the paper uses DINO ViT-B/16,
facebook/dino-vitb16). Nothing is downloaded. The definitions follow the official `dino.py`; the math is in
`conceptsplit_core/evaluation_metrics.py`. Images are read as `dino.py` reads them (`Image.open(...).convert("RGB")`,
no EXIF rotation), preprocessed as torchvision does in `dino.py` and OpenAI's `clip.load`, and scored in fp32
(`dino.py` ran CLIP in fp16 on a GPU, so the fourth decimal may differ).

Exit status: 0 on success, 2 on bad input (the message says what was wrong and how to fix it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

import torch  # noqa: E402

from conceptsplit_core.atomic_file import atomic_replace  # noqa: E402
from conceptsplit_core.errors import ConceptSplitError  # noqa: E402
from conceptsplit_core.evaluation_metrics import (  # noqa: E402
    CONCEPT_ROLES,
    OBJECT_ROLE,
    ConceptReference,
    build_concept_reference,
    clip_t_scores,
    dino_scores,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # the suffixes dino.py collects


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side (bicubic), centre-crop a square, scale to 0..1, normalise per channel."""

    resize: int  # shorter side after resizing, in pixels
    crop: int  # side of the centre crop, in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# DINO preprocessing of dino.py (method §7): Resize(256, bicubic), CenterCrop(224), ImageNet mean/std.
DINO_PREPROCESSING = Preprocessing(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# OpenAI CLIP's `clip.load` preprocessing: Resize(n_px, bicubic), CenterCrop(n_px), CLIP mean/std; n_px is the
# vision tower's image size (224 for ViT-L/14), read from the model's config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ConceptArgument:
    name: str
    folder: Path
    role: str


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="CLIP-T and DINO scores of generated images, as defined by ConceptSplit's dino.py (method §7)."
    )
    parser.add_argument(
        "--clip",
        type=Path,
        required=True,
        help="local folder of a transformers CLIPModel with safetensors weights (paper: openai/clip-vit-large-patch14)",
    )
    parser.add_argument(
        "--dino",
        type=Path,
        required=True,
        help="local folder of a transformers ViTModel with safetensors weights "
        "(paper: DINO ViT-B/16, facebook/dino-vitb16)",
    )
    parser.add_argument(
        "--generated",
        type=Path,
        nargs="+",
        required=True,
        help="generated images: files and/or folders (searched recursively, sorted by path)",
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt of every generated image")
    prompt.add_argument(
        "--prompts",
        type=Path,
        help="text file, one prompt per line: one line for all images, or one line per generated "
        "image in the sorted order the table prints",
    )
    parser.add_argument(
        "--concept",
        action="append",
        default=[],
        metavar="NAME=PHOTO_DIR[:background]",
        help="a concept and the folder of its photos; repeat per concept. Background concepts are "
        "left out of DINO (method §7)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16, help="images per model call")
    return parser.parse_args(argv)


def parse_concept(text: str) -> ConceptArgument:
    """`NAME=PHOTO_DIR[:background]` (also `:object`); only a trailing role is split off, so `C:\\photos` works."""
    name, sep, rest = text.partition("=")
    role = OBJECT_ROLE
    for candidate in CONCEPT_ROLES:
        if rest.endswith(":" + candidate):
            rest, role = rest[: -len(candidate) - 1], candidate
            break
    if not sep or not name.strip() or not rest:
        raise ConceptSplitError.build(
            f'Cannot read the concept "{text}"',
            seen=f'--concept "{text}"',
            expected="NAME=PHOTO_DIR or NAME=PHOTO_DIR:background",
            fix="write it like --concept dog=photos/dog or --concept beach=photos/beach:background",
        )
    return ConceptArgument(name=name.strip(), folder=Path(rest), role=role)


def find_images(paths: list[Path], what: str) -> list[Path]:
    """Image files of `paths` (folders searched recursively, as dino.py does), sorted, without duplicates."""
    found: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found.update(
                Path(root) / name
                for root, _, names in os.walk(path)
                for name in names
                if name.lower().endswith(IMAGE_SUFFIXES)
            )
        elif path.is_file():
            found.add(path)
        else:
            raise ConceptSplitError.build(
                f"The {what} path does not exist",
                seen=f'"{path}"',
                expected="an existing image file or folder",
                fix="check the path (relative paths start from the current folder)",
            )
    if not found:
        raise ConceptSplitError.build(
            f"No images found for the {what}",
            seen=", ".join(f'"{p}"' for p in paths),
            expected=f"at least one {'/'.join(IMAGE_SUFFIXES)} file",
            fix="point to the folder that holds the images",
        )
    return sorted(found)


def load_rgb(path: Path):
    """The image as dino.py reads it: `Image.open(path).convert("RGB")`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise ConceptSplitError.build(
            f'Cannot read the image "{path}"',
            seen=f"{type(err).__name__}: {err}",
            expected="a readable PNG, JPEG, BMP or WebP file",
            fix="remove or re-save the file",
        ) from err


def preprocess(image, spec: Preprocessing) -> torch.Tensor:
    """torchvision's Resize(resize, BICUBIC) + CenterCrop(crop) + ToTensor + Normalize on a PIL image.

    Shapes:
        returns: `(3, crop, crop)` fp32.
    """
    import numpy as np
    from PIL import Image

    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = spec.resize, int(spec.resize * long / short)  # torchvision truncates the long side
    size = (new_short, new_long) if width <= height else (new_long, new_short)  # (W, H)
    image = image.resize(size, Image.BICUBIC)
    width, height = image.size
    if width < spec.crop or height < spec.crop:
        raise ConceptSplitError.build(
            "The preprocessing crops more than the resized image holds",
            seen=f"resize {spec.resize}, crop {spec.crop}",
            expected="crop <= resize",
            fix="use a model whose image size is at most the resize size",
        )
    top = int(round((height - spec.crop) / 2.0))  # CenterCrop's rounding
    left = int(round((width - spec.crop) / 2.0))
    image = image.crop((left, top, left + spec.crop, top + spec.crop))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return (pixels - mean) / std


def _import_transformers():
    try:
        import transformers
    except ImportError as err:
        raise ConceptSplitError.build(
            "The evaluation needs the transformers package",
            seen=f"ImportError: {err}",
            expected="transformers, which ComfyUI installs from its requirements.txt",
            fix="run the script with ComfyUI's Python, or pip install transformers",
        ) from err
    # Missing weights are refused below; the load report and progress bars would only bury the table.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def check_model_folder(folder: Path, flag: str, model_types: tuple[str, ...], paper_model: str) -> None:
    """Refuse a folder that is missing, has no config, no safetensors weights or another model type."""
    fix = (
        f"pass {flag} a local folder saved with save_pretrained (config.json + *.safetensors), "
        f"e.g. a copy of {paper_model}"
    )
    if not folder.is_dir():
        raise ConceptSplitError.build(
            f"The {flag} model folder does not exist", seen=f'"{folder}"', expected="a local model folder", fix=fix
        )
    config_file = folder / "config.json"
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    if not config_file.is_file() or not weights:
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "an empty folder"
        raise ConceptSplitError.build(
            f"The {flag} folder holds no transformers model with safetensors weights",
            seen=present,
            expected="config.json and model.safetensors (or sharded *.safetensors); .bin weights are not loaded",
            fix=fix,
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ConceptSplitError.build(
            f"The {flag} folder's config.json cannot be read",
            seen=str(err),
            expected="a JSON config saved by transformers",
            fix=fix,
        ) from err
    if model_type not in model_types:
        raise ConceptSplitError.build(
            f"The {flag} folder holds the wrong kind of model",
            seen=f'model_type "{model_type}"',
            expected=f"model_type {' or '.join(repr(t) for t in model_types)}",
            fix=fix,
        )


def _load_pretrained(model_class, folder: Path, flag: str, **kwargs):
    """`from_pretrained` offline from safetensors only; refuse weights the folder lacks instead of random-filling."""
    try:
        model, info = model_class.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, output_loading_info=True, **kwargs
        )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ConceptSplitError.build(
            f"transformers could not load the {flag} model",
            seen=f"{type(err).__name__}: {err}",
            expected=f"a {model_class.__name__} folder with complete safetensors weights",
            fix="re-save the model with save_pretrained(safe_serialization=True)",
        ) from err
    missing = [key for key in info.get("missing_keys", []) if not key.endswith("position_ids")]
    if missing:
        raise ConceptSplitError.build(
            f"The {flag} weights are incomplete; transformers would fill the rest with random values",
            seen=f"{len(missing)} missing tensors, e.g. {', '.join(missing[:3])}",
            expected=f"every weight of a {model_class.__name__}",
            fix=f"pass {flag} the full model folder, not a part of it",
        )
    return model.float().eval()


def load_clip(folder: Path, device: str):
    """CLIPModel and its tokenizer from a local folder (no downloads); check the folder first (`check_model_folder`)."""
    transformers = _import_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ConceptSplitError.build(
            "The --clip folder has no usable tokenizer",
            seen=f"{type(err).__name__}: {err}",
            expected="the CLIP tokenizer files next to the weights (vocab.json + merges.txt, or tokenizer.json)",
            fix="save the tokenizer into the same folder (CLIPTokenizer.save_pretrained)",
        ) from err
    return _load_pretrained(transformers.CLIPModel, folder, "--clip").to(device), tokenizer


def load_dino(folder: Path, device: str):
    """DINO ViT as a ViTModel from a checked local folder; its CLS token is timm's `num_classes=0` feature."""
    transformers = _import_transformers()
    return _load_pretrained(transformers.ViTModel, folder, "--dino", add_pooling_layer=False).to(device)


@torch.no_grad()
def embed_images(files: list[Path], encode, spec: Preprocessing, device: str, batch_size: int) -> torch.Tensor:
    """Raw features `(M, C)` fp32 on the CPU of `files`, `batch_size` images per `encode` call."""
    features = []
    for start in range(0, len(files), batch_size):
        batch = torch.stack([preprocess(load_rgb(f), spec) for f in files[start : start + batch_size]])  # (b, 3, S, S)
        features.append(encode(batch.to(device)).float().cpu())
    return torch.cat(features)


def clip_image_encoder(model):
    # the projected pooled CLS, as OpenAI's encode_image; get_image_features' return type differs across versions
    return lambda pixels: model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


def dino_image_encoder(model):
    # CLS token after the final LayerNorm: timm's vit_base_patch16_224_dino with num_classes=0 (method §7)
    return lambda pixels: model(pixel_values=pixels).last_hidden_state[:, 0]


@torch.no_grad()
def embed_prompts(prompts: list[str], model, tokenizer, device: str) -> torch.Tensor:
    """Raw projected text features `(P, C)` fp32 on the CPU, one prompt per call (no padding)."""
    limit = model.config.text_config.max_position_embeddings
    features = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, T) with start and end tokens
        if ids.shape[1] > limit:
            raise ConceptSplitError.build(
                "A prompt is too long for CLIP",
                seen=f'{ids.shape[1]} tokens in "{prompt if len(prompt) <= 60 else prompt[:60] + "…"}"',
                expected=f"at most {limit} tokens, start and end included (clip.tokenize refuses longer prompts)",
                fix="shorten the prompt",
            )
        pooled = model.text_model(input_ids=ids.to(device)).pooler_output  # (1, width) at the end token
        features.append(model.text_projection(pooled).float().cpu())
    return torch.cat(features)


def read_prompts(args: argparse.Namespace, count: int) -> list[str]:
    """One prompt per generated image, from --prompt or --prompts."""
    if args.prompts is None:
        prompts = [args.prompt]
    else:
        if not args.prompts.is_file():
            raise ConceptSplitError.build(
                "The prompts file does not exist",
                seen=f'"{args.prompts}"',
                expected="a text file with one prompt per line",
                fix="check the --prompts path",
            )
        prompts = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(prompts) not in (1, count):
            raise ConceptSplitError.build(
                "The prompts file does not give one prompt per generated image",
                seen=f"{len(prompts)} prompts for {count} images",
                expected=f"1 prompt for all images, or {count}, in the sorted image order",
                fix="add or remove lines, or use --prompt for one shared prompt",
            )
    if any(not p.strip() for p in prompts):
        raise ConceptSplitError.build(
            "The prompt is empty", seen='""', expected="the text the images were made from", fix="pass --prompt TEXT"
        )
    return prompts * count if len(prompts) == 1 else prompts


def check_concepts(concepts: list[ConceptArgument]) -> None:
    names = [c.name for c in concepts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConceptSplitError.build(
            "A concept is given twice",
            seen=", ".join(duplicates),
            expected="each concept name once",
            fix="merge the --concept arguments",
        )
    if not any(c.role == OBJECT_ROLE for c in concepts):
        raise ConceptSplitError.build(
            "DINO needs at least one object concept; background concepts are left out of it (method §7)",
            seen=", ".join(f"{c.name} ({c.role})" for c in concepts) or "no --concept",
            expected="one or more --concept NAME=PHOTO_DIR without :background",
            fix="add --concept NAME=PHOTO_DIR for each subject in the images",
        )


def evaluate(args: argparse.Namespace) -> dict:
    """Compute every score; returns the JSON-ready results."""
    if args.batch_size < 1:
        raise ConceptSplitError.build(
            "The batch size must be positive",
            seen=str(args.batch_size),
            expected="--batch-size 1 or more",
            fix="pass --batch-size 16",
        )
    if args.out is not None and not args.out.parent.is_dir():
        raise ConceptSplitError.build(
            "The folder for --out does not exist",
            seen=f'"{args.out.parent}"',
            expected="an existing folder",
            fix="create the folder or change --out",
        )
    concepts = [parse_concept(text) for text in args.concept]
    check_concepts(concepts)
    generated = find_images(args.generated, "generated images")
    photos = {c.name: find_images([c.folder], f'concept "{c.name}" photos') for c in concepts}
    prompts = read_prompts(args, len(generated))

    check_model_folder(args.clip, "--clip", ("clip",), "openai/clip-vit-large-patch14")
    check_model_folder(args.dino, "--dino", ("vit",), "facebook/dino-vitb16")
    clip_model, tokenizer = load_clip(args.clip, args.device)
    dino_model = load_dino(args.dino, args.device)

    clip_spec = Preprocessing(
        resize=clip_model.config.vision_config.image_size,
        crop=clip_model.config.vision_config.image_size,
        mean=CLIP_MEAN,
        std=CLIP_STD,
    )
    unique_prompts = sorted(set(prompts))
    text_features = embed_prompts(unique_prompts, clip_model, tokenizer, args.device)  # (P, C)
    per_image_text = text_features[[unique_prompts.index(p) for p in prompts]]  # (M, C)
    clip_image = embed_images(generated, clip_image_encoder(clip_model), clip_spec, args.device, args.batch_size)
    clip_t = clip_t_scores(clip_image, per_image_text)  # (M,)

    dino_encode = dino_image_encoder(dino_model)
    dino_generated = embed_images(generated, dino_encode, DINO_PREPROCESSING, args.device, args.batch_size)
    references = [
        ConceptReference(
            c.name,
            c.role,
            build_concept_reference(
                embed_images(photos[c.name], dino_encode, DINO_PREPROCESSING, args.device, args.batch_size)
            ),
        )
        for c in concepts
    ]
    dino = dino_scores(dino_generated, references)  # (M,)
    # Diagnostic beyond dino.py: each image against each object concept alone (mixing lowers one of them).
    per_concept = {r.name: dino_scores(dino_generated, [r]) for r in references if r.role == OBJECT_ROLE}

    return {
        "definitions": "method §7 / official dino.py: CLIP-T = cosine(CLIP image, prompt text), mean over images; "
        "DINO = normalised image feature · mean of object concepts' renormalised references "
        "(not renormalised), mean over images; background concepts excluded",
        "models": {"clip": str(args.clip), "dino": str(args.dino)},
        "concepts": [
            {
                "name": c.name,
                "role": c.role,
                "folder": str(c.folder),
                "photos": len(photos[c.name]),
                "in_dino": c.role == OBJECT_ROLE,
            }
            for c in concepts
        ],
        "images": [
            {
                "file": str(f),
                "prompt": prompts[i],
                "clip_t": float(clip_t[i]),
                "dino": float(dino[i]),
                "dino_per_concept": {name: float(s[i]) for name, s in per_concept.items()},
            }
            for i, f in enumerate(generated)
        ],
        "summary": {
            "images": len(generated),
            "clip_t": float(clip_t.mean()),
            "dino": float(dino.mean()),
            "dino_per_concept": {name: float(s.mean()) for name, s in per_concept.items()},
        },
    }


def format_table(results: dict) -> str:
    rows = [(Path(image["file"]).name, image["clip_t"], image["dino"]) for image in results["images"]]
    summary = results["summary"]
    rows.append((f"mean of {summary['images']} images", summary["clip_t"], summary["dino"]))
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'image':<{width}}  {'CLIP-T':>7}  {'DINO':>7}"]
    lines += [f"{name:<{width}}  {clip_t:7.4f}  {dino:7.4f}" for name, clip_t, dino in rows]
    lines.insert(-1, "-" * len(lines[0]))
    used = [c["name"] for c in results["concepts"] if c["in_dino"]]
    skipped = [c["name"] for c in results["concepts"] if not c["in_dino"]]
    lines.append(
        f"DINO concepts: {', '.join(used)}" + (f" (background, excluded: {', '.join(skipped)})" if skipped else "")
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = evaluate(args)
        print(format_table(results))
        if args.out is not None:
            text = json.dumps(results, indent=2, ensure_ascii=False).encode("utf-8")
            atomic_replace(args.out, lambda f: f.write(text))
            print(f"wrote {args.out}")
    except ConceptSplitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
