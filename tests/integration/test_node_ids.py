"""The public node IDs and their inputs are frozen: saved workflows refer to nodes by ID, to links by input name,
and to widget values by position, so a rename, a removal or a reordering breaks every user's workflow.

Adding a node or an input is a deliberate edit of FROZEN below: append new inputs at the end of their group, give
them a default, and list them in ADDED_LATER (they must be optional), so old workflows and API prompts still load.
Never rename: add the new ID and deprecate the old one.
"""

from __future__ import annotations

import pytest

# node ID -> input names in the frontend's order (required, then optional); hidden inputs are not listed.
FROZEN = {
    "ConceptSplitLoadAdapter": ("adapter_name", "identifier_word", "strength", "role", "token_index", "adapters"),
    "ConceptSplitApplyToVA": ("model", "adapters", "clip", "text", "apply_to_uncond"),
    "ConceptSplitTextEncode": ("clip", "text"),
    "ConceptSplitLodaSampler": (
        "model",
        "seed",
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "positive",
        "negative",
        "latent_image",
        "denoise",
        "concept_words",
        "loda_steps",
        "inner_iterations",
        "kl_threshold",
        "step_scale",
        "step_schedule",
        "smoothing_sigma",
        "kl_pairs",
        "mask_percentile",
        "mask_sigma",
        "boost",
        "suppression",
        "fixing_layers",
        "fixing_branches",
        "mask_source",
        "gradient_checkpointing",
        "concept_masks",
        "mask_mode",
    ),
    "ConceptSplitLoda": (
        "sampler",
        "concept_words",
        "loda_steps",
        "inner_iterations",
        "kl_threshold",
        "step_scale",
        "step_schedule",
        "smoothing_sigma",
        "kl_pairs",
        "mask_percentile",
        "mask_sigma",
        "boost",
        "suppression",
        "fixing_layers",
        "fixing_branches",
        "mask_source",
        "gradient_checkpointing",
        "concept_masks",
        "mask_mode",
    ),
    "ConceptSplitLodaResults": ("latent", "loda_result"),
    "ConceptSplitCaptureAttention": (
        "model",
        "words",
        "token_mode",
        "first_step",
        "last_step",
        "layers",
        "positive",
        "blocks",
    ),
    "ConceptSplitAttentionViewer": ("alpha", "colormap", "capture", "samples", "maps", "image", "concept_masks"),
    "ConceptSplitLoadTrainingImages": ("folder", "resolution"),
    "ConceptSplitTrainToVA": (
        "model",
        "clip",
        "vae",
        "images",
        "identifier_word",
        "steps",
        "learning_rate",
        "rank",
        "seed",
        "resolution",
        "save_name",
        "overwrite",
        "checkpoint_every",
        "resume",
        "gradient_checkpointing",
    ),
    "ConceptSplitBindLora": ("lora_name", "concept_word", "strength", "bound_loras"),
    "ConceptSplitApplyBoundLoras": ("model", "bound_loras", "positive", "stage1", "text_inputs"),
}


@pytest.fixture(scope="module")
def pack_nodes(pack) -> dict:
    """/object_info entries of the nodes this pack registers (in this process only the pack is a custom node)."""
    from comfy_harness.comfy_object_info import object_info

    return {name: entry for name, entry in object_info().items() if entry["python_module"].startswith("custom_nodes.")}


def test_the_pack_registers_exactly_the_frozen_node_ids(pack_nodes):
    registered = set(pack_nodes)
    assert registered - set(FROZEN) == set(), "new node IDs: add them to FROZEN on purpose"
    assert set(FROZEN) - registered == set(), "node IDs disappeared or were renamed: saved workflows break"


@pytest.mark.parametrize("node_id", sorted(FROZEN))
def test_inputs_keep_their_names_and_order(pack_nodes, node_id):
    entry = pack_nodes.get(node_id)
    assert entry is not None, f"{node_id} is not registered"
    order = entry["input_order"]
    assert tuple(order.get("required", [])) + tuple(order.get("optional", [])) == FROZEN[node_id]


# Inputs added after a node was first published: they must be optional, so API-format prompts saved before they
# existed still pass the server's validation ("Required input is missing") and get the default.
ADDED_LATER = {
    "ConceptSplitLodaSampler": ("gradient_checkpointing", "concept_masks", "mask_mode"),
    "ConceptSplitLoda": ("gradient_checkpointing", "concept_masks", "mask_mode"),
    "ConceptSplitAttentionViewer": ("concept_masks",),
}


@pytest.mark.parametrize("node_id", sorted(ADDED_LATER))
def test_inputs_added_later_are_optional_for_old_api_prompts(pack_nodes, node_id):
    order = pack_nodes[node_id]["input_order"]
    assert set(ADDED_LATER[node_id]) <= set(order.get("optional", []))
    assert not set(ADDED_LATER[node_id]) & set(order.get("required", []))
