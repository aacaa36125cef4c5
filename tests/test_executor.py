"""EXECUTOR = "ray": the three steps write the same files as the local executor, a killed Ray run of step 2
resumes to the same matrix, and a unit's bad input stops the run with its own message."""
import json
import logging
import operator
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import configuration
import executor
import model_FUSE
import prune_transform
import train_task
from configuration import UserError

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"  # the bundled sample
RAY = ["--EXECUTOR=ray", "--CPUS_PER_UNIT=1"]
CLOCKS = {"seconds", "device", "environment", "Search (s)", "Dictionary (s)", "Retrain (s)", "Device", "minutes"}


def run(module, ckpt, *args):
    return module.main([f"--DATA_DIR={DATA}", f"--CKPT_DIR={ckpt}", "--PRESET=smoke", "--DEVICE=cpu", *args])


def without_clocks(value):
    """A result as plain values, without wall-clocks and machine labels."""
    if isinstance(value, dict):
        return {k: without_clocks(v) for k, v in value.items() if k not in CLOCKS}
    if isinstance(value, list):
        return [without_clocks(v) for v in value]
    return value.tolist() if isinstance(value, torch.Tensor) else value


def content(path):
    if path.suffix == ".json":
        return without_clocks(json.loads(path.read_text()))
    if path.suffix == ".csv":
        table = pd.read_csv(path).drop(columns=list(CLOCKS), errors="ignore").astype(object)
        return table.where(table.notna(), "missing").to_dict("list")
    return without_clocks(torch.load(path, weights_only=True))


def results(ckpt):
    return {str(p.relative_to(ckpt)): p for p in sorted(ckpt.rglob("*")) if p.suffix in (".json", ".csv", ".pt")}


def test_ray_writes_what_the_local_executor_writes_and_a_killed_step_2_resumes(local, smoke_steps, tmp_path):
    STEPS = smoke_steps
    run(train_task, tmp_path, *STEPS[0][1], *RAY)
    # step 2 on Ray in its own process, killed once its first pair is written
    args = [f"--DATA_DIR={DATA}", f"--CKPT_DIR={tmp_path}", "--PRESET=smoke", "--DEVICE=cpu", *STEPS[1][1], *RAY]
    process = subprocess.Popen([sys.executable, "prune_transform.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    pairs = tmp_path / "distances" / "pairs"
    deadline = time.monotonic() + 600
    while not list(pairs.glob("*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate()
    first = list(pairs.glob("*.json"))
    # killed part-way: one or two of three pairs written (two units run at once and can end together)
    assert 1 <= len(first) < 3, err[-2000:]
    written = [p.stat().st_mtime_ns for p in first]
    run(prune_transform, tmp_path, *STEPS[1][1], *RAY)
    assert [p.stat().st_mtime_ns for p in first] == written  # the rerun skipped the finished pairs
    run(model_FUSE, tmp_path, *STEPS[2][1], *RAY)

    ours, theirs = results(tmp_path), results(local)
    assert set(ours) - {"logs"} == set(theirs)
    assert {"tasks/sandal.pt", "distances/matrix.csv", "distances/transfer/tshirt__sandal.pt",
            "search/sandal/task_aware/round_02.json", "search/sandal/random.json",
            "search/sandal/rows/random_seed0.json", "search/sandal/table.csv"} <= set(ours)
    for name in theirs:
        assert content(ours[name]) == content(theirs[name]), name


def follow_ups(ex):
    """A unit whose done submits two more (as step 3 submits a search's rows once the search ends): all three run
    in the one call, their results in the order of submission."""
    jobs = []

    def done(name, result):
        if name == "first":
            jobs.extend(ex.submit(f"then {i}", operator.add, result, i) for i in (1, 2))
        return result
    jobs.append(ex.submit("first", operator.add, 1, 1))
    return ex.run(jobs, "units", done), jobs


def test_the_local_executor_runs_the_units_that_a_done_submits():
    assert follow_ups(executor.Local(torch.device("cpu"), logging.getLogger("test"))) == ([2, 3, 4], [])


def test_ray_retries_a_unit_whose_worker_died_runs_the_units_that_a_done_submits_and_stops_on_a_units_bad_input(
        tmp_path):
    def dies_once(marker):  # its first worker dies (as if killed), its second attempt succeeds
        if not Path(marker).exists():
            Path(marker).touch()
            os._exit(1)
        return "second attempt"

    def bad_input():
        raise UserError("this unit's input is bad")

    cfg = configuration.configure(vars(prune_transform), [f"--CKPT_DIR={tmp_path}", *RAY])
    ex = executor.Ray(cfg, torch.device("cpu"), configuration.start_run("test", cfg, torch.device("cpu")))
    try:  # units defined here go to the workers by value (this test module is not shipped)
        assert ex.run([ex.submit("dies once", dies_once, str(tmp_path / "died"))], "units",
                      lambda name, result: result) == ["second attempt"]
        assert follow_ups(ex) == ([2, 3, 4], [])
        with pytest.raises(UserError, match="this unit's input is bad"):
            ex.run([ex.submit("bad", bad_input)], "units", lambda name, result: result)
    finally:
        ex.close()
