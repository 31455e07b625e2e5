"""Shared benchmark helpers: a full-size SD2.1-architecture UNet with random weights, timing and peak memory.

Every benchmark compares against plain ComfyUI sampling in the same process and reports ratios, never absolute
goals on their own. Run from the repo root with COMFYUI_PATH set, e.g. `python -m bench.bench_tova`.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# ComfyUI's own SD2.1 (768-v) UNet config, comfy/model_detection.py `SD21`.
SD21_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": 1024,
    "num_head_channels": 64,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def bootstrap():
    """Import ComfyUI from COMFYUI_PATH and load the pack through ComfyUI's loader; returns the pack module."""
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    from comfy_harness.comfy_bootstrap import bootstrap_comfyui, comfyui_path, load_pack_in_process

    path = comfyui_path()
    if path is None:
        raise SystemExit("Set COMFYUI_PATH to a ComfyUI 0.3.64 checkout (scripts/test.sh prints one).")
    bootstrap_comfyui(path)
    return load_pack_in_process()


def build_full_sd21(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ModelPatcher for the full SD2.1-768-v UNet (865 M parameters) with seeded random weights."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD20(dict(SD21_UNET_CONFIG))
    config.set_inference_dtype(dtype, None)
    base = comfy.model_base.BaseModel(
        config, model_type=comfy.model_base.ModelType.V_PREDICTION, device=mm.get_torch_device()
    )
    from comfy_harness.tiny_models import seeded_value

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in base.diffusion_model.named_parameters():
            param.copy_(seeded_value(name, param.shape, generator).to(param.dtype))
    return comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def random_conditioning(width: int = 1024, tokens: int = 77, seed: int = 1):
    """CONDITIONING [[(1, T, d), {}]] with unit-variance random text features."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, width, generator=generator), {}]]


def ksample(model, positive, negative, steps: int, size: int, seed: int = 0, sampler: str = "euler"):
    """KSampler as the node runs it, under inference mode; returns the latent (B, 4, size/8, size/8)."""
    import nodes

    with torch.inference_mode():
        latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
        return nodes.common_ksampler(
            model, seed, steps, 7.5, sampler, "normal", positive, negative, latent, disable_noise=False
        )[0]["samples"]


def _reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # hand the heap's free pages back first, so the RSS (and the peak from here) counts what is held
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as handle:  # resets VmHWM (Linux)
            handle.write("5")


def _peak_bytes() -> int:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (Linux, reported in kB) in bytes: VmHWM (peak RSS) or VmRSS."""
    with open(f"/proc/{os.getpid()}/status") as handle:
        line = next(line for line in handle if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def held_bytes() -> int:
    """Bytes the process's tensors hold right now: CUDA allocated memory, or on CPU glibc's in-use heap plus its
    mmapped blocks (mallinfo2), which, unlike the peak RSS, falls when tensors are freed. Used to compare what a pass
    keeps for backward; 0 where neither is available."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return 0
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def current_bytes() -> int:
    """What the process holds now, on the scale of the peak `measured` records: CUDA allocated memory, or the RSS."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return _proc_status_bytes("VmRSS")


@contextmanager
def measured(results: dict, name: str):
    """Record wall time and peak memory (CUDA allocated, or process peak RSS on CPU) of the block under `name`, and
    what the process held when it started ("start": peak − start is the block's working memory)."""
    _reset_peak()
    held = current_bytes()
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    results.setdefault(name, {"seconds": [], "peak": [], "start": []})
    results[name]["seconds"].append(time.perf_counter() - start)
    results[name]["peak"].append(_peak_bytes())
    results[name]["start"].append(held)


def compare(results: dict, baseline: str, candidate: str) -> dict:
    """Median time ratio and max peak memory ratio of candidate over baseline."""
    base, cand = results[baseline], results[candidate]
    return {
        "baseline_s": statistics.median(base["seconds"]),
        "candidate_s": statistics.median(cand["seconds"]),
        "time_ratio": statistics.median(cand["seconds"]) / statistics.median(base["seconds"]),
        "baseline_peak_mb": max(base["peak"]) / 2**20,
        "candidate_peak_mb": max(cand["peak"]) / 2**20,
        "memory_ratio": max(cand["peak"]) / max(base["peak"]),
    }


def device_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"
