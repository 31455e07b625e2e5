"""ComfyUI-ConceptSplit: multi-concept personalization without concept mixing (ToVA + LODA, ICCV 2025).

ComfyUI loads this package and calls `comfy_entrypoint()` (V3 API). The glue is imported lazily, inside the function,
so that importing this file (pytest does during collection) needs no ComfyUI.

WEB_DIRECTORY: ComfyUI (0.3.64 and 0.33.0 alike, nodes.load_custom_node) serves this folder's JavaScript to the
frontend as /extensions/<pack folder>/..., for V3 packs too: the interactive Attention Map Viewer (web/js).
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import ConceptSplitExtension

    return ConceptSplitExtension()
