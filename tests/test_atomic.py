"""trainer/atomic.py directly: folders and files appear whole under their final name or not at all,
with the permissions the umask gives."""

import os
import stat
from pathlib import Path

import pytest

from trainer.atomic import (
    atomic_folder,
    file_mode,
    partial_path,
    write_bytes_atomically,
    write_text_atomically,
)


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_folder_is_written_under_a_partial_name_then_renamed(tmp_path):
    final = tmp_path / "checkpoint-3"
    with atomic_folder(final) as partial:
        assert partial == tmp_path / ".checkpoint-3.partial" == partial_path(final)
        (partial / "sub").mkdir()
        (partial / "a.txt").write_text("a")
        (partial / "sub" / "b.txt").write_text("b")
        assert not final.exists()  # nothing under the final name until the block ends
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    assert (final / "a.txt").read_text() == "a" and (final / "sub" / "b.txt").read_text() == "b"


def test_a_failure_leaves_no_folder_and_keeps_the_older_one(tmp_path):
    final = tmp_path / "state-6"
    with atomic_folder(final) as partial:
        (partial / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_folder(final) as partial:
            (partial / "new.txt").write_text("new")
            raise OSError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-6"]
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]


def test_a_new_folder_replaces_the_older_one_and_a_leftover_partial(tmp_path):
    final = tmp_path / "export"
    with atomic_folder(final) as partial:
        (partial / "old.txt").write_text("old")
    partial_path(final).mkdir()
    (partial_path(final) / "leftover.txt").write_text("from a crash")
    with atomic_folder(final) as partial:
        assert list(partial.iterdir()) == []  # a crashed run's leftover is not carried over
        (partial / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert file_mode() == expected
    final = tmp_path / "folder"
    with atomic_folder(final) as partial:
        (partial / "sub").mkdir()
        for path in (partial / "a.bin", partial / "sub" / "b.bin"):
            path.write_bytes(b"x")
            path.chmod(0o600)  # as safetensors and mkstemp write them
    assert {mode(final / "a.bin"), mode(final / "sub" / "b.bin")} == {expected}
    write_bytes_atomically(tmp_path / "file.bin", b"y")
    assert mode(tmp_path / "file.bin") == expected


def test_a_file_is_replaced_whole_and_a_failure_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "status.json"
    write_text_atomically(path, "old ✓")
    write_text_atomically(path, "new ✓")
    assert path.read_bytes() == "new ✓".encode("utf-8")

    def fail(*args):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        write_bytes_atomically(path, b"never")
    assert path.read_bytes() == "new ✓".encode("utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]  # no temporary file left
