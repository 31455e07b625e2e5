"""ComfyUI glue for ConceptSplit: one module per node family, plus the seam, the only modules that know ComfyUI's
internals: `comfy_text` (tokenizers, encoding), `comfy_attention` (the attention processor), `comfy_conditioning`
(conditioning records, chunk tables), `comfy_sampling`, `comfy_autograd`, `comfy_training`, and `families/` (one
module per model architecture). Import inside the pack only relatively: ComfyUI has a top-level module `nodes` too."""
