"""Step 2's task distance under variants of its definition, scored by the criteria that choose the default.

python studies/study_distance.py --ckpt=CKPT [--data=DATA] [--targets=T,...] [--seeds=0,1]
                                    [--variants=NAME,...] [--work=DIR] [--out=DIR] [--NAME=value ...]
python studies/study_distance.py --compare=MATRIX.csv[,MATRIX.csv ...] [--out=DIR]
python studies/study_distance.py --matrix=CKPT_SEED0,CKPT_SEED1 [--out=DIR]

The first form runs prune_transform.py for every variant (a set of its constants) and every transfer
seed, on the step-1 networks in CKPT/tasks, each run in its own folder under --work (finished pairs are
reused, so the study resumes), then scores every variant, and every stopping rule read off its measured
curves, against:
  graded  share of the off-diagonal entries that are infeasible or at an end of the grid (at most 10 %),
          and the number of distinct values (at least 10);
  valid   copy targets (<task>_copy: the same labels, a network from another seed) whose original comes
          out closest (at least 3, so fewer than 3 copy targets cannot pass);
  stable  Spearman correlation of the entries between the first two transfer seeds (at least 0.8);
and writes <out>/distance_study.csv and distance_study.md, and every entry under every rule to
distance_study_pairs.csv (distance empty: infeasible).
The second form compares distance matrices (a matrix.csv each; e.g. the default and an ablation) with the
paper's (results/paper/distance_matrix.csv) on the entries every one of them measured: infeasible entries,
block means and Spearman correlations, overall and per target column, into <out>/distance_vs_paper.csv.
The third form judges the matrices prune_transform.py measured at its defaults, one CKPT_DIR per transfer
seed on the same step-1 networks, by the three criteria (graded and stable on the dictionary's own target
columns, stable over the entries both seeds measured; valid on the copy targets' columns) and compares the
first with the paper's: <out>/distance_matrix.csv and distance_matrix_seed1.csv (the matrices, with a
heatmap .png each; copy columns in distance_matrix_copies.csv), distance_matrix_criteria.csv,
distance_matrix_columns.csv (per target: Spearman between the seeds, the three closest of each; a copy's
Spearman with its original's column) and distance_vs_paper.csv.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's modules, when this runs as a script

import configuration  # noqa: E402
import prune_transform  # noqa: E402
import reporting  # noqa: E402
import store  # noqa: E402
import utils  # noqa: E402

PAPER = REPO / "results" / "paper" / "distance_matrix.csv"
BASE = {k: getattr(prune_transform, k) for k in ("FEATURES", "LR_SCHEDULE", "PERFORMANCE", "TOLERANCE", "SCHEDULE",
                                                  "FINETUNE_EPOCHS")}  # what every variant starts from:
# prune_transform's defaults, so "default" is the matrix's rule and every other variant changes only what it names
# (runs' configs: finished pairs are reused)
WHOLE_CURVE = dict(PERFORMANCE="balanced_accuracy", TOLERANCE=1.0)  # the rule the variants that measure whole
# curves were run under: every rule is read off those curves, so it only keeps their finished pairs reusable
NO_FINETUNING = dict(WHOLE_CURVE, FINETUNE_EPOCHS=0, REFINE=0.01,
                     PRUNE_LEVELS=[round(0.05 * k, 2) for k in range(1, 20)] + [0.975, 0.99, 0.995])
VARIANTS = {  # name: (what it is, what it changes against BASE)
    "default": ("one-shot from the trained net + 1 fine-tuning epoch per level", {}),
    "no-finetuning": ("one-shot, no fine-tuning: every level measured as pruned", NO_FINETUNING),
    "curves": ("one-shot + 1 fine-tuning epoch at every level of a grid to 99.9 % pruned: the stopping rules read "
               "off whole curves", dict(WHOLE_CURVE, SEARCH="all", REFINE=0,
                                        PRUNE_LEVELS=[0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999])),
    "iterative": ("iterative (from the level before) + 1 fine-tuning epoch per level", dict(SCHEDULE="iterative")),
    "raw-constant": ("raw features, constant lr (the released training)", dict(FEATURES="raw", LR_SCHEDULE="constant")),
    "uint8": ("uint8 features (the released code's cast)", dict(FEATURES="uint8")),
    "probe": ("a fresh linear probe instead of the target's head (the released check), within 1 point of balanced "
              "accuracy", dict(PERFORMANCE="probe", TOLERANCE=1.0)),
}
# stopping rules read off whole curves (every grid level measured): (performance, points it may lose against the
# unpruned transfer, or "level": it must stay at the feasibility level, the definition's L_B >= 1 - eps)
RULES = [("balanced_accuracy", 1.0), ("balanced_accuracy", 2.0), ("balanced_accuracy", 3.0), ("balanced_accuracy", 5.0),
         ("balanced_accuracy", "level"), ("accuracy", 0.25), ("accuracy", 0.5), ("auroc", 0.002)]
FEASIBILITIES = ("2eps", "eps")


def arguments(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="checkpoints", help="CKPT_DIR of step 1 (its tasks/ folder is read)")
    p.add_argument("--data", default="data", help="DATA_DIR: the data step 1 trained on")
    p.add_argument("--targets", default="mnist3_copy,coat_copy", help="target tasks (copies test validity)")
    p.add_argument("--seeds", default="0,1", help="transfer seeds (TRANSFER_SEED)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="variants to run, from VARIANTS")
    p.add_argument("--work", default="checkpoints/distance_study", help="one CKPT_DIR per run, under here")
    p.add_argument("--out", default=str(REPO / "results" / "distance_study"), help="folder of the study table")
    p.add_argument("--device", default="auto")
    p.add_argument("--compare", help="compare these matrix.csv files (comma-separated) with the paper's, and stop")
    p.add_argument("--matrix", help="CKPT_DIRs of prune_transform runs at its defaults, one per transfer seed "
                                    "(comma-separated): judge their matrices, and stop")
    args, extra = p.parse_known_args(argv)
    if any(not a.startswith("--") or not a[2:].split("=")[0].isupper() for a in extra):
        p.error(f"unrecognized arguments: {' '.join(extra)} (prune_transform constants go as --NAME=value)")
    args.extra = extra  # prune_transform's constants, for every run (e.g. --EVAL_LIMIT=2000)
    return args


def run_folder(args, variant, seed):
    folder = Path(args.work) / variant / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    tasks = folder / "tasks"
    if not tasks.exists():
        tasks.symlink_to(Path(args.ckpt).resolve() / "tasks", target_is_directory=True)
    return folder


def run_variant(args, variant, seed, targets):
    settings = dict(BASE, **VARIANTS[variant][1])
    folder = run_folder(args, variant, seed)
    prune_transform.main([f"--{k}={v}" for k, v in settings.items()] + [
        "--PRESET=paper", f"--DATA_DIR={args.data}", f"--CKPT_DIR={folder}", f"--DEVICE={args.device}",
        f"--TRANSFER_SEED={seed}", f"--TARGETS={targets}", *args.extra])
    return folder


# ----------------------------------------------------------------------------- scoring
def read_pairs(folder, targets):
    pairs = [store.read_saved(p) for p in sorted((folder / "distances" / "pairs").glob("*.json"))]
    return [p for p in pairs if p and p["target"] in targets]


def entries(pairs, performance, tolerance, level, interpolate=False):
    """Each off-diagonal pair's distance under a stopping rule: (source, target) -> kept % or None.
    interpolate: read a crossing between two grid levels off the straight line between them in log(kept),
    as the refinement (REFINE) would find it by measuring, instead of at the last passing level."""
    out = {}
    for p in pairs:
        if p["source"] == p["target"]:
            continue
        line = level if tolerance == "level" else p["unpruned"][performance] - tolerance
        passing, failing = prune_transform.crossing(p["curve"], performance, line)
        kept = passing["kept"]
        if interpolate and failing is not None:
            share = (passing[performance] - line) / (passing[performance] - failing[performance])
            kept = float(np.exp(np.log(kept) + share * (np.log(failing["kept"]) - np.log(kept))))
        feasible = level is None or p["unpruned"][performance] >= level
        out[p["source"], p["target"]] = dict(distance=kept if feasible else None,
                                             at_end=failing is None or (passing["sparsity"] == 0.0 and not interpolate),
                                             unpruned=p["unpruned"][performance])
    return out


def spearman(a, b):
    """Rank correlation; an infeasible entry (None) ranks after every distance."""
    ranks = [pd.Series([np.inf if v is None else v for v in x]).rank() for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1]) if len(a) > 2 else float("nan")


def closest(table, target, k=3):
    """A target's k closest sources, space-separated: feasible by distance, ties by the unpruned transfer."""
    rows = sorted((prune_transform.closeness(e["distance"], e["unpruned"]), s)
                  for (s, t), e in table.items() if t == target)
    return " ".join(s for _, s in rows[:k])


def is_copy(task):
    return task.endswith("_copy")


def validity(table):
    """How many of the copy targets in `table` have their original closest, and how many there are."""
    copies = sorted({t for _, t in table if is_copy(t)})
    return dict(copies_closest=sum(closest_is_original(table, t) for t in copies), copies=len(copies))


def closest_is_original(table, target):
    """Whether a copy target's original ranks first (see closest)."""
    return closest(table, target, 1) == target.removesuffix("_copy")


def score(tables, seconds, label, rule):
    """Criteria of one variant under one rule; tables: one per transfer seed."""
    first = tables[0]
    values = [e["distance"] for e in first.values()]
    common = sorted(set(first) & set(tables[1])) if len(tables) > 1 else []
    return dict(variant=label, performance=rule[0], tolerance=rule[1], pairs=len(first), seeds=len(tables),
                infeasible_pct=100 * np.mean([v is None for v in values]),
                at_grid_end_pct=100 * np.mean([e["at_end"] and e["distance"] is not None for e in first.values()]),
                distinct=len({round(v, 2) for v in values if v is not None}),
                median_distance=float(np.median([v for v in values if v is not None])) if any(
                    v is not None for v in values) else float("nan"),
                **validity(first),
                spearman_seeds=spearman([tables[0][k]["distance"] for k in common],
                                        [tables[1][k]["distance"] for k in common]) if common else float("nan"),
                pairs_both_seeds=len(common),
                seconds_per_pair=float(np.median(seconds)))


def passes(row):
    """Each criterion met (True), missed (False), or not measured (None: no copy target, or one seed)."""
    return dict(graded=row["infeasible_pct"] + row["at_grid_end_pct"] <= 10 and row["distinct"] >= 10,
                valid=row["copies_closest"] >= 3 if row["copies"] else None,
                stable=row["spearman_seeds"] >= 0.8 if row["pairs_both_seeds"] > 2 else None)


def levels(args, sources, performance, feasibility, cache={}):
    """The feasibility level the base networks `sources` set for a performance measure (prune_transform's)."""
    if (performance, feasibility) not in cache:
        metrics = {s: store.read_saved(Path(args.ckpt) / "tasks" / f"{s}.pt")["metrics"] for s in sources}
        cfg = configuration.configure(vars(prune_transform), [f"--PERFORMANCE={performance}", f"--FEASIBILITY={feasibility}",
                                                              f"--SOURCES={list(sources)}"])
        cache[performance, feasibility] = prune_transform.feasibility_level(metrics, cfg)
    return cache[performance, feasibility]


def study(args):
    """Run the --variants with the --seeds, then score every variant with runs under --work (so the
    table grows as variants are run in separate invocations)."""
    targets = args.targets.split(",")
    for variant in filter(None, args.variants.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            run_variant(args, variant, seed, targets)
    rows, entries_rows = [], []
    for variant, (what, changes) in VARIANTS.items():
        folders = [f.parents[1] for f in sorted((Path(args.work) / variant).glob("seed*/distances/pairs"))]
        folders = [f for f in folders if read_pairs(f, targets)]
        pairs = [read_pairs(f, targets) for f in folders]
        if not pairs:
            continue
        settings = dict(BASE, **changes)
        own = (settings["PERFORMANCE"], settings["TOLERANCE"])
        whole = settings["FINETUNE_EPOCHS"] == 0 or settings.get("SEARCH") == "all"
        rules = RULES if whole and settings["PERFORMANCE"] != "probe" else [own]
        for rule in rules:
            for feasibility in FEASIBILITIES:
                if rule[1] == "level" and feasibility == "eps":
                    continue  # the eps level: every coat_copy transfer is below it
                sources = sorted({p["source"] for p in pairs[0]})
                level = levels(args, sources, "balanced_accuracy" if rule[0] == "probe" else rule[0], feasibility)
                tables = [entries(p, *rule, level, interpolate=whole) for p in pairs]
                entries_rows += [dict(variant=variant, seed=folder.name, source=s, target=t, performance=rule[0],
                                      tolerance=rule[1], feasibility=feasibility, unpruned=e["unpruned"],
                                      distance=e["distance"]) for folder, table in zip(folders, tables)
                                 for (s, t), e in sorted(table.items())]
                row = score(tables, [p["seconds"] for p in pairs[0]], variant, rule)
                rows.append(dict(row, what=what, feasibility=feasibility, feasibility_level=level, **passes(row)))
                print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    out = Path(args.out)
    frame.to_csv(out / "distance_study.csv", index=False, float_format="%.4g")
    pd.DataFrame(entries_rows).to_csv(out / "distance_study_pairs.csv", index=False, float_format="%.4g")
    (out / "distance_study.md").write_text(markdown(frame, targets))
    print(frame.to_string(index=False, float_format="{:.3g}".format))
    return frame


def markdown(frame, targets):
    columns = ["variant", "what", "seeds", "performance", "tolerance", "feasibility", "infeasible_pct", "at_grid_end_pct", "distinct",
               "median_distance", "copies", "copies_closest", "pairs_both_seeds", "spearman_seeds", "graded", "valid", "stable",
               "seconds_per_pair"]
    lines = [f"Targets: {', '.join(targets)}; sources: the 10 dictionary tasks; seeds: the transfer seeds "
             "found per variant (stability needs two). Variants that measure whole curves read each rule's crossing "
             "off the straight line in log(kept) between the grid levels around it.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in frame[columns].itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- against the paper
def block_means(matrix):
    """Mean distance of each (source dataset -> target dataset) block, the diagonal left out."""
    datasets = {t: utils.get_task(t).dataset for t in list(matrix.index) + list(matrix.columns)}
    out = {}
    for s_set in ("mnist", "fashion"):
        for t_set in ("mnist", "fashion"):
            values = [matrix.at[s, t] for s in matrix.index for t in matrix.columns
                      if s != t and datasets[s] == s_set and datasets[t] == t_set and not np.isnan(matrix.at[s, t])]
            out[f"{s_set} -> {t_set}"] = float(np.mean(values)) if values else float("nan")
    return out


def compare(paths, out):
    """Each matrix (a CSV: rows source, columns target, infeasible empty) against the paper's, on the sources and
    targets that all of them measured, so a run of a few columns compares on those. One column per matrix, named
    by its CKPT_DIR (or file) when there are several."""
    matrices = [pd.read_csv(p, index_col=0) for p in paths]
    paper = pd.read_csv(PAPER, index_col=0)
    rows = [s for s in paper.index if all(s in m.index for m in matrices)]
    common = [t for t in paper.columns if all(t in m.columns for m in matrices)]
    if not rows or not common:
        print(f"{', '.join(map(str, paths))}: no source and target in common with the paper's matrix")
        return pd.DataFrame()
    names = ["ours"] if len(paths) == 1 else [
        Path(p).parents[1].name if Path(p).name == "matrix.csv" else Path(p).stem for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    tables = dict(zip(names, (m.loc[rows, common] for m in matrices)), paper=paper.loc[rows, common])
    off = [(s, t) for s in rows for t in common if s != t]
    report = {"off-diagonal entries": {n: len(off) for n in tables},
              "infeasible entries": {n: sum(np.isnan(m.at[s, t]) for s, t in off) for n, m in tables.items()}}
    means = {n: block_means(m) for n, m in tables.items()}
    report.update({f"block mean {k}": {n: means[n][k] for n in tables} for k in means["paper"]})

    def rank_with_paper(keys):
        return {n: spearman([None if np.isnan(m.at[k]) else m.at[k] for k in keys], [paper.at[k] for k in keys])
                for n, m in tables.items() if n != "paper"}
    report["spearman, all off-diagonal entries (infeasible ranked last)"] = rank_with_paper(off)
    report.update({f"spearman, column {t}": rank_with_paper([k for k in off if k[1] == t]) for t in common})
    frame = pd.DataFrame([dict(what=what, **values) for what, values in report.items()])
    frame.to_csv(Path(out) / "distance_vs_paper.csv", index=False, float_format="%.4g")
    print(frame.to_string(index=False, float_format="{:.3g}".format))
    return frame


# ----------------------------------------------------------------------------- the full matrix
def seed_table(folder):
    """A CKPT_DIR's measured matrix (distances/matrix.csv: rows source, columns the targets every source was
    measured for, infeasible empty) as entries (source, target) -> distance (None: infeasible), whether it lies
    at an end of the grid (nothing prunable, or still passing at the sparsest level), the unpruned performance;
    with each pair's saved result."""
    path = Path(folder) / "distances" / "matrix.csv"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run prune_transform.py with CKPT_DIR={folder} first")
    matrix = pd.read_csv(path, index_col=0)
    pairs = {(p["source"], p["target"]): p for p in read_pairs(Path(folder), set(matrix.columns))}
    table = {}
    for s in matrix.index:
        for t in matrix.columns:
            if s == t:
                continue
            p = pairs[s, t]
            for key in ("PERFORMANCE", "TOLERANCE", "STOP"):
                if p["config"][key] != getattr(prune_transform, key):
                    raise SystemExit(f"{folder}: {s} -> {t} was measured with {key} = {p['config'][key]!r}, "
                                     f"not prune_transform's default {getattr(prune_transform, key)!r}")
            value = matrix.at[s, t]
            table[s, t] = dict(distance=None if np.isnan(value) else float(value), unpruned=p["unpruned"][
                p["config"]["PERFORMANCE"]], at_end=p["first_failing_sparsity"] is None or p["crossing_sparsity"] == 0)
    return matrix, table, pairs


def matrix_criteria(folders, out):
    """Criteria 1-3 of the matrices measured in `folders` (one per transfer seed), per target column too, and
    the first one's comparison with the paper's."""
    seeds = [seed_table(f) for f in folders]
    first, pairs = seeds[0][1], seeds[0][2]
    for _, table, other in seeds[1:]:
        for key in set(first) & set(table):
            if any(pairs[key]["config"][n] != other[key]["config"][n] for n in ("source_net", "target_net")):
                raise SystemExit(f"{key[0]} -> {key[1]}: the seeds were measured on different step-1 networks, "
                                 "so their matrices cannot be compared")
    # copy targets only test validity: the matrix (graded, stable, the paper) is the dictionary's own columns
    tables = [{k: e for k, e in table.items() if not is_copy(k[1])} for _, table, _ in seeds]
    rule = (prune_transform.PERFORMANCE, prune_transform.TOLERANCE)
    row = score(tables, [pairs[k]["seconds"] for k in first], "default", rule)
    row.update(validity(first))
    criteria = pd.DataFrame([dict(row, targets=sum(not is_copy(t) for t in seeds[0][0].columns), **passes(row))])
    columns = []
    every = [table for _, table, _ in seeds]
    for t in seeds[0][0].columns:
        keys = [k for k in first if k[1] == t and all(k in table for table in every[1:])]
        # a copy's column against its original's, the original source left out: the same sources' order
        # under another target network
        original = t.removesuffix("_copy")
        shared = [s for s, c in first if c == t and s != original and (s, original) in first]
        columns.append(dict(target=t, sources=sum(k[1] == t for k in first),
                            spearman_seeds=spearman(*[[table[k]["distance"] for k in keys] for table in every[:2]])
                            if len(every) > 1 and keys else float("nan"),
                            spearman_original=spearman([first[s, t]["distance"] for s in shared],
                                                       [first[s, original]["distance"] for s in shared])
                            if is_copy(t) and shared else float("nan"),
                            **{f"closest_seed{i}": closest(table, t) for i, table in enumerate(every)}))
    out = Path(out)
    for i, (matrix, _, _) in enumerate(seeds):
        name = "distance_matrix" if i == 0 else f"distance_matrix_seed{i}"
        copy_columns = [t for t in matrix.columns if is_copy(t)]
        own = matrix.drop(columns=copy_columns)
        own.to_csv(out / f"{name}.csv", float_format="%.4f")
        reporting.plot_heatmap(own, out / f"{name}.png", f"d(source → target), transfer seed {i}; hatched: infeasible")
        if copy_columns:
            matrix[copy_columns].to_csv(out / f"{name}_copies.csv", float_format="%.4f")
    criteria.to_csv(out / "distance_matrix_criteria.csv", index=False, float_format="%.4g")
    pd.DataFrame(columns).to_csv(out / "distance_matrix_columns.csv", index=False, float_format="%.4g")
    print(criteria.T.to_string(header=False), pd.DataFrame(columns).to_string(index=False, float_format="{:.3g}".format),
          sep="\n\n")
    return criteria, compare([out / "distance_matrix.csv"], out)


def main(argv=None):
    args = arguments(argv)
    args.device = str(configuration.get_device(args.device))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.matrix:
        return matrix_criteria(args.matrix.split(","), args.out)
    return compare(args.compare.split(","), args.out) if args.compare else study(args)


if __name__ == "__main__":
    main()
