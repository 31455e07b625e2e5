"""Seam, part 4: autograd inside ComfyUI's inference-mode sampling (comfyui-notes §4.2), for LODA's stage-1 pass and
ToVA training. Both helpers change the shared UNet module for one `with` block only and restore it on exit, also
after an interrupt or an error, so no other node ever sees the change.

- `AutogradWeights`: the executor loads weights under `torch.inference_mode()`, and autograd refuses to save an
  inference tensor for backward. Instead of copying the weights (notes §4.2 fix (a)), every inference parameter and
  buffer is swapped for a normal tensor that *views the same storage*: no copy, no extra memory, bit-identical values.
- `GradientCheckpointing`: ResBlock / SpatialTransformer forwards wrapped in non-reentrant torch.utils.checkpoint,
  so backward recomputes their activations instead of keeping them.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.utils.checkpoint

from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

UNetBlock = tuple  # ("input", 7) / ("middle", 0) / ("output", 5): a ComfyUI UNet block, a replace key without depth


class AutogradWeights:
    """Context manager: inference-tensor parameters and buffers of `modules` become autograd-usable views of the
    same memory inside the block; the original tensor objects are put back on exit.

    Enter it after ComfyUI has loaded (and LoRA-patched) the model, i.e. inside sampling: a weight patched later
    would be an inference tensor again. `count` is the number of tensors swapped.
    """

    def __init__(self, modules: Iterable[torch.nn.Module]):
        self.modules = list(modules)
        # (module._parameters or _buffers, name, original, the view put there)
        self.swapped: list[tuple[dict, str, torch.Tensor, torch.Tensor]] = []

    @property
    def count(self) -> int:
        return len(self.swapped)

    def __enter__(self) -> "AutogradWeights":
        try:
            with torch.inference_mode(False):  # a view made under inference mode would be an inference tensor again
                seen: set[int] = set()
                for root in self.modules:
                    for module in root.modules():
                        if id(module) in seen:
                            continue
                        seen.add(id(module))
                        self._swap(module._parameters, parameter=True)
                        self._swap(module._buffers, parameter=False)
        except BaseException:  # e.g. out of memory copying a tensor subclass: put back what was swapped so far
            self.__exit__()
            raise
        return self

    def _swap(self, tensors: dict, parameter: bool) -> None:
        for name, tensor in list(tensors.items()):
            if tensor is None or not tensor.is_inference():
                continue
            view = _normal_view(tensor)
            if parameter:
                view = torch.nn.Parameter(view, requires_grad=False)
            tensors[name] = view
            self.swapped.append((tensors, name, tensor, view))

    def __exit__(self, *exc) -> None:
        for tensors, name, original, view in reversed(self.swapped):
            if tensors.get(name) is view:  # ComfyUI may have (re)loaded a weight meanwhile: keep its new one
                tensors[name] = original
        self.swapped.clear()


def _normal_view(tensor: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor over the storage of the inference tensor `tensor`: same values, no copy.

    Tensor subclasses (quantised or GGUF weights of other packs) keep their type only through a copy, made per
    stage-1 step and freed after it (time, and a transient second copy of those weights).
    """
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return tensor.detach().clone()
    view = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return view.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def unet_and_control_modules(model_patcher, conds=None) -> list[torch.nn.Module]:
    """The UNet of `model_patcher` and every ControlNet (or ControlLoRA) in the conds' control chains, each once:
    the modules a gradient w.r.t. the latent runs through. T2I adapters are left out: their output depends on the
    hint only, never on the latent."""
    found: dict[int, torch.nn.Module] = {id(model_patcher.model.diffusion_model): model_patcher.model.diffusion_model}
    for entry in conds or ():
        control = entry.get("control")
        while control is not None:
            module = getattr(control, "control_model", None)
            if isinstance(module, torch.nn.Module):
                found.setdefault(id(module), module)
            control = getattr(control, "previous_controlnet", None)
    return list(found.values())


class GradientCheckpointing:
    """Context manager: wrap the ResBlock and SpatialTransformer forwards of `diffusion_model` in
    torch.utils.checkpoint (non-reentrant) inside the block; restored on exit (as comfy_extras/nodes_train.py
    patches and unpatches). Gradients are unchanged (tested to 1e-6).

    Args:
        enabled: False makes this a no-op, so callers need no branch.
        keep_blocks: UNet blocks whose SpatialTransformer stays un-checkpointed. LODA keeps its loss layers there:
            their attention observers record maps and end the pass, which a recompute in backward must not repeat.
    """

    def __init__(self, diffusion_model: torch.nn.Module, enabled: bool, keep_blocks: Iterable[UNetBlock] = ()):
        kept = {id(m) for block in keep_blocks for m in _block_module(diffusion_model, block).modules()
                if isinstance(m, SpatialTransformer)}
        self.modules = ([m for m in diffusion_model.modules()
                         if isinstance(m, (ResBlock, SpatialTransformer)) and id(m) not in kept]
                        if enabled else [])
        self.saved: list[tuple[torch.nn.Module, object]] = []

    def __enter__(self) -> "GradientCheckpointing":
        for module in self.modules:
            self.saved.append((module, module.__dict__.get("forward")))  # an instance override, if any
            module.forward = _checkpointed(module.forward)
        return self

    def __exit__(self, *exc) -> None:
        for module, own in reversed(self.saved):
            if own is None:
                del module.forward
            else:
                module.forward = own
        self.saved.clear()


def _block_module(diffusion_model: torch.nn.Module, block: UNetBlock) -> torch.nn.Module:
    name, index = block[0], block[1]
    if name == "middle":
        return diffusion_model.middle_block
    return (diffusion_model.input_blocks if name == "input" else diffusion_model.output_blocks)[index]


def _checkpointed(forward):
    def checkpointed_forward(*args, **kwargs):
        # ComfyUI mutates transformer_options in place as the UNet runs ("block", "block_index"): the recompute in
        # backward must see the values of this call, so each dict argument is copied now (shallow).
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return checkpointed_forward
