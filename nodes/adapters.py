"""ToVA nodes: "Load ToVA Adapter" and "Apply ToVA to Model" (ConceptSplit, ICCV 2025, §3.1 ToVA).

ToVA adds each concept's LoRA delta on the cross-attention value projection, only at the row of that concept's
identifier token, so several personal concepts share one prompt without mixing.
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..conceptsplit_core import config
from ..conceptsplit_core.adapter_file import read_adapter_file
from ..conceptsplit_core.concepts import make_concept, plan_tova
from ..conceptsplit_core.errors import ConceptSplitError
from . import comfy_text
from .families import tova_family
from .input_checks import check_number_inputs
from .sockets import ConceptAdapters
from .widgets import number_input

ADAPTER_FOLDERS = config.ADAPTER_FOLDERS  # ToVA files belong in models/tova; models/loras is searched too


def adapter_file_names() -> list[str]:
    names: list[str] = []
    for folder in ADAPTER_FOLDERS:
        names.extend(n for n in folder_paths.get_filename_list(folder) if n not in names)
    return names


def adapter_file_path(name: str) -> str:
    for folder in ADAPTER_FOLDERS:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise ConceptSplitError.build(
        f'Adapter file "{name}" was not found',
        seen="no such file in models/tova or models/loras",
        expected="a .safetensors ToVA adapter in ComfyUI/models/tova",
        fix='copy the file there and press "Refresh" (R) in the UI',
    )


class LoadToVAAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptSplitLoadAdapter",
            display_name="Load ToVA Adapter",
            category="ConceptSplit",
            description="Load one concept's ToVA adapter (token-wise value LoRA) and add it to a list of adapters. "
            "ConceptSplit, Lim et al., ICCV 2025.",
            inputs=[
                io.Combo.Input(
                    "adapter_name",
                    options=adapter_file_names(),
                    tooltip="ToVA adapter file from ComfyUI/models/tova (also searched: models/loras). "
                    "Native .safetensors from this pack or official KU-VGI/ConceptSplit "
                    "checkpoints. Regular LoRAs are refused: use Load LoRA for them.",
                ),
                io.String.Input(
                    "identifier_word",
                    default="",
                    tooltip="The plain class word the adapter was trained on (e.g. dog). It must appear "
                    "in the prompt; its first token gets the delta. Empty = the word stored in "
                    "the file (official checkpoints store none, so type it).",
                ),
                number_input(
                    "strength",
                    config.TOVA_DEFAULTS.strength,
                    config.UI_RANGES["strength"],
                    "Multiplier on the adapter delta (λ); 0 turns the concept off.",
                ),
                io.Combo.Input(
                    "role",
                    options=[config.ROLE_FROM_FILE, *config.ROLES],
                    default=config.ROLE_FROM_FILE,
                    tooltip="object: ToVA + LODA separation and attention fixing. background (a place, "
                    "a style): ToVA only, never separated. 'from file' uses the adapter's "
                    "metadata (object for official checkpoints).",
                ),
                number_input(
                    "token_index",
                    config.TOKEN_INDEX_AUTO,
                    config.UI_RANGES["token_index"],
                    "-1 (default): find the identifier word in the prompt. Otherwise the token position to "
                    "adapt, counted with the start token at 0 and 77 per window.",
                    integer=True,
                    step=False,
                    optional=True,
                ),
                ConceptAdapters.Input(
                    "adapters", optional=True, tooltip="Adapters loaded so far; this node appends its adapter to them."
                ),
            ],
            outputs=[
                ConceptAdapters.Output(
                    display_name="adapters",
                    tooltip="The adapter list, in concept order. Connect to Apply ToVA "
                    "to Model or to another Load ToVA Adapter.",
                )
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, adapter_name, **kwargs):
        path = next(
            filter(None, (folder_paths.get_full_path(folder, adapter_name) for folder in ADAPTER_FOLDERS)), None
        )
        return os.path.getmtime(path) if path else None

    @classmethod
    def execute(
        cls,
        adapter_name: str,
        identifier_word: str,
        strength: float,
        role: str,
        token_index: int = config.TOKEN_INDEX_AUTO,
        adapters=None,
    ) -> io.NodeOutput:
        check_number_inputs(cls, {"strength": strength, "token_index": token_index})
        weights = read_adapter_file(adapter_file_path(adapter_name))
        concept = make_concept(weights, identifier_word, strength, role, token_index)
        return io.NodeOutput(tuple(adapters or ()) + (concept,))


class ApplyToVA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptSplitApplyToVA",
            display_name="Apply ToVA to Model",
            category="ConceptSplit",
            description="Patch the model so each adapter changes only its identifier token's value rows in "
            "cross-attention (ToVA). ConceptSplit, Lim et al., ICCV 2025.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.5, SD2.1 or SDXL model. It is cloned; the input is untouched."),
                ConceptAdapters.Input("adapters", tooltip="Adapters from Load ToVA Adapter, in concept order."),
                io.Clip.Input(
                    "clip",
                    tooltip="The CLIP of the same checkpoint, used to find each identifier word's "
                    "token position exactly as ComfyUI tokenizes the prompt.",
                ),
                io.String.Input(
                    "text",
                    multiline=True,
                    dynamic_prompts=True,
                    tooltip="The positive prompt, containing every identifier word (e.g. 'a dog and a "
                    "cat on a sofa'). The CONDITIONING output encodes this same text.",
                ),
                io.Boolean.Input(
                    "apply_to_uncond",
                    default=config.TOVA_DEFAULTS.apply_to_uncond,
                    optional=True,
                    tooltip="Also add the delta at the same token positions of the negative branch, as "
                    "the paper's code does (default on). Turn off with long negative prompts.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The patched model clone."),
                io.Conditioning.Output(
                    display_name="positive",
                    tooltip="The text encoded with CLIP (same as CLIPTextEncode): use it as the "
                    "positive prompt so token positions match.",
                ),
                io.String.Output(display_name="info", tooltip="Where each identifier word was found."),
            ],
        )

    @classmethod
    def execute(cls, model, adapters, clip, text: str, apply_to_uncond: bool = True) -> io.NodeOutput:
        family = tova_family(model)
        layout = family.layout(model)
        prompt = family.prompt_tokens(clip, text)
        plan = plan_tova(
            tuple(adapters or ()),
            layout,
            prompt,
            lambda word: family.word_token_ids(clip, word),
            family.value_weight_norms(model, layout),
        )
        positive = comfy_text.encode_prompt(clip, text, layout)
        patched = model.clone()
        family.install_tova(patched, layout, plan.deltas, apply_to_uncond, prompt, plan.label, positive, plan.located)
        return io.NodeOutput(patched, positive, plan.info)
