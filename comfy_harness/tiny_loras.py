"""Random ordinary LoRA files for the tiny test models, in formats ComfyUI's Load LoRA reads, with each layer's ΔW
computed here by hand (float64) as the independent reference for bound-LoRA tests and the bench.

Formats: kohya LoRA (`lora_unet_<diffusers path>.lora_down/lora_up/alpha`, also on the resnets' 3×3 convs, LoCon
style), LyCORIS LoHa (`hada_w1_a/w1_b/w2_a/w2_b`) and LoKr (`lokr_w1/lokr_w2`) on the transformer linear layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

FORMATS = ("lora", "loha", "lokr")
LINEAR_PARTS = (
    ".attn1.to_q.",
    ".attn1.to_k.",
    ".attn1.to_v.",
    ".attn1.to_out.0.",
    ".attn2.to_q.",
    ".attn2.to_k.",
    ".attn2.to_v.",
    ".attn2.to_out.0.",
    ".ff.net.0.proj.",
    ".ff.net.2.",
    ".proj_in.",
    ".proj_out.",
)
CONV_PARTS = (".conv1.", ".conv2.")


def _targets(model_patcher, kind: str):
    """(kohya name, ldm module path, weight) for the layers a LoRA of `kind` patches, sorted."""
    import comfy.utils

    base = model_patcher.model
    weights = dict(base.diffusion_model.named_parameters())
    found = []
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(base.model_config.unet_config).items():
        if not diffusers_key.endswith(".weight"):
            continue
        name = diffusers_key[: -len(".weight")]
        dotted = f".{name}."
        linear = any(part in dotted for part in LINEAR_PARTS) and "transformer_blocks" in dotted
        conv = any(part in dotted for part in CONV_PARTS) and "resnets" in dotted
        projection = any(part in dotted for part in (".proj_in.", ".proj_out."))
        if not (linear or projection or (conv and kind == "lora")):
            continue
        weight = weights[ldm_key]
        if kind != "lora" and weight.dim() != 2:  # LoHa/LoKr here: linear layers only
            continue
        found.append((f"lora_unet_{name.replace('.', '_')}", ldm_key[: -len(".weight")], weight))
    return sorted(found)


def write_tiny_lora(
    path: Path | str,
    model_patcher,
    seed: int,
    kind: str = "lora",
    rank: int = 4,
    magnitude: float = 1.0,
    extra: dict | None = None,
    compute_deltas: bool = True,
) -> dict[str, torch.Tensor]:
    """Write a random LoRA of `kind` for this tiny model; return {ldm module path: ΔW (float64, strength 1)}.

    `extra` tensors are added to the file as they are (e.g. text-encoder keys). ΔW has the weight's shape. With
    `compute_deltas=False` no ΔW is computed and {} is returned (a full-size model's float64 ΔWs would not fit in
    memory).
    """
    g = torch.Generator().manual_seed(seed)
    state, deltas = {}, {}
    for name, module_path, weight in _targets(model_patcher, kind):
        out_features = weight.shape[0]
        in_features = weight[0].numel()
        scale = magnitude / in_features**0.5
        if kind == "lora":
            down = torch.randn(rank, *weight.shape[1:], generator=g) * scale  # (r, in[, kh, kw])
            up_shape = (out_features, rank) + (1, 1) * (weight.dim() == 4)
            up = torch.randn(up_shape, generator=g)
            alpha = rank / 2
            state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
            state[f"{name}.alpha"] = torch.tensor(float(alpha))
            delta = lambda: (alpha / rank) * (up.double().flatten(1) @ down.double().flatten(1))  # noqa: E731
        elif kind == "loha":
            w1a, w1b = torch.randn(out_features, rank, generator=g), torch.randn(rank, in_features, generator=g)
            w2a, w2b = torch.randn(out_features, rank, generator=g), torch.randn(rank, in_features, generator=g)
            w1b, w2b = w1b * scale, w2b * scale
            alpha = float(rank)
            for key, value in (("hada_w1_a", w1a), ("hada_w1_b", w1b), ("hada_w2_a", w2a), ("hada_w2_b", w2b)):
                state[f"{name}.{key}"] = value
            state[f"{name}.alpha"] = torch.tensor(alpha)
            delta = lambda: (alpha / rank) * (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double())  # noqa: E731
        elif kind == "lokr":
            w1 = torch.randn(2, 2, generator=g)
            w2 = torch.randn(out_features // 2, in_features // 2, generator=g) * scale
            state[f"{name}.lokr_w1"], state[f"{name}.lokr_w2"] = w1, w2
            delta = lambda: torch.kron(w1.double(), w2.double())  # noqa: E731  (full factors: no alpha scaling)
        else:
            raise ValueError(f"unknown LoRA kind {kind!r}; expected one of {FORMATS}")
        if compute_deltas:
            deltas[module_path] = delta().reshape(weight.shape)
    state.update(extra or {})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return deltas
