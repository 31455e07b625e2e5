"""Seam, part 4: autograd inside ComfyUI's inference-mode sampling (integration §4.2), for LODA's stage-1 pass and
ToVA training. Both helpers change the shared UNet module for one `with` block only and restore it on exit, also
after an interrupt or an error, so no other node ever sees the change.

- `AutogradWeights`: the executor loads weights under `torch.inference_mode()`, and autograd refuses to save an
  inference tensor for backward. Instead of copying the weights (integration §4.2 fix (a)), every inference parameter
  and
  buffer is swapped for a normal tensor that *views the same storage*: no copy, no extra memory, bit-identical values.
- `GradientCheckpointing`: chosen module forwards (a UNet's ResBlock / SpatialTransformer: the family says which)
  wrapped in non-reentrant torch.utils.checkpoint, so backward recomputes their activations instead of keeping them.
- `FrozenWeights`: a model's parameters frozen for training, its weights as autograd-usable views.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.utils.checkpoint


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


class FrozenWeights:
    """Context manager for training: no parameter of `module` requires grad inside the block (the flags are put
    back on exit), and its inference-tensor weights are autograd-usable views (AutogradWeights), so only the
    trained parameters (the LoRA's) get gradients."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.weights = AutogradWeights([module])
        self.flags: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self) -> "FrozenWeights":
        self.weights.__enter__()
        for param in self.module.parameters():
            self.flags.append((param, param.requires_grad))
            param.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        for param, flag in self.flags:
            param.requires_grad_(flag)
        self.flags.clear()
        self.weights.__exit__(*exc)


class GradientCheckpointing:
    """Context manager: wrap the forwards of `modules` in torch.utils.checkpoint (non-reentrant) inside the block;
    restored on exit (as comfy_extras/nodes_train.py patches and unpatches). Gradients are unchanged (tested to
    1e-6). Which modules of a model may be checkpointed is its family's knowledge (families.unet.checkpoint_modules);
    no modules makes this a no-op, so callers need no branch.
    """

    def __init__(self, modules: Iterable[torch.nn.Module] = ()):
        self.modules = list(modules)
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


def _checkpointed(forward):
    def checkpointed_forward(*args, **kwargs):
        # ComfyUI mutates transformer_options in place as the UNet runs ("block", "block_index"): the recompute in
        # backward must see the values of this call, so each dict argument is copied now (shallow).
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return checkpointed_forward
