"""Sweeps that vary more than reduce_loss and seed: per-value comparisons, and each reduction at
its own best value (chosen on validation, reported on the test split). Known answers planted in
simulated sweeps (analysis/simulate.py simulated_grid)."""

import numpy as np
import pandas as pd
import pytest

from analysis.compute import Options, analyse
from analysis.load import AnalysisError
from analysis.simulate import simulated_grid, simulated_runs
from analysis.tuning import SAME_SPLIT, analyse_sweep, tuned_sentences
from harness.runs.summary import difference_table

TOP = 900  # seq_len from here on is the longest bucket
EDGES = [300, 600, TOP]
PLANTED = {"mean": 3e-4, "sum": 1e-3}  # each mode's best learning rate; the grid is 1e-4, 3e-4, 1e-3, 3e-3


def sum_better_in_longest(mode, seq_len):
    return np.where((mode == "sum") & (seq_len >= TOP), -0.1, 0.0)  # at sum's optimum only (simulated_grid)


def test_chosen_values_are_the_planted_ones_and_the_effect_is_found_on_the_test_split():
    """100 simulated sweeps (2 modes x 4 learning rates x 3 seeds, a seed effect N(0, 0.02) per
    run): each mode's choice is its planted optimum; on the test split, sum at its optimum against
    mean at its own is better by the planted 0.1 in the longest bucket, covered by the interval
    in >= 90% of the sweeps, and the buckets without an effect flag at about the nominal 5%."""
    rng = np.random.default_rng(22)
    chosen, top, others = [], [], []
    for _ in range(100):
        data = simulated_grid(60, 160, optimum=PLANTED, effect=sum_better_in_longest, seed_sd=0.02, n_train=0, rng=rng)
        tuned = analyse_sweep(data, Options(edges=EDGES)).tuned
        chosen.append(tuned.chosen)
        diff = tuned.test.paired_diff
        assert diff.examples.sum() == 160 and not tuned.same_split  # the test examples, all of them
        assert tuned.test.split == "test"  # what the plots and tables name
        top.append(diff[diff.bucket == diff.bucket.max()].iloc[0])
        others.append(diff[diff.bucket < diff.bucket.max()])
    assert all(c == PLANTED for c in chosen)
    top, others = pd.DataFrame(top), pd.concat(others)
    covered = ((top.ci_low <= -0.1) & (-0.1 <= top.ci_high)).mean()
    assert covered >= 0.9, covered
    assert abs(top["diff"].mean() + 0.1) < 0.01
    assert (top.ci_high < 0).mean() >= 0.8  # found: sum is better there (90% of these 100)
    assert 0.0 < others.distinguishable.mean() <= 0.10, others.distinguishable.mean()  # 300 intervals, truth 0


def test_an_optimum_at_the_edge_of_the_grid_warns():
    data = simulated_grid(60, 80, optimum={"mean": 1e-4, "sum": 1e-3}, rng=np.random.default_rng(1))
    sweep = analyse_sweep(data, Options(buckets=2))
    assert sweep.tuned.chosen == {"mean": 1e-4, "sum": 1e-3} and sweep.tuned.edge == ["mean"]
    warning = [s for s in tuned_sentences(sweep) if s.startswith("WARNING")]
    assert len(warning) == 1 and "mean" in warning[0] and "smallest" in warning[0] and "widen the grid" in warning[0]


def test_leaving_a_seed_out_shows_how_stable_the_choice_is():
    """Two neighbouring values almost tied for sum: some seed left out flips its choice."""
    data = simulated_grid(60, 60, optimum={"mean": 3e-4, "sum": 1e-3}, curvature=0.0005, seed_sd=0.05,
                          rng=np.random.default_rng(5))
    tuned = analyse_sweep(data, Options(buckets=2)).tuned
    assert len(tuned.left_out) == 2 * 3
    assert tuned.stable("mean") is bool((tuned.left_out.query("reduce_loss == 'mean'").chosen == tuned.chosen["mean"]).all())
    flips = tuned.left_out[tuned.left_out.chosen != tuned.left_out.reduce_loss.map(tuned.chosen)]
    assert not flips.empty  # with a flat optimum and seed noise the choice moves
    assert any("NOT stable" in s for s in tuned_sentences(analyse_sweep(data, Options(buckets=2))))


def two_learning_rates_pooled_today():
    """One seed at each of two learning rates, planted +0.2 (sum worse) at one and -0.2 at the
    other: pooled as if they were two seeds, the interval mixes them around 0."""
    parts = []
    for lr, effect in ((1e-3, 0.2), (1e-2, -0.2)):
        data = simulated_runs(200, seeds=(0,), effect=lambda mode, seq_len, e=effect: np.where(mode == "sum", e, 0.0),
                              rng=np.random.default_rng(int(lr * 1e4)))
        rename = {r: f"{r}-lr{lr:g}" for r in data.runs.run_id}
        data.runs = data.runs.assign(run_id=data.runs.run_id.map(rename), run_name=data.runs.run_id.map(rename),
                                     pair_id=f"pair-lr{lr:g}", **{"trainer.lr": repr(lr)})
        for frame in ("evals", "grad_weights", "curves"):
            df = getattr(data, frame)
            setattr(data, frame, df.assign(run_id=df.run_id.map(rename)))
        parts.append(data)
    joined = parts[0]
    for frame in ("runs", "evals", "grad_weights", "curves"):
        setattr(joined, frame, pd.concat([getattr(p, frame) for p in parts], ignore_index=True))
    return joined


def test_runs_that_differ_in_a_swept_key_are_never_pooled_as_seeds():
    """The defect: runs of two learning rates were pooled as two seeds of one comparison (today's
    analyse returns one interval over both). Now the comparison of them as one is refused."""
    with pytest.raises(AnalysisError, match=r"differ in trainer\.lr .* not seeds of one comparison"):
        analyse(two_learning_rates_pooled_today(), Options(buckets=1))


def test_a_sweep_over_another_key_without_tune_is_compared_per_value():
    data = two_learning_rates_pooled_today()
    data.runs = data.runs.rename(columns={"trainer.lr": "trainer.warmup_steps"})
    sweep = analyse_sweep(data, Options(buckets=1))
    assert sweep.tuned is None and sweep.keys == ["trainer.warmup_steps"]
    assert "compared separately for each value" in sweep.note and "never pooled" in sweep.note
    diffs = {values["trainer.warmup_steps"]: res.paired_diff.iloc[0] for values, res in sweep.per_value}
    assert sorted(diffs) == ["0.001", "0.01"]  # two comparisons, no pooled one
    assert diffs["0.001"]["diff"] == pytest.approx(0.2, abs=0.03) and diffs["0.001"].ci_low > 0
    assert diffs["0.01"]["diff"] == pytest.approx(-0.2, abs=0.03) and diffs["0.01"].ci_high < 0
    lines = "\n".join(sweep.summary_lines(difference_table))
    assert lines.count("paired difference vs mean") == 2 and sweep.note in lines


def test_the_learning_rate_is_tuned_by_default_and_any_numeric_key_on_request():
    data = simulated_grid(40, 40, rng=np.random.default_rng(2))
    assert analyse_sweep(data, Options(buckets=2)).tuned.key == "trainer.lr"
    data = simulated_grid(40, 40, key="loss_scale", values=(0.1, 1.0, 10.0), rng=np.random.default_rng(2))
    assert analyse_sweep(data, Options(buckets=2)).tuned is None  # not tuned unless asked: per value
    assert analyse_sweep(data, Options(buckets=2), tune="loss_scale").tuned.chosen == {"mean": 1.0, "sum": 1.0}


def test_example_weighted_selection():
    """Long examples hold most tokens: a value that helps only the short ones wins example-weighted."""
    data = simulated_grid(200, 40, values=(1e-3, 1e-2), optimum={"mean": 1e-3, "sum": 1e-3}, curvature=0.0,
                          noise=0.01, rng=np.random.default_rng(3))
    short = data.evals.seq_len < 200
    at = data.evals.run_id.str.contains("=0.01-")
    data.evals.loc[at & short, "loss_mean"] -= 0.3
    data.evals.loc[at & ~short, "loss_mean"] += 0.05
    data.evals["loss_sum"] = data.evals.loss_mean * data.evals.target_tokens
    assert analyse_sweep(data, Options(buckets=2), select_by="token").tuned.chosen["mean"] == 1e-3
    assert analyse_sweep(data, Options(buckets=2), select_by="example").tuned.chosen["mean"] == 1e-2


def test_runs_without_a_test_split_are_marked_selected_and_reported_on_the_same_split():
    data = simulated_grid(40, 40, rng=np.random.default_rng(4))
    data.tests = pd.DataFrame()
    data.runs["schema_version"] = "1"
    sweep = analyse_sweep(data, Options(buckets=2))
    assert sweep.tuned.test.split == "validation"
    assert sweep.tuned.same_split and SAME_SPLIT in sweep.caveats and SAME_SPLIT in sweep.tuned.test.caveats
    assert any(SAME_SPLIT in s for s in tuned_sentences(sweep))


@pytest.mark.parametrize("case, expected", [
    ("not_varied", r"--tune trainer.warmup_steps: the runs do not vary it \(they vary trainer.lr\)"),
    ("not_numeric", r"--tune trainer.scheduler: its values are not all numbers \(cosine, linear\)"),
    ("missing_value", r"the grid is not complete, it has no run for sum trainer.lr=0.001 seed 1"),
    ("missing_seed", r"the grid is not complete, it has no run for mean trainer.lr=0.0001 seed 2; mean trainer.lr=0.0003 seed 2"),
    ("fingerprints", r"runs are not paired across values: seed 0 differs in init_fingerprint across trainer.lr"),
    ("overlap", r"the test split overlaps training: 1 example id\(s\) are on both sides \(e.g. train-000003\)"),
    ("also_varied", r"--tune trainer.lr: the runs also vary trainer.batch_size"),
])
def test_bad_input_is_one_line(case, expected):
    data = simulated_grid(30, 30, values=(1e-4, 3e-4, 1e-3), rng=np.random.default_rng(6))
    tune = None
    runs = data.runs
    if case == "not_varied":
        tune = "trainer.warmup_steps"
        runs["trainer.warmup_steps"] = "10"
    elif case == "not_numeric":
        tune = "trainer.scheduler"
        runs["trainer.lr"] = "0.001"
        runs["trainer.scheduler"] = np.where(runs.seed == "0", "cosine", "linear")
    elif case == "missing_value":
        drop = runs.run_id[(runs.reduce_loss == "sum") & (runs["trainer.lr"] == repr(1e-3)) & (runs.seed == "1")]
        data.runs = runs[~runs.run_id.isin(drop)]
    elif case == "missing_seed":
        data.runs = runs[~((runs.reduce_loss == "mean") & (runs.seed == "2"))]
    elif case == "fingerprints":
        runs.loc[(runs.seed == "0") & (runs["trainer.lr"] == repr(1e-3)), "init_fingerprint"] = "other"
    elif case == "overlap":
        data.tests.loc[data.tests.example_id == "test-000000", "example_id"] = "train-000003"
    elif case == "also_varied":
        runs["trainer.batch_size"] = np.where(runs.seed == "0", "8", "16")
    with pytest.raises(AnalysisError, match=expected) as raised:
        analyse_sweep(data, Options(buckets=2), tune=tune)
    assert "\n" not in str(raised.value)


def test_fingerprints_that_differ_are_compared_only_when_allowed_and_marked_unpaired():
    data = simulated_grid(30, 30, values=(1e-4, 3e-4, 1e-3), rng=np.random.default_rng(6))
    data.runs.loc[data.runs["trainer.lr"] == repr(1e-3), "data_fingerprint"] = "other"
    sweep = analyse_sweep(data, Options(buckets=2, allow_unpaired=True))
    assert "UNPAIRED" in sweep.caveats and not sweep.tuned.test.paired


@pytest.fixture
def grid_store(tmp_path):
    from tests.helpers.mlflow_sweep import log_sweep
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = simulated_grid(60, 80, values=(1e-4, 3e-4, 1e-3), optimum={"mean": 1e-4, "sum": 3e-4}, seeds=(0, 1),
                          effect=sum_better_in_longest, rng=np.random.default_rng(9))
    return uri, log_sweep(uri, tmp_path, data), data


@pytest.mark.slow
def test_the_cli_writes_the_tuned_report_and_records_the_choice_on_the_parent_run(tmp_path, grid_store, capsys):
    from mlflow.tracking import MlflowClient

    from analysis.__main__ import main
    uri, parent, _ = grid_store
    out = tmp_path / "out"
    assert main(["--tracking-uri", uri, "--parent-run-id", parent, "--out", str(out), "--edges", "300,600,900"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"sensitivity.png", "sensitivity_by_bucket.png", "tuned_paired_difference.png", "report.md",
            "report.html", "tuning_grid.csv", "tuned_paired_difference.csv"} <= names
    md = (out / "report.md").read_text()
    assert "each at its own best trainer.lr" in md and "on the test split" in md
    assert "mean: trainer.lr=0.0001 chosen" in md and "sum: trainer.lr=0.0003 chosen" in md
    assert "WARNING: mean's best trainer.lr (0.0001) is the smallest value of the grid" in md
    assert "| trainer.lr=0.0001" in md and "0.0003 *" not in md.split("| mean")[1].split("\n")[0]
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 4
    tuned = MlflowClient(uri).get_run(parent).data  # the parent records what the analysis chose
    assert tuned.metrics["tuned/mean/trainer.lr"] == 1e-4 and tuned.metrics["tuned/sum/trainer.lr"] == 3e-4
    assert any(k.startswith("tuned_diff_vs_mean/sum/") for k in tuned.metrics)
    assert tuned.tags["tuned_sum"] == "trainer.lr=0.0003" and tuned.tags["tuned_edge_warning"] == "mean"
    # docs/tuning.md: python -m analysis --parent-run-id <id> --tune trainer.lr --select-by example
    again = tmp_path / "again"
    assert main(["--tracking-uri", uri, "--parent-run-id", parent, "--tune", "trainer.lr", "--select-by", "example",
                 "--out", str(again), "--no-plots"]) == 0
    assert "selected on**: validation, example-weighted" in (again / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("args, expected", [
    (["--tune", "trainer.warmup_steps"], "error: --tune trainer.warmup_steps: the runs do not vary it"),
    (["--select-by", "tokens"], "invalid choice: 'tokens'"),
])
def test_bad_tune_options_fail_in_one_line_leaving_nothing(tmp_path, grid_store, capsys, args, expected):
    from analysis.__main__ import main
    uri, parent, _ = grid_store
    out = tmp_path / "out"
    try:
        code = main(["--tracking-uri", uri, "--parent-run-id", parent, "--out", str(out), *args])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code != 0 and expected in err and not out.exists()
    assert [line for line in err.splitlines() if line.startswith("error") or "error:" in line][-1].count("error") >= 1


@pytest.mark.slow
def test_the_cli_compares_a_sweep_over_another_key_per_value(tmp_path):
    from mlflow.tracking import MlflowClient

    from analysis.__main__ import main
    from tests.helpers.mlflow_sweep import log_sweep
    data = two_learning_rates_pooled_today()
    data.runs = data.runs.rename(columns={"trainer.lr": "trainer.warmup_steps"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = log_sweep(uri, tmp_path, data)
    out = tmp_path / "out"
    assert main(["--tracking-uri", uri, "--parent-run-id", parent, "--out", str(out), "--buckets", "2"]) == 0
    md = (out / "report.md").read_text()
    assert "compared separately for each value" in md
    assert {"paired_difference_trainer.warmup_steps=0.001.png", "paired_difference_trainer.warmup_steps=0.01.png",
            "paired_difference_trainer.warmup_steps=0.001.csv"} <= {p.name for p in out.iterdir()}
    assert "paired_difference.csv" not in {p.name for p in out.iterdir()}  # no pooled comparison
    metrics = MlflowClient(uri).get_run(parent).data.metrics
    logged = {k: v for k, v in metrics.items() if k.startswith("diff_vs_mean/trainer.warmup_steps_") and "/ci_" not in k}
    assert len(logged) == 4  # 2 values x 2 buckets
    assert all((v > 0.1) == ("_0.001/" in k) for k, v in logged.items())
