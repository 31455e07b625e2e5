"""ComfyUI-ConceptSplit: multi-concept personalization without concept mixing (ToVA + LODA, ICCV 2025).

ComfyUI loads this package and calls `comfy_entrypoint()` (V3 API). The glue is imported lazily, inside the function,
so that importing this file (pytest does during collection) needs no ComfyUI.
"""


async def comfy_entrypoint():
    from .nodes.extension import ConceptSplitExtension

    return ConceptSplitExtension()
