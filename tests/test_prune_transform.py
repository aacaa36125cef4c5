"""Step 2: transfer nets, pruning sweep, distance matrix, resume and the checks on step-1 inputs."""
import json
import shutil
import weakref
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import configuration
import executor
import fisher
import prune_transform
import store
import train_task
import training
import utils
from configuration import UserError
from models import TransferNet

SOURCES = ["mnist0", "mnist1", "tshirt"]
COPY = "mnist0_copy"  # the same labelled data as mnist0, its network trained from another seed
TARGETS = ["mnist0", COPY]
SAMPLE = Path(__file__).resolve().parents[1] / "data" / utils.SAMPLE_DIR
LIMITS = ["--TRAIN_LIMIT=2000", "--EVAL_LIMIT=600"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, run_script):
    """Step-1 networks on part of the bundled real sample (synthetic images are too easy to rank)."""
    data = tmp_path_factory.mktemp("data")
    shutil.copytree(SAMPLE, data / utils.SAMPLE_DIR)
    ckpt = tmp_path_factory.mktemp("ckpt")
    run_script(train_task, data, ckpt, f"--TASKS={SOURCES + [COPY]}", *LIMITS)
    return data, ckpt


@pytest.fixture(scope="module")
def run(run_script):
    def run(data, ckpt, sources, targets, *extra):
        return run_script(prune_transform, data, ckpt, f"--SOURCES={sources}", f"--TARGETS={targets}", *LIMITS,
                          "--BATCH_SIZE=50", *extra)
    return run


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory, run):
    data, ckpt = setup
    out = tmp_path_factory.mktemp("run")
    shutil.copytree(ckpt / "tasks", out / "tasks")
    return out, run(data, out, SOURCES, TARGETS)


def test_transfer_net_size():
    assert sum(p.numel() for p in TransferNet().parameters()) == 3_673_600


# ----------------------------------------------------------------------------- pruning levels
WEIGHTS, BIASES = 1024 * 2048 + 2048 * 512 + 512 * 1024, 2048 + 512 + 1024


@pytest.mark.parametrize("sparsity", [0.05, 0.5, 0.9, 0.995])
def test_a_one_shot_level_zeroes_exactly_the_smallest_weights(sparsity):
    torch.manual_seed(0)
    net = TransferNet()
    magnitudes = torch.cat([m.weight.detach().abs().flatten() for m in net.weight_layers()])
    prune_transform.prune_to(net, sparsity)
    pruned = torch.cat([(m.weight == 0).flatten() for m in net.weight_layers()])
    assert int(pruned.sum()) == round(sparsity * WEIGHTS)
    assert magnitudes[pruned].max() <= magnitudes[~pruned].min()  # the smallest magnitudes, globally
    assert all((m.bias != 0).all() for m in net.weight_layers())  # biases are kept


@pytest.mark.parametrize("sparsity", [0.0, 0.05, 0.25, 0.9, 0.975, 0.995])
def test_kept_share_follows_its_formula(sparsity):
    torch.manual_seed(0)
    net = prune_transform.prune_to(TransferNet(), sparsity)
    expected = 100 * (WEIGHTS - round(sparsity * WEIGHTS) + BIASES) / (WEIGHTS + BIASES)
    assert prune_transform.kept_percent(net) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("sparsity, in_the_papers_matrix", [(0.9, 10.09), (0.2, 80.02), (0.1, 90.01)])
def test_the_papers_matrix_values_are_shares_of_the_transfer_net_kept(sparsity, in_the_papers_matrix):
    """Entries of the paper's matrix are the % of the transfer net's parameters (biases kept) a level leaves."""
    torch.manual_seed(0)
    assert round(prune_transform.kept_percent(prune_transform.prune_to(TransferNet(), sparsity)), 2) == \
        in_the_papers_matrix


def test_iterative_pruning_counts_the_weights_already_pruned():
    torch.manual_seed(0)
    net = TransferNet()
    for sparsity in (0.3, 0.6, 0.9):
        prune_transform.prune_to(net, sparsity)
        assert prune_transform.pruned_weights(net) == round(sparsity * WEIGHTS)


# ----------------------------------------------------------------------------- the stopping rule
def curve(*performances, step=0.1):
    return [dict(sparsity=round(i * step, 6), kept=100 - 10 * i, balanced_accuracy=p)
            for i, p in enumerate(performances)]


@pytest.mark.parametrize("performances, passing, failing", [
    ((95, 95, 94.5, 94.0, 93.9, 99), 0.3, 0.4),   # 94.0 is exactly 1 point below: still passes
    ((95, 96, 97, 97), 0.3, None),                 # never falls: the last level
    ((95, 80, 95, 95), 0.0, 0.1),                  # the first level already falls: the unpruned net
    ((95, 95, 90, 95, 95), 0.1, 0.2),              # a recovery after a fall does not count
])
def test_crossing_is_the_last_level_before_the_first_fall(performances, passing, failing):
    points = curve(*performances)
    last, first_fail = prune_transform.crossing(points[::-1], "balanced_accuracy", 94.0)  # any order
    assert last["sparsity"] == passing
    assert (first_fail and first_fail["sparsity"]) == failing


def step_performance(monkeypatch, edge, calls=None):
    """Measured performance: 95 up to `edge` of the weights pruned, 60 beyond (the pruned share is read off the net)."""
    def evaluate(net, pair, cfg, device):
        sparsity = prune_transform.pruned_weights(net) / WEIGHTS
        if calls is not None:
            calls.append(round(sparsity, 6))
        return dict(balanced_accuracy=95.0 if sparsity <= edge else 60.0, accuracy=0, auroc=0, mse=0)
    monkeypatch.setattr(prune_transform, "evaluate", evaluate)
    monkeypatch.setattr(training, "train_epoch", lambda *a, **k: 0.0)  # fine-tuning that changes nothing


def sweep(*args, feasibility=None):
    """A sweep of a patched transfer under the balanced-accuracy rule within 1 point (args may change it)."""
    cfg = configuration.configure(vars(prune_transform), ["--PRUNE_LEVELS=[0.2, 0.4, 0.6, 0.8]",
                                                          "--PERFORMANCE=balanced_accuracy", "--TOLERANCE=1.0", *args])
    torch.manual_seed(0)
    net = TransferNet()
    optimizer = training.adam(prune_transform.ordered_parameters(net), 1e-3, torch.device("cpu"))
    pair = prune_transform.Pair(torch.zeros(10, 1), *[None] * 7)  # only its length is read: training is patched out
    result = prune_transform.Sweep(net, optimizer, None, pair, cfg, torch.device("cpu"), feasibility=feasibility)
    result.run()
    return result, cfg


def test_without_fine_tuning_every_level_is_measured_then_the_crossing_bisected(monkeypatch):
    step_performance(monkeypatch, edge=0.63)
    result, cfg = sweep("--FINETUNE_EPOCHS=0", "--REFINE=0.01")
    visited = [round(p["sparsity"], 6) for p in result.curve]
    assert {0.0, 0.2, 0.4, 0.6, 0.8} <= set(visited) and visited == sorted(visited)
    last, first_fail = prune_transform.crossing(result.curve, "balanced_accuracy", 95.0 - cfg.TOLERANCE)
    assert last["sparsity"] <= 0.63 < first_fail["sparsity"]
    assert (1 - last["sparsity"]) / (1 - first_fail["sparsity"]) <= 1.01  # kept shares within 1 %
    assert result.passing == last["sparsity"] and result.failing == first_fail["sparsity"]


def test_one_shot_levels_with_fine_tuning_are_searched_by_bisection(monkeypatch):
    calls = []
    step_performance(monkeypatch, edge=0.45, calls=calls)
    sweep("--FINETUNE_EPOCHS=1", "--REFINE=0.0")
    assert calls == [0.0, 0.4, 0.6]  # the dense net, then 2 of the 4 levels


def test_iterative_levels_are_measured_in_order_up_to_the_first_fall(monkeypatch):
    calls = []
    step_performance(monkeypatch, edge=0.45, calls=calls)
    sweep("--FINETUNE_EPOCHS=1", "--REFINE=0.0", "--SCHEDULE=iterative")
    assert calls == [0.0, 0.2, 0.4, 0.6]


# ----------------------------------------------------------------------------- feasibility and ranking
def result(source, target, measured, unpruned, performance="balanced_accuracy"):
    return dict(source=source, target=target, measured_distance=measured,
                unpruned={performance: unpruned}, config={"PERFORMANCE": performance})


def test_infeasible_pairs_have_no_distance_and_rank_last():
    level = 87.0
    results = [prune_transform.decide(r, level, "balanced_accuracy") for r in (
        result("a", "t", 30.0, 95.0), result("b", "t", 5.1, 50.0),   # b: broken transfer, nothing to lose
        result("c", "t", 10.0, 88.0), result("d", "t", 10.0, 96.0),  # tie: the better transfer first
        result("e", "t", 2.0, 86.9), result("t", "t", 7.0, 99.0))]
    by_source = {r["source"]: r for r in results}
    assert by_source["b"]["distance"] is None and not by_source["b"]["feasible"]
    assert by_source["e"]["distance"] is None                      # just below the level
    assert by_source["t"]["distance"] == 0.0                       # d(A, A) = 0 by convention
    assert by_source["a"]["distance"] == 30.0 and by_source["a"]["feasibility_level"] == level
    assert [r["source"] for r in prune_transform.rank_sources(results, "t")] == ["d", "c", "a", "e", "b"]


def test_a_tie_at_the_kth_closest_is_named():
    ranked = lambda *d: [dict(task=t, distance=x) for t, x in zip("abcde", d)]
    assert prune_transform.tied_at_k(ranked(3.48, 3.55, 3.63, 3.63, 3.63), 3) == ["c", "d", "e"]
    assert prune_transform.tied_at_k(ranked(3.48, 3.48, 3.63, 5.0), 3) == []       # a tie inside the k closest
    assert prune_transform.tied_at_k(ranked(3.48, 3.55, 3.63, None), 3) == []      # infeasible past k
    assert prune_transform.tied_at_k(ranked(3.48, 3.55, None, None), 3) == []      # the k-th itself infeasible
    assert prune_transform.tied_at_k(ranked(3.48, 3.55), 3) == []                  # fewer than k sources


def test_without_feasibility_every_pair_has_its_distance():
    r = prune_transform.decide(result("b", "t", 5.1, 50.0), None, "balanced_accuracy")
    assert r["feasible"] and r["distance"] == 5.1


def test_feasibility_level_comes_from_the_worst_base_network():
    checkpoints = {name: {"val_balanced_error": e, "val_error": e / 2} for name, e in (("a", 1.0), ("b", 13.0), ("c", 4.0))}
    cfg = configuration.configure(vars(prune_transform), ["--SOURCES=['a', 'b', 'c']", "--PERFORMANCE=balanced_accuracy"])
    assert cfg.FEASIBILITY == "2eps" and prune_transform.feasibility_level(checkpoints, cfg) == 74.0
    cfg = configuration.configure(vars(prune_transform), ["--SOURCES=['a', 'b', 'c']", "--PERFORMANCE=balanced_accuracy",
                                                          "--FEASIBILITY=eps"])
    assert prune_transform.feasibility_level(checkpoints, cfg) == 87.0
    cfg = configuration.configure(vars(prune_transform), ["--SOURCES=['a', 'c']", "--PERFORMANCE=accuracy", "--FEASIBILITY=eps"])
    assert prune_transform.feasibility_level(checkpoints, cfg) == 98.0
    cfg = configuration.configure(vars(prune_transform), ["--FEASIBILITY=none"])
    assert prune_transform.feasibility_level(checkpoints, cfg) is None
    for name, auroc in (("a", 0.999), ("b", 0.98), ("c", 0.99)):
        checkpoints[name]["val_auroc"] = auroc
    cfg = configuration.configure(vars(prune_transform), ["--SOURCES=['a', 'b', 'c']", "--PERFORMANCE=auroc"])
    assert prune_transform.feasibility_level(checkpoints, cfg) == pytest.approx(0.96)


def test_an_auroc_tolerance_stops_where_the_auroc_falls_by_it(monkeypatch):
    """AUROC 0.99 - 0.008 x sparsity: within 0.002 of the unpruned transfer up to 20 % pruned, however low the
    balanced accuracy (50: the head's threshold is off)."""
    monkeypatch.setattr(prune_transform, "evaluate", lambda net, *a: dict(
        auroc=0.99 - 0.008 * prune_transform.pruned_weights(net) / WEIGHTS, balanced_accuracy=50.0, accuracy=0, mse=0))
    monkeypatch.setattr(training, "train_epoch", lambda *a, **k: 0.0)
    result, _ = sweep("--REFINE=0", "--PERFORMANCE=auroc", "--TOLERANCE=0.002")
    assert result.line == pytest.approx(0.988) and result.passing == 0.2 and result.failing == 0.4
    with pytest.raises(UserError, match="the AUROC is a fraction"):
        prune_transform.check_config(configuration.configure(vars(prune_transform), ["--PERFORMANCE=auroc", "--TOLERANCE=1.0"]))


# ----------------------------------------------------------------------------- features
def test_standardized_features_and_the_readout_back_to_the_target_units():
    gen = torch.Generator().manual_seed(0)
    xs, xt = torch.rand(50, 6, generator=gen) * 5, torch.relu(torch.randn(50, 6, generator=gen)) * 3
    xt[:, 2] = 0  # a dead unit of the target network
    head = torch.nn.Linear(6, 2)
    labels = torch.randint(0, 2, (50,))
    source, target = (prune_transform.encode(f.clone(), f[:10].clone(), "standardized") for f in (xs, xt))
    pair = prune_transform.make_pair(source, target, head, labels, labels[:10], torch.device("cpu"))
    assert pair.x.data_ptr() == source.train.data_ptr()  # the pair reads the shared features, no copy
    torch.testing.assert_close(pair.x.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(pair.x.std(0), torch.ones(6))
    assert (pair.y[:, 2] == 0).all()
    torch.testing.assert_close(pair.readout(pair.y), xt, atol=1e-5, rtol=0)  # a perfect transfer reads back exactly
    torch.testing.assert_close(pair.readout(pair.y_val), xt[:10], atol=1e-5, rtol=0)  # the training statistics


def test_uint8_features_are_the_released_codes_cast():
    f = torch.tensor([[0.0, 0.7, 1.0, 3.9, 17.2, 256.5]])
    labels = torch.zeros(1, dtype=torch.long)
    encoded = prune_transform.encode(f.clone(), f.clone(), "uint8")
    pair = prune_transform.make_pair(encoded, encoded, None, labels, labels, torch.device("cpu"))
    expected = torch.tensor([[0, 0, 1, 3, 17, 0]]) / 255  # truncated; 256 wraps to 0 as numpy's cast does
    torch.testing.assert_close(pair.x, expected)
    torch.testing.assert_close(pair.readout(pair.y), expected * 255)


# ----------------------------------------------------------------------------- whole runs
def test_matrix_files_and_the_diagonal(full_run):
    out, results = full_run
    matrix = pd.read_csv(out / "distances" / "matrix.csv", index_col=0)
    assert list(matrix.index) == SOURCES and list(matrix.columns) == TARGETS
    assert matrix.at["mnist0", "mnist0"] == 0  # the paper's convention
    measured = pd.read_csv(out / "distances" / "matrix_measured.csv", index_col=0)
    own = next(r for r in results if r["source"] == r["target"] == "mnist0")
    assert measured.at["mnist0", "mnist0"] == pytest.approx(own["measured_distance"], abs=1e-4)  # kept as calibration
    for name in ("heatmap.png", "pruning_curves.png", "closest.json"):
        assert (out / "distances" / name).stat().st_size > 0
    assert len(list((out / "distances" / "pairs").glob("*.json"))) == len(SOURCES) * len(TARGETS)
    for r in results:
        path = out / "distances" / "transfer" / f"{r['source']}__{r['target']}.pt"
        state = torch.load(path, weights_only=True)
        net = TransferNet()
        net.load_state_dict(state)
        assert prune_transform.kept_percent(net) == pytest.approx(r["measured_distance"])


def test_stop_at_the_level_keeps_pruning_while_the_transfer_stays_above_it(monkeypatch):
    """Performance 95 - 10 x sparsity: within 1 point of the unpruned transfer only at the dense net, at
    least 90 (the level) up to 50 % pruned."""
    monkeypatch.setattr(prune_transform, "evaluate", lambda net, *a: dict(
        balanced_accuracy=95.0 - 10 * prune_transform.pruned_weights(net) / WEIGHTS, accuracy=0, auroc=0, mse=0))
    monkeypatch.setattr(training, "train_epoch", lambda *a, **k: 0.0)
    relative, _ = sweep("--REFINE=0")
    level, _ = sweep("--REFINE=0", "--STOP=level", feasibility=90.0)
    assert relative.passing == 0.0 and relative.failing == 0.2
    assert level.line == 90.0 and level.passing == 0.4 and level.failing == 0.6
    with pytest.raises(UserError, match="STOP='level'"):
        prune_transform.check_config(configuration.configure(vars(prune_transform), ["--STOP=level", "--FEASIBILITY=none"]))


def test_search_all_fine_tunes_and_measures_every_level_then_bisects_the_crossing(monkeypatch):
    step_performance(monkeypatch, edge=0.63)
    result, _ = sweep("--SEARCH=all", "--FINETUNE_EPOCHS=1", "--REFINE=0.01")
    visited = [round(p["sparsity"], 6) for p in result.curve]
    assert {0.0, 0.2, 0.4, 0.6, 0.8} <= set(visited) and result.passing <= 0.63 < result.failing
    assert (1 - result.passing) / (1 - result.failing) <= 1.01


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # the stand-in step never steps Adam
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_fine_tuning_restarts_the_lr_under_the_schedule(monkeypatch, schedule):
    """After a prune the lr starts again at LR; under cosine it decays to 0 by the end of the fine-tuning."""
    lrs = []
    monkeypatch.setattr(training, "train_step", lambda model, optimizer, *a: lrs.append(optimizer.param_groups[0]["lr"]) or 0.0)
    monkeypatch.setattr(prune_transform, "evaluate", lambda *a: dict(balanced_accuracy=95.0, accuracy=0, auroc=0, mse=0))
    cfg = configuration.configure(vars(prune_transform), [f"--LR_SCHEDULE={schedule}", "--FINETUNE_EPOCHS=2", "--BATCH_SIZE=100"])
    torch.manual_seed(0)
    net = TransferNet()
    optimizer = training.adam(prune_transform.ordered_parameters(net), cfg.LR, torch.device("cpu"))
    optimizer.param_groups[0]["lr"] = 0.0  # where a cosine training ends
    x = torch.randn(300, net.weight_layers()[0].in_features)
    pair = prune_transform.Pair(x, x, x, x, None, None, None, None)
    sweep_ = prune_transform.Sweep(net, optimizer, torch.Generator().manual_seed(0), pair, cfg, torch.device("cpu"))
    _, tuned, _ = sweep_.prune_level(0.5, 0.0)
    assert len(lrs) == 6 and lrs[0] == cfg.LR
    if schedule == "cosine":
        assert lrs == sorted(lrs, reverse=True) and tuned.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    else:
        assert set(lrs) == {cfg.LR}


def test_distance_is_the_crossing_of_the_recorded_curve(full_run):
    _, results = full_run
    for r in results:
        sparsity = [p["sparsity"] for p in r["curve"]]
        assert sparsity == sorted(sparsity) and sparsity[0] == 0.0 and 2 <= len(sparsity) <= 4  # smoke: 3 levels
        kept = [p["kept"] for p in r["curve"]]
        assert kept == sorted(kept, reverse=True)
        performance, tolerance = r["config"]["PERFORMANCE"], r["config"]["TOLERANCE"]
        passing, _ = prune_transform.crossing(r["curve"], performance, r["unpruned"][performance] - tolerance)
        assert r["measured_distance"] == passing["kept"]
        assert r["feasible"] == (r["unpruned"][performance] >= r["feasibility_level"])
        assert r["distance"] == (0.0 if r["source"] == r["target"] else r["measured_distance"] if r["feasible"]
                                 else None)


def test_copy_of_a_base_task_is_closest(full_run):
    out, _ = full_run
    closest = json.loads((out / "distances" / "closest.json").read_text())["closest"][COPY]
    assert closest[0]["task"] == "mnist0" and closest[0]["feasible"]


def test_features_are_the_encoders_float_output_on_the_same_images(setup):
    data, ckpt = setup
    cfg = configuration.configure(vars(prune_transform), [f"--DATA_DIR={data}", f"--CKPT_DIR={ckpt}", *LIMITS])
    device = torch.device("cpu")
    task = utils.load_task("mnist1", **configuration.data_options(cfg))
    net, _ = prune_transform.load_network("mnist0", utils.load_task("mnist0", **configuration.data_options(cfg)), cfg, device)
    encoded = prune_transform.feature_unit(net.encoder, (task.train.x, task.val.x), 64, "fp32", "raw", device)
    train, val = encoded.train, encoded.val
    with torch.inference_mode():
        expected = net.encoder(task.train.x)
    assert train.dtype == torch.float32
    torch.testing.assert_close(train, expected)  # not quantised (the released code cast features to uint8)
    assert (train.frac() != 0).any()
    assert len(train) == len(task.train.x) and len(val) == len(task.val.x)


def test_features_are_extracted_once_per_network_and_dataset_and_freed_after_their_last_pair(monkeypatch):
    """Locally the pairs run in order, a source's features are extracted at its first pair, the targets' once, and
    a source's are no longer held once its last pair is done."""
    calls, alive = [], weakref.WeakSet()

    class FeatureSet:  # what a feature unit returns, weakly referenced to see when it is freed
        pass

    def extract(encoder, images, batch, precision, mode, device):
        calls.append(encoder)
        out = FeatureSet()
        alive.add(out)
        return out

    seen = []
    monkeypatch.setattr(prune_transform, "feature_unit", extract)
    monkeypatch.setattr(prune_transform, "pair_unit", lambda s, t, *a: (seen.append((s, t, len(alive))), ({}, {}))[1])
    split = utils.Split(torch.rand(6, 1, 2, 2), torch.zeros(6, dtype=torch.long))
    data = {n: utils.TaskData(n, utils.get_task(n), split, split, split, "", "") for n in ("mnist0", "mnist1", "mnist2")}
    missing = [(s, "mnist2", {}) for s in ("mnist0", "mnist1")]
    ex = executor.Local(torch.device("cpu"), None)
    cfg = configuration.configure(vars(prune_transform), [])
    jobs = prune_transform.pair_units(ex, missing, lambda name: SimpleNamespace(encoder=name, head=torch.nn.Identity()),
                                      data, cfg, None)
    ex.run(jobs, "pairs", lambda name, result: result)
    assert calls == ["mnist0", "mnist2", "mnist1"]  # the target's features once, for both sources
    assert seen == [("mnist0", "mnist2", 2), ("mnist1", "mnist2", 2)]  # mnist0's were freed before mnist1's pair


def test_resume_after_a_kill_gives_the_same_matrix(setup, full_run, tmp_path, monkeypatch, run):
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


def test_a_run_for_one_target_keeps_the_targets_measured_before(setup, full_run, tmp_path, run):
    data, _ = setup
    shutil.copytree(full_run[0], tmp_path, dirs_exist_ok=True)
    run(data, tmp_path, SOURCES, ["mnist1"])
    closest = json.loads((tmp_path / "distances" / "closest.json").read_text())
    assert set(closest["closest"]) == {"mnist1", *TARGETS} and set(closest["data"]) == {"mnist1", *TARGETS}
    # one column order whichever run measured a target: the dictionary's, then the registry's (copies last)
    assert list(pd.read_csv(tmp_path / "distances" / "matrix.csv", index_col=0).columns) == ["mnist0", "mnist1", COPY]


def test_a_corrupt_pair_file_is_moved_aside_and_measured_again(setup, full_run, tmp_path, run):
    data, _ = setup
    shutil.copytree(full_run[0], tmp_path, dirs_exist_ok=True)
    path = tmp_path / "distances" / "pairs" / "mnist1__mnist0.json"
    path.write_text(path.read_text()[:100])
    results = run(data, tmp_path, SOURCES, TARGETS)
    assert (tmp_path / "distances" / "pairs" / "mnist1__mnist0.json.corrupt").exists()
    assert "mnist1__mnist0.json cannot be read" in (tmp_path / "logs" / "prune_transform.log").read_text()
    again = next(r for r in results if (r["source"], r["target"]) == ("mnist1", "mnist0"))
    first = next(r for r in full_run[1] if (r["source"], r["target"]) == ("mnist1", "mnist0"))
    assert again["curve"] == first["curve"]  # measured again, to the same numbers


def test_a_retrained_network_invalidates_its_pairs(setup, full_run, tmp_path, monkeypatch, run):
    data, _ = setup
    shutil.copytree(full_run[0], tmp_path, dirs_exist_ok=True)
    path = tmp_path / "tasks" / "tshirt.pt"
    ckpt = store.read_saved(path)
    ckpt["state_dict"]["head.bias"] += 1.0  # as if retrained: same config and data, other weights
    store.save_checkpoint(ckpt, path)
    calls = []
    original = prune_transform.pair_unit
    monkeypatch.setattr(prune_transform, "pair_unit", lambda source, *a: calls.append(source) or original(source, *a))
    run(data, tmp_path, SOURCES, TARGETS)
    assert calls == ["tshirt", "tshirt"]  # its pairs with both targets, nothing else


def test_the_paper_preset_on_a_cpu_first_says_what_it_costs(tmp_path):
    with pytest.raises(UserError, match="no step-1 network"):
        prune_transform.main(["--PRESET=paper", f"--DATA_DIR={SAMPLE.parent}", f"--CKPT_DIR={tmp_path}", "--DEVICE=cpu"])
    assert "the paper preset on a CPU: about 7 h (110 pairs, 4 min each" in (
        tmp_path / "logs" / "prune_transform.log").read_text()


def test_missing_checkpoint_names_the_step_1_command(setup, tmp_path, run):
    data, _ = setup
    with pytest.raises(UserError, match=r"no step-1 network for task 'mnist1'.*python train_task.py"):
        run(data, tmp_path, ["mnist1"], ["mnist1"])
    assert not (tmp_path / "distances").exists()  # nothing written by the failed run


def test_checkpoint_from_other_data_or_model_is_refused(setup, tmp_path, run):
    data, ckpt = setup
    shutil.copytree(ckpt / "tasks", tmp_path / "tasks")
    with pytest.raises(UserError, match="trained on other data"):
        run(data, tmp_path, ["mnist1"], ["mnist1"], "--VAL_FRACTION=0.2")
    path = tmp_path / "tasks" / "mnist1.pt"
    state = store.read_saved(path)
    state["state_dict"] = {k: v[:1] for k, v in state["state_dict"].items()}
    store.save_checkpoint(state, path)
    with pytest.raises(UserError, match="does not hold the base CNN"):
        run(data, tmp_path, ["mnist1"], ["mnist1"])


@pytest.mark.parametrize("arg, shown", [("--FEATURES=float16", "FEATURES='float16': use one of standardized"),
                                        ("--PRUNE_LEVELS=[0.5, 0.2]", "PRUNE_LEVELS"),
                                        ("--PRUNE_LEVELS=[0.5, 1.0]", "between 0 and 1"),
                                        ("--PRECISION=fp16", "PRECISION='fp16'")])
def test_bad_constants_are_refused(setup, tmp_path, run, arg, shown):
    data, ckpt = setup
    with pytest.raises(UserError, match=shown):
        run(data, ckpt, ["mnist1"], ["mnist1"], arg)


# ----------------------------------------------------------------------------- the Fisher task distance in step 2
@pytest.fixture(scope="module")
def fisher_run(setup, full_run, tmp_path_factory, run):
    """The Fisher distance beside the measured transfer distance ("both": the transfer pairs are reused)."""
    data, _ = setup
    out = tmp_path_factory.mktemp("fisher")
    shutil.copytree(full_run[0], out, dirs_exist_ok=True)
    run(data, out, SOURCES, TARGETS, "--DISTANCE=both", "--FISHER_SAMPLES=200")
    return out / "distances"


def test_fisher_matrix_closest_list_and_agreement(fisher_run):
    matrix = pd.read_csv(fisher_run / "fisher_matrix.csv", index_col=0)
    assert list(matrix.index) == SOURCES and list(matrix.columns) == TARGETS
    assert matrix.at["mnist0", "mnist0"] == 0
    off = matrix.drop("mnist0")["mnist0"].tolist() + matrix[COPY].tolist()
    assert all(0 < d < 1 for d in off)
    closest = json.loads((fisher_run / "fisher_closest.json").read_text())
    assert closest["distance"] == "fisher"
    for target in TARGETS:  # every other source, nearest first
        ranked = closest["closest"][target]
        assert [r["task"] for r in ranked] == sorted((s for s in SOURCES if s != target), key=matrix[target].get)
        assert [r["distance"] for r in ranked] == pytest.approx([matrix.at[r["task"], target] for r in ranked], abs=1e-4)
    assert set(closest["data"]) == set(TARGETS)
    agreement = pd.read_csv(fisher_run / "agreement.csv")
    assert list(agreement["target"]) == TARGETS
    transfer = pd.read_csv(fisher_run / "matrix.csv", index_col=0)
    pd.testing.assert_frame_equal(agreement, fisher.agreement(transfer, matrix, 3), atol=1e-4)  # as written (%.4f)
    assert list(agreement["closest_3_overlap"]) == [2, 3]  # every other source: K = 3 > the sources here
    assert (fisher_run / "fisher_heatmap.png").stat().st_size > 0
    assert len(list((fisher_run / "fisher").glob("*.json"))) == len(SOURCES) * len(TARGETS)


def test_networks_trained_alike_are_at_fisher_distance_zero(setup, tmp_path, run_script):
    """Remark 1 of the Fisher task distance: the same seed, data order and task give the same network."""
    data, ckpt = setup
    run_script(train_task, data, tmp_path, "--TASKS=['mnist0']", *LIMITS)
    cfg = configuration.configure(vars(prune_transform), [f"--DATA_DIR={data}", "--FISHER_SAMPLES=100", *LIMITS])
    task, device = utils.load_task("mnist1", **configuration.data_options(cfg)), torch.device("cpu")
    fishers = []
    for folder in (ckpt, tmp_path):
        cfg.CKPT_DIR = str(folder)
        network, _ = prune_transform.load_network("mnist0", utils.load_task("mnist0", **configuration.data_options(cfg)), cfg, device)
        fishers.append(fisher.task_fisher(network, task, cfg))
    assert fisher.fisher_distance(*fishers) == 0
