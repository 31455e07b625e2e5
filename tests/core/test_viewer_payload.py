"""viewer_payload: the interactive viewer's data (issue 15) is JSON-safe, exact, and ties words to their maps."""

from __future__ import annotations

import base64
import json

import torch

from conceptsplit_core.attention_record import ConceptMaps
from conceptsplit_core.map_render import COLORMAPS, colormap_lut
from conceptsplit_core.viewer_payload import PAYLOAD_VERSION, prompt_words, viewer_payload
from comfy_harness.viewer_reference import decode_f32, range_mean


def test_capture_payload_round_trips_the_step_maps_exactly_and_marks_the_tracked_words():
    step_maps = torch.rand(2, 3, 2, 4, 5)  # (B, S_rec, K, h, w)
    weights = (2, 4, 2)
    w = torch.tensor(weights, dtype=torch.float32)
    maps = (step_maps * w[None, :, None, None, None]).sum(1) / w.sum()  # (B, K, h, w)
    record = ConceptMaps(
        ("Dog", "cat"),
        maps,
        steps=(1, 2, 3),
        step_maps=step_maps,
        step_weights=weights,
        total_steps=4,
        prompt="a dog, and a cat (and a dog)",
    )
    payload = json.loads(json.dumps(viewer_payload(record, None, 0.5, "inferno")))  # survives the websocket
    assert payload["version"] == PAYLOAD_VERSION and payload["grid"] == [4, 5] and payload["steps"] == [1, 2, 3]
    assert payload["images"] == [None, None] and payload["masks"] is None and payload["stage1_steps"] is None
    for b in range(2):
        assert torch.equal(decode_f32(payload["maps"][b], (3, 2, 4, 5)), step_maps[b])  # bit-exact
    tracked = [(word["text"], word["word"]) for word in payload["words"] if word["word"] >= 0]
    assert tracked == [("dog", 0), ("cat", 1)]  # first occurrence, any case; the second "dog" is not tracked
    assert [word["text"] for word in payload["words"]][:3] == ["a", "dog", "and"]
    for name in COLORMAPS:
        assert torch.equal(decode_f32(payload["luts"][name], (256, 3)), colormap_lut(name))
    # the whole range is the record's maps (fp64 there; fp32 maps of values <= 1: a few ulps)
    assert torch.allclose(range_mean(step_maps[0], weights, 0, 2), maps[0].double(), atol=4 * 2**-24)


def test_loda_payload_has_one_entry_at_the_mask_step_with_masks_and_stage1_marks():
    maps = torch.rand(1, 2, 3, 3)
    masks = maps > 0.5  # (B, K, h, w)
    record = ConceptMaps(("dog", "cat"), maps, total_steps=10, stage1_steps=2, mask_step=1, masks=masks)
    payload = viewer_payload(
        record, [{"filename": "x.png", "subfolder": "", "type": "temp", "width": 24, "height": 24}], 0.3, "viridis"
    )
    assert payload["steps"] == [1] and payload["step_weights"] == [1] and payload["stage1_steps"] == 2
    assert torch.equal(decode_f32(payload["maps"][0], (1, 2, 3, 3))[0], maps[0])
    assert list(base64.b64decode(payload["masks"][0])) == masks[0].flatten().int().tolist()
    assert [word["text"] for word in payload["words"]] == ["dog", "cat"]  # no prompt text: the labels
    assert payload["alpha"] == 0.3 and payload["colormap"] == "viridis"


def test_prompt_words_appends_labels_the_prompt_lacks():
    assert prompt_words("a red barn", ["barn", "dog"]) == [
        {"text": "a", "word": -1},
        {"text": "red", "word": -1},
        {"text": "barn", "word": 0},
        {"text": "dog", "word": 1},
    ]
