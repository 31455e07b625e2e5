"""The ToVA training loop with a fake denoiser (no ComfyUI): loss = v-MSE, NaN stop, bit-identical resume, rank."""

from __future__ import annotations

import pytest
import torch

from conceptsplit_core import training as core
from conceptsplit_core.errors import ConceptSplitError
from conceptsplit_core.loss_curve import render_loss_curve
from conceptsplit_core.token_value_delta import apply_token_value_delta
from conceptsplit_core.tova_lora import ToVALoraSet, load_training_checkpoint
from conceptsplit_core.training_data import TrainConfig

SHAPES = {"layer": (6, 4)}  # d = 6, C = 4
SIGMAS = ((1 - torch.linspace(0.999, 0.01, 1000)) / torch.linspace(0.999, 0.01, 1000)).sqrt()  # (1000,)


class FakeVModel:
    """A v-predicting 'UNet': v̂ = mean over tokens of V (ToVA on row s) + x_t, then ComfyUI's denoised formula."""

    def __init__(self, nan_from_call=None):
        g = torch.Generator().manual_seed(1)
        self.context = torch.randn(2, 1, 77, 6, generator=g)  # two prompts
        self.weight = torch.randn(4, 6, generator=g)  # W_v (C, d)
        self.calls, self.nan_from_call = 0, nan_from_call

    def raw(self, x_t, template_index, deltas):
        context = self.context[template_index]  # (1, 77, d)
        value = context @ self.weight.T  # (1, 77, C)
        value = apply_token_value_delta(value, context, deltas["layer"], torch.ones(1, dtype=torch.bool))
        return x_t + value.mean(dim=1)[:, :, None, None]  # (1, 4, h, w)

    def __call__(self, x, sigma, template_index, deltas):
        self.calls += 1
        s = sigma.view(-1, 1, 1, 1)
        v_hat = self.raw(x / (s**2 + 1).sqrt(), template_index, deltas)
        denoised = x / (s**2 + 1) - v_hat * s / (s**2 + 1).sqrt()
        return denoised * float("nan") if self.nan_from_call and self.calls >= self.nan_from_call else denoised


def make_data():
    g = torch.Generator().manual_seed(2)
    return core.TrainingData(torch.randn(3, 4, 2, 2, generator=g), torch.full((3, 4, 2, 2), 0.1), (5, 3))


def test_loss_equals_v_mse_of_the_raw_output():
    data, schedule, model = make_data(), core.NoiseSchedule(SIGMAS, "v"), FakeVModel()
    lora = ToVALoraSet(SHAPES, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora.lora_B["layer"].normal_()
    sample = core.draw_step(data, schedule, (1, 0), 3, 0)
    loss = core.step_loss(lora, data, schedule, model, sample)
    alpha_bar = 1 / (1 + sample.sigma.double() ** 2)
    x_t = alpha_bar.sqrt() * sample.x0 + (1 - alpha_bar).sqrt() * sample.noise
    v = alpha_bar.sqrt() * sample.noise - (1 - alpha_bar).sqrt() * sample.x0
    deltas = core.step_deltas(lora, 5, 77, "")
    reference = ((model.raw(x_t.float(), 0, deltas) - v.float()) ** 2).mean()
    # x_t and v in float32 against float64 (≤ 2 ulp each), through the fake model and a mean of squares: rtol 1e-4
    # (840 eps32) leaves room for cancellation in raw − v; a wrong target (ε for v, another ᾱ) is off by order 1
    assert torch.allclose(loss, reference, rtol=1e-4, atol=0)


def make_view_data():
    """Two images, five encoded crops: image 0 owns rows 0-2, image 1 rows 3-4; four crop draws each."""
    g = torch.Generator().manual_seed(3)
    return core.TrainingData(
        torch.randn(5, 4, 2, 2, generator=g),
        torch.full((5, 4, 2, 2), 0.1),
        (5, 3),
        view_rows=((0, 1, 0, 2), (3, 4, 4, 3)),
    )


def test_each_step_takes_one_of_its_images_crops_by_seed_and_step():
    data = make_view_data()
    assert data.n_images == 2
    rows = [data.latent_row(0, step, seed=1) for step in range(40)]
    assert set(rows) == {0, 1, 2} and rows == [data.latent_row(0, step, seed=1) for step in range(40)]
    assert {data.latent_row(1, step, seed=1) for step in range(40)} == {3, 4}
    sample = core.draw_step(data, core.NoiseSchedule(SIGMAS, "v"), (1, 0), 7, seed=1)
    row = data.latent_row(1, 7, seed=1)
    distance = [float((sample.x0[0] - mean).abs().max()) for mean in data.latent_mean]  # std 0.1 around its mean
    assert min(range(5), key=distance.__getitem__) == row and distance[row] < 0.5


def _run(tmp_path, steps, name="run", resume=False, model=None, every=2, on_step=None):
    lora = ToVALoraSet(SHAPES, 2, generator=torch.Generator().manual_seed(0))
    plan = core.CheckpointPlan(tmp_path / f"{name}.ckpt", every, resume)
    config = TrainConfig(steps=steps, learning_rate=1e-2, rank=2)
    result = core.train_tova(
        lora,
        make_view_data(),
        core.NoiseSchedule(SIGMAS, "v"),
        model or FakeVModel(),
        config,
        run_record={"steps": steps, "word": "dog"},
        checkpoint=plan,
        on_step=on_step,
    )
    return lora, result


def test_resume_is_bit_identical(tmp_path):
    full, full_result = _run(tmp_path, 40, "full")
    assert len(full_result.losses) == 40 and (tmp_path / "full.ckpt").exists()  # last checkpoint at step 38

    def stop(done, total, loss):
        if done == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, 40, "part", on_step=stop)
    assert load_training_checkpoint(tmp_path / "part.ckpt").step == 24
    resumed, result = _run(tmp_path, 40, "part", resume=True)
    assert result.resumed_from == 24 and result.losses == full_result.losses
    for key, (a, b) in full.pairs().items():
        assert torch.equal(resumed.pairs()[key][0], a) and torch.equal(resumed.pairs()[key][1], b)


def test_nan_loss_stops_names_the_step_and_keeps_the_checkpoint(tmp_path):
    with pytest.raises(ConceptSplitError, match="diverged at step 5.*run.ckpt"):
        _run(tmp_path, 10, model=FakeVModel(nan_from_call=5))
    assert load_training_checkpoint(tmp_path / "run.ckpt").step == 4


def test_rank_limit_and_missing_word():
    core.check_rank(4, SHAPES)
    with pytest.raises(ConceptSplitError, match="Rank 5 is larger.*at most 4"):
        core.check_rank(5, SHAPES)
    with pytest.raises(ConceptSplitError, match="gives no tokens"):
        core.identifier_positions([], "  ", ())


def test_loss_curve_image():
    image = render_loss_curve([1.0, 0.5, 0.25, 0.3], height=64, width=128)
    assert image.shape == (1, 64, 128, 3) and 0 <= image.min() and image.max() <= 1
    assert (image < 0.9).any()  # something was drawn
