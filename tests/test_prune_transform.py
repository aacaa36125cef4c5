"""Step 2: transfer nets, pruning sweep, distance matrix, resume and the checks on step-1 inputs."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import prune_transform
import train_task
import utils
from models import TransferNet

SOURCES = ["mnist0", "mnist1", "tshirt"]
COPY = "mnist0_copy"  # the same labelled data as mnist0, its network trained from another seed
TARGETS = ["mnist0", COPY]
SAMPLE = Path(__file__).resolve().parents[1] / "data" / utils.SAMPLE_DIR


@pytest.fixture(autouse=True)
def copy_task(monkeypatch):
    monkeypatch.setitem(utils.TASK_REGISTRY, COPY, utils.Task("mnist", "indicator", (0,), seed=1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Step-1 networks on part of the bundled real sample (synthetic images are too easy to rank)."""
    data = tmp_path_factory.mktemp("data")
    shutil.copytree(SAMPLE, data / utils.SAMPLE_DIR)
    ckpt = tmp_path_factory.mktemp("ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(utils.TASK_REGISTRY, COPY, utils.Task("mnist", "indicator", (0,), seed=1))
        train_task.main(common(data, ckpt) + [f"--TASKS={SOURCES + [COPY]}"])
    return data, ckpt


def common(data, ckpt):
    return [f"--DATA_DIR={data}", f"--CKPT_DIR={ckpt}", "--PRESET=smoke", "--DEVICE=cpu",
            "--TRAIN_LIMIT=600", "--EVAL_LIMIT=400"]


def run(data, ckpt, sources, targets, *extra):
    return prune_transform.main(common(data, ckpt) + [
        f"--SOURCES={sources}", f"--TARGETS={targets}", "--TRANSFER_EPOCHS=5", "--TRANSFER_BATCH=50",
        "--PRUNE_STEP=0.1", "--MAX_SPARSITY=0.5",
        *extra])


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    data, ckpt = setup
    out = tmp_path_factory.mktemp("run")
    shutil.copytree(ckpt / "tasks", out / "tasks")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(utils.TASK_REGISTRY, COPY, utils.Task("mnist", "indicator", (0,), seed=1))
        results = run(data, out, SOURCES, TARGETS)
    return out, results


def test_transfer_net_size():
    assert sum(p.numel() for p in TransferNet().parameters()) == 3_673_600


def test_distances_in_range_diagonal_zero_and_files(full_run):
    out, results = full_run
    matrix = pd.read_csv(out / "distances" / "matrix.csv", index_col=0)
    assert list(matrix.index) == SOURCES and list(matrix.columns) == TARGETS
    assert ((matrix >= 0) & (matrix <= 100)).all().all()
    assert matrix.at["mnist0", "mnist0"] == 0
    measured = pd.read_csv(out / "distances" / "matrix_measured.csv", index_col=0)
    assert 0 < measured.at["mnist0", "mnist0"] <= 100  # the self-transfer is still measured  # the self-transfer is still measured
    for name in ("heatmap.png", "pruning_curves.png", "closest.json"):
        assert (out / "distances" / name).stat().st_size > 0
    assert len(list((out / "distances" / "pairs").glob("*.json"))) == len(SOURCES) * len(TARGETS)


def test_kept_share_never_rises_during_the_sweep(full_run):
    _, results = full_run
    for r in results:
        kept = [point["kept"] for point in r["curve"]]
        assert kept == sorted(kept, reverse=True)
        assert r["measured_distance"] in kept or r["measured_distance"] == 100.0


def test_copy_of_a_base_task_is_closest_and_other_dataset_is_farther(full_run):
    out, _ = full_run
    closest = json.loads((out / "distances" / "closest.json").read_text())["closest"][COPY]
    distance = {c["task"]: c["distance"] for c in closest}
    assert closest[0]["task"] == "mnist0"
    assert distance["tshirt"] > distance["mnist0"]


def test_features_are_the_encoders_float_output_on_the_same_images(setup, monkeypatch):
    data, ckpt = setup
    cfg = utils.configure(vars(prune_transform), common(data, ckpt))
    device = torch.device("cpu")
    task = utils.load_task("mnist1", cfg)
    net, _ = prune_transform.load_network("mnist0", utils.load_task("mnist0", cfg), cfg, device)
    train, val = prune_transform.FeatureCache(64).get("mnist0", net.encoder, task)
    with torch.inference_mode():
        expected = net.encoder(task.train.x)
    assert train.dtype == torch.float32
    assert torch.equal(train, expected)  # not quantised (the released code cast features to uint8)
    assert (train.frac() != 0).any()
    assert len(train) == len(task.train.x) and len(val) == len(task.val.x)


def test_resume_after_a_kill_gives_the_same_matrix(setup, full_run, tmp_path, monkeypatch):
    data, ckpt = setup
    shutil.copytree(ckpt / "tasks", tmp_path / "tasks")
    real, calls = prune_transform.measure_pair, []

    def dies_on_second_pair(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_transform, "measure_pair", dies_on_second_pair)
    sources = ["mnist0", "tshirt"]
    with pytest.raises(KeyboardInterrupt):
        run(data, tmp_path, sources, [COPY])
    assert len(list((tmp_path / "distances" / "pairs").glob("*.json"))) == 1
    calls.clear()
    monkeypatch.setattr(prune_transform, "measure_pair", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    run(data, tmp_path, sources, [COPY])
    assert len(calls) == 1  # only the unfinished pair ran again
    resumed = pd.read_csv(tmp_path / "distances" / "matrix.csv", index_col=0)
    straight = pd.read_csv(full_run[0] / "distances" / "matrix.csv", index_col=0)
    pd.testing.assert_frame_equal(resumed, straight.loc[sources, [COPY]])


def test_missing_checkpoint_names_the_step_1_command(setup, tmp_path):
    data, _ = setup
    with pytest.raises(utils.UserError, match=r"no step-1 network for task 'mnist1'.*python train_task.py"):
        run(data, tmp_path, ["mnist1"], ["mnist1"])
    assert not (tmp_path / "distances").exists()  # nothing written by the failed run


def test_checkpoint_from_other_data_or_model_is_refused(setup, tmp_path):
    data, ckpt = setup
    shutil.copytree(ckpt / "tasks", tmp_path / "tasks")
    with pytest.raises(utils.UserError, match="trained on other data"):
        run(data, tmp_path, ["mnist1"], ["mnist1"], "--VAL_FRACTION=0.2")
    path = tmp_path / "tasks" / "mnist1.pt"
    state = utils.load_checkpoint(path)
    state["state_dict"] = {k: v[:1] for k, v in state["state_dict"].items()}
    utils.save_checkpoint(state, path)
    with pytest.raises(utils.UserError, match="does not hold the base CNN"):
        run(data, tmp_path, ["mnist1"], ["mnist1"])


def test_bad_reference_is_refused(setup, tmp_path):
    data, ckpt = setup
    with pytest.raises(utils.UserError, match="REFERENCE"):
        run(data, ckpt, ["mnist1"], ["mnist1"], "--REFERENCE=own")
