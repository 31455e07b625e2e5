"""Train ToVA Adapter as a user runs it, through the real server: a folder of photos trains one adapter in one run
(the pack's Load Training Photos, and ComfyUI's list loader Load Image (from Folder) where the server has it), the
loader's errors name the problem, and bad save names are refused before training with nothing written (issues 10
and 11, items 5-6). Two checks run in-process: a folder outside the input folder (the server's folder list never
offers one, so a prompt naming it stops at ComfyUI's own validation) and a list wired into a setting."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conceptsplit_core.atomic_file import name_max

PACK_LOADER = "ConceptSplitLoadTrainingImages"
LIST_LOADER = "LoadImageDataSetFromFolder"  # ComfyUI's list-output folder loader, not in every version
PHOTO_SIZES = ((80, 64), (64, 96), (72, 72))  # (width, height): different sizes and aspect ratios


def _comfyui_node_ids() -> set[str]:
    """The node IDs this ComfyUI registers (what its /object_info lists), read in this process at collection."""
    from comfy_harness.comfy_bootstrap import bootstrap_comfyui, comfyui_path, load_builtin_extra_nodes

    try:
        path = comfyui_path()
    except RuntimeError:
        return set()  # the comfyui fixture skips (fails on CI) with the reason
    if path is None:
        return set()
    nodes = bootstrap_comfyui(path)
    load_builtin_extra_nodes()
    return set(nodes.NODE_CLASS_MAPPINGS)


def pytest_generate_tests(metafunc):
    # The list loader's case exists only where ComfyUI has the node: not generated elsewhere, never skipped.
    if "photo_loader" in metafunc.fixturenames:
        loaders = [PACK_LOADER] + ([LIST_LOADER] if LIST_LOADER in _comfyui_node_ids() else [])
        metafunc.parametrize("photo_loader", loaders)


def write_photos(folder, sizes=PHOTO_SIZES) -> None:
    """Smooth coloured photos of the given sizes, one PNG each."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (width, height) in enumerate(sizes):
        image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
        image.paste((40 * index, 120, 200 - 40 * index), (width // 4, height // 4, width // 2, height // 2))
        image.save(folder / f"photo_{index}.png")


def tova_files(server) -> list[str]:
    """Every file in the server's models/tova, hidden temp files included."""
    folder = server.base_dir / "models" / "tova"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def training_graph(loader: dict, save_name: str, steps: int = 2) -> dict:
    """tiny SD2.1 -> photo loader -> Train ToVA Adapter -> loss curve preview (API format)."""
    return {
        "1": {"class_type": "ConceptSplitTestTinyModelLoader", "inputs": {"arch": "sd21", "seed": 0}},
        "2": loader,
        "3": {
            "class_type": "ConceptSplitTrainToVA",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "vae": ["1", 2],
                "images": ["2", 0],
                "identifier_word": "dog",
                "steps": steps,
                "learning_rate": 1e-3,
                "rank": 4,
                "seed": 0,
                "resolution": 64,
                "save_name": save_name,
                "overwrite": False,
                "checkpoint_every": 0,
                "resume": False,
            },
        },
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }


def pack_loader(folder: str) -> dict:
    return {"class_type": PACK_LOADER, "inputs": {"folder": folder, "resolution": 64}}


def test_list_loader_cases_follow_the_servers_object_info(comfy_server):
    info = comfy_server.object_info()
    assert PACK_LOADER in info and info[PACK_LOADER]["output_is_list"] == [False]
    assert (LIST_LOADER in info) == (LIST_LOADER in _comfyui_node_ids())
    if LIST_LOADER in info:  # the premise of its case: it really hands over a list
        assert info[LIST_LOADER]["output_is_list"] == [True]


def test_a_folder_of_photos_trains_one_adapter_in_one_run(comfy_server, photo_loader):
    folder = f"photos_{photo_loader}"
    write_photos(comfy_server.base_dir / "input" / folder)
    loader = (
        pack_loader(folder)
        if photo_loader == PACK_LOADER
        else {"class_type": LIST_LOADER, "inputs": {"folder": folder}}
    )
    name = f"from_folder_{photo_loader}"
    before = tova_files(comfy_server)
    entry = comfy_server.run(training_graph(loader, name), timeout=300)
    # One call of the trainer: ComfyUI merges the outputs of a node called once per list item, so a run per photo
    # would show 3 loss curves (and fail at the second: overwrite is off and the name would already exist).
    curves = comfy_server.output_images(entry, "4")
    assert len(curves) == 1 and curves[0].size == (512, 256)
    assert sorted(set(tova_files(comfy_server)) - set(before)) == [f"{name}.safetensors"]  # no checkpoint, no temp
    with safe_open(str(comfy_server.base_dir / "models" / "tova" / f"{name}.safetensors"), "pt") as handle:
        meta = handle.metadata()
    # All 3 photos in that one run (a run per photo would record 1), for the 2 steps asked at 64 px.
    assert meta["conceptsplit.train_images"] == str(len(PHOTO_SIZES))
    assert meta["conceptsplit.train_steps"] == "2" and meta["conceptsplit.train_resolution"] == "64"


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", 'The photo folder "empty" holds no photos'),
        ("damaged", 'The photo "photo_1.png" cannot be read'),
    ],
)
def test_loader_errors_name_the_problem(comfy_server, case, message):
    folder = comfy_server.base_dir / "input" / case
    write_photos(folder) if case == "damaged" else folder.mkdir(parents=True)
    if case == "damaged":
        (folder / "photo_1.png").write_bytes(b"\x89PNG\r\n\x1a\n not the rest of a PNG")
    else:
        (folder / "captions.txt").write_text("a dog")
    graph = {"1": pack_loader(case), "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    error = comfy_server.run_expect_error(graph)
    assert message in error and "Fix:" in error
    assert comfy_server._get("/queue") == {"queue_running": [], "queue_pending": []}  # the server goes on


@pytest.fixture(scope="module")
def bad_name_photos(comfy_server) -> str:
    write_photos(comfy_server.base_dir / "input" / "bad_name_photos")
    return "bad_name_photos"


@pytest.mark.parametrize(
    "save_name, reason",
    [
        # Lengths from the file system's limit L (255 bytes here): L - 27 plus ".safetensors" and its temp file fit, the
        # checkpoint's temp file (30 bytes around the name) does not; even with checkpoints off a run ends by removing
        # that checkpoint name, which the file system refuses. L - 15 (240) fits alone but not its temp file: before the
        # fix it trained the whole run and then failed (issue 11 #5). L + 45 (300) does not fit at all.
        (lambda limit: "d" * (limit - 27), "too long for the file system"),
        (lambda limit: "d" * (limit - 15), "too long for the file system"),
        (lambda limit: "d" * (limit + 45), "too long for the file system"),
        ("my\ndog", "control character"),
        (".hidden_dog", "starts with a dot"),
        ("con", "device name"),
        ("nul.txt", "device name"),
        ("com1", "device name"),
        ("dog.", "ends with a dot"),
        ("dog ", "starts or ends with a space"),
        ("dog:v2", "Windows does not allow"),
    ],
    ids=[
        "checkpoint_temp_too_long",
        "adapter_temp_too_long",
        "name_too_long",
        "newline",
        "leading_dot",
        "con",
        "nul_txt",
        "com1",
        "trailing_dot",
        "trailing_space",
        "colon",
    ],
)
def test_bad_save_names_are_refused_before_training(comfy_server, bad_name_photos, save_name, reason):
    if callable(save_name):
        save_name = save_name(name_max(comfy_server.base_dir))  # models/tova is created there on the first save
    before = tova_files(comfy_server)
    # 10000 steps: if the name were only refused after training, the run would not end within the timeout.
    error = comfy_server.run_expect_error(
        training_graph(pack_loader(bad_name_photos), save_name, steps=10000), timeout=60
    )
    assert "ConceptSplitTrainToVA" in error and "Save name" in error and reason in error
    assert "Seen:" in error and "Fix:" in error
    assert tova_files(comfy_server) == before  # no adapter, checkpoint or temp file
    assert comfy_server._get("/queue") == {"queue_running": [], "queue_pending": []}
    assert comfy_server.object_info("ConceptSplitTrainToVA")  # the server still answers


def test_loader_refuses_a_folder_outside_the_input_folder(pack, tmp_path, monkeypatch):
    import folder_paths

    input_dir, outside = tmp_path / "input", tmp_path / "outside"
    write_photos(input_dir / "inside")
    write_photos(outside)
    os.symlink(outside, input_dir / "link")
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(input_dir))
    node = pack.glue("training_photos").LoadTrainingPhotos
    assert node.execute("inside", 64).result[0].shape == (len(PHOTO_SIZES), 64, 64, 3)
    for name in ("../outside", "link", str(outside), "inside/../../outside"):
        with pytest.raises(pack.error, match="outside ComfyUI's input folder"):
            node.execute(name, 64)
        assert node.fingerprint_inputs(name, 64) is None  # no stat of files outside either


def test_a_list_wired_into_a_setting_is_refused(pack, tova_folder):
    from comfy_harness.tiny_models import build_tiny_model

    model, clip, vae = build_tiny_model("sd21", seed=0)
    settings = {
        "model": [model],
        "clip": [clip],
        "vae": [vae],
        "identifier_word": ["dog"],
        "steps": [2, 3],
        "learning_rate": [1e-3],
        "rank": [4],
        "seed": [0],
        "resolution": [64],
        "save_name": ["listed"],
        "overwrite": [False],
        "checkpoint_every": [0],
        "resume": [False],
    }
    node = pack.glue("training").TrainToVAAdapter
    with pytest.raises(pack.error, match="got 2 values for steps.*except images, which may be a list"):
        node.execute(images=[torch.rand(1, 64, 64, 3)], **settings)
    with pytest.raises(pack.error, match="got 0 values for seed"):
        node.execute(images=[torch.rand(1, 64, 64, 3)], **(settings | {"steps": [2], "seed": []}))
    assert list(tova_folder.iterdir()) == []
