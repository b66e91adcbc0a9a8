"""runtime/folder_swap.py: a checkpoint or adapter folder swapped in so that a crash at any point
leaves the old or the new folder, the new files on disk before any rename, and a save cut between
its two renames recovered by the next load or save."""
import os

import pytest

from kt_core.runtime import folder_swap


def _write(folder, text):
    tmp = folder_swap.partial_of(folder)
    (tmp / "state.json").write_text(text)
    return tmp


def test_swap_in_replaces_the_folder_and_leaves_nothing_beside(tmp_path):
    out = tmp_path / "ckpt"
    folder_swap.swap_in(_write(out, "1"), out)
    folder_swap.swap_in(_write(out, "2"), out)
    assert (out / "state.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_new_files_are_flushed_before_the_first_rename(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    folder_swap.swap_in(_write(out, "1"), out)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(folder_swap.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(folder_swap.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    folder_swap.swap_in(_write(out, "2"), out)
    assert events.index("replace") > events.index("fsync") and events.count("replace") == 2
    assert events[-1] == "fsync" or os.name == "nt"  # the parent directory, after the renames (POSIX)


def test_a_save_cut_between_its_renames_is_recovered(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    folder_swap.swap_in(_write(out, "1"), out)
    real_replace = os.replace
    calls = []

    def crash_on_second(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the old folder moved aside, before the new one moved in
        real_replace(a, b)

    monkeypatch.setattr(folder_swap.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        folder_swap.swap_in(_write(out, "2"), out)
    monkeypatch.setattr(folder_swap.os, "replace", real_replace)
    assert not out.exists() and (tmp_path / "ckpt.kt-old" / "state.json").read_text() == "1"
    assert folder_swap.current(out) == tmp_path / "ckpt.kt-old"  # what a reader uses meanwhile
    # the next save keeps the old one until the new one is in place (it used to remove it first)
    folder_swap.swap_in(_write(out, "3"), out)
    assert (out / "state.json").read_text() == "3" and not (tmp_path / "ckpt.kt-old").exists()
    # and a load (recover) finds the previous checkpoint
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(folder_swap.os, "replace", crash_on_second)
        calls.clear()
        folder_swap.swap_in(_write(out, "4"), out)
    monkeypatch.setattr(folder_swap.os, "replace", real_replace)
    assert folder_swap.recover(out) and (out / "state.json").read_text() == "3"
    assert not folder_swap.recover(out)  # nothing to do when the folder is there


def test_a_users_own_old_and_partial_folders_are_left_alone(tmp_path):
    out = tmp_path / "adapter"
    for name in ("adapter.old", "adapter.partial"):  # a user's backups beside the output
        (tmp_path / name).mkdir()
        (tmp_path / name / "precious.bin").write_bytes(b"x")
    folder_swap.swap_in(_write(out, "1"), out)
    folder_swap.swap_in(_write(out, "2"), out)
    for name in ("adapter.old", "adapter.partial"):
        assert (tmp_path / name / "precious.bin").is_file()
    assert not folder_swap.recover(out) and folder_swap.current(out) == out
