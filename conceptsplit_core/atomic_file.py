"""Atomic file writes and safe save names for adapters and training checkpoints (STYLE §11, spec §2.7).

A write goes to a temp file in the target folder (same filesystem, so `os.replace` is atomic), is flushed and
fsynced, then renamed over the target. On any exception the temp file is removed and the target is untouched, so
an interrupted save never leaves a half-written adapter that a later load would reject.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import ConceptSplitError


def _refuse_existing(target: Path) -> None:
    raise ConceptSplitError.build(
        f'The file "{target.name}" already exists in "{target.parent}"',
        seen=f"an existing file at {target}",
        expected="a save name that is not taken yet, or overwrite enabled",
        fix="pick another save name or enable overwrite",
    )


def atomic_replace(path: str | os.PathLike, writer_fn: Callable[[BinaryIO], None], *, overwrite: bool = True) -> Path:
    """Write a file atomically through `writer_fn`.

    Args:
        path: target file; its folder must exist.
        writer_fn: called with a binary file object open on the temp file; writes the whole content.
        overwrite: when False and the target exists, raise instead of replacing it.

    Returns:
        The target path.

    Raises:
        ConceptSplitError: the target exists and `overwrite` is False, or the folder does not exist.
        Any exception from `writer_fn` is re-raised after the temp file is removed.
    """
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise ConceptSplitError.build(
            f'Cannot save "{target.name}": its folder does not exist',
            seen=str(folder),
            expected="an existing folder",
            fix="create the folder first or choose another output folder",
        )
    if not overwrite and target.exists():
        _refuse_existing(target)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # Re-check just before the rename: another writer may have created the target meanwhile.
        if not overwrite and target.exists():
            _refuse_existing(target)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Write `data` to `path` atomically; see `atomic_replace`."""
    return atomic_replace(path, lambda handle: handle.write(data), overwrite=overwrite)


def safe_save_name(folder: str | os.PathLike, name: str, suffix: str = ".safetensors") -> Path:
    """Resolve a user-typed save name to a file directly inside `folder`.

    The name is a bare file name: no folders, no `..`, not absolute, not empty. `suffix` is appended when the
    name does not already end with it.

    Raises:
        ConceptSplitError: the name is empty, contains a path separator or `..`, is absolute, or resolves
        outside `folder`.
    """

    def reject(reason: str) -> ConceptSplitError:
        return ConceptSplitError.build(
            f'Save name "{name}" is not allowed: {reason}',
            seen=repr(name),
            expected=f'a plain file name such as "my_dog{suffix}" that stays inside the output folder',
            fix="type a name without folders, slashes or '..'",
        )

    stripped = name.strip()
    if not stripped:
        raise reject("it is empty")
    if os.path.isabs(stripped) or stripped.startswith(("/", "\\")):
        raise reject("it is an absolute path")
    if "/" in stripped or "\\" in stripped or (os.altsep and os.altsep in stripped):
        raise reject("it contains a path separator")
    if ".." in stripped or stripped == ".":
        raise reject("it contains '..' or is '.'")
    if "\x00" in stripped:
        raise reject("it contains a NUL character")
    file_name = stripped if stripped.endswith(suffix) else stripped + suffix
    root = Path(folder).resolve()
    target = (root / file_name).resolve()
    if target.parent != root:
        raise reject("it resolves outside the output folder")
    return root / file_name
