"""Two bound LoRAs with LODA vs the same two LoRAs merged with Load LoRA, same sampler and steps; and the masked
residuals alone (bindings on, LODA off: masks published by hand) vs the merged LoRAs. Full-size UNet, random weights.

    COMFYUI_PATH=... python -m bench.bench_bound_lora [--arch sdxl|sd21] [--size 256] [--steps 5] [--rank 16]
        [--repeats 3] [--dtype auto|fp32|fp16] [--merged-loda]

Goals (issue 13): time ratio ≤ 1.25×, peak memory ratio ≤ 1.15× (bound + LODA over merged). The runs alternate
(merged, bound + LODA, masked residuals[, merged + LODA]) `--repeats` times; medians, spreads (min-max) and the
ratio within each round are printed. Memory: peak RSS on CPU (VmHWM, reset before each run), max_memory_allocated on
CUDA. `--steps 5` gives LODA N = round(0.2·5) = 1, the paper's N/S.

Weights (`--dtype auto`): fp16 on a GPU. On a CPU, SD2.1 in fp32; SDXL stored in fp16 and computed in fp32 by
ComfyUI's manual cast (as ComfyUI runs fp16 weights on a CPU): the full SDXL UNet (2.6 B parameters) in fp32 is
10 GB, and Load LoRA's backups of the patched weights almost as much again, more than a 24 GB machine shared with
other jobs can hold.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
from pathlib import Path

import torch

from bench.common import SD21_UNET_CONFIG, bootstrap, compare, device_description, measured
from comfy_harness.loda_settings import LODA_NODE_SETTINGS

SDXL_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
PROMPT = "a dog and a cat"


def build(arch: str, dtype: str = "auto", seed: int = 0):
    """The full-size UNet of `arch` with seeded random weights; dtype as the module docstring says."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    from comfy_harness.tiny_models import seeded_value

    if arch == "sdxl":
        config = comfy.supported_models.SDXL(dict(SDXL_UNET_CONFIG))
        base_cls, model_type = comfy.model_base.SDXL, comfy.model_base.ModelType.EPS
    else:
        config = comfy.supported_models.SD20(dict(SD21_UNET_CONFIG))
        base_cls, model_type = comfy.model_base.BaseModel, comfy.model_base.ModelType.V_PREDICTION
    if dtype == "auto":
        dtype = "fp16" if torch.cuda.is_available() or arch == "sdxl" else "fp32"
    weights = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    cast = torch.float32 if weights == torch.float16 and not torch.cuda.is_available() else None  # CPU: fp32 compute
    config.set_inference_dtype(weights, cast)
    base = base_cls(config, model_type=model_type, device=mm.get_torch_device())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in base.diffusion_model.named_parameters():
            param.copy_(seeded_value(name, param.shape, generator).to(param.dtype))
    return comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def conditioning(pack, arch: str):
    from bench.bench_loda import positive_with_tokens

    width = 2048 if arch == "sdxl" else 1024
    positive = positive_with_tokens(pack, width)
    generator = torch.Generator().manual_seed(2)
    negative = [[torch.randn(1, 77, width, generator=generator), {}]]
    if arch == "sdxl":
        for entry in (positive[0], negative[0]):
            entry[1]["pooled_output"] = torch.randn(1, 1280, generator=generator)
    return positive, negative


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sdxl", choices=("sdxl", "sd21"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16"))
    parser.add_argument("--merged-loda", action="store_true", help="also time the merged LoRAs with LODA")
    args = parser.parse_args()
    pack = bootstrap()
    import comfy.sd
    import comfy.utils
    import folder_paths
    import nodes

    from comfy_harness.tiny_loras import write_tiny_lora

    glue = lambda name: importlib.import_module(f"{pack.__name__}.nodes.{name}")  # noqa: E731
    core = lambda name: importlib.import_module(f"{pack.__name__}.conceptsplit_core.{name}")  # noqa: E731
    folder = Path(tempfile.mkdtemp(prefix="bench-bound-"))
    folder_paths.folder_names_and_paths["loras"][0].insert(0, str(folder))
    folder_paths.filename_list_cache.clear()
    with torch.inference_mode():
        model = build(args.arch, args.dtype)
    for word, seed in (("dog", 1), ("cat", 2)):
        write_tiny_lora(
            folder / f"{word}.safetensors", model, seed=seed, rank=args.rank, magnitude=0.05, compute_deltas=False
        )
    positive, negative = conditioning(pack, args.arch)
    with torch.inference_mode():
        merged = model
        for word in ("dog", "cat"):
            state = comfy.utils.load_torch_file(str(folder / f"{word}.safetensors"), safe_load=True)
            merged, _ = comfy.sd.load_lora_for_models(merged, None, state, 1.0, 0.0)
        bound = glue("bound_lora").BindLoraToConcept.execute("dog.safetensors", "dog", 1.0).result[0]
        bound = glue("bound_lora").BindLoraToConcept.execute("cat.safetensors", "cat", 1.0, bound).result[0]
        patched = glue("bound_lora").ApplyBoundLoras.execute(model, bound, positive).result[0]
    # masked residuals alone: the masks LODA would publish, fixed by hand (left / right halves at latent/4)
    loda = core("loda")
    tokens = positive[0][1][glue("comfy_conditioning").PROMPT_TOKENS_KEY]
    h, w = loda.map_grid((args.size // 8, args.size // 8), 2)
    masks = torch.zeros(1, 2, h, w, dtype=torch.bool)
    masks[0, 0, :, : w // 2], masks[0, 1, :, w // 2 :] = True, True
    regions = core("bound_lora").ConceptRegions(("dog", "cat"), (2, 5), 77, tuple(tokens.token_ids), masks)
    residuals_only = patched.clone()
    residuals_only.model_options = glue("comfy_lora").with_concept_regions(residuals_only.model_options, regions)

    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
    settings = dict(LODA_NODE_SETTINGS, loda_steps=-1)

    def ksampler(m):
        with torch.inference_mode():
            return nodes.common_ksampler(m, 0, args.steps, 7.0, "euler", "normal", positive, negative, latent)

    def loda_run(m):
        with torch.inference_mode():
            return glue("loda_nodes").LodaSampler.execute(
                m, 0, args.steps, 7.0, "euler", "normal", positive, negative, latent, 1.0, "dog, cat", **settings
            )

    results: dict = {}
    calls: list = []  # (grad on, seconds) of each diffusion-model call of the run under way
    merged, patched, residuals_only = (step_timed(m, calls) for m in (merged, patched, residuals_only))
    ksampler(merged)  # warm-up: loads the model, patches the weights once
    runs = [("merged", ksampler, merged)]
    if args.merged_loda:
        runs.append(("merged + LODA", loda_run, merged))  # right after: the merged weights are still in place
    runs += [("bound + LODA", loda_run, patched), ("masked residuals", ksampler, residuals_only)]
    for round_index in range(args.repeats):
        for name, runner, which in runs:
            calls.clear()
            with measured(results, name):
                runner(which)
            print(  # as it goes, so a long CPU run shows its progress
                f"round {round_index + 1}: {name}: {results[name]['seconds'][-1]:.1f} s, "
                f"peak {results[name]['peak'][-1] / 2**20:.0f} MiB; {call_summary(calls)}",
                flush=True,
            )
    parameters = sum(p.numel() for p in model.model.diffusion_model.parameters())
    n = core("loda_config").default_loda_steps(args.steps)
    print(
        f"{device_description()}, {args.arch} UNet ({parameters / 1e9:.2f} B parameters, "
        f"{model.model.get_dtype()} weights, compute {model.model.manual_cast_dtype or model.model.get_dtype()}), "
        f"{args.size} px, {args.steps} euler steps (LODA N = {n}), rank "
        f"{args.rank}, {args.repeats} alternating rounds"
    )
    print("| run | time (s), median (min-max) | ratio (per round) | peak memory (MiB) | ratio |")
    print("|---|---|---|---|---|")
    for baseline, candidate in (
        ("merged", "bound + LODA"),
        ("merged + LODA", "bound + LODA"),
        ("merged", "masked residuals"),
    ):
        if baseline not in results:
            continue
        r = compare(results, baseline, candidate)
        rounds = [c / b for b, c in zip(results[baseline]["seconds"], results[candidate]["seconds"])]
        print(
            f"| {candidate} vs {baseline} | {spread(results[candidate]['seconds'])} / "
            f"{spread(results[baseline]['seconds'])} | {r['time_ratio']:.3f} ({min(rounds):.3f}-{max(rounds):.3f}) | "
            f"{r['candidate_peak_mb']:.0f} / {r['baseline_peak_mb']:.0f} | {r['memory_ratio']:.3f} |"
        )


def step_timed(model, calls: list):
    """A clone of `model` whose diffusion-model calls append (grad on, seconds) to `calls`: each sampling step is
    one call (CFG batched); a LODA stage-1 step adds its truncated gradient passes (grad on; their backward is not
    in the call)."""
    import time

    import comfy.patcher_extension

    def timer(executor, *args, **kwargs):
        start, grad = time.perf_counter(), torch.is_grad_enabled()
        try:
            return executor(*args, **kwargs)
        finally:  # a stage-1 pass ends early by raising after its last map layer: counted too
            calls.append((grad, time.perf_counter() - start))

    timed = model.clone()
    timed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench-step-timer", timer)
    return timed


def call_summary(calls: list) -> str:
    """The plain (no-grad) model calls of one run, in order: whether later steps slow down (the last over the
    first), which a cost that grows with the step (or memory pressure) would show."""
    plain = [seconds for grad, seconds in calls if not grad]
    if not plain:
        return "no plain model calls"
    shown = " ".join(f"{seconds:.1f}" for seconds in plain)
    return (
        f"plain model calls {shown} s (last / first {plain[-1] / plain[0]:.2f}), "
        f"{len(calls) - len(plain)} stage-1 passes"
    )


def spread(values) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


if __name__ == "__main__":
    main()
