"""End to end: wall-clock and peak memory (RSS) of each step of a preset, run as a user runs it.

python benchmarks/bench_pipeline.py [--size=smoke|full] [--presets plain paper] [--mode=auto|measure|project]
Each step is its own process (train_task.py, prune_transform.py, model_FUSE.py) with the preset, PRECISION
(each of --precision's, a chain of its own),
a DATA_DIR and a temporary CKPT_DIR: `plain` (no preset) and `smoke` on a DATA_DIR holding only the bundled
sample, `paper` on --data (full MNIST / Fashion-MNIST).
measure: the whole preset is run.
project: each step runs one unit of its work (step 1: two tasks; step 2: one pair with one training
epoch and one pruning level; step 3: one round of each search with one alternation of one weight
epoch, and one epoch of each comparison row) and the whole step is projected from the seconds per
image pass the scripts' records give (a training image counts 3 passes, an evaluated one 1). Every
sweep is projected to the last pruning level and every round to MAX_ALTERNATIONS: upper bounds.
Peak RSS is that of the process that ran: the unit's, in project mode.
auto: measure plain and smoke, project paper.
Writes <out>/pipeline.csv.
"""
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

import common
import configuration
import model_FUSE
import prune_transform
import train_task
import utils

STEPS = {"train_task": train_task, "prune_transform": prune_transform, "model_FUSE": model_FUSE}
SOURCE, TARGET = "tshirt", utils.HELD_OUT_TARGET  # the smallest chain the three steps accept
SIZES = {"smoke": dict(presets=["smoke"], mode="project", unit_train=64, unit_images=32, unit_eval=64),
         "full": dict(presets=["plain", "paper"], mode="auto", unit_train=0, unit_images=500, unit_eval=500)}
PRESET_NAMES = ("plain", "paper", "smoke")  # plain: each script's constants as written (PRESET='')


def arguments(argv):
    p = common.parser(__doc__.splitlines()[0], SIZES)
    p.add_argument("--presets", nargs="+", choices=PRESET_NAMES, help="presets to run (plain: no preset)")
    p.add_argument("--mode", choices=("auto", "measure", "project"), help="run whole steps or units of them")
    p.add_argument("--unit-train", type=int, help="project mode, steps 1-2: TRAIN_LIMIT of the unit runs "
                   "(0: the preset's; the whole split keeps the peak RSS representative)")
    p.add_argument("--unit-images", type=int, help="project mode, step 3: training images of the unit run")
    p.add_argument("--unit-eval", type=int, help="project mode: EVAL_LIMIT of the unit runs (0: the preset's)")
    return common.parse(p, argv)


def data_dir(preset, args, tmp):
    """--data for the paper preset; otherwise a folder with only the bundled sample."""
    if preset == "paper":
        for dataset in ("mnist", "fashion"):
            common.require_full_data(args.data, dataset)
        return Path(args.data)
    folder = tmp / "data"
    if not folder.exists():
        shutil.copytree(common.SAMPLE, folder / utils.SAMPLE_DIR)
    return folder


def run_step(step, preset, data, ckpt, overrides, args, tmp):
    """Wall-clock seconds and peak RSS (MiB) of one step's process."""
    cmd = [sys.executable, f"{step}.py", f"--PRESET={preset_value(preset)}", f"--DATA_DIR={data}", f"--CKPT_DIR={ckpt}",
           f"--DEVICE={args.device}", *overrides]
    return common.run_child(cmd, tmp / f"{ckpt.name}_{step}.log")


def preset_value(preset):
    return "" if preset == "plain" else preset


def full_config(step, preset, data):
    return configuration.configure(vars(STEPS[step]), [f"--PRESET={preset_value(preset)}", f"--DATA_DIR={data}"])


# ----------------------------------------------------------------------------- units and projections
def unit_overrides(step, preset, args):
    """The command-line constants that shrink a step to one unit of its work."""
    limits = [f"--EVAL_LIMIT={args.unit_eval}"] if args.unit_eval else []
    if step == "model_FUSE":
        return [f"--TARGET={TARGET}", "--K=1", "--ROUNDS=1", "--BASE_ROUNDS=1", "--MAX_ALTERNATIONS=1",
                "--W_EPOCHS=1", "--FINAL_EPOCHS=1", "--FINAL_SEEDS=[0]", f"--SEARCH_LIMIT={args.unit_images}",
                f"--FINAL_LIMIT={args.unit_images}", *limits]
    limits += [f"--TRAIN_LIMIT={args.unit_train}"] if args.unit_train else []
    if step == "train_task":
        return [f"--TASKS={[SOURCE, TARGET]}", *limits]
    first_level = full_config(step, preset, "").PRUNE_LEVELS[0]
    return [f"--SOURCES={[SOURCE]}", f"--TARGETS={[TARGET]}", "--TRANSFER_EPOCHS=1",
            f"--PRUNE_LEVELS={[first_level]}", *limits]


def split_sizes(cfg, limit=0):
    """Training (at most `limit`, 0 = all), validation and test images of the target under cfg;
    every task is taken to have the target's sizes (true of MNIST and Fashion-MNIST)."""
    data = utils.load_task(TARGET, **configuration.data_options(cfg))
    n_train = len(data.train.x)
    return min(limit, n_train) if limit else n_train, len(data.val.x), len(data.test.x)


def passes(train, epochs, evaluated):
    """Image passes of `epochs` over `train` images (a training pass costs about 3 forward passes)
    and of evaluating `evaluated` images once."""
    return 3 * epochs * train + evaluated


def train_task_parts(ckpt, full, unit):
    """Each task: one training run of EPOCHS, then its validation and test split evaluated."""
    seconds = pd.read_csv(ckpt / "tasks" / "summary.csv")["seconds"].tolist()
    (u_train, u_val, u_test), (f_train, f_val, f_test) = split_sizes(unit), split_sizes(full)
    return [(seconds, passes(u_train, unit.EPOCHS, u_val + u_test), passes(f_train, full.EPOCHS, f_val + f_test),
             len(full.TASKS))]


def extractions(cfg):
    """Encoder runs of step 2: each network once on each target dataset (its features are a unit of their own)."""
    datasets = {utils.get_task(t).dataset for t in cfg.TARGETS}
    return sum(len(set(cfg.SOURCES) | {t for t in cfg.TARGETS if utils.get_task(t).dataset == d})
               for d in datasets)


def extraction_seconds(ckpt, unit):
    """The unit pair's two extractions, timed here on its networks and images."""
    cfg, data = SimpleNamespace(**dict(vars(unit), CKPT_DIR=str(ckpt))), utils.load_task(TARGET, **configuration.data_options(unit))
    device = configuration.get_device(unit.DEVICE)
    seconds = []
    for name in (SOURCE, TARGET):
        net, _ = prune_transform.load_network(name, utils.load_task(name, **configuration.data_options(unit)), cfg, device)
        tick = time.perf_counter()
        prune_transform.feature_unit(net.encoder, (data.train.x, data.val.x), unit.EVAL_BATCH, unit.PRECISION,
                                     unit.FEATURES, device)
        seconds.append(time.perf_counter() - tick)
    return seconds


def prune_transform_parts(ckpt, full, unit):
    """The unit pair's two extractions, and its transfer-net epochs (training, then one per pruning
    level reached); a full pair runs the whole sweep."""
    pair = json.loads((ckpt / "distances" / "pairs" / f"{SOURCE}__{TARGET}.json").read_text())
    (u_train, u_val, _), (f_train, f_val, _) = split_sizes(unit), split_sizes(full)
    u_epochs = unit.TRANSFER_EPOCHS + (len(pair["curve"]) - 1) * unit.FINETUNE_EPOCHS
    f_epochs = full.TRANSFER_EPOCHS + len(full.PRUNE_LEVELS) * full.FINETUNE_EPOCHS
    return [(extraction_seconds(ckpt, unit), u_train + u_val, f_train + f_val, extractions(full)),
            ([pair["seconds"]], passes(u_train, u_epochs, 0), passes(f_train, f_epochs, 0),
             len(full.SOURCES) * len(full.TARGETS))]


def model_FUSE_parts(ckpt, full, unit):
    """Every round of every search, the random-search trials and the comparison rows."""
    u_search, u_val, u_test = split_sizes(unit, unit.SEARCH_LIMIT)
    u_final = split_sizes(unit, unit.FINAL_LIMIT)[0]
    f_search, f_val, f_test = split_sizes(full, full.SEARCH_LIMIT)
    f_final = split_sizes(full, full.FINAL_LIMIT)[0]
    out = ckpt / "search"
    spaces = model_FUSE.needed_spaces(full)
    n_rounds = full.ROUNDS * len(spaces) + full.K * full.BASE_ROUNDS * ("task_aware" in spaces)
    rounds = [json.loads(p.read_text())["seconds"] for p in sorted(out.rglob("round_*.json"))]
    # an alternation trains the weights, then evaluates the candidates on the validation split once
    parts = [(rounds, passes(u_search, 1, u_val),
              full.MAX_ALTERNATIONS * passes(f_search, full.W_EPOCHS, f_val), n_rounds)]
    if "random" in full.ROWS:  # a trial trains one candidate as long as it trained in its round
        trials = [t["seconds"] for t in json.loads((out / TARGET / "random.json").read_text())["trials"]]
        parts.append((trials, passes(u_search, 1, u_val),
                      passes(f_search, full.MAX_ALTERNATIONS * full.W_EPOCHS, f_val), full.ROUNDS * full.CANDIDATES))
    for row in full.ROWS:
        seconds = json.loads((out / TARGET / "rows" / f"{row}.json").read_text())["seconds"]
        parts.append(([seconds], passes(u_final, 1, u_val + u_test),
                      passes(f_final, full.FINAL_EPOCHS, f_val + f_test), len(full.FINAL_SEEDS)))
    return parts


PARTS = {"train_task": train_task_parts, "prune_transform": prune_transform_parts, "model_FUSE": model_FUSE_parts}
UNITS = {"train_task": "2 tasks", "prune_transform": "1 pair, 1 epoch + 1 pruning level",
         "model_FUSE": "1 round per search, 1 epoch per row"}


def project(parts):
    """Seconds the unit run spent on its parts, and the full step's: each part's median seconds per
    image pass, times the passes of one full unit, times the full step's number of them."""
    measured = sum(sum(seconds) for seconds, *_ in parts)
    projected = sum(statistics.median(seconds) / unit * full * count for seconds, unit, full, count in parts)
    return measured, projected


# ----------------------------------------------------------------------------- runs
def run_preset(preset, mode, precision, args, tmp):
    data, ckpt = data_dir(preset, args, tmp), tmp / f"ckpt_{preset}_{precision}"
    rows = []
    for number, step in enumerate(STEPS, start=1):
        overrides = [f"--PRECISION={precision}", *(unit_overrides(step, preset, args) if mode == "project" else [])]
        wall, rss = run_step(step, preset, data, ckpt, overrides, args, tmp)
        row = dict(preset=preset, step=number, script=f"{step}.py", mode=mode, wall_s=wall, peak_rss_mib=rss,
                   projected_s=wall, unit="whole step")
        if mode == "project":  # the run's time outside the unit's work (start-up, data, reports) is kept
            unit_cfg = configuration.configure(vars(STEPS[step]), [f"--PRESET={preset_value(preset)}", f"--DATA_DIR={data}",
                                                                   f"--DEVICE={args.device}", *overrides])
            work, projected = project(PARTS[step](ckpt, full_config(step, preset, data), unit_cfg))
            row.update(projected_s=wall - work + projected, unit=UNITS[step])
        rows.append(row)
    return rows


def main(argv=None):
    args = arguments(argv)
    precisions, peaks = common.precisions(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        for preset in args.presets:
            mode = args.mode if args.mode != "auto" else "project" if preset == "paper" else "measure"
            for p in precisions:
                rows += [dict(r, **common.context(args.device, peaks[p], precision=p))
                         for r in run_preset(preset, mode, p, args, Path(tmp))]
    return common.save(rows, "pipeline", args.out)


if __name__ == "__main__":
    main()
