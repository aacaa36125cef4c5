"""Shared helpers of the three scripts: configuration, tasks, data, training, metrics, checkpoints."""
import ast
import contextlib
import ctypes
import glob
import gzip
import hashlib
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zlib
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

# constants that change where or how fast a run goes, never its numbers
NON_RESULT_KEYS = {"PRESET", "DATA_DIR", "CKPT_DIR", "DEVICE", "DOWNLOAD", "EVAL_BATCH", "THREADS",
                   "TASKS", "SOURCES", "TARGETS", "EXECUTOR", "RAY_ADDRESS", "CPUS_PER_UNIT", "GPUS_PER_UNIT"}


class UserError(Exception):
    """A problem the user can fix (bad input, missing file, wrong constant): printed without a traceback."""


def run(main):
    """Entry point of a script: turn a UserError into one clear message and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _parse_value(name, text, default):
    """Parse a command-line value and check it has the type of the constant it replaces."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError):  # TypeError: e.g. {[1]: 2}
        value = text  # a bare word is a string
    if isinstance(default, str) and not isinstance(value, str):
        value = text  # a name or path that looks like a number (--CKPT_DIR=2024) is still a string
    return _check_type(name, value, default, f"--{name}={text}")


def _check_type(name, value, default, where):
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:  # list or tuple: any sequence, converted, with elements of the default's element type
        ok = isinstance(value, (list, tuple))
        if ok and default:
            kind = type(default[0])
            ok = all(isinstance(v, kind) for v in value)
        value = type(default)(value) if ok else value
    if not ok:
        raise UserError(f"{where}: {name} must be of type {type(default).__name__} "
                        f"like its default {default!r}")
    return value


def configure(namespace, argv=None):
    """The run's configuration: a script's UPPER_CASE constants, then the preset named by PRESET from
    the script's own PRESETS, then --NAME=value from the command line.

    Returns a SimpleNamespace of the values; its `changes` maps every constant the preset or the command
    line changed to (value in the file, value used, "preset <name>" or "command line"). The script's own
    globals are left untouched.
    """
    defaults = {k: v for k, v in namespace.items()
                if k.isupper() and isinstance(v, (bool, int, float, str, list, tuple))}
    presets = namespace.get("PRESETS", {})
    argv = sys.argv[1:] if argv is None else argv
    overrides = {}
    for arg in argv:
        name, eq, text = arg.lstrip("-").partition("=")
        if not arg.startswith("--") or not eq:
            raise UserError(f"cannot read argument {arg!r}: write --NAME=value. "
                            f"Valid names: {', '.join(defaults)}")
        if name not in defaults:
            raise UserError(f"unknown constant {name!r}. Valid names: {', '.join(defaults)}")
        overrides[name] = _parse_value(name, text, defaults[name])
    values = dict(defaults)
    preset = overrides.get("PRESET", values.get("PRESET", ""))
    if preset and preset not in presets:
        raise UserError(f"unknown PRESET {preset!r}. Valid presets: {', '.join(presets) or 'none'} "
                        "(or PRESET='' for the constants as written)")
    changes = {}
    for name, value in presets.get(preset, {}).items():
        if name not in defaults:
            raise UserError(f"preset {preset!r} sets {name}, which is not a constant of this script. "
                            f"Valid names: {', '.join(defaults)}")
        values[name] = _check_type(name, value, defaults[name], f"preset {preset!r}")
        changes[name] = f"preset {preset}"
    values.update(overrides)
    changes.update({name: "command line" for name in overrides})
    cfg = SimpleNamespace(**values)
    cfg.changes = {name: (defaults[name], values[name], why) for name, why in changes.items()
                   if values[name] != defaults[name]}
    return cfg


def settings(cfg):
    """The constants of a configuration, without its bookkeeping."""
    return {k: v for k, v in vars(cfg).items() if k.isupper()}


def result_config(cfg, extra_ignored=()):
    """The part of a configuration that can change a run's numbers: what checkpoints must match."""
    return {k: v for k, v in settings(cfg).items() if k not in NON_RESULT_KEYS | set(extra_ignored)}


# ----------------------------------------------------------------------------- run bookkeeping
def get_device(name="auto"):
    """'auto' picks CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"DEVICE={name!r} is not a device name: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"DEVICE={name!r} but no CUDA device is available: use DEVICE=auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"DEVICE={name!r} but MPS is not available: use DEVICE=auto or cpu")
    return device


def set_seed(seed):
    """Seed every random source the project uses."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA and MPS


def environment(device):
    """Versions and hardware, logged by every run and stored in every checkpoint."""
    env = dict(python=platform.python_version(), torch=str(torch.__version__),
               numpy=np.__version__, platform=platform.platform(),
               device=str(device), threads=torch.get_num_threads())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


# glibc serves every allocation over 32 MB from fresh mmap pages and unmaps it on free, so each
# training step of the base CNN (its 25,088 x 1,024 gradient is 98 MB) faulted in and zeroed about
# 100 MB in the kernel: a fifth of the step. From the heap, with up to 1 GiB of freed memory kept,
# the next step reuses the same pages. Only step 1 asks for it: its allocations repeat exactly, while
# step 3's varied ones fragment a heap that cannot shrink (a 4 GB peak grew to 17 GB).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h


def keep_freed_memory():
    """Make glibc's malloc serve large blocks from the heap and keep up to 1 GiB freed for reuse, for
    the rest of the process (any mallopt call also ends glibc's own tuning); True where it applied
    (Linux with glibc), False elsewhere, where the allocator is left as it is.

    train_task.py calls it only when it runs as a script, never on import: a process that imports it
    (pytest, a notebook, the benchmarks) keeps glibc's defaults."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def start_script(script, constants, argv, check=None):
    """The preamble of every step: its configuration (checked by `check`), device, CPU threads (a THREADS
    constant, 0 = torch's default) and logger. Returns (cfg, device, log)."""
    cfg = configure(constants, argv)
    if check is not None:
        check(cfg)
    device = get_device(cfg.DEVICE)
    if getattr(cfg, "THREADS", 0):
        torch.set_num_threads(cfg.THREADS)
    return cfg, device, start_run(script, cfg, device)


def start_run(script, cfg, device):
    """A logger that writes to the console and to CKPT_DIR/logs/<script>.log, with the run's header."""
    log_dir = Path(cfg.CKPT_DIR) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger(script)
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout),
                    logging.FileHandler(log_dir / f"{script}.log", encoding="utf-8")):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.info("=== %s%s", script, f", preset {cfg.PRESET}" if cfg.PRESET else "")
    log.info("config: %s", settings(cfg))
    for name, (before, after, why) in cfg.changes.items():
        log.info("  %s = %r (%s; the file says %r)", name, after, why, before)
    log.info("environment: %s", environment(device))
    return log


def warn_paper_on_cpu(cfg, device, log, projection):
    """Before a paper-preset run on a CPU: say what it is projected to cost (README, Performance)."""
    if cfg.PRESET == "paper" and device.type == "cpu":
        log.warning("warning: the paper preset on a CPU: %s, projected from the 2-core CPU figures of README.md "
                    "(Performance). Stop with Ctrl-C if that is too long: finished units are kept and a rerun "
                    "resumes; or run on a GPU (DEVICE=auto picks one).", projection)


@contextlib.contextmanager
def stage(log, name):
    """Log the wall-clock of a stage of a run."""
    start = time.perf_counter()
    yield
    log.info("%s: %.1f s", name, time.perf_counter() - start)


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


# ----------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class DatasetSpec:
    files: tuple          # (train, test) CSV names in the Kaggle layout, plain or .gz
    classes: tuple        # class names, in label order
    torchvision: str = "" # torchvision class that downloads it ("" = none)


QUICKDRAW_CLASSES = ("apple", "baseball bat", "bear", "envelope", "guitar", "lollipop",
                     "moon", "mouse", "mushroom", "rabbit")
QUICKDRAW_TRAIN, QUICKDRAW_TEST = 5000, 1000  # drawings per class: the first 5,000 train, the next 1,000 test
QUICKDRAW_URL = "https://storage.googleapis.com/quickdraw_dataset/full/numpy_bitmap/"

DATASETS = {
    "mnist": DatasetSpec(("mnist_train.csv", "mnist_test.csv"),
                         tuple(str(d) for d in range(10)), "MNIST"),
    "fashion": DatasetSpec(("fashion-mnist_train.csv", "fashion-mnist_test.csv"),
                           ("tshirt", "trouser", "pullover", "dress", "coat",
                            "sandal", "shirt", "sneaker", "bag", "boot"), "FashionMNIST"),
    "quickdraw": DatasetSpec(("quickdraw_train.csv", "quickdraw_test.csv"), QUICKDRAW_CLASSES),
}
SAMPLE_DIR = "sample"  # the bundled sample lives in DATA_DIR/sample
_SAMPLE_NOTED = set()  # (dataset, folder) pairs whose use of the sample was already logged
PIXELS = 28 * 28


def _find(data_dir, name):
    """The .csv or .csv.gz file of that name in data_dir, or None."""
    for candidate in (Path(data_dir) / name, Path(data_dir) / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_kaggle_csv(path, num_classes):
    """Images (N, 28, 28) uint8 and labels (N,) int64 from a CSV: a header, then label + 784 pixels."""
    fix = "fix or replace the file (layout: a header row, then label and 784 pixels 0..255 per row)"
    try:
        frame = pd.read_csv(path, header=0, engine="c")
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the file is empty; {fix}")
    except pd.errors.ParserError as e:
        raise UserError(f"{path}: wrong number of columns ({str(e).strip().splitlines()[-1]}); {fix}")
    except (EOFError, OSError, zlib.error, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({e}); the file looks truncated or corrupt, "
                        "download or copy it again")
    if not isinstance(frame.index, pd.RangeIndex):  # pandas makes a first row with one field too many an index
        raise UserError(f"{path}: row 2 (line 2 of the file) has {frame.shape[1] + 1} fields, "
                        f"the header {frame.shape[1]}; {fix}")
    if frame.shape[1] != 1 + PIXELS:
        raise UserError(f"{path}: {frame.shape[1]} columns, expected {1 + PIXELS} "
                        f"(label + {PIXELS} pixels); {fix}")
    if len(frame) == 0:
        raise UserError(f"{path}: the file has a header but no rows; {fix}")
    text_columns = frame.columns[[not pd.api.types.is_numeric_dtype(t) for t in frame.dtypes]]
    numeric = frame.copy() if len(text_columns) else frame
    for col in text_columns:  # only columns holding something that is not a number
        numeric[col] = pd.to_numeric(frame[col], errors="coerce")
    values = numeric.to_numpy(dtype=np.float64)
    bad = np.isnan(values) | (values != np.round(values))
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        what = "missing value" if pd.isna(frame.iat[row, col]) else f"non-integer value {str(frame.iat[row, col])!r}"
        raise UserError(f"{path}: row {row + 2} (line {row + 2} of the file), column "
                        f"{frame.columns[col]!r}: {what}; {fix}")
    labels, pixels = values[:, 0], values[:, 1:]
    out = (pixels < 0) | (pixels > 255)
    if out.any():
        row, col = map(int, np.argwhere(out)[0])
        raise UserError(f"{path}: row {row + 2} (line {row + 2} of the file): pixel {col + 1} is "
                        f"{pixels[row, col]:g}, outside 0..255; {fix}")
    wrong = (labels < 0) | (labels >= num_classes)
    if wrong.any():
        row = int(np.argmax(wrong))
        raise UserError(f"{path}: row {row + 2} (line {row + 2} of the file): label {labels[row]:g} "
                        f"is not a class of this dataset (0..{num_classes - 1}); {fix}")
    images = torch.from_numpy(pixels.astype(np.uint8).reshape(-1, 28, 28))
    return images, torch.from_numpy(labels.astype(np.int64))


def read_quickdraw_npy(path, rows):
    """The first `rows` drawings of one Quick, Draw! class file, uint8 (rows, 28, 28)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npy file ({e}); download it again")
    if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != PIXELS:
        raise UserError(f"{path}: holds {array.dtype} {array.shape}, expected uint8 (N, {PIXELS}) "
                        "bitmaps as in Quick, Draw!'s numpy_bitmap files")
    if array.shape[0] < rows:
        raise UserError(f"{path}: {array.shape[0]} drawings, the split needs at least {rows} "
                        f"({QUICKDRAW_TRAIN} train + {QUICKDRAW_TEST} test); use the full official file")
    return torch.from_numpy(np.array(array[:rows])).reshape(rows, 28, 28)


def quickdraw_file(cls):
    return f"full_numpy_bitmap_{cls}.npy"


def _load_quickdraw_npy(folder):
    need = QUICKDRAW_TRAIN + QUICKDRAW_TEST
    parts = [read_quickdraw_npy(folder / quickdraw_file(c), need) for c in QUICKDRAW_CLASSES]
    labels = torch.arange(len(parts)).repeat_interleave(need).view(len(parts), need)
    images = torch.stack(parts)  # (classes, need, 28, 28)
    split = lambda t: (t[:, :QUICKDRAW_TRAIN].flatten(0, 1), t[:, QUICKDRAW_TRAIN:].flatten(0, 1))
    (train_x, test_x), (train_y, test_y) = split(images), split(labels)
    return train_x, train_y, test_x, test_y


def _missing_message(name, data_dir, spec):
    where = Path(data_dir)
    files = " and ".join(f"{f}(.gz)" for f in spec.files)
    text = f"dataset {name!r}: {files} not found in {where}/"
    if name == "quickdraw":
        text += (f" (nor {where}/quickdraw/{quickdraw_file('<class>')} for the classes "
                 f"{', '.join(QUICKDRAW_CLASSES)})")
    return text + (". Put the files there, or run with --DOWNLOAD=True to fetch them "
                   "(see the Data section of README.md)")


@dataclass(eq=False)  # hashed by identity: the cache of splits is keyed on the loaded dataset
class RawDataset:
    train_x: torch.Tensor  # uint8 (N, 28, 28)
    train_y: torch.Tensor  # int64 (N,), original classes
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str            # where it was read from, for the log
    digest: str            # fingerprint of the content


def load_dataset(name, data_dir, download=False, log=None):
    """Read a whole dataset from data_dir; the bundled sample only when no full file is there."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    spec, data_dir = DATASETS[name], Path(data_dir)
    found = [_find(data_dir, f) for f in spec.files]
    qd_dir = data_dir / "quickdraw"
    has_npy = name == "quickdraw" and any((qd_dir / quickdraw_file(c)).exists() for c in QUICKDRAW_CLASSES)
    if not any(found) and not has_npy:
        sample = [_find(data_dir / SAMPLE_DIR, f) for f in spec.files]
        if download:
            download_dataset(name, data_dir, log=log)
            return load_dataset(name, data_dir, log=log)
        if all(sample):
            found = sample
            if log and (name, str(data_dir)) not in _SAMPLE_NOTED:
                _SAMPLE_NOTED.add((name, str(data_dir)))
                log.info("%s: full files not in %s/, using the bundled sample %s/ "
                         "(put %s there for the full data)", name, data_dir,
                         data_dir / SAMPLE_DIR, " and ".join(spec.files))
        else:
            raise UserError(_missing_message(name, data_dir, spec))
    if any(found) and not all(found):
        missing = spec.files[found.index(None)]
        raise UserError(f"dataset {name!r}: {missing}(.gz) is missing from {data_dir}/ "
                        f"next to {next(f for f in found if f)}; add it or --DOWNLOAD=True")
    return _read_dataset(name, tuple(found), qd_dir if not any(found) else None)


@lru_cache(maxsize=4)
def _read_dataset(name, files, npy_dir):
    num_classes = len(DATASETS[name].classes)
    if npy_dir is not None:
        train_x, train_y, test_x, test_y = _load_quickdraw_npy(npy_dir)
        source = f"{npy_dir}/{quickdraw_file('*')}"
    else:
        (train_x, train_y), (test_x, test_y) = (read_kaggle_csv(f, num_classes) for f in files)
        source = ", ".join(str(f) for f in files)
    digest = fingerprint(train_x, train_y, test_x, test_y)
    return RawDataset(train_x, train_y, test_x, test_y, source, digest)


# ----------------------------------------------------------------------------- downloads
def _fetch(url, dest):
    """Download url to dest atomically."""
    def write(tmp):
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, length=1 << 20)
            size = response.headers.get("Content-Length")
            if size is not None and f.tell() != int(size):  # urllib does not notice a dropped connection
                raise OSError(f"connection closed after {f.tell()} of {size} bytes")
    try:
        atomic_write(dest, write)
    except OSError as e:
        raise UserError(f"download of {url} failed ({e}); check the connection or put "
                        f"{Path(dest).name} in {Path(dest).parent}/ by hand")


def write_kaggle_csv(path, images, labels):
    """Write images (N, 28, 28) uint8 and labels in the Kaggle CSV layout (gzip if path ends in .gz)."""
    frame = pd.DataFrame(images.reshape(len(images), -1).numpy(),
                         columns=[f"pixel{i + 1}" for i in range(PIXELS)])
    frame.insert(0, "label", labels.numpy())
    def write(tmp):
        text = frame.to_csv(index=False).encode()
        # gzip.compress stores no file name (a temp name would be) and mtime 0: same bytes twice
        Path(tmp).write_bytes(gzip.compress(text, mtime=0) if str(path).endswith(".gz") else text)
    atomic_write(path, write)


def download_dataset(name, data_dir, log=None, quickdraw_url=QUICKDRAW_URL):
    """Fetch a dataset into data_dir: torchvision for MNIST/Fashion-MNIST (saved as Kaggle CSVs),
    Google's public bucket for the 10 Quick, Draw! classes."""
    data_dir = Path(data_dir)
    spec = DATASETS[name]
    if log:
        log.info("downloading %s into %s/", name, data_dir)
    if name == "quickdraw":
        for cls in QUICKDRAW_CLASSES:
            dest = data_dir / "quickdraw" / quickdraw_file(cls)
            if not dest.exists():
                _fetch(quickdraw_url + urllib.parse.quote(f"{cls}.npy"), dest)
        return
    import torchvision.datasets
    source = getattr(torchvision.datasets, spec.torchvision)
    with tempfile.TemporaryDirectory(dir=data_dir if data_dir.exists() else None) as raw:
        for train, file in zip((True, False), spec.files):
            try:
                ds = source(raw, train=train, download=True)
            except (RuntimeError, OSError) as e:
                raise UserError(f"download of {name} failed ({e}); check the connection or "
                                f"put {file}(.gz) in {data_dir}/ by hand")
            write_kaggle_csv(data_dir / f"{file}.gz", ds.data, ds.targets)


# ----------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """A task is data: a dataset and a labelling of its classes.

    labelling: "indicator" (classes=(k,): k -> 1, rest -> 0), "classes" (classes=(a, b, ...):
    a -> 1, b -> 2, ..., every other class -> 0 "rest"), "all" (every class its own label),
    "odd_even" (odd classes -> 1). seed is added to SEED for the task's network, so two tasks on
    the same labelled data can have independently trained networks.
    """
    dataset: str
    labelling: str = "indicator"
    classes: tuple = ()
    seed: int = 0

    @property
    def num_classes(self):
        return {"indicator": 2, "odd_even": 2, "all": len(DATASETS[self.dataset].classes)}.get(
            self.labelling, len(self.classes) + 1)

    def relabel(self, y):
        if self.labelling == "all":
            return y.clone()
        if self.labelling == "odd_even":
            return y % 2
        new = torch.zeros_like(y)
        for i, c in enumerate(self.classes, start=1):
            new[y == c] = i
        return new

    def check(self, name):
        if self.dataset not in DATASETS:
            raise UserError(f"task {name!r}: unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        labellings = ("indicator", "classes", "all", "odd_even")
        if self.labelling not in labellings:
            raise UserError(f"task {name!r}: unknown labelling {self.labelling!r}; use one of {labellings}")
        n = len(DATASETS[self.dataset].classes)
        if (self.labelling == "indicator" and len(self.classes) != 1) or \
                (self.labelling == "classes" and not self.classes) or \
                any(not 0 <= c < n for c in self.classes):
            raise UserError(f"task {name!r}: classes {self.classes} do not fit labelling "
                            f"{self.labelling!r} on {self.dataset} (classes 0..{n - 1})")


def _indicators(dataset, prefix, names):
    return {f"{prefix}{n}": Task(dataset, "indicator", (i,)) for i, n in enumerate(names)}


# The registry of tasks: add one with a line such as TASK_REGISTRY["mnist_17"] = Task("mnist", "classes", (1, 7))
TASK_REGISTRY = {
    **_indicators("mnist", "mnist", range(10)),                  # mnist0 .. mnist9
    **_indicators("fashion", "", DATASETS["fashion"].classes),   # tshirt, trouser, ... boot
    **_indicators("quickdraw", "qd_", [c.replace(" ", "_") for c in QUICKDRAW_CLASSES]),
    "mnist_all": Task("mnist", "all"),
    "mnist_odd_even": Task("mnist", "odd_even"),
    "fashion_all": Task("fashion", "all"),
}
DICTIONARY = ["mnist0", "mnist1", "mnist2", "mnist3", "mnist4",
              "tshirt", "trouser", "pullover", "dress", "coat"]  # the paper's base tasks
# <task>_copy: the same labelled data, its network trained from another seed. A copy of a base task
# should come out closest to its original: the validity check of a task distance.
TASK_REGISTRY.update({f"{n}_copy": replace(TASK_REGISTRY[n], seed=1) for n in DICTIONARY})
PAPER_TARGET = "qd_moon"       # the paper's target: "moon" among 10 Quick, Draw! classes
HELD_OUT_TARGET = "sandal"     # a target on the bundled data, for runs without Quick, Draw!


def get_task(name):
    if name not in TASK_REGISTRY:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASK_REGISTRY)} "
                        "(add one to TASK_REGISTRY in utils.py)")
    task = TASK_REGISTRY[name]
    task.check(name)
    return task


@dataclass
class Split:
    x: torch.Tensor  # float32 (N, 1, 28, 28) in [0, 1]
    y: torch.Tensor  # int64 (N,) task labels


@dataclass
class TaskData:
    name: str
    task: Task
    train: Split
    val: Split
    test: Split
    fingerprint: str  # data, labelling and split: what a network trained on this task saw
    source: str


def closest_label(entry, spec=".2f"):
    """A closest-list entry of step 2 ({"task", "distance", ...}) for a log line: "task (distance)", or
    "task (infeasible)" when it has no distance."""
    distance = entry["distance"]
    return f"{entry['task']} ({'infeasible' if distance is None else format(distance, spec)})"


def stratified_split(labels, val_fraction, seed):
    """Indices (train, val): val_fraction of every class to validation, the rest shuffled to train."""
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = int(round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    train, val = torch.cat(train), torch.cat(val)
    return train[torch.randperm(len(train), generator=gen)], val.sort().values


@lru_cache(maxsize=4)
def _splits(raw, val_fraction, seed, train_limit, eval_limit):
    """Shared float tensors of a dataset's splits, scaled to [0, 1] once."""
    train_idx, val_idx = stratified_split(raw.train_y, val_fraction, seed)
    # the fingerprint names the split, not the subset a budget uses, so later steps may use less data
    digest = fingerprint(train_idx, val_idx)
    if train_limit:
        train_idx = train_idx[:train_limit]
    test_idx = torch.arange(len(raw.test_y))
    if eval_limit:  # an evenly spread subset keeps every class
        val_idx = val_idx[torch.linspace(0, len(val_idx) - 1, min(eval_limit, len(val_idx))).long()]
        test_idx = test_idx[torch.linspace(0, len(test_idx) - 1, min(eval_limit, len(test_idx))).long()]
    scale = lambda x, idx: x[idx].unsqueeze(1).float().div_(255)
    return ((scale(raw.train_x, train_idx), raw.train_y[train_idx]),
            (scale(raw.train_x, val_idx), raw.train_y[val_idx]),
            (scale(raw.test_x, test_idx), raw.test_y[test_idx]), digest)


def load_task(name, cfg, log=None):
    """A task's train / validation / test splits, labelled for the task."""
    task = get_task(name)
    raw = load_dataset(task.dataset, cfg.DATA_DIR, cfg.DOWNLOAD, log)
    *parts, split_digest = _splits(raw, cfg.VAL_FRACTION, cfg.SEED, cfg.TRAIN_LIMIT, cfg.EVAL_LIMIT)
    splits = [Split(x, task.relabel(y)) for x, y in parts]
    for split_name, split in zip(("training", "validation", "test"), splits):
        counts = torch.bincount(split.y, minlength=task.num_classes)
        if (counts == 0).any():
            raise UserError(f"task {name!r}: class {int(torch.argmin(counts))} of its labelling has no "
                            f"image in the {split_name} split of {raw.source}; the task cannot be "
                            "learned from this data (check the task's classes or the data files)")
    digest = fingerprint(raw.digest, asdict(task), split_digest)
    return TaskData(name, task, *splits, digest, raw.source)


# ----------------------------------------------------------------------------- training
def batches(n, batch_size, shuffle=False, generator=None, device="cpu"):
    """Index batches over range(n), reshuffled on every call when shuffle is set."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return order.to(device).split(batch_size)


def adam(params, lr, device, **kw):
    """Adam with the fused kernel where this torch has it for the device (same maths, one pass)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, **kw)


@torch.inference_mode()
def predict(model, x, batch_size=1000, precision="fp32"):
    """fp32 outputs of model on x, in evaluation mode, batch by batch; moves x to the model's device."""
    model.eval()
    device = next(model.parameters()).device
    with autocast(precision, device):
        return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(x), batch_size)])


def auroc(scores, labels):
    """Area under the ROC curve of binary scores (ties count half); nan if a class is absent."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2)[inverse]  # average rank of each tie group
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(logits, y):
    """Error %, balanced error % (mean per-class miss rate) and AUROC (macro one-vs-rest)."""
    logits, y = logits.float().cpu(), y.cpu()
    pred = logits.argmax(1)
    classes = torch.unique(y)
    recalls = torch.stack([(pred[y == c] == c).float().mean() for c in classes])
    # scores are log-odds from the logits: softmax probabilities saturate to equal values in float32
    logits = logits.double()
    if logits.shape[1] == 2:
        area = auroc((logits[:, 1] - logits[:, 0]).numpy(), (y == 1).numpy())
    else:
        log_odds = lambda c: logits[:, c] - torch.logsumexp(logits[:, torch.arange(logits.shape[1]) != c], 1)
        area = float(np.mean([auroc(log_odds(c).numpy(), (y == c).numpy()) for c in classes.tolist()]))
    return dict(error=100 * float((pred != y).float().mean()),
                balanced_error=100 * float(1 - recalls.mean()), auroc=area)


PRECISIONS = ("fp32", "bf16")


def autocast(precision, device):
    """The context a forward pass runs in: bf16 through torch.autocast, or fp32 as it is. Weights,
    gradients, optimizer state and losses stay fp32 either way."""
    if precision not in PRECISIONS:
        raise UserError(f"PRECISION={precision!r}: use one of {', '.join(PRECISIONS)}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(model, optimizer, xb, yb, loss_fn, precision="fp32"):
    """Forward (in `precision`), backward and an optimizer step on one batch; returns the loss."""
    with autocast(precision, xb.device):
        out = model(xb)
    loss = loss_fn(out.float(), yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_epoch(model, optimizer, x, y, batch_size, generator, device, loss_fn=None, progress=None,
                step=train_step, precision="fp32"):
    """One shuffled pass over (x, y), a step per batch; returns the mean training loss."""
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    model.train()
    total, count = torch.zeros((), device=device), 0
    for idx in batches(len(x), batch_size, True, generator):
        xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
        total += step(model, optimizer, xb, yb, loss_fn, precision) * len(idx)
        count += len(idx)
        if progress is not None:
            progress.update(len(idx))
    return float(total) / max(count, 1)


def cosine_step(optimizer, steps):
    """A train_step that then decays the optimizer's lr along a cosine, to 0 after `steps` steps."""
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))

    def step(*args):
        loss = train_step(*args)
        scheduler.step()
        return loss
    return step


def fit(model, train, epochs, batch_size, lr, seed, device, label="training", precision="fp32",
        lr_schedule="constant"):
    """Train model on a split with Adam (lr, constant or decayed along a cosine to 0) for `epochs` shuffled
    passes (order seeded by seed), with a progress bar; returns the mean loss of every epoch."""
    from tqdm import tqdm
    optimizer = adam(model.parameters(), lr, device)
    generator = torch.Generator().manual_seed(seed)
    step = train_step if lr_schedule == "constant" else \
        cosine_step(optimizer, epochs * math.ceil(len(train.x) / batch_size))
    with tqdm(total=epochs * len(train.x), desc=label, unit="img", leave=False, mininterval=1) as bar:
        return [train_epoch(model, optimizer, train.x, train.y, batch_size, generator, device, progress=bar,
                            step=step, precision=precision) for _ in range(epochs)]


def evaluate(model, data, batch_size=1000, splits=("val", "test"), precision="fp32"):
    """Error %, balanced error % and AUROC of model on each split of a TaskData, keyed '<split>_<metric>'."""
    metrics = {}
    for split in splits:
        part = getattr(data, split)
        scores = classification_metrics(predict(model, part.x, batch_size, precision), part.y)
        metrics.update({f"{split}_{k}": v for k, v in scores.items()})
    return metrics

