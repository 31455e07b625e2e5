"""ComfyUI glue for ConceptSplit: one module per node family, plus `comfy_hooks`, the only module that knows
ComfyUI's patch signatures. Import inside the pack only relatively: ComfyUI has a top-level module `nodes` too."""
