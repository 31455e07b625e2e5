"""Make a real ComfyUI importable in this process, and load the pack the way ComfyUI does.

Recipe from docs/comfyui-integration.md §6: ComfyUI's root goes first on ``sys.path`` and its argument parser
must be enabled before any ``comfy`` module is imported. The repo has its own ``nodes/`` package, so the
repo root must never sit ahead of ComfyUI's root, or ``import nodes`` would find the pack instead of
ComfyUI's ``nodes.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent

_bootstrapped: Path | None = None
_extras_loaded = False


def comfyui_path() -> Path | None:
    """The ComfyUI root named by env COMFYUI_PATH, or None when unset.

    Raises:
        RuntimeError: COMFYUI_PATH is set but holds no ``main.py``, a misconfiguration worth stopping for.
    """
    raw = os.environ.get("COMFYUI_PATH", "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    if not (path / "main.py").is_file():
        raise RuntimeError(
            f"COMFYUI_PATH={raw!r} is not a ComfyUI checkout (no main.py there). "
            "Point it at the folder holding ComfyUI's main.py, or unset it and run scripts/test.sh."
        )
    return path


def _same_dir(entry: str, target: Path) -> bool:
    # '' means the current directory, which is how `python -m pytest` from the repo root exposes it.
    try:
        return Path(entry or os.getcwd()).resolve() == target
    except OSError:
        return False


def _put_comfyui_first(root: Path) -> None:
    root_str = str(root)
    while root_str in sys.path:
        sys.path.remove(root_str)
    # The repo root (or '' / cwd pointing at it) would shadow ComfyUI's `nodes`; keep it importable but after ComfyUI.
    shadowing = [e for e in sys.path if _same_dir(e, REPO_ROOT)]
    for entry in shadowing:
        sys.path.remove(entry)
    sys.path.insert(0, root_str)
    if shadowing:
        sys.path.insert(1, str(REPO_ROOT))


def bootstrap_comfyui(path: Path | str) -> ModuleType:
    """Import ComfyUI from ``path`` (idempotent) and return its ``nodes`` module.

    Raises:
        RuntimeError: a different ComfyUI was already bootstrapped, or ``import nodes`` found another module.
    """
    global _bootstrapped
    root = Path(path).resolve()
    if _bootstrapped is not None:
        if _bootstrapped != root:
            raise RuntimeError(f"ComfyUI already bootstrapped from {_bootstrapped}; cannot switch to {root}")
        return sys.modules["nodes"]
    _put_comfyui_first(root)
    saved_argv = sys.argv
    # ComfyUI parses sys.argv at import time once parsing is enabled; pytest's own arguments would break it.
    sys.argv = ["main.py", "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        # As main.py does: claim the name `utils` for ComfyUI's top-level package before nodes.py puts comfy/
        # (with its utils.py) first on sys.path; otherwise `import server` fails in comfy_extras/nodes_images.py.
        import utils.extra_config  # noqa: F401
        import nodes
    finally:
        sys.argv = saved_argv
    found = Path(getattr(sys.modules["nodes"], "__file__", "") or "").resolve()
    if found != root / "nodes.py":
        raise RuntimeError(f"`import nodes` gave {found}, expected ComfyUI's {root / 'nodes.py'}; check sys.path order")
    _bootstrapped = root
    return nodes


class _HeldRecords(logging.Filter):
    """Holds every record logged to the root logger (ComfyUI's loader logs there) instead of emitting it."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


# What an extension that registers with the running server (0.33.0's comfy_extras/nodes_replacements.py) fails with
# in a process without one; the server itself loads it fine.
_NO_SERVER = "'PromptServer' has no attribute 'instance'"
_FAILURE_SUMMARY = "WARNING: some comfy_extras/ nodes did not import correctly"


def load_builtin_extra_nodes() -> None:
    """Register comfy_extras nodes (SamplerCustom, ModelSamplingDiscrete, ...) as the server does; once per process.

    No PromptServer runs in this process, so extensions that register with it (node replacements, 0.33.0) cannot
    load here; their failure report is dropped. Any other import failure is logged as ComfyUI logs it.
    """
    global _extras_loaded
    if _extras_loaded:
        return
    import nodes

    root, held = logging.getLogger(), _HeldRecords()
    root.addFilter(held)
    try:
        failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)) or []
    finally:
        root.removeFilter(held)
    needs_server = {
        Path(record.getMessage().split(" in ", 1)[1].split(":", 1)[0]).name
        for record in held.records
        if _NO_SERVER in record.getMessage() and " in " in record.getMessage()
    }
    expected = bool(failed) and set(failed) <= needs_server
    summary = next(
        (i for i, r in enumerate(held.records) if r.getMessage().startswith(_FAILURE_SUMMARY)), len(held.records)
    )
    for index, record in enumerate(held.records):
        if expected and (index >= summary or _NO_SERVER in record.getMessage()):
            continue  # the report of failures that only a process without a server has
        root.handle(record)
    if expected:
        logging.debug(
            "comfy_extras %s register with the running server; not loaded in this process", ", ".join(sorted(failed))
        )
    _extras_loaded = True


def load_pack_in_process(pack_dir: Path | str | None = None) -> ModuleType:
    """Load the pack through ComfyUI's own ``load_custom_node`` and return its module.

    Call ``bootstrap_comfyui`` first. Built-in extra nodes are registered before, so that the pack cannot
    shadow core node IDs, the same ``ignore`` set the server uses.

    Raises:
        RuntimeError: the pack has no ``__init__.py`` yet, or ComfyUI failed to load it (the loader only logs).
    """
    import nodes

    pack = Path(pack_dir) if pack_dir is not None else REPO_ROOT
    if not (pack / "__init__.py").is_file():
        raise RuntimeError(f"No pack to load: {pack / '__init__.py'} does not exist yet")
    module_path = str(pack)
    # load_custom_node registers the module under its full path with '.' replaced, not under a short name.
    module_name = module_path.replace(".", "_x_")
    if module_name in sys.modules:
        return sys.modules[module_name]
    load_builtin_extra_nodes()
    core_ids = set(nodes.NODE_CLASS_MAPPINGS)
    if not asyncio.run(nodes.load_custom_node(module_path, core_ids, module_parent="custom_nodes")):
        sys.modules.pop(module_name, None)  # the loader leaves a half-run module behind
        raise RuntimeError(
            f"ComfyUI's load_custom_node failed for {module_path}; the warning it logged has the traceback"
        )
    return sys.modules[module_name]
