"""The benchmarks' smoke sizes: each runs, writes its CSV with the expected columns and positive figures."""
import sys

import numpy as np
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
from models.baselines import BASELINES


def run(bench, out, name, precision="fp32"):
    bench.main(["--size=smoke", f"--out={out}", f"--precision={precision}"])
    return pd.read_csv(out / f"{name}.csv")


def assert_precisions(table):
    """ours in fp32 and bf16 beside the naive way (fp32), each against its own precision's roofline."""
    rows = table.drop_duplicates("variant").set_index("variant")
    assert rows["precision"].to_dict() == {"ours": "fp32", "ours_bf16": "bf16", "naive": "fp32"}
    assert rows.at["ours", "roofline_gflops"] == rows.at["naive", "roofline_gflops"] != rows.at["ours_bf16",
                                                                                                "roofline_gflops"]


def assert_positive(frame, columns):
    assert set(columns) <= set(frame.columns), sorted(frame.columns)
    assert (frame[columns] > 0).all().all(), frame[columns]


def test_step1_compares_ours_with_naive_and_profiles_a_batch(tmp_path):
    table = run(bench_step1, tmp_path, "step1")
    assert table["variant"].tolist() == ["ours", "naive"]
    assert_positive(table, ["images", "median_s", "images_per_s", "speedup_vs_naive", "epoch_s_projected",
                            "flop_per_image", "gflops", "roofline_pct", "roofline_gflops"])
    ours, naive = table.set_index("variant").loc[["ours", "naive"], "median_s"]
    assert table.set_index("variant").at["ours", "speedup_vs_naive"] == pytest.approx(naive / ours)  # side by side
    profile = pd.read_csv(tmp_path / "step1_profile.csv")
    assert set(profile["phase"]) == {"data", "forward", "backward", "optimizer"}
    assert_positive(profile, ["ms_per_batch", "share_pct"])
    assert profile.groupby("variant")["share_pct"].sum().round(6).eq(100).all()


def test_step2_times_every_phase_of_a_pair_in_both_precisions(tmp_path):
    table = run(bench_step2, tmp_path, "step2", "both")
    phases = table[table["phase"] != "total"]
    assert sorted(set(phases["phase"])) == ["extract", "sweep", "train"]
    assert_positive(phases, ["units", "median_s", "us_per_unit", "speedup_vs_naive", "projected_paper_s",
                             "gflops", "roofline_pct"])
    totals = table[table["phase"] == "total"].set_index("variant")
    assert totals.loc["ours", "median_s"] == pytest.approx(phases[phases["variant"] == "ours"]["median_s"].sum())
    assert_precisions(phases)


def test_step3_times_one_round_both_ways_in_both_precisions(tmp_path):
    table = run(bench_step3, tmp_path, "step3", "both")
    assert table["variant"].tolist() == ["ours", "ours_bf16", "naive"]
    assert_precisions(table)
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


def test_study_variants_start_from_the_matrix_rule_and_are_valid_configurations():
    """A variant's run differs from a plain prune_transform run in what the variant names, and nothing else."""
    import configuration
    import prune_transform
    import study_distance
    plain = configuration.result_config(configuration.configure(vars(prune_transform), []))
    for name, (_, changes) in study_distance.VARIANTS.items():
        settings = dict(study_distance.BASE, **changes)
        cfg = configuration.configure(vars(prune_transform), [f"--{k}={v}" for k, v in settings.items()])
        prune_transform.check_config(cfg)
        ran = configuration.result_config(cfg)
        assert {k for k in ran if ran[k] != plain[k]} == {k for k, v in changes.items() if plain[k] != v}, name


def write_matrix_run(folder, distances, seed, nets="n"):
    """A prune_transform CKPT_DIR at its defaults: distances/matrix.csv and one pair JSON per entry."""
    import prune_transform
    import store
    (folder / "distances" / "pairs").mkdir(parents=True)
    distances.to_csv(folder / "distances" / "matrix.csv")
    config = dict(PERFORMANCE=prune_transform.PERFORMANCE, TOLERANCE=prune_transform.TOLERANCE,
                  STOP=prune_transform.STOP, TRANSFER_SEED=seed)
    for s in distances.index:
        for t in distances.columns:
            d = distances.at[s, t]
            store.write_json(folder / "distances" / "pairs" / f"{s}__{t}.json", dict(
                source=s, target=t, config=dict(config, source_net=nets + s, target_net=nets + t),
                unpruned=dict(auroc=0.95 if np.isnan(d) else 0.99), seconds=100.0 + seed,
                crossing_sparsity=0.0 if d == 100 else 0.9, first_failing_sparsity=0.95))


def test_matrix_criteria_judge_two_seeds_and_compare_with_the_paper(tmp_path):
    import study_distance
    sources, targets = study_distance.prune_transform.SOURCES, ["mnist3", "coat"]
    rng = np.random.default_rng(0)
    seed0 = pd.DataFrame(rng.uniform(2, 8, (len(sources), 2)), index=sources, columns=targets)
    seed0.loc["mnist3", "mnist3"] = seed0.loc["coat", "coat"] = 0.0  # the diagonal, as matrix.csv writes it
    seed0.loc["mnist4", "mnist3"] = 1.0  # nearest to mnist3
    seed0.loc["trouser", "coat"] = np.nan  # infeasible
    seed0.loc["dress", "coat"] = 100.0  # nothing prunable: at the grid's end
    seed0["mnist3_copy"] = seed0["mnist3"] + 1  # a copy: judged for validity only; its sources in mnist3's order
    seed0.loc["mnist3", "mnist3_copy"] = 1.5
    seed1 = seed0 + rng.normal(0, 0.01, seed0.shape)
    write_matrix_run(tmp_path / "s0", seed0, 0)
    write_matrix_run(tmp_path / "s1", seed1, 1)
    out = tmp_path / "out"
    out.mkdir()
    criteria, versus = study_distance.main([f"--matrix={tmp_path / 's0'},{tmp_path / 's1'}", f"--out={out}"])
    row = criteria.iloc[0]
    assert row["pairs"] == 18 and row["infeasible_pct"] == pytest.approx(100 / 18)
    assert row["at_grid_end_pct"] == pytest.approx(100 / 18) and not row["graded"]  # 11 % > 10 %
    assert row["spearman_seeds"] > 0.99 and row["stable"] and row["pairs_both_seeds"] == 18
    assert row["copies"] == 1 and row["copies_closest"] == 1 and not row["valid"]  # one copy of the 3 it needs
    columns = pd.read_csv(out / "distance_matrix_columns.csv").set_index("target")
    assert columns.at["mnist3", "closest_seed0"].split()[0] == "mnist4"
    assert columns.at["mnist3_copy", "closest_seed1"].split()[0] == "mnist3"
    assert columns.at["mnist3_copy", "spearman_original"] == pytest.approx(1.0)
    assert np.isnan(columns.at["coat", "spearman_original"])  # not a copy
    pd.testing.assert_frame_equal(pd.read_csv(out / "distance_matrix_seed1.csv", index_col=0), seed1[targets],
                                  atol=1e-4)
    pd.testing.assert_frame_equal(pd.read_csv(out / "distance_matrix_copies.csv", index_col=0),
                                  seed0[["mnist3_copy"]], atol=1e-4)
    assert (out / "distance_matrix.png").stat().st_size > 0 and (out / "distance_matrix_seed1.png").stat().st_size > 0
    blocks = versus.set_index("what")["ours"]
    mnist = [v for s, v in seed0["mnist3"].items() if s.startswith("mnist") and s != "mnist3"]
    assert blocks["block mean mnist -> mnist"] == pytest.approx(np.mean(mnist), abs=1e-4)
    assert blocks["block mean fashion -> fashion"] == pytest.approx(seed0["coat"].drop("coat").iloc[5:].mean(), abs=1e-4)


def test_compare_puts_matrices_beside_the_paper_on_the_entries_all_measured(tmp_path, capsys):
    import study_distance
    paper = pd.read_csv(study_distance.PAPER, index_col=0)
    default = paper.copy() / 10  # every source and target
    ablation = paper.loc[["mnist0", "mnist1", "tshirt", "dress"], ["mnist2", "dress"]].copy()
    ablation.loc["mnist0", "dress"] = np.nan  # infeasible
    for name, m in (("default", default), ("ablation", ablation)):
        (tmp_path / name / "distances").mkdir(parents=True)
        m.to_csv(tmp_path / name / "distances" / "matrix.csv")
    frame = study_distance.main([f"--compare={tmp_path / 'default' / 'distances' / 'matrix.csv'},"
                                 f"{tmp_path / 'ablation' / 'distances' / 'matrix.csv'}", f"--out={tmp_path}"])
    row = frame.set_index("what")
    assert list(frame.columns) == ["what", "default", "ablation", "paper"]
    assert row.at["off-diagonal entries", "ablation"] == 7  # 4 sources x 2 targets, dress -> dress left out
    assert row.at["infeasible entries", "ablation"] == 1 and row.at["infeasible entries", "default"] == 0
    # the paper's block means over the same entries: mnist0 and mnist1 -> dress only
    assert row.at["block mean mnist -> fashion", "paper"] == pytest.approx(paper.loc[["mnist0", "mnist1"], "dress"].mean())
    assert row.at["block mean mnist -> fashion", "ablation"] == pytest.approx(paper.at["mnist1", "dress"])
    assert row.at["spearman, column mnist2", "default"] == pytest.approx(1.0)  # a rescaled paper ranks alike
    assert np.isnan(row.at["spearman, column mnist2", "paper"])
    assert (tmp_path / "distance_vs_paper.csv").exists()
    pd.DataFrame({"sandal": [1.0]}, index=["mnist0"]).to_csv(tmp_path / "sandal.csv")  # no paper column
    assert study_distance.main([f"--compare={tmp_path / 'sandal.csv'}", f"--out={tmp_path}"]).empty
    assert "no source and target in common" in capsys.readouterr().out


def test_matrix_criteria_refuse_seeds_measured_on_other_networks(tmp_path):
    import study_distance
    sources = study_distance.prune_transform.SOURCES
    table = pd.DataFrame(np.arange(len(sources), dtype=float)[:, None] + 1, index=sources, columns=["coat"])
    write_matrix_run(tmp_path / "s0", table, 0)
    write_matrix_run(tmp_path / "s1", table, 1, nets="other")
    with pytest.raises(SystemExit, match="different step-1 networks"):
        study_distance.main([f"--matrix={tmp_path / 's0'},{tmp_path / 's1'}", f"--out={tmp_path}"])


def test_matrix_criteria_leave_validity_unmeasured_without_copies(tmp_path):
    import study_distance
    sources = study_distance.prune_transform.SOURCES
    table = pd.DataFrame(np.arange(len(sources), dtype=float)[:, None] + 1, index=sources, columns=["sandal"])
    write_matrix_run(tmp_path / "s0", table, 0)
    criteria, _ = study_distance.main([f"--matrix={tmp_path / 's0'}", f"--out={tmp_path}"])
    assert criteria.iloc[0]["valid"] is None and criteria.iloc[0]["stable"] is None  # not measured, not failed
    assert not (tmp_path / "distance_matrix_copies.csv").exists()


class TinyNet(torch.nn.Module):
    """A stand-in for ResNet-18 with the same parts (convolution, BatchNorm, an `fc` head), in milliseconds."""

    def __init__(self, num_classes):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.BatchNorm2d(4),
                                        torch.nn.ReLU(inplace=True), torch.nn.Flatten())
        self.fc = torch.nn.Linear(4 * 13 * 13, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def test_ftd_suite_compares_with_the_published_matrix_and_resumes(tmp_path, monkeypatch):
    import ftd_suite
    monkeypatch.setattr(ftd_suite, "build_baseline", lambda name, num_classes: TinyNet(num_classes))
    mean, sd, summary = ftd_suite.main(["--size=smoke", f"--out={tmp_path}"])
    off = ~np.eye(4, dtype=bool)
    assert (np.diag(mean) == 0).all() and ((mean.values[off] > 0) & (mean.values[off] < 1)).all()
    assert (sd.values >= 0).all() and (sd.values[off] > 0).any()  # two trials: two initialisations
    table = pd.read_csv(tmp_path / "ftd_vs_paper.csv")
    assert len(table) == 12 and table.iloc[0][["source", "target", "paper"]].tolist() == ["task0", "task1", 0.2189]
    trials = 2  # the smoke size's: the mean of d^2 over them is the squared mean plus their (population) variance
    expected = table["ours_mean"] ** 2 + table["ours_sd"] ** 2 * (trials - 1) / trials
    assert table["ours_squared_mean"].to_numpy() == pytest.approx(expected.to_numpy(), abs=2e-4)
    networks = pd.read_csv(tmp_path / "ftd_networks.csv")
    assert networks["classes"].tolist() == [2, 2, 5, 10] * 2 and networks["test_error"].between(0, 100).all()
    assert table["ours_mean"].is_unique and table["paper"].is_unique  # no ties: ranks are positions
    ranks = [np.argsort(np.argsort(table[c].to_numpy())) for c in ("ours_mean", "paper")]
    assert summary["spearman_off_diagonal"] == pytest.approx(np.corrcoef(*ranks)[0, 1], abs=1e-3)
    assert 0 <= summary["closest_agree"] <= 4
    assert (tmp_path / "ftd_heatmap.png").stat().st_size > 0 and "Spearman" in (tmp_path / "ftd_vs_paper.md").read_text()

    def redo(*args, **kwargs):
        raise AssertionError("a rerun must read its networks and distances back")
    monkeypatch.setattr(ftd_suite.training, "fit", redo)
    monkeypatch.setattr(ftd_suite.fisher, "task_fisher", redo)
    again, _, _ = ftd_suite.main(["--size=smoke", f"--out={tmp_path}"])
    pd.testing.assert_frame_equal(again, mean)


def test_step3_times_the_torchvision_rows_in_both_memory_formats(tmp_path):
    bench_step3.main(["--size=smoke", f"--out={tmp_path}", "--layouts"])
    table = pd.read_csv(tmp_path / "step3_layouts.csv")
    assert list(table["row"]) == [name for name in BASELINES for _ in bench_step3.LAYOUTS]
    assert list(table["layout"]) == list(bench_step3.LAYOUTS) * len(BASELINES)
    for row, times in table.groupby("row"):  # each layout against NCHW, from the times measured side by side
        times = times.set_index("layout")
        for kind, seconds in (("train", "train_step_s"), ("eval", "eval_batch_s")):
            ratio = (times.at["nchw", seconds] / times[seconds]).to_numpy()
            assert times[f"{kind}_speedup_vs_nchw"].to_numpy() == pytest.approx(ratio), row
    assert_positive(table, ["train_step_s", "eval_batch_s", "train_speedup_vs_nchw", "eval_speedup_vs_nchw"])


def test_step3_times_compiled_steps_beside_eager_ones(tmp_path):
    bench_step3.main(["--size=smoke", f"--out={tmp_path}", "--compile"])
    table = pd.read_csv(tmp_path / "step3_compile.csv")
    assert len(table) == 2  # the smoke preset's candidates
    assert_positive(table, ["eager_step_s", "compiled_step_s", "speedup", "compile_s", "break_even_steps"])
