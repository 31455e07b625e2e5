"""The pack's own socket types, each defined once (the type names are saved in workflows: never rename them)."""

from __future__ import annotations

from comfy_api.latest import io

ConceptAdapters = io.Custom("CONCEPTSPLIT_ADAPTERS")  # tuple[concepts.ConceptAdapter, ...]
ConceptMaps = io.Custom("CONCEPTSPLIT_MAPS")  # conceptsplit_core.attention_record.ConceptMaps
LodaResultType = io.Custom("CONCEPTSPLIT_LODA_RESULT")  # nodes.loda_sampling.LodaResult, filled by sampling
AttentionCaptureType = io.Custom("CONCEPTSPLIT_CAPTURE")  # conceptsplit_core.attention_capture.AttentionCapture
