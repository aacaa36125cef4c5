"""What steps 2 and 3 show: the distance heatmap and pruning curves, α trajectories, the error-against-parameters
plot, the comparison table's rows (with the paper's Table 1 beside them and the paired test against TA-NAS) and
Markdown tables. Figures are drawn on matplotlib's Figure (no pyplot state) and written atomically."""
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from store import atomic_write


def closest_label(entry, spec=".2f"):
    """A closest-list entry of step 2 ({"task", "distance", ...}) for a log line: "task (distance)", or
    "task (infeasible)" when it has no distance."""
    distance = entry["distance"]
    return f"{entry['task']} ({'infeasible' if distance is None else format(distance, spec)})"


# ----------------------------------------------------------------------------- step 2
def kept_colours(matrix):
    """A log colour scale over the off-diagonal distances (the diagonal's 0 and infeasible entries left out),
    so that a narrow matrix (all entries within a few % kept) still shows its order; 0.1-100 % if none."""
    off = [v for (s, t), v in matrix.stack().items() if s != t and v > 0]
    low, high = (min(off), max(off)) if off else (0.1, 100.0)
    return LogNorm(vmin=low, vmax=high if high > low else low * 10, clip=True)


def plot_heatmap(matrix, path, title, norm=None, label="d(A → B): % of transfer-net parameters kept (log)",
                 digits=2):
    norm = norm or kept_colours(matrix)
    values = matrix.to_numpy(dtype=float)
    fig = Figure(figsize=(max(6.0, 2.5 + 0.75 * matrix.shape[1]), max(3.0, 1.0 + 0.6 * matrix.shape[0])))
    ax = fig.subplots()
    ax.patch.set_facecolor("0.85")
    ax.patch.set_hatch("//")  # infeasible pairs: no distance, the hatched background shows through
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", norm=norm)
    ax.set_xticks(range(matrix.shape[1]), matrix.columns, rotation=45, ha="right")
    ax.set_yticks(range(matrix.shape[0]), matrix.index)
    for (i, j), value in np.ndenumerate(values):
        text = "inf." if np.isnan(value) else f"{value:.{digits}f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                color="black" if np.isnan(value) or norm(value) >= 0.6 else "white")
    ax.set_xlabel("target task B")
    ax.set_ylabel("source task A")
    ax.set_title(title)
    bar = fig.colorbar(image, ax=ax, label=label)
    if isinstance(norm, LogNorm):  # five plain labels across the range, not log-scale minor ticks
        bar.minorticks_off()
        ticks = np.geomspace(norm.vmin, norm.vmax, 5)
        bar.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight"))


def plot_curves(results, targets, path, performance):
    cols = min(4, len(targets))
    rows = -(-len(targets) // cols)
    fig = Figure(figsize=(4 * cols, 3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, target in zip(axes.flat, targets):
        for r in (r for r in results if r["target"] == target):
            curve = pd.DataFrame(r["curve"])
            line, = ax.plot(curve["kept"], curve[performance], marker=".", ms=3,
                            ls="-" if r["feasible"] else ":", label=r["source"] + ("" if r["feasible"] else " (inf.)"))
            ax.plot([r["measured_distance"]], [r["unpruned"][performance]], marker="v", color=line.get_color())
        ax.set_title(f"target {target}")
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("% of parameters kept (log)")
        ax.set_ylabel(f"{performance.replace('_', ' ')} on validation{'' if performance == 'auroc' else ' (%)'}")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(targets):]:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


# ----------------------------------------------------------------------------- step 3
# the comparison rows: label and the paper's Table 1 (Quick, Draw! "moon"): error %, parameters (M), GPU days
PAPER_ROWS = {
    "fuse_task_aware": ("FUSE w. task-aware space (TA-NAS)", 1.18, 2.72, 2),
    "fuse_standard": ("FUSE w. standard space", 1.21, 2.89, 2),
    "random": ("Random search", 1.33, 2.55, 4),
    "resnet18": ("ResNet-18", 1.42, 11.44, None),
    "resnet34": ("ResNet-34", 1.20, 21.54, None),
    "densenet161": ("DenseNet-161", 1.17, 27.60, None),
}


def paired_difference(record, reference, draws=10_000, seed=0, chunk=250):
    """Test-error difference (points) of a row against the reference row on the same test images: each
    image's error rate averaged over the seeds, the mean difference, and its 95 % bootstrap interval. Each
    draw resamples both rows' seeds (each row's own, with replacement: retrainings of two architectures are
    not paired by seed), then the test images (paired: the same images for both rows), so the interval
    carries the seed-to-seed spread as well as the images'."""
    n = record["test_images"]
    def wrong(rec):
        table = np.zeros((len(rec["test_wrong"]), n), dtype=np.float32)
        for s, images in enumerate(rec["test_wrong"]):
            table[s, images] = 1
        return table
    rows, refs, rng = wrong(record), wrong(reference), np.random.default_rng(seed)
    def draw(size):  # `size` bootstrap means: seeds resampled per row, then the images for both
        pick = lambda table: table[rng.integers(0, len(table), (size, len(table)))].mean(1)  # (size, n)
        per_image = pick(rows) - pick(refs)
        return np.take_along_axis(per_image, rng.integers(0, n, (size, n)), 1).mean(1)
    means = np.concatenate([draw(min(chunk, draws - start)) for start in range(0, draws, chunk)])
    low, high = np.percentile(means, [2.5, 97.5])
    return 100 * float(rows.mean() - refs.mean()), 100 * float(low), 100 * float(high)


def table_row(row, record, search, reference):
    """A comparison table's row: a row's retrained runs (record), the search that found its network (None for a
    hand-designed one) and its difference from the reference row (TA-NAS), beside the paper's figures."""
    label, paper_error, paper_params, paper_days = PAPER_ROWS[row]
    mean = lambda key: float(np.mean([m[key] for m in record["runs"]]))
    errors = [m["test_error"] for m in record["runs"]]
    diff, low, high = paired_difference(record, reference) if reference and row != "fuse_task_aware" else (
        float("nan"),) * 3
    config = record["config"]
    return {"Architecture": label, "Error (%)": mean("test_error"),
            "Error sd": float(np.std(errors, ddof=1)) if len(errors) > 1 else float("nan"),
            "Δ vs TA-NAS (points)": diff, "95% CI low": low, "95% CI high": high,
            "Significant": "–" if math.isnan(diff) else "yes" if low > 0 or high < 0 else "no",
            "Balanced error (%)": mean("test_balanced_error"), "AUROC": mean("test_auroc"),
            "Params (M)": record["params"] / 1e6, "Seeds": len(errors),
            "Retrain budget": f"{config['epochs']} ep × {config['images'] or 'all'} img",
            "Search (s)": search["seconds"] if search else float("nan"),
            "Dictionary (s)": (search or {}).get("dictionary_seconds", float("nan")),
            "Retrain (s)": record["seconds"], "Device": search["device"] if search else record["device"],
            "Paper error (%)": paper_error, "Paper params (M)": paper_params,
            "Paper GPU days": float("nan") if paper_days is None else paper_days}


FORMATS = {"Error (%)": "{:.2f}", "Error sd": "{:.2f}", "Δ vs TA-NAS (points)": "{:+.2f}", "95% CI low": "{:+.2f}",
           "95% CI high": "{:+.2f}", "Balanced error (%)": "{:.2f}", "AUROC": "{:.4f}", "Params (M)": "{:.3f}",
           "Search (s)": "{:.0f}", "Dictionary (s)": "{:.0f}", "Retrain (s)": "{:.0f}", "Paper error (%)": "{:.2f}",
           "Paper params (M)": "{:.2f}", "Paper GPU days": "{:g}", "rounds": "{:.0f}", "decided": "{:.0f}",
           "alpha_is_best_val_accuracy": "{:.0f}", "alpha_is_best_val_auroc": "{:.0f}", "minutes": "{:.1f}"}


def markdown(table):
    """A Markdown table (pandas' to_markdown needs the tabulate package); missing values as '–'."""
    def cell(column, value):
        if isinstance(value, float) and math.isnan(value):
            return "–"
        return FORMATS.get(column, "{}").format(value)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(table.columns, row)) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_frame(table, stem):
    """A table as <stem>.csv and <stem>.md, atomically; returns the Markdown."""
    atomic_write(stem.with_suffix(".csv"), lambda tmp: table.to_csv(tmp, index=False))
    text = markdown(table)
    atomic_write(stem.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))
    return text


def plot_alpha(records, path, title):
    """softmax(α) of every candidate over the alternations, one panel per round."""
    cols = min(5, len(records))
    rows = -(-len(records) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, record in zip(axes.flat, records):
        alpha = np.array(record["alpha"])
        for c in range(alpha.shape[1]):
            name = "incumbent" if c == 0 else f"candidate {c}"
            ax.plot(range(len(alpha)), alpha[:, c], marker=".",
                    label=name + (" (winner)" if c == record["winner"] else ""))
        ax.set_title(f"round {record['round']}", fontsize=9)
        ax.set_xlabel("alternation")
        ax.set_ylabel("softmax(α)")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(records):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def plot_error_params(table, path, target):
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    # errors on a log scale: a row that failed to train (tens of %) would otherwise flatten the others into a line
    errors = np.log10(pd.concat([table["Error (%)"], table["Paper error (%)"]]).clip(lower=0.01))
    span, placed = np.ptp(errors) or 1.0, []
    ours, paper = f"ours ({target}, test split; ± sd over seeds)", "paper (Quick, Draw! moon)"
    for columns, marker, label, sd in ((("Params (M)", "Error (%)"), "o", ours, table["Error sd"]),
                                       (("Paper params (M)", "Paper error (%)"), "x", paper, None)):
        x, y = table[columns[0]], table[columns[1]].clip(lower=0.01)
        bars = None if sd is None else [np.minimum(sd, 0.9 * y), sd]  # a lower bar stops above 0
        ax.errorbar(x, y, yerr=bars, fmt=marker, capsize=2, label=label)
        for name, xi, yi in zip(table["Architecture"], x, y):
            # near the points already labelled: below them when lower than all, else stacked above, so labels stay apart
            near = [py for px, py in placed
                    if abs(math.log10(xi / px)) < 0.2 and abs(math.log10(yi / py)) < 0.05 * span]
            dy = -10 if near and all(yi < py for py in near) else 3 + 9 * len(near)
            ax.annotate(name, (xi, yi), fontsize=6, xytext=(4, dy), textcoords="offset points")
            placed.append((xi, yi))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("test error (%, log scale)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
