"""ToVA training (issue 5) through the real ComfyUI: loss, isolation, file round trip, gradient reference, token
rows at inference, interrupt and resume, atomic save, bad input, the server workflow and the CLI."""

from __future__ import annotations

import copy
import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sample
from safetensors import safe_open
from tova_reference import explicit_attention, module_path_of, spy_model

from comfy_harness.tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = (
    "a photo of a {}",
    "a {} on the grass",
    "a watercolor painting of my {}",
    "the {} in a city street",
    "a close-up photo of the {}",
    "a {}",
)
WORD = "dog"
DOG_POSITION = 5  # "a photo of a dog": [SOT, a, photo, of, a, dog]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models are dominated by thread overhead on the 2 shared CI cores: one thread is 10-20x faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_images(n=3, size=64, seed=0) -> torch.Tensor:
    """A fixed set of smooth coloured blobs, (n, size, size, 3) in 0..1."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        cx, cy, r = torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.4]) + torch.tensor([-0.5, -0.5, 0.3])
        blob = (((xx - cx) ** 2 + (yy - cy) ** 2) < r**2).float()[..., None]  # (size, size, 1)
        color, background = torch.rand(3, generator=g), torch.rand(3, generator=g) * 0.5
        images.append(blob * color + (1 - blob) * background)
    return torch.stack(images)


def request(
    pack,
    name="dog",
    steps=4,
    lr=1e-4,
    rank=4,
    seed=0,
    checkpoint_every=0,
    resume=False,
    overwrite=False,
    word=WORD,
    templates=TEMPLATES,
    gradient_checkpointing=False,
):
    training, data = pack.glue("training"), pack.core("training_data")
    config = data.TrainConfig(
        steps=steps, learning_rate=lr, rank=rank, seed=seed, resolution=64, checkpoint_every=checkpoint_every
    )
    return training.TrainingRequest(
        word, config, name, overwrite, resume, templates=templates, gradient_checkpointing=gradient_checkpointing
    )


def wide_images() -> torch.Tensor:
    """(3, 64, 112, 3): not square, so each image has several distinct 64×64 crops."""
    images = synthetic_images()
    return torch.cat([images, images.flip(2)[:, :, :48]], dim=2)


def train(pack, model, clip, vae, folder, images=None, **kwargs):
    """The glue function the node and the CLI call, under inference mode like ComfyUI's executor."""
    training, hooks = pack.glue("training"), pack.glue("comfy_training")
    req = request(pack, **kwargs)
    with torch.inference_mode():
        images = synthetic_images() if images is None else images
        return training.train_adapter(model, clip, vae, images, req, folder, hooks.training_progress(req.config.steps))


def inference_model(arch="sd21"):
    with torch.inference_mode():  # weights become inference tensors, as when the executor loads a model
        return build_tiny_model(arch, seed=0)


def run_body(pack, model, clip, vae, body, images=None, templates=TEMPLATES):
    """Run `body(denoise, data, schedule, lora_shapes)` inside the training seam, like train_adapter does."""
    core, seam = pack.core("training"), pack.glue("comfy_training")
    hooks = family = pack.family(model)
    layout = family.layout(model)
    sigmas, prediction, sigma_data = family.training_schedule(model)
    prompts = core.template_prompts(templates, WORD)
    positions = core.identifier_positions(
        [hooks.prompt_tokens(clip, p) for p in prompts], WORD, hooks.word_token_ids(clip, WORD)
    )
    with torch.inference_mode():
        pixels = pack.core("training_data").preprocess_images(
            synthetic_images() if images is None else images, 64, torch.Generator().manual_seed(0)
        )
        mean, std = seam.encode_latent_posterior(vae, model, ((pixels + 1) / 2).movedim(1, -1))
        conds = [seam.training_conditioning(clip, p, 64) for p in prompts]
    schedule = core.NoiseSchedule(sigmas, prediction, sigma_data)
    shapes = {layer.path: (layer.in_features, layer.out_features) for layer in layout.layers}

    def wrapped(denoise):
        return body(denoise, core.TrainingData(mean.clone(), std.clone(), positions), schedule, shapes)

    return seam.run_training(model.clone(), family, layout, conds, tuple(mean[:1].shape), wrapped), conds, positions


def evaluation_loss(pack, model, clip, vae, pairs, items=12):
    """Mean loss over fixed items (the first `items` of the seed-0 schedule), for the given adapter weights."""
    core, lora_module = pack.core("training"), pack.core("tova_lora")
    schedule_pairs = pack.core("training_data").training_schedule(3, len(TEMPLATES), items, 0)

    def body(denoise, data, schedule, shapes):
        lora = lora_module.ToVALoraSet(shapes, 4)
        lora.load_pairs(pairs)
        with torch.no_grad():
            return (
                sum(
                    float(
                        core.step_loss(
                            lora, data, schedule, denoise, core.draw_step(data, schedule, schedule_pairs[i], i, 0)
                        )
                    )
                    for i in range(items)
                )
                / items
            )

    return run_body(pack, model, clip, vae, body)[0]


def test_loss_falls_only_lora_changes_and_file_reloads(pack, tova_folder):
    model, clip, vae = inference_model()
    weights_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    params_before = [(p, p.requires_grad) for p in model.model.diffusion_model.parameters()]
    options_before = copy.deepcopy(model.model_options)
    outcome = train(pack, model, clip, vae, tova_folder, steps=60, lr=2e-2)
    assert len(outcome.losses) == 60 and all(math.isfinite(x) for x in outcome.losses)
    assert all(torch.equal(weights_before[k], v) for k, v in model.model.state_dict().items())
    assert model.model_options == options_before
    # the UNet holds its own parameter objects again (inference tensors, as loaded), flags as they were
    after = list(model.model.diffusion_model.parameters())
    assert len(after) == len(params_before) and all(p is q for (p, _), q in zip(params_before, after))
    assert all(p.is_inference() and p.requires_grad == flag for p, flag in params_before)
    # the saved file, read with safetensors directly, equals what Load ToVA Adapter gives
    loaded = pack.glue("adapters").LoadToVAAdapter.execute("dog.safetensors", "", 1.0, "from file").result[0][0]
    with safe_open(str(tova_folder / "dog.safetensors"), "pt") as handle:
        raw = {key: handle.get_tensor(key) for key in handle.keys()}
        meta = handle.metadata()
    layers = pack.layout(model).layers
    assert len(raw) == 2 * len(layers) == 14 and meta["conceptsplit.identifier_word"] == WORD  # 7 attn2 layers
    assert meta["conceptsplit.base_model"] == "sd2.1-v" and meta["conceptsplit.train_steps"] == "60"
    init = torch.Generator().manual_seed(0)  # A ~ N(0, (1/r)²) drawn in layer order (method §2.5)
    for path, (lora_a, lora_b) in loaded.weights.layers.items():
        assert torch.equal(raw[f"tova.{path}.attn2.to_v.lora_A.weight"], lora_a)
        assert torch.equal(raw[f"tova.{path}.attn2.to_v.lora_B.weight"], lora_b)
        assert torch.equal(outcome.concept.weights.layers[path][1], lora_b)
        assert lora_b.abs().max() > 0  # B started at 0
    for layer in layers:
        initial = torch.randn(4, layer.in_features, generator=init) / 4
        assert not torch.equal(loaded.weights.layers[layer.path][0], initial)  # A moved too
    zero = {p: (a, torch.zeros_like(b)) for p, (a, b) in loaded.weights.layers.items()}
    before = evaluation_loss(pack, model, clip, vae, zero)
    after = evaluation_loss(pack, model, clip, vae, dict(loaded.weights.layers))
    sys.stdout.write(
        f"\nToVA tiny sd21: fixed-item loss {before:.5f} -> {after:.5f}; training loss first 10 "
        f"{sum(outcome.losses[:10]) / 10:.5f}, last 10 {sum(outcome.losses[-10:]) / 10:.5f}\n"
    )
    assert after < before * 0.99


class MergedWeightReference:
    """attn2 patch + replace written independently of the pack: V on row s from the merged weight W + B·A."""

    def __init__(self, model, pairs_by_module, position):
        self.modules = dict(model.model.diffusion_model.named_modules())
        self.pairs = pairs_by_module  # ldm attn2 module path -> (A (r, d), B (C, r)) leaf tensors
        self.position = position

    def stash(self, n, context, value, extra_options):
        extra_options["reference_context"] = context
        return n, context, value

    def __call__(self, q, k, v, extra_options):
        name = module_path_of(extra_options)
        lora_a, lora_b = self.pairs[name]
        merged = self.modules[name].to_v.weight + lora_b @ lora_a  # (C, d): W + B·A, scale alpha/r = 1
        row = torch.nn.functional.linear(extra_options["reference_context"][:, self.position], merged)  # (B, C)
        v = torch.cat([v[:, : self.position], row[:, None], v[:, self.position + 1 :]], dim=1)
        return explicit_attention(q, k, v, extra_options["n_heads"])

    def options(self):
        replace = {}
        for name in self.pairs:
            parts = name.split(".")
            block = ("middle", 0) if parts[0] == "middle_block" else (parts[0][: -len("_blocks")], int(parts[1]))
            replace[(block[0], block[1], int(parts[parts.index("transformer_blocks") + 1]))] = self
        return {"patches": {"attn2_patch": [self.stash]}, "patches_replace": {"attn2": replace}}


def test_gradient_matches_merged_weight_reference(pack):
    import comfy.utils

    core = pack.core("training")
    model, clip, vae = build_tiny_model("sd21", seed=0)
    g = torch.Generator().manual_seed(5)
    captured = {}

    def body(denoise, data, schedule, shapes):
        lora = pack.core("tova_lora").ToVALoraSet(shapes, 4, generator=g)
        lora.load_pairs(
            {
                p: (torch.randn(4, d, generator=g) / 4, torch.randn(c, 4, generator=g) * 0.5)
                for p, (d, c) in shapes.items()
            }
        )  # B != 0, so A gets a gradient too
        sample_ = core.draw_step(data, schedule, (1, 0), 7, 0)  # image 1, template 0 "a photo of a dog"
        loss = core.step_loss(lora, data, schedule, denoise, sample_)
        loss.backward()
        captured.update(
            sample=sample_,
            loss=float(loss.detach()),
            state=lora.state_for_saving(),
            grads={p: (a.grad.clone(), b.grad.clone()) for p, (a, b) in lora.pairs().items()},
        )

    _, conds, positions = run_body(pack, model, clip, vae, body)
    assert positions[0] == DOG_POSITION
    # reference: DDPM x_t, integer t, v target, the raw UNet (no ComfyUI sampling) and merged weights
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    pairs = {}
    for path, (lora_a, lora_b) in captured["state"].items():
        module = mapping[f"{path}.attn2.to_v.weight"][: -len(".to_v.weight")]
        pairs[module] = (lora_a.clone().requires_grad_(True), lora_b.clone().requires_grad_(True))
    s = captured["sample"]
    alpha_bar = 1 / (1 + s.sigma.double() ** 2)  # σ² = (1 − ᾱ)/ᾱ
    x_t = (alpha_bar.sqrt() * s.x0.double() + (1 - alpha_bar).sqrt() * s.noise.double()).float()
    v_target = (alpha_bar.sqrt() * s.noise.double() - (1 - alpha_bar).sqrt() * s.x0.double()).float()
    reference = MergedWeightReference(model, pairs, DOG_POSITION)
    context = conds[0][0][0].clone()
    v_hat = model.model.diffusion_model(
        x_t, s.timestep.float(), context=context, transformer_options=reference.options()
    )
    loss = ((v_hat.float() - v_target) ** 2).mean()
    loss.backward()
    # Two float32 implementations of one UNet forward (they differ only in attn2): the loss is a mean of squares, so
    # their rounding (~1e-6 of the output) changes it relatively; 1e-5 of it stays below what a wrong row or strength
    # changes (the adapter's whole effect on this loss is ~5e-4 of it). The gradients below are the sharper check.
    assert abs(float(loss.detach()) - captured["loss"]) < 1e-5 * float(loss.detach())
    checked = 0
    for path, (grad_a, grad_b) in captured["grads"].items():
        module = mapping[f"{path}.attn2.to_v.weight"][: -len(".to_v.weight")]
        ref_a, ref_b = pairs[module][0].grad, pairs[module][1].grad
        assert grad_b.abs().max() > 0 and grad_a.abs().max() > 0
        # 1e-3 of each gradient's size: float32 rounding through one forward and backward of the two implementations
        # is ~1e-5 of it, a gradient on a wrong row or with a wrong scale (A's gradient is ∝ λ·B) is off by order 1.
        torch.testing.assert_close(grad_a, ref_a, rtol=1e-3, atol=1e-3 * float(ref_a.abs().max()))
        torch.testing.assert_close(grad_b, ref_b, rtol=1e-3, atol=1e-3 * float(ref_b.abs().max()))
        checked += 1
    assert checked == 7


def test_trained_adapter_changes_v_only_on_identifier_rows(pack, tova_folder):
    model, clip, vae = inference_model()
    outcome = train(pack, model, clip, vae, tova_folder, steps=3, lr=1e-2)
    recorder, spied = spy_model(model)
    patched, positive, info = (
        pack.glue("adapters").ApplyToVA.execute(spied, (outcome.concept,), clip, "a photo of a dog").result
    )
    assert f"token {DOG_POSITION}" in info
    sample(patched, clip, positive=positive, steps=2)
    modules = dict(model.model.diffusion_model.named_modules())
    assert len(recorder.calls) == 2 * 7  # 2 steps × 7 layers, cond and uncond in one batch
    with torch.no_grad():
        for name, v, context, _ in recorder.calls:
            base = torch.nn.functional.linear(context, modules[name].to_v.weight)  # (B, T, C)
            changed = (v != base).any(dim=-1)  # (B, T); B = 2: uncond and cond, both get the delta (method §2.3)
            assert changed.shape[0] == 2
            assert changed[:, DOG_POSITION].all() and not changed[:, :DOG_POSITION].any()
            assert not changed[:, DOG_POSITION + 1 :].any()


def _interrupt_at(model, call):
    """A clone whose UNet wrapper asks ComfyUI to interrupt after model call `call` (as the Cancel button does)."""
    import comfy.model_management

    calls = []
    clone = model.clone()

    def wrapper(apply_model, args):
        calls.append(1)
        if len(calls) == call:
            comfy.model_management.interrupt_current_processing(True)
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(wrapper)
    return clone


def test_interrupt_and_resume_equals_uninterrupted(pack, tova_folder):
    import comfy.model_management

    model, clip, vae = inference_model()
    views = pack.core("training_data").crop_views(wide_images(), 64, 4, 0)
    assert all(len(offsets) > 1 for offsets in views.offsets)  # several distinct crops per image are in play
    train = functools.partial(globals()["train"], images=wide_images())
    full = train(pack, model, clip, vae, tova_folder, name="full", steps=6, lr=1e-2, checkpoint_every=2)
    assert not (tova_folder / "full.tova-checkpoint").exists()  # removed once the adapter is saved
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train(pack, _interrupt_at(model, 5), clip, vae, tova_folder, name="part", steps=6, lr=1e-2, checkpoint_every=2)
    assert sorted(p.name for p in tova_folder.iterdir()) == ["full.safetensors", "part.tova-checkpoint"]
    assert pack.core("tova_lora").load_training_checkpoint(tova_folder / "part.tova-checkpoint").step == 4
    resumed = train(pack, model, clip, vae, tova_folder, name="part", steps=6, lr=1e-2, checkpoint_every=2, resume=True)
    assert resumed.resumed_from == 4 and resumed.losses == full.losses
    for path, (lora_a, lora_b) in full.concept.weights.layers.items():
        assert torch.equal(resumed.concept.weights.layers[path][0], lora_a)
        assert torch.equal(resumed.concept.weights.layers[path][1], lora_b)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train(pack, _interrupt_at(model, 3), clip, vae, tova_folder, name="other", steps=6, checkpoint_every=2)
    with pytest.raises(pack.error, match="belongs to a different run"):  # a checkpoint is never mixed up
        train(pack, model, clip, vae, tova_folder, name="other", steps=6, lr=1e-3, checkpoint_every=2, resume=True)


def test_gradient_checkpointing_gives_the_same_adapter_and_restores_the_unet(pack, tova_folder, monkeypatch):
    import torch.utils.checkpoint

    model, clip, vae = inference_model()
    plain = train(pack, model, clip, vae, tova_folder, name="plain", steps=3, lr=1e-2, images=wide_images())
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint,
        "checkpoint",
        lambda *args, **kwargs: calls.append(kwargs["use_reentrant"]) or real_checkpoint(*args, **kwargs),
    )
    checkpointed = train(
        pack,
        model,
        clip,
        vae,
        tova_folder,
        name="checkpointed",
        steps=3,
        lr=1e-2,
        images=wide_images(),
        gradient_checkpointing=True,
    )
    assert calls and set(calls) == {False}  # the blocks really ran checkpointed (non-reentrant)
    assert all("forward" not in module.__dict__ for module in model.model.diffusion_model.modules())  # unpatched
    # Checkpointing recomputes the same float32 ops in the same order (bit-identical); 1e-6 ≈ 8 eps32 at losses and
    # weights ≤ 1 only allows a gradient summed in another order, while a wrong recompute changes them by order 1.
    assert max(abs(a - b) for a, b in zip(plain.losses, checkpointed.losses)) < 1e-6
    for path, (lora_a, lora_b) in plain.concept.weights.layers.items():
        other_a, other_b = checkpointed.concept.weights.layers[path]
        assert (other_a - lora_a).abs().max() < 1e-6 and (other_b - lora_b).abs().max() < 1e-6
    assert any(b.abs().max() > 0 for _, b in plain.concept.weights.layers.values())  # the weights did move


def test_failed_save_leaves_no_partial_file(pack, tova_folder, monkeypatch):
    model, clip, vae = inference_model()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(pack, model, clip, vae, tova_folder, steps=2)
    assert list(tova_folder.iterdir()) == []


def _nan_after(model, call):
    clone = model.clone()
    calls = []

    def wrapper(apply_model, args):
        calls.append(1)
        out = apply_model(args["input"], args["timestep"], **args["c"])
        return out * float("nan") if len(calls) >= call else out

    clone.set_model_unet_function_wrapper(wrapper)
    return clone


@pytest.mark.parametrize(
    "case, match",
    [
        ("no images", "No training images"),
        ("blank word", "gives no tokens"),
        ("rank too large", "Rank 65 is larger"),
        ("path in name", "not allowed"),
        ("existing file", "already exists"),
        ("nan loss", "diverged at step 3"),
    ],
)
def test_bad_input_is_one_error_and_writes_nothing(pack, tova_folder, case, match):
    model, clip, vae = inference_model()
    kwargs = {"steps": 4}
    if case == "no images":
        kwargs["images"] = torch.zeros(0, 64, 64, 3)
    elif case == "blank word":
        kwargs["word"] = "   "
    elif case == "rank too large":
        kwargs["rank"] = 65  # d = 64 in the tiny SD2.1
    elif case == "path in name":
        kwargs["name"] = "../escape"
    elif case == "existing file":
        (tova_folder / "dog.safetensors").write_bytes(b"keep me")
    elif case == "nan loss":
        model = _nan_after(model, 3)
        kwargs["checkpoint_every"] = 2
    before = {p.name: p.read_bytes() for p in tova_folder.iterdir()}
    with pytest.raises(pack.error, match=match) as info:
        train(pack, model, clip, vae, tova_folder, **kwargs)
    assert "Seen:" in str(info.value) and "Fix:" in str(info.value)
    after = {p.name: p.read_bytes() for p in tova_folder.iterdir()}
    if case == "nan loss":  # the last good checkpoint (step 2) is kept and named
        assert "dog.tova-checkpoint" in str(info.value)
        assert pack.core("tova_lora").load_training_checkpoint(tova_folder / "dog.tova-checkpoint").step == 2
        after.pop("dog.tova-checkpoint")
    assert after == before and not (tova_folder.parent / "escape.safetensors").exists()


def _write_photos(folder: Path, sizes=((64, 64), (64, 64), (64, 64))) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = synthetic_images(len(sizes))
    for i, (w, h) in enumerate(sizes):
        pixels = (images[i] * 255).round().byte().numpy()
        Image.fromarray(pixels).resize((w, h)).save(folder / f"photo_{i}.png")


def test_training_workflow_on_the_server_then_generation(comfy_server):
    _write_photos(comfy_server.base_dir / "input" / "my_dog")
    model = ["1", 0]
    graph = {
        "1": {"class_type": "ConceptSplitTestTinyModelLoader", "inputs": {"arch": "sd21", "seed": 0}},
        "2": {"class_type": "ConceptSplitLoadTrainingImages", "inputs": {"folder": "my_dog", "resolution": 64}},
        "3": {
            "class_type": "ConceptSplitTrainToVA",
            "inputs": {
                "model": model,
                "clip": ["1", 1],
                "vae": ["1", 2],
                "images": ["2", 0],
                "identifier_word": "dog",
                "steps": 2,
                "learning_rate": 1e-3,
                "rank": 4,
                "seed": 0,
                "resolution": 64,
                "save_name": "server_dog",
                "overwrite": False,
                "checkpoint_every": 0,
                "resume": False,
            },
        },
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
        "5": {
            "class_type": "ConceptSplitApplyToVA",
            "inputs": {"model": model, "adapters": ["3", 0], "clip": ["1", 1], "text": "a photo of a dog"},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["5", 0],
                "positive": ["5", 1],
                "negative": ["6", 0],
                "latent_image": ["7", 0],
                "seed": 0,
                "steps": 2,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }
    entry = comfy_server.run(graph, timeout=240)
    assert comfy_server.output_images(entry, "4")[0].size == (512, 256)  # the loss curve
    assert comfy_server.output_images(entry, "10")[0].size == (64, 64)
    saved = comfy_server.base_dir / "models" / "tova" / "server_dog.safetensors"
    assert saved.is_file()
    # the saved file in a plain generation workflow; a second training run under the same name is refused
    graph["5"]["inputs"]["adapters"] = ["11", 0]
    graph["11"] = {
        "class_type": "ConceptSplitLoadAdapter",
        "inputs": {
            "adapter_name": "server_dog.safetensors",
            "identifier_word": "",
            "strength": 1.0,
            "role": "from file",
        },
    }
    del graph["3"], graph["4"]
    entry = comfy_server.run(graph, timeout=120)
    assert comfy_server.output_images(entry, "10")[0].size == (64, 64)
    again = {k: graph[k] for k in ("1", "2")} | {
        "3": {
            "class_type": "ConceptSplitTrainToVA",
            "inputs": {
                "model": model,
                "clip": ["1", 1],
                "vae": ["1", 2],
                "images": ["2", 0],
                "identifier_word": "dog",
                "steps": 2,
                "learning_rate": 1e-3,
                "rank": 4,
                "seed": 1,
                "resolution": 64,
                "save_name": "server_dog",
                "overwrite": False,
                "checkpoint_every": 0,
                "resume": False,
            },
        }
    }
    assert "already exists" in comfy_server.run_expect_error(again)


def test_command_line_trainer_on_a_tiny_model(comfyui, tmp_path):
    _write_photos(tmp_path / "photos", sizes=((80, 64), (64, 96), (72, 72)))  # different sizes are fine
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES[:3]) + "\n")
    command = [
        sys.executable,
        str(REPO / "scripts" / "train_tova.py"),
        "--tiny",
        "sd21",
        "--images",
        str(tmp_path / "photos"),
        "--word",
        "dog",
        "--name",
        "cli_dog",
        "--steps",
        "3",
        "--rank",
        "4",
        "--resolution",
        "64",
        "--output-dir",
        str(tmp_path / "out"),
        "--templates",
        str(tmp_path / "templates.txt"),
    ]
    env = dict(os.environ, COMFYUI_PATH=str(comfyui), OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "saved" in done.stdout and "loss" in done.stdout
    with safe_open(str(tmp_path / "out" / "cli_dog.safetensors"), "pt") as handle:
        assert handle.metadata()["conceptsplit.identifier_word"] == "dog" and len(list(handle.keys())) == 14
