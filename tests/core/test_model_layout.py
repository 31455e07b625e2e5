"""Core code reads the model's layout as data: LODA's layer choice, the viewer's layer names and the concept words
work for any family's keys, not only UNet block names (made-up DiT-like keys here)."""

from __future__ import annotations

import pytest

from conceptsplit_core.attention_capture import select_layers
from conceptsplit_core.concept_words import capture_words, loda_words, parse_words
from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.loda import select_map_layers
from conceptsplit_core.model_layout import AttentionSite, ModelLayout, map_grid
from conceptsplit_core.prompt_tokens import PromptTokens

# A joint-attention model: 3 "double" and 2 "single" blocks, every one at the patch grid (latent/2); its family puts
# the maps on double 1, 2 and single 0 and the loss on the double ones.
DIT = ModelLayout(
    "madeup",
    "flow",
    16,
    joint=True,
    display="Made-up DiT",
    layers=(
        AttentionSite(("double", 0, 0), 1, 32, 16),
        AttentionSite(("double", 1, 0), 1, 32, 16, map=True, loss=True),
        AttentionSite(("double", 2, 0), 1, 32, 16, map=True, loss=True),
        AttentionSite(("single", 0, 0), 1, 32, 16, map=True),
        AttentionSite(("single", 1, 0), 1, 32, 16),
    ),
)


def test_select_map_layers_reads_the_layout_flags_for_made_up_keys():
    layers = select_map_layers(DIT, (64, 64), "all")
    assert layers.grid == map_grid((64, 64), 1) == (32, 32)
    assert layers.loss_keys == (("double", 1, 0), ("double", 2, 0))  # execution order: the last one ends the pass
    assert layers.mask_keys == (("double", 1, 0), ("double", 2, 0), ("single", 0, 0))
    assert layers.fixing_keys is None
    assert select_map_layers(DIT, (64, 64), "map_level").fixing_keys == frozenset(layers.mask_keys)


def test_select_map_layers_refuses_a_layout_without_map_or_loss_layers_and_small_maps():
    no_loss = ModelLayout("madeup", "flow", 16, (AttentionSite(("single", 0, 0), 1, 32, 16, map=True),))
    with pytest.raises(ConceptSplitError, match="no cross-attention layers at the level LODA reads"):
        select_map_layers(no_loss, (64, 64), "all")
    with pytest.raises(ConceptSplitError, match=r"smaller than the smoothing kernel.*at least 112×112 px"):
        select_map_layers(DIT, (12, 12), "all")  # 6×6 maps; 7 · 8 px · 2


def test_layer_choices_and_typed_block_names_use_the_models_own_keys():
    levels = DIT.levels()
    assert select_layers(levels, "latent/2") == frozenset(levels)
    assert select_layers(levels, "blocks", "double 1, single_0") == {("double", 1, 0), ("single", 0, 0)}
    with pytest.raises(ConceptSplitError, match=r'no cross-attention block "input 7".*double 0, 1, 2; single 0, 1'):
        select_layers(levels, "blocks", "input 7")


PROMPT = PromptTokens("a dog and a cat", (0, 1, 2, 3, 1, 4, 9), (False, True, True, True, True, True, False))
WORD_IDS = {"dog": (2,), "cat": (4,), "a": (1,)}.get


def test_one_comma_rule_and_one_locating_rule_for_loda_and_capture():
    assert parse_words(" dog, ,cat ,") == ("dog", "cat")
    loda = loda_words(parse_words("dog, cat"), (PROMPT,), (), WORD_IDS)
    capture = capture_words("dog, cat", PROMPT, (), WORD_IDS, "first token")
    assert loda.labels == capture.labels == ("dog", "cat")
    assert loda.positions == capture.positions == ((2,), (5,))
    assert loda.prompt_ids == capture.prompt_ids == PROMPT.token_ids and loda.prompt_length == 7
    with pytest.raises(ConceptSplitError, match="no token record"):
        loda_words(("dog", "cat"), (), (), WORD_IDS)
