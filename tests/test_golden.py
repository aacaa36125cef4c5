"""The smoke pipeline's numbers, pinned: what steps 1-3 print at the smoke preset on the bundled sample (the
executor test's local run, one thread) equals what the project computed when the file tests/golden/smoke.json
was recorded. Floating point is pinned on the CPU kind that recorded it (torch's CPU capability and version):
other kernels round differently in the last bits, so elsewhere the test says so and skips."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "smoke.json"


def machine():
    return dict(torch=torch.__version__.split("+")[0], cpu=torch.backends.cpu.get_cpu_capability())


def summary(ckpt):
    """The numbers a user reads off a smoke run of the three steps (no clocks, no bookkeeping)."""
    ckpt = Path(ckpt)
    read = lambda path: json.loads(path.read_text())
    tasks = pd.read_csv(ckpt / "tasks" / "summary.csv", index_col="task")
    pairs = {p.stem: dict(distance=r["measured_distance"], crossing=r["crossing_sparsity"],
                          curve=[[q["sparsity"], q["kept"], q["auroc"], q["mse"]] for q in r["curve"]])
             for p in sorted((ckpt / "distances" / "pairs").glob("*.json")) for r in [read(p)]}
    search = ckpt / "search" / "sandal"
    rounds = {str(p.relative_to(search)): dict(alpha=r["alpha"], winner=r["winner"], candidates=r["candidates"])
              for p in sorted(search.rglob("round_*.json")) for r in [read(p)]}
    rows = pd.read_csv(search / "table.csv").set_index("Architecture")
    return dict(
        step1={t: [float(tasks.at[t, k]) for k in ("val_error", "test_error", "test_auroc", "train_loss")]
               for t in tasks.index},
        pairs=pairs,
        closest=read(ckpt / "distances" / "closest.json")["closest"],
        rounds=rounds,
        genotype=read(search / "genotype.json")["genotype"],
        rows={r: [float(rows.at[r, k]) for k in ("Error (%)", "Balanced error (%)", "AUROC", "Params (M)")]
              for r in rows.index})


def flat(value, path=""):
    """{path: leaf} of nested dicts and lists, for a comparison that names the first value that differs."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{path}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{path}[{i}]").items()}
    return {path: value}


def test_the_smoke_pipeline_gives_the_recorded_numbers(local):
    golden = json.loads(GOLDEN.read_text())
    if golden["machine"] != machine():
        pytest.skip(f"recorded on {golden['machine']}, this is {machine()}: last bits differ across CPU kinds")
    ours, theirs = flat(summary(local)), flat(golden["summary"])
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key] == (pytest.approx(value, rel=1e-6, abs=1e-9) if isinstance(value, float) else value), key
