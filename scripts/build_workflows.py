"""Generate the example workflows in workflows/ (UI format, for ComfyUI's template browser) from compact API graphs.

    COMFYUI_PATH=/path/to/ComfyUI python scripts/build_workflows.py              # every workflow -> workflows/*.json
    COMFYUI_PATH=... python scripts/build_workflows.py --only two_concepts_tova_sd21
    COMFYUI_PATH=... python scripts/build_workflows.py --thumbnails               # also workflows/*.jpg and the README
                                                                                  # screenshot (needs chromium and
                                                                                  # playwright; comfy_harness/browser)

Node definitions come from the real ComfyUI (bootstrapped in this process, the pack loaded by ComfyUI's own loader),
so widget order and defaults are what the frontend expects. Build with the oldest supported ComfyUI (0.3.64):
newer versions add outputs to core nodes (SaveImage's `images` in 0.33) that older frontends do not know.
Exception: a workflow whose `comfyui` is newer (loda_flux2_klein: EmptyFlux2LatentImage and CLIPLoader type flux2
exist from 0.33.0 on) is built with that version; 0.3.64 reports its missing node types and writes nothing:
    COMFYUI_PATH=.../comfyui-0.33.0/ComfyUI python scripts/build_workflows.py --thumbnails --only loda_flux2_klein
One function per workflow, registered with `@workflow(...)`: it returns the API graph (omitted widget inputs get
their defaults). A DiT family's workflow is one `DitModel` (its loaders and sampling settings) passed to `dit_loda`.
Adapter and bound-LoRA file names start with their concept word
(`<identifier word>_<family>.safetensors`, `<concept word>_character_<family>.safetensors`);
tests/integration/test_workflows.py relies on it to serve tiny adapters and LoRAs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS_DIR = REPO_ROOT / "workflows"
README_SCREENSHOT = REPO_ROOT / "docs" / "images" / "workflow_two_concepts.png"
README_WORKFLOW = "two_concepts_tova_sd21"
THUMBNAIL_WIDTH = 400

logger = logging.getLogger("build_workflows")

SD21_CHECKPOINT = "v2-1_768-ema-pruned.safetensors"
SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
NEGATIVE = "blurry, low quality, deformed"


@dataclass(frozen=True)
class WorkflowDef:
    name: str
    family: str  # sd15 | sd21 | sdxl | a DiT family of nodes/families (flux, qwenimage, zimage, flux2)
    title: str
    note: str
    build: Callable[[], dict]
    comfyui: str = "0.3.64"  # the ComfyUI to build it with: the oldest that has its node types and model class


WORKFLOWS: dict[str, WorkflowDef] = {}


def workflow(name: str, family: str, title: str, note: str, comfyui: str = "0.3.64"):
    """Register a function returning an API graph as the workflow `workflows/<name>.json`."""

    def register(build: Callable[[], dict]) -> Callable[[], dict]:
        WORKFLOWS[name] = WorkflowDef(name, family, title, note, build, comfyui)
        return build

    return register


# -- building blocks (API format; ids are strings of integers) ------------------------------------------------
def node(class_type: str, title: str | None = None, **inputs) -> dict:
    out = {"class_type": class_type, "inputs": inputs}
    if title:
        out["_meta"] = {"title": title}
    return out


def adapters(first_id: int, words: list[str], family: str) -> dict:
    """A chain of Load ToVA Adapter nodes, one per word; the last one's output holds every adapter."""
    graph = {}
    for i, word in enumerate(words):
        inputs = {
            "adapter_name": f"{word}_{family}.safetensors",
            "identifier_word": "",
            "strength": 1.0,
            "role": "from file",
        }
        if i:
            inputs["adapters"] = [str(first_id + i - 1), 0]
        graph[str(first_id + i)] = node("ConceptSplitLoadAdapter", title=f"Load ToVA Adapter ({word})", **inputs)
    return graph


def decode_and_save(latent: list, vae: list, first_id: int, prefix: str) -> dict:
    return {
        str(first_id): node("VAEDecode", samples=latent, vae=vae),
        str(first_id + 1): node("SaveImage", images=[str(first_id), 0], filename_prefix=prefix),
    }


V_PREDICTION = {"sampling": "v_prediction", "zsnr": False}
SAMPLING_50 = {"seed": 0, "steps": 50, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}


# -- the workflows --------------------------------------------------------------------------------------------
@workflow(
    "two_concepts_tova_sd21",
    family="sd21",
    title="Two personal concepts in one image (ToVA, SD2.1)",
    note=(
        "Two personal concepts in one image with ToVA (ConceptSplit, ICCV 2025).\n\n"
        "Set:\n"
        "1. Load Checkpoint: Stable Diffusion 2.1 (768-v).\n"
        "2. Each Load ToVA Adapter: an adapter file from models/tova (trained with Train ToVA Adapter or "
        "scripts/train_tova.py). 'from file' uses the identifier word and role stored in the file.\n"
        "3. Apply ToVA to Model, text: the prompt. It must contain each adapter's identifier word (here: dog, cat).\n\n"
        "ModelSamplingDiscrete = v_prediction, because ComfyUI may detect SD2.1-768 as eps. "
        "Paper settings: 768x768, DDIM, 50 steps, CFG 7.5."
    ),
)
def two_concepts_tova_sd21() -> dict:
    graph = {
        "1": node("CheckpointLoaderSimple", ckpt_name=SD21_CHECKPOINT),
        "2": node("ModelSamplingDiscrete", model=["1", 0], **V_PREDICTION),
        **adapters(3, ["dog", "cat"], "sd21"),
        "5": node(
            "ConceptSplitApplyToVA",
            model=["2", 0],
            adapters=["4", 0],
            clip=["1", 1],
            text="a photo of a dog and a cat sitting on a sofa",
            apply_to_uncond=True,
        ),
        "6": node("CLIPTextEncode", title="Negative prompt", clip=["1", 1], text=NEGATIVE),
        "7": node("EmptyLatentImage", width=768, height=768, batch_size=1),
        "8": node(
            "KSampler", model=["5", 0], positive=["5", 1], negative=["6", 0], latent_image=["7", 0], **SAMPLING_50
        ),
    }
    graph.update(decode_and_save(["8", 0], ["1", 2], 9, "conceptsplit/two_concepts"))
    return graph


LODA_NOTE = (
    "LODA Sampler: a KSampler that also separates the concepts' attention in the first steps (LODA). "
    "concept_words: the words to separate (empty = the identifier words of the ToVA adapters). "
    "The masks output shows where each concept was placed."
)


def tova_loda(family: str, checkpoint: str, size: int) -> dict:
    """ToVA adapters + LODA Sampler; SD2.1-768 gets ModelSamplingDiscrete v_prediction."""
    graph = {"1": node("CheckpointLoaderSimple", ckpt_name=checkpoint)}
    model = ["1", 0]
    if family == "sd21":
        graph["2"] = node("ModelSamplingDiscrete", model=["1", 0], **V_PREDICTION)
        model = ["2", 0]
    graph.update(adapters(3, ["dog", "cat"], family))
    graph.update(
        {
            "5": node(
                "ConceptSplitApplyToVA",
                model=model,
                adapters=["4", 0],
                clip=["1", 1],
                text="a photo of a dog and a cat playing in the snow",
                apply_to_uncond=True,
            ),
            "6": node("CLIPTextEncode", title="Negative prompt", clip=["1", 1], text=NEGATIVE),
            "7": node("EmptyLatentImage", width=size, height=size, batch_size=1),
            "8": node(
                "ConceptSplitLodaSampler",
                model=["5", 0],
                positive=["5", 1],
                negative=["6", 0],
                latent_image=["7", 0],
                concept_words="",
                **SAMPLING_50,
            ),
            "11": node("MaskToImage", mask=["8", 1]),
            "12": node("PreviewImage", title="Concept masks", images=["11", 0]),
        }
    )
    graph.update(decode_and_save(["8", 0], ["1", 2], 9, f"conceptsplit/tova_loda_{family}"))
    return graph


@workflow(
    "tova_loda_sd21",
    family="sd21",
    title="ToVA + LODA, two concepts (SD2.1)",
    note=(
        "ToVA + LODA: the full ConceptSplit pipeline on Stable Diffusion 2.1 (768-v).\n\n"
        "Set:\n1. Load Checkpoint: SD2.1 768-v (ModelSamplingDiscrete = v_prediction).\n"
        "2. Each Load ToVA Adapter: your adapter file (models/tova).\n"
        "3. Apply ToVA to Model, text: a prompt with each identifier word (dog, cat).\n\n" + LODA_NOTE
    ),
)
def tova_loda_sd21() -> dict:
    return tova_loda("sd21", SD21_CHECKPOINT, 768)


@workflow(
    "tova_loda_sdxl",
    family="sdxl",
    title="ToVA + LODA, two concepts (SDXL)",
    note=(
        "ToVA + LODA on SDXL.\n\n"
        "Set:\n1. Load Checkpoint: SDXL base 1.0.\n"
        "2. Each Load ToVA Adapter: an adapter trained on SDXL (models/tova).\n"
        "3. Apply ToVA to Model, text: a prompt with each identifier word (dog, cat).\n\n" + LODA_NOTE
    ),
)
def tova_loda_sdxl() -> dict:
    return tova_loda("sdxl", SDXL_CHECKPOINT, 1024)


@workflow(
    "loda_plain_sd15",
    family="sd15",
    title="LODA alone on a plain model (SD1.5)",
    note=(
        "LODA without adapters: keeps two subjects of a plain model apart (less mixing of a dog and a cat).\n\n"
        "Set:\n1. Load Checkpoint: any SD1.5 model.\n"
        "2. ConceptSplit Text Encode: the prompt.\n"
        "3. LODA Sampler, concept_words: the words to separate, comma-separated (at least 2), all in the prompt.\n\n"
        "ConceptSplit Text Encode (not CLIP Text Encode) is needed: it keeps the token positions LODA looks up."
    ),
)
def loda_plain_sd15() -> dict:
    graph = {
        "1": node("CheckpointLoaderSimple", ckpt_name=SD15_CHECKPOINT),
        "2": node("ConceptSplitTextEncode", clip=["1", 1], text="a photo of a dog and a cat on a wooden floor"),
        "3": node("CLIPTextEncode", title="Negative prompt", clip=["1", 1], text=NEGATIVE),
        "4": node("EmptyLatentImage", width=512, height=512, batch_size=1),
        "5": node(
            "ConceptSplitLodaSampler",
            model=["1", 0],
            positive=["2", 0],
            negative=["3", 0],
            latent_image=["4", 0],
            concept_words="dog, cat",
            **SAMPLING_50,
        ),
        "8": node("MaskToImage", mask=["5", 1]),
        "9": node("PreviewImage", title="Concept masks", images=["8", 0]),
    }
    graph.update(decode_and_save(["5", 0], ["1", 2], 6, "conceptsplit/loda_plain"))
    return graph


@workflow(
    "bound_loras_sdxl",
    family="sdxl",
    title="Two character LoRAs, each on its own subject (SDXL)",
    note=(
        "Bound LoRAs: two ordinary LoRA files, each bound to one concept word, so each acts only on its own subject "
        "(inside the mask LODA finds for it), unmerged, in one model pass per step.\n\n"
        "Set:\n1. Load Checkpoint: SDXL base 1.0 (or a fine-tune).\n"
        "2. ConceptSplit Text Encode: the prompt, holding each bound word (here dog, cat).\n"
        "3. Each Bind LoRA to Concept: a LoRA file from models/loras (kohya, diffusers, PEFT, LyCORIS: whatever Load "
        "LoRA reads), concept_word = its subject's word in the prompt, strength as Load LoRA's strength_model.\n"
        "4. LODA Sampler, concept_words: every bound word (here dog, cat).\n\n"
        "Apply Bound LoRAs needs a LODA sampler (it stops with an error otherwise). stage1 = off: the LoRAs act once "
        "LODA's masks exist. The info text lists what each LoRA patches."
    ),
)
def bound_loras_sdxl() -> dict:
    graph = {
        "1": node("CheckpointLoaderSimple", ckpt_name=SDXL_CHECKPOINT),
        "2": node("ConceptSplitTextEncode", clip=["1", 1], text="a photo of a dog and a cat playing in a garden"),
        "3": node("CLIPTextEncode", title="Negative prompt", clip=["1", 1], text=NEGATIVE),
        "4": node(
            "ConceptSplitBindLora",
            title="Bind LoRA to Concept (dog)",
            lora_name="dog_character_sdxl.safetensors",
            concept_word="dog",
            strength=1.0,
        ),
        "5": node(
            "ConceptSplitBindLora",
            title="Bind LoRA to Concept (cat)",
            lora_name="cat_character_sdxl.safetensors",
            concept_word="cat",
            strength=1.0,
            bound_loras=["4", 0],
        ),
        "6": node("ConceptSplitApplyBoundLoras", model=["1", 0], bound_loras=["5", 0], positive=["2", 0]),
        "7": node("PreviewAny", title="Bound LoRA info", source=["6", 1]),
        "8": node("EmptyLatentImage", width=1024, height=1024, batch_size=1),
        "9": node(
            "ConceptSplitLodaSampler",
            model=["6", 0],
            positive=["2", 0],
            negative=["3", 0],
            latent_image=["8", 0],
            concept_words="dog, cat",
            **SAMPLING_50,
        ),
        "12": node("MaskToImage", mask=["9", 1]),
        "13": node("PreviewImage", title="Concept masks", images=["12", 0]),
    }
    graph.update(decode_and_save(["9", 0], ["1", 2], 10, "conceptsplit/bound_loras_sdxl"))
    return graph


@workflow(
    "attention_maps_sd21",
    family="sd21",
    title="Attention maps of each concept (SD2.1)",
    note=(
        "See where each concept's word attends while sampling (the picture of concept mixing in the paper).\n\n"
        "Set:\n1. Load Checkpoint: SD2.1 768-v; the adapters as in the ToVA workflow.\n"
        "2. Capture Attention, words: the words to show, comma-separated (here dog, cat).\n"
        "3. Attention Map Viewer shows one heatmap per word over the image; its masks output is one mask per word.\n\n"
        "Capture Attention goes between the model and the sampler; the viewer takes the sampler's LATENT so it runs "
        "after sampling."
    ),
)
def attention_maps_sd21() -> dict:
    graph = {
        "1": node("CheckpointLoaderSimple", ckpt_name=SD21_CHECKPOINT),
        "2": node("ModelSamplingDiscrete", model=["1", 0], **V_PREDICTION),
        **adapters(3, ["dog", "cat"], "sd21"),
        "5": node(
            "ConceptSplitApplyToVA",
            model=["2", 0],
            adapters=["4", 0],
            clip=["1", 1],
            text="a photo of a dog and a cat sitting on a sofa",
            apply_to_uncond=True,
        ),
        "6": node("ConceptSplitCaptureAttention", model=["5", 0], words="dog, cat", positive=["5", 1]),
        "7": node("CLIPTextEncode", title="Negative prompt", clip=["1", 1], text=NEGATIVE),
        "8": node("EmptyLatentImage", width=768, height=768, batch_size=1),
        "9": node(
            "KSampler", model=["6", 0], positive=["5", 1], negative=["7", 0], latent_image=["8", 0], **SAMPLING_50
        ),
        "12": node("ConceptSplitAttentionViewer", capture=["6", 1], samples=["9", 0], image=["10", 0]),
        "13": node("PreviewImage", title="Attention maps", images=["12", 0]),
    }
    graph.update(decode_and_save(["9", 0], ["1", 2], 10, "conceptsplit/attention_maps"))
    return graph


@workflow(
    "train_tova_adapter_sd21",
    family="sd21",
    title="Train a ToVA adapter from photos (SD2.1)",
    note=(
        "Train a ToVA adapter for one concept from 3-20 photos, then try it.\n\n"
        "Set:\n1. Put the photos in a folder under ComfyUI/input (here input/my_dog), press R and pick it in "
        "Load Training Photos (any sizes; each is cropped square at resolution, 768 for SD2.1).\n"
        "2. Train ToVA Adapter: identifier_word = the plain class word (dog, cat, ...), save_name = the file name "
        "in models/tova. The paper trains 300 steps at lr 1e-4, rank 64 (about an hour on a GPU).\n"
        "3. The lower branch generates a test image with the new adapter; afterwards load it with Load ToVA "
        "Adapter.\n\n"
        "The loss curve preview shows how training went."
    ),
)
def train_tova_adapter_sd21() -> dict:
    graph = {
        "1": node("CheckpointLoaderSimple", ckpt_name=SD21_CHECKPOINT),
        "2": node("ModelSamplingDiscrete", model=["1", 0], **V_PREDICTION),
        "3": node("ConceptSplitLoadTrainingImages", folder="my_dog", resolution=768),
        "4": node(
            "ConceptSplitTrainToVA",
            model=["2", 0],
            clip=["1", 1],
            vae=["1", 2],
            images=["3", 0],
            identifier_word="dog",
            save_name="my_dog",
        ),
        "5": node("PreviewImage", title="Loss curve", images=["4", 1]),
        "6": node(
            "ConceptSplitApplyToVA",
            model=["2", 0],
            adapters=["4", 0],
            clip=["1", 1],
            text="a photo of a dog on the beach",
            apply_to_uncond=True,
        ),
        "7": node("CLIPTextEncode", title="Negative prompt", clip=["1", 1], text=NEGATIVE),
        "8": node("EmptyLatentImage", width=768, height=768, batch_size=1),
        "9": node(
            "KSampler", model=["6", 0], positive=["6", 1], negative=["7", 0], latent_image=["8", 0], **SAMPLING_50
        ),
    }
    graph.update(decode_and_save(["9", 0], ["1", 2], 10, "conceptsplit/trained_adapter"))
    return graph


# -- DiT workflows (docs/method.md §10) ------------------------------------------------------------------------
@dataclass(frozen=True)
class DitModel:
    """What a DiT family's users wire: the loaders (API nodes with ids "1" MODEL, "2" CLIP, "3" VAE, as the model's
    own example workflows load it) and the sampling settings of its model card."""

    loaders: dict  # {"1": UNETLoader-like, "2": CLIP loader, "3": VAELoader}
    size: int  # EmptySD3LatentImage width = height
    steps: int
    cfg: float
    guidance: float | None = None  # FluxGuidance on the positive (guidance-distilled models), else none
    model_sampling: dict | None = None  # a ModelSampling* node between the loader and the sampler, "model" omitted
    negative: str = ""
    latent: str = "EmptySD3LatentImage"  # the empty-latent node of the family's latent format
    sampler: str = "euler"


DIT_PROMPT = "a photo of a cat and a dog playing in the snow"
DIT_WORDS = "cat, dog"


def dit_loda(model: DitModel, prefix: str) -> dict:
    """LODA on a DiT with the check that attention fixing worked: loaders -> ConceptSplit Text Encode (-> FluxGuidance)
    -> Capture Attention (from LODA's stage-1 steps on) -> LODA Sampler -> VAE Decode -> Save; the masks and the
    Attention Map Viewer (capture, LATENT, image, the LODA masks) are shown."""
    graph = dict(model.loaders)
    model_out = ["1", 0]
    if model.model_sampling is not None:
        graph["4"] = node(model.model_sampling["class_type"], model=["1", 0], **model.model_sampling["inputs"])
        model_out = ["4", 0]
    graph["5"] = node("ConceptSplitTextEncode", clip=["2", 0], text=DIT_PROMPT)
    positive = ["5", 0]
    if model.guidance is not None:
        graph["6"] = node("FluxGuidance", conditioning=["5", 0], guidance=model.guidance)
        positive = ["6", 0]
    negative_title = "Negative prompt" if model.cfg > 1 else "Negative prompt (unused at cfg 1)"
    loda_steps = round(0.2 * model.steps)  # what the sampler's loda_steps = -1 (auto) gives
    graph.update(
        {
            "7": node("CLIPTextEncode", title=negative_title, clip=["2", 0], text=model.negative),
            "8": node(model.latent, width=model.size, height=model.size, batch_size=1),
            "9": node(
                "ConceptSplitCaptureAttention",
                model=model_out,
                words=DIT_WORDS,
                positive=["5", 0],
                first_step=loda_steps,
            ),
            "10": node(
                "ConceptSplitLodaSampler",
                model=["9", 0],
                positive=positive,
                negative=["7", 0],
                latent_image=["8", 0],
                concept_words=DIT_WORDS,
                seed=0,
                steps=model.steps,
                cfg=model.cfg,
                sampler_name=model.sampler,
                scheduler="simple",
                denoise=1.0,
            ),
            "13": node("MaskToImage", mask=["10", 1]),
            "14": node("PreviewImage", title="Concept masks", images=["13", 0]),
            "15": node(
                "ConceptSplitAttentionViewer",
                capture=["9", 1],
                samples=["10", 0],
                image=["11", 0],
                concept_masks=["10", 1],
            ),
            "16": node("PreviewImage", title="Attention maps", images=["15", 0]),
        }
    )
    graph.update(decode_and_save(["10", 0], ["3", 0], 11, prefix))
    return graph


def dit_note(display: str, load: str, sampling: str) -> str:
    return (
        f"LODA on {display}: keeps a cat and a dog apart, and shows whether attention fixing worked.\n\n"
        f"Set:\n1. {load}\n"
        "2. ConceptSplit Text Encode: the prompt (not CLIP Text Encode: it keeps the token positions LODA looks up).\n"
        "3. LODA Sampler, concept_words: the words to separate, comma-separated (at least 2), all in the prompt. "
        "Capture Attention: the same words in the same order.\n\n"
        f"{sampling}\n\n"
        "Capture Attention's first_step = LODA's stage-1 steps (loda_steps -1 = round(0.2 x steps); 4 at 20 steps): "
        "the viewer then reports, per word, the share of its attention inside its own LODA mask (concept_masks) "
        "next to the mask's area. Maps are on the image-token grid (latent/2). Images of at least 112 px. "
        "LODA's step size and thresholds are the paper's (SD) values, not tuned for this model."
    )


FLUX1_DEV = DitModel(
    loaders={
        "1": node("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default"),
        "2": node("DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors", type="flux"),
        "3": node("VAELoader", vae_name="ae.safetensors"),
    },
    size=1024,
    steps=20,
    cfg=1.0,
    guidance=3.5,
)


@workflow(
    "loda_flux1",
    family="flux",
    title="LODA and attention maps on Flux.1",
    note=dit_note(
        "Flux.1 (dev, schnell or a fine-tune)",
        "Load Diffusion Model: flux1-dev (models/diffusion_models); DualCLIPLoader: clip_l and t5xxl, type flux; "
        "Load VAE: ae (the Flux VAE). The fp8 all-in-one checkpoint works too: Load Checkpoint instead of the three.",
        "Flux.1-dev settings: FluxGuidance 3.5 on the positive, cfg 1 (the negative is then unused), euler, simple, "
        "20 steps, 1024 x 1024. Flux.1-schnell: 4 steps (LODA's auto stage 1 is then 1 step: Capture Attention "
        "first_step 1); FluxGuidance does not change schnell.",
    ),
)
def loda_flux1() -> dict:
    return dit_loda(FLUX1_DEV, "conceptsplit/loda_flux1")


QWEN_IMAGE = DitModel(
    loaders={
        "1": node("UNETLoader", unet_name="qwen_image_fp8_e4m3fn.safetensors", weight_dtype="default"),
        "2": node("CLIPLoader", clip_name="qwen_2.5_vl_7b_fp8_scaled.safetensors", type="qwen_image"),
        "3": node("VAELoader", vae_name="qwen_image_vae.safetensors"),
    },
    size=1328,
    steps=20,
    cfg=2.5,
    model_sampling={"class_type": "ModelSamplingAuraFlow", "inputs": {"shift": 3.1}},
    negative=NEGATIVE,
)


@workflow(
    "loda_qwen_image",
    family="qwenimage",
    title="LODA and attention maps on Qwen-Image",
    note=dit_note(
        "Qwen-Image",
        "Load Diffusion Model: qwen_image (models/diffusion_models); Load CLIP: qwen_2.5_vl_7b, type qwen_image; "
        "Load VAE: qwen_image_vae.",
        "Qwen-Image settings: ModelSamplingAuraFlow shift 3.1, cfg 2.5 with a negative prompt, euler, simple, "
        "20 steps, 1328 x 1328.",
    ),
)
def loda_qwen_image() -> dict:
    return dit_loda(QWEN_IMAGE, "conceptsplit/loda_qwen_image")


Z_IMAGE_TURBO = DitModel(  # ComfyUI 0.33's Z-Image-Turbo template (image_z_image_turbo.json)
    loaders={
        "1": node("UNETLoader", unet_name="z_image_turbo_bf16.safetensors", weight_dtype="default"),
        "2": node("CLIPLoader", clip_name="qwen_3_4b.safetensors", type="lumina2"),
        "3": node("VAELoader", vae_name="ae.safetensors"),
    },
    size=1024,
    steps=8,
    cfg=1.0,
    model_sampling={"class_type": "ModelSamplingAuraFlow", "inputs": {"shift": 3.0}},
    sampler="res_multistep",
)


@workflow(
    "loda_zimage",
    family="zimage",
    title="LODA and attention maps on Z-Image-Turbo (ComfyUI 0.33.0+)",
    note=dit_note(
        "Z-Image-Turbo",
        "Needs ComfyUI 0.33.0 or newer (an older one has no Z-Image model: the ConceptSplit nodes stop with an error "
        "naming 0.33.0). Load Diffusion Model: z_image_turbo_bf16 (models/diffusion_models); "
        "Load CLIP: qwen_3_4b, type lumina2; "
        "Load VAE: ae (the Flux.1 VAE).",
        "Z-Image-Turbo settings (ComfyUI's template): ModelSamplingAuraFlow shift 3, cfg 1 (the negative is then "
        "unused), res_multistep, simple, 8 steps, 1024 x 1024. LODA's auto stage 1 is then 2 steps (Capture "
        "Attention first_step 2).",
    ),
)
def loda_zimage() -> dict:
    return dit_loda(Z_IMAGE_TURBO, "conceptsplit/loda_zimage")


FLUX2_KLEIN = DitModel(  # ComfyUI 0.33's FLUX.2 klein 4B (distilled) template (image_flux2_klein_text_to_image.json)
    loaders={
        "1": node("UNETLoader", unet_name="flux-2-klein-4b.safetensors", weight_dtype="default"),
        "2": node("CLIPLoader", clip_name="qwen_3_4b.safetensors", type="flux2"),
        "3": node("VAELoader", vae_name="flux2-vae.safetensors"),
    },
    size=1024,
    steps=4,
    cfg=1.0,
    latent="EmptyFlux2LatentImage",
)


@workflow(
    "loda_flux2_klein",
    family="flux2",
    title="LODA and attention maps on FLUX.2 klein (ComfyUI 0.33.0+)",
    note=dit_note(
        "FLUX.2 klein 4B",
        "Needs ComfyUI 0.33.0 or newer (older ones lack Empty Flux 2 Latent, the CLIP type flux2 and the Flux.2 "
        "model). Load Diffusion Model: flux-2-klein-4b (models/diffusion_models); Load CLIP: qwen_3_4b, type flux2; "
        "Load VAE: flux2-vae.",
        "klein (distilled) settings: cfg 1 (the negative is then unused), euler, 4 steps, 1024 x 1024, "
        "Empty Flux 2 Latent. ComfyUI's template schedules with Flux2Scheduler in SamplerCustomAdvanced: for that, "
        "put ConceptSplit LODA between KSamplerSelect and SamplerCustomAdvanced instead of the LODA Sampler (which "
        "offers KSampler's schedulers; simple here). LODA's auto stage 1 is 1 step (Capture Attention first_step 1). "
        "The klein base models: cfg 5, 20 steps, a negative prompt.",
    ),
    comfyui="0.33.0",
)
def loda_flux2_klein() -> dict:
    return dit_loda(FLUX2_KLEIN, "conceptsplit/loda_flux2_klein")


# -- output ---------------------------------------------------------------------------------------------------
def build_ui_workflow(definition: WorkflowDef, object_info: dict) -> dict:
    from comfy_harness.workflow_format import Layout, Note, api_to_ui

    wide = {
        "ConceptSplitApplyToVA": 380,
        "CLIPTextEncode": 380,
        "ConceptSplitTextEncode": 380,
        "ConceptSplitLodaSampler": 340,
        "DualCLIPLoader": 340,
    }
    layout = Layout(node_width=300, column_gap=50, wide_types=wide)
    return api_to_ui(
        definition.build(),
        object_info,
        layout=layout,
        notes=[Note(definition.note, title=definition.title)],
        extra={"conceptsplit": {"family": definition.family, "title": definition.title}},
    )


def write_workflow(definition: WorkflowDef, object_info: dict, out_dir: Path) -> Path:
    path = out_dir / f"{definition.name}.json"
    path.write_text(json.dumps(build_ui_workflow(definition, object_info), indent=1) + "\n")
    return path


def missing_node_types(definition: WorkflowDef, object_info: dict) -> list[str]:
    return sorted({n["class_type"] for n in definition.build().values()} - set(object_info))


def load_object_info() -> dict:
    """/object_info of an in-process ComfyUI (COMFYUI_PATH) with the pack loaded."""
    from comfy_harness.comfy_bootstrap import bootstrap_comfyui, comfyui_path, load_pack_in_process
    from comfy_harness.comfy_object_info import object_info

    path = comfyui_path()
    if path is None:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (scripts/setup_env.sh makes one)")
    bootstrap_comfyui(path)
    load_pack_in_process()
    return object_info()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(WORKFLOWS), help="build only this workflow")
    parser.add_argument("--out", type=Path, default=WORKFLOWS_DIR)
    parser.add_argument("--thumbnails", action="store_true", help="render <name>.jpg with the real frontend")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[build_workflows] %(message)s")
    logger.setLevel(logging.INFO)
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))  # after ComfyUI's root, which the bootstrap puts first

    info = load_object_info()
    names = args.only or sorted(WORKFLOWS)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        missing = missing_node_types(WORKFLOWS[name], info)
        if missing:
            failed.append(name)
            logger.error(
                "%s: node types not registered: %s (build it with ComfyUI %s)",
                name,
                ", ".join(missing),
                WORKFLOWS[name].comfyui,
            )
            continue
        logger.info("wrote %s", write_workflow(WORKFLOWS[name], info, args.out))
    if args.thumbnails:
        from comfy_harness.browser import render_thumbnails

        done = render_thumbnails(
            args.out,
            [n for n in names if n not in failed],
            THUMBNAIL_WIDTH,
            README_SCREENSHOT if README_WORKFLOW in names else None,
            README_WORKFLOW,
        )
        for path in done:
            logger.info("wrote %s", path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
