""" "ConceptSplit Text Encode": CLIPTextEncode that also records the prompt's tokens, so LODA and the attention viewer
can find concept words in it on models without ToVA (ConceptSplit, Lim et al., ICCV 2025)."""

from __future__ import annotations

from comfy_api.latest import io

from . import comfy_text


class ConceptSplitTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptSplitTextEncode",
            display_name="ConceptSplit Text Encode",
            category="ConceptSplit",
            description="Encode a prompt like CLIP Text Encode, and remember its tokens so LODA and the attention "
            "viewer can locate concept words. ConceptSplit, Lim et al., ICCV 2025.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the checkpoint."),
                io.String.Input(
                    "text",
                    multiline=True,
                    dynamic_prompts=True,
                    tooltip="The prompt, containing the concept words (e.g. 'a dog and a cat').",
                ),
            ],
            outputs=[
                io.Conditioning.Output(
                    display_name="conditioning", tooltip="Same as CLIP Text Encode's output, plus the token record."
                )
            ],
        )

    @classmethod
    def execute(cls, clip, text: str) -> io.NodeOutput:
        return io.NodeOutput(comfy_text.encode_prompt(clip, text))
