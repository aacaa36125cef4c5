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

import configuration  # noqa: E402
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
    p.add_argument("--out", help=f"folder the CSV is written to (default: the size's, else {RESULTS})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--repeats", type=int, help="timed repeats of each variant (after one warm-up)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "both"), default="auto",
                   help="the precision(s) ours runs in (PRECISION; the naive way stays fp32). auto: fp32, and bf16 "
                        "too where a bf16 matmul outruns an fp32 one (a GPU, a CPU with AVX512-BF16 or AMX)")
    p.set_defaults(sizes=sizes)
    return p


def parse(p, argv):
    """Parse argv; options left unset take the chosen size's defaults."""
    args = p.parse_args(argv)
    for name, value in args.sizes[args.size].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.out = args.out or str(RESULTS)
    args.smoke = args.size == "smoke"
    args.device = configuration.get_device(args.device)
    return args


def require_full_data(data_dir, dataset):
    """Stop unless data_dir holds the full files of a dataset: the bundled sample would be read silently."""
    missing = [f for f in utils.DATASETS[dataset].files
               if not any((Path(data_dir) / name).is_file() for name in (f, f"{f}.gz"))]
    if missing:
        sys.exit(f"error: {', '.join(missing)}(.gz) not in {data_dir}/; give the folder of the full "
                 "CSVs with --data, or run --size=smoke")


def script_config(module, data_dir, *extra, preset="paper"):
    """A script's configuration under a preset (the paper's by default), reading data_dir."""
    return configuration.configure(vars(module), [f"--PRESET={preset}", f"--DATA_DIR={data_dir}", *extra])


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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def mm_seconds(n, dtype, device, repeats):
    """Median seconds of an n x n torch.mm in dtype, into a preallocated output (allocation is not timed)."""
    a, b, c = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(3))
    return alternate({"mm": lambda: torch.mm(a, b, out=c)}, repeats, device)["mm"]


def roofline(device, smoke, precision="fp32"):
    """Matmul FLOP/s of this machine in a precision: median of timed torch.mm of square matrices (2n^3 FLOP)."""
    n = 256 if smoke else 4096  # smaller products measure scheduling, not arithmetic (smoke: emulated bf16 too)
    flops = 2 * n ** 3 / mm_seconds(n, DTYPES[precision], device, 3 if smoke else 10)
    print(f"roofline: {precision} matmul {n}x{n} on {device_name(device)}, {flops / 1e9:.1f} GFLOP/s")
    return flops


def precisions(args):
    """The precisions ours runs in (--precision), and the matmul roofline of each precision measured (fp32's
    always: the naive way's). Without native bf16 (an AVX2 CPU, say) torch emulates it, some 80x slower than
    fp32, so auto then runs fp32 alone."""
    wanted = ("fp32", "bf16") if args.precision in ("auto", "both") else (args.precision,)
    if args.precision == "auto":
        probe = {p: mm_seconds(512, DTYPES[p], args.device, 3) for p in wanted}
        if probe["bf16"] >= probe["fp32"]:
            print(f"bf16 left out: a 512x512 bf16 matmul takes {probe['bf16'] / probe['fp32']:.1f}x the fp32 one "
                  f"on {device_name(args.device)} (emulated); --precision=both measures it anyway")
            wanted = ("fp32",)
    return wanted, {p: roofline(args.device, args.smoke, p) for p in dict.fromkeys(("fp32", *wanted))}


def variants(precisions):
    """{variant: its precision}: ours in each precision ("ours" is fp32), then the naive way (fp32)."""
    return {**{"ours" if p == "fp32" else f"ours_{p}": p for p in precisions}, "naive": "fp32"}


def device_name(device):
    env = configuration.environment(device)
    return f"{device.type} ({env.get('gpu') or env.get('cpu')}, {env['threads']} threads)"


def context(device, peak, label=None, precision="fp32"):
    """Columns every CSV row carries: where it ran (label: as device_name said while it ran), its precision
    and that precision's roofline, which its figures compare with."""
    return dict(device=label or device_name(device), precision=precision, roofline_gflops=peak / 1e9)


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
