"""Saved state: atomic writes, reading back (a corrupt file is moved aside), the one rule that decides whether saved
work is reused (it was made with the same config), and fingerprints of data and weights."""
import glob
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def atomic_write(path, write):
    """Call write(tmp_path), flush it to disk, then rename it over path and flush the folder: a crash
    or a power loss leaves the old file or the new one, never half of one. Temporary files that a
    killed process left next to path are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2:-4]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    # created like any new file, so the umask sets its permissions
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
            folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_json(path, payload):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))


def plain(obj):
    """obj as it reads back from JSON (tuples become lists), so stored and fresh configs compare."""
    return json.loads(json.dumps(obj))


_log = logging.getLogger("tanas")


def read_saved(path, log=None):
    """The content of a saved .pt or .json file; None if there is none. A file that exists but cannot
    be read (empty, truncated, corrupt) is moved aside to <name>.corrupt with a warning, and is then
    treated as missing, so the work is redone without overwriting the evidence."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # json, pickle, zip and unicode errors: the file is not what we wrote
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        (log or _log).warning("warning: %s cannot be read (%s: %s); moved aside to %s, redoing its work",
                              path, type(e).__name__, str(e).splitlines()[0] if str(e) else "", aside.name)
        return None


def made_with(saved, config):
    """Whether saved content (a dict with a "config" entry) was made with this config: the one rule
    every step uses to decide whether earlier work can be reused."""
    return isinstance(saved, dict) and plain(saved.get("config")) == plain(config)


def load_current(path, config, log=None):
    """The saved content of path when it was made with this config; else None."""
    saved = read_saved(path, log)
    return saved if made_with(saved, config) else None


def fingerprint(*parts):
    """A short, stable hash of arrays, tensors and plain values."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.cpu().numpy()
        if isinstance(part, np.ndarray):
            h.update(str((part.dtype, part.shape)).encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:16]
