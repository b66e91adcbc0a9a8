"""Put a folder written beside its destination (``<name>.partial``) in place so that a crash or power
cut at any moment leaves either the previous folder or the new one, never neither, and a later run
finds whichever it is.

``swap_in``: the new files are flushed to disk (fsync) before any rename, the previous folder is
renamed to ``<name>.old`` (kept until the new one is in place), the new one renamed into place and the
parent directory flushed; only then is ``.old`` removed. ``recover``: a run killed between the two
renames left ``<name>.old`` and no ``<name>``; it is renamed back. Directory fsync is POSIX only (on
Windows a directory cannot be opened to flush; NTFS journals the renames).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def _fsync_path(path: Path, directory: bool = False) -> None:
    if directory and sys.platform == "win32":
        return
    fd = os.open(str(path), os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_of(folder: Path) -> Path:
    """Where to write the new contents of ``folder`` (emptied, created)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def recover(folder: Path) -> bool:
    """Rename ``<folder>.old`` back to ``folder`` when a save was cut between its renames (no
    ``folder``, an ``.old``); whether it did."""
    folder = Path(folder)
    old = folder.with_name(folder.name + ".old")
    if folder.exists() or not old.is_dir():
        return False
    os.replace(old, folder)
    _fsync_path(folder.parent, directory=True)
    return True


def swap_in(tmp: Path, folder: Path) -> Path:
    """Make ``tmp`` (``partial_of(folder)``, filled) the new ``folder``, durably; returns ``folder``."""
    tmp, folder = Path(tmp), Path(folder)
    for f in tmp.iterdir():
        if f.is_file():
            _fsync_path(f)
    _fsync_path(tmp, directory=True)
    recover(folder)  # a previous save cut between its renames: its .old is the folder to keep until now
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)  # a run killed while removing it left one: the rename needs room
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync_path(folder.parent, directory=True)
    shutil.rmtree(old, ignore_errors=True)
    return folder
