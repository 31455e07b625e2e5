"""ToVA sampling vs plain KSampler sampling, same process, full-size SD2.1-architecture UNet, random weights.

    COMFYUI_PATH=... python -m bench.bench_tova [--size 256] [--steps 4] [--repeats 3] [--concepts 2]

Goal (issue 2): time and peak-memory ratios ≤ 1.01. The runs alternate plain/ToVA so drift hits both alike.
"""

from __future__ import annotations

import argparse
import importlib

import torch

from bench.common import bootstrap, build_full_sd21, compare, device_description, ksample, measured, random_conditioning


def tova_model(pack, model, concepts: int, rank: int = 64):
    """Patch a clone with `concepts` random rank-r adapters at token positions 2, 5, 8, ... through the seam."""
    core = lambda name: importlib.import_module(f"{pack.__name__}.conceptsplit_core.{name}")  # noqa: E731
    family = importlib.import_module(f"{pack.__name__}.nodes.families").model_family(model)
    layout = family.layout(model)
    generator = torch.Generator().manual_seed(3)
    bound = []
    for k in range(concepts):
        layers = {
            layer.path: (
                torch.randn(rank, layer.in_features, generator=generator) / 32,
                torch.randn(layer.out_features, rank, generator=generator) / 32,
            )
            for layer in layout.layers
        }
        weights = core("adapter_file").AdapterWeights(
            name=f"c{k}",
            file_format="native",
            layers=layers,
            rank=rank,
            text_width=layout.text_width,
            alpha=rank,
            metadata=None,
        )
        concept = core("concepts").make_concept(weights, f"word{k}", 1.0, "object")
        bound.append(
            core("concepts").BoundConcept(
                concept, 2 + 3 * k, core("adapter_layers").bind_adapter_layers(weights, layout)
            )
        )
    patched = model.clone()
    family.install_tova(patched, layout, core("concepts").plan_token_deltas(bound, 77), True)
    return patched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size/8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concepts", type=int, default=2)
    args = parser.parse_args()

    pack = bootstrap()
    model = build_full_sd21()
    patched = tova_model(pack, model, args.concepts)
    positive, negative = random_conditioning(seed=1), random_conditioning(seed=2)
    ksample(model, positive, negative, 1, args.size)  # warm-up: loads the model, first-call allocations
    ksample(patched, positive, negative, 1, args.size)
    results: dict = {}
    for _ in range(args.repeats):
        with measured(results, "plain"):
            ksample(model, positive, negative, args.steps, args.size)
        with measured(results, "tova"):
            ksample(patched, positive, negative, args.steps, args.size)
    row = compare(results, "plain", "tova")
    print(
        f"ToVA vs plain KSampler: SD2.1 UNet (random weights), {args.size}x{args.size}, {args.steps} steps, "
        f"{args.concepts} rank-64 adapters, median of {args.repeats}, {device_description()}"
    )
    print("| run | seconds | peak memory (MB) |\n|---|---|---|")
    print(f"| plain | {row['baseline_s']:.2f} | {row['baseline_peak_mb']:.0f} |")
    print(f"| ToVA | {row['candidate_s']:.2f} | {row['candidate_peak_mb']:.0f} |")
    print(f"| ratio | {row['time_ratio']:.3f}x | {row['memory_ratio']:.3f}x |")


if __name__ == "__main__":
    main()
