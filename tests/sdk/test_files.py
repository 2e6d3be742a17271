"""Atomic writes: a killed export's staging directory is cleaned by the next write to the same target."""
import os
import subprocess
import sys

import pytest

from mmagent.files import atomic_dir


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_staging_dir_carries_the_pid(tmp_path):
    with atomic_dir(tmp_path / "bundle") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".bundle.{os.getpid()}.") and tmp.name.endswith(".tmp")
        (tmp / "f").write_text("new")
    assert (tmp_path / "bundle/f").read_text() == "new" and not list(tmp_path.glob(".bundle.*"))


def test_next_write_removes_stale_staging_dirs_of_its_target_only(tmp_path):
    pid = dead_pid()
    stale = tmp_path / f".bundle.{pid}.k3x9q_2a.tmp"  # what kill -9 mid-export leaves
    stale.mkdir()
    (stale / "llm.f16.gguf").write_bytes(b"\0" * 4096)
    live = tmp_path / f".bundle.{os.getppid()}.abcd1234.tmp"  # another export still running
    live.mkdir()
    other = tmp_path / f".other.{pid}.abcd1234.tmp"  # a different target's: not ours to judge
    other.mkdir()
    mine = tmp_path / "bundle.keep"  # an ordinary file beside it
    mine.write_text("mine")
    with atomic_dir(tmp_path / "bundle") as tmp:
        (tmp / "f").write_text("new")
    assert not stale.exists()
    assert live.is_dir() and other.is_dir() and mine.read_text() == "mine"
    assert (tmp_path / "bundle/f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.glob(".bundle.*")) == [live.name]


def test_a_staging_dir_without_a_pid_is_named_and_kept(tmp_path):
    old = tmp_path / ".bundle.k3x9q_2a.tmp"  # written by an mmagent that did not record its pid
    old.mkdir()
    with pytest.warns(UserWarning, match=r"\.bundle\.k3x9q_2a\.tmp.*delete them if no export"):
        with atomic_dir(tmp_path / "bundle") as tmp:
            (tmp / "f").write_text("new")
    assert old.is_dir() and (tmp_path / "bundle/f").exists()
