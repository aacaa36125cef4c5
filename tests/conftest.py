"""Shared fixtures: tiny synthetic datasets in the Kaggle CSV layout, and a script runner."""
from pathlib import Path

import pytest
import torch

import model_FUSE
import prune_transform
import train_task
import utils

SAMPLE = Path(__file__).resolve().parents[1] / "data"  # the bundled sample


def synthetic(per_class, classes=range(10), seed=0):
    """uint8 images (N, 28, 28) and int64 labels: noise plus a bright bar at a class-dependent row,
    so a network can learn them; labels shuffled as in a real file."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.int64)
    labels = labels[torch.randperm(len(labels), generator=gen)]
    images = torch.randint(0, 60, (len(labels), 28, 28), generator=gen, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        images[i, 2 + 2 * c:4 + 2 * c, 4:24] = 255
    return images, labels


@pytest.fixture(scope="session")
def make_kaggle():
    """make_kaggle(data_dir, dataset, train_per_class, test_per_class, ...) writes the dataset's
    train and test files and returns (train_x, train_y, test_x, test_y)."""
    def make(data_dir, dataset="mnist", train_per_class=20, test_per_class=5, classes=range(10),
             seed=0, gz=False):
        train_name, test_name = utils.DATASETS[dataset].files
        suffix = ".gz" if gz else ""
        train = synthetic(train_per_class, classes, seed)
        test = synthetic(test_per_class, classes, seed + 1)
        utils.write_kaggle_csv(Path(data_dir) / (train_name + suffix), *train)
        utils.write_kaggle_csv(Path(data_dir) / (test_name + suffix), *test)
        return (*train, *test)
    return make


@pytest.fixture(autouse=True)
def _fresh_dataset_caches():
    # the caches are keyed on paths, so a test that rewrites a file must not see an earlier read
    utils._read_dataset.cache_clear()
    utils._splits.cache_clear()
    yield


@pytest.fixture(scope="session")
def run_script():
    """run_script(module, data_dir, ckpt_dir, *args): the script's main() as a user runs it, with the
    smoke preset on the CPU; returns what main returns."""
    def run(module, data_dir, ckpt_dir, *args):
        return module.main([f"--DATA_DIR={data_dir}", f"--CKPT_DIR={ckpt_dir}", "--PRESET=smoke",
                            "--DEVICE=cpu", *args])
    return run


@pytest.fixture(scope="session")
def smoke_steps():
    """The three steps on four tasks of the bundled sample: (script, its arguments besides the smoke preset)."""
    tasks = ["mnist0", "tshirt", "trouser", "sandal"]
    return [(train_task, [f"--TASKS={tasks}"]),
            (prune_transform, ["--SOURCES=['mnist0', 'tshirt', 'trouser']", "--TARGETS=['sandal']", "--K=2"]),
            (model_FUSE, ["--K=2", "--ROWS=['fuse_task_aware', 'fuse_standard', 'random']"])]  # ResNet-18: a minute more


@pytest.fixture(scope="session")
def local(tmp_path_factory, smoke_steps, run_script):
    """The smoke steps with the local executor, one thread as a Ray unit has (threads can move the last bits)."""
    ckpt = tmp_path_factory.mktemp("local")
    threads, all_threads = torch.get_num_threads(), model_FUSE.ALL_THREADS
    torch.set_num_threads(1)
    model_FUSE.ALL_THREADS = 1
    try:
        for module, args in smoke_steps:
            run_script(module, SAMPLE, ckpt, *args)
    finally:
        torch.set_num_threads(threads)
        model_FUSE.ALL_THREADS = all_threads
    return ckpt
