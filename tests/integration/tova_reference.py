"""A hand-written ToVA that shares no code with the pack: for checking the pack's patch against it.

It reads the adapter tensors straight from the safetensors file, maps diffusers paths with ComfyUI's own
`unet_to_diffusers`, recomputes V on the identifier rows with the merged weight W + scale·B·A (taking W from the
live module, so weight LoRAs are included), and runs attention with an explicit softmax. It computes in float32, or
in float64 when the model runs in float64 (`build_tiny_model(..., dtype=torch.float64)`), so that a comparison with
the pack is not limited by float32 rounding.
"""

from __future__ import annotations

import math

import torch
from safetensors import safe_open


def adapter_tensors_by_module(path, model_patcher) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{ldm module path of attn2: (A, B)} read from a native or official file."""
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(model_patcher.model.model_config.unet_config)
    out: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as handle:
        for key in handle.keys():
            body = key.split(".", 1)[1]  # drop "tova." / "unet."
            layer = body.split(".attn2.to_v.")[0]
            part = "A" if key.endswith("lora_A.weight") else "B"
            ldm = mapping[f"{layer}.attn2.to_v.weight"][: -len(".to_v.weight")]
            out.setdefault(ldm, {})[part] = handle.get_tensor(key).float()
    return {k: (v["A"], v["B"]) for k, v in out.items()}


def module_path_of(extra_options) -> str:
    name, number = extra_options["block"]
    depth = extra_options.get("block_index", 0)
    head = "middle_block" if name == "middle" else f"{name}_blocks.{number}"
    return f"{head}.1.transformer_blocks.{depth}.attn2"


class ReferenceToVA:
    """attn2_patch + attn2 replace that apply [(file, position, scale), ...] the slow, obvious way."""

    def __init__(self, model_patcher, concepts, apply_to_uncond=True):
        self.modules = dict(model_patcher.model.diffusion_model.named_modules())
        self.concepts = [
            (adapter_tensors_by_module(path, model_patcher), position, scale) for path, position, scale in concepts
        ]
        self.apply_to_uncond = apply_to_uncond

    def __deepcopy__(self, memo):
        return self

    def stash(self, n, context, value, extra_options):
        extra_options["reference_context"] = context
        return n, context, value

    def __call__(self, q, k, v, extra_options):
        name = module_path_of(extra_options)
        compute = compute_dtype(v)
        weight = self.modules[name].to_v.weight.to(compute)  # (C, d), possibly LoRA-patched
        context = extra_options["reference_context"].to(compute)  # (B, T, d)
        chunks = extra_options["cond_or_uncond"]
        per = v.shape[0] // len(chunks)
        v = v.clone()
        for tensors, position, scale in self.concepts:
            lora_a, lora_b = (t.to(compute) for t in tensors[name])
            merged = weight + scale * lora_b @ lora_a  # W + λ·B·A
            for i, chunk in enumerate(chunks):
                if chunk == 1 and not self.apply_to_uncond:
                    continue
                for row in range(i * per, (i + 1) * per):
                    for p in range(position, v.shape[1], 77):  # LCM copies of a one-window prompt
                        v[row, p] = torch.nn.functional.linear(context[row, p], merged).to(v.dtype)
        return explicit_attention(q, k, v, extra_options["n_heads"])

    def install(self, model_patcher):
        m = model_patcher.clone()
        m.set_model_attn2_patch(self.stash)
        for name in self.modules:
            if name.endswith(".attn2") and ".transformer_blocks." in name:
                parts = name.split(".")
                block = ("middle", 0) if parts[0] == "middle_block" else (parts[0][:-7], int(parts[1]))
                depth = int(parts[parts.index("transformer_blocks") + 1])
                m.set_model_attn2_replace(self, block[0], block[1], depth)
        return m


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for float16/bfloat16/float32 inputs, float64 for float64 ones."""
    return torch.promote_types(tensor.dtype, torch.float32)


def explicit_attention(q, k, v, heads):
    """softmax(q kᵀ / √D) v per head, in float32 or float64 (see `compute_dtype`); (B, N, H·D) x (B, T, H·D) ->
    (B, N, H·D)."""
    b, n, inner = q.shape
    d = inner // heads
    compute = compute_dtype(q)
    qh = q.to(compute).reshape(b, n, heads, d).transpose(1, 2)  # (B, H, N, D)
    kh = k.to(compute).reshape(b, -1, heads, d).transpose(1, 2)  # (B, H, T, D)
    vh = v.to(compute).reshape(b, -1, heads, d).transpose(1, 2)  # (B, H, T, D)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (B, H, N, T)
    return (probs @ vh).transpose(1, 2).reshape(b, n, inner).to(q.dtype)


class ValueSpy:
    """A foreign attn2 replace (as IPAdapter installs): records q, k, v, context and the chunk layout, then attends."""

    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):
        return self

    def stash(self, n, context, value, extra_options):
        extra_options["spy_context"] = context
        return n, context, value

    def __call__(self, q, k, v, extra_options):
        self.calls.append(
            (
                module_path_of(extra_options),
                v.clone(),
                extra_options["spy_context"].clone(),
                list(extra_options["cond_or_uncond"]),
            )
        )
        return explicit_attention(q, k, v, extra_options["n_heads"])


def spy_model(model):
    """A clone with the ValueSpy as a foreign attn2 replace on every block (ToVA will wrap it)."""
    spy = ValueSpy()
    spied = model.clone()
    spied.set_model_attn2_patch(spy.stash)
    for name in dict(model.model.diffusion_model.named_modules()):
        if name.endswith(".attn2"):
            parts = name.split(".")
            block = ("middle", 0) if parts[0] == "middle_block" else (parts[0][:-7], int(parts[1]))
            spied.set_model_attn2_replace(spy, block[0], block[1], 0)
    return spy, spied
