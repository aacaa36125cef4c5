"""Step 3: FUSE (fusion search) in the task-aware and the standard space, and the comparison table.

python model_FUSE.py [--NAME=value ...]; every constant below can be overridden that way.
Reads step 2's CKPT_DIR/distances/closest.json (fisher_closest.json with DISTANCE="fisher"); writes under
CKPT_DIR/search/:
  dictionary/<task>.json           searched genotype of each base task the task-aware space needs, with
                                   the config that made it (reused by every later target)
  dictionary/<task>/round_NN.json  that search's rounds (as below)
  <target>/<space>/round_NN.json   one FUSE round: candidates, softmax(α) after every alternation,
                                   validation accuracies, winner, wall-clock; a rerun resumes from them
  <target>/<space>/result.json     the search's genotype and cost; alpha.png its α trajectories
  <target>/genotype.json           the genotype found in SPACE
  <target>/random.json             the random-search trials
  <target>/rows/<row>.json|_seedS.pt  each comparison row retrained from scratch, scored on test
  <target>/table.csv, table.md, error_vs_params.png
  <target>/searches.csv, searches.md  each search the target used: rounds, α decided, α's agreement with the
                                   members' validation accuracy and AUROC, minutes, genotype
"""
import contextlib
import functools
import hashlib
import math
import random
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

import configuration
import executor
import reporting
import store
import training
import utils
from configuration import UserError
from models import (FuseMixture, Genotype, build_network, count_parameters,
                    operations, sample_distinct, sample_genotype, space_size, standard_space,
                    task_aware_space)
from models.baselines import build_baseline  # torchvision: only this step needs it

CLOSEST_FILES = {"transfer": "closest.json", "fisher": "fisher_closest.json"}  # step 2's outputs, by DISTANCE
ALL_THREADS = torch.get_num_threads()  # torch's default, before THREADS applies
ROW_SEARCH = {"fuse_task_aware": "task_aware", "fuse_standard": "standard", "random": "random"}

PRESET = ""               # "" = the constants below as written; or a name from PRESETS (paper, smoke)
DATA_DIR = "data"         # full CSVs here; without them the bundled sample in data/sample is used
CKPT_DIR = "checkpoints"
DEVICE = "auto"           # auto = cuda, then mps, then cpu
SEED = 0                  # seeds the split (as in steps 1-2), the architecture samplers and the networks
DOWNLOAD = False          # fetch missing datasets into DATA_DIR (needs internet)
TARGET = utils.HELD_OUT_TARGET  # the paper's is utils.PAPER_TARGET (needs the Quick, Draw! files)
SPACE = "task_aware"      # space of the headline search (genotype.json): task_aware | standard
K = 3                     # closest base tasks whose genotypes make the task-aware space (paper: 3)
DISTANCE = "transfer"     # whose closest list: "transfer" (closest.json, the paper's pruned transfer net) or
                          # "fisher" (fisher_closest.json, the Fisher task distance; prune_transform --DISTANCE)
VAL_FRACTION = 0.1        # as in steps 1-2; α is trained on this validation split, never on test
TRAIN_LIMIT = 0           # load at most this many training images (0 = the whole training split)
EVAL_LIMIT = 0            # at most this many validation / test images (0 = all)
SEARCH_LIMIT = 1000       # FUSE and random search train weights on at most this many of them (paper: 0 = all)
NODES = 3                 # nodes of a cell (the paper's example cell: 3)
C = 8                     # channels of the first stage (paper: 64; C=64, N=3 gives about 1.7 M parameters)
N = 1                     # cells per stage, 3 stages and 2 reductions (paper: 3)
CANDIDATES = 3            # networks per round, the incumbent included (released code: 3)
ROUNDS = 3                # rounds of the target's search (released code: 10)
BASE_ROUNDS = 2           # rounds of a base task's search, for the dictionary (paper preset: 10)
W_EPOCHS = 1              # (i) epochs of weight training per alternation (released code: 5)
ALPHA_EPOCHS = 5          # (ii) epochs of α training per alternation (released code: 5, on test)
ALPHA_MARGIN = 0.1        # a round is decided once argmax α held over two alternations with softmax(α)'s
                          # lead over the runner-up at least this ...
MAX_ALTERNATIONS = 3      # ... or undecided after this many alternations (released code: always 5); an
                          # undecided round keeps its member with the best validation accuracy
MIN_MEMBER_AUROC = 0.6    # a member below this validation AUROC cannot win a round (argmax α and the fallback
                          # are taken over the others; none left: the incumbent stays): a network with a constant
                          # output (AUROC 0.5) adds a free offset to the mixture's summed logits, so α can favour it
W_OPTIMIZER = "adam"      # adam | sgd (momentum 0.9); released code: Adam, default lr, new every alternation
W_LR = 1e-3
ALPHA_OPTIMIZER = "adam"  # adam | sgd (momentum 0.9); released code: Adam, default lr, new every alternation
ALPHA_LR = 0.05           # released code: Adam's default 1e-3, under which α barely moves in a round
BATCH_SIZE = 32           # batch of weight, α and final training (released code: 128; 32 gives tiny budgets
                          # 4x the steps on the same images)
FINAL_EPOCHS = 3          # every row is retrained from scratch this long (released code: 10, Adam)
FINAL_LR = 1e-3
FINAL_LIMIT = 1000        # retrain on at most this many training images (paper: 0 = all)
FINAL_SEEDS = [0]         # one retraining per seed: the table gives mean ± sd and a paired test against TA-NAS on
                          # the same test images (paper preset: 3 seeds; the paper: one run)
REDUCED_ROWS = ["resnet34", "densenet161"]  # rows retrained on the reduced budget below, stated in the table
                          # (paper preset: none; these two take minutes an epoch on a CPU even on the sample)
REDUCED_EPOCHS = 1
REDUCED_LIMIT = 250
ROWS = ["fuse_task_aware", "fuse_standard", "random", "resnet18", "resnet34", "densenet161"]  # the paper's
                          # Table 1 rows (reporting.PAPER_ROWS) to run
EVAL_BATCH = 1000         # images per forward pass when evaluating (speed only)
PRECISION = "fp32"        # fp32 | bf16: forward passes under torch.autocast (weights, α, optimizer state and metrics
                          # stay fp32); must be step 2's
THREADS = 1               # CPU threads of the searched networks (0 = torch's default); 1 spares small networks
                          # OpenMP's waits on a busy machine; the torchvision rows use every core (speed only,
                          # though the last bits of results may depend on it)
EXECUTOR = "local"        # where the units (a search, a random search, a row retrained with one seed) run: "local"
                          # (here, one after another) or "ray"
RAY_ADDRESS = ""          # with "ray": "" starts Ray on this machine; else a cluster's address (docs/scaling-out.md)
CPUS_PER_UNIT = 1         # with "ray": CPU threads of each unit ...
GPUS_PER_UNIT = 0         # ... and its GPUs (1 on a GPU machine: one unit per GPU)

# named sets of constants (--PRESET=name); precedence: the constants above < the preset < --NAME=value
PRESETS = {
    # the authors' budgets (released code), on whatever data is in DATA_DIR
    "paper": dict(TRAIN_LIMIT=0, EVAL_LIMIT=0, SEARCH_LIMIT=0, FINAL_LIMIT=0, NODES=3, C=64, N=3, CANDIDATES=3,
                  ROUNDS=10, BASE_ROUNDS=10, W_EPOCHS=5, ALPHA_EPOCHS=5, MAX_ALTERNATIONS=5, BATCH_SIZE=128,
                  FINAL_EPOCHS=10, FINAL_SEEDS=[0, 1, 2], REDUCED_ROWS=[], THREADS=0),
    # full data on a 2-core CPU (results/search_sandal, results/search_mnist7), both held-out targets in about 2
    # hours: networks of at least 0.2 M parameters (C = 28, N = 1: 0.22-0.68 M over 60 sampled genotypes) searched
    # on 2,000 training images, one round per base task, rows retrained on 2,500 images (the reduced ones on 500:
    # DenseNet-161's scoring on the 10,000 test images alone takes 8 CPU-minutes a seed), scored on the whole test split
    "cpu": dict(TRAIN_LIMIT=0, EVAL_LIMIT=0, SEARCH_LIMIT=2000, C=28, N=1, ROUNDS=3, BASE_ROUNDS=1, MAX_ALTERNATIONS=3,
                FINAL_EPOCHS=3, FINAL_LIMIT=2500, FINAL_SEEDS=[0, 1, 2], REDUCED_ROWS=["resnet34", "densenet161"],
                REDUCED_EPOCHS=1, REDUCED_LIMIT=500),
    # the tests: seconds
    "smoke": dict(TRAIN_LIMIT=400, EVAL_LIMIT=200, C=4, CANDIDATES=2, ROUNDS=2, BASE_ROUNDS=1, ALPHA_EPOCHS=1,
                  MAX_ALTERNATIONS=2, FINAL_EPOCHS=1, ROWS=["fuse_task_aware", "fuse_standard", "random", "resnet18"]),
}

# the constants a search's result depends on: rounds, dictionary entries and random trials are
# reused when these match (TARGET, ROWS and the final budget do not change a search)
SEARCH_KEYS = frozenset({"SEED", "VAL_FRACTION", "TRAIN_LIMIT", "EVAL_LIMIT", "SEARCH_LIMIT", "NODES",
                         "C", "N", "CANDIDATES", "W_EPOCHS", "ALPHA_EPOCHS", "ALPHA_MARGIN",
                         "MAX_ALTERNATIONS", "MIN_MEMBER_AUROC", "W_OPTIMIZER", "W_LR", "ALPHA_OPTIMIZER", "ALPHA_LR",
                         "BATCH_SIZE", "PRECISION"})
FINAL_KEYS = frozenset({"SEED", "VAL_FRACTION", "TRAIN_LIMIT", "EVAL_LIMIT", "BATCH_SIZE", "FINAL_LR", "PRECISION"})
OPTIMIZERS = frozenset({"adam", "sgd"})
AT_LEAST_ONE = frozenset({"K", "C", "N", "CANDIDATES", "ROUNDS", "BASE_ROUNDS", "W_EPOCHS", "ALPHA_EPOCHS",
                          "MAX_ALTERNATIONS", "BATCH_SIZE", "FINAL_EPOCHS", "REDUCED_EPOCHS", "EVAL_BATCH"})


# ----------------------------------------------------------------------------- small helpers
def check_config(cfg):
    executor.check_config(cfg)
    utils.get_task(cfg.TARGET)
    if cfg.DISTANCE not in CLOSEST_FILES:
        raise UserError(f"DISTANCE={cfg.DISTANCE!r}: use one of {', '.join(CLOSEST_FILES)}")
    if cfg.SPACE not in ("task_aware", "standard"):
        raise UserError(f"SPACE={cfg.SPACE!r}: use 'task_aware' or 'standard'")
    for name in ("ROWS", "REDUCED_ROWS"):
        unknown = [r for r in getattr(cfg, name) if r not in reporting.PAPER_ROWS]
        if unknown:
            raise UserError(f"{name}: unknown row(s) {unknown}; valid rows: {', '.join(reporting.PAPER_ROWS)}")
    for name in ("W_OPTIMIZER", "ALPHA_OPTIMIZER"):
        if getattr(cfg, name) not in OPTIMIZERS:
            raise UserError(f"{name}={getattr(cfg, name)!r}: use one of {', '.join(sorted(OPTIMIZERS))}")
    for name in sorted(AT_LEAST_ONE):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name}={getattr(cfg, name)} must be at least 1")
    if cfg.PRECISION not in training.PRECISIONS:
        raise UserError(f"PRECISION={cfg.PRECISION!r}: use one of {', '.join(training.PRECISIONS)}")
    if cfg.NODES < 2:
        raise UserError(f"NODES={cfg.NODES}: a cell needs at least 2 nodes")
    if not cfg.FINAL_SEEDS:
        raise UserError("FINAL_SEEDS is empty: give at least one seed, e.g. --FINAL_SEEDS=[0]")


def seed_of(*parts):
    """A stable 63-bit seed from any parts (Python's hash() of a str changes between processes)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def pick(cfg, keys):
    return {k: getattr(cfg, k) for k in sorted(keys)}


def read_genotype(payload, path):
    """A Genotype from its JSON form; a bad one is a UserError naming the file and what is valid."""
    fix = "fix the file or delete it to have it searched again"
    try:
        return Genotype.from_json(payload)
    except ValueError as e:
        raise UserError(f"{path}: bad genotype: {e}. Valid ops: {', '.join(operations.OP_NAMES)}; "
                        f"a cell of n nodes has n(n-1)/2 edges, one op each; {fix}")
    except (KeyError, TypeError):
        raise UserError(f"{path}: a genotype looks like {{\"ops\": [one op per edge], \"nodes\": 3, "
                        f"\"C\": 16, \"N\": 1}}, got {payload!r}. Valid ops: "
                        f"{', '.join(operations.OP_NAMES)}; {fix}")


@lru_cache(maxsize=None)
def device_label(device):
    env = configuration.environment(device)
    return f"{device.type}: {env.get('gpu') or env.get('cpu')}"


def limit(split, n):
    """The first n images of a split (the training split is already shuffled); all when n is 0."""
    return utils.Split(split.x[:n], split.y[:n]) if n else split


def make_optimizer(name, params, lr, device):
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return training.adam(params, lr, device)


# ----------------------------------------------------------------------------- one FUSE round
@contextlib.contextmanager
def running_stats_frozen(model):
    """Batch norm in training mode that normalises by the batch but leaves its running statistics."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def mixture_step(mix, optimizer, xb, yb, loss_fn, precision="fp32"):
    """A weight step on the mixture's loss with one candidate's graph in memory at a time.

    One backward through the whole mixture holds every candidate's activations at once (4.9 GB for
    three candidates at C=64, N=3, batch 128). The loss reaches a candidate only through its logits,
    so: the other candidates' logits without graphs (batch norm's running statistics updated there,
    once) and the last one's with its graph; one backward trains the last candidate and gives the
    loss's gradient for every other candidate's logits; then each other candidate runs again with its
    graph and backward from that gradient. The same gradients, for a forward pass more per candidate
    but one.
    """
    def forward(net):  # in `precision`; the logits, α and the loss in fp32
        with training.autocast(precision, xb.device):
            return net(xb).float()

    *others, last = mix.candidates
    with torch.no_grad():
        detached = [forward(net).requires_grad_() for net in others]
    loss = loss_fn(mix.combine(torch.stack([*detached, forward(last)])), yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    with running_stats_frozen(mix):
        for net, logits in zip(others, detached):
            forward(net).backward(logits.grad)
    optimizer.step()
    return loss.detach()


def train_weights(mix, train, cfg, device, generator, bar=None):
    """(i) W_EPOCHS of every candidate's weights on the training split, α frozen."""
    mix.alpha.requires_grad_(False)
    optimizer = make_optimizer(cfg.W_OPTIMIZER, mix.candidate_parameters(), cfg.W_LR, device)
    for _ in range(cfg.W_EPOCHS):
        training.train_epoch(mix, optimizer, train.x, train.y, cfg.BATCH_SIZE, generator, device, progress=bar,
                             step=mixture_step, precision=cfg.PRECISION)
    mix.alpha.requires_grad_(True)


def candidate_logits(mix, x, cfg):
    """(candidates, images, classes) logits of the candidates in evaluation mode, on the mixture's device."""
    return torch.stack([training.predict(net, x, cfg.EVAL_BATCH, cfg.PRECISION)
                        for net in mix.candidates]).to(mix.alpha.device)


def train_alpha(mix, val, cfg, device, generator):
    """(ii) ALPHA_EPOCHS of α on the validation split, the candidates frozen in evaluation mode.

    Frozen candidates give the same logits on every pass, so they are computed once; returns them.
    """
    logits, y = candidate_logits(mix, val.x, cfg), val.y.to(device)
    optimizer = make_optimizer(cfg.ALPHA_OPTIMIZER, [mix.alpha], cfg.ALPHA_LR, device)
    for _ in range(cfg.ALPHA_EPOCHS):
        for idx in training.batches(len(y), cfg.BATCH_SIZE, True, generator, device):
            loss = F.cross_entropy(mix.combine(logits[:, idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return logits


def margin(weights, members):
    """softmax(α)'s lead of the first of `members` over the runner-up among them; 0 without a runner-up, where
    α has no choice to make."""
    top = sorted((weights[i] for i in members), reverse=True)
    return top[0] - top[1] if len(top) > 1 else 0.0


def eligible_members(logits, y, cfg):
    """The members that may win a round, by their validation AUROC (threshold-free: a member alone can sit at
    the majority class while it ranks the images well, because the mixture sums the members' logits and their
    offsets need not each be right), and those AUROCs."""
    auroc = [training.classification_metrics(member, y)["auroc"] for member in logits]
    return [i for i, a in enumerate(auroc) if a >= cfg.MIN_MEMBER_AUROC], auroc


def alternate(mix, train, val, cfg, device, generator, bar=None):
    """(i) then (ii) until α is decided among the members that may win (its argmax over them held over two
    alternations with a lead of at least ALPHA_MARGIN) or MAX_ALTERNATIONS is reached.

    Returns softmax(α) before and after every alternation, whether α decided, the last val logits, the members
    that may win and every member's validation AUROC.
    """
    trajectory, y, choices = [mix.softmax_alpha().cpu().tolist()], val.y.to(device), []
    while True:
        train_weights(mix, train, cfg, device, generator, bar)
        logits = train_alpha(mix, val, cfg, device, generator)
        trajectory.append(mix.softmax_alpha().cpu().tolist())
        eligible, auroc = eligible_members(logits, y.to(logits.device), cfg)
        choices.append(max(eligible, key=lambda i: trajectory[-1][i]) if eligible else None)
        held = len(choices) > 1 and choices[-1] is not None and choices[-1] == choices[-2]
        decided = held and margin(trajectory[-1], eligible) >= cfg.ALPHA_MARGIN
        if decided or len(trajectory) > cfg.MAX_ALTERNATIONS:
            return trajectory, decided, logits, eligible, auroc


def run_round(candidates, train, val, num_classes, cfg, device, seed, bar=None):
    """One round on fresh weights: the α trajectory, validation accuracies and the winner's index: argmax α
    when α decided, else the member with the best validation accuracy (the incumbent among equals), both over
    the members that reach MIN_MEMBER_AUROC (`excluded` lists the others)."""
    networks = []
    for genotype in candidates:
        torch.manual_seed(seed)  # an architecture starts from the same weights wherever it sits in the round
        networks.append(build_network(genotype, num_classes))
    mix = FuseMixture(networks).to(device)
    trajectory, decided, logits, eligible, auroc = alternate(mix, train, val, cfg, device,
                                                             torch.Generator().manual_seed(seed), bar)
    y = val.y.to(logits.device)
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == y).float().mean(-1).mul(100).tolist()
        mixture = float((mix.combine(logits).argmax(-1) == y).float().mean().mul(100))
    by_alpha, by_accuracy = int(np.argmax(trajectory[-1])), int(np.argmax(accuracy))  # the first of equals
    excluded = [i for i in range(len(candidates)) if i not in eligible]
    if not eligible:
        winner, rule = 0, f"incumbent (no member reached AUROC {cfg.MIN_MEMBER_AUROC})"
    elif decided:
        winner, rule = max(eligible, key=lambda i: trajectory[-1][i]), "alpha"
    else:
        winner, rule = max(eligible, key=lambda i: accuracy[i]), "validation accuracy (alpha undecided)"
    return dict(candidates=[g.to_json() for g in candidates], alpha=trajectory,
                alternations=len(trajectory) - 1, decided=decided,
                margin=margin(trajectory[-1], eligible),
                val_accuracy=accuracy, val_auroc=auroc, mixture_val_accuracy=mixture, argmax_alpha=by_alpha,
                best_val_accuracy=by_accuracy, excluded=excluded, winner=winner, decided_by=rule)


# ----------------------------------------------------------------------------- a FUSE search
@dataclass(frozen=True)
class Search:
    """One FUSE search: a task, its space, the first incumbent, the rounds and where they are saved."""
    task: str
    space_name: str
    space: tuple
    first: Genotype
    rounds: int
    folder: Path
    data_id: str  # fingerprint of the task's data, labels and split
    num_classes: int

    def identity(self, cfg):
        return store.plain(dict(pick(cfg, SEARCH_KEYS), task=self.task, data=self.data_id, space_name=self.space_name,
                          space=self.space, first=self.first.to_json()))


def round_candidates(search, r, incumbent, cfg):
    """The incumbent and CANDIDATES-1 distinct new genotypes, from this round's own generator."""
    rng = random.Random(f"{cfg.SEED}/{search.task}/{search.space_name}/{r}")
    return [incumbent] + sample_distinct(search.space, rng, cfg.CANDIDATES - 1, [incumbent],
                                         cfg.NODES, cfg.C, cfg.N)


def search_round(search, r, incumbent, train, val, cfg, device, save, log):
    """Run round r and save it, with the config and incumbent it started from."""
    candidates = round_candidates(search, r, incumbent, cfg)
    start = time.perf_counter()
    with tqdm(total=cfg.MAX_ALTERNATIONS * cfg.W_EPOCHS * len(train.x), desc=f"round {r}", unit="img",
              leave=False, mininterval=1) as bar:
        result = run_round(candidates, train, val, search.num_classes, cfg, device,
                           seed_of(cfg.SEED, search.task, search.space_name, r), bar)
    record = dict(config=round_config(search, r, incumbent, cfg), round=r, task=search.task,
                  space=search.space_name, **result, seconds=time.perf_counter() - start,
                  device=device_label(device))
    save(search.folder / f"round_{r:02d}.json", record)
    log.info("%s (%s) round %d: α %s after %d alternation(s) (%s, lead %.3f), val accuracy %s (AUROC %s), "
             "mixture %.2f %%; winner %s (%s)%s, %.1f s", search.task, search.space_name, r,
             [round(a, 4) for a in record["alpha"][-1]], record["alternations"],
             "decided" if record["decided"] else "undecided: best validation accuracy", record["margin"],
             [round(a, 2) for a in record["val_accuracy"]], [round(a, 4) for a in record["val_auroc"]],
             record["mixture_val_accuracy"], "/".join(candidates[record["winner"]].ops), record["decided_by"],
             f"; members {record['excluded']} below AUROC {cfg.MIN_MEMBER_AUROC} cannot win" if record["excluded"]
             else "", record["seconds"])
    return record


def round_config(search, r, incumbent, cfg):
    return dict(search.identity(cfg), round=r, incumbent=incumbent.to_json())


def saved_rounds(folder, log=None):
    """The round files of a search folder (name -> content), read by the driver for the unit that resumes it."""
    return {path.name: store.read_saved(path, log) for path in sorted(Path(folder).glob("round_*.json"))}


def fuse_search(search, train, val, saved, cfg, device, save, log):
    """FUSE for search.rounds rounds on the training and validation splits (the test split never
    comes in). A round of `saved` (saved_rounds) made with the same config and incumbent is reused, so a killed
    search resumes after its last finished round and ends as an uninterrupted one would; each new round goes to
    save(path, record) as soon as it ends."""
    incumbent, records = search.first, []
    for r in tqdm(range(1, search.rounds + 1), desc=f"FUSE {search.task} ({search.space_name})", unit="round"):
        name = f"round_{r:02d}.json"
        record = saved.get(name)
        if not store.made_with(record, round_config(search, r, incumbent, cfg)):
            record = search_round(search, r, incumbent, train, val, cfg, device, save, log)
        incumbent = read_genotype(record["candidates"][record["winner"]], search.folder / name)
        records.append(record)
    result = dict(task=search.task, space=search.space_name, genotype=incumbent.to_json(),
                  config=dict(search.identity(cfg), rounds=search.rounds),
                  seconds=sum(r["seconds"] for r in records),
                  device=", ".join(sorted({r["device"] for r in records})),
                  decided_rounds=sum(r["decided"] for r in records),
                  alpha_agrees_with_val=sum(r["argmax_alpha"] == r["best_val_accuracy"] for r in records),
                  rounds=records)
    log.info("%s (%s): α decided %d of %d rounds; argmax α was the best validation accuracy in %d", search.task,
             search.space_name, result["decided_rounds"], len(records), result["alpha_agrees_with_val"])
    return result


def search_unit(search, tasks, saved, cfg, device, save, log):
    """A unit: a FUSE search on its task's training (its first SEARCH_LIMIT images) and validation splits."""
    data = tasks[search.task]
    return fuse_search(search, limit(data.train, cfg.SEARCH_LIMIT), data.val, saved, cfg, device, save, log)


def write_search(search, result):
    """A finished search's result.json and α plot, written by the driver."""
    store.write_json(search.folder / "result.json", result)
    reporting.plot_alpha(result["rounds"], search.folder / "alpha.png",
                         f"FUSE on {search.task}, {search.space_name} space")


def standard_search(name, data, rounds, folder, cfg):
    """A search in the standard space, from a sampled first incumbent."""
    space = standard_space(cfg.NODES)
    first = sample_genotype(space, random.Random(f"{cfg.SEED}/{name}/standard/0"), cfg.NODES, cfg.C, cfg.N)
    return Search(name, "standard", space, first, rounds, Path(folder), data.fingerprint, data.task.num_classes)


# ----------------------------------------------------------------------------- the task-aware space
def prune_command(cfg, targets):
    listed = ", ".join(f"'{t}'" for t in dict.fromkeys([*targets, cfg.TARGET]))
    distance = " --DISTANCE=fisher" if cfg.DISTANCE == "fisher" else ""
    return (f"python prune_transform.py --TARGETS=\"[{listed}]\" --PRESET={cfg.PRESET} "
            f"--DATA_DIR={cfg.DATA_DIR} --CKPT_DIR={cfg.CKPT_DIR}{distance}")


def closest_tasks(cfg, data, log):
    """The K base tasks closest to TARGET, from step 2's closest list of DISTANCE, after checking that
    step 2 measured them on this target's data, split and seed."""
    path = Path(cfg.CKPT_DIR) / "distances" / CLOSEST_FILES[cfg.DISTANCE]
    payload = store.read_saved(path, log)
    if payload is None:
        raise UserError(f"no task distances: {path} is missing; measure them with: {prune_command(cfg, [])}")
    closest = payload.get("closest", {})
    if not closest.get(cfg.TARGET):
        raise UserError(f"{path} has no distances to target {cfg.TARGET!r} (only to "
                        f"{', '.join(closest) or 'no target'}); measure them with: "
                        f"{prune_command(cfg, list(closest))}")
    made = payload.get("config", {})
    for name in ("SEED", "VAL_FRACTION", "PRECISION"):
        if made.get(name) != getattr(cfg, name):
            raise UserError(f"{path} was made with {name}={made.get(name)!r}, this run has "
                            f"{name}={getattr(cfg, name)!r}; remake it with: {prune_command(cfg, list(closest))} "
                            f"--{name}={getattr(cfg, name)!r}")
    if payload.get("data", {}).get(cfg.TARGET) != data.fingerprint:
        raise UserError(f"{path} measured {cfg.TARGET!r} on other data, labels or split than "
                        f"{data.source}; remake it with: {prune_command(cfg, list(closest))}")
    ranked = closest[cfg.TARGET]
    if len(ranked) < cfg.K:
        raise UserError(f"{path} ranks {len(ranked)} base task(s) for {cfg.TARGET!r} but K={cfg.K}: "
                        "lower K or measure more SOURCES with prune_transform.py")
    return ranked[:cfg.K]


def dictionary_entry(task, data, cfg, log):
    """A base task's (genotype, search seconds) from search/dictionary/<task>.json when it was searched with this
    config (or written by hand, without a config); else (None, the Search to run: FUSE in the standard space for
    BASE_ROUNDS rounds, saved there by write_dictionary)."""
    path = dictionary_path(cfg, task)
    search = standard_search(task, data, cfg.BASE_ROUNDS, path.with_suffix(""), cfg)
    entry = store.read_saved(path, log)
    if entry is not None:
        genotype = read_genotype(entry.get("genotype") if isinstance(entry, dict) else entry, path)
        if genotype.nodes != cfg.NODES:
            raise UserError(f"{path}: a cell of {genotype.nodes} nodes, but NODES={cfg.NODES}; "
                            "fix the file, delete it, or set NODES to match")
        if "config" not in entry:
            log.info("%s: genotype %s given by hand in %s", task, "/".join(genotype.ops), path)
            return genotype, float("nan")
        if store.made_with(entry, dict(search.identity(cfg), rounds=cfg.BASE_ROUNDS)):
            return genotype, entry["seconds"]
        log.info("%s: %s was searched with another config, searching again", task, path)
    return None, search


def dictionary_path(cfg, task):
    return Path(cfg.CKPT_DIR) / "search" / "dictionary" / f"{task}.json"


def write_dictionary(search, result, cfg):
    store.write_json(dictionary_path(cfg, search.task), dict(task=search.task, genotype=result["genotype"],
                     config=dict(search.identity(cfg), rounds=cfg.BASE_ROUNDS), seconds=result["seconds"],
                     device=result["device"]))


def task_aware_search(data, ranked, found, folder, cfg, log):
    """The target's search in the space of its closest base tasks' genotypes (found: task -> (genotype, seconds)),
    from the closest one's; with the dictionary's search seconds."""
    genotypes = [found[r["task"]][0] for r in ranked]
    space = task_aware_space(genotypes)
    log.info("task-aware space of %s from %s: %s (%d genotypes)", cfg.TARGET,
             ", ".join(f"{reporting.closest_label(r, '.3g')}: {'/'.join(g.ops)}" for r, g in zip(ranked, genotypes)),
             " | ".join("/".join(edge) for edge in space), space_size(space))
    first = Genotype(genotypes[0].ops, cfg.NODES, cfg.C, cfg.N)
    search = Search(cfg.TARGET, "task_aware", space, first, cfg.ROUNDS, Path(folder), data.fingerprint,
                    data.task.num_classes)
    return search, sum(found[r["task"]][1] for r in ranked)


# ----------------------------------------------------------------------------- random search
def random_trial(genotype, epochs, seed, train, val, num_classes, cfg, device):
    """Train one candidate alone from fresh weights; its validation accuracy."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    net = build_network(genotype, num_classes).to(device)
    optimizer = make_optimizer(cfg.W_OPTIMIZER, net.parameters(), cfg.W_LR, device)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        training.train_epoch(net, optimizer, train.x, train.y, cfg.BATCH_SIZE, generator, device,
                             precision=cfg.PRECISION)
    logits = training.predict(net, val.x, cfg.EVAL_BATCH, cfg.PRECISION)
    accuracy = float((logits.argmax(1) == val.y).float().mean() * 100)
    return dict(genotype=genotype.to_json(), epochs=epochs, val_accuracy=accuracy,
                seconds=time.perf_counter() - start, device=device_label(device))


def random_search(tasks, target, standard, saved, path, cfg, device, save, log):
    """A unit: random search in the standard space on FUSE's budget: as many candidate trainings as the
    standard-space FUSE search made, each as many weight epochs as a candidate had in that round;
    the best by validation accuracy wins. Trials are saved one by one (saved: the file so far), so a rerun
    resumes."""
    data = tasks[target]
    budgets = [r["alternations"] * cfg.W_EPOCHS for r in standard["rounds"] for _ in r["candidates"]]
    rng = random.Random(f"{cfg.SEED}/{data.name}/random")
    genotypes = sample_distinct(standard_space(cfg.NODES), rng, len(budgets), (), cfg.NODES, cfg.C, cfg.N)
    config = store.plain(dict(pick(cfg, SEARCH_KEYS), task=data.name, data=data.fingerprint, budgets=budgets))
    trials = saved["trials"] if store.made_with(saved, config) else []
    train = limit(data.train, cfg.SEARCH_LIMIT)
    for i in tqdm(range(len(trials), len(genotypes)), desc=f"random search {data.name}", unit="trial"):
        seed = seed_of(cfg.SEED, data.name, "random", i)
        trials.append(random_trial(genotypes[i], budgets[i], seed, train, data.val,
                                   data.task.num_classes, cfg, device))
        save(path, dict(config=config, trials=trials))
    best = max(trials, key=lambda t: t["val_accuracy"])  # the first of equals
    log.info("random search on %s: %d trials, best %s (val accuracy %.2f %%)", data.name, len(trials),
             "/".join(best["genotype"]["ops"]), best["val_accuracy"])
    return dict(genotype=best["genotype"], seconds=sum(t["seconds"] for t in trials),
                device=", ".join(sorted({t["device"] for t in trials})))


# ----------------------------------------------------------------------------- comparison rows
def budget(row, cfg):
    """(epochs, training images; 0 = all) a row is retrained with."""
    return (cfg.REDUCED_EPOCHS, cfg.REDUCED_LIMIT) if row in cfg.REDUCED_ROWS else (cfg.FINAL_EPOCHS, cfg.FINAL_LIMIT)


def retrain(build, data, epochs, images, cfg, device, seed, label):
    """A fresh network trained `epochs` on the training split (its first `images`) with Adam; its test metrics
    and the indices of the test images it gets wrong (the test split is read once, here; the validation split
    is not scored: nothing reads it, and on full data it would add 60 % to DenseNet-161's evaluation)."""
    torch.manual_seed(seed)
    model = build().to(device)
    training.fit(model, limit(data.train, images), epochs, cfg.BATCH_SIZE, cfg.FINAL_LR, seed, device, label,
                 cfg.PRECISION)
    test = data.test
    logits, labels = training.predict(model, test.x, cfg.EVAL_BATCH, cfg.PRECISION), test.y
    metrics = {f"test_{k}": v for k, v in training.classification_metrics(logits, labels).items()}
    wrong = torch.nonzero(logits.argmax(1) != labels).flatten().tolist()
    return model, metrics, dict(test_images=len(labels), test_wrong=wrong)


def row_config(row, data, searches, cfg):
    search = searches.get(ROW_SEARCH.get(row))
    epochs, images = budget(row, cfg)
    return dict(pick(cfg, FINAL_KEYS), row=row, task=data.name, data=data.fingerprint, epochs=epochs, images=images,
                genotype=search["genotype"] if search else None)


def retrain_unit(config, seed, tasks, cfg, device):
    """A unit: a row's network retrained from scratch with one FINAL_SEEDS seed and scored on the test split; its
    record and, for a searched network, its checkpoint."""
    data, start = tasks[config["task"]], time.perf_counter()
    genotype = Genotype.from_json(config["genotype"]) if config["genotype"] else None
    classes = data.task.num_classes
    build = (lambda: build_network(genotype, classes)) if genotype else (lambda: build_baseline(config["row"], classes))
    threads = torch.get_num_threads()
    torch.set_num_threads(threads if genotype else ALL_THREADS)  # large convolutions use every core
    try:
        model, metrics, errors = retrain(build, data, config["epochs"], config["images"], cfg, device,
                                         seed_of(cfg.SEED, "final", seed), f"{config['row']} seed {seed}")
    finally:
        torch.set_num_threads(threads)
    run = dict(config=dict(config, seed=seed), metrics=metrics, **errors, params=count_parameters(model),
               seconds=time.perf_counter() - start, device=device_label(device))
    state = genotype and {"genotype": config["genotype"], "config": run["config"], "metrics": metrics,
                          "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}
    return run, state


def row_record(row, config, runs, out, cfg, log):
    record = dict(row=row, config=config, seeds=list(cfg.FINAL_SEEDS), params=runs[0]["params"],
                  runs=[r["metrics"] for r in runs], test_images=runs[0]["test_images"],
                  test_wrong=[r["test_wrong"] for r in runs], seconds=sum(r["seconds"] for r in runs),
                  device=", ".join(sorted({r["device"] for r in runs})))
    store.write_json(out / "rows" / f"{row}.json", record)
    errors = [m["test_error"] for m in record["runs"]]
    log.info("%s: test error %.2f %% over %d seed(s) (balanced %.2f %%, AUROC %.4f), %.3f M parameters, %.1f s",
             row, np.mean(errors), len(errors), np.mean([m["test_balanced_error"] for m in record["runs"]]),
             np.mean([m["test_auroc"] for m in record["runs"]]), record["params"] / 1e6, record["seconds"])
    return record



# ----------------------------------------------------------------------------- plots

def write_table(records, searches, out, cfg, log):
    reference = records.get("fuse_task_aware")
    table = pd.DataFrame([reporting.table_row(row, record, searches.get(ROW_SEARCH.get(row)), reference)
                          for row, record in records.items()])
    text = reporting.write_frame(table, out / "table")
    reporting.plot_error_params(table, out / "error_vs_params.png", cfg.TARGET)
    log.info("comparison on %s (test split; %s/table.csv, table.md):\n%s", cfg.TARGET, out, text)
    return table


def search_summary(ranked, searches, out, cfg, log):
    """searches.csv / .md: one line per search the target used (its closest base tasks' dictionary searches, then
    its own): rounds, how many α decided, how often argmax α was the member with the best validation accuracy
    and with the best validation AUROC, minutes (one-thread units) and the genotype found."""
    def line(label, rounds, genotype, seconds):  # rounds None: a search without rounds (random search)
        def count(agrees):
            return math.nan if rounds is None else sum(map(agrees, rounds))
        return {"search": label, "rounds": count(lambda r: True), "decided": count(lambda r: r["decided"]),
                "alpha_is_best_val_accuracy": count(lambda r: r["argmax_alpha"] == int(np.argmax(r["val_accuracy"]))),
                "alpha_is_best_val_auroc": count(lambda r: r["argmax_alpha"] == int(np.argmax(r["val_auroc"]))),
                "minutes": seconds / 60, "genotype": " / ".join(genotype["ops"])}
    lines = []
    for r in ranked or []:
        path = dictionary_path(cfg, r["task"])
        entry, folder = store.read_saved(path), path.with_suffix("")
        rounds = [store.read_saved(folder / f"round_{k:02d}.json") for k in range(1, cfg.BASE_ROUNDS + 1)]
        if entry and "config" in entry and all(rounds):  # not for a genotype given by hand
            lines.append(line(f"dictionary: {r['task']}", rounds, entry["genotype"], entry["seconds"]))
    for key in [k for k in ROW_SEARCH.values() if k in searches]:
        result = searches[key]
        if key == "random":
            trials = len(store.read_saved(out / "random.json")["trials"])
            lines.append(line(f"random search ({trials} trials)", None, result["genotype"], result["seconds"]))
        else:
            label = f"{key.replace('_', '-')} space"
            lines.append(line(label, result["rounds"], result["genotype"], result["seconds"]))
    table = pd.DataFrame(lines)
    text = reporting.write_frame(table, out / "searches")
    log.info("searches for %s (%s/searches.csv, searches.md):\n%s", cfg.TARGET, out, text)
    return table


# ----------------------------------------------------------------------------- main
def needed_spaces(cfg):
    """The target's searches: SPACE's, those of the FUSE rows, and the standard one random search mirrors."""
    spaces = [cfg.SPACE] + [ROW_SEARCH[r] for r in cfg.ROWS if r.startswith("fuse_")]
    return list(dict.fromkeys(spaces + (["standard"] if "random" in cfg.ROWS else [])))


class TargetUnits:
    """The target's searches and the rows' retrainings (one unit per FINAL_SEEDS seed) as one set of units, each
    submitted as soon as what it needs has ended: at once the base tasks' searches that the task-aware space lacks
    from the dictionary, the standard search and the reference CNNs; the task-aware search once those base tasks
    have their genotypes, random search once the standard search has ended, a searched row once its search has. So
    no worker idles while a unit that others do not need is pending. A seed retrained earlier with the same config
    is reused. Each unit's follow-up (`then`) runs in the driver when it ends: it writes the unit's files and
    submits the units that waited for it."""

    def __init__(self, ex, tasks, data, ranked, out, cfg, log):
        self.ex, self.tasks, self.data, self.ranked = ex, tasks, data, ranked
        self.out, self.cfg, self.log = out, cfg, log
        self.target = data[cfg.TARGET]
        self.found, self.searches, self.runs, self.configs, self.then, self.jobs = {}, {}, {}, {}, {}, []

    def run(self):
        """Run every unit; the searches' results and the rows' records (rows/<row>.json)."""
        cfg, spaces = self.cfg, needed_spaces(self.cfg)
        for r in self.ranked if "task_aware" in spaces else []:
            genotype, entry = dictionary_entry(r["task"], self.data[r["task"]], cfg, self.log)
            if genotype is None:
                self.start_search("dictionary", entry, functools.partial(self.dictionary_searched, entry))
            else:
                self.base_task_ready(r["task"], genotype, entry)
        if "standard" in spaces:
            search = standard_search(cfg.TARGET, self.target, cfg.ROUNDS, self.out / "standard", cfg)
            self.start_search("standard", search, functools.partial(self.searched, "standard"))
        for row in cfg.ROWS:  # after the searches, whose units others wait for
            if row not in ROW_SEARCH:
                self.retrain_row(row)
        self.ex.run(self.jobs, "units", lambda name, result: self.then.pop(name)(result))

        headline = self.searches[cfg.SPACE]
        store.write_json(self.out / "genotype.json",
                         {k: headline[k] for k in ("task", "space", "genotype", "config", "seconds")})
        self.log.info("%s: searched genotype in the %s space: %s", cfg.TARGET, cfg.SPACE,
                      "/".join(headline["genotype"]["ops"]))
        return self.searches, {row: row_record(row, self.configs[row], [self.runs[row, s] for s in cfg.FINAL_SEEDS],
                                               self.out, cfg, self.log) for row in cfg.ROWS}

    def submit(self, name, then, fn, *args):
        self.then[name] = then
        self.jobs.append(self.ex.submit(name, fn, *args))

    def start_search(self, key, search, then):
        def ended(result):
            write_search(search, result)
            then(result)
        self.submit(f"{search.task} ({key})", ended, search_unit, search, self.tasks,
                    saved_rounds(search.folder, self.log), self.cfg, self.ex.device, self.ex.save, self.ex.log)

    def dictionary_searched(self, search, result):
        write_dictionary(search, result, self.cfg)
        self.base_task_ready(search.task, Genotype.from_json(result["genotype"]), result["seconds"])

    def base_task_ready(self, task, genotype, seconds):
        self.found[task] = genotype, seconds
        if len(self.found) == len(self.ranked):
            aware, dictionary_seconds = task_aware_search(self.target, self.ranked, self.found,
                                                          self.out / "task_aware", self.cfg, self.log)
            self.start_search("task_aware", aware,
                              lambda r: self.searched("task_aware", dict(r, dictionary_seconds=dictionary_seconds)))

    def searched(self, key, result):
        self.searches[key] = result
        for row in self.cfg.ROWS:
            if ROW_SEARCH.get(row) == key:
                self.retrain_row(row)
        if key == "standard" and "random" in self.cfg.ROWS:
            path = self.out / "random.json"
            self.submit("random search", functools.partial(self.searched, "random"), random_search, self.tasks,
                        self.cfg.TARGET, result, store.read_saved(path, self.log), path, self.cfg, self.ex.device,
                        self.ex.save, self.ex.log)

    def retrain_row(self, row):
        self.configs[row] = config = row_config(row, self.target, self.searches, self.cfg)
        for s in self.cfg.FINAL_SEEDS:
            self.runs[row, s] = store.load_current(self.out / "rows" / f"{row}_seed{s}.json", dict(config, seed=s),
                                                   self.log)
            if self.runs[row, s] is None:
                self.submit(f"{row} seed {s}", functools.partial(self.retrained, row, s), retrain_unit, config, s,
                            self.tasks, self.cfg, self.ex.device)
            else:
                self.log.info("%s seed %d: retrained earlier with the same config, reused", row, s)

    def retrained(self, row, s, result):
        run, state = result
        if state:
            store.save_checkpoint(state, self.out / "rows" / f"{row}_seed{s}.pt")
        store.write_json(self.out / "rows" / f"{row}_seed{s}.json", run)
        self.runs[row, s] = run


def main(argv=None):
    cfg, device, log = configuration.start_script("model_FUSE", globals(), argv, check_config)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # same seed, same genotypes
    configuration.warn_paper_on_cpu(cfg, device, log, "days: one FUSE round at C = 64, N = 3 on the full data is "
                                    "about 10 h at a 2-core CPU's matmul peak, and every search runs 10 rounds")
    out = Path(cfg.CKPT_DIR) / "search" / cfg.TARGET
    start = time.perf_counter()
    with configuration.stage(log, "data"):
        data = {cfg.TARGET: utils.load_task(cfg.TARGET, **configuration.data_options(cfg), log=log)}
    ranked = closest_tasks(cfg, data[cfg.TARGET], log) if "task_aware" in needed_spaces(cfg) else None  # fails first
    data.update({r["task"]: utils.load_task(r["task"], **configuration.data_options(cfg), log=log)
                 for r in ranked or []})
    with executor.start(cfg, device, log) as ex:
        tasks = ex.share(lambda: data)  # one copy of the images for every unit
        with configuration.stage(log, "searches and rows"):
            searches, records = TargetUnits(ex, tasks, data, ranked, out, cfg, log).run()
    search_summary(ranked, searches, out, cfg, log)
    table = write_table(records, searches, out, cfg, log) if records else None
    log.info("total wall-clock %.1f s", time.perf_counter() - start)
    return table


if __name__ == "__main__":
    import model_FUSE  # run the importable module, whose units Ray's workers can import too
    configuration.run(model_FUSE.main)
