"""ConceptSplit demo through a real ComfyUI server: plain sampling vs ToVA with two concepts, side by side.

Without --checkpoint it builds tiny random-weight SD1.5/SD2.1/SDXL models in code (the test helper pack) and random
tiny adapters, so it runs anywhere in seconds and shows the pipeline, not pretty pictures. With --checkpoint and
--adapter it runs the same graph on your own model and adapters. Run it via scripts/demo.sh, which sets up ComfyUI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # appended: ComfyUI's root must stay ahead of the repo on sys.path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, help="your SD1.5/SD2.1/SDXL .safetensors checkpoint")
    parser.add_argument("--v-prediction", action="store_true",
                        help="the checkpoint is SD2.x 768-v (ComfyUI detects SD2 as eps from weights alone)")
    parser.add_argument("--adapter", action="append", default=[], metavar="FILE=WORD",
                        help="a ToVA adapter and its identifier word; give two or more")
    parser.add_argument("--prompt", default="a photo of a dog and a cat", help="prompt with every identifier word")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--size", type=int, default=None, help="image side (default 64 tiny, 768 real)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 4 tiny, 30 real)")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=("sd15", "sd21", "sdxl"), nargs="*", default=["sd15", "sd21", "sdxl"],
                        help="tiny families to run when no --checkpoint is given")
    parser.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU even with a GPU (tiny models"
                        " always use the CPU)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo", help="folder for the images")
    return parser.parse_args()


def graph(loader: dict, adapters: list[tuple[str, str]], args, tova: bool, prefix: str) -> dict:
    """API-format graph: loader -> (Load ToVA Adapter xN -> Apply ToVA) -> KSampler -> VAEDecode -> SaveImage."""
    g = {"1": loader,
         "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": args.negative}},
         "6": {"class_type": "EmptyLatentImage", "inputs": {"width": args.size, "height": args.size, "batch_size": 1}},
         "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
         "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}}}
    model, positive = ["1", 0], None
    if getattr(args, "v_prediction", False):  # SD2.x 768-v: ComfyUI's loader may detect it as eps
        g["2"] = {"class_type": "ModelSamplingDiscrete",
                  "inputs": {"model": model, "sampling": "v_prediction", "zsnr": False}}
        model = ["2", 0]
    if tova:
        previous = None
        for index, (name, word) in enumerate(adapters):
            node = f"a{index}"
            inputs = {"adapter_name": name, "identifier_word": word, "strength": 1.0, "role": "from file"}
            if previous:
                inputs["adapters"] = [previous, 0]
            g[node] = {"class_type": "ConceptSplitLoadAdapter", "inputs": inputs}
            previous = node
        g["4"] = {"class_type": "ConceptSplitApplyToVA",
                  "inputs": {"model": model, "adapters": [previous, 0], "clip": ["1", 1], "text": args.prompt}}
        model, positive = ["4", 0], ["4", 1]
    else:
        g["3"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": args.prompt}}
        positive = ["3", 0]
    g["7"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": positive, "negative": ["5", 0], "latent_image": ["6", 0], "seed": args.seed,
        "steps": args.steps, "cfg": args.cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    return g


def side_by_side(left, right, path: Path) -> None:
    from PIL import Image

    canvas = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height)), (24, 24, 24))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 8, 0))
    canvas.save(path)


def run_case(server, loader: dict, adapters, args, label: str) -> list[Path]:
    written = []
    images = {}
    for tova in (False, True):
        prefix = f"{label}_{'tova' if tova else 'plain'}"
        entry = server.run(graph(loader, adapters, args, tova, prefix), timeout=3600)
        image = server.output_images(entry, "9")[0]
        path = args.out / f"{prefix}.png"
        image.save(path)
        images[tova] = image
        written.append(path)
    comparison = args.out / f"{label}_plain_vs_tova.png"
    side_by_side(images[False], images[True], comparison)
    return written + [comparison]


def main() -> None:
    args = parse_args()
    if args.checkpoint is None:
        args.v_prediction = False  # the tiny SD2.1 model is built as v-prediction already
    from testing.comfy_bootstrap import bootstrap_comfyui, comfyui_path
    from testing.comfy_server import ComfyServer

    comfy = comfyui_path()
    if comfy is None:
        raise SystemExit("COMFYUI_PATH is not set; run this through scripts/demo.sh")
    args.out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with ComfyServer(comfy, cpu=args.cpu or args.checkpoint is None) as server:
        if args.checkpoint is None:
            args.size, args.steps = args.size or 64, args.steps or 4
            bootstrap_comfyui(comfy)
            from testing.tiny_adapters import write_tiny_adapter
            from testing.tiny_models import build_tiny_model

            for arch in args.arch:
                model, _, _ = build_tiny_model(arch, seed=0)
                adapters = []
                for word, seed in (("dog", 1), ("cat", 2)):
                    path = write_tiny_adapter(server.base_dir / f"demo_{arch}_{word}.safetensors", model, word, seed)
                    adapters.append((server.add_model("tova", path), ""))
                loader = {"class_type": "ConceptSplitTestTinyModelLoader", "inputs": {"arch": arch, "seed": 0}}
                written += run_case(server, loader, adapters, args, f"tiny_{arch}")
        else:
            if len(args.adapter) < 1:
                raise SystemExit("give at least one --adapter FILE=WORD with --checkpoint")
            args.size, args.steps = args.size or 768, args.steps or 30
            adapters = []
            for spec in args.adapter:
                file, _, word = spec.partition("=")
                adapters.append((server.add_model("tova", Path(file)), word))
            loader = {"class_type": "CheckpointLoaderSimple",
                      "inputs": {"ckpt_name": server.add_model("checkpoints", args.checkpoint)}}
            written += run_case(server, loader, adapters, args, args.checkpoint.stem)
    for path in written:
        print(f"wrote {path}")
    print(f"ConceptSplit demo: {len(written)} images in {args.out.resolve()}")


if __name__ == "__main__":
    main()
