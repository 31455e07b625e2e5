"""Run a real ComfyUI server with the pack installed, for end-to-end tests (recipe C, docs/comfyui-integration.md §6).

The server lives in a temp ``--base-directory`` whose ``custom_nodes/`` holds symlinks to this repo (as
``ComfyUI-ConceptSplit``) and to the test helper pack. Only the standard library and Pillow are used; every wait
is bounded, and failures carry the tail of the server log, which is where ComfyUI reports import errors.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from PIL import Image

from .comfy_bootstrap import REPO_ROOT

logger = logging.getLogger(__name__)

PACK_FOLDER = "ComfyUI-ConceptSplit"
HELPER_FOLDER = "conceptsplit_test_helpers"
HELPER_PACK = Path(__file__).resolve().parent / "helper_pack"


class ComfyServerError(RuntimeError):
    """A server-side failure; ``summary`` is ComfyUI's message, ``log_tail`` the end of the server log.

    ``validation`` is True for a prompt rejected with HTTP 400, whose per-node errors are in ``node_errors``.
    """

    def __init__(self, message: str, log_tail: str = "", node_errors: dict | None = None, validation: bool = False):
        super().__init__(f"{message}\n--- server log tail ---\n{log_tail}" if log_tail else message)
        self.summary = message
        self.log_tail = log_tail
        self.node_errors = node_errors or {}
        self.validation = validation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _format_validation_error(body: dict) -> str:
    parts = [body.get("error", {}).get("message", "invalid prompt")]
    for node_id, info in body.get("node_errors", {}).items():
        for err in info.get("errors", []):
            parts.append(f"node {node_id} ({info.get('class_type')}): {err.get('message')}: {err.get('details')}")
    return "\n".join(parts)


class ComfyServer:
    """A ComfyUI subprocess on a free localhost port; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        comfyui_root: Path | str,
        models: dict[str, list[Path]] | None = None,
        startup_timeout: float = 60.0,
        keep_base_dir: bool = False,
        cpu: bool = True,
    ):
        self.comfyui_root = Path(comfyui_root).resolve()
        self.cpu = cpu  # False: let ComfyUI use the GPU (the demo on a real checkpoint)
        self.models = models or {}
        self.startup_timeout = startup_timeout
        self.keep_base_dir = keep_base_dir
        self.base_dir: Path | None = None
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self._final_log = ""

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "ComfyServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _prepare_base_dir(self) -> Path:
        base = Path(tempfile.mkdtemp(prefix="conceptsplit-comfy-"))
        nodes_dir = base / "custom_nodes"
        nodes_dir.mkdir()
        # ComfyUI lists custom_nodes with os.listdir + isdir, so symlinked folders load like copies.
        (nodes_dir / PACK_FOLDER).symlink_to(REPO_ROOT, target_is_directory=True)
        (nodes_dir / HELPER_FOLDER).symlink_to(HELPER_PACK, target_is_directory=True)
        return base

    def add_model(self, folder: str, path: Path | str) -> str:
        """Symlink a file into ``models/<folder>/`` and return the name nodes use for it.

        Works on a running server too: folder_paths re-lists a folder whose mtime changed.
        """
        target = self.base_dir / "models" / folder
        target.mkdir(parents=True, exist_ok=True)
        link = target / Path(path).name
        link.symlink_to(Path(path).resolve())
        return link.name

    def start(self) -> "ComfyServer":
        if self._proc is not None:
            raise RuntimeError("ComfyServer already started")
        self.base_dir = self._prepare_base_dir()
        for folder, files in self.models.items():
            for f in files:
                self.add_model(folder, f)
        self.port = _free_port()
        cmd = [
            sys.executable,
            "main.py",
            *(["--cpu"] if self.cpu else []),
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base_dir),
            "--disable-auto-launch",
            "--database-url",
            "sqlite:///:memory:",
            # Ignore any other packs a user's extra_model_paths.yaml might add.
            "--disable-all-custom-nodes",
            "--whitelist-custom-nodes",
            PACK_FOLDER,
            HELPER_FOLDER,
        ]
        env = dict(os.environ, CONCEPTSPLIT_REPO=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        # main.py's own folder is sys.path[0]; a PYTHONPATH holding the repo root would shadow ComfyUI's `nodes`.
        env.pop("PYTHONPATH", None)
        self._log_file = open(self.base_dir / "server.log", "wb")
        logger.info("starting ComfyUI on port %s, base dir %s", self.port, self.base_dir)
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.comfyui_root,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self.stop()
                raise ComfyServerError(f"ComfyUI exited with code {code} during startup", self.log_tail())
            try:
                self._get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ComfyServerError(f"ComfyUI not ready after {self.startup_timeout:.0f} s", self.log_tail())
            time.sleep(0.25)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.base_dir is not None:
            self._final_log = self._read_log()
            if not self.keep_base_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)
                self.base_dir = None

    # -- logs ----------------------------------------------------------------------------------------
    def _read_log(self) -> str:
        if self.base_dir is None or not (self.base_dir / "server.log").exists():
            return self._final_log
        return (self.base_dir / "server.log").read_text(errors="replace")

    def log_text(self) -> str:
        """The whole server log so far (still readable after stop())."""
        return self._read_log()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- HTTP ----------------------------------------------------------------------------------------
    def _request(self, method: str, route: str, body: dict | None = None, timeout: float = 30) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + route, data=data, method=method, headers={"Content-Type": "application/json"} if data else {}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def _get(self, route: str, timeout: float = 30) -> dict:
        return json.loads(self._request("GET", route, timeout=timeout))

    def get_text(self, route: str, timeout: float = 30) -> str:
        """``GET route`` as the server sent it (e.g. to see tokens such as NaN that only Python's json reads)."""
        return self._request("GET", route, timeout=timeout).decode()

    def object_info(self, node_class: str | None = None) -> dict:
        """``GET /object_info`` (all nodes) or ``/object_info/<node_class>`` (``{}`` when not registered)."""
        route = "/object_info" if node_class is None else "/object_info/" + urllib.parse.quote(node_class)
        return self._get(route)

    def queue(self, graph: dict) -> str:
        """Queue an API-format graph and return its prompt_id.

        Raises:
            ComfyServerError: validation failed (HTTP 400); ``node_errors`` holds ComfyUI's per-node errors.
        """
        try:
            raw = self._request("POST", "/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
        except urllib.error.HTTPError as err:
            if err.code != 400:
                raise ComfyServerError(f"POST /prompt failed: HTTP {err.code}", self.log_tail()) from err
            body = json.loads(err.read() or b"{}")
            raise ComfyServerError(
                _format_validation_error(body),
                self.log_tail(),
                node_errors=body.get("node_errors", {}),
                validation=True,
            ) from err
        return json.loads(raw)["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120) -> dict:
        """Poll ``/history/<prompt_id>`` until the prompt finished; return its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise ComfyServerError("ComfyUI is not running", self.log_tail())
            entry = self._get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and (entry.get("status") or {}).get("completed") is not None:
                return entry
            time.sleep(0.1)
        try:  # leave the server usable for the next test
            self._request("POST", "/interrupt", {}, timeout=5)
        except OSError:
            logger.warning("POST /interrupt failed after a timeout of prompt %s", prompt_id)
        raise ComfyServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s", self.log_tail())

    @staticmethod
    def execution_error(entry: dict) -> str | None:
        """The exception message of a failed run (from the ``execution_error`` status message), else None."""
        for event, data in (entry.get("status") or {}).get("messages", []):
            if event == "execution_error":
                return f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message')}"
            if event == "execution_interrupted":
                return f"interrupted at node {data.get('node_id')}"
        return None

    def run(self, graph: dict, timeout: float = 120) -> dict:
        """Queue and wait; return the history entry of a successful run.

        Raises:
            ComfyServerError: validation or execution failed (message = the exception ComfyUI reported).
        """
        entry = self.wait(self.queue(graph), timeout)
        if entry["status"].get("status_str") != "success":
            raise ComfyServerError(self.execution_error(entry) or f"run failed: {entry['status']}", self.log_tail())
        return entry

    def run_expect_error(self, graph: dict, timeout: float = 120) -> str:
        """Run a graph that must fail and return its error message (validation or execution).

        Raises:
            AssertionError: the graph ran successfully.
        """
        try:
            prompt_id = self.queue(graph)
        except ComfyServerError as err:
            if not err.validation:
                raise
            return err.summary
        entry = self.wait(prompt_id, timeout)
        if entry["status"].get("status_str") == "success":
            raise AssertionError("expected the graph to fail, but it ran successfully")
        return self.execution_error(entry) or json.dumps(entry["status"])

    def output_images(self, history_entry: dict, node_id: str) -> list[Image.Image]:
        """Images an output node (SaveImage, PreviewImage, ...) reported, fetched through ``GET /view``."""
        images = []
        for ref in history_entry["outputs"].get(str(node_id), {}).get("images", []):
            query = urllib.parse.urlencode({k: ref.get(k, "") for k in ("filename", "subfolder", "type")})
            img = Image.open(io.BytesIO(self._request("GET", f"/view?{query}")))
            img.load()
            images.append(img)
        return images
