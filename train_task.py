"""Step 1: train the paper's base CNN on every task (the dictionary and the targets).

python train_task.py [--NAME=value ...]; every constant below can be overridden that way.
Writes CKPT_DIR/tasks/<task>.pt (weights, config, metrics, data fingerprint) and
CKPT_DIR/tasks/summary.csv.
"""
import time
from dataclasses import asdict

import pandas as pd

import configuration
import executor
import store
import training
import utils
from models import BaseCNN

PRESET = ""             # "" = the constants below as written; or a name from PRESETS (paper, smoke)
DATA_DIR = "data"       # full CSVs here; without them the bundled sample in data/sample is used
CKPT_DIR = "checkpoints"
DEVICE = "auto"         # auto = cuda, then mps, then cpu
SEED = 0                # seeds the split and the networks (the released code: torch.manual_seed(0))
DOWNLOAD = False        # fetch missing datasets into DATA_DIR (needs internet)
TASKS = utils.DICTIONARY + [utils.HELD_OUT_TARGET]  # names from utils.TASK_REGISTRY
VAL_FRACTION = 0.1      # share of each class's training images held out for validation
TRAIN_LIMIT = 0         # train on at most this many images (0 = the whole training split)
EVAL_LIMIT = 0          # evaluate on at most this many validation / test images (0 = all)
EPOCHS = 1              # paper: 1
BATCH_SIZE = 64         # paper: 64
LR = 1e-3               # paper: Adam, lr 1e-3
PRECISION = "fp32"      # fp32 | bf16: forward passes under torch.autocast (weights and metrics stay fp32)
EVAL_BATCH = 1000       # images per forward pass when evaluating (speed only)
EXECUTOR = "local"      # where the units (one task each) run: "local" (here, one after another) or "ray"
RAY_ADDRESS = ""        # with "ray": "" starts Ray on this machine; else a cluster's address (docs/scaling-out.md)
CPUS_PER_UNIT = 1       # with "ray": CPU threads of each unit ...
GPUS_PER_UNIT = 0       # ... and its GPUs (1 on a GPU machine: one unit per GPU)

# named sets of constants (--PRESET=name); precedence: the constants above < the preset < --NAME=value
PRESETS = {
    "paper": dict(EPOCHS=1, BATCH_SIZE=64, LR=1e-3, TRAIN_LIMIT=0, EVAL_LIMIT=0),  # the authors' budget
    "smoke": dict(TRAIN_LIMIT=400, EVAL_LIMIT=200, BATCH_SIZE=32),                  # the tests: seconds
}


CPU_MINUTES_PER_TASK = 2.6  # one epoch on 54,000 images at 350 images/s on a 2-core AVX2 CPU (docs/performance.md)


def train_network(data, cfg, device):
    """Train a BaseCNN on one task; returns it with its validation and test metrics."""
    seed = cfg.SEED + data.task.seed
    configuration.set_seed(seed)
    model = BaseCNN(data.task.num_classes).to(device)
    losses = training.fit(model, data.train, cfg.EPOCHS, cfg.BATCH_SIZE, cfg.LR, seed, device, data.name, cfg.PRECISION)
    return model, {"train_loss": losses[-1], **training.evaluate(model, data, cfg.EVAL_BATCH, precision=cfg.PRECISION)}


def checkpoint_path(ckpt_dir, task):
    return f"{ckpt_dir}/tasks/{task}.pt"


def network_from(ckpt):
    """The BaseCNN a step-1 checkpoint holds (raises KeyError or RuntimeError if it holds another)."""
    model = BaseCNN(ckpt["num_classes"])
    model.load_state_dict(ckpt["state_dict"])
    return model


def train_unit(tasks, name, cfg, device):
    """A unit: train one task's network; what its checkpoint holds besides the run's config."""
    data = tasks[name]
    start = time.perf_counter()
    model, metrics = train_network(data, cfg, device)
    return {"task": name, "task_spec": asdict(data.task), "num_classes": data.task.num_classes,
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "metrics": metrics,
            "data_fingerprint": data.fingerprint, "environment": configuration.environment(device),
            "seconds": time.perf_counter() - start}


def main(argv=None):
    cfg, device, log = configuration.start_script("train_task", globals(), argv, executor.check_config)
    configuration.warn_paper_on_cpu(cfg, device, log, f"about {len(cfg.TASKS) * CPU_MINUTES_PER_TASK:.0f} min "
                                    f"({len(cfg.TASKS)} tasks, {CPU_MINUTES_PER_TASK} min each on full data)")
    config = configuration.result_config(cfg)
    rows, todo = {}, {}
    for name in cfg.TASKS:
        data = utils.load_task(name, **configuration.data_options(cfg), log=log)
        old = store.read_saved(checkpoint_path(cfg.CKPT_DIR, name), log)
        if store.made_with(old, config) and old.get("data_fingerprint") == data.fingerprint:
            log.info("%s: finished earlier with the same config and data, skipped", name)
            rows[name] = {"task": name, **old["metrics"], "seconds": old["seconds"], "status": "skipped"}
            continue
        if old:
            changed = sorted(k for k in config if old.get("config", {}).get(k) != config[k])
            log.info("%s: checkpoint made with other %s, retraining", name,
                     ", ".join(changed) if changed else "data")
        todo[name] = data

    def done(name, ckpt):
        store.save_checkpoint(dict(ckpt, config=config), checkpoint_path(cfg.CKPT_DIR, name))
        metrics = ckpt["metrics"]
        log.info("%s: %d train images, test error %.2f %% (balanced %.2f %%, AUROC %.4f), %.1f s", name,
                 len(todo[name].train.x), metrics["test_error"], metrics["test_balanced_error"], metrics["test_auroc"],
                 ckpt["seconds"])
        rows[name] = {"task": name, **metrics, "seconds": ckpt["seconds"], "status": "trained"}

    with executor.start(cfg, device, log) as ex:
        tasks = ex.share(dict, todo)  # one copy of each dataset's images for every unit
        ex.run([ex.submit(name, train_unit, tasks, name, cfg, ex.device) for name in todo], "tasks", done)
    table = pd.DataFrame([rows[name] for name in cfg.TASKS]).set_index("task")
    store.atomic_write(f"{cfg.CKPT_DIR}/tasks/summary.csv", lambda tmp: table.to_csv(tmp))
    shown = table[["test_error", "test_balanced_error", "test_auroc", "val_error", "seconds", "status"]]
    log.info("summary (also in %s/tasks/summary.csv):\n%s", cfg.CKPT_DIR,
             shown.to_string(float_format="{:.4g}".format))
    return table


if __name__ == "__main__":
    configuration.keep_freed_memory()  # only when run as a script: a process that imports this module keeps its malloc
    import train_task  # run the importable module, whose units Ray's workers can import too
    configuration.run(train_task.main)
