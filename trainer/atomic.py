"""Folders and files written atomically: built under a hidden temporary name, fsynced, renamed.

A crash (kill -9, a dead node, a full disk) can leave a `.<name>.partial` folder behind but never a
folder under its final name that looks complete and is not. Files get the permissions the
process umask gives, as `open(..., "w")` would (safetensors and `tempfile.mkstemp` write 0600,
which hides checkpoints, exports and data files from the other users of a shared cluster folder):
everything the project writes through a temporary name goes through `commit_partial` or
`write_bytes_atomically` for that reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def file_mode() -> int:
    """0666 minus the process umask: what `open(..., "w")` gives a new file. Read at each call (not
    cached): a process may change its umask, and each write must follow the umask of its moment."""
    try:  # Linux shows the umask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(umask)
    return 0o666 & ~umask


def partial_path(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


def start_partial(final: Path) -> Path:
    """An empty temporary folder beside `final` (an older leftover of it is removed)."""
    partial = partial_path(final)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_partial(partial: Path, final: Path) -> None:
    """Give every file the umask's permissions, fsync files and folder, rename `partial` to `final`
    (replacing an older `final`), and fsync the parent so the rename itself is on disk."""
    mode = file_mode()
    for path in sorted(partial.rglob("*")):
        if path.is_file():
            os.chmod(path, mode)
            _fsync(path)
    _fsync(partial)
    if final.exists():  # an earlier run's (overwrite) or a replayed step's: the new one replaces it
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync(final.parent)


def discard_partial(final: Path) -> None:
    shutil.rmtree(partial_path(final), ignore_errors=True)


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Write a folder's files into the yielded temporary folder; it becomes `final` only if the
    block finishes, and is removed if it raises."""
    partial = start_partial(final)
    try:
        yield partial
        commit_partial(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) in one rename: readers see the old file or the new one."""
    write_bytes_atomically(path, text.encode("utf-8"))


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one rename: readers see the old file or the new one."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
