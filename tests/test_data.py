"""Data: every bad input is a UserError that names the file, loading, tasks and splits."""
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import configuration
import utils
from configuration import UserError
from conftest import synthetic


# ----------------------------------------------------------------------------- bad Kaggle CSVs
@pytest.fixture
def good_csv(tmp_path):
    """A valid plain CSV of 30 images and its lines (line 1 is the header)."""
    path = tmp_path / "mnist_train.csv"
    utils.write_kaggle_csv(path, *synthetic(3))
    return path, path.read_text().splitlines()


def rewrite(path, lines, index, edit):
    lines = list(lines)
    lines[index] = edit(lines[index])
    path.write_text("\n".join(lines) + "\n")


def last_pixel(value):
    return lambda line: line.rsplit(",", 1)[0] + f",{value}"


def read_error(path):
    with pytest.raises(UserError) as err:
        utils.read_kaggle_csv(path, 10)
    assert str(path) in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("line, edit, expected", [
    (3, lambda line: line + ",5", "line 4, saw 786"),      # a row with an extra field
    (1, lambda line: line + ",5", "row 2"),                # the same in the first row
    (3, lambda line: line.rsplit(",", 1)[0], "row 4 .*'pixel784': missing value"),
    (3, last_pixel("x7"), "row 4 .*'pixel784': non-integer value 'x7'"),
    (3, last_pixel("1.5"), "row 4 .*'pixel784': non-integer value '1.5'"),
    (3, last_pixel(256), "row 4 .*pixel 784 is 256, outside 0..255"),
    (3, last_pixel(-1), "row 4 .*pixel 784 is -1, outside 0..255"),
    (3, lambda line: "10," + line.split(",", 1)[1], "row 4 .*label 10 is not a class"),
], ids=["extra-field", "extra-field-first-row", "missing-field", "non-numeric", "non-integer",
        "pixel-256", "pixel-minus-1", "label-10"])
def test_bad_row_names_file_and_row(good_csv, line, edit, expected):
    path, lines = good_csv
    rewrite(path, lines, line, edit)
    message = read_error(path)
    assert re.search(expected, message), message


def test_empty_and_header_only(tmp_path, good_csv):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "empty" in read_error(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text(good_csv[1][0] + "\n")
    assert "no rows" in read_error(header_only)


def test_wrong_column_count_everywhere(tmp_path, good_csv):
    narrow = tmp_path / "narrow.csv"
    narrow.write_text("\n".join(line.rsplit(",", 1)[0] for line in good_csv[1]) + "\n")
    assert "784 columns, expected 785" in read_error(narrow)


def test_truncated_gz(tmp_path):
    path = tmp_path / "mnist_train.csv.gz"
    utils.write_kaggle_csv(path, *synthetic(3))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert "truncated or corrupt" in read_error(path)


def test_round_trip_is_exact(tmp_path):
    images, labels = synthetic(4)
    for name in ("a.csv", "a.csv.gz"):
        utils.write_kaggle_csv(tmp_path / name, images, labels)
        x, y = utils.read_kaggle_csv(tmp_path / name, 10)
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(x, images) and torch.equal(y, labels)
    # mtime 0: writing twice gives the same bytes, so a file's hash names its content
    first = (tmp_path / "a.csv.gz").read_bytes()
    utils.write_kaggle_csv(tmp_path / "a.csv.gz", images, labels)
    assert (tmp_path / "a.csv.gz").read_bytes() == first


# ----------------------------------------------------------------------------- missing files
def test_missing_dataset_mentions_download_and_files(tmp_path):
    with pytest.raises(UserError) as err:
        utils.load_dataset("mnist", tmp_path)
    text = str(err.value)
    assert "--DOWNLOAD=True" in text and "mnist_train.csv" in text and "mnist_test.csv" in text
    with pytest.raises(UserError, match="full_numpy_bitmap_"):
        utils.load_dataset("quickdraw", tmp_path)
    with pytest.raises(UserError, match="unknown dataset 'cifar'"):
        utils.load_dataset("cifar", tmp_path)


@pytest.mark.parametrize("present, missing", [(0, 1), (1, 0)])
def test_one_of_train_test_missing(tmp_path, present, missing):
    files = utils.DATASETS["fashion"].files
    utils.write_kaggle_csv(tmp_path / (files[present] + ".gz"), *synthetic(1))
    with pytest.raises(UserError) as err:
        utils.load_dataset("fashion", tmp_path)
    assert files[missing] in str(err.value) and files[present] in str(err.value)


def test_sample_fallback_logs_once(tmp_path, make_kaggle, caplog):
    make_kaggle(tmp_path / utils.SAMPLE_DIR, "mnist", gz=True)
    log = logging.getLogger("test_sample_fallback")
    with caplog.at_level(logging.INFO, logger=log.name):
        raw = utils.load_dataset("mnist", tmp_path, log=log)
        utils.load_dataset("mnist", tmp_path, log=log)
    assert str(tmp_path / utils.SAMPLE_DIR) in raw.source
    notes = [r for r in caplog.records if "bundled sample" in r.getMessage()]
    assert len(notes) == 1
    # full files, once present, win over the sample
    make_kaggle(tmp_path, "mnist", train_per_class=2, test_per_class=1)
    assert len(utils.load_dataset("mnist", tmp_path).train_y) == 20


# ----------------------------------------------------------------------------- Quick, Draw!
def npy_path(root, cls):
    return Path(root) / "quickdraw" / utils.quickdraw_file(cls)


def write_quickdraw(root, rows=utils.QUICKDRAW_TRAIN + utils.QUICKDRAW_TEST):
    (Path(root) / "quickdraw").mkdir(parents=True, exist_ok=True)
    for i, cls in enumerate(utils.QUICKDRAW_CLASSES):
        array = np.zeros((rows, 784), np.uint8)
        array[:, i] = 1 + i  # tells the classes apart
        array[:, 783] = np.arange(rows) % 251  # tells the rows apart
        np.save(npy_path(root, cls), array)


@pytest.mark.parametrize("array, expected", [
    (np.zeros((6000, 784), np.float32), "float32"),
    (np.zeros((6000, 28, 28), np.uint8), r"\(6000, 28, 28\)"),
    (np.zeros((5999, 784), np.uint8), "5999 drawings"),
], ids=["dtype", "shape", "rows"])
def test_bad_quickdraw_npy(tmp_path, array, expected):
    path = npy_path(tmp_path, "apple")
    path.parent.mkdir()
    np.save(path, array)
    with pytest.raises(UserError, match=expected) as err:
        utils.read_quickdraw_npy(path, 6000)
    assert str(path) in str(err.value)


def test_unreadable_quickdraw_npy(tmp_path):
    path = tmp_path / "broken.npy"
    path.write_bytes(b"not numpy")
    with pytest.raises(UserError, match="not a readable .npy") as err:
        utils.read_quickdraw_npy(path, 10)
    assert str(path) in str(err.value)


def test_good_quickdraw_folder(tmp_path):
    write_quickdraw(tmp_path)
    raw = utils.load_dataset("quickdraw", tmp_path)
    assert raw.train_x.shape == (50_000, 28, 28) and raw.test_x.shape == (10_000, 28, 28)
    assert raw.train_x.dtype == torch.uint8
    assert torch.equal(torch.bincount(raw.train_y), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(raw.test_y), torch.full((10,), 1000))
    # label i is QUICKDRAW_CLASSES[i]: its images carry the pixel written into that class's file
    for x, y in ((raw.train_x, raw.train_y), (raw.test_x, raw.test_y)):
        flat = x.flatten(1)
        assert torch.equal(flat[torch.arange(len(y)), y], (y + 1).to(torch.uint8))
    # the first 5,000 drawings of a file train, the next 1,000 test
    moon = utils.QUICKDRAW_CLASSES.index("moon")
    first_test = raw.test_x[raw.test_y == moon][0].flatten()
    assert first_test[783] == 5000 % 251
    # a missing class file in an otherwise good folder names that file
    npy_path(tmp_path, "moon").unlink()
    utils._read_dataset.cache_clear()
    with pytest.raises(UserError, match="full_numpy_bitmap_moon.npy"):
        utils.load_dataset("quickdraw", tmp_path)


# ----------------------------------------------------------------------------- tasks and splits
def task_cfg(data_dir, **changes):
    cfg = dict(DATA_DIR=str(data_dir), DOWNLOAD=False, VAL_FRACTION=0.1, SEED=0,
               TRAIN_LIMIT=0, EVAL_LIMIT=0)
    cfg.update(changes)
    return SimpleNamespace(**cfg)


def test_relabelling():
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 3, 7])
    assert int(utils.Task("mnist", "indicator", (3,)).relabel(y).sum()) == int((y == 3).sum())
    assert utils.Task("mnist", "classes", (7, 3)).relabel(y).tolist() == [0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 2, 2, 1]
    assert torch.equal(utils.Task("mnist", "odd_even").relabel(y), y % 2)
    assert torch.equal(utils.Task("mnist", "all").relabel(y), y)
    assert [utils.Task("mnist", lab, c).num_classes for lab, c in
            (("indicator", (3,)), ("classes", (7, 3)), ("odd_even", ()), ("all", ()))] == [2, 3, 2, 10]


def test_task_labels_on_loaded_data(tmp_path, make_kaggle, monkeypatch):
    train_x, train_y, test_x, test_y = make_kaggle(tmp_path, "fashion", 20, 5)
    monkeypatch.setitem(utils.TASK_REGISTRY, "fashion_17", utils.Task("fashion", "classes", (1, 7)))
    cfg = task_cfg(tmp_path)
    sandal = utils.load_task("sandal", **configuration.data_options(cfg))
    assert int(sandal.test.y.sum()) == int((test_y == 5).sum()) == 5
    assert int(sandal.train.y.sum() + sandal.val.y.sum()) == int((train_y == 5).sum())
    pair = utils.load_task("fashion_17", **configuration.data_options(cfg))
    assert torch.equal(torch.bincount(pair.test.y), torch.tensor([40, 5, 5]))
    assert torch.equal(utils.load_task("fashion_all", **configuration.data_options(cfg)).test.y, test_y)
    assert pair.train.x.dtype == torch.float32 and pair.train.x.shape[1:] == (1, 28, 28)
    assert 0 <= float(pair.train.x.min()) and float(pair.train.x.max()) == 1.0


def test_task_whose_class_is_absent(tmp_path, make_kaggle, monkeypatch):
    make_kaggle(tmp_path, "mnist", 10, 3, classes=range(6))
    with pytest.raises(UserError, match="task 'mnist7'"):
        utils.load_task("mnist7", **configuration.data_options(task_cfg(tmp_path)))
    monkeypatch.setitem(utils.TASK_REGISTRY, "bad", utils.Task("mnist", "indicator", (12,)))
    with pytest.raises(UserError, match="task 'bad'"):
        utils.get_task("bad")
    with pytest.raises(UserError, match="unknown task 'nope'"):
        utils.get_task("nope")


def test_split_is_stratified_and_seeded():
    labels = torch.cat([torch.full((20 + 7 * c,), c) for c in range(10)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    train, val = utils.stratified_split(labels, 0.1, seed=0)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(len(labels)))
    for c in range(10):
        n = int((labels == c).sum())
        assert abs(int((labels[val] == c).sum()) - 0.1 * n) <= 1
    again = utils.stratified_split(labels, 0.1, seed=0)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    other = utils.stratified_split(labels, 0.1, seed=1)
    assert not torch.equal(other[1], val)
