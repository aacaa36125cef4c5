"""Configuration and the start of a run: a script's constants block, its presets and --NAME=value overrides, the
error a user can fix (UserError), and what every run sets up and logs (device, seeds, environment, stage timings)."""
import ast
import contextlib
import ctypes
import logging
import platform
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
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


def constants(namespace):
    """A script's constants: its UPPER_CASE names from PRESET up to PRESETS, in the file's order (a module's
    names keep the order they were defined in). Names defined above or below that block are not settings."""
    names = list(namespace)
    if "PRESET" not in names or "PRESETS" not in names:
        raise ValueError("a script's constants block starts with PRESET and ends before PRESETS")
    block = names[names.index("PRESET"):names.index("PRESETS")]
    settings = (bool, int, float, str, list, tuple)
    return {k: namespace[k] for k in block if k.isupper() and isinstance(namespace[k], settings)}


def configure(namespace, argv=None):
    """The run's configuration: a script's constants (see constants()), then the preset named by PRESET from
    the script's own PRESETS, then --NAME=value from the command line.

    Returns a SimpleNamespace of the values; its `changes` maps every constant the preset or the command
    line changed to (value in the file, value used, "preset <name>" or "command line"). The script's own
    globals are left untouched.
    """
    defaults = constants(namespace)
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


def start_script(script, namespace, argv, check=None):
    """The preamble of every step: its configuration (checked by `check`), device, CPU threads (a THREADS
    constant, 0 = torch's default) and logger. Returns (cfg, device, log)."""
    cfg = configure(namespace, argv)
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
    """Before a paper-preset run on a CPU: say what it is projected to cost (docs/performance.md)."""
    if cfg.PRESET == "paper" and device.type == "cpu":
        log.warning("warning: the paper preset on a CPU: %s, projected from the 2-core CPU figures of "
                    "docs/performance.md "
                    "(Performance). Stop with Ctrl-C if that is too long: finished units are kept and a rerun "
                    "resumes; or run on a GPU (DEVICE=auto picks one).", projection)


@contextlib.contextmanager
def stage(log, name):
    """Log the wall-clock of a stage of a run."""
    start = time.perf_counter()
    yield
    log.info("%s: %.1f s", name, time.perf_counter() - start)


def data_options(cfg):
    """The arguments of utils.load_task that a script's constants give: its data, split and limits."""
    return dict(data_dir=cfg.DATA_DIR, val_fraction=cfg.VAL_FRACTION, seed=cfg.SEED, train_limit=cfg.TRAIN_LIMIT,
                eval_limit=cfg.EVAL_LIMIT, download=cfg.DOWNLOAD)
