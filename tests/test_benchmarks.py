"""The benchmarks' smoke sizes: each runs, writes its CSV with the expected columns and positive figures."""
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import bench_pipeline
import bench_step1
import bench_step2
import bench_step3
import common
from models import BaseCNN


def run(bench, out, name):
    bench.main(["--size=smoke", f"--out={out}"])
    return pd.read_csv(out / f"{name}.csv")


def assert_positive(frame, columns):
    assert set(columns) <= set(frame.columns), sorted(frame.columns)
    assert (frame[columns] > 0).all().all(), frame[columns]


def test_step1_compares_ours_with_naive_and_profiles_a_batch(tmp_path):
    table = run(bench_step1, tmp_path, "step1")
    assert table["variant"].tolist() == ["ours", "naive"]
    assert_positive(table, ["images", "median_s", "images_per_s", "speedup_vs_naive", "epoch_s_projected",
                            "flop_per_image", "gflops", "roofline_pct", "roofline_gflops"])
    assert table["speedup_vs_naive"].iloc[1] == 1
    profile = pd.read_csv(tmp_path / "step1_profile.csv")
    assert set(profile["phase"]) == {"data", "forward", "backward", "optimizer"}
    assert_positive(profile, ["ms_per_batch", "share_pct"])
    assert profile.groupby("variant")["share_pct"].sum().round(6).eq(100).all()


def test_step2_times_every_phase_of_a_pair(tmp_path):
    table = run(bench_step2, tmp_path, "step2")
    phases = table[table["phase"] != "total"]
    assert sorted(set(phases["phase"])) == ["extract", "sweep", "train"]
    assert_positive(phases, ["units", "median_s", "us_per_unit", "speedup_vs_naive", "projected_paper_s",
                             "gflops", "roofline_pct"])
    totals = table[table["phase"] == "total"].set_index("variant")
    assert totals.loc["ours", "median_s"] == pytest.approx(phases[phases["variant"] == "ours"]["median_s"].sum())


def test_step3_times_one_round_both_ways(tmp_path):
    table = run(bench_step3, tmp_path, "step3")
    assert table["variant"].tolist() == ["ours", "naive"]
    assert_positive(table, ["images", "val_images", "candidates", "median_s", "speedup_vs_naive",
                            "train_flop_per_image", "gflops", "roofline_pct"])


def test_pipeline_runs_and_projects_each_step(tmp_path):
    table = run(bench_pipeline, tmp_path, "pipeline")
    assert table["script"].tolist() == ["train_task.py", "prune_transform.py", "model_FUSE.py"]
    assert_positive(table, ["wall_s", "peak_rss_mib", "projected_s"])
    assert (table["projected_s"] > table["wall_s"]).all()  # the smoke preset's whole steps are more than a unit


def test_analytic_flop_count_matches_torchs_count():
    model, x = BaseCNN(2), torch.rand(1, 1, 28, 28)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(1, dtype=torch.long)).backward()
    # torch skips the input gradient of the first convolution, which the 3x rule counts
    assert bench_step1.flop_per_image() == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_child_peak_memory_is_that_child_s_own(tmp_path):
    big = [sys.executable, "-c", "x = b'1' * (300 * 2**20)"]  # written, so resident
    small = [sys.executable, "-c", "pass"]
    assert common.run_child(big, tmp_path / "big.log")[1] > 300
    assert common.run_child(small, tmp_path / "small.log")[1] < 100


def test_study_reads_relative_and_level_rules_off_a_whole_curve():
    import study_distance
    curve = [dict(sparsity=s, kept=k, balanced_accuracy=a) for s, k, a in
             ((0.0, 100.0, 80.0), (0.5, 50.0, 79.5), (0.9, 10.0, 78.5), (0.99, 1.0, 74.0), (0.999, 0.1, 50.0))]
    weak = [dict(p, balanced_accuracy=a) for p, a in zip(curve, (75.2, 74.9, 74.8, 74.2, 50.0))]
    pairs = [dict(source="a", target="t", curve=curve, unpruned=curve[0]),
             dict(source="b", target="t", curve=weak, unpruned=weak[0])]
    rel = study_distance.entries(pairs, "balanced_accuracy", 1.0, 75.0)
    assert rel["a", "t"]["distance"] == 50.0 and rel["b", "t"]["distance"] == 1.0  # the weak one prunes further
    level = study_distance.entries(pairs, "balanced_accuracy", "level", 75.0)
    assert level["a", "t"]["distance"] == 10.0 and level["b", "t"]["distance"] == 100.0  # it fails the level at once
    assert study_distance.entries(pairs, "balanced_accuracy", 1.0, 76.0)["b", "t"]["distance"] is None  # infeasible
    between = study_distance.entries(pairs, "balanced_accuracy", 1.0, 75.0, interpolate=True)["a", "t"]
    assert between["distance"] == pytest.approx(500 ** 0.5)  # 79 is halfway from 79.5 (50 % kept) to 78.5 (10 %)
