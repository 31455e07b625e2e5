"""LODA sampling vs the same sampler plain, same process, full-size SD2.1-architecture UNet with random weights.

    COMFYUI_PATH=... python -m bench.bench_loda [--size 256] [--steps 50] [--loda-steps 10] [--repeats 1]

Goals (issue 3): total time ratio ≤ 1.15, peak memory ratio ≤ 1.3. Also times one stage-1 gradient pass that stops
after the last loss layer (output 5) against a full forward + backward. 256 px gives 8×8 maps at latent/4, the
smallest size LODA accepts is 224 px. Weights are made under inference mode, as ComfyUI loads them; LODA reads them
through autograd-usable views of the same memory (nodes/comfy_autograd.py), so nothing is copied.

The breakdown (from the last repeat) splits the LODA overhead into: the stage-1 update per step (batch-1 gradient
forward, backward and latent update, without the sampler step) and the stage-2 step (CFG pass with the fixing bias)
against a plain step; the estimated overhead is N · stage-1 update + (S − N) · (stage-2 step − plain step).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import time

import torch

from bench.common import (
    bootstrap,
    build_full_sd21,
    compare,
    device_description,
    held_bytes,
    measured,
    random_conditioning,
)

PROMPT = "a dog and a cat"


def positive_with_tokens(pack, width: int = 1024):
    """Random text features carrying the PromptTokens of PROMPT, as ConceptSplit Text Encode attaches them."""
    hooks = importlib.import_module(f"{pack.__name__}.nodes.comfy_text")
    records = importlib.import_module(f"{pack.__name__}.nodes.comfy_conditioning")
    prompt_tokens = importlib.import_module(f"{pack.__name__}.conceptsplit_core.prompt_tokens")
    words = [hooks.default_word_token_ids(w)[0] for w in PROMPT.split()]
    ids = (49406, *words, 49407) + (0,) * (77 - len(words) - 2)
    starts = (False, *([True] * len(words)), False) + (False,) * (77 - len(words) - 2)
    tokens = prompt_tokens.PromptTokens(PROMPT, ids, starts, 77)
    cond, extras = random_conditioning(width)[0]
    return [[cond, {**extras, records.PROMPT_TOKENS_KEY: tokens}]]


def sample(model, sampler, positive, negative, steps: int, size: int, seed: int = 0, step_times=None):
    """Sample like SamplerCustom; with `step_times` (a list), append the time at the end of every step."""
    import comfy.sample
    import comfy.samplers

    def callback(step, denoised, x, total_steps):
        _synchronize()
        step_times.append(time.perf_counter())

    with torch.inference_mode():
        latent = torch.zeros(1, 4, size // 8, size // 8)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
        noise = comfy.sample.prepare_noise(latent, seed)
        if step_times is not None:
            _synchronize()
            step_times.append(time.perf_counter())  # the start
        return comfy.sample.sample_custom(
            model,
            noise,
            7.5,
            sampler,
            sigmas,
            positive,
            negative,
            latent,
            seed=seed,
            callback=None if step_times is None else callback,
        )


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def timed_calls(module, name: str, seconds: list):
    """Replace `module.name` by a wrapper appending each call's wall time (synchronized) to `seconds`."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        _synchronize()
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _synchronize()
            seconds.append(time.perf_counter() - start)

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def gradient_pass_seconds(pack, model, positive, size: int, repeats: int) -> dict:
    """Median time and peak memory of one stage-1 pass (cond-only forward at batch 1 to the maps, loss, gradient
    w.r.t. x) in three variants: truncated after the last loss layer, truncated with gradient checkpointing, and a
    full forward + backward; interleaved so load drift hits all alike. Weights as LODA sees them (comfy_autograd)."""
    family = importlib.import_module(f"{pack.__name__}.nodes.families").model_family(model)
    unet_family = importlib.import_module(f"{pack.__name__}.nodes.families.unet")
    autograd = importlib.import_module(f"{pack.__name__}.nodes.comfy_autograd")
    loda = importlib.import_module(f"{pack.__name__}.conceptsplit_core.loda")
    layout = family.layout(model)
    latent_hw = (size // 8, size // 8)
    layers = loda.select_map_layers(layout, latent_hw, "all")
    collector = loda.MapCollector(loda.LodaConcepts(("dog", "cat"), (2, 5), 77), layers)
    options = family.install_observers(model.model_options, layout, (collector,))["transformer_options"]
    sigma = torch.tensor([14.6])
    options = dict(options, cond_or_uncond=[0], sigmas=sigma)
    context = positive[0][0].clone()
    unet = model.model.diffusion_model
    keep = {key[:2] for key in layers.loss_keys}
    variants = {"truncated": (True, False), "checkpointed": (True, True), "full": (False, False)}
    results: dict = {}
    held: dict = {name: [] for name in variants}
    for repeat in range(repeats + 1):
        for name, (truncate, checkpointing) in variants.items():
            x = torch.randn(1, 4, *latent_hw, requires_grad=True)
            with (
                measured(results, f"{name}-{repeat > 0}"),
                autograd.AutogradWeights([unet]),
                autograd.GradientCheckpointing(unet_family.checkpoint_modules(unet, keep) if checkpointing else ()),
            ):
                before = held_bytes()
                collector.start(layers.loss_keys, (0,), truncate=truncate)
                loda.run_truncated(
                    lambda: model.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)
                )
                collector.stop()
                loss = collector.maps()[0].var()  # a loss of the maps; L itself may be 0 here
                held[name].append(held_bytes() - before)  # what the graph keeps for backward
                torch.autograd.grad(loss, x)
                del loss
    return {
        name: {
            "seconds": statistics.median(results[f"{name}-True"]["seconds"]),  # the first round warms up
            "held_mb": statistics.median(held[name][1:]) / 2**20,
        }
        for name in variants
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--loda-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--pass-repeats", type=int, default=3, help="timed rounds of the gradient-pass table")
    parser.add_argument("--checkpointing", action="store_true", help="LODA run with gradient_checkpointing on")
    parser.add_argument("--gradient-pass-only", action="store_true", help="only time the stage-1 passes")
    parser.add_argument(
        "--skip-after",
        action="store_true",
        help="skip the plain run after LODA (which checks that LODA leaves the model as it was)",
    )
    args = parser.parse_args()
    pack = bootstrap()
    import comfy.samplers

    run = importlib.import_module(f"{pack.__name__}.nodes.loda_sampling")
    config = importlib.import_module(f"{pack.__name__}.conceptsplit_core.loda_config").LodaConfig(
        loda_steps=args.loda_steps
    )
    with torch.inference_mode():  # inference-tensor weights, as ComfyUI loads them
        model = build_full_sd21()
        positive = positive_with_tokens(pack)
        negative = random_conditioning(seed=2)
    with torch.inference_mode(False), torch.enable_grad():
        passes = gradient_pass_seconds(pack, model, positive, args.size, args.pass_repeats)
    with torch.inference_mode():
        forward = measured_forward(model, positive, args.size)
    print_gradient_passes(passes, forward, args.size)
    if args.gradient_pass_only:
        return
    plain_sampler = comfy.samplers.sampler_object("euler")
    results: dict = {}
    sample(model, plain_sampler, positive, negative, 1, args.size)  # warm-up: load the model
    for _ in range(args.repeats):
        plain_times, loda_times, stage1 = [], [], []
        with measured(results, "plain"):
            sample(model, plain_sampler, positive, negative, args.steps, args.size, step_times=plain_times)
        request = run.LodaRequest(config, ("dog", "cat"), run.LodaResult(), gradient_checkpointing=args.checkpointing)
        with measured(results, "loda"), timed_calls(run, "_stage1_update", stage1):
            sample(
                model,
                run.loda_sampler(plain_sampler, request),
                positive,
                negative,
                args.steps,
                args.size,
                step_times=loda_times,
            )
        plain_after_times = []  # LODA leaves the weights as they were: a later plain run costs the same
        if not args.skip_after:
            sample(model, plain_sampler, positive, negative, args.steps, args.size, step_times=plain_after_times)
    ratio = compare(results, "plain", "loda")
    print(
        f"\nLODA benchmark: {device_description()}, SD2.1 UNet (random weights), {args.size}×{args.size} px, "
        f"euler, {args.steps} steps, N = {args.loda_steps}, CFG 7.5, gradient checkpointing "
        f"{'on' if args.checkpointing else 'off'}\n"
    )
    print("| measure | plain | LODA | ratio | goal |")
    print("|---|---|---|---|---|")
    print(
        f"| total time (s) | {ratio['baseline_s']:.1f} | {ratio['candidate_s']:.1f} | "
        f"{ratio['time_ratio']:.3f} | ≤ 1.15 |"
    )
    print(
        f"| peak memory (MiB) | {ratio['baseline_peak_mb']:.0f} | {ratio['candidate_peak_mb']:.0f} | "
        f"{ratio['memory_ratio']:.3f} | ≤ 1.3 |"
    )
    print_breakdown(plain_times, loda_times, stage1, args.steps, args.loda_steps, plain_after_times)


def print_gradient_passes(passes: dict, forward: float, size: int) -> None:
    full = passes["full"]
    print(
        f"\nStage-1 gradient pass, batch 1, {size}×{size} px (medians; memory = what the forward keeps for backward)\n"
    )
    print("| pass | seconds | vs full fwd+bwd | memory kept for backward (MiB) |")
    print("|---|---|---|---|")
    labels = {
        "full": "untruncated forward + backward of the same loss",
        "truncated": "truncated after the last loss layer (LODA)",
        "checkpointed": "truncated + gradient checkpointing",
    }
    for name in ("full", "truncated", "checkpointed"):
        part = passes[name]
        print(
            f"| {labels[name]} | {part['seconds']:.2f} | {part['seconds'] / full['seconds']:.3f} | "
            f"{part['held_mb']:.0f} |"
        )
    print(f"| for scale: plain CFG forward, batch 2 | {forward:.2f} | | |")


def print_breakdown(plain_times, loda_times, stage1, steps: int, loda_steps: int, plain_after_times=()) -> None:
    """Where the LODA overhead goes (last repeat): per-step medians from the step callbacks' timestamps."""
    plain_steps = [b - a for a, b in zip(plain_times, plain_times[1:])]  # (S,) seconds per step
    loda_steps_s = [b - a for a, b in zip(loda_times, loda_times[1:])]
    plain_step = statistics.median(plain_steps[1:] or plain_steps)  # step 0 also loads/prepares
    stage2 = loda_steps_s[loda_steps + 1 :] or loda_steps_s[loda_steps:]  # step N also builds the masks
    stage2_step = statistics.median(stage2) if stage2 else float("nan")
    update = statistics.median(stage1) if stage1 else 0.0
    estimate = loda_steps * update + (steps - loda_steps) * (stage2_step - plain_step)
    print("\nOverhead breakdown (last repeat, medians)\n")
    print("| part | seconds | relative to a plain step |")
    print("|---|---|---|")
    print(f"| plain step (CFG pass + euler) | {plain_step:.3f} | 1.00 |")
    print(
        f"| stage-1 update per step (batch-1 gradient pass, backward, update) | {update:.3f} | "
        f"{update / plain_step:.2f} |"
    )
    print(f"| stage-2 step (CFG pass with fixing bias + euler) | {stage2_step:.3f} | {stage2_step / plain_step:.2f} |")
    after = [b - a for a, b in zip(plain_after_times, plain_after_times[1:])]
    if after:
        plain_after = statistics.median(after[1:] or after)
        print(f"| plain step after the LODA run (same model) | {plain_after:.3f} | {plain_after / plain_step:.2f} |")
    print(
        f"| estimated overhead: N·update + (S−N)·(stage-2 − plain) | {estimate:.2f} | "
        f"{estimate / (plain_step * steps):.3f} of a plain run |"
    )


def measured_forward(model, positive, size: int) -> float:
    x = torch.randn(2, 4, size // 8, size // 8)
    context = positive[0][0].repeat(2, 1, 1)
    start = time.perf_counter()
    model.model.apply_model(x, torch.tensor([14.6, 14.6]), c_crossattn=context)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
