"""DiT workflows as workflow JSON through the real ComfyUI server (issue 14): each DiT family's tiny model (the test
helper pack's Tiny DiT Loader: MODEL, CLIP and a VAE of the family's latent format) wired as its users wire it.

Graph 1: ConceptSplit Text Encode → (Flux.1: FluxGuidance) → Capture Attention → LODA Sampler → VAE Decode →
Attention Map Viewer (capture, LATENT, image, the LODA masks) and the masks, with the sampling nodes of the family
(Flux.1: cfg 1, the guidance in the conditioning; Qwen-Image: ModelSamplingAuraFlow, cfg 2.5; Z-Image-Turbo:
ModelSamplingAuraFlow shift 3, cfg 1; Flux.2 klein: the model's own sampling, cfg 1, EmptyFlux2LatentImage).
Graph 2: the same prompt through ConceptSplit LODA inside SamplerCustom and inside SamplerCustomAdvanced (Flux.1:
ModelSamplingFlux, BasicScheduler, BasicGuider, RandomNoise; Qwen-Image: CFGGuider; Z-Image and Flux.2 klein:
BasicGuider), with the LODA Sampler of graph
1 on the same model, seed and schedule: all three are one sampling run, so they give the same masks and images.

Z-Image and Flux.2 exist from ComfyUI 0.33.0 on: the families tested are those whose model class the ComfyUI under test
has (families_to_test); Flux.1 and Qwen-Image are in every supported version, so no parametrization is ever empty. On a
ComfyUI without them, tests/integration/test_workflows.py checks what a user of their example workflows sees.
"""

from __future__ import annotations

import numpy as np

from comfy_harness.loda_settings import LODA_NODE_SETTINGS
from comfy_harness.tiny_dit_models import dit_families_in_source

PROMPT = "a photo of a cat and a dog"
WORDS = "cat, dog"
SIZE = 112  # 14×14 latent -> 7×7 image tokens (patch 2): LODA's smallest maps (7×7 smoothing kernel)
STEPS, LODA_STEPS = 3, 1
SETTINGS = dict(LODA_NODE_SETTINGS, loda_steps=LODA_STEPS)

# Per family: how its users sample it. `model_sampling` is the node (and widgets) between the loader and the
# samplers (None: the model's own sampling, as Flux.2 klein users wire it), `latent` the empty-latent node,
# `guidance` a FluxGuidance on the positive, `guider` the SamplerCustomAdvanced guider, `rows` the token rows the LODA
# report binds the words to (T5 writes "a" as two pieces: cat 6, dog 10; Qwen-Image drops its chat preamble: cat 4,
# dog 7; Z-Image and Flux.2 keep the chat template's '<|im_start|>', 'user', newline: cat 7, dog 10; the same rows as
# tests/integration/test_dit_families.py).
FAMILIES = {
    "flux": dict(
        display="Flux.1",
        cfg=1.0,
        model_sampling=("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5, "width": SIZE, "height": SIZE}),
        latent="EmptySD3LatentImage",
        guidance=3.5,
        guider="BasicGuider",
        rows={"cat": 6, "dog": 10},
    ),
    "qwenimage": dict(
        display="Qwen-Image",
        cfg=2.5,
        model_sampling=("ModelSamplingAuraFlow", {"shift": 3.1}),
        latent="EmptySD3LatentImage",
        guidance=None,
        guider="CFGGuider",
        rows={"cat": 4, "dog": 7},
    ),
    "zimage": dict(  # Z-Image-Turbo as ComfyUI 0.33's template samples it: AuraFlow shift 3, cfg 1
        display="Z-Image",
        cfg=1.0,
        model_sampling=("ModelSamplingAuraFlow", {"shift": 3.0}),
        latent="EmptySD3LatentImage",
        guidance=None,
        guider="BasicGuider",
        rows={"cat": 7, "dog": 10},
    ),
    "flux2": dict(  # Flux.2 klein (distilled): cfg 1, the 128-channel latent at 1/16 (112 px -> 7x7 tokens, patch 1)
        display="Flux.2",
        cfg=1.0,
        model_sampling=None,
        latent="EmptyFlux2LatentImage",
        guidance=None,
        guider="BasicGuider",
        rows={"cat": 7, "dog": 10},
    ),
}


def families_to_test() -> tuple[str, ...]:
    """The FAMILIES whose model classes the ComfyUI under test has (read from its source at collection time)."""
    from comfy_harness.comfy_bootstrap import comfyui_path

    try:
        present = dit_families_in_source(comfyui_path())
    except RuntimeError:  # COMFYUI_PATH set but wrong: the comfyui fixture reports it
        present = None
    return tuple(name for name in FAMILIES if present is None or name in present)


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", families_to_test())


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def common(family: str) -> dict:
    """Loader, prompt (positive with the family's guidance), negative, model sampling and the family's empty latent.
    Without a model-sampling node (no "5"), the loader's MODEL goes to the samplers."""
    spec = FAMILIES[family]
    g = {
        "1": node("ConceptSplitTestTinyDitLoader", family=family, seed=0),
        "2": node("ConceptSplitTextEncode", clip=["1", 1], text=PROMPT),
        "3": node("CLIPTextEncode", clip=["1", 1], text=""),
        "4": node(spec["latent"], width=SIZE, height=SIZE, batch_size=1),
    }
    if spec["model_sampling"] is not None:
        kind, widgets = spec["model_sampling"]
        g["5"] = node(kind, model=["1", 0], **widgets)
    if spec["guidance"] is not None:
        g["6"] = node("FluxGuidance", conditioning=["2", 0], guidance=spec["guidance"])
    return g


def model(graph: dict) -> list:
    """The sampled MODEL: the model-sampling node's output where the family has one, else the loader's."""
    return ["5", 0] if "5" in graph else ["1", 0]


def positive(graph: dict) -> list:
    """The sampled positive: FluxGuidance's output where the family has one, else ConceptSplit Text Encode's."""
    return ["6", 0] if "6" in graph else ["2", 0]


def loda_sampler_graph(family: str) -> dict:
    """Graph 1: Capture Attention -> LODA Sampler -> VAE Decode -> Attention Map Viewer, masks and image shown."""
    g = common(family)
    g.update(
        {
            "10": node(
                "ConceptSplitCaptureAttention",
                model=model(g),
                words=WORDS,
                positive=["2", 0],
                token_mode="first token",
                first_step=LODA_STEPS,  # attention fixing runs from step N: did it work?
                last_step=-1,
                layers="all",
                blocks="",
            ),
            "11": node(
                "ConceptSplitLodaSampler",
                model=["10", 0],
                seed=0,
                steps=STEPS,
                cfg=FAMILIES[family]["cfg"],
                sampler_name="euler",
                scheduler="simple",
                positive=positive(g),
                negative=["3", 0],
                latent_image=["4", 0],
                denoise=1.0,
                concept_words=WORDS,
                **SETTINGS,
            ),
            "12": node("VAEDecode", samples=["11", 0], vae=["1", 2]),
            "13": node("PreviewImage", images=["12", 0]),
            "14": node("MaskToImage", mask=["11", 1]),
            "15": node("PreviewImage", images=["14", 0]),
            "16": node(
                "ConceptSplitAttentionViewer",
                capture=["10", 1],
                samples=["11", 0],
                image=["12", 0],
                alpha=0.5,
                colormap="inferno",
                concept_masks=["11", 1],
            ),
            "17": node("PreviewImage", images=["16", 0]),
        }
    )
    return g


def custom_sampler_graph(family: str) -> dict:
    """Graph 2: ConceptSplit LODA in SamplerCustom and in SamplerCustomAdvanced, and the LODA Sampler, one schedule."""
    spec = FAMILIES[family]
    g = common(family)
    loda = dict(concept_words=WORDS, **SETTINGS)
    guider = (
        node("BasicGuider", model=model(g), conditioning=positive(g))
        if spec["guider"] == "BasicGuider"
        else node("CFGGuider", model=model(g), positive=positive(g), negative=["3", 0], cfg=spec["cfg"])
    )
    g.update(
        {
            "20": node("KSamplerSelect", sampler_name="euler"),
            "21": node("BasicScheduler", model=model(g), scheduler="simple", steps=STEPS, denoise=1.0),
            "22": node("ConceptSplitLoda", sampler=["20", 0], **loda),
            "23": node(
                "SamplerCustom",
                model=model(g),
                add_noise=True,
                noise_seed=0,
                cfg=spec["cfg"],
                positive=positive(g),
                negative=["3", 0],
                sampler=["22", 0],
                sigmas=["21", 0],
                latent_image=["4", 0],
            ),
            "24": node("ConceptSplitLodaResults", latent=["23", 0], loda_result=["22", 1]),
            "25": node("ConceptSplitLoda", sampler=["20", 0], **loda),  # its own holder: one result per sampler
            "26": node("RandomNoise", noise_seed=0),
            "27": guider,
            "28": node(
                "SamplerCustomAdvanced",
                noise=["26", 0],
                guider=["27", 0],
                sampler=["25", 0],
                sigmas=["21", 0],
                latent_image=["4", 0],
            ),
            "29": node("ConceptSplitLodaResults", latent=["28", 0], loda_result=["25", 1]),
            "30": node(
                "ConceptSplitLodaSampler",
                model=model(g),
                seed=0,
                steps=STEPS,
                cfg=spec["cfg"],
                sampler_name="euler",
                scheduler="simple",
                positive=positive(g),
                negative=["3", 0],
                latent_image=["4", 0],
                denoise=1.0,
                **loda,
            ),
        }
    )
    for first, (latent, masks, report) in enumerate(
        ((["23", 0], ["24", 0], ["24", 2]), (["28", 0], ["29", 0], ["29", 2]), (["30", 0], ["30", 1], ["30", 3]))
    ):
        base = 40 + 10 * first
        g[str(base)] = node("VAEDecode", samples=latent, vae=["1", 2])
        g[str(base + 1)] = node("PreviewImage", images=[str(base), 0])
        g[str(base + 2)] = node("MaskToImage", mask=masks)
        g[str(base + 3)] = node("PreviewImage", images=[str(base + 2), 0])
        g[str(base + 4)] = node("PreviewAny", source=report)
    return g


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def check_masks(images) -> None:
    """One mask per concept, each with some pixels set: about the top 10 % of the 7×7 cells (γ = 0.9)."""
    assert len(images) == 2
    for mask in images:
        on = int((np.asarray(mask.convert("L")) > 127).sum())
        assert 0 < on < SIZE * SIZE // 2, on


def test_the_tiny_dit_loader_offers_every_tested_family(comfy_server):
    (choices, _), *_ = comfy_server.object_info("ConceptSplitTestTinyDitLoader")["ConceptSplitTestTinyDitLoader"][
        "input"
    ]["required"].values()
    # exactly the families whose model class this ComfyUI has (Z-Image and Flux.2 from 0.33.0 on), then the plain
    # Lumina2 stand-in the pack refuses (tests/integration/test_workflows.py)
    assert sorted(choices) == sorted([*families_to_test(), "lumina2"])
    assert {"flux", "qwenimage"} <= set(families_to_test())  # in every supported ComfyUI


def mask_shares(report: str) -> list[tuple[float, float]]:
    """(share, mask area) per word from the viewer's table of each word's attention inside its own mask."""
    rows = report.split("Attention inside each word's own mask", 1)[1].splitlines()[2:4]
    return [(float(row.split()[1]), float(row.split()[2])) for row in rows]


def test_loda_sampler_capture_and_viewer_run_as_workflow_json(comfy_server, family):
    graph = loda_sampler_graph(family)
    entry = comfy_server.run(graph, timeout=300)
    (image,) = comfy_server.output_images(entry, "13")
    assert image.size == (SIZE, SIZE) and pixels(image).std() > 1.0  # the tiny VAE decoded something, not a flat tile
    masks = comfy_server.output_images(entry, "15")
    check_masks(masks)

    viewer = entry["outputs"]["16"]
    report = viewer["text"][0]
    assert "cat / dog" in report and "LODA harmonic mean" in report, report
    assert f"steps {LODA_STEPS}-{STEPS - 1} ({STEPS - LODA_STEPS} steps)" in report, report
    (grid,) = comfy_server.output_images(entry, "17")
    assert grid.size == (2 * SIZE + 3 * 2, SIZE + 16 + 2 * 2)  # 2 tiles, 2 px borders, a 16 px label strip

    # The same run with attention fixing off (boost and suppression 0): same stage 1, so the same masks.
    graph["11"]["inputs"].update(boost=0.0, suppression=0.0)
    unfixed = comfy_server.run(graph, timeout=300)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(masks, comfy_server.output_images(unfixed, "15")))
    # Fixing (boost +5 inside a word's own mask, -1e8 for the other word there) ran in the captured steps and moved
    # each word's attention into its own mask. Seen on seeds 0-2 (mask area 5/49 = 0.102): shares 0.82-0.93 with
    # fixing, 0.09-0.18 without; 0.5 lies between with margins of 0.3 both ways.
    for (fixed_share, area), (plain_share, plain_area) in zip(
        mask_shares(report), mask_shares(unfixed["outputs"]["16"]["text"][0])
    ):
        assert area == plain_area and area < 0.2, (area, plain_area)
        assert fixed_share > 0.5 > plain_share, (FAMILIES[family]["display"], fixed_share, plain_share)


def test_loda_in_samplercustom_and_advanced_equals_the_loda_sampler(comfy_server, family):
    """Same model, noise seed, sigmas (BasicScheduler simple = the LODA Sampler's simple schedule), cfg and LODA
    settings: SamplerCustom, SamplerCustomAdvanced with the family's guider and the LODA Sampler are one run."""
    entry = comfy_server.run(custom_sampler_graph(family), timeout=300)
    images = {base: pixels(comfy_server.output_images(entry, str(base + 1))[0]) for base in (40, 50, 60)}
    masks = {base: [pixels(m) for m in comfy_server.output_images(entry, str(base + 3))] for base in (40, 50, 60)}
    reports = {base: "\n".join(entry["outputs"][str(base + 4)]["text"]) for base in (40, 50, 60)}
    for base in (40, 50, 60):
        assert images[base].shape == (SIZE, SIZE, 3)
        check_masks(comfy_server.output_images(entry, str(base + 3)))
        for word, row in FAMILIES[family]["rows"].items():
            assert f"{word} -> row {row} ('{word}')" in reports[base], reports[base]
        assert f"stage 1 on steps 0..{LODA_STEPS - 1} of {STEPS}" in reports[base], reports[base]
    for base in (40, 50):
        # the masks are thresholded maps of the same step: identical; the images within 8-bit rounding
        assert all(np.array_equal(a, b) for a, b in zip(masks[base], masks[60])), base
        assert np.abs(images[base] - images[60]).max() <= 1, base
