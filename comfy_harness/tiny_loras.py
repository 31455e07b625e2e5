"""Random ordinary LoRA files for the tiny test models, in formats ComfyUI's Load LoRA reads, with each layer's ΔW
computed here by hand (float64) as the independent reference for bound-LoRA tests and the bench.

Formats: kohya LoRA (`lora_unet_<diffusers path>.lora_down/lora_up/alpha`, also on the resnets' 3×3 convs, LoCon
style), LyCORIS LoHa (`hada_w1_a/w1_b/w2_a/w2_b`) and LoKr (`lokr_w1/lokr_w2`) on the transformer linear layers.

DiT files (`write_tiny_dit_lora`, tiny Flux.1, Flux.2, Qwen-Image and Z-Image of comfy_harness.tiny_dit_models) use the
key names real trainers write and ComfyUI maps (comfy.lora.model_lora_keys_unet): kohya `lora_unet_<ldm path>`,
diffusers/PEFT `transformer.<diffusers path>.lora_A/lora_B`, SimpleTuner LyCORIS `lycoris_<diffusers path>`, and for
Qwen-Image the bare `<path>.lora_A/lora_B` of its official LoRAs. A diffusers Flux LoRA's to_q/to_k/to_v are rows of
ComfyUI's fused qkv (and linear1) weights: the table below says which rows, written here by hand, not read from ComfyUI.
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


# --- DiT LoRA files ---------------------------------------------------------------------------------------------

DIT_NAMINGS = {
    "flux": ("kohya", "diffusers", "lycoris"),
    "flux2": ("kohya", "diffusers", "lycoris"),
    "qwenimage": ("kohya", "diffusers", "lycoris", "plain"),
    "zimage": ("kohya", "diffusers", "lycoris"),
}


def _flux_targets(dm, naming: str, flux2: bool = False) -> list[tuple[str, str, slice | None]]:
    """(LoRA module name, ldm module path, output rows or None = all) of a tiny Flux.1 LoRA in `naming`; with
    `flux2` a Flux.2 klein one: no per-block modulation (img_mod / txt_mod / modulation: Flux.2 shares
    double_stream_modulation_img/txt and single_stream_modulation, which only kohya's ldm names reach), and the
    single blocks' fused diffusers names of real klein LoRAs (attn.to_qkv_mlp_proj = all of linear1, attn.to_out)."""
    hidden = int(dm.hidden_size)
    q, k, v = slice(0, hidden), slice(hidden, 2 * hidden), slice(2 * hidden, 3 * hidden)
    rows = []  # (diffusers name, ldm path, rows)
    for i in range(len(dm.double_blocks)):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        rows += [
            (f"{d}.attn.to_q", f"{b}.img_attn.qkv", q),
            (f"{d}.attn.to_k", f"{b}.img_attn.qkv", k),
            (f"{d}.attn.to_v", f"{b}.img_attn.qkv", v),
            (f"{d}.attn.add_q_proj", f"{b}.txt_attn.qkv", q),
            (f"{d}.attn.add_k_proj", f"{b}.txt_attn.qkv", k),
            (f"{d}.attn.add_v_proj", f"{b}.txt_attn.qkv", v),
            (f"{d}.attn.to_out.0", f"{b}.img_attn.proj", None),
            (f"{d}.attn.to_add_out", f"{b}.txt_attn.proj", None),
            (f"{d}.ff.net.0.proj", f"{b}.img_mlp.0", None),
            (f"{d}.ff.net.2", f"{b}.img_mlp.2", None),
            (f"{d}.ff_context.net.0.proj", f"{b}.txt_mlp.0", None),
            (f"{d}.ff_context.net.2", f"{b}.txt_mlp.2", None),
        ]
        if not flux2:
            rows += [
                (f"{d}.norm1.linear", f"{b}.img_mod.lin", None),
                (f"{d}.norm1_context.linear", f"{b}.txt_mod.lin", None),
            ]
    for i in range(len(dm.single_blocks)):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        if flux2:
            rows += [(f"{d}.attn.to_qkv_mlp_proj", f"{b}.linear1", None), (f"{d}.attn.to_out", f"{b}.linear2", None)]
            continue
        # (proj_mlp, rows 3h.. of linear1, is left out: ComfyUI maps it as 4h rows, Flux.1's mlp_ratio 4, and the
        # tiny model's ratio is 2)
        rows += [
            (f"{d}.attn.to_q", f"{b}.linear1", q),
            (f"{d}.attn.to_k", f"{b}.linear1", k),
            (f"{d}.attn.to_v", f"{b}.linear1", v),
            (f"{d}.proj_out", f"{b}.linear2", None),
            (f"{d}.norm.linear", f"{b}.modulation.lin", None),
        ]
    rows += [
        ("x_embedder", "img_in", None),
        ("context_embedder", "txt_in", None),
        ("proj_out", "final_layer.linear", None),
        ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer", None),
    ]
    if naming == "kohya":  # kohya names the ldm modules, whole fused weights
        paths = sorted({path for _, path, _ in rows})
        if flux2:  # the shared modulation layers (global)
            paths += [
                "double_stream_modulation_img.lin",
                "double_stream_modulation_txt.lin",
                "single_stream_modulation.lin",
            ]
        return [(f"lora_unet_{path.replace('.', '_')}", path, None) for path in paths]
    prefix = {"diffusers": "transformer.", "lycoris": "lycoris_"}[naming]
    return [(_named(prefix, name, naming), path, part) for name, path, part in rows]


def _qwen_targets(dm, naming: str) -> list[tuple[str, str, slice | None]]:
    """(LoRA module name, ldm module path, None) of a tiny Qwen-Image LoRA in `naming` (ldm = diffusers paths)."""
    paths = ["img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1"]
    for i in range(len(dm.transformer_blocks)):
        b = f"transformer_blocks.{i}"
        paths += [
            f"{b}.attn.{name}"
            for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
        ]
        paths += [f"{b}.{mlp}.net.{part}" for mlp in ("img_mlp", "txt_mlp") for part in ("0.proj", "2")]
        paths += [f"{b}.img_mod.1", f"{b}.txt_mod.1"]
    prefix = {"kohya": "lora_unet_", "diffusers": "transformer.", "lycoris": "lycoris_", "plain": ""}[naming]
    return [(_named(prefix, path, naming), path, None) for path in sorted(paths)]


def _zimage_targets(dm, naming: str) -> list[tuple[str, str, slice | None]]:
    """(LoRA module name, ldm module path, output rows or None = all) of a tiny Z-Image LoRA in `naming`: kohya
    `lora_unet_<ldm path>` (fused attention.qkv), diffusers `diffusion_model.<diffusers path>` as ai-toolkit /
    musubi-tuner write them (attention.to_q/to_k/to_v: rows of ComfyUI's fused qkv; to_out.0 = attention.out;
    all_x_embedder.2-1 / all_final_layer.2-1.linear), SimpleTuner LyCORIS `lycoris_<diffusers path>`."""
    dim = int(dm.dim)
    q, k, v = slice(0, dim), slice(dim, 2 * dim), slice(2 * dim, 3 * dim)
    blocks = [
        f"{stack}.{i}"
        for stack in ("context_refiner", "noise_refiner", "layers")
        for i in range(len(getattr(dm, stack)))
    ]
    if naming == "kohya":
        paths = [
            "x_embedder",
            "cap_embedder.1",
            "final_layer.linear",
            "t_embedder.mlp.0",
            "final_layer.adaLN_modulation.1",
        ]
        for b in blocks:
            paths += [f"{b}.attention.qkv", f"{b}.attention.out"] + [f"{b}.feed_forward.w{n}" for n in (1, 2, 3)]
            paths += [f"{b}.adaLN_modulation.1"] if not b.startswith("context_refiner") else []
        return [(f"lora_unet_{path.replace('.', '_')}", path, None) for path in sorted(paths)]
    rows = [
        ("all_x_embedder.2-1", "x_embedder", None),
        ("cap_embedder.1", "cap_embedder.1", None),
        ("all_final_layer.2-1.linear", "final_layer.linear", None),
        ("t_embedder.mlp.0", "t_embedder.mlp.0", None),
    ]
    for b in blocks:
        rows += [(f"{b}.attention.to_q", f"{b}.attention.qkv", q), (f"{b}.attention.to_k", f"{b}.attention.qkv", k)]
        rows += [
            (f"{b}.attention.to_v", f"{b}.attention.qkv", v),
            (f"{b}.attention.to_out.0", f"{b}.attention.out", None),
        ]
        rows += [(f"{b}.feed_forward.w{n}", f"{b}.feed_forward.w{n}", None) for n in (1, 2, 3)]
    prefix = {"diffusers": "diffusion_model.", "lycoris": "lycoris_"}[naming]
    return [(_named(prefix, name, naming), path, part) for name, path, part in rows]


def _named(prefix: str, name: str, naming: str) -> str:
    return prefix + (name.replace(".", "_") if naming in ("kohya", "lycoris") else name)


def write_tiny_dit_lora(
    path: Path | str,
    model_patcher,
    family: str,
    seed: int,
    naming: str = "kohya",
    kind: str = "lora",
    rank: int = 4,
    magnitude: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Write a random LoRA for a tiny DiT (`family` "flux", "flux2", "qwenimage" or "zimage") with `naming`'s key names
    (DIT_NAMINGS) and adapter `kind` (FORMATS); return {ldm module path: ΔW (float64, strength 1, the weight's full
    shape)}: a patch on some output rows of a fused weight is ΔW on those rows and 0 on the others, patches on one
    weight add.

    diffusers/plain names carry PEFT's lora_A/lora_B (no alpha: scale 1); kohya/lycoris ones lora_down/lora_up/alpha.
    """
    dm = model_patcher.model.diffusion_model
    targets = {
        "flux": lambda: _flux_targets(dm, naming),
        "flux2": lambda: _flux_targets(dm, naming, flux2=True),
        "qwenimage": lambda: _qwen_targets(dm, naming),
        "zimage": lambda: _zimage_targets(dm, naming),
    }[family]()
    g = torch.Generator().manual_seed(seed)
    state, deltas = {}, {}
    peft = naming in ("diffusers", "plain")
    for name, module_path, rows in targets:
        weight = dm.get_submodule(module_path).weight
        out_features = weight.shape[0] if rows is None else rows.stop - rows.start
        in_features = weight.shape[1]
        scale = magnitude / in_features**0.5
        if kind == "lora":
            down = torch.randn(rank, in_features, generator=g) * scale  # (r, in)
            up = torch.randn(out_features, rank, generator=g)  # (out, r)
            if peft:
                state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up
                delta = up.double() @ down.double()
            else:
                alpha = rank / 2
                state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
                state[f"{name}.alpha"] = torch.tensor(float(alpha))
                delta = (alpha / rank) * (up.double() @ down.double())
        elif kind == "loha":
            w1a, w1b = torch.randn(out_features, rank, generator=g), torch.randn(rank, in_features, generator=g) * scale
            w2a, w2b = torch.randn(out_features, rank, generator=g), torch.randn(rank, in_features, generator=g) * scale
            for key, value in (("hada_w1_a", w1a), ("hada_w1_b", w1b), ("hada_w2_a", w2a), ("hada_w2_b", w2b)):
                state[f"{name}.{key}"] = value
            state[f"{name}.alpha"] = torch.tensor(float(rank))
            delta = (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double())  # alpha / rank = 1
        elif kind == "lokr":
            w1 = torch.randn(2, 2, generator=g)
            w2 = torch.randn(out_features // 2, in_features // 2, generator=g) * scale
            state[f"{name}.lokr_w1"], state[f"{name}.lokr_w2"] = w1, w2
            delta = torch.kron(w1.double(), w2.double())  # full factors: no alpha scaling (ComfyUI's rule)
        else:
            raise ValueError(f"unknown LoRA kind {kind!r}; expected one of {FORMATS}")
        full = deltas.setdefault(module_path, torch.zeros(tuple(weight.shape), dtype=torch.float64))
        full[slice(None) if rows is None else rows] += delta
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return deltas
