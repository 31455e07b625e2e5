"""Atomic file writes and safe save names for adapters and training checkpoints (method §2.7).

A write goes to a temp file in the target folder (same filesystem, so `os.replace` is atomic), is flushed and
fsynced, then renamed over the target. On any exception the temp file is removed and the target is untouched, so
an interrupted save never leaves a half-written adapter that a later load would reject.
"""

from __future__ import annotations

import os
import tempfile
import unicodedata
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

from .errors import ConceptSplitError

TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"  # a temp file is ".<target name>.<random>.tmp", hidden from file lists
_TEMP_RANDOM_CHARS = 8  # length of tempfile.mkstemp's random part (tempfile._RandomNameSequence)
_DEFAULT_NAME_MAX = 255  # bytes: ext4, XFS, Btrfs, APFS; NTFS allows 255 UTF-16 units, never fewer than 255 bytes
# Device names Windows reserves in every folder, also with an extension ("con.txt"); ¹²³ count as digits there.
_WINDOWS_RESERVED = frozenset(
    ["con", "prn", "aux", "nul", "conin$", "conout$"]
    + [f"{device}{digit}" for device in ("com", "lpt") for digit in "0123456789¹²³"]
)
_WINDOWS_INVALID = '<>:"|?*'  # besides / and \ (path separators, refused on their own) and control characters
# Invisible characters that reorder how a name is displayed ("dog\u202egnp.exe" shows as "dogexe.png").
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


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
        ConceptSplitError: the target exists and `overwrite` is False, the folder does not exist, or the
        temp file's name would exceed the file system's name limit.
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
    check_name_length(folder, target.name)  # the temp name is the longer one; refuse it before writing anything
    if not overwrite and target.exists():
        _refuse_existing(target)
    fd, temp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{target.name}.", suffix=TEMP_SUFFIX, dir=folder)
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


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name, in bytes, that the file system holding `folder` accepts.

    `os.pathconf(PC_NAME_MAX)` of `folder`, or of its nearest existing parent when it does not exist yet;
    255 where the platform cannot tell (Windows has no pathconf).
    """
    probe = Path(folder).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        return int(os.pathconf(probe, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):  # no pathconf, or the file system does not say
        return _DEFAULT_NAME_MAX


def temp_file_name(file_name: str) -> str:
    """The name `atomic_replace` gives the temp file of `file_name` (its random part as x's): the longest name
    a save of `file_name` creates."""
    return f"{TEMP_PREFIX}{file_name}.{'x' * _TEMP_RANDOM_CHARS}{TEMP_SUFFIX}"


def _name_bytes(name: str) -> int:
    """Length of `name` as the file system stores it (UTF-8 on Linux and macOS)."""
    return len(os.fsencode(name))


def check_name_length(folder: str | os.PathLike, file_name: str, save_name: str | None = None) -> None:
    """Refuse `file_name` when it, or its temp file during an atomic write, is longer than the folder's limit.

    Args:
        folder: where the file goes (it may not exist yet).
        file_name: the final file name.
        save_name: the name the user typed, quoted in the message with the longest it may be; None: `file_name`.

    Raises:
        ConceptSplitError: the encoded temp name is longer than `name_max(folder)` bytes.
    """
    limit = name_max(folder)
    temp = temp_file_name(file_name)
    if _name_bytes(temp) <= limit:
        return
    typed = file_name if save_name is None else save_name
    allowed = limit - (_name_bytes(temp) - _name_bytes(typed))
    raise ConceptSplitError.build(
        f'{"File" if save_name is None else "Save"} name "{_shown(typed)}" is too long for the file system',
        seen=f'{_name_bytes(typed)} bytes; the file "{_shown(file_name)}" is written through a temp file whose '
        f"name is {_name_bytes(temp)} bytes",
        expected=f"file names of at most {limit} bytes in {Path(folder)}, so a save name of at most "
        f"{max(allowed, 0)} bytes (letters outside ASCII take 2-4 bytes each)",
        fix=f"shorten the save name to {max(allowed, 0)} bytes or less",
    )


def _shown(text: str, keep: int = 40) -> str:
    """`text` for a message: cut to `keep` characters with an ellipsis, invisible characters escaped ("\\n")."""
    text = text if len(text) <= keep else text[: keep - 1] + "…"
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def _odd_character(text: str) -> str | None:
    """Why `text` holds a character a file name must not, or None."""
    for char in text:
        category = unicodedata.category(char)
        if category in ("Cc", "Zl", "Zp"):
            return f"it contains a control character ({ascii(char)}; newline, tab and the like)"
        if category == "Cs":
            return f"it contains a lone UTF-16 surrogate ({ascii(char)}), which file systems cannot store"
        if char in _BIDI_CONTROLS:
            return f"it contains an invisible text-direction character ({ascii(char)})"
        if char in _WINDOWS_INVALID:
            return f'it contains {char!r}, which Windows does not allow in file names (<>:"|?*)'
    return None


def _reserved_device(file_name: str) -> str | None:
    """The Windows device name `file_name` stands for ("nul.safetensors" -> "nul"), or None."""
    base = file_name.split(".", 1)[0].rstrip(" ").lower()
    return base if base in _WINDOWS_RESERVED else None


def safe_save_name(
    folder: str | os.PathLike, name: str, suffix: str = ".safetensors", sibling_suffixes: Sequence[str] = ()
) -> Path:
    """Resolve a user-typed save name to a file directly inside `folder`, or refuse it before anything is written.

    The name is a bare, portable file name: not empty, no folders, no `..`, not absolute; no control or
    text-direction characters, none of Windows' <>:"|?*; no leading dot (a hidden file), no leading or trailing
    space, no trailing dot; not a Windows device name (con, nul, com1, ... also with an extension). `suffix` is
    appended when the name does not already end with it. The final name, each sibling (the name with `suffix`
    replaced by one of `sibling_suffixes`, e.g. a training checkpoint) and the temp file of each atomic write must
    fit the file system's name limit (`name_max`), counted in encoded bytes.

    Raises:
        ConceptSplitError: naming the rule the name breaks, the name seen, and how to fix it.
    """

    def reject(reason: str, fix: str = "type a plain file name without folders, slashes or '..'") -> ConceptSplitError:
        return ConceptSplitError.build(
            f'Save name "{_shown(name)}" is not allowed: {reason}',
            seen=f'"{_shown(name, 80)}" ({len(name)} characters)',
            expected=f'a plain file name such as "my_dog{suffix}" that stays inside the output folder and opens on '
            'every system (no control characters, none of <>:"/\\|?*, no leading dot or space, no '
            "trailing dot or space, not a Windows device name)",
            fix=fix,
        )

    if not name.strip():
        raise reject("it is empty")
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        raise reject("it is an absolute path")
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        raise reject("it contains a path separator")
    if ".." in name or name == ".":
        raise reject("it contains '..' or is '.'")
    odd = _odd_character(name)
    if odd is not None:
        raise reject(odd, "retype the name with letters, digits, spaces, - or _ (a newline often comes from pasting)")
    if name.startswith("."):
        raise reject(
            "it starts with a dot, which makes a hidden file that file browsers do not show", "remove the leading dot"
        )
    if name != name.strip(" "):
        raise reject(
            "it starts or ends with a space (easy to mistype, and Windows drops trailing spaces)",
            "remove the spaces at the start and end",
        )
    if name.endswith("."):
        raise reject("it ends with a dot, which Windows drops", "remove the trailing dot")
    device = _reserved_device(name)
    if device is not None:
        raise reject(
            f'"{device}" is a device name on Windows (con, prn, aux, nul, com1-9, lpt1-9), also with an '
            "extension; such a file cannot be opened there",
            f'add a word, e.g. "my_{device}"',
        )
    file_name = name if name.endswith(suffix) else name + suffix
    stem = file_name[: -len(suffix)]
    names = [file_name] + [stem + sibling for sibling in sibling_suffixes]
    longest = max(names, key=lambda candidate: _name_bytes(temp_file_name(candidate)))
    check_name_length(folder, longest, name)
    root = Path(folder).resolve()
    target = (root / file_name).resolve()
    if target.parent != root:
        raise reject("it resolves outside the output folder")
    return root / file_name
