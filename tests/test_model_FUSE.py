"""Step 3: FUSE's choice, its use of the splits, resumption, determinism, errors and a smoke run of main."""
import dataclasses
import random
import inspect
import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch

import configuration
import executor
import model_FUSE
import training
import utils
from configuration import UserError
from models import FuseMixture, Genotype, build_network, count_parameters, sample_genotype, standard_space


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny networks run fastest without OpenMP threads waiting on each other on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(*extra):
    return configuration.configure(vars(model_FUSE), ["--PRESET=smoke", "--DEVICE=cpu", *extra])


def brightness_splits(n_train=96, n_val=48, seed=0):
    """Class 1 images are brighter: any network that sees its input can tell them apart."""
    gen = torch.Generator().manual_seed(seed)
    def split(n):
        y = torch.arange(n) % 2
        return utils.Split(torch.rand(n, 1, 28, 28, generator=gen) * 0.5 + 0.4 * y.view(-1, 1, 1, 1), y)
    return split(n_train), split(n_val)


CAN_LEARN = Genotype(("skip_connect",) * 3, 3, 4, 1)
CANNOT_LEARN = Genotype(("zero",) * 3, 3, 4, 1)  # every cell outputs zeros: only the head's bias is left


@pytest.mark.parametrize("order", [(CANNOT_LEARN, CAN_LEARN), (CAN_LEARN, CANNOT_LEARN)])
def test_fuse_picks_the_candidate_that_can_learn(order):
    cfg = config("--W_EPOCHS=2", "--ALPHA_EPOCHS=3", "--MAX_ALTERNATIONS=2", "--ALPHA_MARGIN=0.2")
    train, val = brightness_splits()
    record = model_FUSE.run_round(list(order), train, val, 2, cfg, torch.device("cpu"), seed=0)
    good = order.index(CAN_LEARN)
    assert record["winner"] == good
    assert record["alpha"][-1][good] > 0.5 > record["alpha"][-1][1 - good]
    assert record["alpha"][0] == [0.5, 0.5]  # α starts at zero: uniform weights
    assert record["alternations"] == 2 and len(record["alpha"]) == 3
    assert record["val_accuracy"][good] >= record["val_accuracy"][1 - good]
    assert record["val_auroc"][1 - good] == 0.5 < record["val_auroc"][good]  # a constant output ranks nothing


def test_a_member_at_chance_never_wins_even_with_the_largest_alpha(monkeypatch):
    """A constant output adds a free offset to the summed logits, so α can favour it: the round records α's
    choice but gives the win to the best member that ranks the images; with none such, the incumbent stays."""
    def favour_the_constant(mix, val, cfg, device, generator):
        with torch.no_grad():
            mix.alpha.copy_(torch.tensor([0.0, 2.0]))
        return model_FUSE.candidate_logits(mix, val.x, cfg)
    monkeypatch.setattr(model_FUSE, "train_alpha", favour_the_constant)
    train, val = brightness_splits()
    cfg = config("--W_EPOCHS=2")
    record = model_FUSE.run_round([CAN_LEARN, CANNOT_LEARN], train, val, 2, cfg, torch.device("cpu"), seed=0)
    assert record["argmax_alpha"] == 1 and record["val_auroc"][1] == 0.5
    assert record["excluded"] == [1] and record["winner"] == 0
    # one member may win: α has no choice to make, so the round is not α's decision
    assert not record["decided"] and record["margin"] == 0 and record["alternations"] == cfg.MAX_ALTERNATIONS
    assert record["decided_by"] == "validation accuracy (alpha undecided)"
    record = model_FUSE.run_round([CANNOT_LEARN, CAN_LEARN], train, val, 2, config("--W_EPOCHS=2",
                                  "--MIN_MEMBER_AUROC=1.01"), torch.device("cpu"), seed=0)
    assert record["excluded"] == [0, 1] and record["winner"] == 0
    assert record["decided_by"] == "incumbent (no member reached AUROC 1.01)"


def test_alpha_decides_among_the_members_that_may_win_only(monkeypatch):
    """α's lead of a constant member over two tied ones that learn decides nothing: the round's margin is
    taken among the eligible members, so it stays undecided and falls back to their validation accuracy."""
    def favour_the_constant(mix, val, cfg, device, generator):
        with torch.no_grad():
            mix.alpha.copy_(torch.tensor([0.0, 0.0, 2.0]))
        return model_FUSE.candidate_logits(mix, val.x, cfg)
    monkeypatch.setattr(model_FUSE, "train_alpha", favour_the_constant)
    train, val = brightness_splits()
    also_learns = Genotype(("skip_connect", "avg_pool_3x3", "skip_connect"), 3, 4, 1)
    record = model_FUSE.run_round([CAN_LEARN, also_learns, CANNOT_LEARN], train, val, 2,
                                  config("--W_EPOCHS=2", "--MAX_ALTERNATIONS=3"), torch.device("cpu"), seed=0)
    assert record["argmax_alpha"] == 2 and record["excluded"] == [2]
    assert not record["decided"] and record["margin"] == 0 and record["alternations"] == 3
    assert record["decided_by"] == "validation accuracy (alpha undecided)"
    assert record["winner"] == max([0, 1], key=lambda i: record["val_accuracy"][i])


def test_alpha_decides_once_its_argmax_holds_with_a_lead():
    cfg = config("--MAX_ALTERNATIONS=5", "--ALPHA_MARGIN=0.2", "--ALPHA_EPOCHS=3", "--MIN_MEMBER_AUROC=0")
    train, val = brightness_splits(32, 16)
    record = model_FUSE.run_round([CAN_LEARN, CANNOT_LEARN], train, val, 2, cfg, torch.device("cpu"), seed=0)
    assert record["decided"] and record["decided_by"] == "alpha"
    assert record["alternations"] == 2  # the first alternation at which the argmax can have held
    assert record["margin"] == pytest.approx(abs(record["alpha"][-1][0] - record["alpha"][-1][1]))
    assert record["margin"] >= 0.2
    assert record["winner"] == record["argmax_alpha"] == 0


def test_an_undecided_round_keeps_the_best_validation_accuracy(monkeypatch):
    """α that never separates: the round says so and falls back to the members' validation accuracy."""
    monkeypatch.setattr(model_FUSE, "train_alpha", lambda mix, val, cfg, device, generator:
                        model_FUSE.candidate_logits(mix, val.x, cfg))  # α stays uniform
    cfg = config("--MAX_ALTERNATIONS=2", "--W_EPOCHS=2")
    train, val = brightness_splits()
    record = model_FUSE.run_round([CANNOT_LEARN, CAN_LEARN], train, val, 2, cfg, torch.device("cpu"), seed=0)
    assert not record["decided"] and record["alternations"] == 2 and record["margin"] == 0
    assert record["decided_by"] == "validation accuracy (alpha undecided)"
    assert record["argmax_alpha"] == 0 and record["best_val_accuracy"] == record["winner"] == 1
    assert record["val_accuracy"][1] > record["val_accuracy"][0]


def test_mixture_step_matches_one_backward_through_the_mixture():
    """One candidate's graph at a time gives the same weights and batch-norm statistics."""
    genotypes = [Genotype(ops, 3, 4, 1) for ops in (("sep_conv_3x3", "skip_connect", "sep_conv_5x5"),
                                                     ("dil_conv_3x3", "max_pool_3x3", "conv_7x1_1x7"))]
    mixtures = []
    for _ in range(2):
        torch.manual_seed(0)
        mix = FuseMixture([build_network(g, 2) for g in genotypes]).train()
        mix.alpha.data = torch.tensor([0.3, -0.2])
        mix.alpha.requires_grad_(False)
        mixtures.append(mix)
    train = brightness_splits(16)[0]
    losses = []
    for mix, step in zip(mixtures, (training.train_step, model_FUSE.mixture_step)):
        optimizer = torch.optim.SGD(mix.candidate_parameters(), lr=0.1)
        loss_fn = torch.nn.functional.cross_entropy
        losses.append([float(step(mix, optimizer, train.x, train.y, loss_fn)) for _ in range(3)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for (name, a), b in zip(mixtures[0].state_dict().items(), mixtures[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert all(m.track_running_stats for m in mixtures[1].modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_mixture_step_in_bf16_trains_in_fp32_close_to_fp32():
    """Under PRECISION=bf16 the forward passes run in bf16; weights, gradients and the loss stay fp32."""
    genotype = Genotype(("sep_conv_3x3", "skip_connect", "conv_7x1_1x7"), 3, 4, 1)
    train = brightness_splits(16)[0]
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        mix = FuseMixture([build_network(genotype, 2), build_network(genotype, 2)]).train()
        optimizer = torch.optim.SGD(mix.candidate_parameters(), lr=0.1)
        loss = model_FUSE.mixture_step(mix, optimizer, train.x, train.y, torch.nn.functional.cross_entropy, precision)
        assert loss.dtype == torch.float32 and all(p.dtype == torch.float32 for p in mix.parameters())
        losses[precision] = float(loss)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


# ----------------------------------------------------------------------------- resume and determinism
def search_in(folder, cfg, rounds=3, task="synthetic"):
    train, val = brightness_splits(64, 32)
    data = type("Data", (), {"fingerprint": "synthetic", "task": utils.Task("mnist")})()
    search = model_FUSE.standard_search(task, data, rounds, folder, cfg)
    return model_FUSE.fuse_search(search, train, val, model_FUSE.saved_rounds(folder), cfg, torch.device("cpu"),
                                  executor.save, logging.getLogger("test"))


def round_files(folder):
    """Every round file without its wall-clock, which differs between runs."""
    out = {}
    for path in sorted(Path(folder).glob("round_*.json")):
        record = json.loads(path.read_text())
        record.pop("seconds")
        out[path.name] = record
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search_a")
    return folder, search_in(folder, config())


def test_same_seed_same_genotypes(uninterrupted, tmp_path):
    folder, first = uninterrupted
    again = search_in(tmp_path, config())
    assert again["genotype"] == first["genotype"]
    assert round_files(tmp_path) == round_files(folder)
    other = search_in(tmp_path / "seed1", config("--SEED=1"))
    assert [r["candidates"] for r in other["rounds"]] != [r["candidates"] for r in first["rounds"]]


def test_killed_search_resumes_to_the_same_result(uninterrupted, tmp_path, monkeypatch):
    folder, first = uninterrupted
    real, calls = model_FUSE.run_round, []

    def dies_in_round_2(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)
    monkeypatch.setattr(model_FUSE, "run_round", dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        search_in(tmp_path, config())
    assert [p.name for p in tmp_path.glob("round_*.json")] == ["round_01.json"]
    assert not (tmp_path / "result.json").exists()

    calls.clear()
    monkeypatch.setattr(model_FUSE, "run_round", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    resumed = search_in(tmp_path, config())
    assert len(calls) == 2  # rounds 2 and 3 only
    assert resumed["genotype"] == first["genotype"]
    assert round_files(tmp_path) == round_files(folder)


def test_changed_config_reruns_rounds(uninterrupted, tmp_path, monkeypatch):
    folder, _ = uninterrupted
    for path in folder.glob("round_*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    real, calls = model_FUSE.run_round, []
    monkeypatch.setattr(model_FUSE, "run_round", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    search_in(tmp_path, config())
    assert calls == []
    search_in(tmp_path, config("--W_LR=0.002"))
    assert len(calls) == 3


# ----------------------------------------------------------------------------- main
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, make_kaggle):
    folder = tmp_path_factory.mktemp("data")
    make_kaggle(folder, "fashion", 20, 5, seed=3)
    return folder


def write_closest(ckpt_dir, closest, data_dir, name="closest.json", **changes):
    """A closest list as step 2 writes it for this data (its seed, split and the targets' fingerprints)."""
    cfg = config(f"--DATA_DIR={data_dir}", "--TRAIN_LIMIT=64")
    payload = {"config": {"SEED": cfg.SEED, "VAL_FRACTION": cfg.VAL_FRACTION, "PRECISION": cfg.PRECISION}, "k": 2, "closest": closest,
               "data": {t: utils.load_task(t, **configuration.data_options(cfg)).fingerprint for t in closest if t in utils.TASK_REGISTRY}}
    payload.update(changes)
    path = Path(ckpt_dir) / "distances" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


SANDAL = {"sandal": [{"task": "trouser", "distance": 10.0}, {"task": "tshirt", "distance": 20.0},
                     {"task": "dress", "distance": 30.0}]}


@pytest.fixture
def run(run_script):
    return lambda data_dir, ckpt_dir, *extra: run_script(model_FUSE, data_dir, ckpt_dir, "--TRAIN_LIMIT=64", "--K=2",
                                                         *extra)


def test_missing_distances_name_the_step_2_command(data_dir, tmp_path, run):
    with pytest.raises(UserError, match=r"missing.*python prune_transform.py --TARGETS=\"\['sandal'\]\""):
        run(data_dir, tmp_path)
    write_closest(tmp_path, {"boot": SANDAL["sandal"]}, data_dir)
    with pytest.raises(UserError, match=r"no distances to target 'sandal'.*"
                                              r"prune_transform.py --TARGETS=\"\['boot', 'sandal'\]\" "
                                              r"--PRESET=smoke"):
        run(data_dir, tmp_path)
    run(data_dir, tmp_path / "std", "--SPACE=standard", "--ROWS=[]", "--ROUNDS=1")  # needs no distances


@pytest.mark.parametrize("changes, shown", [
    ({"config": {}}, "made with SEED=None, this run has SEED=0"),
    ({"config": {"SEED": 0, "VAL_FRACTION": 0.2, "PRECISION": "fp32"}}, "made with VAL_FRACTION=0.2"),
    ({"config": {"SEED": 0, "VAL_FRACTION": 0.1, "PRECISION": "bf16"}}, "made with PRECISION='bf16'"),
    ({"data": {"sandal": "0123456789abcdef"}}, "measured 'sandal' on other data"),
])
def test_distances_from_other_settings_or_data_are_refused(data_dir, tmp_path, run, changes, shown):
    write_closest(tmp_path, SANDAL, data_dir, **changes)
    with pytest.raises(UserError, match=shown) as err:
        run(data_dir, tmp_path)
    assert "remake it with: python prune_transform.py" in str(err.value)
    assert not (tmp_path / "search").exists()  # refused before any work


@pytest.mark.parametrize("genotype,shown", [
    ({"ops": ["conv_9x9", "skip_connect", "zero"], "nodes": 3, "C": 4, "N": 1}, "unknown op 'conv_9x9'"),
    ({"ops": ["skip_connect", "zero"], "nodes": 3, "C": 4, "N": 1}, "needs 3 ops"),
])
def test_bad_genotype_file_lists_the_valid_ops(data_dir, tmp_path, genotype, shown, run):
    write_closest(tmp_path, SANDAL, data_dir)
    path = tmp_path / "search" / "dictionary" / "trouser.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"task": "trouser", "genotype": genotype}))
    with pytest.raises(UserError) as err:
        run(data_dir, tmp_path, "--ROWS=['fuse_task_aware']")
    assert str(path) in str(err.value) and shown in str(err.value)
    assert all(op in str(err.value) for op in standard_space(3)[0])


def write_genotypes(ckpt_dir, given):
    for task, ops in given.items():
        path = ckpt_dir / "search" / "dictionary" / f"{task}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"task": task, "genotype": {"ops": ops, "nodes": 3, "C": 16, "N": 2}}))


def test_the_fisher_closest_list_makes_the_space_when_chosen(data_dir, tmp_path, run):
    write_closest(tmp_path, SANDAL, data_dir)
    with pytest.raises(UserError, match=r"fisher_closest.json is missing.*--DISTANCE=fisher"):
        run(data_dir, tmp_path, "--DISTANCE=fisher")
    fisher = {"sandal": [{"task": "dress", "distance": 0.12}, {"task": "trouser", "distance": 0.2},
                         {"task": "tshirt", "distance": 0.3}]}
    write_closest(tmp_path, fisher, data_dir, name="fisher_closest.json")
    write_genotypes(tmp_path, {"trouser": ["sep_conv_3x3", "skip_connect", "zero"],
                               "tshirt": ["dil_conv_3x3", "skip_connect", "zero"],
                               "dress": ["max_pool_3x3", "sep_conv_5x5", "zero"]})
    run(data_dir, tmp_path, "--ROWS=[]", "--ROUNDS=1", "--DISTANCE=fisher")
    result = json.loads((tmp_path / "search" / "sandal" / "task_aware" / "result.json").read_text())
    assert result["config"]["space"] == [["max_pool_3x3", "sep_conv_3x3"], ["sep_conv_5x5", "skip_connect"], ["zero"]]
    assert result["rounds"][0]["candidates"][0]["ops"] == ["max_pool_3x3", "sep_conv_5x5", "zero"]


def test_hand_written_dictionary_genotypes_are_used(data_dir, tmp_path, run):
    write_closest(tmp_path, SANDAL, data_dir)
    given = {"trouser": ["sep_conv_3x3", "skip_connect", "zero"], "tshirt": ["dil_conv_3x3", "skip_connect", "zero"]}
    write_genotypes(tmp_path, given)
    run(data_dir, tmp_path, "--ROWS=[]", "--ROUNDS=1")
    result = json.loads((tmp_path / "search" / "sandal" / "task_aware" / "result.json").read_text())
    assert result["config"]["space"] == [["dil_conv_3x3", "sep_conv_3x3"], ["skip_connect"], ["zero"]]
    assert result["rounds"][0]["candidates"][0] == {"ops": given["trouser"], "nodes": 3, "C": 4, "N": 1}
    assert not (tmp_path / "search" / "dictionary" / "trouser").exists()  # nothing was searched


class SpiedSplit:
    """A split that records the functions on the stack whenever its images or labels are read."""

    def __init__(self, split, reads, name):
        self._split, self._reads, self._name = split, reads, name

    def _read(self, what):
        self._reads.append((self._name, what, [f.function for f in inspect.stack()[2:]]))
        return getattr(self._split, what)

    x = property(lambda self: self._read("x"))
    y = property(lambda self: self._read("y"))


def test_main_smoke_writes_table_and_plots_and_never_searches_on_test(data_dir, tmp_path, monkeypatch, run):
    write_closest(tmp_path, SANDAL, data_dir)
    reads, load_task = [], utils.load_task
    def spied_load_task(name, *args, **kwargs):
        data = load_task(name, *args, **kwargs)
        return dataclasses.replace(data, **{s: SpiedSplit(getattr(data, s), reads, f"{name}.{s}")
                                            for s in ("train", "val", "test")})
    monkeypatch.setattr(utils, "load_task", spied_load_task)
    rows = "--ROWS=['fuse_task_aware', 'fuse_standard', 'random', 'resnet18']"
    table = run(data_dir, tmp_path, rows, "--FINAL_SEEDS=[0, 1]")

    out = tmp_path / "search" / "sandal"
    for name in ("table.csv", "table.md", "error_vs_params.png", "genotype.json", "task_aware/alpha.png",
                 "standard/alpha.png", "task_aware/round_02.json", "random.json", "rows/fuse_task_aware_seed0.pt"):
        assert (out / name).is_file(), name
    for task in ("trouser", "tshirt"):  # the K=2 closest: searched for the dictionary, the third is not
        assert (tmp_path / "search" / "dictionary" / f"{task}.json").is_file()
    assert not (tmp_path / "search" / "dictionary" / "dress.json").exists()
    assert list(table["Architecture"]) == ["FUSE w. task-aware space (TA-NAS)", "FUSE w. standard space",
                                           "Random search", "ResNet-18"]
    markdown = (out / "table.md").read_text()
    assert markdown.count("\n") == 6 and "| ResNet-18 |" in markdown
    rounds = json.loads((out / "task_aware" / "round_01.json").read_text())
    assert {"candidates", "alpha", "val_accuracy", "val_auroc", "mixture_val_accuracy", "winner", "seconds", "decided",
            "margin", "alternations", "decided_by"} <= set(rounds)
    first = json.loads((tmp_path / "search" / "dictionary" / "trouser.json").read_text())["genotype"]
    assert rounds["candidates"][0]["ops"] == first["ops"]  # the search starts from the closest task's genotype
    # one line per search: the two dictionary entries, then the target's own, counted from their round files
    searches = pd.read_csv(out / "searches.csv")
    assert list(searches["search"]) == ["dictionary: trouser", "dictionary: tshirt", "task-aware space",
                                        "standard space", "random search (4 trials)"]
    aware = json.loads((out / "task_aware" / "result.json").read_text())
    assert searches.loc[2, "rounds"] == 2 and searches.loc[2, "decided"] == aware["decided_rounds"]
    assert searches.loc[2, "genotype"] == " / ".join(aware["genotype"]["ops"])
    assert searches["rounds"].isna().tolist() == [False] * 4 + [True]
    assert "| random search (4 trials) | – | – |" in (out / "searches.md").read_text()

    # the test images are read once per retraining (4 rows x 2 seeds), by the final evaluation only;
    # the searches (FUSE, the dictionary's, random search) never read them
    test_reads = [stack for name, what, stack in reads if name.endswith(".test") and what == "x"]
    assert len(test_reads) == 8
    assert all("retrain" in stack for stack in test_reads)
    searching = ("fuse_search", "search_unit", "random_search", "random_trial")
    assert not any(f in stack for name, _, stack in reads if name.endswith(".test") for f in searching)
    assert any("train_alpha" in stack for name, _, stack in reads if name.endswith(".val"))

    # every row, seed by seed, retrained from fresh weights: the same table again from new files
    log = tmp_path / "logs" / "model_FUSE.log"
    again = run(data_dir, tmp_path, rows, "--FINAL_SEEDS=[0, 1]")  # everything finished: reused
    assert log.read_text().count("retrained earlier with the same config, reused") == 8
    assert again.equals(table)
    for path in (out / "rows").glob("*_seed*.json"):
        path.unlink()
    retrained = run(data_dir, tmp_path, rows, "--FINAL_SEEDS=[0, 1]")
    assert retrained.drop(columns="Retrain (s)").equals(table.drop(columns="Retrain (s)"))  # all but the clock


def test_random_search_gets_the_budget_of_the_standard_fuse_search(data_dir, tmp_path, monkeypatch, run):
    trials = []
    real = model_FUSE.random_trial
    monkeypatch.setattr(model_FUSE, "random_trial", lambda genotype, epochs, *a: trials.append(epochs) or
                        real(genotype, epochs, *a))
    run(data_dir, tmp_path, "--SPACE=standard", "--ROWS=['random']", "--ROUNDS=2", "--MAX_ALTERNATIONS=2",
        "--ALPHA_MARGIN=2.0", "--W_EPOCHS=2")  # a lead of 2 cannot be reached: every round runs to the end
    rounds = [json.loads(p.read_text()) for p in sorted((tmp_path / "search" / "sandal" / "standard").glob("round_*"))]
    fuse = [r["alternations"] * 2 for r in rounds for _ in r["candidates"]]  # weight epochs of each candidate
    assert trials == fuse and len(trials) == 2 * 2 and sum(trials) == 2 * 2 * 2 * 2


def test_the_cpu_preset_searches_networks_of_at_least_a_fifth_of_a_million_parameters():
    cfg = configuration.configure(vars(model_FUSE), ["--PRESET=cpu"])
    sizes = [count_parameters(build_network(sample_genotype(standard_space(cfg.NODES), random.Random(s), cfg.NODES,
                                                            cfg.C, cfg.N), 2)) for s in range(60)]
    assert min(sizes) >= 200_000
    assert cfg.FINAL_SEEDS == [0, 1, 2] and cfg.EVAL_LIMIT == 0  # several seeds, scored on the whole test split
