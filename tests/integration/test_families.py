"""The model-family interface (nodes/families): each UNet family recognises its models and describes them as plain
data, an unsupported model is refused by name, and every option of the LODA, Capture and Train nodes has a widget
with a tooltip built from its core table."""

from __future__ import annotations

import types
from dataclasses import fields

import pytest
from test_full_size_layouts import full_size_model

from comfy_harness.tiny_models import build_tiny_model

TINY = {"sd15": "sd1.5", "sd21": "sd2.1", "sdxl": "sdxl"}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_model_family_of_each_tiny_unet_gives_its_family_and_layout(pack, arch):
    model, _, _ = build_tiny_model(arch, 0)
    family = pack.family(model)
    assert family.name == TINY[arch] and family.supports_tova
    assert family in pack.glue("families").FAMILIES
    layout = family.layout(model)
    assert layout.family == TINY[arch] and layout.display == family.display and not layout.joint
    assert layout.text_width == model.model.model_config.unet_config["context_dim"]
    modules = dict(model.model.diffusion_model.named_modules())
    attn2 = [name for name in modules if name.endswith(".attn2")]
    assert len(layout.layers) == len(attn2) > 0 and len(set(site.key for site in layout.layers)) == len(attn2)
    assert sorted(site.heads for site in layout.layers) == sorted(modules[name].heads for name in attn2)
    assert all(site.heads > 0 for site in layout.layers)
    # the tiny UNets have two levels: their maps live at the deepest down level (level 1), loss there too
    assert layout.map_keys() == {site.key for site in layout.layers if site.level == 1}
    assert family.default_map_layers(layout, (16, 16)) == layout.map_keys()
    for site in layout.layers:
        assert family.map_grid(layout, site.key, (16, 16)) == (16 // 2**site.level,) * 2
        assert site.loss == (site.map and (arch != "sdxl" or site.key[0] == "input"))


@pytest.mark.parametrize(
    "arch, grid, loss, masks", [("sd21", (24, 24), 5, 5), ("sd15", (24, 24), 5, 5), ("sdxl", (32, 32), 20, 60)]
)
def test_full_size_map_layers_are_latent4_and_sdxl_loss_is_in_the_down_blocks(pack, arch, grid, loss, masks):
    latent = (96, 96) if arch != "sdxl" else (128, 128)
    layers = pack.core("loda").select_map_layers(pack.layout(full_size_model(arch)), latent, "all")
    assert layers.grid == grid and len(layers.loss_keys) == loss and len(layers.mask_keys) == masks
    if arch == "sd21":
        assert layers.loss_keys == (
            ("input", 7, 0),
            ("input", 8, 0),
            ("output", 3, 0),
            ("output", 4, 0),
            ("output", 5, 0),
        )
    if arch == "sdxl":
        assert {key[0] for key in layers.loss_keys} == {"input"} and layers.loss_keys[-1] == ("input", 8, 9)


def test_an_unsupported_model_class_is_refused_naming_the_supported_families(pack):
    import comfy.supported_models

    config = comfy.supported_models.SDXLRefiner.__new__(comfy.supported_models.SDXLRefiner)
    model = types.SimpleNamespace(model=types.SimpleNamespace(model_config=config), model_options={})
    # the DiT families after Qwen-Image depend on this ComfyUI (test_dit_families_missing.py checks that part)
    with pytest.raises(
        pack.error, match=r"supports SDXL, SD2.1, SD1.5, .*Flux.1,? .*Qwen-Image.* models only.*SDXLRefiner"
    ):
        pack.glue("families").model_family(model)
    with pytest.raises(pack.error, match="supports"):
        pack.glue("families").tova_family(types.SimpleNamespace(model=None))


def test_a_family_without_tova_is_refused_by_apply_tova_and_training(pack, monkeypatch):
    families = pack.glue("families")
    model, _, _ = build_tiny_model("sd15", 0)
    monkeypatch.setattr(families.SD15, "supports_tova", False)
    with pytest.raises(pack.error, match="ToVA adapters are defined on UNet cross-attention; SD1.5 is not supported"):
        families.tova_family(model)


def test_family_objects_survive_deep_copies(pack):
    import copy

    family = pack.glue("families").SDXL
    assert copy.deepcopy({"f": family})["f"] is family and copy.copy(family) is family


def _inputs(node_cls) -> dict:
    return {spec.id: spec for spec in node_cls.define_schema().inputs}


@pytest.mark.parametrize("node", ["LodaSampler", "LodaSamplerSelect"])
def test_every_loda_option_has_a_widget_with_its_range_default_and_tooltip(pack, node):
    config = pack.core("loda_config")
    inputs = _inputs(getattr(pack.glue("loda_nodes"), node))
    for field in fields(config.LodaConfig):
        spec = inputs.get(field.name)
        assert spec is not None, f"LodaConfig.{field.name} has no widget"
        assert spec.tooltip and config.MEANINGS[field.name] in spec.tooltip
        assert spec.default == getattr(config.LODA_DEFAULTS, field.name) or field.name in config.UI_OPTIONS
        if field.name in config.UI_RANGES:
            assert (spec.min, spec.max) == tuple(config.UI_RANGES[field.name][:2])


def test_a_loda_field_without_a_meaning_fails_loudly(pack, monkeypatch):
    config = pack.core("loda_config")
    monkeypatch.delitem(config.MEANINGS, "boost")
    with pytest.raises(pack.error, match="Widget boost has no tooltip"):
        pack.glue("loda_nodes").loda_setting_inputs()


@pytest.mark.parametrize(
    "module, node",
    [
        ("loda_nodes", "LodaSampler"),
        ("loda_nodes", "LodaSamplerSelect"),
        ("loda_nodes", "LodaResults"),
        ("viewer", "CaptureAttention"),
        ("viewer", "AttentionMapViewer"),
        ("training", "TrainToVAAdapter"),
        ("training_photos", "LoadTrainingPhotos"),
        ("adapters", "LoadToVAAdapter"),
        ("adapters", "ApplyToVA"),
        ("prompt", "ConceptSplitTextEncode"),
    ],
)
def test_every_input_of_every_node_has_a_tooltip(pack, module, node):
    inputs = _inputs(getattr(pack.glue(module), node))
    empty = [name for name, spec in inputs.items() if not (spec.tooltip or "").strip()]
    assert empty == []


def test_capture_and_train_widgets_take_their_limits_from_the_core_tables(pack):
    capture = _inputs(pack.glue("viewer").CaptureAttention)
    for name, widget in pack.core("attention_capture").UI_RANGES.items():
        assert (capture[name].min, capture[name].max) == (widget.min, widget.max)
    train = _inputs(pack.glue("training").TrainToVAAdapter)
    ranges = pack.core("training_data").UI_RANGES
    for name in ("steps", "learning_rate", "rank", "resolution", "checkpoint_every"):
        assert (train[name].min, train[name].max) == (ranges[name].min, ranges[name].max)
        assert ranges[name].recommended in train[name].tooltip
    load = _inputs(pack.glue("adapters").LoadToVAAdapter)
    strength = pack.core("config").UI_RANGES["strength"]
    assert (load["strength"].min, load["strength"].max, load["strength"].step) == tuple(strength[:3])


def test_the_loda_sampler_plans_once_and_builds_the_layout_once_per_run(pack, monkeypatch):
    from test_loda import all_in_one, tiny

    run = pack.glue("loda_sampling")
    unet = pack.glue("families.unet")
    plans, layouts = [], []
    plan_loda_run, layout = run.plan_loda_run, unet.UNetFamily.layout
    monkeypatch.setattr(run, "plan_loda_run", lambda *a, **k: plans.append(1) or plan_loda_run(*a, **k))
    monkeypatch.setattr(unet.UNetFamily, "layout", lambda self, m: layouts.append(1) or layout(self, m))
    model, clip = tiny("sd21")
    _, _, _, report = all_in_one(pack, model, clip, steps=3, loda_steps=1)
    assert plans == [1] and layouts == [1]
    assert ": updated" in report or "loss 0" in report
