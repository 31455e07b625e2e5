"""Bound LoRA nodes: "Bind LoRA to Concept" and "Apply Bound LoRAs" (issue 13).

Each ordinary LoRA acts only on its own subject: on image positions inside that concept's LODA mask, on the
cross-attention keys/values (UNets) or text-token layers (DiTs: Flux.1, Qwen-Image) only on its own token rows; the
model family says which layer is which (ModelFamily.bound_lora_site). See README "Bound LoRAs" and
conceptsplit_core/bound_lora.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import folder_paths
from comfy_api.latest import io

from ..conceptsplit_core.bound_lora import STAGE1_DEFAULT, STAGE1_POLICIES, BoundConcept, check_bound_words
from ..conceptsplit_core.errors import ConceptSplitError
from ..conceptsplit_core.number_checks import check_choice, check_number
from ..conceptsplit_core.prompt_tokens import IdentifierRequest, locate_identifier_positions, locate_words_in_pieces
from ..conceptsplit_core.widgets import WidgetRange
from . import comfy_conditioning, comfy_lora, comfy_text
from .families import FAMILIES, model_family
from .input_checks import check_number_inputs
from .widgets import number_input

BoundLorasType = io.Custom("CONCEPTSPLIT_BOUND_LORAS")  # tuple[LoraBinding, ...]
TEXT_ROWS = "own token rows"
TEXT_OFF = "off"
# The bound LoRA's strength widget: Load LoRA's strength_model range.
BOUND_STRENGTH_RANGE = WidgetRange(-4.0, 4.0, 0.05)


@dataclass(frozen=True)
class LoraBinding:
    """One Bind LoRA to Concept: which file, which word, how strong (read against the model in Apply)."""

    lora_name: str
    word: str
    strength: float


class BindLoraToConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptSplitBindLora",
            display_name="Bind LoRA to Concept",
            category="ConceptSplit",
            description="Bind an ordinary LoRA (kohya, diffusers, PEFT, LyCORIS LoHa/LoKr) to one concept word of "
            "the prompt, so it acts only on that subject (inside its LODA mask).",
            inputs=[
                io.Combo.Input(
                    "lora_name",
                    options=folder_paths.get_filename_list("loras"),
                    tooltip="LoRA file from ComfyUI/models/loras, any format Load LoRA reads.",
                ),
                io.String.Input(
                    "concept_word",
                    default="",
                    tooltip="The subject's class or trigger word as written in the prompt (e.g. dog). "
                    "It must be one of the LODA sampler's concept words.",
                ),
                number_input(
                    "strength",
                    1.0,
                    BOUND_STRENGTH_RANGE,
                    "LoRA strength (as strength_model of Load LoRA); 0 leaves the concept alone.",
                ),
                BoundLorasType.Input(
                    "bound_loras", optional=True, tooltip="Bindings made so far; this node appends its binding."
                ),
            ],
            outputs=[
                BoundLorasType.Output(
                    display_name="bound_loras", tooltip="Connect to Apply Bound LoRAs or another Bind LoRA to Concept."
                )
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        path = folder_paths.get_full_path("loras", lora_name)
        return os.path.getmtime(path) if path else None

    @classmethod
    def execute(cls, lora_name: str, concept_word: str, strength: float, bound_loras=None) -> io.NodeOutput:
        check_number_inputs(cls, {"strength": strength})
        comfy_lora.lora_file_path(lora_name)  # a missing file is reported here already
        bindings = tuple(bound_loras or ()) + (LoraBinding(lora_name, concept_word.strip(), float(strength)),)
        check_bound_words([b.word for b in bindings])
        return io.NodeOutput(bindings)


class ApplyBoundLoras(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptSplitApplyBoundLoras",
            display_name="Apply Bound LoRAs",
            category="ConceptSplit",
            description="Patch the model (a clone) so each bound LoRA acts only inside its concept's LODA mask, "
            "unmerged, in one model pass per step. Sample it with the LODA Sampler.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="SD1.5, SD2.x, SDXL, Flux.1 or Qwen-Image model (fine-tunes too). Cloned, never changed.",
                ),
                BoundLorasType.Input("bound_loras", tooltip="Bindings from Bind LoRA to Concept."),
                io.Conditioning.Input(
                    "positive",
                    tooltip="The positive prompt from ConceptSplit Text Encode or Apply ToVA (the "
                    "one the sampler gets), holding every bound word.",
                ),
                io.Combo.Input(
                    "stage1",
                    options=list(STAGE1_POLICIES),
                    default=STAGE1_DEFAULT,
                    optional=True,
                    tooltip="Before LODA's masks exist (stage 1): text_rows = only the concept's own "
                    "token rows of cross-attention keys/values; off = nothing; unmasked = the "
                    "whole LoRA everywhere (leaks).",
                ),
                io.Combo.Input(
                    "text_inputs",
                    options=[TEXT_ROWS, TEXT_OFF],
                    default=TEXT_ROWS,
                    optional=True,
                    tooltip="Cross-attention key/value parts of each LoRA: on its concept's own token "
                    "rows only, or off.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The patched clone; sample with LODA."),
                io.String.Output(display_name="info", tooltip="What each LoRA patches and where."),
            ],
        )

    @classmethod
    def execute(
        cls, model, bound_loras, positive, stage1: str = STAGE1_DEFAULT, text_inputs: str = TEXT_ROWS
    ) -> io.NodeOutput:
        bindings = tuple(bound_loras or ())
        check_bound_words([b.word for b in bindings])
        for binding in bindings:  # a list from another node than Bind LoRA to Concept is checked here again
            check_number(
                f'The strength of the LoRA bound to "{binding.word}"',
                binding.strength,
                BOUND_STRENGTH_RANGE.min,
                BOUND_STRENGTH_RANGE.max,
            )
        check_choice("stage1 policy", stage1, STAGE1_POLICIES)
        family = model_family(model)
        if not family.supports_bound_loras:
            supported = ", ".join(f.display for f in FAMILIES if f.supports_bound_loras)
            raise ConceptSplitError.build(
                f"Bound LoRAs are not supported on {family.display} yet",
                seen=f"a {family.display} model",
                expected=f"a {supported} model (fine-tunes too)",
                fix=f"use Load LoRA on this model, or bind the LoRAs on a {supported} checkpoint",
            )
        active = tuple(b for b in bindings if b.strength != 0)
        patched = model.clone()
        if not active:
            return io.NodeOutput(patched, "no bound LoRAs (empty list or strength 0): the model is unchanged")
        prompt = comfy_conditioning.conditioning_prompt_tokens(positive)
        if prompt is None:
            raise ConceptSplitError.build(
                "Apply Bound LoRAs cannot find the concept words: the positive prompt carries no token record",
                seen="a positive from a plain CLIP Text Encode",
                expected="a positive from ConceptSplit Text Encode or Apply ToVA",
                fix="encode the positive prompt with ConceptSplit Text Encode",
            )
        if prompt.pieces:  # a DiT prompt: words located by their decoded pieces, as LODA locates them
            positions = [rows[0] for rows in locate_words_in_pieces(prompt, [b.word for b in active])]
        else:
            requests = [IdentifierRequest(b.word, b.word, comfy_text.default_word_token_ids(b.word)) for b in active]
            positions = locate_identifier_positions(prompt, requests)
        concepts = tuple(BoundConcept(b.word, p, b.strength, b.lora_name) for b, p in zip(active, positions))
        loras = [
            (comfy_lora.read_lora(comfy_lora.lora_file_path(b.lora_name), b.lora_name, model), b.strength)
            for b in active
        ]
        layers, skipped = comfy_lora.bound_layers(model, loras, family)
        wrapper = comfy_lora.BoundLoras(
            layers,
            concepts,
            tuple(prompt.token_ids),
            len(prompt.token_ids),
            stage1,
            text_inputs == TEXT_ROWS,
            family,
            family.layout(model),
        )
        comfy_lora.install_bound_loras(patched, wrapper, positive)
        lines = []
        for index, (concept, (lora, _)) in enumerate(zip(concepts, loras)):
            own = [layer for layer in layers if layer.concept == index]
            text = sum(layer.kind == "text" for layer in own)
            joint = sum(layer.kind == "joint" for layer in own)
            lines.append(
                f'{lora.name} -> "{concept.word}" (token {concept.position}, strength {concept.strength}): '
                f"{len(own) - text - joint} image-side and {text} text-side patches"
                + (f", {joint} on the joint text+image sequence" if joint else "")
                + (f"; {lora.text_encoder_keys} text-encoder keys not applied" if lora.text_encoder_keys else "")
            )
        lines.append(
            f"{family.display}; stage 1: {stage1}; "
            + ("text-token layers" if family.layout(model).joint else "cross-attention keys/values")
            + f": {text_inputs}"
            + (
                f"; {skipped} patches left out (on the timestep embedding, modulation or norms: no positions)"
                if skipped
                else ""
            )
        )
        return io.NodeOutput(patched, "\n".join(lines))
