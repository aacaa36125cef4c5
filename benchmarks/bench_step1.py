"""Step 1: training the paper's base CNN (batch 64, Adam 1e-3), our input pipeline against the naive one.

python benchmarks/bench_step1.py [--size=smoke|full] [--batches=N] [--repeats=R]
Ours is what train_task.train_network does per step, in each --precision: shuffled index batches of an in-memory float
tensor (training.batches inside training.train_epoch) and fused Adam (training.adam). The naive way: a Dataset
making a PIL image per sample, ToTensor, DataLoader(batch_size=64, shuffle=True) and torch.optim.Adam.
Writes <out>/step1.csv (images/s, ratio, FLOP/s, share of the roofline, projected epoch) and
<out>/step1_profile.csv (where a batch's time goes).
"""
import contextlib
import time

import torch
import torch.nn.functional as F

import common
import configuration
import training
import utils
from models import BaseCNN

BATCH, LR = 64, 1e-3  # the paper's
SIZES = {"smoke": dict(batches=1, repeats=1), "full": dict(batches=200, repeats=5)}


def arguments(argv):
    p = common.parser(__doc__.splitlines()[0], SIZES)
    p.add_argument("--batches", type=int, help="batches of 64 per timed run (the epoch is extrapolated)")
    return common.parse(p, argv)


def flop_per_image():
    """Training FLOP of one image through BaseCNN: about 3x the forward (backward = 2x forward)."""
    return 3 * common.base_cnn_forward_flop()


def load_images(args):
    """The first batches * 64 images of mnist0's training split (in its shuffled order), and the
    split's size (one epoch)."""
    n = args.batches * BATCH
    if args.smoke:
        return common.synthetic_split(n), common.PAPER_TRAIN
    common.require_full_data(args.data, "mnist")
    train = utils.load_task("mnist0", args.data).train
    return utils.Split(train.x[:n], train.y[:n]), len(train.x)


def fresh_model(device):
    torch.manual_seed(0)
    return BaseCNN(2).to(device)


def ours(train, device, precision):
    """A run of train_task.train_network's epoch loop over the images in a PRECISION; malloc set as
    train_task.py sets it (large freed blocks kept for reuse), so this runs in a common.Worker of its own."""
    configuration.keep_freed_memory()
    model = fresh_model(device)
    optimizer = training.adam(model.parameters(), LR, device)
    generator = torch.Generator().manual_seed(0)
    return lambda: training.train_epoch(model, optimizer, train.x, train.y, BATCH, generator, device, precision=precision)


def naive_loader(train):
    return torch.utils.data.DataLoader(common.NaiveImages(train), batch_size=BATCH, shuffle=True)


def naive(train, device):
    """The usual loop: DataLoader batches moved to the device, the running loss read every batch;
    in the benchmark's own process, with glibc's default malloc."""
    model = fresh_model(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loader = naive_loader(train)
    return lambda: common.naive_epoch(model, optimizer, loader, F.cross_entropy, device)


def profile(batches, model, optimizer, device):
    """Seconds spent in each phase of the training steps over `batches` (an iterable of (x, y));
    data: from the end of a step to the next batch on the device."""
    spent = dict(data=0.0, forward=0.0, backward=0.0, optimizer=0.0)
    model.train()
    start = time.perf_counter()
    for xb, yb in batches:
        xb, yb = xb.to(device), yb.to(device)
        common.sync(device)
        tick = time.perf_counter()
        loss = F.cross_entropy(model(xb), yb)
        common.sync(device)
        spent["data"] += tick - start
        spent["forward"] += time.perf_counter() - tick
        spent["backward"] += common.timed(loss.backward, device)
        spent["optimizer"] += common.timed(lambda: (optimizer.step(), optimizer.zero_grad()), device)
        start = time.perf_counter()
    return spent


def profile_ours(train, device):
    configuration.keep_freed_memory()
    generator = torch.Generator().manual_seed(0)
    model = fresh_model(device)
    batches = ((train.x[i], train.y[i]) for i in training.batches(len(train.x), BATCH, True, generator))
    return lambda: profile(batches, model, training.adam(model.parameters(), LR, device), device)


def profile_naive(train, device):
    model = fresh_model(device)
    return lambda: profile(naive_loader(train), model, torch.optim.Adam(model.parameters(), lr=LR), device)


def profile_rows(train, device, batches):
    rows = []
    with common.Worker(profile_ours, train, device) as ours_profile:
        for variant, run in (("ours", ours_profile), ("naive", profile_naive(train, device))):
            spent = run()
            total = sum(spent.values())
            rows += [dict(variant=variant, phase=phase, ms_per_batch=1000 * s / batches, share_pct=100 * s / total)
                     for phase, s in spent.items()]
    return rows


def rows(seconds, images, epoch_images, args, peaks, variants):
    rate = {v: images / s for v, s in seconds.items()}
    flop = flop_per_image()
    return [dict(variant=v, images=images, repeats=args.repeats, median_s=s, images_per_s=rate[v],
                 speedup_vs_naive=rate[v] / rate["naive"], epoch_images=epoch_images,
                 epoch_s_projected=epoch_images / rate[v], flop_per_image=flop,
                 **common.share(flop * images, s, peaks[variants[v]]),
                 **common.context(args.device, peaks[variants[v]], precision=variants[v]))
            for v, s in seconds.items()]


def main(argv=None):
    args = arguments(argv)
    precisions, peaks = common.precisions(args)
    variants = common.variants(precisions)
    train, epoch_images = load_images(args)
    with contextlib.ExitStack() as stack:
        runs = {v: stack.enter_context(common.Worker(ours, train, args.device, p)) for v, p in variants.items()
                if v != "naive"}
        seconds = common.alternate({**runs, "naive": naive(train, args.device)}, args.repeats, args.device,
                                   warmup=not args.smoke)
    table = common.save(rows(seconds, len(train.x), epoch_images, args, peaks, variants), "step1", args.out)
    common.save(profile_rows(train, args.device, args.batches), "step1_profile", args.out)
    return table


if __name__ == "__main__":
    main()
