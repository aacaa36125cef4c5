"""The Fisher task distance on its own paper's MNIST suite with ResNet-18, beside the published matrix.

python studies/ftd_suite.py [--size=full|smoke] [--data=DATA] [--trials=3] [--train-limit=N] [--epochs=E]
                               [--samples=M] [--work=DIR] [--out=DIR]

The FTD paper's four MNIST tasks: 0 the digit-0 indicator, 1 the digit-6 indicator, 2 five classes (0, 1, 2, 3
and the rest), 3 the ten digits. Its code's loaders swapped the labels 1 and 6, so that its "digit-6
indicator" detected the digit 1; we follow the paper's text: the digit 6.

Trial k trains one ResNet-18 per task (models.baselines: torchvision's, adapted to 1x28x28) from the same
initialisation and data order, seed k (the theory's Remark 1: networks trained alike are at distance 0), with
Adam (lr 1e-3 decayed to 0 along a cosine) and cross-entropy on the first --train-limit training images. d_F(b -> t) is step 2's
(fisher.task_fisher): N_b's body with a head refitted to task t, the diagonal empirical Fisher on
--samples training images of t, normalised to unit trace, against the same for N_t. The networks and each
trial's distances are kept under --work (a rerun resumes); --out gets ftd_networks.csv (test error of every
network), ftd_matrix_mean.csv / ftd_matrix_sd.csv (over the trials), ftd_vs_paper.csv / .md and
ftd_heatmap.png, against results/paper/ftd_mnist_resnet18.csv (the published mean matrix).
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # their shared options and roofline

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import common  # noqa: E402  (puts the repo on sys.path)
import configuration  # noqa: E402
import fisher  # noqa: E402
import prune_transform  # noqa: E402
import store  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from models.baselines import build_baseline  # noqa: E402

PAPER = common.REPO / "results" / "paper" / "ftd_mnist_resnet18.csv"
TASKS = {  # the suite's task number -> our task name
    "task0": "mnist0",
    "task1": "mnist6",
    "task2": "mnist_0123_rest",
    "task3": "mnist_all",
}
utils.TASK_REGISTRY["mnist_0123_rest"] = utils.Task("mnist", "classes", (0, 1, 2, 3))
SIZES = {
    "full": dict(trials=3, train_limit=4000, epochs=2, samples=200, eval_limit=1000, batch=32,
                 work="checkpoints/ftd_suite", out=str(common.REPO / "results" / "ftd_mnist_resnet18")),
    "smoke": dict(trials=2, train_limit=48, epochs=1, samples=8, eval_limit=100, batch=16,
                  work=None, out=str(common.RESULTS / "ftd_suite_smoke")),
}


def arguments(argv):
    p = common.parser(__doc__.splitlines()[0], SIZES)
    p.add_argument("--trials", type=int, help="initialisations per task (the paper: 10)")
    p.add_argument("--train-limit", type=int, help="training images per network")
    p.add_argument("--epochs", type=int, help="training epochs per network")
    p.add_argument("--samples", type=int, help="images per Fisher diagonal (FISHER_SAMPLES)")
    p.add_argument("--eval-limit", type=int, help="test images that score each network")
    p.add_argument("--batch", type=int, help="training batch size")
    p.add_argument("--work", help="networks and per-trial distances (resume)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = common.parse(p, argv)
    if args.smoke:
        args.data = str(common.SAMPLE.parent)
    else:
        common.require_full_data(args.data, "mnist")
    args.work = Path(args.work or Path(args.out) / "work")
    args.out = Path(args.out)
    return args


def config(args):
    return configuration.configure(vars(prune_transform), [
        f"--DATA_DIR={args.data}", f"--TRAIN_LIMIT={args.train_limit}", f"--EVAL_LIMIT={args.eval_limit}",
        f"--FISHER_SAMPLES={args.samples}", "--FISHER_PARAMS=all", "--PRECISION=fp32"])


def network(args, trial, key, data):
    """Trial `trial`'s network for a suite task: trained and saved, or read back when it was made alike."""
    settings = dict(task=TASKS[key], seed=trial, train_limit=args.train_limit, epochs=args.epochs, batch=args.batch,
                    lr=1e-3, lr_schedule="cosine", data=data.fingerprint)
    path = args.work / f"trial{trial}" / f"{key}.pt"
    configuration.set_seed(trial)  # the same initialisation for every task of a trial (the head, built last, differs)
    model = build_baseline("resnet18", data.task.num_classes).to(args.device)
    saved = store.load_current(path, settings)
    if saved is None:
        tick = time.perf_counter()
        training.fit(model, data.train, args.epochs, args.batch, 1e-3, trial, args.device, label=f"trial {trial} {key}",
                     lr_schedule="cosine")
        metrics = dict(training.evaluate(model, data, splits=("test",)), train_s=time.perf_counter() - tick)
        saved = dict(config=settings, state=model.state_dict(), metrics=metrics)
        store.save_checkpoint(saved, path)
        print(f"trial {trial} {key} ({TASKS[key]}): test error {metrics['test_error']:.2f} %, "
              f"{metrics['train_s']:.0f} s", flush=True)
    model.load_state_dict(saved["state"])
    return model, saved["metrics"]


def trial_distances(args, cfg, trial, data):
    """d_F(b -> t) of one trial for every ordered pair of suite tasks, saved after each pair."""
    nets = {k: network(args, trial, k, data[k]) for k in TASKS}
    settings = dict(samples=args.samples, networks=[nets[k][1] for k in TASKS])
    path = args.work / f"trial{trial}" / "distances.json"
    saved = store.load_current(path, settings) or dict(config=settings, distances={})
    for t in TASKS:
        own = None
        for b in TASKS:
            key = f"{b}->{t}"
            if key in saved["distances"]:
                continue
            if b == t:
                saved["distances"][key] = 0.0
                continue
            tick = time.perf_counter()
            own = own if own is not None else fisher.task_fisher(nets[t][0], data[t], cfg)
            saved["distances"][key] = fisher.fisher_distance(
                fisher.task_fisher(nets[b][0], data[t], cfg), own)
            store.write_json(path, saved)
            print(f"trial {trial} d_F({b} -> {t}) = {saved['distances'][key]:.4f}, "
                  f"{time.perf_counter() - tick:.0f} s", flush=True)
    store.write_json(path, saved)
    rows = [dict(trial=trial, task=k, name=TASKS[k], classes=data[k].task.num_classes, **nets[k][1]) for k in TASKS]
    return saved["distances"], rows


def matrix(distances):
    return pd.DataFrame([[distances[f"{b}->{t}"] for t in TASKS] for b in TASKS], index=list(TASKS),
                        columns=list(TASKS))


def closest(frame, target):
    return frame[target].drop(target).idxmin()


def compare(mean, sd, squared, paper):
    """Entry by entry beside the published matrix, and the summary figures. The follow-up's code left out the
    square root, so its figures are (1/2)||sqrt F_b - sqrt F_t||^2: `squared` is our mean of d^2, its scale."""
    off = [(b, t) for b in TASKS for t in TASKS if b != t]
    ours, theirs = [mean.at[b, t] for b, t in off], [paper.at[b, t] for b, t in off]
    rho = float(pd.Series(ours).rank().corr(pd.Series(theirs).rank()))
    rows = [dict(source=b, target=t, ours_mean=mean.at[b, t], ours_sd=sd.at[b, t], ours_squared_mean=squared.at[b, t],
                 paper=paper.at[b, t]) for b, t in off]
    summary = dict(spearman_off_diagonal=rho,
                   closest_agree=sum(closest(mean, t) == closest(paper, t) for t in TASKS),
                   task2_task3_mutually_closest=bool(closest(mean, "task2") == "task3" and closest(mean, "task3") == "task2"))
    return pd.DataFrame(rows), summary


def markdown(mean, sd, paper, summary, networks, args, seconds):
    names = {k: f"{k} ({v})" for k, v in TASKS.items()}
    lines = [f"ResNet-18 (1x28x28), {args.trials} trials, {args.train_limit} training images x {args.epochs} epochs, "
             f"Fisher on {args.samples} target training images; {seconds / 60:.0f} min in this run.", "",
             "Ours, mean ± sd over the trials (rows = source, columns = target), then the published mean:", "",
             "| source \\ target | " + " | ".join(names[t] for t in TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for b in TASKS:
        cells = [f"{mean.at[b, t]:.3f} ± {sd.at[b, t]:.3f} ({paper.at[b, t]:.3f})" for t in TASKS]
        lines.append(f"| {names[b]} | " + " | ".join(cells) + " |")
    lines += ["", f"- Spearman correlation of the 12 off-diagonal entries with the published ones: "
              f"{summary['spearman_off_diagonal']:.2f}",
              f"- targets whose closest source is the published one: {summary['closest_agree']} of {len(TASKS)}",
              f"- task 2 and task 3 each other's closest: {summary['task2_task3_mutually_closest']}",
              "- test error of the networks, mean over the trials (%): " + ", ".join(
                  f"{k} {g:.2f}" for k, g in networks.groupby("task")["test_error"].mean().items())]
    return "\n".join(lines) + "\n"


def heatmap(mean, sd, paper, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, (title, frame) in zip(axes, [("ours (mean ± sd)", mean), ("published (mean)", paper)]):
        ax.imshow(frame.to_numpy(), cmap="viridis_r", vmin=0, vmax=1)
        for i, b in enumerate(TASKS):
            for j, t in enumerate(TASKS):
                text = f"{frame.at[b, t]:.3f}" + (f"\n± {sd.at[b, t]:.3f}" if frame is mean else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if frame.at[b, t] > 0.5 else "black")
        ax.set_xticks(range(len(TASKS)), list(TASKS))
        ax.set_yticks(range(len(TASKS)), list(TASKS))
        ax.set_xlabel("target")
        ax.set_ylabel("source")
        ax.set_title(f"FTD, MNIST, ResNet-18: {title}")
    fig.tight_layout()
    store.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def main(argv=None):
    args = arguments(argv)
    tick = time.perf_counter()
    configuration.keep_freed_memory()  # the per-sample gradients allocate large blocks again and again
    cfg = config(args)
    data = {k: utils.load_task(name, **configuration.data_options(cfg)) for k, name in TASKS.items()}
    with common.threads(args.threads):
        trials = [trial_distances(args, cfg, trial, data) for trial in range(args.trials)]
    stack = np.stack([matrix(d).to_numpy() for d, _ in trials])
    mean = pd.DataFrame(stack.mean(0), index=list(TASKS), columns=list(TASKS))
    sd = pd.DataFrame(stack.std(0, ddof=1) if len(stack) > 1 else np.zeros_like(stack[0]), index=list(TASKS),
                      columns=list(TASKS))
    paper = pd.read_csv(PAPER, index_col=0)
    networks = pd.DataFrame([row for _, rows in trials for row in rows])
    squared = pd.DataFrame((stack ** 2).mean(0), index=list(TASKS), columns=list(TASKS))
    entries, summary = compare(mean, sd, squared, paper)
    args.out.mkdir(parents=True, exist_ok=True)
    networks.to_csv(args.out / "ftd_networks.csv", index=False, float_format="%.4g")
    mean.to_csv(args.out / "ftd_matrix_mean.csv", float_format="%.4f")
    sd.to_csv(args.out / "ftd_matrix_sd.csv", float_format="%.4f")
    entries.to_csv(args.out / "ftd_vs_paper.csv", index=False, float_format="%.4f")
    (args.out / "ftd_vs_paper.md").write_text(markdown(mean, sd, paper, summary, networks, args,
                                                       time.perf_counter() - tick))
    heatmap(mean, sd, paper, args.out / "ftd_heatmap.png")
    print((args.out / "ftd_vs_paper.md").read_text())
    return mean, sd, summary


if __name__ == "__main__":
    main()
