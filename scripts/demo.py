"""ConceptSplit demo through a real ComfyUI server: plain sampling vs ToVA with two concepts, side by side, and
LODA's effect on the attention maps, measured.

Without --checkpoint it builds tiny random-weight SD1.5/SD2.1/SDXL models in code (the test helper pack) and random
tiny adapters, so it runs anywhere in seconds and shows the pipeline, not pretty pictures. On the tiny SD2.1 model it
then runs the LODA Sampler with Capture Attention, writes the Attention Map Viewer grids without and with LODA, and
prints the separation the viewer measured. With --checkpoint and --adapter it runs the plain vs ToVA graph on your own
model and adapters. Run it via scripts/demo.sh, which sets up ComfyUI.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # appended: ComfyUI's root must stay ahead of the repo on sys.path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, help="your SD1.5/SD2.1/SDXL .safetensors checkpoint")
    parser.add_argument(
        "--v-prediction",
        action="store_true",
        help="the checkpoint is SD2.x 768-v (ComfyUI detects SD2 as eps from weights alone)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="FILE=WORD",
        help="a ToVA adapter and its identifier word; give two or more",
    )
    parser.add_argument("--prompt", default="a photo of a dog and a cat", help="prompt with every identifier word")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--size", type=int, default=None, help="image side (default 64 tiny, 768 real)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 4 tiny, 30 real)")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--arch",
        choices=("sd15", "sd21", "sdxl"),
        nargs="*",
        default=["sd15", "sd21", "sdxl"],
        help="tiny families to run when no --checkpoint is given (with sd21 also the LODA part)",
    )
    parser.add_argument(
        "--cpu", action="store_true", help="run ComfyUI on the CPU even with a GPU (tiny models always use the CPU)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo", help="folder for the images")
    return parser.parse_args()


def graph(loader: dict, adapters: list[tuple[str, str]], args, tova: bool, prefix: str) -> dict:
    """API-format graph: loader -> (Load ToVA Adapter xN -> Apply ToVA) -> KSampler -> VAEDecode -> SaveImage."""
    g = {
        "1": loader,
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": args.negative}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": args.size, "height": args.size, "batch_size": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }
    model, positive = ["1", 0], None
    if getattr(args, "v_prediction", False):  # SD2.x 768-v: ComfyUI's loader may detect it as eps
        g["2"] = {
            "class_type": "ModelSamplingDiscrete",
            "inputs": {"model": model, "sampling": "v_prediction", "zsnr": False},
        }
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
        g["4"] = {
            "class_type": "ConceptSplitApplyToVA",
            "inputs": {"model": model, "adapters": [previous, 0], "clip": ["1", 1], "text": args.prompt},
        }
        model, positive = ["4", 0], ["4", 1]
    else:
        g["3"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": args.prompt}}
        positive = ["3", 0]
    g["7"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "positive": positive,
            "negative": ["5", 0],
            "latent_image": ["6", 0],
            "seed": args.seed,
            "steps": args.steps,
            "cfg": args.cfg,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
        },
    }
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


# LODA on the tiny SD2.1 model. Its N(0, 0.02) weights make every pixel attend to every token alike, so the loader
# scales the cross-attention q/k weights (comfy_harness.tiny_models.SHARPEN_FACTORS, as the LODA tests do).
LODA_ARCH = "sd21"
LODA_SIZE = 112  # 14×14 latent: 7×7 maps at the tiny models' map level (latent/2), the smallest LODA's kernel takes
LODA_LAYERS = "latent/2"  # Capture Attention at LODA's map level of the tiny models (latent/4 on real ones)
LODA_STEPS, LODA_N = 6, 3  # S sampling steps, stage 1 on steps 0..N-1, attention fixing from step N
LODA_WORDS = ("dog", "cat")
# name: (step_scale, boost, suppression). "without": stage 1 with step size 0 (the maps at step N are recorded, the
# latent is not moved) and no fixing, which samples exactly as the plain sampler; "stage1": stage 1 only, so its
# masks are those of "with" (fixing starts after they are built) and the share compares fixing alone.
LODA_RUNS = {"without": (0.0, 0.0, 0.0), "stage1": (40.0, 0.0, 0.0), "with": (40.0, 5.0, -1e8)}
_HM_LINE = re.compile(r"LODA harmonic mean of KL a->b \(a < b\), maps smoothed as LODA's loss: (\S+)")
_SHARE_HEADER = "Attention inside each word's own mask"


def loda_graph(args) -> dict:
    """API-format graph: tiny loader (sharpened) -> ConceptSplit Text Encode -> Capture Attention (steps N..S-1) ->
    one LODA Sampler per LODA_RUNS entry, each with an Attention Map Viewer on the capture and the sampler's
    concept_masks (the stage-2 grid and each word's attention share inside its own mask) and, without and with LODA,
    one on the sampler's concept_maps (the maps at step N and LODA's harmonic mean). Widgets left out get their
    defaults."""
    from comfy_harness.tiny_models import SHARPEN_FACTORS

    g = {
        "1": {
            "class_type": "ConceptSplitTestTinyModelLoader",
            "inputs": {"arch": LODA_ARCH, "seed": 0, "attn2_qk_scale": SHARPEN_FACTORS[LODA_ARCH]},
        },
        "2": {"class_type": "ConceptSplitTextEncode", "inputs": {"clip": ["1", 1], "text": args.prompt}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": args.negative}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": LODA_SIZE, "height": LODA_SIZE, "batch_size": 1}},
        "5": {
            "class_type": "ConceptSplitCaptureAttention",
            "inputs": {
                "model": ["1", 0],
                "words": ", ".join(LODA_WORDS),
                "positive": ["2", 0],
                "token_mode": "first token",
                "first_step": LODA_N,
                "last_step": -1,
                "layers": LODA_LAYERS,
            },
        },
    }
    for name, (step_scale, boost, suppression) in LODA_RUNS.items():
        g[f"{name}_loda"] = {
            "class_type": "ConceptSplitLodaSampler",
            "inputs": {
                "model": ["5", 0],
                "seed": args.seed,
                "steps": LODA_STEPS,
                "cfg": args.cfg,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
                "concept_words": ", ".join(LODA_WORDS),
                "loda_steps": LODA_N,
                "step_scale": step_scale,
                "boost": boost,
                "suppression": suppression,
            },
        }
        if name != "stage1":  # its maps at step N are those of "with": fixing starts after them
            g[f"{name}_step_n"] = {"class_type": "ConceptSplitAttentionViewer", "inputs": {"maps": [f"{name}_loda", 2]}}
        g[f"{name}_stage2"] = {
            "class_type": "ConceptSplitAttentionViewer",
            "inputs": {"capture": ["5", 1], "samples": [f"{name}_loda", 0], "concept_masks": [f"{name}_loda", 1]},
        }
    return g


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise SystemExit(f"the viewer's metrics hold {text!r} where a finite number belongs")
    return value


def read_harmonic_mean(metrics: str) -> float:
    """LODA's harmonic mean of the pairwise KLs from an Attention Map Viewer's metrics text."""
    match = _HM_LINE.search(metrics)
    if match is None:
        raise SystemExit(f"the viewer's metrics have no LODA harmonic-mean line:\n{metrics}")
    return _number(match.group(1))


def read_mask_shares(metrics: str) -> dict[str, tuple[float, float]]:
    """{word: (share inside its own mask, mask area)} from an Attention Map Viewer's metrics text."""
    if _SHARE_HEADER not in metrics:
        raise SystemExit(f"the viewer's metrics have no mask-share table:\n{metrics}")
    rows = metrics.split(_SHARE_HEADER, 1)[1].splitlines()[2:]  # after the header line and the column names
    shares = {}
    for word in LODA_WORDS:
        row = next((r.split() for r in rows if r.split()[:1] == [word]), None)
        if row is None or len(row) != 3:
            raise SystemExit(f'the viewer\'s mask-share table has no row for "{word}":\n{metrics}')
        shares[word] = (_number(row[1]), _number(row[2]))
    return shares


def run_loda_case(server, args) -> list[Path]:
    """The LODA graph through the server: writes the stage-2 grids without and with LODA, prints the separation."""
    from comfy_harness.workflow_format import complete_api_graph

    graph = complete_api_graph(loda_graph(args), server.object_info())
    entry = server.run(graph, timeout=3600)
    metrics = {
        node: entry["outputs"][node]["text"][0]
        for node in graph
        if graph[node]["class_type"] == "ConceptSplitAttentionViewer"
    }
    hm = {name: read_harmonic_mean(metrics[f"{name}_step_n"]) for name in ("without", "with")}
    shares = {name: read_mask_shares(metrics[f"{name}_stage2"]) for name in ("stage1", "with")}
    written = []
    for name in ("without", "with"):
        (grid,) = server.output_images(entry, f"{name}_stage2")
        path = args.out / f"tiny_{LODA_ARCH}_attention_{name}_loda.png"
        grid.save(path)
        written.append(path)
    from comfy_harness.tiny_models import SHARPEN_FACTORS

    print(
        f"LODA on the tiny SD2.1 model (random weights, cross-attention q/k ×{SHARPEN_FACTORS[LODA_ARCH]:g}), "
        f"{LODA_SIZE} px, {LODA_STEPS} euler steps:\nstage 1 on steps 0-{LODA_N - 1}, attention fixing from step "
        f"{LODA_N}. Measured by the Attention Map Viewer:"
    )
    print(
        f"  harmonic-mean KL at step N={LODA_N} (LODA's concept_maps): without stage 1 {hm['without']:.5f}, "
        f"with stage 1 {hm['with']:.5f}"
    )
    print(
        f"  attention share inside its own mask, steps {LODA_N}-{LODA_STEPS - 1} (Capture Attention with LODA's "
        "concept_masks;\n  a flat map would give the mask area):"
    )
    for word in LODA_WORDS:
        (without, area), (fixed, fixed_area) = shares["stage1"][word], shares["with"][word]
        area_text = f"{area:.5f}" if area == fixed_area else f"{area:.5f} / {fixed_area:.5f}"
        print(f"    {word}: without fixing {without:.5f}, with fixing {fixed:.5f} (mask area {area_text})")
    return written


def main() -> None:
    args = parse_args()
    if args.checkpoint is None:
        args.v_prediction = False  # the tiny SD2.1 model is built as v-prediction already
    from comfy_harness.comfy_bootstrap import bootstrap_comfyui, comfyui_path
    from comfy_harness.comfy_server import ComfyServer

    comfy = comfyui_path()
    if comfy is None:
        raise SystemExit("COMFYUI_PATH is not set; run this through scripts/demo.sh")
    args.out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with ComfyServer(comfy, cpu=args.cpu or args.checkpoint is None) as server:
        if args.checkpoint is None:
            args.size, args.steps = args.size or 64, args.steps or 4
            bootstrap_comfyui(comfy)
            from comfy_harness.tiny_adapters import write_tiny_adapter
            from comfy_harness.tiny_models import build_tiny_model

            for arch in args.arch:
                model, _, _ = build_tiny_model(arch, seed=0)
                adapters = []
                for word, seed in (("dog", 1), ("cat", 2)):
                    path = write_tiny_adapter(server.base_dir / f"demo_{arch}_{word}.safetensors", model, word, seed)
                    adapters.append((server.add_model("tova", path), ""))
                loader = {"class_type": "ConceptSplitTestTinyModelLoader", "inputs": {"arch": arch, "seed": 0}}
                written += run_case(server, loader, adapters, args, f"tiny_{arch}")
            if LODA_ARCH in args.arch:
                written += run_loda_case(server, args)
        else:
            if len(args.adapter) < 1:
                raise SystemExit("give at least one --adapter FILE=WORD with --checkpoint")
            args.size, args.steps = args.size or 768, args.steps or 30
            adapters = []
            for spec in args.adapter:
                file, _, word = spec.partition("=")
                adapters.append((server.add_model("tova", Path(file)), word))
            loader = {
                "class_type": "CheckpointLoaderSimple",
                "inputs": {"ckpt_name": server.add_model("checkpoints", args.checkpoint)},
            }
            written += run_case(server, loader, adapters, args, args.checkpoint.stem)
    for path in written:
        print(f"wrote {path}")
    print(f"ConceptSplit demo: {len(written)} images in {args.out.resolve()}")


if __name__ == "__main__":
    main()
