"""Step 2: one (source, target) pair, ours against the naive way, phase by phase.

python benchmarks/bench_step2.py [--size=smoke|full] [--limit=N] [--val-limit=N] [--epochs=E]
                                 [--finetune-epochs=F] [--repeats=R]
Phases: feature extraction (both networks on the target's training and validation images), training
the transfer net (--epochs), the pruning sweep (every level of PRUNE_LEVELS, each pruned one-shot from
the trained net, fine-tuned --finetune-epochs and scored; the tolerance is disabled so that both ways
run the same levels).
Ours, in each --precision: prune_transform.feature_unit (training.predict under inference_mode), train_transfer and Sweep.
Naive: encoder features by a DataLoader of per-image ToTensor batches of 64 under no_grad, kept as
NumPy arrays; then a per-sample Dataset over those arrays, DataLoader(batch_size=200, shuffle=True),
plain Adam, the same TransferNet, and torch's L1Unstructured global pruning at every level.
Writes <out>/step2.csv: median seconds per phase, the ratio, FLOP/s against the roofline, and the
time per unit projected to the paper's budget for one pair on the full split (whole sweep: an upper bound).
"""
import copy
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.utils import prune

import common
import prune_transform
import utils
from models import BaseCNN, TransferNet

SOURCE, TARGET = "mnist0", "mnist1"  # the pair's networks are freshly initialised: weights do not change the time
SIZES = {"smoke": dict(limit=64, val_limit=32, epochs=1, finetune_epochs=1, repeats=1),
         "full": dict(limit=10_000, val_limit=2_000, epochs=1, finetune_epochs=0, repeats=3)}
EXTRACT_BATCH = 64  # the naive extraction's batch, as in training


def arguments(argv):
    p = common.parser(__doc__.splitlines()[0], SIZES)
    p.add_argument("--limit", type=int, help="training images of the target (features to map)")
    p.add_argument("--val-limit", type=int, help="validation images of the target (scoring)")
    p.add_argument("--epochs", type=int, help="transfer-net training epochs (the paper: 10)")
    p.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs per pruning level (released code: 10)")
    return common.parse(p, argv)


def load_pair(args):
    """The target's training and validation splits, and the two networks."""
    if args.smoke:
        train, val = common.synthetic_split(args.limit), common.synthetic_split(args.val_limit, seed=1)
    else:
        common.require_full_data(args.data, utils.get_task(TARGET).dataset)
        data = utils.load_task(TARGET, args.data)
        train = utils.Split(data.train.x[:args.limit], data.train.y[:args.limit])
        val = utils.Split(data.val.x[:args.val_limit], data.val.y[:args.val_limit])
    networks = {}
    for seed, name in enumerate((SOURCE, TARGET)):
        torch.manual_seed(seed)
        networks[name] = BaseCNN(2).to(args.device).eval()
    return SimpleNamespace(task=utils.get_task(TARGET), train=train, val=val), networks


def pair_config(args, *extra):
    levels = ["--PRUNE_LEVELS=[0.5, 0.9]"] if args.smoke else []
    return common.script_config(prune_transform, args.data, f"--TRANSFER_EPOCHS={args.epochs}",
                                f"--FINETUNE_EPOCHS={args.finetune_epochs}", *levels, *extra)


def levels(cfg):
    """Pruning levels of a whole sweep."""
    return len(cfg.PRUNE_LEVELS)


# ----------------------------------------------------------------------------- ours
def ours_extract(data, networks, cfg):
    return [prune_transform.feature_unit(net.encoder, (data.train.x, data.val.x), cfg.EVAL_BATCH, cfg.PRECISION,
                                         cfg.FEATURES, next(net.parameters()).device) for net in networks.values()]


def make_pair(data, networks, feats, cfg, device):
    return prune_transform.make_pair(*feats, networks[TARGET].head, data.train.y, data.val.y, device)


def ours_phases(data, networks, feats, args, precision):
    """Each phase through the step's own code in a PRECISION: training alone, then the sweep of the trained net
    alone (tolerance out of reach: every level is measured)."""
    cfg = pair_config(args, f"--PRECISION={precision}")
    sweep_cfg = pair_config(args, f"--PRECISION={precision}", "--TOLERANCE=1e9", "--REFINE=0.0")
    pair = make_pair(data, networks, feats, cfg, args.device)
    net, optimizer, generator, _ = prune_transform.train_transfer(pair, cfg, args.device)
    return {"extract": lambda: ours_extract(data, networks, cfg),
            "train": lambda: prune_transform.train_transfer(pair, cfg, args.device),
            "sweep": lambda: prune_transform.Sweep(net, optimizer, generator, pair, sweep_cfg, args.device).run()}


# ----------------------------------------------------------------------------- naive
class ArrayDataset(torch.utils.data.Dataset):
    """Per-sample access to NumPy arrays, the usual wrapper of saved features."""

    def __init__(self, *arrays):
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays[0])

    def __getitem__(self, i):
        return tuple(torch.from_numpy(np.asarray(a[i])) for a in self.arrays)


def naive_extract(loaders, networks, device):
    """Each encoder's features on each split, batch by batch under no_grad, into NumPy arrays."""
    feats = []
    for net in networks.values():
        net.eval()
        with torch.no_grad():
            feats.append([np.concatenate([net.encoder(xb.to(device)).cpu().numpy() for xb, _ in loader])
                          for loader in loaders])
    return feats


def naive_fit(net, optimizer, loader, epochs, device):
    for _ in range(epochs):
        common.naive_epoch(net, optimizer, loader, F.mse_loss, device)


def naive_score(net, head, loader, device):
    """Accuracy (%) of the target's head on the transferred validation features."""
    net.eval()
    correct = 0
    with torch.no_grad():
        for xs, _, y in loader:
            correct += (head(net(xs.to(device))).argmax(1).cpu() == y).sum().item()
    return 100 * correct / len(loader.dataset)


def naive_train(loaders, head, cfg, device):
    torch.manual_seed(cfg.TRANSFER_SEED)
    net = TransferNet().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.LR)
    naive_fit(net, optimizer, loaders[0], cfg.TRANSFER_EPOCHS, device)
    naive_score(net, head, loaders[1], device)
    return net, optimizer


def naive_sweep(trained, loaders, head, cfg, device):
    """The same schedule: every level pruned from the trained net with torch's global L1Unstructured,
    fine-tuned by a copy of the training's optimizer, and scored."""
    for sparsity in cfg.PRUNE_LEVELS:
        net = copy.deepcopy(trained[0])
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.LR)
        optimizer.load_state_dict(trained[1].state_dict())
        layers = [(m, "weight") for m in net.weight_layers()]
        amount = round(sparsity * sum(m.weight.numel() for m, _ in layers))
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=amount)
        naive_fit(net, optimizer, loaders[0], cfg.FINETUNE_EPOCHS, device)
        naive_score(net, head, loaders[1], device)


def naive_phases(data, networks, feats, args):
    cfg = pair_config(args)
    images = [torch.utils.data.DataLoader(common.NaiveImages(s), batch_size=EXTRACT_BATCH)
              for s in (data.train, data.val)]
    pair = make_pair(data, networks, feats, cfg, torch.device("cpu"))
    loaders = (torch.utils.data.DataLoader(ArrayDataset(pair.x.numpy(), pair.y.numpy()), batch_size=cfg.BATCH_SIZE,
                                           shuffle=True),
               torch.utils.data.DataLoader(ArrayDataset(pair.x_val.numpy(), pair.y_val.numpy(), data.val.y.numpy()),
                                           batch_size=cfg.BATCH_SIZE))
    head = lambda out: networks[TARGET].head(pair.readout(out))
    trained = naive_train(loaders, head, cfg, args.device)
    return {"extract": lambda: naive_extract(images, networks, args.device),
            "train": lambda: naive_train(loaders, head, cfg, args.device),
            "sweep": lambda: naive_sweep(trained, loaders, head, cfg, args.device)}


# ----------------------------------------------------------------------------- report
def units(cfg, n_train, n_val):
    """Work of each phase: images through an encoder; transfer-net training samples; and for the sweep,
    fine-tuning samples plus scored validation samples (their FLOP, below, tell them apart)."""
    return {"extract": 2 * (n_train + n_val), "train": n_train * cfg.TRANSFER_EPOCHS,
            "sweep": levels(cfg) * (n_train * cfg.FINETUNE_EPOCHS + n_val)}


def flop_per_unit(cfg, n_train, n_val):
    """FLOP of one unit of each phase: an encoder forward; a transfer-net training step (its forward,
    the weight gradients, and the input gradients of every layer but the first: features need none);
    in the sweep, the mix of fine-tuning steps and forward passes."""
    layers = TransferNet().weight_layers()
    forward = sum(2 * m.weight.numel() for m in layers)          # one sample
    train = 3 * forward - 2 * layers[0].weight.numel()
    encoder = common.base_cnn_forward_flop() - 2 * 1024 * 2      # without the head
    tuned = n_train * cfg.FINETUNE_EPOCHS
    return {"extract": encoder, "train": train, "sweep": (tuned * train + n_val * forward) / (tuned + n_val)}


def rows(seconds, args, data, peaks, variants):
    measured = units(pair_config(args), len(data.train.x), len(data.val.x))
    paper = units(common.script_config(prune_transform, args.data), common.PAPER_TRAIN, common.PAPER_VAL)
    flop = flop_per_unit(pair_config(args), len(data.train.x), len(data.val.x))
    out = []
    for phase, times in seconds.items():
        for variant, s in times.items():
            out.append(dict(phase=phase, variant=variant, units=measured[phase], median_s=s,
                            us_per_unit=1e6 * s / measured[phase], speedup_vs_naive=times["naive"] / s,
                            paper_units=paper[phase], projected_paper_s=s / measured[phase] * paper[phase],
                            **common.share(flop[phase] * measured[phase], s, peaks[variants[variant]]),
                            **common.context(args.device, peaks[variants[variant]], precision=variants[variant])))
    return out


def total_rows(table):
    """One row per variant summing the phases (measured and projected)."""
    sums = table.groupby("variant", sort=False)[["median_s", "projected_paper_s"]].sum()
    return [dict(phase="total", variant=v, median_s=r.median_s, projected_paper_s=r.projected_paper_s,
                 speedup_vs_naive=sums.at["naive", "median_s"] / r.median_s) for v, r in sums.iterrows()]


def main(argv=None):
    args = arguments(argv)
    precisions, peaks = common.precisions(args)
    variants = common.variants(precisions)
    data, networks = load_pair(args)
    feats = ours_extract(data, networks, pair_config(args))
    runs = {v: naive_phases(data, networks, feats, args) if v == "naive" else ours_phases(data, networks, feats, args, p)
            for v, p in variants.items()}
    seconds = {phase: common.alternate({v: run[phase] for v, run in runs.items()}, args.repeats, args.device,
                                      warmup=not args.smoke)
               for phase in runs["naive"]}
    table = rows(seconds, args, data, peaks, variants)
    return common.save(table + total_rows(pd.DataFrame(table)), "step2", args.out)


if __name__ == "__main__":
    main()
