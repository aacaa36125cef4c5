"""Step 2: task distances from pruned transfer networks, the distance matrix and its heatmap.

python prune_transform.py [--NAME=value ...]; reads step 1's CKPT_DIR/tasks/<task>.pt and writes
CKPT_DIR/distances/: pairs/<source>__<target>.json (distance and pruning curve of each pair),
transfer/<source>__<target>.pt (the pruned transfer net), matrix.csv (rows source, columns target),
matrix_measured.csv (with the measured self-transfers on the diagonal), heatmap.png,
pruning_curves.png and closest.json (for each target, the sources sorted by distance).
"""
import json
import time
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.utils import prune
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import train_task  # noqa: E402
import utils  # noqa: E402
from models import BaseCNN, TransferNet  # noqa: E402

PRESET = "quick"         # smoke | quick | paper (utils.PRESETS); a preset overrides the constants below
DATA_DIR = "data"        # must hold the data step 1 trained on (checked by fingerprint)
CKPT_DIR = "checkpoints"
DEVICE = "auto"          # auto = cuda, then mps, then cpu
SEED = 0                 # seeds the split (as in step 1) and the transfer nets
DOWNLOAD = False         # fetch missing datasets into DATA_DIR (needs internet)
SOURCES = list(utils.DICTIONARY)                          # base tasks A of d(A -> B)
TARGETS = utils.DICTIONARY + [utils.HELD_OUT_TARGET]      # tasks B, on whose data each pair is measured
VAL_FRACTION = 0.1       # as in step 1: the split must be the one the networks were trained on
TRAIN_LIMIT = 0          # train transfer nets on at most this many of B's training images (0 = all)
EVAL_LIMIT = 0           # measure on at most this many of B's validation images (0 = all)
TRANSFER_EPOCHS = 10     # paper: MSE, Adam, lr 1e-3, batch 200, 10 epochs
TRANSFER_BATCH = 200
TRANSFER_LR = 1e-3
PRUNE_STEP = 0.05        # share of the weights removed per pruning step (the paper's 5 % grid)
MAX_SPARSITY = 0.95      # the last pruning level tried
FINETUNE_EPOCHS = 10     # MSE epochs after each pruning step (released helper: 10)
EPSILON = 1.0            # accuracy points a pruned net may lose against the reference
REFERENCE = "target"     # "target": B's own network's accuracy (the paper's L_B >= 1 - eps);
                         # "transfer": the unpruned transfer net's accuracy
K_CLOSEST = 3            # closest base tasks reported per target
EVAL_BATCH = 4096        # rows per forward pass when extracting features (speed only)


def load_network(name, data, cfg, device):
    """Step 1's network of a task, after checking it was trained on this data, split and model."""
    path = train_task.checkpoint_path(cfg.CKPT_DIR, name)
    rerun = (f"python train_task.py --TASKS=\"['{name}']\" --PRESET={cfg.PRESET} "
             f"--DATA_DIR={cfg.DATA_DIR} --CKPT_DIR={cfg.CKPT_DIR} --SEED={cfg.SEED} "
             f"--VAL_FRACTION={cfg.VAL_FRACTION}")
    ckpt = utils.load_checkpoint(path)
    if ckpt is None:
        raise utils.UserError(f"no step-1 network for task {name!r} ({path} is missing or unreadable); "
                        f"make it with: {rerun}")
    if ckpt.get("data_fingerprint") != data.fingerprint:
        raise utils.UserError(f"{path} was trained on other data, labels or split than {data.source} with "
                        f"VAL_FRACTION={cfg.VAL_FRACTION}, SEED={cfg.SEED}; retrain it with: {rerun}")
    model = BaseCNN(data.task.num_classes)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as e:
        raise utils.UserError(f"{path} does not hold the base CNN of models/base_cnn.py ({e}); "
                        f"retrain it with: {rerun}")
    return model.to(device).eval(), utils.fingerprint(ckpt["config"], ckpt["data_fingerprint"])


class FeatureCache:
    """Encoder features of every network on one dataset's images, each extracted once.

    Features stay float32 exactly as the encoder gives them, for the same images in the same order.
    """

    def __init__(self, batch):
        self.batch, self.dataset, self.store = batch, None, {}

    def get(self, network, encoder, data):
        if data.task.dataset != self.dataset:  # a new dataset: the old features are not needed again
            self.dataset, self.store = data.task.dataset, {}
        if network not in self.store:
            self.store[network] = tuple(utils.predict(encoder, split.x, self.batch)
                                        for split in (data.train, data.val))
        return self.store[network]


def kept_percent(net):
    """Share of the transfer net's parameters (weights and biases) that are non-zero, in %."""
    layers = net.weight_layers()
    nonzero = sum(int((m.weight != 0).sum() + (m.bias != 0).sum()) for m in layers)
    return 100 * nonzero / sum(m.weight.numel() + m.bias.numel() for m in layers)


def fit(net, optimizer, x, y, epochs, batch, generator, device):
    for _ in range(epochs):
        utils.train_epoch(net, optimizer, x, y, batch, generator, device, loss_fn=F.mse_loss)


@torch.inference_mode()
def score(net, head, x, target_features, labels):
    """Accuracy (%) of the target's head on transferred features, and the features' MSE."""
    net.eval()
    out = net(x)
    accuracy = 100 * float((head(out).argmax(1) == labels).float().mean())
    return accuracy, float(F.mse_loss(out, target_features))


def effective_state(net):
    """The transfer net's weights as its layers apply them (pruned entries zero), in plain keys."""
    return {f"{name}.{p}": getattr(m, p).detach().cpu().clone()
            for name, m in net.named_children() if hasattr(m, "weight") for p in ("weight", "bias")}


def measure_pair(source_feats, target_feats, head, labels, cfg, device, bar=None):
    """Train a transfer net from source to target features, prune it step by step, return the result.

    source_feats / target_feats: (train, val) features of the same target images; labels: the
    target's validation labels; head: the target network's head. Returns the result and the
    state of the sparsest transfer net that kept performance (None if even the unpruned one lost it).
    """
    (xs, xs_val), (xt, xt_val) = [(a.to(device), b.to(device)) for a, b in (source_feats, target_feats)]
    labels = labels.to(device)
    utils.set_seed(cfg.SEED)
    generator = torch.Generator().manual_seed(cfg.SEED)
    net = TransferNet().to(device)
    optimizer = utils.adam(net.parameters(), cfg.TRANSFER_LR, device)
    fit(net, optimizer, xs, xt, cfg.TRANSFER_EPOCHS, cfg.TRANSFER_BATCH, generator, device)
    accuracy, mse = score(net, head, xs_val, xt_val, labels)
    own = score(torch.nn.Identity(), head, xt_val, xt_val, labels)[0]  # the target network itself
    threshold = (accuracy if cfg.REFERENCE == "transfer" else own) - cfg.EPSILON
    curve = [dict(sparsity=0.0, kept=kept_percent(net), accuracy=accuracy, mse=mse)]
    kept, state = 100.0, None  # even the whole transfer net falls short: the farthest distance
    if accuracy >= threshold:
        kept, state = curve[0]["kept"], effective_state(net)
        layers = [(m, "weight") for m in net.weight_layers()]
        n_weights = sum(m.weight.numel() for m, _ in layers)
        pruned = 0
        for level in range(1, int(cfg.MAX_SPARSITY / cfg.PRUNE_STEP + 1e-9) + 1):
            sparsity = level * cfg.PRUNE_STEP
            amount = round(sparsity * n_weights) - pruned  # prune counts among the weights still left
            prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=amount)
            pruned += amount
            # fine-tuning continues the training's Adam (state included): a fresh optimizer's first
            # steps (RMSprop: about 10 x lr per weight) undo more than a short fine-tuning repairs
            fit(net, optimizer, xs, xt, cfg.FINETUNE_EPOCHS, cfg.TRANSFER_BATCH, generator, device)
            accuracy, mse = score(net, head, xs_val, xt_val, labels)
            curve.append(dict(sparsity=sparsity, kept=kept_percent(net), accuracy=accuracy, mse=mse))
            if bar is not None:
                bar.update()
                bar.set_postfix(sparsity=f"{sparsity:.2f}", acc=f"{accuracy:.2f}")
            if accuracy < threshold:  # the first level that loses performance ends the sweep
                break
            kept, state = curve[-1]["kept"], effective_state(net)
    return dict(distance=kept, own_accuracy=own, threshold=threshold,
                unpruned_accuracy=curve[0]["accuracy"], unpruned_mse=curve[0]["mse"], curve=curve), state


def pair_name(source, target):
    return f"{source}__{target}"


def plot_heatmap(matrix, path, title):
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 0.75 * matrix.shape[1]), max(3.0, 1.0 + 0.6 * matrix.shape[0])))
    image = ax.imshow(matrix.to_numpy(dtype=float), cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(matrix.shape[1]), matrix.columns, rotation=45, ha="right")
    ax.set_yticks(range(matrix.shape[0]), matrix.index)
    for (i, j), value in np.ndenumerate(matrix.to_numpy(dtype=float)):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if value < 60 else "black")
    ax.set_xlabel("target task B")
    ax.set_ylabel("source task A")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="d(A → B): % of transfer-net parameters kept")
    fig.tight_layout()
    utils.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight"))
    plt.close(fig)


def plot_curves(results, targets, path):
    cols = min(4, len(targets))
    rows = -(-len(targets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, target in zip(axes.flat, targets):
        for r in (r for r in results if r["target"] == target):
            curve = pd.DataFrame(r["curve"])
            ax.plot(curve["kept"], curve["accuracy"], marker=".", label=r["source"])
        ax.set_title(f"target {target}")
        ax.invert_xaxis()
        ax.set_xlabel("% of parameters kept")
        ax.set_ylabel("accuracy on validation (%)")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(targets):]:
        ax.axis("off")
    fig.tight_layout()
    utils.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def main(argv=None):
    cfg = utils.configure(globals(), argv)
    if cfg.REFERENCE not in ("target", "transfer"):
        raise utils.UserError(f"REFERENCE={cfg.REFERENCE!r}: use 'target' or 'transfer'")
    device = utils.get_device(cfg.DEVICE)
    log = utils.start_run("prune_transform", cfg, device)
    out = Path(cfg.CKPT_DIR) / "distances"
    start = time.perf_counter()
    # check every network before any work, so a missing one fails at once and writes nothing
    data = {name: utils.load_task(name, cfg, log) for name in dict.fromkeys(cfg.SOURCES + cfg.TARGETS)}
    networks = {name: load_network(name, data[name], cfg, device) for name in data}
    config = utils.result_config(cfg, ("K_CLOSEST",))  # K only changes the report
    cache = FeatureCache(cfg.EVAL_BATCH)
    targets = sorted(cfg.TARGETS, key=lambda t: data[t].task.dataset)  # one dataset's features at a time
    results = []
    with tqdm(total=len(cfg.SOURCES) * len(targets), desc="pairs", unit="pair") as overall:
        for target in targets:
            t_net, t_id = networks[target]
            for source in cfg.SOURCES:
                s_net, s_id = networks[source]
                path = out / "pairs" / f"{pair_name(source, target)}.json"
                pair_config = dict(config, source=source, target=target, source_net=s_id, target_net=t_id)
                old = json.loads(path.read_text()) if path.exists() else None
                if old and old["config"] == pair_config:
                    results.append(old)
                    overall.update()
                    continue
                tick = time.perf_counter()
                feats = [cache.get(n, net.encoder, data[target]) for n, net in ((source, s_net), (target, t_net))]
                extract = time.perf_counter() - tick
                with tqdm(desc=f"{source} → {target}", leave=False) as bar:
                    result, state = measure_pair(*feats, t_net.head, data[target].val.y, cfg, device, bar)
                result = dict(source=source, target=target, config=pair_config,
                              measured_distance=result["distance"], **result,
                              seconds=time.perf_counter() - tick, extract_seconds=extract,
                              device=str(device))
                if source == target:
                    result["distance"] = 0.0  # the paper's convention; the measurement stays as calibration
                if state is not None:
                    utils.save_checkpoint(state, out / "transfer" / f"{pair_name(source, target)}.pt")
                utils.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
                log.info("d(%s → %s) = %.2f (accuracy: unpruned transfer %.2f, target network %.2f), %.1f s",
                         source, target, result["distance"], result["unpruned_accuracy"],
                         result["own_accuracy"], result["seconds"])
                results.append(result)
                overall.update()
    write_outputs(results, cfg, out, log)
    log.info("total wall-clock %.1f s", time.perf_counter() - start)
    return results


def write_outputs(results, cfg, out, log):
    frame = pd.DataFrame(results)
    order = dict(index=list(cfg.SOURCES), columns=list(cfg.TARGETS))
    matrix = frame.pivot(index="source", columns="target", values="distance").reindex(**order)
    measured = frame.pivot(index="source", columns="target", values="measured_distance").reindex(**order)
    for name, table in (("matrix.csv", matrix), ("matrix_measured.csv", measured)):
        utils.atomic_write(out / name, lambda tmp: table.to_csv(tmp, float_format="%.4f"))
    plot_heatmap(matrix, out / "heatmap.png", "Task distance d(source → target)")
    plot_curves(results, list(cfg.TARGETS), out / "pruning_curves.png")
    # ties (e.g. several sources at 100) go to the better unpruned transfer
    ranked = frame[frame.source != frame.target].assign(neg_accuracy=lambda f: -f.unpruned_accuracy)
    ranked = ranked.sort_values(["target", "distance", "neg_accuracy"], kind="stable")
    closest = {t: [dict(task=r.source, distance=float(r.distance), unpruned_accuracy=float(r.unpruned_accuracy))
                   for r in ranked[ranked.target == t].itertuples()] for t in cfg.TARGETS}
    payload = dict(config=utils.result_config(cfg), k=cfg.K_CLOSEST, closest=closest)
    utils.atomic_write(out / "closest.json", lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))
    log.info("distance matrix, rows = source A, columns = target B (%s):\n%s", out / "matrix.csv",
             matrix.to_string(float_format="{:.2f}".format))
    for t, ranked in closest.items():
        log.info("closest to %s: %s", t, ", ".join(f"{r['task']} ({r['distance']:.2f})"
                                                    for r in ranked[:cfg.K_CLOSEST]))


if __name__ == "__main__":
    utils.run(main)
