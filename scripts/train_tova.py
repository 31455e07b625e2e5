"""Train a ToVA adapter from a folder of photos without the UI, through ComfyUI's own loaders and the node's code path.

    COMFYUI_PATH=/path/to/ComfyUI python scripts/train_tova.py --checkpoint sd21-768.safetensors \
        --images photos/ --word dog --name my_dog [--steps 300 --lr 1e-4 --rank 64 --seed 0 --resolution 0]
    COMFYUI_PATH=... python scripts/train_tova.py --tiny sd21 --images photos/ --word dog --name demo --steps 10

The adapter goes to ComfyUI/models/tova (or --output-dir) exactly as the "Train ToVA Adapter" node writes it.
Photos may have different sizes: each is resized on its shorter side; --crop-views random square crops per photo are
encoded once and each step uses one of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a ConceptSplit ToVA adapter (method §2.6).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="SD2.1-768 / SD1.5 / SDXL checkpoint file")
    source.add_argument("--tiny", choices=("sd15", "sd21", "sdxl"), help="tiny random model (tests, demos)")
    parser.add_argument(
        "--v-prediction",
        action="store_true",
        help="force v-prediction (SD2.x 768-v checkpoints ComfyUI detects as eps)",
    )
    parser.add_argument("--images", type=Path, required=True, help="folder of photos of the concept")
    parser.add_argument("--word", required=True, help="the plain class word, e.g. dog")
    parser.add_argument("--name", required=True, help="adapter file name (.safetensors is added)")
    parser.add_argument("--output-dir", type=Path, help="default: ComfyUI's models/tova")
    parser.add_argument("--templates", type=Path, help="prompt template file (default: the pack's list)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=0, help="0 = model default (768 SD2.1, 1024 SDXL)")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute UNet block activations in backward: less memory, slower, same adapter",
    )
    parser.add_argument(
        "--crop-views",
        type=int,
        default=4,
        help="random crops encoded per photo; each step uses one (method §2.6 random crop)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))  # after ComfyUI's root, which bootstrap puts first
    from comfy_harness.comfy_bootstrap import bootstrap_comfyui, comfyui_path, load_pack_in_process

    root = comfyui_path()
    if root is None:
        print("Set COMFYUI_PATH to the ComfyUI folder (the one holding main.py).", file=sys.stderr)
        return 2
    bootstrap_comfyui(root)
    import importlib

    import tqdm

    pack = load_pack_in_process()
    training = importlib.import_module(f"{pack.__name__}.nodes.training")
    data = importlib.import_module(f"{pack.__name__}.conceptsplit_core.training_data")
    photos = importlib.import_module(f"{pack.__name__}.conceptsplit_core.training_photos")
    error_type = importlib.import_module(f"{pack.__name__}.conceptsplit_core.errors").ConceptSplitError
    if args.tiny:
        from comfy_harness.tiny_models import build_tiny_model

        model, clip, vae = build_tiny_model(args.tiny, seed=0)
    else:
        import comfy.sd
        import folder_paths

        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(args.checkpoint),
            output_vae=True,
            output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"),
        )
    if args.v_prediction:
        from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

        model = ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    config = data.TrainConfig(
        steps=args.steps,
        learning_rate=args.lr,
        rank=args.rank,
        seed=args.seed,
        resolution=args.resolution or None,
        checkpoint_every=args.checkpoint_every,
        crop_views=args.crop_views,
    )
    templates = data.load_prompt_templates(args.templates) if args.templates else None
    request = training.TrainingRequest(
        args.word,
        config,
        args.name,
        args.overwrite,
        args.resume,
        templates=templates,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    folder = args.output_dir or training.tova_folder()
    with tqdm.tqdm(total=args.steps, desc=f"ToVA {args.word}", unit="step") as bar:

        def on_step(done: int, total: int, loss: float) -> None:
            bar.n = done
            bar.set_postfix(loss=f"{loss:.4f}")

        try:
            images = photos.load_photos(args.images)  # each at its own size, upright, RGB; sorted by name
            outcome = training.train_adapter(model, clip, vae, images, request, folder, on_step)
        except error_type as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    first, last = outcome.losses[0], outcome.losses[-1]
    print(f"saved {outcome.path} ({outcome.path.stat().st_size / 1e6:.2f} MB); loss {first:.4f} -> {last:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
