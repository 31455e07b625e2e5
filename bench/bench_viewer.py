"""Sampling with Capture Attention vs plain KSampler sampling, same process, full-size SD2.1-architecture UNet with
random weights (issue 4).

    COMFYUI_PATH=... python -m bench.bench_viewer [--size 256] [--steps 4] [--repeats 3] [--words 2]

Goal: time ratio ≤ 1.10×, peak-memory ratio ≤ 1.05×, for the default layer choice (latent/4) and for "all" layers.
The runs alternate plain / capture so drift hits both alike. Peak memory is CUDA's allocator peak on a GPU, the
process peak RSS on CPU (weights included, as a user's process has them). On a shared CPU, wall time follows the
other processes' load, so the process CPU time (all torch threads) is reported as well.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

from bench.common import bootstrap, build_full_sd21, compare, device_description, ksample, measured, random_conditioning

LAYER_CHOICES = ("latent/4", "all")


def capture_model(pack, model, words: int, layers: str):
    """A clone recording `words` token positions 2, 5, 8, ... on `layers`, through the seam, as the node does."""
    capture_core = importlib.import_module(f"{pack.__name__}.conceptsplit_core.attention_capture")
    family = importlib.import_module(f"{pack.__name__}.nodes.families").model_family(model)
    layout = family.layout(model)
    keys = capture_core.select_layers(layout.levels(), layers)
    request = capture_core.CaptureRequest(
        labels=tuple(f"word{k}" for k in range(words)),
        token_positions=tuple((2 + 3 * k,) for k in range(words)),
        prompt_length=77,
        layer_keys=keys,
    )
    store = capture_core.AttentionCapture(request)
    patched = model.clone()
    sampling = importlib.import_module(f"{pack.__name__}.nodes.comfy_sampling")
    sampling.install_attention_capture(patched, family, layout, store)
    return patched, store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size/8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--words", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads; 1 makes CPU time robust to other processes (0 = torch's default)",
    )
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    pack = bootstrap()
    model = build_full_sd21()
    patched = {layers: capture_model(pack, model, args.words, layers) for layers in LAYER_CHOICES}
    positive, negative = random_conditioning(seed=1), random_conditioning(seed=2)
    ksample(model, positive, negative, 1, args.size)  # warm-up: loads the model, first-call allocations
    for capture, _ in patched.values():
        ksample(capture, positive, negative, 1, args.size)
    results: dict = {}
    cpu_seconds: dict = {}
    for _ in range(args.repeats):
        start = time.process_time()
        with measured(results, "plain"):
            plain = ksample(model, positive, negative, args.steps, args.size)
        cpu_seconds.setdefault("plain", []).append(time.process_time() - start)
        for layers, (capture, store) in patched.items():
            start = time.process_time()
            with measured(results, layers):
                latent = ksample(capture, positive, negative, args.steps, args.size)
            cpu_seconds.setdefault(layers, []).append(time.process_time() - start)
            assert (latent == plain).all(), "capturing changed the sampled latent"
            assert store.maps_for(latent).maps.shape[:2] == (1, args.words)
    print(
        f"Capture Attention vs plain KSampler: SD2.1 UNet (random weights), {args.size}x{args.size}, "
        f"{args.steps} steps, {args.words} words, median of {args.repeats}, {device_description()}, "
        f"{args.threads or 'default'} thread(s)"
    )
    cpu = {name: statistics.median(values) for name, values in cpu_seconds.items()}
    print("| run | wall s | CPU s | peak memory (MB) | wall ratio | CPU-time ratio | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for index, layers in enumerate(LAYER_CHOICES):
        row = compare(results, "plain", layers)
        if index == 0:
            print(
                f"| plain | {row['baseline_s']:.2f} | {cpu['plain']:.1f} | {row['baseline_peak_mb']:.0f} | 1 | 1 | 1 |"
            )
        print(
            f"| capture, layers {layers} | {row['candidate_s']:.2f} | {cpu[layers]:.1f} | "
            f"{row['candidate_peak_mb']:.0f} | {row['time_ratio']:.3f}x | {cpu[layers] / cpu['plain']:.3f}x | "
            f"{row['memory_ratio']:.3f}x |"
        )


if __name__ == "__main__":
    main()
