"""LODA on a Flux.1-architecture DiT at its real width vs the same sampler plain, same process, random weights.

    COMFYUI_PATH=... python -m bench.bench_dit_loda [--double 1] [--single 1] [--latent 32] [--steps 5]
        [--loda-steps 1] [--repeats 3] [--pass-repeats 3] [--dtype fp32|bf16]

The model is ComfyUI's own Flux class (comfy_harness.tiny_dit_models.build_flux_model) with Flux.1-dev's widths:
hidden 3072, 24 heads of 128, mlp_ratio 4, T5 context width 4096 (256 tokens), CLIP pooled 768, guidance embedding;
only the block counts are small (Flux.1 has 19 double + 38 single; 1 + 1 by default, so that three alternating
pairs fit in about 20 minutes of a contended 2-core CPU; on a GPU use e.g. `--double 2 --single 2 --steps 10
--loda-steps 2`, or the full 19 + 38 where memory allows). The conditioning tensors are random and fed
directly (no T5); the token record is the real T5 tokenization of PROMPT. A 32×32 latent (256 px) gives 16×16 image
tokens. CFG 1 (Flux.1-dev is guidance-distilled: one batch-1 forward per step), euler, simple schedule.
The same command runs on a GPU where ComfyUI finds one (bf16 there is the usual choice: `--dtype bf16`).

Goals (issue 14): time ratio ≤ 1.20×, peak memory ratio ≤ 1.3×. Runs alternate (plain, LODA, plain, LODA ...);
medians, the spread (min-max) and the ratio of each adjacent pair are printed, so machine noise is visible. Memory
is the process's peak RSS (VmHWM, reset before each run) on CPU and max_memory_allocated on CUDA, also shown as the
peak above what the process held when the run started (the run's working memory; the weights dominate the total).
`kl_threshold` defaults to 10 (the widget's maximum) so every stage-1 step runs its backward pass (the worst case:
with τ = 1 a step whose maps are already apart skips it); the report's count of updates is printed.

Also: one stage-1 gradient pass (batch 1, cond only) truncated after the last map block (the last double block:
what LODA runs) against an untruncated forward + backward of the same loss, and the shares of a forward taken by a
double block, a single block and the rest, from which the measured stage-1 cost is scaled to the full 19 + 38-block
model (print_scaling has the formula). Not a test: pytest collects tests/ only (pyproject testpaths).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

from bench.bench_loda import _synchronize, timed_calls
from bench.common import bootstrap, held_bytes, measured

PROMPT = "a dog and a cat"
WORDS = ("dog", "cat")
FLUX1_DOUBLE, FLUX1_SINGLE = 19, 38
FLUX1_CONFIG = {  # Flux.1-dev's widths (comfy/model_detection.py reads these from a checkpoint)
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 3072,
    "mlp_ratio": 4.0,
    "num_heads": 24,
    "depth": FLUX1_DOUBLE,
    "depth_single_blocks": FLUX1_SINGLE,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
    "txt_ids_dims": [],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(double: int, single: int, dtype: torch.dtype, seed: int = 0):
    """A Flux.1-width MODEL with `double` + `single` blocks and seeded random weights, under inference mode."""
    import comfy.model_management as mm

    from comfy_harness.tiny_dit_models import build_flux_model

    config = dict(FLUX1_CONFIG, depth=double, depth_single_blocks=single)
    with torch.inference_mode():
        return build_flux_model(config, torch.Generator().manual_seed(seed), dtype, mm.get_torch_device())


def conditioning(pack):
    """positive, negative: random (1, 256, 4096) T5-width contexts and (1, 768) pooled vectors; the positive carries
    the PromptTokens of PROMPT in Flux's real T5 tokenization (read through the tiny Flux CLIP, whose tokenizer is
    the real one)."""
    from comfy_harness.tiny_dit_models import build_tiny_flux

    records = importlib.import_module(f"{pack.__name__}.nodes.comfy_conditioning")
    flux = importlib.import_module(f"{pack.__name__}.nodes.families.flux")
    _, clip = build_tiny_flux()
    tokens = flux.FLUX.prompt_tokens(clip, PROMPT)
    generator = torch.Generator().manual_seed(1)

    def entry(record):
        extras = {"pooled_output": torch.randn(1, 768, generator=generator)}
        if record:
            extras[records.PROMPT_TOKENS_KEY] = tokens
        return [[torch.randn(1, tokens.window_length, 4096, generator=generator), extras]]

    return entry(True), entry(False)


def sample(model, sampler, positive, negative, steps: int, latent: int, cfg: float, step_times=None, seed: int = 0):
    """SamplerCustom's path (euler, simple schedule); with `step_times`, append a timestamp at the start and after
    every step."""
    import comfy.sample
    import comfy.samplers

    def callback(step, denoised, x, total_steps):
        _synchronize()
        step_times.append(time.perf_counter())

    with torch.inference_mode():
        empty = torch.zeros(1, 16, latent, latent)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
        noise = comfy.sample.prepare_noise(empty, seed)
        if step_times is not None:
            _synchronize()
            step_times.append(time.perf_counter())
        return comfy.sample.sample_custom(
            model,
            noise,
            cfg,
            sampler,
            sigmas,
            positive,
            negative,
            empty,
            seed=seed,
            callback=None if step_times is None else callback,
            disable_pbar=True,
        )


def gradient_passes(pack, model, positive, latent: int, repeats: int) -> dict:
    """Median seconds and kept memory of one stage-1 pass (batch 1, cond only: forward to the maps, loss, ∂/∂x):
    truncated after the last map block (LODA's pass) and untruncated, interleaved after one warm-up pass."""
    run = importlib.import_module(f"{pack.__name__}.nodes.loda_sampling")
    loda = importlib.import_module(f"{pack.__name__}.conceptsplit_core.loda")
    config = importlib.import_module(f"{pack.__name__}.conceptsplit_core.loda_config").LodaConfig(loda_steps=1)
    records = importlib.import_module(f"{pack.__name__}.nodes.comfy_conditioning")
    family = importlib.import_module(f"{pack.__name__}.nodes.families").model_family(model)
    tokens = positive[0][1][records.PROMPT_TOKENS_KEY]
    request = run.LodaRequest(config, WORDS)
    plan = run.plan_loda(model, [tokens], (latent, latent), request, 10)
    collector = loda.MapCollector(plan.concepts, plan.layers)
    options = family.install_observers(model.model_options, plan.layout, (collector,))["transformer_options"]
    device = model.load_device
    sigma = torch.tensor([0.9], device=device)
    options = dict(options, cond_or_uncond=[0], sigmas=sigma)
    context = positive[0][0].to(device)  # (1, 256, 4096)
    pooled = positive[0][1]["pooled_output"].to(device)  # (1, 768)
    guidance = torch.tensor([3.5], device=device)
    dtype = model.model.get_dtype()
    results: dict = {}
    held: dict = {"truncated": [], "full": []}
    for repeat in range(repeats + 1):
        for name in ("truncated", "full"):
            if repeat == 0 and name == "full":
                continue  # round 0 warms the gradient path up (the model has run already)
            x = torch.randn(1, 16, latent, latent, device=device, requires_grad=True)
            with measured(results, f"{name}-{repeat > 0}"), family.differentiable(model):
                before = held_bytes()
                collector.start(plan.layers.loss_keys, (0,), truncate=name == "truncated")
                loda.run_truncated(
                    lambda: model.model.apply_model(
                        x.to(dtype),
                        sigma,
                        c_crossattn=context,
                        y=pooled,
                        guidance=guidance,
                        transformer_options=options,
                    )
                )
                collector.stop()
                loss = collector.maps()[0].var()  # a loss of the maps (L itself may be 0 on random weights)
                if repeat > 0:
                    held[name].append(held_bytes() - before)  # what the graph keeps for backward
                torch.autograd.grad(loss, x)
                del loss
    return {
        name: {
            "seconds": statistics.median(results[f"{name}-True"]["seconds"]),
            "spread": (min(results[f"{name}-True"]["seconds"]), max(results[f"{name}-True"]["seconds"])),
            "held_mb": statistics.median(held[name]) / 2**20,
        }
        for name in held
    }


def block_seconds(model, positive, latent: int, repeats: int) -> dict:
    """Median forward seconds (batch 1, no gradient, `repeats` forwards of a model that has run once already) of the
    whole model and of each double and single block, timed with forward hooks; "rest" is the whole minus the blocks
    (embeddings, final layer)."""
    dm = model.model.diffusion_model
    device = model.load_device
    spans: dict = {"double": [], "single": [], "whole": []}
    starts: dict = {}

    def pre(kind):
        def hook(module, args, kwargs=None):
            _synchronize()
            starts[kind] = time.perf_counter()

        return hook

    def post(kind):
        def hook(module, args, output):
            _synchronize()
            spans[kind].append(time.perf_counter() - starts[kind])

        return hook

    handles = []
    for kind, blocks in (("double", dm.double_blocks), ("single", dm.single_blocks)):
        for block in blocks:
            handles += [block.register_forward_pre_hook(pre(kind)), block.register_forward_hook(post(kind))]
    x = torch.randn(1, 16, latent, latent, device=device, dtype=model.model.get_dtype())
    context, pooled = positive[0][0].to(device), positive[0][1]["pooled_output"].to(device)
    try:
        with torch.inference_mode():
            for _ in range(repeats):  # the model has run already (the caller's warm-up)
                _synchronize()
                start = time.perf_counter()
                model.model.apply_model(
                    x,
                    torch.tensor([0.9], device=device),
                    c_crossattn=context,
                    y=pooled,
                    guidance=torch.tensor([3.5], device=device),
                )
                _synchronize()
                spans["whole"].append(time.perf_counter() - start)
    finally:
        for handle in handles:
            handle.remove()
    whole = statistics.median(spans["whole"])
    double = statistics.median(spans["double"])
    single = statistics.median(spans["single"]) if spans["single"] else 0.0
    return {
        "whole": whole,
        "double": double,
        "single": single,
        "rest": whole - double * len(dm.double_blocks) - single * len(dm.single_blocks),
    }


def spread(values) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=1, help="double blocks (Flux.1: 19)")
    parser.add_argument("--single", type=int, default=1, help="single blocks (Flux.1: 38)")
    parser.add_argument("--latent", type=int, default=32, help="latent side (pixels / 8); 32 = 256 px")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loda-steps", type=int, default=1)
    parser.add_argument("--cfg", type=float, default=1.0)
    parser.add_argument("--kl-threshold", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3, help="plain/LODA pairs")
    parser.add_argument("--pass-repeats", type=int, default=3, help="timed rounds of the gradient-pass table")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    args = parser.parse_args()
    pack = bootstrap()
    import comfy.samplers

    from bench.common import compare, device_description

    run = importlib.import_module(f"{pack.__name__}.nodes.loda_sampling")
    config = importlib.import_module(f"{pack.__name__}.conceptsplit_core.loda_config").LodaConfig(
        loda_steps=args.loda_steps, kl_threshold=args.kl_threshold
    )
    model = build(args.double, args.single, DTYPES[args.dtype])
    parameters = sum(p.numel() for p in model.model.diffusion_model.parameters())
    positive, negative = conditioning(pack)
    plain_sampler = comfy.samplers.sampler_object("euler")
    sample(model, plain_sampler, positive, negative, 1, args.latent, args.cfg)  # warm-up: load the model
    blocks = block_seconds(model, positive, args.latent, 2)
    with torch.inference_mode(False), torch.enable_grad():
        passes = gradient_passes(pack, model, positive, args.latent, args.pass_repeats)

    results: dict = {}
    pairs, all_plain, all_loda, all_stage1 = [], [], [], []
    updates = ""
    for _ in range(args.repeats):
        plain_times, loda_times, stage1 = [], [], []
        with measured(results, "plain"):
            sample(model, plain_sampler, positive, negative, args.steps, args.latent, args.cfg, plain_times)
        result = run.LodaResult()
        request = run.LodaRequest(config, WORDS, result)
        with measured(results, "loda"), timed_calls(run, "_stage1_update", stage1):
            sample(
                model,
                run.loda_sampler(plain_sampler, request),
                positive,
                negative,
                args.steps,
                args.latent,
                args.cfg,
                loda_times,
            )
        pairs.append(results["loda"]["seconds"][-1] / results["plain"]["seconds"][-1])
        all_plain.append(plain_times)
        all_loda.append(loda_times)
        all_stage1 += stage1
        updates = f"{result.report.count('updated')} of {args.loda_steps} stage-1 steps updated"
    ratio = compare(results, "plain", "loda")
    working = {
        name: max(p - b for p, b in zip(results[name]["peak"], results[name]["start"])) / 2**20
        for name in ("plain", "loda")
    }
    pixels = args.latent * 8
    print(
        f"\nDiT LODA benchmark: {device_description()}, Flux.1-width DiT ({args.double} double + {args.single} single "
        f"blocks, {parameters / 1e6:.0f} M parameters, {args.dtype}, random weights), {pixels}×{pixels} px "
        f"({args.latent // 2}×{args.latent // 2} image tokens + 256 text), euler/simple, {args.steps} steps, "
        f"N = {args.loda_steps}, CFG {args.cfg}; {args.repeats} alternating pairs; {updates}\n"
    )
    print("| measure | plain | LODA | ratio | goal |")
    print("|---|---|---|---|---|")
    print(
        f"| total time (s), median (min-max) | {spread(results['plain']['seconds'])} | "
        f"{spread(results['loda']['seconds'])} | {ratio['time_ratio']:.3f} (pairs {min(pairs):.3f}-{max(pairs):.3f}) "
        f"| ≤ 1.20 |"
    )
    print(
        f"| peak memory (MiB), max | {ratio['baseline_peak_mb']:.0f} | {ratio['candidate_peak_mb']:.0f} | "
        f"{ratio['memory_ratio']:.3f} | ≤ 1.3 |"
    )
    print(
        f"| peak above the run's start (MiB), max | {working['plain']:.0f} | {working['loda']:.0f} | "
        f"{working['loda'] / max(working['plain'], 1e-9):.2f} | |"
    )
    plain_step, stage2_step, update = breakdown(all_plain, all_loda, all_stage1, args.loda_steps)
    print_passes(passes, blocks)
    print_scaling(args, blocks, passes, plain_step, stage2_step, update)


def breakdown(plain_runs, loda_runs, stage1, loda_steps: int):
    """Per-step medians over all pairs (each run: its step timestamps): plain step, stage-2 step, stage-1 update (s).
    A plain run's step 0 and a LODA run's steps 0..N (stage 1, and the step that builds the masks) are left out."""
    plain_steps, stage2 = [], []
    for times in plain_runs:
        steps = [b - a for a, b in zip(times, times[1:])]  # (S,) seconds per step
        plain_steps += steps[1:] or steps
    for times in loda_runs:
        steps = [b - a for a, b in zip(times, times[1:])]
        stage2 += steps[loda_steps + 1 :] or steps[loda_steps:]
    plain_step = statistics.median(plain_steps)
    stage2_step = statistics.median(stage2) if stage2 else float("nan")
    update = statistics.median(stage1) if stage1 else 0.0
    print(f"\nOverhead breakdown (medians over all pairs: {len(plain_steps)} plain, {len(stage2)} stage-2 steps)\n")
    print("| part | seconds | relative to a plain step |")
    print("|---|---|---|")
    print(f"| plain step (one batch-1 forward + euler) | {plain_step:.3f} | 1.00 |")
    print(f"| stage-1 update (gradient pass, backward, update) | {update:.3f} | {update / plain_step:.2f} |")
    print(
        f"| stage-2 step (forward with the fixing bias + euler) | {stage2_step:.3f} | {stage2_step / plain_step:.2f} |"
    )
    return plain_step, stage2_step, update


def print_passes(passes: dict, blocks: dict) -> None:
    full = passes["full"]
    print("\nStage-1 gradient pass, batch 1 (medians (min-max); memory = what the forward keeps for backward)\n")
    print("| pass | seconds | vs full fwd+bwd | memory kept for backward (MiB) |")
    print("|---|---|---|---|")
    labels = {
        "full": "untruncated forward + backward of the same loss",
        "truncated": "truncated after the last double block (LODA)",
    }
    for name in ("full", "truncated"):
        part = passes[name]
        low, high = part["spread"]
        print(
            f"| {labels[name]} | {part['seconds']:.2f} ({low:.2f}-{high:.2f}) | "
            f"{part['seconds'] / full['seconds']:.3f} | {part['held_mb']:.0f} |"
        )
    print(f"| for scale: plain forward, batch 1 | {blocks['whole']:.2f} | | |")
    print(
        f"\nForward per block (no gradient, median): double {blocks['double']:.3f} s, single {blocks['single']:.3f} s, "
        f"embeddings + final layer {blocks['rest']:.3f} s"
    )


def print_scaling(args, blocks: dict, passes: dict, plain_step: float, stage2_step: float, update: float) -> None:
    """Scale to Flux.1 (19 double + 38 single) with ratios only (absolute seconds drift between the phases of a run
    on a shared machine): the shares of one forward (embeddings + final layer r, a double block d, a single block s,
    from the hooks of the same forward) give F(D, S) ∝ r + D·d + S·s; the stage-1 update runs the embeddings and the
    double blocks forward and backward, U(D) ∝ r + D·d (its embedding share taken as in a forward); U/F measured
    (stage-1 update / plain step, medians of the same interleaved runs) is scaled by U(19)/U(D) ÷ F(19, 38)/F(D, S).
    The stage-2 step's extra cost is per block (the bias on every joint block): its fraction carries over.
    Time ratio ≈ 1 + N/S · U/F + (S − N)/S · (stage-2 / plain − 1)."""
    d, s, rest = blocks["double"], blocks["single"], max(blocks["rest"], 0.0)
    stage2_extra = stage2_step / plain_step - 1
    fraction = args.loda_steps / args.steps
    measured_u = update / plain_step

    def forward(nd, ns):
        return rest + nd * d + ns * s

    def pass_cost(nd):
        return rest + nd * d

    print("\nScaled to Flux.1 (19 double + 38 single blocks), same latent, from the shares of one forward\n")
    print(f"| model | stage-1 update / plain step (U/F) | estimated time ratio at N/S = {fraction:.2f} |")
    print("|---|---|---|")
    for name, (nd, ns) in (
        (f"measured ({args.double} + {args.single})", (args.double, args.single)),
        ("Flux.1 (19 + 38)", (FLUX1_DOUBLE, FLUX1_SINGLE)),
    ):
        u = (
            measured_u
            * (pass_cost(nd) / pass_cost(args.double))
            / (forward(nd, ns) / forward(args.double, args.single))
        )
        stage1_part = fraction * u
        print(
            f"| {name} | {u:.3f} | {1 + stage1_part + (1 - fraction) * stage2_extra:.3f} "
            f"(stage 1 alone: {1 + stage1_part:.3f}) |"
        )
    print(
        f"\n(shares of a forward: double block {d / blocks['whole']:.3f}, single block {s / blocks['whole']:.3f}, "
        f"rest {rest / blocks['whole']:.3f}; stage-2 step / plain step − 1 = {stage2_extra:+.3f})"
    )


if __name__ == "__main__":
    main()
