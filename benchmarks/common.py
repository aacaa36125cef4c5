"""Shared parts of the benchmarks: options, the matmul roofline, an alternating timer, the wall-clock
and peak memory of a child process, and CSV output."""
import argparse
import contextlib
import multiprocessing
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torchvision.transforms import ToTensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's modules, when a benchmark runs as a script

import utils  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data"  # full MNIST / Fashion-MNIST, kept outside the repo
SAMPLE = REPO / "data" / utils.SAMPLE_DIR
# the paper's splits of MNIST and Fashion-MNIST: 10 % of the 60,000 training images held out
PAPER_TRAIN, PAPER_VAL, PAPER_TEST = 54_000, 6_000, 10_000


# ----------------------------------------------------------------------------- options
def parser(description, sizes):
    """The options every benchmark has; `sizes` maps smoke / full to the defaults of its own options."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", choices=tuple(sizes), default="full",
                   help="smoke: seconds, synthetic or bundled data (the tests); full: the real measurement")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder of the full Kaggle CSVs (full size)")
    p.add_argument("--out", default=str(RESULTS), help="folder the CSV is written to")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--repeats", type=int, help="timed repeats of each variant (after one warm-up)")
    p.set_defaults(sizes=sizes)
    return p


def parse(p, argv):
    """Parse argv; options left unset take the chosen size's defaults."""
    args = p.parse_args(argv)
    for name, value in args.sizes[args.size].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.smoke = args.size == "smoke"
    args.device = utils.get_device(args.device)
    return args


def require_full_data(data_dir, dataset):
    """Stop unless data_dir holds the full files of a dataset: the bundled sample would be read silently."""
    missing = [f for f in utils.DATASETS[dataset].files
               if not any((Path(data_dir) / name).is_file() for name in (f, f"{f}.gz"))]
    if missing:
        sys.exit(f"error: {', '.join(missing)}(.gz) not in {data_dir}/; give the folder of the full "
                 "CSVs with --data, or run --size=smoke")


def data_config(module, data_dir, *extra, preset="paper"):
    """A script's configuration under a preset (the paper's by default), reading data_dir."""
    return utils.configure(vars(module), [f"--PRESET={preset}", f"--DATA_DIR={data_dir}", *extra])


# ----------------------------------------------------------------------------- timing
@contextlib.contextmanager
def threads(n):
    """Run with n CPU threads (0: leave torch's number), as a script's THREADS constant does; then restore."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sync(device):
    """Wait for queued GPU work, so a timer sees it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(variants, repeats, device, warmup=True):
    """Median seconds of each variant: a warm-up run each, then `repeats` rounds of all in turn,
    so a change in the machine's load hits every variant alike."""
    for fn in variants.values() if warmup else ():
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def roofline(device, smoke):
    """fp32 matmul FLOP/s of this machine: median of timed torch.mm of square matrices (2n^3 FLOP)."""
    n = 1024 if smoke else 4096  # smaller products measure scheduling, not arithmetic
    a, b, c = (torch.randn(n, n, device=device) for _ in range(3))
    # into a preallocated output: allocation is not timed
    seconds = alternate({"mm": lambda: torch.mm(a, b, out=c)}, 3 if smoke else 10, device)["mm"]
    flops = 2 * n ** 3 / seconds
    print(f"roofline: fp32 matmul {n}x{n} on {device_name(device)}, {flops / 1e9:.1f} GFLOP/s")
    return flops


def device_name(device):
    env = utils.environment(device)
    return f"{device.type} ({env.get('gpu') or env.get('cpu')}, {env['threads']} threads)"


def context(device, peak, label=None):
    """Columns every CSV row carries: where it ran (label: as device_name said while it ran) and
    the roofline its figures compare with."""
    return dict(device=label or device_name(device), roofline_gflops=peak / 1e9)


def share(flop, seconds, peak):
    """Achieved GFLOP/s and its percentage of the roofline."""
    return dict(gflops=flop / seconds / 1e9, roofline_pct=100 * flop / seconds / peak)


# ----------------------------------------------------------------------------- child processes
def _serve(conn, factory, args):
    fn = factory(*args)
    while conn.recv():
        try:
            conn.send((True, fn()))
        except Exception:  # the parent raises it with the child's traceback
            conn.send((False, traceback.format_exc()))


class Worker:
    """fn = factory(*args) in a spawned process of its own, called on each call of the Worker.

    Malloc settings are process-wide and setting any of them ends glibc's own tuning for good, so a
    variant that changes them runs here, and the variant it is compared with keeps a default process.
    """

    def __init__(self, factory, *args):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, factory, args), daemon=True)
        self.process.start()

    def __call__(self):
        self.conn.send(True)
        ok, result = self.conn.recv()
        if not ok:
            raise RuntimeError(f"worker process failed:\n{result}")
        return result

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.conn.send(False)
        self.process.join()


# Linux starts a forked child's peak RSS at its parent's size, so a benchmark holding a model would
# inflate the figure: a fresh, small Python starts the command and writes the command's own peak
# (KiB on Linux, bytes on macOS) and exit status to the file named by its first argument.
_REPORT_PEAK = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_child(cmd, log_path):
    """Run cmd (its first element a path) from the repo root; its wall-clock seconds and peak RSS in MiB."""
    report = Path(f"{log_path}.peak")
    with open(log_path, "w") as log:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", _REPORT_PEAK, report, *map(str, cmd)], cwd=REPO,
                       stdout=log, stderr=subprocess.STDOUT, check=True)
        seconds = time.perf_counter() - start
    peak, code = map(int, report.read_text().split())
    if code:
        tail = "\n".join(Path(log_path).read_text().splitlines()[-20:])
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited with {code}:\n{tail}")
    return seconds, peak * (1 if sys.platform == "darwin" else 1024) / 2 ** 20


# ----------------------------------------------------------------------------- the naive input pipeline
class NaiveImages(torch.utils.data.Dataset):
    """What most reproductions feed a network: torchvision's MNIST __getitem__, a PIL image per
    sample turned into a tensor by ToTensor, batched by a DataLoader."""

    def __init__(self, split):
        self.images = split.x.mul(255).round().to(torch.uint8).squeeze(1).numpy()  # as stored on disk
        self.labels = split.y.numpy()
        self.to_tensor = ToTensor()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.to_tensor(Image.fromarray(self.images[i])), int(self.labels[i])


def base_cnn_forward_flop(num_classes=2):
    """FLOP of one image's forward pass through BaseCNN (multiply-adds count 2)."""
    conv = 2 * 32 * 28 * 28 * 5 * 5         # Conv2d(1 -> 32, 5x5, padding 2) on 28x28
    hidden = 2 * (28 * 28 * 32) * 1024      # Linear(25,088 -> 1,024)
    head = 2 * 1024 * num_classes           # Linear(1,024 -> classes)
    return conv + hidden + head


def synthetic_split(n, num_classes=2, seed=0):
    """n random images in [0, 1] and labels: enough to time a network on."""
    gen = torch.Generator().manual_seed(seed)
    return utils.Split(torch.rand(n, 1, 28, 28, generator=gen),
                       torch.arange(n) % num_classes)


# ----------------------------------------------------------------------------- output
def save(rows, name, out):
    """Write rows to <out>/<name>.csv, print them, and return them as a DataFrame."""
    frame = pd.DataFrame(rows)
    path = Path(out) / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(f"\n{name} ({path}):\n{frame.to_string(index=False, float_format='{:.4g}'.format)}")
    return frame


def naive_epoch(model, optimizer, loader, loss_fn, device):
    """The usual training loop: DataLoader batches moved to the device, the loss read every batch."""
    model.train()
    running = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        running += loss.item()
    return running
