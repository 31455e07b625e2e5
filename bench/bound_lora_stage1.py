"""What bound LoRAs should do in LODA stage 1 (before the masks exist): the policies measured on tiny models.

    COMFYUI_PATH=... python -m bench.bound_lora_stage1 [--arch sd21] [--seeds 4] [--steps 6] [--loda-steps 2]

One random kohya LoRA bound to "dog" (nothing on "cat"), prompt "a dog and a cat", attn2 q/k sharpened so the maps
are not flat (comfy_harness.tiny_models.sharpen_cross_attention). Against the same run without the LoRA, per policy:
- effect in the dog region, in the cat region (leakage into the other concept) and outside both: mean |Δ latent|
  over the final LODA masks of the LoRA-free run (nearest-upsampled to the latent);
- mask IoU: how far the LoRA moved LODA's masks (1 = the masks are those of the LoRA-free run).
"merged" is the same LoRA merged into the weights with ComfyUI's Load LoRA path (the leakage reference).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import bootstrap
from comfy_harness.loda_settings import LODA_NODE_SETTINGS

PROMPT = "a dog and a cat"
SIZE = 112
SETTINGS = dict(LODA_NODE_SETTINGS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sd21")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--loda-steps", type=int, default=2)
    parser.add_argument("--magnitude", type=float, default=0.3, help="scale of the random LoRA's down factors")
    args = parser.parse_args()
    pack = bootstrap()
    import importlib

    import comfy.sd
    import folder_paths
    import nodes

    from comfy_harness.tiny_loras import write_tiny_lora
    from comfy_harness.tiny_models import SHARPEN_FACTORS, build_tiny_model, sharpen_cross_attention

    glue = lambda name: importlib.import_module(f"{pack.__name__}.nodes.{name}")  # noqa: E731
    folder = Path(tempfile.mkdtemp(prefix="bound-lora-"))
    folder_paths.folder_names_and_paths["loras"][0].insert(0, str(folder))
    folder_paths.filename_list_cache.clear()
    with torch.inference_mode():
        model, clip, _ = build_tiny_model(args.arch, 0)
    sharpen_cross_attention(model, SHARPEN_FACTORS[args.arch])
    write_tiny_lora(folder / "dog.safetensors", model, seed=1, magnitude=args.magnitude)
    with torch.inference_mode():
        positive = glue("prompt").ConceptSplitTextEncode.execute(clip, PROMPT).result[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        bound = glue("bound_lora").BindLoraToConcept.execute("dog.safetensors", "dog", 1.0).result[0]
        state = comfy.utils.load_torch_file(str(folder / "dog.safetensors"), safe_load=True)
        merged, _ = comfy.sd.load_lora_for_models(model, None, state, 1.0, 0.0)
    models = {"none": model, "merged": merged}
    for policy in ("off", "text_rows", "unmasked"):
        with torch.inference_mode():
            models[policy] = glue("bound_lora").ApplyBoundLoras.execute(model, bound, positive, policy).result[0]

    def run(which, seed):
        with torch.inference_mode():
            latent = nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
            out, masks, maps, _ = (
                glue("loda_nodes")
                .LodaSampler.execute(
                    models[which],
                    seed,
                    args.steps,
                    7.0,
                    "euler",
                    "normal",
                    positive,
                    negative,
                    latent,
                    1.0,
                    "dog, cat",
                    loda_steps=args.loda_steps,
                    **SETTINGS,
                )
                .result
            )
        return out["samples"][0], maps.masks[0]  # (4, h, w), (K, 7, 7) bool

    rows = {name: {"dog": [], "cat": [], "outside": [], "iou": []} for name in models if name != "none"}
    for seed in range(args.seeds):
        base, base_masks = run("none", seed)
        up = F.interpolate(base_masks[None].float(), size=base.shape[-2:], mode="nearest")[0] > 0.5  # (K, h, w)
        dog, cat = up[0] & ~up[1], up[1] & ~up[0]
        outside = ~(up[0] | up[1])
        for name in rows:
            latent, masks = run(name, seed)
            diff = (latent - base).abs().mean(0)  # (h, w)
            rows[name]["dog"].append(float(diff[dog].mean()))
            rows[name]["cat"].append(float(diff[cat].mean()))
            rows[name]["outside"].append(float(diff[outside].mean()))
            inter = (masks & base_masks).flatten(1).sum(1).float()
            union = (masks | base_masks).flatten(1).sum(1).float()
            rows[name]["iou"].append(float((inter / union.clamp(min=1)).mean()))
    print(
        f"{args.arch}, LoRA magnitude {args.magnitude}, {args.seeds} seeds, {args.steps} steps, "
        f"LODA stage 1 on steps 0..{args.loda_steps - 1}; "
        "mean |Δ latent| vs the LoRA-free run"
    )
    print(f"{'policy':<10} {'dog (own)':>10} {'cat (leak)':>11} {'outside':>9} {'leak/own':>9} {'mask IoU':>9}")
    for name, values in rows.items():
        own, leak = statistics.mean(values["dog"]), statistics.mean(values["cat"])
        print(
            f"{name:<10} {own:>10.4f} {leak:>11.4f} {statistics.mean(values['outside']):>9.4f} "
            f"{leak / own if own else float('nan'):>9.3f} {statistics.mean(values['iou']):>9.3f}"
        )


if __name__ == "__main__":
    main()
