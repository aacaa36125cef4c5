"""Saved state: atomic writes, the one rule for reusing a file, and corrupt files moved aside."""
import json
import logging
import os
import stat
import subprocess
import sys

import pytest
import torch

import store


def test_atomic_write_replaces_whole_files_with_the_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "a.json"
    store.write_json(path, {"x": 1})
    store.write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.json"
    store.write_json(path, {"x": 1})
    def broken(tmp):
        open(tmp, "w").write("{half")
        raise RuntimeError("killed while writing")
    with pytest.raises(RuntimeError):
        store.atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_temporary_files_of_killed_processes_are_cleaned_up(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".a.json.{int(dead.stdout)}.tmp"
    live = tmp_path / f".a.json.{os.getppid()}.tmp"  # a running process: may still be writing
    stale.write_text("{half")
    live.write_text("{half")
    store.write_json(tmp_path / "a.json", {"x": 1})
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("name, content", [("a.json", b""), ("a.json", b'{"config": {"SEED": 0'),
                                           ("a.pt", b""), ("a.pt", b"PK\x03\x04 truncated zip")])
def test_unreadable_files_are_moved_aside_with_a_warning(tmp_path, caplog, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert store.read_saved(path) is None
    assert not path.exists() and (tmp_path / f"{name}.corrupt").read_bytes() == content
    assert f"{path} cannot be read" in caplog.text and "moved aside" in caplog.text


def test_reuse_needs_the_same_config(tmp_path):
    config = {"SEED": 0, "LEVELS": (0.1, 0.2)}
    store.write_json(tmp_path / "a.json", {"config": config, "value": 3})
    assert store.load_current(tmp_path / "a.json", config)["value"] == 3  # tuples compare as JSON lists
    assert store.load_current(tmp_path / "a.json", dict(config, SEED=1)) is None
    assert store.load_current(tmp_path / "missing.json", config) is None
    store.save_checkpoint({"config": config, "w": torch.ones(2)}, tmp_path / "b.pt")
    assert torch.equal(store.load_current(tmp_path / "b.pt", config)["w"], torch.ones(2))
