"""Step 1: the base CNN, and train_task.main's checkpoints, determinism and resumption."""
import shutil

import pytest
import torch

import configuration
import store
import train_task
import utils
from configuration import UserError
from models import FEATURE_DIM, BaseCNN


def test_base_cnn_size_and_features():
    model = BaseCNN(2)
    assert sum(p.numel() for p in model.parameters()) == 25_694_018
    x = torch.rand(3, 1, 28, 28)
    assert model.encoder(x).shape == (3, FEATURE_DIM) == (3, 1024)
    assert model(x).shape == (3, 2)
    assert BaseCNN(10)(x).shape == (3, 10)


# ----------------------------------------------------------------------------- train_task.main
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, make_kaggle):
    folder = tmp_path_factory.mktemp("data")
    make_kaggle(folder, "mnist", 30, 10)
    make_kaggle(folder, "fashion", 30, 10, seed=5)
    return folder


@pytest.fixture
def run(run_script):
    # 128 training images: 4 batches of the smoke preset, about a second on a CPU
    return lambda data_dir, ckpt_dir, *extra: run_script(train_task, data_dir, ckpt_dir, "--TASKS=['mnist0']",
                                                         "--TRAIN_LIMIT=128", *extra)


@pytest.fixture(scope="module")
def first_run(data_dir, tmp_path_factory, run_script):
    ckpt_dir = tmp_path_factory.mktemp("ckpt_a")
    table = run_script(train_task, data_dir, ckpt_dir, "--TASKS=['mnist0']", "--TRAIN_LIMIT=128")
    return ckpt_dir, table


def test_first_run_trains_and_writes_a_checkpoint(first_run, data_dir):
    ckpt_dir, table = first_run
    assert table.loc["mnist0", "status"] == "trained"
    assert (ckpt_dir / "tasks" / "summary.csv").is_file()
    assert (ckpt_dir / "logs" / "train_task.log").is_file()
    # plain tensors and Python values only: loadable without trusting pickled code
    ckpt = torch.load(ckpt_dir / "tasks" / "mnist0.pt", weights_only=True)
    assert {"state_dict", "config", "metrics", "data_fingerprint"} <= set(ckpt)
    assert ckpt["num_classes"] == 2
    model = BaseCNN(2)
    model.load_state_dict(ckpt["state_dict"])
    assert ckpt["config"]["LR"] == 1e-3 and ckpt["config"]["TRAIN_LIMIT"] == 128
    assert not set(ckpt["config"]) & configuration.NON_RESULT_KEYS
    assert {"train_loss", "val_error", "test_error", "test_balanced_error", "test_auroc"} <= set(ckpt["metrics"])
    assert store.read_saved(ckpt_dir / "tasks" / "mnist0.pt")["data_fingerprint"] == ckpt["data_fingerprint"]
    # the reported metrics are those of the saved network on the task's test split, counted here image by image
    test = utils.load_task("mnist0", data_dir, train_limit=128, eval_limit=200).test
    with torch.no_grad():
        logits = train_task.network_from(ckpt).eval()(test.x)
    wrong = logits.argmax(1) != test.y
    misses = [wrong[test.y == c].float().mean() for c in (0, 1)]
    score = logits[:, 1] - logits[:, 0]
    pos, neg = score[test.y == 1], score[test.y == 0]
    ordered = ((pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()).mean()
    metrics = ckpt["metrics"]
    assert metrics["test_error"] == pytest.approx(100 * float(wrong.float().mean()), abs=1e-4)
    assert metrics["test_balanced_error"] == pytest.approx(100 * float(sum(misses) / 2), abs=1e-4)
    assert metrics["test_auroc"] == pytest.approx(float(ordered), abs=1e-6)
    assert table.loc["mnist0", "test_error"] == metrics["test_error"]


def test_same_seed_gives_identical_weights(first_run, data_dir, tmp_path, run):
    run(data_dir, tmp_path)
    a = torch.load(first_run[0] / "tasks" / "mnist0.pt", weights_only=True)
    b = torch.load(tmp_path / "tasks" / "mnist0.pt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["metrics"] == b["metrics"] and a["data_fingerprint"] == b["data_fingerprint"]


def test_resume_skips_and_changes_retrain(first_run, data_dir, tmp_path, make_kaggle, run):
    ckpt_dir, data = tmp_path / "ckpt", tmp_path / "data"
    shutil.copytree(first_run[0], ckpt_dir)
    shutil.copytree(data_dir, data)
    log = ckpt_dir / "logs" / "train_task.log"

    table = run(data, ckpt_dir)  # same config and data (in another folder): nothing to do
    assert table.loc["mnist0", "status"] == "skipped"
    assert table.loc["mnist0", "test_error"] == first_run[1].loc["mnist0", "test_error"]

    assert run(data, ckpt_dir, "--LR=0.002").loc["mnist0", "status"] == "trained"
    assert "checkpoint made with other LR, retraining" in log.read_text()
    assert run(data, ckpt_dir, "--LR=0.002").loc["mnist0", "status"] == "skipped"

    # new content in the same file, as a fresh process would read it
    make_kaggle(data, "mnist", 30, 10, seed=9)
    utils._read_dataset.cache_clear()
    utils._splits.cache_clear()
    assert run(data, ckpt_dir, "--LR=0.002").loc["mnist0", "status"] == "trained"
    assert "checkpoint made with other data, retraining" in log.read_text()


def test_bad_config_is_a_user_error(data_dir, tmp_path, run):
    with pytest.raises(UserError, match="unknown task 'mnist10'"):
        run(data_dir, tmp_path, "--TASKS=['mnist10']")
    with pytest.raises(UserError, match="unknown constant 'EPOCH'"):
        run(data_dir, tmp_path, "--EPOCH=2")


def test_a_corrupt_checkpoint_is_moved_aside_and_retrained(first_run, data_dir, tmp_path, run):
    shutil.copytree(first_run[0], tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "tasks" / "mnist0.pt"
    path.write_bytes(path.read_bytes()[:1000])  # a copy cut short
    assert run(data_dir, tmp_path / "ckpt").loc["mnist0", "status"] == "trained"
    assert (tmp_path / "ckpt" / "tasks" / "mnist0.pt.corrupt").stat().st_size == 1000
    assert "mnist0.pt cannot be read" in (tmp_path / "ckpt" / "logs" / "train_task.log").read_text()
    same = torch.load(first_run[0] / "tasks" / "mnist0.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, torch.load(path, weights_only=True)["state_dict"][k]) for k, v in same.items())
