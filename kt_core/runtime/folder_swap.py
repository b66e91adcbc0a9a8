"""Put a folder written beside its destination in place so that a crash or power cut at any moment
leaves either the previous folder or the new one, never neither, and a later run finds whichever
it is.

``partial_of(folder)`` is where the new contents are written (``<name>.kt-partial``). ``swap_in``
flushes them to disk (fsync), renames the previous folder to ``<name>.kt-old`` (kept until the new one
is in place), renames the new one into place, flushes the parent directory, and only then removes
``.kt-old``. ``current(folder)``: the folder a reader should use: ``folder``, or ``<name>.kt-old`` when
a run was killed between the two renames (nothing is renamed by reading it); ``recover`` renames it
back (the next save does that itself). The suffixes are kt-core's own: a user's ``<name>.old`` or
``<name>.partial`` is never touched. Directory fsync is POSIX only (on Windows a directory cannot be
opened to flush; NTFS journals the renames).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

PARTIAL, OLD = ".kt-partial", ".kt-old"


def _fsync_path(path: Path, directory: bool = False) -> None:
    if directory and sys.platform == "win32":
        return
    # a writable handle: Windows' fsync (FlushFileBuffers) refuses a read-only one
    flags = (getattr(os, "O_DIRECTORY", 0) | os.O_RDONLY) if directory else (os.O_RDWR | getattr(os, "O_BINARY", 0))
    fd = os.open(str(path), flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _old(folder: Path) -> Path:
    return folder.with_name(folder.name + OLD)


def partial_of(folder: Path) -> Path:
    """Where to write the new contents of ``folder`` (emptied, created)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + PARTIAL)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def current(folder: Path) -> Path:
    """``folder``, or the previous one (``<name>.kt-old``) when a save was cut between its renames."""
    folder = Path(folder)
    return _old(folder) if not folder.exists() and _old(folder).is_dir() else folder


def recover(folder: Path) -> bool:
    """Rename ``<folder>.kt-old`` back to ``folder`` when a save was cut between its renames; whether
    it did."""
    folder = Path(folder)
    if current(folder) == folder:
        return False
    os.replace(_old(folder), folder)
    _fsync_path(folder.parent, directory=True)
    return True


def swap_in(tmp: Path, folder: Path) -> Path:
    """Make ``tmp`` (``partial_of(folder)``, filled) the new ``folder``, durably; returns ``folder``."""
    tmp, folder = Path(tmp), Path(folder)
    for f in tmp.iterdir():
        if f.is_file():
            _fsync_path(f)
    _fsync_path(tmp, directory=True)
    recover(folder)  # a previous save cut between its renames: its .kt-old is the folder to keep until now
    old = _old(folder)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)  # a run killed while removing it left one: the rename needs room
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync_path(folder.parent, directory=True)
    shutil.rmtree(old, ignore_errors=True)
    return folder
