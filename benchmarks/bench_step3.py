"""Step 3: one FUSE round, ours against the naive way, with the same candidates and budget.

python benchmarks/bench_step3.py [--size=smoke|full] [--limit=N] [--val-limit=N] [--w-epochs=W]
                                 [--alpha-epochs=A] [--alternations=M] [--repeats=R]
Candidates: fixed genotypes at the paper's size (C=64, N=3, 3 candidates; the smoke preset's at
smoke size). Budget: M alternations of W weight epochs on the training images and A alpha epochs on
the validation images (the paper: 5, 5, 5 on the whole splits); alpha never counts as decided (a lead of 2 is out of reach), so both
ways run all M alternations.
Ours, in each --precision: model_FUSE.run_round (index batches of in-memory tensors, fused Adam, alpha trained on candidate
logits computed once per alternation). Naive: DataLoaders over per-image ToTensor datasets, plain Adam,
every alpha batch running all candidates forward and backward.
Writes <out>/step3.csv: median seconds of the round, the ratio, and the FLOP/s of its weight training
against the roofline.
--compile instead times each candidate's weight steps (batch BATCH_SIZE, Adam) eager and under torch.compile
(--backend: inductor at full size): the first compiled step, which compiles, apart from the median of the --steps after it, and the
steps a network must train before compiling pays (step3_compile.csv). A round compiles every candidate anew:
each genotype is another graph.
--layouts instead times the torchvision rows (ResNet-18, ResNet-34, DenseNet-161) in both memory formats, as
step 3 retrains and scores them: a training step (Adam, --train-batch images) and an evaluation batch (--eval-batch
images), NCHW (torch's default) against channels_last (models/baselines.py's), alternated (step3_layouts.csv).
"""
import functools
import statistics

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import common
import configuration
import model_FUSE
import training
import utils
from models import FuseMixture, Genotype, build_network
from models.baselines import BASELINES, build_baseline

GENOTYPES = (("sep_conv_3x3", "skip_connect", "sep_conv_5x5"),
             ("dil_conv_3x3", "max_pool_3x3", "conv_7x1_1x7"),
             ("skip_connect", "sep_conv_3x3", "avg_pool_3x3"))  # 3-node cells, one op per edge
SIZES = {"smoke": dict(limit=32, val_limit=16, w_epochs=1, alpha_epochs=1, alternations=1, repeats=1, steps=2,
                       backend="eager", train_batch=2, eval_batch=4),  # dynamo's tracing without inductor's minute of code generation
         "full": dict(limit=256, val_limit=128, w_epochs=1, alpha_epochs=5, alternations=1, repeats=3, steps=8,
                      backend="inductor", train_batch=32, eval_batch=200)}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
SEED = 0


def arguments(argv):
    p = common.parser(__doc__.splitlines()[0], SIZES)
    p.add_argument("--limit", type=int, help="training images (weight epochs)")
    p.add_argument("--val-limit", type=int, help="validation images (alpha epochs)")
    p.add_argument("--w-epochs", type=int, help="weight epochs per alternation (the paper: 5)")
    p.add_argument("--alpha-epochs", type=int, help="alpha epochs per alternation (the paper: 5)")
    p.add_argument("--alternations", type=int, help="alternations of the round (the paper: up to 5)")
    p.add_argument("--compile", action="store_true", help="also time the candidates' steps under torch.compile")
    p.add_argument("--steps", type=int, help="timed weight steps per candidate and way (--compile)")
    p.add_argument("--backend", help="torch.compile's backend (--compile)")
    p.add_argument("--layouts", action="store_true", help="time the torchvision rows in both memory formats instead")
    p.add_argument("--train-batch", type=int, help="images per timed training step (--layouts; step 3's BATCH_SIZE: 32)")
    p.add_argument("--eval-batch", type=int, help="images per timed evaluation batch (--layouts)")
    return common.parse(p, argv)


def round_config(args, precision="fp32"):
    return common.script_config(model_FUSE, args.data, f"--PRECISION={precision}", f"--W_EPOCHS={args.w_epochs}",
                                f"--ALPHA_EPOCHS={args.alpha_epochs}", f"--MAX_ALTERNATIONS={args.alternations}",
                                "--ALPHA_MARGIN=2.0", preset="smoke" if args.smoke else "paper")


def load_splits(args, cfg):
    if args.smoke:
        return common.synthetic_split(args.limit), common.synthetic_split(args.val_limit, seed=1)
    target = utils.HELD_OUT_TARGET
    common.require_full_data(args.data, utils.get_task(target).dataset)
    data = utils.load_task(target, **configuration.data_options(cfg))
    return (utils.Split(data.train.x[:args.limit], data.train.y[:args.limit]),
            utils.Split(data.val.x[:args.val_limit], data.val.y[:args.val_limit]))


def candidates(cfg):
    return [Genotype(ops, 3, cfg.C, cfg.N) for ops in GENOTYPES[:cfg.CANDIDATES]]


def mixture(genotypes, device):
    """The round's networks from the same seed, as run_round builds them."""
    networks = []
    for genotype in genotypes:
        torch.manual_seed(SEED)
        networks.append(build_network(genotype, 2))
    return FuseMixture(networks).to(device)


# ----------------------------------------------------------------------------- naive
def naive_step(model, optimizer, xb, yb, device):
    xb, yb = xb.to(device), yb.to(device)
    optimizer.zero_grad()
    loss = F.cross_entropy(model(xb), yb)
    loss.backward()
    optimizer.step()
    return loss.item()


def naive_weights(mix, loader, cfg, device):
    mix.train()
    mix.alpha.requires_grad_(False)
    optimizer = torch.optim.Adam(mix.candidate_parameters(), lr=cfg.W_LR)
    for _ in range(cfg.W_EPOCHS):
        for xb, yb in loader:
            naive_step(mix, optimizer, xb, yb, device)
    mix.alpha.requires_grad_(True)


def naive_alpha(mix, loader, cfg, device):
    mix.eval()
    optimizer = torch.optim.Adam([mix.alpha], lr=cfg.ALPHA_LR)
    for _ in range(cfg.ALPHA_EPOCHS):
        for xb, yb in loader:
            naive_step(mix, optimizer, xb, yb, device)


def naive_accuracy(mix, loader, device):
    """Validation accuracy (%) of every candidate."""
    mix.eval()
    correct = torch.zeros(len(mix.candidates))
    with torch.no_grad():
        for xb, yb in loader:
            logits = torch.stack([net(xb.to(device)) for net in mix.candidates]).cpu()
            correct += (logits.argmax(-1) == yb).sum(-1)
    return (100 * correct / len(loader.dataset)).tolist()


def naive_round(genotypes, loaders, cfg, device):
    mix = mixture(genotypes, device)
    for _ in range(cfg.MAX_ALTERNATIONS):
        naive_weights(mix, loaders[0], cfg, device)
        naive_alpha(mix, loaders[1], cfg, device)
    return naive_accuracy(mix, loaders[1], device)


def naive_loaders(train, val, cfg):
    return tuple(torch.utils.data.DataLoader(common.NaiveImages(split), batch_size=cfg.BATCH_SIZE, shuffle=True)
                 for split in (train, val))


# ----------------------------------------------------------------------------- report
def train_flop_per_image(genotypes, device):
    """FLOP of one training image through the mixture: 3x the forward that torch counts (backward =
    2x forward). torch's counter is not used for the backward: it puts this network's at 10.7x its
    forward, an overcount of the grouped (depthwise) convolutions' gradients."""
    mix = mixture(genotypes, device)
    x = torch.rand(2, 1, 28, 28, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        mix(x)
    return 3 * counter.get_total_flops() / len(x)


def time_round(args, cfg, train, val, variants):
    """Median seconds of the round for each variant, the label of where it ran, and its training FLOP per image;
    with model_FUSE.main's cuDNN settings and THREADS."""
    genotypes, loaders = candidates(cfg), naive_loaders(train, val, cfg)
    runs = {v: functools.partial(model_FUSE.run_round, genotypes, train, val, 2, round_config(args, p), args.device,
                                 SEED) for v, p in variants.items() if v != "naive"}
    runs["naive"] = lambda: naive_round(genotypes, loaders, cfg, args.device)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True), common.threads(cfg.THREADS):
        seconds = common.alternate(runs, args.repeats, args.device, warmup=not args.smoke)
        return seconds, common.device_name(args.device), train_flop_per_image(genotypes, args.device)


def time_compile(args, cfg, train):
    """Per candidate: seconds of a weight step eager and compiled, and the compile's own seconds."""
    rows = []
    xb, yb = train.x[:cfg.BATCH_SIZE].to(args.device), train.y[:cfg.BATCH_SIZE].to(args.device)
    with common.threads(cfg.THREADS):
        for genotype in candidates(cfg):
            seconds = {}
            for way in ("eager", "compiled"):
                torch.manual_seed(SEED)
                net = build_network(genotype, 2).to(args.device).train()
                run = torch.compile(net, backend=args.backend) if way == "compiled" else net
                optimizer = training.adam(net.parameters(), cfg.W_LR, args.device)
                steps = [common.timed(lambda: training.train_step(run, optimizer, xb, yb, F.cross_entropy), args.device)
                         for _ in range(args.steps + 1)]
                seconds[way] = steps[0], statistics.median(steps[1:])
            (_, eager), (first, compiled) = seconds["eager"], seconds["compiled"]
            gain = eager - compiled
            rows.append(dict(genotype="|".join(genotype.ops), backend=args.backend,
                             batch=len(xb), C=cfg.C, N=cfg.N, eager_step_s=eager, compiled_step_s=compiled,
                             speedup=eager / compiled, compile_s=first - compiled,
                             break_even_steps=(first - compiled) / gain if gain > 0 else float("inf")))
    return common.save(rows, "step3_compile", args.out)


def time_layouts(args, cfg, train):
    """Per torchvision row: median seconds of a training step and of an evaluation batch in each memory format,
    the two formats' networks from the same weights, their runs alternated (step 3 gives them every thread)."""
    rows = []
    xb, yb = train.x[:args.train_batch].to(args.device), train.y[:args.train_batch].to(args.device)
    xe = train.x[:args.eval_batch].to(args.device)
    for name in BASELINES:
        torch.manual_seed(SEED)
        state = build_baseline(name, 2).state_dict()
        train_runs, eval_runs = {}, {}
        for layout, fmt in LAYOUTS.items():
            net = build_baseline(name, 2).to(args.device, memory_format=fmt)
            net.load_state_dict(state)
            optimizer = training.adam(net.parameters(), cfg.FINAL_LR, args.device)
            train_runs[layout] = functools.partial(training.train_step, net.train(), optimizer, xb, yb, F.cross_entropy)
            eval_runs[layout] = functools.partial(training.predict, net, xe, len(xe))
        train_s = common.alternate(train_runs, args.steps, args.device, warmup=True)
        eval_s = common.alternate(eval_runs, args.steps, args.device, warmup=True)
        rows += [dict(row=name, layout=layout, batch=len(xb), eval_batch=len(xe), steps=args.steps,
                      train_step_s=train_s[layout], eval_batch_s=eval_s[layout],
                      train_speedup_vs_nchw=train_s["nchw"] / train_s[layout],
                      eval_speedup_vs_nchw=eval_s["nchw"] / eval_s[layout], **common.context(args.device, float("nan")))
                 for layout in LAYOUTS]
    return common.save(rows, "step3_layouts", args.out)


def main(argv=None):
    args = arguments(argv)
    cfg = round_config(args)
    train, val = load_splits(args, cfg)
    if args.compile:
        return time_compile(args, cfg, train)
    if args.layouts:
        return time_layouts(args, cfg, train)
    precisions, peaks = common.precisions(args)
    variants = common.variants(precisions)
    seconds, device, flop = time_round(args, cfg, train, val, variants)
    weight_flop = cfg.MAX_ALTERNATIONS * cfg.W_EPOCHS * len(train.x) * flop
    rows = [dict(variant=v, images=len(train.x), val_images=len(val.x), alternations=cfg.MAX_ALTERNATIONS,
                 w_epochs=cfg.W_EPOCHS, alpha_epochs=cfg.ALPHA_EPOCHS, candidates=cfg.CANDIDATES, C=cfg.C,
                 N=cfg.N, batch=cfg.BATCH_SIZE, repeats=args.repeats, median_s=s,
                 speedup_vs_naive=seconds["naive"] / s, train_flop_per_image=flop,
                 **common.share(weight_flop, s, peaks[variants[v]]),
                 **common.context(args.device, peaks[variants[v]], device, variants[v]))
            for v, s in seconds.items()]
    return common.save(rows, "step3", args.out)


if __name__ == "__main__":
    main()
