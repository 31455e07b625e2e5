"""Save names that become files (conceptsplit_core/atomic_file.py): portable names only, and the final, sibling and
temp file names checked against the file system's limit before anything is trained or written (issue 11, 5-6)."""

from __future__ import annotations

import os

import pytest

from conceptsplit_core.atomic_file import atomic_write_bytes, name_max, safe_save_name, temp_file_name
from conceptsplit_core.errors import ConceptSplitError

CHECKPOINT = ".tova-checkpoint"  # nodes/training.py CHECKPOINT_SUFFIX, the training run's sibling file
# The longest name a training save creates is the checkpoint's temp file ".<stem>.tova-checkpoint.<8 random>.tmp".
CHECKPOINT_OVERHEAD = len("." + CHECKPOINT + "." + "x" * 8 + ".tmp")  # 30 bytes around the typed stem
ADAPTER_OVERHEAD = len("." + ".safetensors" + "." + "x" * 8 + ".tmp")  # 26 bytes


@pytest.mark.parametrize(
    "name, reason",
    [
        ("my\ndog", "control character"),
        ("my\rdog", "control character"),
        ("tab\tname", "control character"),
        ("del\x7f", "control character"),
        ("nel\x85", "control character"),
        ("line\u2028sep", "control character"),
        ("nul\x00byte", "control character"),
        ("dog\u202egnp", "text-direction"),
        ("a\ud800", "surrogate"),
        (".dog", "starts with a dot"),
        (".safetensors", "starts with a dot"),
        ("dog.", "ends with a dot"),
        ("dog ", "starts or ends with a space"),
        (" dog", "starts or ends with a space"),
        ("con", "device name"),
        ("PRN", "device name"),
        ("aux", "device name"),
        ("nul", "device name"),
        ("Com1", "device name"),
        ("com9", "device name"),
        ("lpt1", "device name"),
        ("LPT9", "device name"),
        ("con.txt", "device name"),
        ("nul.tar.gz", "device name"),
        ("com1.safetensors", "device name"),
        ("aux .x", "device name"),
        ("com\u00b9", "device name"),
        ("a<b", "Windows does not allow"),
        ("a>b", "Windows does not allow"),
        ("a:b", "Windows does not allow"),
        ('a"b', "Windows does not allow"),
        ("a|b", "Windows does not allow"),
        ("a?b", "Windows does not allow"),
        ("a*b", "Windows does not allow"),
        ("../x", "path separator"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("/abs", "absolute"),
        ("..", "'..'"),
        ("", "empty"),
        ("   ", "empty"),
    ],
)
def test_odd_names_are_refused_with_the_rule_they_break(tmp_path, name, reason):
    with pytest.raises(ConceptSplitError, match="not allowed") as info:
        safe_save_name(tmp_path, name, sibling_suffixes=(CHECKPOINT,))
    message = str(info.value)
    assert reason in message
    assert "Seen:" in message and "Expected:" in message and "Fix:" in message
    assert "\n" not in message and "\r" not in message  # the name is shown escaped, so the message stays one line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name",
    [
        "dog",
        "my dog v2",
        "dog.v2",
        "console",
        "com10",
        "comma",
        "lpt",
        "null",
        "con_dog",
        "auxiliary.x",
        "née-1",
        "狗",
        "(dog) [2]",
        "dog.safetensors",
    ],
)
def test_ordinary_names_pass(tmp_path, name):
    path = safe_save_name(tmp_path, name, sibling_suffixes=(CHECKPOINT,))
    assert path.parent == tmp_path.resolve() and path.name.endswith(".safetensors")
    assert path.name.removesuffix(".safetensors") == name.removesuffix(".safetensors")


def test_the_longest_allowed_name_is_writable_and_one_byte_more_is_refused(tmp_path):
    limit = name_max(tmp_path)
    longest = "d" * (limit - CHECKPOINT_OVERHEAD)
    path = safe_save_name(tmp_path, longest, sibling_suffixes=(CHECKPOINT,))
    # Every file a training run writes, through the real atomic write (temp file, then rename), at this length.
    atomic_write_bytes(path.with_name(longest + CHECKPOINT), b"checkpoint")
    atomic_write_bytes(path, b"adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([longest + CHECKPOINT, longest + ".safetensors"])
    with pytest.raises(ConceptSplitError, match="too long for the file system") as info:
        safe_save_name(tmp_path, longest + "d", sibling_suffixes=(CHECKPOINT,))
    assert f"at most {limit - CHECKPOINT_OVERHEAD} bytes" in str(info.value)
    assert f"at most {limit} bytes" in str(info.value)  # the file system's own limit, named
    # Without a sibling file only the adapter's own temp name counts.
    safe_save_name(tmp_path, "d" * (limit - ADAPTER_OVERHEAD))
    with pytest.raises(ConceptSplitError, match="too long"):
        safe_save_name(tmp_path, "d" * (limit - ADAPTER_OVERHEAD + 1))


def test_length_is_counted_in_encoded_bytes(tmp_path):
    allowed = name_max(tmp_path) - CHECKPOINT_OVERHEAD
    fits = "é" * (allowed // 2)  # 2 bytes each in UTF-8
    safe_save_name(tmp_path, fits, sibling_suffixes=(CHECKPOINT,))
    too_long = "é" * (allowed // 2 + 1)
    assert len(too_long) < allowed  # fewer characters than the limit, more bytes
    with pytest.raises(ConceptSplitError, match="too long") as info:
        safe_save_name(tmp_path, too_long, sibling_suffixes=(CHECKPOINT,))
    assert f"{len(too_long.encode())} bytes" in str(info.value)


def test_atomic_write_refuses_a_too_long_temp_name_before_writing(tmp_path):
    name = "d" * (name_max(tmp_path) - ADAPTER_OVERHEAD + 1) + ".safetensors"  # fits alone, its temp does not
    assert len(name) <= name_max(tmp_path) < len(temp_file_name(name))
    with pytest.raises(ConceptSplitError, match="File name .* is too long"):
        atomic_write_bytes(tmp_path / name, b"x")
    assert list(tmp_path.iterdir()) == []


def test_temp_file_name_is_what_the_atomic_write_creates(tmp_path):
    target = tmp_path / "dog.safetensors"
    seen = []

    def writer(handle):
        seen.extend(p.name for p in tmp_path.iterdir())
        handle.write(b"x")

    from conceptsplit_core.atomic_file import atomic_replace

    atomic_replace(target, writer)
    assert len(seen) == 1 and len(seen[0]) == len(temp_file_name(target.name))
    assert seen[0].startswith(".dog.safetensors.") and seen[0].endswith(".tmp")


def test_name_max_reads_the_nearest_existing_folder_and_falls_back_to_255(tmp_path, monkeypatch):
    assert name_max(tmp_path / "not" / "yet") == name_max(tmp_path) == os.pathconf(tmp_path, "PC_NAME_MAX")

    def unsupported(path, name):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "pathconf", unsupported)
    assert name_max(tmp_path) == 255
    monkeypatch.delattr(os, "pathconf")  # Windows has none
    assert name_max(tmp_path) == 255
