"""Data: the datasets (Kaggle CSVs, Quick, Draw! bitmaps, the bundled sample, downloads), the task registry
(a task is a dataset and a labelling) and each task's stratified train / validation / test splits."""
import gzip
import shutil
import tempfile
import urllib.parse
import urllib.request
import zlib
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from configuration import UserError
from store import atomic_write, fingerprint

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
                   "(see \"Tasks and data\" in README.md and data/README.md)")


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


def load_task(name, data_dir, val_fraction=0.1, seed=0, train_limit=0, eval_limit=0, download=False, log=None):
    """A task's train / validation / test splits, labelled for the task: val_fraction of every class of the
    training data held out for validation (seeded by seed), at most train_limit training and eval_limit
    validation and test images (0 = all); missing files downloaded into data_dir when download is set."""
    task = get_task(name)
    raw = load_dataset(task.dataset, data_dir, download, log)
    *parts, split_digest = _splits(raw, val_fraction, seed, train_limit, eval_limit)
    splits = [Split(x, task.relabel(y)) for x, y in parts]
    for split_name, split in zip(("training", "validation", "test"), splits):
        counts = torch.bincount(split.y, minlength=task.num_classes)
        if (counts == 0).any():
            raise UserError(f"task {name!r}: class {int(torch.argmin(counts))} of its labelling has no "
                            f"image in the {split_name} split of {raw.source}; the task cannot be "
                            "learned from this data (check the task's classes or the data files)")
    digest = fingerprint(raw.digest, asdict(task), split_digest)
    return TaskData(name, task, *splits, digest, raw.source)
