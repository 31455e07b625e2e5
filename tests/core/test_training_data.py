"""Tests for conceptsplit_core.training_data: templates, TrainConfig, preprocessing, schedule, noise (method §2.6)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.training_data import (
    UI_RANGES,
    TrainConfig,
    crop_choice,
    crop_views,
    default_resolution,
    load_prompt_templates,
    preprocess_images,
    sample_training_noise,
    templates_hash,
    training_schedule,
)


# --- templates ---------------------------------------------------------------------------------------------------


def test_templates_count_and_format():
    templates = load_prompt_templates()
    assert 190 <= len(templates) <= 210
    assert len(set(templates)) == len(templates)
    for template in templates:
        assert template.count("{}") == 1 and template.count("{") == 1 and template.count("}") == 1, template
        assert template == template.lower() and template == template.strip(), template
        # 77 CLIP tokens are far away: 20 words give at most about 30 BPE tokens.
        assert len(template.format("teddy bear").split()) <= 20, template


def test_templates_fit_clip_window_with_real_tokenizer():
    comfy_path = os.environ.get("COMFYUI_PATH")
    vocab = Path(comfy_path or "/nonexistent") / "comfy" / "sd1_tokenizer"
    if not vocab.is_dir():
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to count real CLIP tokens")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(vocab))
    lengths = [len(tokenizer(t.format("teddy bear"))["input_ids"]) for t in load_prompt_templates()]
    assert max(lengths) <= 77


def test_templates_cover_the_spec_categories():
    joined = "\n".join(load_prompt_templates())
    for word in (
        "watercolor",
        "oil painting",
        "pencil sketch",
        "3d render",
        "pixel art",
        "anime",
        "beach",
        "kitchen",
        "snow",
        "clay",
        "wooden",
        "plush",
        "light",
        "close up",
    ):
        assert word in joined, word
    assert "a {}" in load_prompt_templates() and "my {}" in load_prompt_templates()


def test_malformed_template_file_raises(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("a photo of a {}\na {} and a {}\n", encoding="utf-8")
    with pytest.raises(ConceptSplitError, match="line 2"):
        load_prompt_templates(path)
    path.write_text("a {}\n\nthe {name}\n", encoding="utf-8")
    with pytest.raises(ConceptSplitError, match="line 3"):
        load_prompt_templates(path)
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ConceptSplitError, match="no templates"):
        load_prompt_templates(path)
    with pytest.raises(ConceptSplitError, match="Cannot read"):
        load_prompt_templates(tmp_path / "missing.txt")


def test_custom_template_file_skips_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("  a {}  \n\nmy {}\n", encoding="utf-8")
    assert load_prompt_templates(path) == ("a {}", "my {}")


def test_templates_hash():
    templates = ("a {}", "my {}")
    expected = hashlib.sha256(b"a {}\nmy {}").hexdigest()[:16]
    assert templates_hash(templates) == expected
    assert len(templates_hash(load_prompt_templates())) == 16
    assert templates_hash(("my {}", "a {}")) != expected


# --- TrainConfig -------------------------------------------------------------------------------------------------


def test_train_config_defaults_match_spec():
    config = TrainConfig()
    assert (config.steps, config.learning_rate, config.rank, config.batch_size) == (300, 1e-4, 64, 1)
    assert (config.grad_clip, config.adam_betas, config.weight_decay, config.adam_eps) == (
        1.0,
        (0.9, 0.999),
        1e-2,
        1e-8,
    )
    assert (config.seed, config.checkpoint_every, config.alpha, config.resolution) == (0, 0, None, None)
    assert config.resolved_alpha() == 64.0
    assert TrainConfig(rank=16, alpha=8).resolved_alpha() == 8.0
    assert config.resolved_resolution("sd2.1-v") == 768
    assert TrainConfig(resolution=512).resolved_resolution("sdxl") == 512
    assert config.validate() is config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 5  # type: ignore[misc]


def test_default_resolution():
    assert default_resolution("sd2.1-v") == 768
    assert default_resolution("SD2.1") == 768
    assert default_resolution("sdxl") == 1024
    assert default_resolution("sd1.5") == 512
    with pytest.raises(ConceptSplitError, match="flux"):
        default_resolution("flux")


@pytest.mark.parametrize(
    "changes",
    [
        dict(steps=0),
        dict(learning_rate=0.0),
        dict(learning_rate=-1e-4),
        dict(rank=0),
        dict(alpha=0.0),
        dict(batch_size=0),
        dict(grad_clip=-1.0),
        dict(adam_betas=(0.9, 1.0)),
        dict(weight_decay=-0.1),
        dict(adam_eps=0.0),
        dict(resolution=100),
        dict(resolution=32),
        dict(seed=-1),
        dict(checkpoint_every=-5),
    ],
)
def test_train_config_validate_rejects(changes):
    name = next(iter(changes))
    with pytest.raises(ConceptSplitError, match=f"{name}.*Fix: set {name}"):
        TrainConfig(**changes).validate()


def test_ui_ranges_cover_defaults():
    defaults = TrainConfig()
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, widget in UI_RANGES.items():
        assert name in names
        assert widget.min <= widget.max and widget.step > 0 and widget.recommended
        value = getattr(defaults, name)
        if value is not None:
            assert widget.min <= value <= widget.max, name


# --- preprocessing -----------------------------------------------------------------------------------------------


def _gradient_image(height: int, width: int) -> torch.Tensor:
    rows = torch.linspace(0, 1, height)[:, None].expand(height, width)
    cols = torch.linspace(0, 1, width)[None, :].expand(height, width)
    return torch.stack([rows, cols, (rows + cols) / 2], dim=-1)  # (H, W, 3)


def test_preprocess_center_crop_matches_interpolate_reference():
    image = _gradient_image(40, 60)
    out = preprocess_images(image[None], 32, crop="center")
    # Reference: shorter side 40 -> 32, so 60 -> 48; centre crop columns 8..40.
    reference = (
        F.interpolate(
            image.permute(2, 0, 1)[None], size=(32, 48), mode="bilinear", align_corners=False, antialias=True
        )[0, :, :, 8:40]
        * 2
        - 1
    )
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    # the same interpolate; only the ·2 − 1 and the clamp to ±1 (which moves a value by ≤ 2 ulp) differ: 1e-6 ≈ 8 eps32
    torch.testing.assert_close(out[0], reference, rtol=0, atol=1e-6)


def test_preprocess_random_crop_uses_generator_offsets():
    image = _gradient_image(50, 30)  # portrait: 30 -> 24, 50 -> 40, crop rows vary
    generator = torch.Generator().manual_seed(7)
    shadow = torch.Generator()
    shadow.set_state(generator.get_state())
    out = preprocess_images([image], 24, generator=generator)
    top = int(torch.randint(0, 40 - 24 + 1, (1,), generator=shadow))
    left = int(torch.randint(0, 1, (1,), generator=shadow))
    resized = F.interpolate(
        image.permute(2, 0, 1)[None], size=(40, 24), mode="bilinear", align_corners=False, antialias=True
    )
    torch.testing.assert_close(
        out[0], resized[0, :, top : top + 24, left : left + 24] * 2 - 1, rtol=0, atol=1e-6
    )  # as above


def test_preprocess_mixed_sizes_range_and_determinism():
    images = [
        _gradient_image(64, 96),
        torch.rand(80, 48, 3, generator=torch.Generator().manual_seed(1)),
        torch.ones(2, 20, 20, 3),
    ]  # a list mixing sizes and an IMAGE batch; 20 px is upscaled
    first = preprocess_images(images, 32, generator=torch.Generator().manual_seed(3))
    second = preprocess_images(images, 32, generator=torch.Generator().manual_seed(3))
    assert first.shape == (4, 3, 32, 32)
    assert first.min() >= -1 and first.max() <= 1
    # white stays white (1.0): convex interpolation weights summing to 1 in float32, then ·2 − 1: a few ulp at 1
    torch.testing.assert_close(first[3], torch.ones(3, 32, 32), rtol=0, atol=1e-6)
    assert torch.equal(first, second)
    other = preprocess_images(images, 32, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(first, other)


@pytest.mark.parametrize(
    "images, match",
    [
        ([], "No training images"),
        (torch.zeros(0, 8, 8, 3), "No training images"),
        (torch.zeros(1, 8, 8, 4), "3 colour channels"),
        (torch.full((1, 8, 8, 3), 1.5), "outside 0..1"),
        (torch.full((1, 8, 8, 3), -0.1), "outside 0..1"),
        (torch.zeros(8, 8), "dimensions"),
    ],
)
def test_preprocess_rejects_bad_images(images, match):
    with pytest.raises(ConceptSplitError, match=match):
        preprocess_images(images, 8)


# --- schedule and noise ------------------------------------------------------------------------------------------


def test_schedule_first_epoch_covers_every_template_once():
    n_images, n_templates = 3, 17
    schedule = training_schedule(n_images, n_templates, 40, seed=0)
    assert len(schedule) == 40
    assert sorted(t for _, t in schedule[:n_templates]) == list(range(n_templates))
    assert sorted(t for _, t in schedule[n_templates : 2 * n_templates]) == list(range(n_templates))
    for position, (image, template) in enumerate(schedule):
        epoch = position // n_templates
        assert image == (epoch * n_templates + template) % n_images  # item i = (i mod n_images, i mod n_templates)
    assert [t for _, t in schedule[:n_templates]] != list(range(n_templates))  # shuffled


def test_schedule_deterministic_per_seed():
    assert training_schedule(4, 199, 300, seed=5) == training_schedule(4, 199, 300, seed=5)
    assert training_schedule(4, 199, 300, seed=5) != training_schedule(4, 199, 300, seed=6)
    assert training_schedule(4, 199, 300, seed=5)[:100] == training_schedule(4, 199, 100, seed=5)
    with pytest.raises(ConceptSplitError, match="n_images"):
        training_schedule(0, 199, 10, seed=0)


def test_noise_depends_only_on_seed_and_step():
    shape = (2, 4, 8, 8)
    t_a, noise_a = sample_training_noise(3, 11, shape)
    sample_training_noise(4, 11, shape)  # draws in between change nothing
    t_b, noise_b = sample_training_noise(3, 11, shape)
    assert torch.equal(t_a, t_b) and torch.equal(noise_a, noise_b)
    assert t_a.shape == (2,) and t_a.dtype == torch.int64 and noise_a.shape == shape and noise_a.dtype == torch.float32
    assert not torch.equal(noise_a, sample_training_noise(4, 11, shape)[1])
    assert not torch.equal(noise_a, sample_training_noise(3, 12, shape)[1])
    timesteps = torch.cat([sample_training_noise(step, 0, (1, 1, 1, 1))[0] for step in range(400)])
    assert timesteps.min() >= 0 and timesteps.max() <= 999
    assert timesteps.unique().numel() > 300  # spread over [0, 1000), not stuck


# --- crop views --------------------------------------------------------------------------------------------------


def test_crop_views_draw_k_seeded_crops_per_image_and_keep_each_distinct_one_once():
    g = torch.Generator().manual_seed(0)
    wide, square = torch.rand(40, 100, 3, generator=g), torch.rand(32, 32, 3, generator=g)
    views = crop_views([wide, square], 32, 4, seed=7)
    assert views.n_images == 2 and len(views.choices[0]) == len(views.choices[1]) == 4
    assert views.offsets[1] == ((0, 0),) and views.choices[1] == (0, 0, 0, 0)  # a square image has one crop
    assert len(views.offsets[0]) > 1  # the wide one (32×80 after resizing) gets several
    resized = (
        F.interpolate(wide.permute(2, 0, 1)[None], size=(32, 80), mode="bilinear", align_corners=False, antialias=True)[
            0
        ]
        * 2
        - 1
    )  # (3, 32, 80), the documented pipeline
    crops = views.crops(0)  # (v, 3, 32, 32)
    for crop, (top, left) in zip(crops, views.offsets[0]):
        assert top == 0 and 0 <= left <= 48
        assert torch.allclose(crop, resized[:, :, left : left + 32].clamp(-1, 1), atol=1e-6, rtol=0)  # the same ops
    assert [views.offsets[0][c] for c in views.choices[0]] == [
        views.offsets[0][c] for c in crop_views([wide, square], 32, 4, 7).choices[0]
    ]
    assert crop_views([wide], 32, 4, seed=8).offsets != views.offsets[:1]  # another seed, other crops
    with pytest.raises(ConceptSplitError, match="No training images"):
        crop_views([], 32, 4, 0)
    with pytest.raises(ConceptSplitError, match="3 colour channels"):
        crop_views([wide, torch.rand(32, 32, 4)], 32, 4, 0)


def test_crop_choice_depends_on_seed_and_step_only_and_covers_every_view():
    picks = [crop_choice(step, 3, 4) for step in range(200)]
    assert picks == [crop_choice(step, 3, 4) for step in range(200)]
    assert set(picks) == {0, 1, 2, 3} and max(picks.count(v) for v in range(4)) < 70  # roughly uniform
    assert picks != [crop_choice(step, 4, 4) for step in range(200)]
    assert {crop_choice(step, 0, 1) for step in range(20)} == {0}
