"""Step 2: task distances from pruned transfer networks, the distance matrix and its heatmap.

python prune_transform.py [--NAME=value ...]; reads step 1's CKPT_DIR/tasks/<task>.pt and writes
CKPT_DIR/distances/: pairs/<source>__<target>.json (distance, feasibility and pruning curve of each
pair), transfer/<source>__<target>.pt (the sparsest transfer net that kept performance), matrix.csv
(rows source, columns target; infeasible pairs empty), networks.csv (the step-1 networks behind them: metrics
and a hash of the weights), matrix_measured.csv (with the measured
self-transfers on the diagonal), heatmap.png, pruning_curves.png and closest.json (for each target,
the sources sorted by distance, infeasible ones last).
With DISTANCE = "fisher" or "both" it writes the Fisher task distance beside it: fisher/<source>__<target>.json,
fisher_matrix.csv, fisher_heatmap.png, fisher_closest.json, and with both distances agreement.csv (per target,
the rank correlation of the two and the overlap of their K closest).
"""
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.colors import Normalize
from torch.nn.utils import prune
from tqdm import tqdm

import configuration
import executor
import fisher
import reporting
import store
import train_task
import training
import utils
from configuration import UserError
from models import TransferNet

PRESET = ""               # "" = the constants below as written; or a name from PRESETS (paper, smoke)
DATA_DIR = "data"         # must hold the data step 1 trained on (checked by fingerprint)
CKPT_DIR = "checkpoints"
DEVICE = "auto"           # auto = cuda, then mps, then cpu
SEED = 0                  # seeds the split: as in step 1
TRANSFER_SEED = 0         # seeds the transfer nets' weights and batch order
DOWNLOAD = False          # fetch missing datasets into DATA_DIR (needs internet)
SOURCES = list(utils.DICTIONARY)                          # base tasks A of d(A -> B): the dictionary
TARGETS = [utils.HELD_OUT_TARGET]  # tasks B, on whose data each pair is measured (paper preset: the
                          # dictionary too, the 10 x 11 matrix: about half an hour on the bundled sample)
VAL_FRACTION = 0.1        # as in step 1: the split must be the one the networks were trained on
TRAIN_LIMIT = 0           # train transfer nets on at most this many of B's training images (0 = all)
EVAL_LIMIT = 0            # measure on at most this many of B's validation images (0 = all)
FEATURES = "standardized" # what the transfer net maps: "standardized" (each feature centred and scaled by
                          # its spread on B's training images; outputs scaled back for B's head), "raw"
                          # encoder outputs, or "uint8" (the released code's cast: integer part / 255)
TRANSFER_EPOCHS = 10      # paper: MSE, Adam, lr 1e-3, batch 200, 10 epochs
BATCH_SIZE = 200
LR = 1e-3
LR_SCHEDULE = "cosine"    # cosine: decays to 0 over the training, so it ends at a settled net; constant: the
                          # released code's (its last step can land on a spike: docs/interpretations.md)
PERFORMANCE = "auroc"     # what "keeps performance" means, from B's own head on the transferred features: auroc
                          # (a fraction: blind to the majority class and to a pruned net's calibration shift; graded,
                          # valid and stable in the distance study, with the widest margins: results/distance_study) |
                          # balanced_accuracy | accuracy (in %); or "probe": the balanced accuracy of a linear
                          # classifier trained afresh on them (the released code's check)
PROBE_EPOCHS = 10         # training of that fresh probe (released code: 50)
FEASIBILITY = "2eps"      # a pair is infeasible when its unpruned transfer performs below 1 - 2 eps ("2eps": the
                          # target network may lose eps and the transfer another eps) or 1 - eps ("eps"), eps the
                          # dictionary's: the largest validation error (in PERFORMANCE) of its base networks; "none"
TOLERANCE = 0.002         # performance (PERFORMANCE's units: 1 point of accuracy is 1.0) a pruned transfer may lose
                          # against the unpruned one ...
STOP = "relative"         # ... ("relative", the authors' README: pruning "without decreasing the performance"), or
                          # "level": a pruned transfer must stay at the feasibility level (the definition's
                          # L_B(N_t o N_A) >= 1 - eps, one bar for the whole dictionary; TOLERANCE unused)
SCHEDULE = "oneshot"      # oneshot: every level pruned from the dense trained net; iterative: from the level before
FINETUNE_EPOCHS = 1       # MSE epochs after pruning, at every level, continuing the training's Adam with its lr
                          # restarted at LR under LR_SCHEDULE (cosine: back to 0, so every level ends settled as the
                          # training did; at a constant lr, one batch order against another moved the balanced
                          # accuracy of one level by up to 5.6 points); released helper: 10, a fresh RMSprop.
                          # 0 measures the pruned net as it is
SEARCH = "bisect"         # which levels are fine-tuned and measured: "bisect" (search for the crossing, performance
                          # taken to fall with sparsity) or "all" (the whole curve, for studies of the stopping rule;
                          # without fine-tuning every level is measured anyway)
PRUNE_LEVELS = [round(0.05 * k, 2) for k in range(1, 20)] + [0.975, 0.99, 0.995, 0.998, 0.999]  # shares of
                          # the weights pruned: the paper's 5 % grid, then on towards 1 in 1,000 weights kept
REFINE = 0.02             # bisect the crossing until the kept shares of the last passing and the first failing
                          # level differ by at most this factor minus 1 (0 = off); it must be finer than the 5 %
                          # grid everywhere (40 -> 35 % kept is only 14 %), or pairs tie on grid points
DISTANCE = "transfer"     # which task distance: "transfer" (the paper's pruned transfer net), "fisher" (the Fisher
                          # task distance of the authors' follow-up, fisher.py; in [0, 1]) or "both" (and their rank
                          # agreement)
FISHER_SAMPLES = 1000     # target training images whose per-sample gradients make each Fisher diagonal
FISHER_PARAMS = "all"     # "all" parameters, or "last": the last weight layer before the head and the head
K = 3                     # closest base tasks reported per target
PRECISION = "fp32"        # fp32 | bf16: forward passes under torch.autocast (weights, masks, metrics stay fp32)
THREADS = 0               # CPU threads (0 = torch's default); two runs of one thread each train about 1.4 x
                          # faster together than one of two (speed only; the last bits of results may differ)
EVAL_BATCH = 1024         # rows per forward pass when extracting features (speed only: 4096 was no faster and raised
                          # step 2's peak memory by 0.4 GB)
EXECUTOR = "local"        # where the units (a pair, a network's features on a dataset) run: "local" (here, one after
                          # another) or "ray"
RAY_ADDRESS = ""          # with "ray": "" starts Ray on this machine; else a cluster's address (docs/scaling-out.md)
CPUS_PER_UNIT = 1         # with "ray": CPU threads of each unit ...
GPUS_PER_UNIT = 0         # ... and its GPUs (1 on a GPU machine: one unit per GPU)

# named sets of constants (--PRESET=name); precedence: the constants above < the preset < --NAME=value
PRESETS = {
    "paper": dict(TRAIN_LIMIT=0, EVAL_LIMIT=0, TRANSFER_EPOCHS=10, BATCH_SIZE=200, LR=1e-3,
                  TARGETS=utils.DICTIONARY + [utils.HELD_OUT_TARGET]),
    "smoke": dict(TRAIN_LIMIT=400, EVAL_LIMIT=200, TRANSFER_EPOCHS=2, PRUNE_LEVELS=[0.5, 0.9, 0.99], REFINE=0.0),
}

# not settings (configure reads the block above): what a saved pair or Fisher pair depends on (reused while these
# match), the valid values of the constants that take a name, and the cost a paper-preset run on a CPU announces
PAIR_KEYS = frozenset({"SEED", "VAL_FRACTION", "TRAIN_LIMIT", "EVAL_LIMIT", "FEATURES", "TRANSFER_EPOCHS", "BATCH_SIZE",
                       "LR", "LR_SCHEDULE", "TRANSFER_SEED", "PERFORMANCE", "PROBE_EPOCHS", "TOLERANCE", "STOP",
                       "SCHEDULE", "FINETUNE_EPOCHS", "SEARCH", "PRUNE_LEVELS", "REFINE", "PRECISION"})
FISHER_KEYS = frozenset({"SEED", "VAL_FRACTION", "TRAIN_LIMIT", "FISHER_SAMPLES", "FISHER_PARAMS", "PRECISION"})
CHOICES = {"FEATURES": ("standardized", "raw", "uint8"), "LR_SCHEDULE": ("constant", "cosine"),
           "PERFORMANCE": ("balanced_accuracy", "accuracy", "auroc", "probe"), "FEASIBILITY": ("2eps", "eps", "none"),
           "STOP": ("relative", "level"), "SCHEDULE": ("oneshot", "iterative"), "SEARCH": ("bisect", "all"),
           "PRECISION": training.PRECISIONS, "DISTANCE": ("transfer", "fisher", "both"),
           "FISHER_PARAMS": ("all", "last")}
CPU_MINUTES_PER_PAIR = 4  # a full-data pair: 2,700 training steps and its pruning sweep, 2 threads (docs/performance.md)


def check_config(cfg):
    executor.check_config(cfg)
    for name, valid in CHOICES.items():
        if getattr(cfg, name) not in valid:
            raise UserError(f"{name}={getattr(cfg, name)!r}: use one of {', '.join(valid)}")
    if cfg.PERFORMANCE == "auroc" and cfg.TOLERANCE >= 0.5:
        raise UserError(f"TOLERANCE={cfg.TOLERANCE} with PERFORMANCE='auroc': the AUROC is a fraction (0.5 = "
                        "chance); give what it may lose, e.g. --TOLERANCE=0.002")
    if cfg.STOP == "level" and cfg.FEASIBILITY == "none":
        raise UserError("STOP='level' stops at the feasibility level: set FEASIBILITY to '2eps' or 'eps'")
    levels = list(cfg.PRUNE_LEVELS)
    if not levels or levels != sorted(set(levels)) or not (0 < levels[0] and levels[-1] < 1):
        raise UserError(f"PRUNE_LEVELS={levels}: give increasing shares of the weights between 0 and 1")


# ----------------------------------------------------------------------------- inputs
def load_network(name, data, cfg, device):
    """Step 1's network of a task, checked against this data and split; with its checkpoint."""
    path = train_task.checkpoint_path(cfg.CKPT_DIR, name)
    rerun = (f"python train_task.py --TASKS=\"['{name}']\" --PRESET={cfg.PRESET} "
             f"--DATA_DIR={cfg.DATA_DIR} --CKPT_DIR={cfg.CKPT_DIR} --SEED={cfg.SEED} "
             f"--VAL_FRACTION={cfg.VAL_FRACTION}")
    ckpt = store.read_saved(path)
    if ckpt is None:
        raise UserError(f"no step-1 network for task {name!r} ({path} is missing or unreadable); "
                        f"make it with: {rerun}")
    if ckpt.get("data_fingerprint") != data.fingerprint:
        raise UserError(f"{path} was trained on other data, labels or split than {data.source} with "
                        f"VAL_FRACTION={cfg.VAL_FRACTION}, SEED={cfg.SEED}; retrain it with: {rerun}")
    made = ckpt.get("config", {}).get("PRECISION", "fp32")
    if made != cfg.PRECISION:
        raise UserError(f"{path} was trained with PRECISION={made!r}, this run has PRECISION={cfg.PRECISION!r}; "
                        f"use one precision for every step, or retrain it with: {rerun} "
                        f"--PRECISION={cfg.PRECISION}")
    try:
        model = train_task.network_from(ckpt)
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path} does not hold the base CNN of models/base_cnn.py ({e}); "
                        f"retrain it with: {rerun}")
    return model.to(device).eval(), ckpt


@dataclass
class FeatureSet:
    """One network's features of a dataset's (training, validation) images in their FEATURES form, and the map
    from that form back to the network's feature units."""
    train: torch.Tensor
    val: torch.Tensor
    scale: torch.Tensor | float = 1.0
    shift: torch.Tensor | float = 0.0

    def readout(self, out):
        scale, shift = (t.to(out.device) if torch.is_tensor(t) else t for t in (self.scale, self.shift))
        return out * scale + shift


def feature_unit(encoder, images, batch, precision, mode, device):
    """A unit: an encoder's features of a dataset's (training, validation) images, in their order, under
    FEATURES=mode. Every pair on that dataset reads them as they are, so none makes a copy of its own."""
    encoder = encoder.to(device)
    return encode(*(training.predict(encoder, x, batch, precision) for x in images), mode)


@torch.inference_mode()  # in place: the encoder's outputs are inference tensors, and a copy would need 0.25 GB
def encode(train, val, mode):
    """float32 encoder outputs put in FEATURES=mode's form, in place: "standardized" with the statistics of the
    training images, "uint8" as the released code cast them (numpy astype(uint8): truncation, wrapping past
    255, then / 255), or "raw"."""
    if mode == "standardized":
        mean, std = train.mean(0), train.std(0)
        std = torch.where(std > 0, std, torch.ones_like(std))  # a dead unit stays at 0
        for f in (train, val):
            f.sub_(mean).div_(std)
        return FeatureSet(train, val, std, mean)
    if mode == "uint8":
        for f in (train, val):
            f.floor_().remainder_(256).div_(255)
        return FeatureSet(train, val, 255.0)
    return FeatureSet(train, val)


@dataclass
class Pair:
    """What the transfer net of one (source, target) pair learns from and is judged by."""
    x: torch.Tensor         # inputs: the source encoder's features of B's training images
    y: torch.Tensor         # regression targets: the target encoder's features of the same images
    x_val: torch.Tensor
    y_val: torch.Tensor
    labels: torch.Tensor    # B's labels of the training images (for the probe)
    labels_val: torch.Tensor
    readout: Callable       # transfer-net output -> the target network's feature units
    head: torch.nn.Module   # the target network's head


def make_pair(source, target, head, labels, labels_val, device):
    """The pair's tensors on device, from the source's and the target's FeatureSets of B's images."""
    move = lambda t: t.to(device)  # no copy where they already are
    return Pair(move(source.train), move(target.train), move(source.val), move(target.val), move(labels),
                move(labels_val), target.readout, head)


# ----------------------------------------------------------------------------- training and scoring
def ordered_parameters(net):
    """Weights and biases in one fixed order, before or after pruning re-parametrises the weights."""
    out = []
    for m in net.weight_layers():
        own = dict(m.named_parameters(recurse=False))
        out += [own.get("weight_orig", own.get("weight")), own["bias"]]
    return out


def train_transfer(pair, cfg, device):
    """A transfer net trained from fresh weights (seeded by TRANSFER_SEED) to map x onto y with MSE."""
    configuration.set_seed(cfg.TRANSFER_SEED)
    net = TransferNet().to(device)
    optimizer = training.adam(ordered_parameters(net), cfg.LR, device)
    generator = torch.Generator().manual_seed(cfg.TRANSFER_SEED)
    losses = fit_transfer(net, optimizer, pair, cfg.TRANSFER_EPOCHS, generator, cfg, device)
    return net, optimizer, generator, losses


def fit_transfer(net, optimizer, pair, epochs, generator, cfg, device):
    """`epochs` MSE epochs from x to y, the lr under LR_SCHEDULE from the optimizer's (cosine: to 0 at the
    end); the mean loss of every epoch."""
    step = training.train_step if cfg.LR_SCHEDULE == "constant" else \
        training.cosine_step(optimizer, epochs * math.ceil(len(pair.x) / cfg.BATCH_SIZE))
    return [training.train_epoch(net, optimizer, pair.x, pair.y, cfg.BATCH_SIZE, generator, device,
                                 loss_fn=F.mse_loss, step=step, precision=cfg.PRECISION) for _ in range(epochs)]


@torch.inference_mode()
def transfer(net, x, precision, batch=8192):
    """The transfer net's fp32 outputs on x, in evaluation mode."""
    net.eval()
    with training.autocast(precision, x.device):
        return torch.cat([net(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def probe_performance(net, pair, cfg, device):
    """Balanced accuracy (%) of a linear classifier trained afresh on the transferred training features."""
    train_feats, val_feats = (pair.readout(transfer(net, x, cfg.PRECISION)) for x in (pair.x, pair.x_val))
    torch.manual_seed(cfg.TRANSFER_SEED)
    probe = torch.nn.Linear(train_feats.shape[1], int(pair.labels.max()) + 1).to(device)
    optimizer = training.adam(probe.parameters(), 1e-3, device)
    generator = torch.Generator().manual_seed(cfg.TRANSFER_SEED)
    for _ in range(cfg.PROBE_EPOCHS):
        training.train_epoch(probe, optimizer, train_feats, pair.labels, cfg.BATCH_SIZE, generator, device,
                             precision=cfg.PRECISION)
    logits = training.predict(probe, val_feats, precision=cfg.PRECISION)
    return 100 - training.classification_metrics(logits, pair.labels_val)["balanced_error"]


def evaluate(net, pair, cfg, device):
    """The transfer's performance on B's validation images, with B's own head, and its MSE."""
    out = transfer(net, pair.x_val, cfg.PRECISION)
    with torch.inference_mode():
        scores = training.classification_metrics(pair.head(pair.readout(out)), pair.labels_val)
        mse = float(F.mse_loss(out, pair.y_val))
    point = dict(accuracy=100 - scores["error"], balanced_accuracy=100 - scores["balanced_error"],
                 auroc=scores["auroc"], mse=mse)
    if cfg.PERFORMANCE == "probe":
        point["probe"] = probe_performance(net, pair, cfg, device)
    return point


# ----------------------------------------------------------------------------- pruning
def kept_percent(net):
    """Share of the transfer net's parameters (weights and biases) that are non-zero, in %."""
    layers = net.weight_layers()
    nonzero = sum(int((m.weight != 0).sum() + (m.bias != 0).sum()) for m in layers)
    return 100 * nonzero / sum(m.weight.numel() + m.bias.numel() for m in layers)


def pruned_weights(net):
    return sum(int((m.weight == 0).sum()) for m in net.weight_layers())


def prune_to(net, sparsity):
    """Global magnitude pruning: zero the smallest-magnitude weights of all layers together until
    round(sparsity x all weights) are zero; biases are kept. The mask goes through torch's pruning
    (weight = weight_orig * weight_mask), so fine-tuning leaves pruned weights at zero."""
    layers = net.weight_layers()
    magnitudes = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    k = round(sparsity * len(magnitudes))
    if k <= pruned_weights(net):
        return net
    # the k smallest (the k-th value found in linear time; torch's L1Unstructured sorts with topk)
    threshold = torch.kthvalue(magnitudes.cpu(), k).values.to(magnitudes.device)
    drop = magnitudes < threshold
    ties = torch.nonzero(magnitudes == threshold).flatten()
    drop[ties[:k - int(drop.sum())]] = True
    for m, keep in zip(layers, (~drop).split([m.weight.numel() for m in layers])):
        prune.custom_from_mask(m, "weight", keep.view_as(m.weight))
    return net


def clone(net, optimizer, cfg, device):
    """An independent copy of the net and of its optimizer's state (the copy fine-tunes at LR)."""
    twin = TransferNet().to(device)  # a pruned net cannot be deep-copied: its weight is computed from its mask
    twin.load_state_dict(effective_state(net))
    for mine, theirs in zip(twin.weight_layers(), net.weight_layers()):
        if prune.is_pruned(theirs):
            prune.custom_from_mask(mine, "weight", theirs.weight_mask)
    twin_optimizer = None
    if optimizer is not None:
        twin_optimizer = training.adam(ordered_parameters(twin), cfg.LR, device)
        twin_optimizer.load_state_dict(optimizer.state_dict())
        for group in twin_optimizer.param_groups:
            group["lr"] = cfg.LR
    return twin, twin_optimizer


def effective_state(net):
    """The transfer net's weights as its layers apply them (pruned entries zero), in plain keys."""
    return {f"{name}.{p}": getattr(m, p).detach().cpu().clone()
            for name, m in net.named_children() if hasattr(m, "weight") for p in ("weight", "bias")}


def crossing(curve, key, line):
    """The sparsest level of the unbroken run of levels, from the dense net on, whose performance
    stays at `line` or above (the unpruned transfer's minus TOLERANCE); and the first level that falls below.

    curve: points with "sparsity" and the performance `key`, the unpruned net first (sparsity 0).
    Returns (the passing point, the failing point or None).
    """
    points = sorted(curve, key=lambda p: p["sparsity"])
    last = points[0]
    for point in points[1:]:
        if point[key] < line:
            return last, point
        last = point
    return last, None


class Sweep:
    """The pruning levels of one trained transfer net: each level is pruned, fine-tuned and scored once."""

    def __init__(self, net, optimizer, generator, pair, cfg, device, bar=None, feasibility=None):
        self.dense = (net, optimizer if cfg.FINETUNE_EPOCHS else None)
        self.pair, self.cfg, self.device, self.generator, self.bar = pair, cfg, device, generator, bar
        self.nets = {0.0: self.dense}       # iterative: the fine-tuned net of every passing level
        self.curve = [dict(sparsity=0.0, kept=kept_percent(net), **evaluate(net, pair, cfg, device))]
        # the performance a level must keep: STOP's line
        self.line = feasibility if cfg.STOP == "level" else self.curve[0][cfg.PERFORMANCE] - cfg.TOLERANCE

    def prune_level(self, sparsity, start):
        """Prune to `sparsity` from the dense net (oneshot) or from level `start` (iterative), fine-tune, score."""
        base = self.dense if self.cfg.SCHEDULE == "oneshot" else self.nets[start]
        net, optimizer = clone(*base, self.cfg, self.device)
        prune_to(net, sparsity)
        if self.cfg.FINETUNE_EPOCHS:
            fit_transfer(net, optimizer, self.pair, self.cfg.FINETUNE_EPOCHS, self.generator, self.cfg, self.device)
        point = dict(sparsity=sparsity, kept=kept_percent(net), **evaluate(net, self.pair, self.cfg, self.device))
        self.curve.append(point)
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(sparsity=f"{sparsity:.3f}", perf=f"{point[self.cfg.PERFORMANCE]:.2f}")
        return net, optimizer, point

    def passes(self, point):
        return point[self.cfg.PERFORMANCE] >= self.line

    def run(self):
        """Find the first level that loses performance, then bisect between it and the last passing one.

        Levels that cost no training (FINETUNE_EPOCHS = 0) are all measured: the whole curve, as with
        SEARCH = "all". Otherwise one-shot levels are searched by bisection over PRUNE_LEVELS (performance
        is taken to fall with sparsity) and iterative ones in order. Returns the passing net's state."""
        cfg, levels = self.cfg, list(self.cfg.PRUNE_LEVELS)
        self.passing, self.failing, self.state = 0.0, None, effective_state(self.dense[0])
        if cfg.FINETUNE_EPOCHS == 0 or cfg.SEARCH == "all":
            for sparsity in levels:
                self.try_level(sparsity, record=self.failing is None)
        elif cfg.SCHEDULE == "oneshot":
            low, high = -1, len(levels)  # indices: low passed (-1: the dense net), high failed
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if self.try_level(levels[middle]) else (low, middle)
        else:
            for sparsity in levels:
                if not self.try_level(sparsity):
                    break
        while cfg.REFINE and self.failing is not None and \
                (1 - self.passing) / (1 - self.failing) > 1 + cfg.REFINE + 1e-9:
            self.try_level(round(1 - math.sqrt((1 - self.passing) * (1 - self.failing)), 6))
        self.curve.sort(key=lambda p: p["sparsity"])
        return self.state

    def try_level(self, sparsity, record=True):
        """Measure a level; when `record`, move the last passing or the first failing level to it."""
        net, optimizer, point = self.prune_level(sparsity, self.passing)
        passed = self.passes(point)
        if record and passed and sparsity > self.passing:
            self.passing, self.state = sparsity, effective_state(net)
            self.nets = {sparsity: (net, optimizer)}
        elif record and not passed and (self.failing is None or sparsity < self.failing):
            self.failing = sparsity
        return passed


def measure_pair(source_feats, target_feats, head, labels, labels_val, cfg, device, bar=None, feasibility=None):
    """Train a transfer net from the source's to the target's features, prune it, return the result.

    source_feats / target_feats: the two networks' FeatureSets of the same target images; labels /
    labels_val: the target's labels of them; head: the target network's head; feasibility: the feasibility level
    (STOP = "level" stops there). Returns the result
    and the state of the sparsest transfer net that kept performance.
    """
    pair = make_pair(source_feats, target_feats, head, labels, labels_val, device)
    net, optimizer, generator, losses = train_transfer(pair, cfg, device)
    sweep = Sweep(net, optimizer, generator, pair, cfg, device, bar, feasibility)
    state = sweep.run()
    passing, failing = crossing(sweep.curve, cfg.PERFORMANCE, sweep.line)
    return dict(measured_distance=passing["kept"], crossing_sparsity=passing["sparsity"],
                first_failing_sparsity=None if failing is None else failing["sparsity"],
                unpruned=sweep.curve[0], train_loss=losses[-1] if losses else None,
                curve=sweep.curve), state


def pair_unit(source, target, config, source_feats, target_feats, head, labels, labels_val, cfg, device, feasibility):
    """A unit: measure one pair; its result and the state of its sparsest transfer net that kept performance."""
    tick = time.perf_counter()
    with tqdm(desc=f"{source} → {target}", unit="level", leave=False) as bar:
        result, state = measure_pair(source_feats, target_feats, head.to(device), labels, labels_val, cfg, device,
                                     bar, feasibility)
    return dict(source=source, target=target, config=config, **result, seconds=time.perf_counter() - tick,
                device=str(device)), state


# ----------------------------------------------------------------------------- the matrix
def feasibility_level(metrics, cfg):
    """The level an unpruned transfer must reach, in performance points: 1 - k eps with k = 2 ("2eps") or 1
    ("eps"), eps the dictionary's (every base network is eps-representative: its validation performance is
    at least 1 - eps); None when FEASIBILITY is 'none'."""
    if cfg.FEASIBILITY == "none":
        return None
    k = 2 if cfg.FEASIBILITY == "2eps" else 1
    if cfg.PERFORMANCE == "auroc":
        return 1 - k * max(1 - metrics[s]["val_auroc"] for s in cfg.SOURCES)
    key = "val_error" if cfg.PERFORMANCE == "accuracy" else "val_balanced_error"
    return 100 - k * max(metrics[s][key] for s in cfg.SOURCES)


def decide(result, feasibility, performance):
    """The matrix entry of a measured pair: 0 on the diagonal (the paper's convention), None when the
    unpruned transfer misses the feasibility level, else the measured distance."""
    feasible = feasibility is None or result["unpruned"][performance] >= feasibility
    distance = 0.0 if result["source"] == result["target"] else result["measured_distance"] if feasible else None
    return dict(result, feasible=feasible, feasibility_level=feasibility, distance=distance)


def closeness(distance, unpruned):
    """The sort key of a source for its target, closest first: feasible ones by distance (ties: the better
    unpruned transfer first), then the infeasible ones (distance None) by their unpruned performance."""
    return distance is None, distance or 0.0, -unpruned


def rank_sources(results, target):
    """The decided pairs of a target's sources, closest first (see closeness)."""
    others = [r for r in results if r["target"] == target and r["source"] != target]
    return sorted(others, key=lambda r: closeness(r["distance"] if r["feasible"] else None,
                                                  r["unpruned"][r["config"]["PERFORMANCE"]]))


def pair_name(source, target):
    return f"{source}__{target}"


def network_facts(name, cfg, cache={}):
    """Step 1's network of a task as step 2 records it: the hash of its weights, its data fingerprint and its
    metrics; None without a readable checkpoint. Read once per version of the file (the network is not kept)."""
    path = Path(train_task.checkpoint_path(cfg.CKPT_DIR, name))
    key = (str(path), path.stat().st_mtime_ns if path.exists() else None)
    if key not in cache:
        ckpt = store.read_saved(path)
        cache[key] = None if not ckpt else dict(weights=store.fingerprint(*ckpt["state_dict"].values()),
                                                data=ckpt["data_fingerprint"], **ckpt["metrics"])
    return cache[key]


def network_id(name, cfg):
    """(weights hash, data fingerprint) of a task's step-1 network, or None: a pair is reused only while both of
    its networks are the ones it was measured with."""
    facts = network_facts(name, cfg)
    return None if facts is None else (facts["weights"], facts["data"])


def write_networks(results, cfg, out):
    """networks.csv: every step-1 network behind the pairs (sources and targets), with its metrics and the hash of
    its weights, so that a copied results folder says which networks it was measured with."""
    tasks = dict.fromkeys(name for r in results for name in (r["source"], r["target"]))
    table = pd.DataFrame([dict(task=t, **network_facts(t, cfg)) for t in tasks])
    store.atomic_write(out / "networks.csv", lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))


def pair_config(config, source, target, cfg):
    (s_net, _), (t_net, t_data) = network_id(source, cfg), network_id(target, cfg)
    return dict(config, source=source, target=target, source_net=s_net, target_net=t_net, target_data=t_data)


def each_pair(folder, config, pairs, cfg, log, measure):
    """Every (source, target) of `pairs`' result, in that order: read back from folder/<source>__<target>.json when it
    was saved
    with these settings and networks, else measured by measure(missing), which saves them (missing: their
    (source, target, config), in order; it returns their results in that order). Then the pairs of SOURCES that
    earlier runs saved there for other targets, still valid: they stay in the matrix and in the closest lists."""
    saved, missing = {}, []
    for source, target in pairs:
        here = pair_config(config, source, target, cfg)
        saved[source, target] = store.load_current(folder / f"{pair_name(source, target)}.json", here, log)
        if saved[source, target] is None:
            missing.append((source, target, here))
    measured = dict(zip([(s, t) for s, t, _ in missing], measure(missing) if missing else []))
    results = [saved[pair] or measured[pair] for pair in pairs]
    done = set(pairs)
    for path in sorted(folder.glob("*.json")):
        source, _, target = path.stem.partition("__")
        if source not in cfg.SOURCES or (source, target) in done or target not in utils.TASK_REGISTRY or \
                network_id(source, cfg) is None or network_id(target, cfg) is None:
            continue
        saved = store.load_current(path, pair_config(config, source, target, cfg), log)
        if saved:
            results.append(saved)
    return results


def measured_matrix(frame, cfg, values):
    """Rows SOURCES; columns the targets measured from every source, this run's and earlier runs', in one order
    whichever run wrote them: the dictionary's, then the task registry's."""
    rank = {t: i for i, t in enumerate(dict.fromkeys(utils.DICTIONARY + list(utils.TASK_REGISTRY)))}
    targets = sorted(set(frame.target), key=rank.__getitem__)  # every target is a registered task
    complete = [t for t in targets if set(frame[frame.target == t].source) >= set(cfg.SOURCES)]
    return frame.pivot(index="source", columns="target", values=values).reindex(
        index=list(cfg.SOURCES), columns=complete).astype(float)


def write_closest(path, frame, closest, cfg, **about):
    """A closest list (per target, its sources nearest first) with what step 3 checks it against."""
    data = {t: frame[frame.target == t].iloc[0]["config"]["target_data"] for t in closest}
    store.write_json(path, dict(config=configuration.result_config(cfg, ("K",)), k=cfg.K, **about, data=data,
                                closest=closest))


def tied_at_k(ranked, k):
    """The sources whose distance equals the k-th closest's, when some of them rank past k (the tie-break chose
    which are in the k closest); else []."""
    if len(ranked) <= k or ranked[k - 1]["distance"] is None:
        return []
    same = [r["task"] for r in ranked if r["distance"] is not None
            and round(r["distance"], 4) == round(ranked[k - 1]["distance"], 4)]
    return same if any(r["task"] in same for r in ranked[k:]) else []


def write_outputs(results, cfg, out, log):
    frame = pd.DataFrame(results)
    matrix, measured = (measured_matrix(frame, cfg, values) for values in ("distance", "measured_distance"))
    complete = list(matrix.columns)
    for name, table in (("matrix.csv", matrix), ("matrix_measured.csv", measured)):
        store.atomic_write(out / name, lambda tmp: table.to_csv(tmp, float_format="%.4f"))
    reporting.plot_heatmap(matrix, out / "heatmap.png", "Task distance d(source → target); hatched: infeasible")
    reporting.plot_curves(results, complete, out / "pruning_curves.png", cfg.PERFORMANCE)
    closest = {t: [dict(task=r["source"], distance=r["distance"], feasible=r["feasible"],
                        unpruned_performance=r["unpruned"][cfg.PERFORMANCE]) for r in rank_sources(results, t)]
               for t in complete}
    write_closest(out / "closest.json", frame, closest, cfg, performance=cfg.PERFORMANCE,
                  feasibility_level=results[0]["feasibility_level"] if results else None)
    log.info("distance matrix, rows = source A, columns = target B (%s; empty = infeasible):\n%s",
             out / "matrix.csv", matrix.to_string(float_format="{:.2f}".format))
    for t in complete:
        log.info("closest to %s: %s", t, ", ".join(map(reporting.closest_label, closest[t][:cfg.K])))
        if ties := tied_at_k(closest[t], cfg.K):
            inside = [r["task"] for r in closest[t][:cfg.K] if r["task"] in ties]
            log.warning("%s: %s tie at %.2f (equal at the resolution of REFINE); the better unpruned transfer ranks "
                        "first, so the %d closest take %s", t, ", ".join(ties), closest[t][cfg.K - 1]["distance"],
                        cfg.K, ", ".join(inside))


# ----------------------------------------------------------------------------- the units of a run
def transfer_pairs(network, metrics, data, cfg, out, device, log):
    """Every (source, target) pair's transfer distance: measured now, or read back when it was measured with
    these settings and networks; with the pairs earlier runs measured for other targets."""
    feasibility = feasibility_level(metrics, cfg)
    if feasibility is not None:
        log.info("feasibility: an unpruned transfer must reach %s %.4g (%s, eps of the dictionary's base networks)",
                 cfg.PERFORMANCE.replace("_", " "), feasibility, cfg.FEASIBILITY)
    config = {k: getattr(cfg, k) for k in sorted(PAIR_KEYS)}
    if cfg.STOP == "level":
        config["stop_level"] = round(feasibility, 6)  # the dictionary's networks set it
    datasets = sorted({data[t].task.dataset for t in cfg.TARGETS})  # one dataset's features at a time, in which
    pairs = [(s, t) for d in datasets for s in cfg.SOURCES for t in cfg.TARGETS if data[t].task.dataset == d]
    # one source at a time: its features are extracted once and dropped after its last target

    def done(name, measured):
        result, state = measured
        store.save_checkpoint(state, out / "transfer" / f"{pair_name(result['source'], result['target'])}.pt")
        store.write_json(out / "pairs" / f"{pair_name(result['source'], result['target'])}.json", result)
        log.info("%s: measured %.2f %% kept (unpruned transfer: %s %.2f, MSE %.4f), %.1f s", name,
                 result["measured_distance"], cfg.PERFORMANCE, result["unpruned"][cfg.PERFORMANCE],
                 result["unpruned"]["mse"], result["seconds"])
        return result

    def measure(missing):
        with executor.start(cfg, device, log) as ex:
            return ex.run(pair_units(ex, missing, network, data, cfg, feasibility), "pairs", done)
    return [decide(r, feasibility, cfg.PERFORMANCE) for r in each_pair(out / "pairs", config, pairs, cfg, log, measure)]


def pair_units(ex, missing, network, data, cfg, feasibility):
    """The units that measure the missing pairs, in order. Each network's features on a dataset's images are a
    unit of their own, extracted once and freed when the last pair that reads them is done; the images and
    each encoder are shared, and each target's head is read once."""
    by_dataset = {d.task.dataset: (d.train.x, d.val.x) for d in data.values()}  # every task of a dataset: its images
    images = functools.cache(lambda dataset: ex.share(lambda: by_dataset[dataset]))
    encoder = functools.cache(lambda name: ex.share(lambda: network(name).encoder))
    head = functools.cache(lambda target: network(target).head)

    @functools.cache
    def feats(name, dataset):
        return ex.submit(f"features of {name} on {dataset}", feature_unit, encoder(name), images(dataset),
                         cfg.EVAL_BATCH, cfg.PRECISION, cfg.FEATURES, ex.device)

    return [ex.submit(f"{s} → {t}", pair_unit, s, t, c, feats(s, data[t].task.dataset),
                      feats(t, data[t].task.dataset),
                      head(t), data[t].train.y, data[t].val.y, cfg, ex.device, feasibility) for s, t, c in missing]


def fisher_pairs(network, data, cfg, out, device, log):
    """d_F(source -> target) for every source and target, each saved to fisher/<source>__<target>.json."""
    def done(name, result):
        store.write_json(out / "fisher" / f"{pair_name(result['source'], result['target'])}.json", result)
        log.info("d_F(%s → %s) = %.4f, %.1f s", result["source"], result["target"], result["distance"],
                 result["seconds"])
        return result

    def measure(missing):
        with executor.start(cfg, device, log) as ex:
            tasks, net = ex.share(lambda: data), functools.cache(lambda name: ex.share(network, name))
            own = {t: ex.submit(f"F of {t}", fisher.own_fisher, t, net(t), tasks, cfg, ex.device)  # once per target
                   for t in dict.fromkeys(t for s, t, _ in missing if s != t)}
            jobs = [ex.submit(f"d_F({s} → {t})", fisher.fisher_unit, s, t, c, net(s), tasks, own.get(t), cfg,
                              ex.device)
                    for s, t, c in missing]
            del own, net  # a target's F is held by its pending units only
            return ex.run(jobs, "Fisher pairs", done)

    config = {k: getattr(cfg, k) for k in sorted(FISHER_KEYS)}
    pairs = [(s, t) for t in cfg.TARGETS for s in cfg.SOURCES]
    return each_pair(out / "fisher", config, pairs, cfg, log, measure)


def write_fisher_outputs(results, transfer, cfg, out, log):
    """The Fisher matrix (CSV, heatmap), each target's sources by Fisher distance, and with both distances
    their rank agreement."""
    frame = pd.DataFrame(results)
    matrix = measured_matrix(frame, cfg, "distance")
    store.atomic_write(out / "fisher_matrix.csv", lambda tmp: matrix.to_csv(tmp, float_format="%.4f"))
    reporting.plot_heatmap(matrix, out / "fisher_heatmap.png", "Fisher task distance d_F(source → target)",
                           norm=Normalize(vmin=0.0, vmax=1.0), label="d_F(A → B)", digits=3)
    ranked = {t: matrix[t].drop(t, errors="ignore").sort_values(kind="stable").index for t in matrix.columns}
    closest = {t: [dict(task=s, distance=float(matrix.at[s, t]), feasible=True) for s in sources]
               for t, sources in ranked.items()}
    write_closest(out / "fisher_closest.json", frame, closest, cfg, distance="fisher")
    log.info("Fisher task distance, rows = source A, columns = target B (%s):\n%s", out / "fisher_matrix.csv",
             matrix.to_string(float_format="{:.4f}".format))
    if transfer:
        transfer_matrix = pd.read_csv(out / "matrix.csv", index_col=0)
        table = fisher.agreement(transfer_matrix, matrix, cfg.K)
        store.atomic_write(out / "agreement.csv", lambda tmp: table.to_csv(tmp, index=False, float_format="%.4f"))
        log.info("rank agreement of the two distances per target (%s):\n%s", out / "agreement.csv",
                 table.to_string(index=False, float_format="{:.3f}".format))


# ----------------------------------------------------------------------------- main
def main(argv=None):
    cfg, device, log = configuration.start_script("prune_transform", globals(), argv, check_config)
    pairs = len(cfg.SOURCES) * len(cfg.TARGETS)
    configuration.warn_paper_on_cpu(cfg, device, log, f"about {pairs * CPU_MINUTES_PER_PAIR / 60:.0f} h "
                                    f"({pairs} pairs, {CPU_MINUTES_PER_PAIR} min each on full data)")
    out = Path(cfg.CKPT_DIR) / "distances"
    start = time.perf_counter()
    # check every network before any work, so a missing one fails at once and writes nothing
    data = {name: utils.load_task(name, **configuration.data_options(cfg), log=log)
            for name in dict.fromkeys(cfg.SOURCES + cfg.TARGETS)}
    metrics = {name: load_network(name, data[name], cfg, device)[1]["metrics"] for name in data}
    network = lambda name: load_network(name, data[name], cfg, torch.device("cpu"))[0]  # when needed: 103 MB each
    results, fisher_results = [], []
    if cfg.DISTANCE != "fisher":
        with configuration.stage(log, "transfer distances"):
            results = transfer_pairs(network, metrics, data, cfg, out, device, log)
        write_outputs(results, cfg, out, log)
    if cfg.DISTANCE != "transfer":
        with configuration.stage(log, "Fisher distances"):
            fisher_results = fisher_pairs(network, data, cfg, out, device, log)
        write_fisher_outputs(fisher_results, results, cfg, out, log)
    write_networks(results + fisher_results, cfg, out)
    log.info("total wall-clock %.1f s", time.perf_counter() - start)
    return results


if __name__ == "__main__":
    import prune_transform  # run the importable module, whose units Ray's workers can import too
    configuration.run(prune_transform.main)
