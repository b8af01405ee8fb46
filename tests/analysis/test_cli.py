"""python -m analysis against an MLflow store holding constructed runs."""

from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from analysis.__main__ import main
from analysis.simulate import simulated_runs
from tests.helpers.cli import run_cli
from tests.helpers.mlflow_sweep import log_sweep

PLOTS = {"val_loss_by_bucket.png", "paired_difference.png", "train_loss.png",
         "val_loss_by_bucket_over_steps.png", "gradient_weight_share.png"}


def run_analysis_cli(args, cwd):
    return run_cli(args, cwd, module="analysis")


@pytest.fixture
def analysis_main(capsys):
    """python -m analysis in this process (no interpreter start-up): returncode, stderr."""
    def run(args):
        capsys.readouterr()
        code = main(args)
        return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)
    return run


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = simulated_runs(300, modes=("mean", "sum", "seq_mean"), seeds=(0, 1), steps=(50, 100),
                          rng=np.random.default_rng(3))
    return uri, log_sweep(uri, tmp_path, data)


@pytest.mark.slow
def test_report_plots_and_tables_are_written_and_logged(tmp_path, store):
    uri, parent = store
    out = tmp_path / "out"
    proc = run_analysis_cli(["--tracking-uri", uri, "--parent-run-id", parent, "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {p.name for p in out.iterdir()}
    assert PLOTS | {"report.md", "report.html", "bucket_losses.csv", "paired_difference.csv",
                    "gradient_weight_share.csv"} <= names
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(PLOTS)
    md = (out / "report.md").read_text()
    assert md.count("distinguishable from zero") == 12  # 6 buckets x 2 modes against mean
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent, "analysis")}
    assert {f"analysis/{p}" for p in PLOTS} <= logged


@pytest.mark.slow
@pytest.mark.parametrize("case, expected", [
    ("no_experiment", "no experiment named 'nope'"),
    ("no_store", "no MLflow store at"),
    ("unreachable", "cannot reach the MLflow store http://127.0.0.1:9"),
    ("one_mode", "only one reduction (mean)"),
    ("no_artifacts", "has no per-example validation artifacts"),
    ("empty_buckets", "leaves empty buckets"),
    ("no_parent", "no run 0123456789abcdef"),
    ("old_schema", "have artifact schema ['0'], this analysis reads schemas 1, 2"),
])
def test_bad_selection_fails_in_one_line_leaving_nothing(tmp_path, case, expected):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    args = ["--tracking-uri", uri, "--out", str(out)]
    if case in ("one_mode", "no_artifacts", "empty_buckets", "old_schema"):
        modes = ("mean",) if case == "one_mode" else ("mean", "sum")
        data = simulated_runs(60, modes=modes)
        if case == "old_schema":
            data.runs.loc[0, "schema_version"] = "0"
        parent = log_sweep(uri, tmp_path, data, with_eval=case != "no_artifacts")
        args += ["--parent-run-id", parent] + (["--buckets", "100"] if case == "empty_buckets" else [])
    elif case == "no_experiment":
        log_sweep(uri, tmp_path, simulated_runs(20))
        args += ["--experiment", "nope"]
    elif case == "no_store":
        args += ["--experiment", "reduce-loss"]
    elif case == "unreachable":
        args = ["--tracking-uri", "http://127.0.0.1:9", "--out", str(out), "--experiment", "x"]
    elif case == "no_parent":
        log_sweep(uri, tmp_path, simulated_runs(20))
        args += ["--parent-run-id", "0123456789abcdef"]
    proc = run_analysis_cli(args, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr[-2000:]
    assert not out.exists()
    assert not list(tmp_path.glob(".out-*"))  # no staging folder left behind


@pytest.fixture(scope="module")
def broken_store(tmp_path_factory):
    """One sweep whose seed-1 sum run was flagged and seed-2 sum run FAILED; two more (experiments
    nan_eval, nan_curve) whose runs FINISHED unflagged but hold non-finite numbers, as divergent
    runs of earlier versions did."""
    tmp = tmp_path_factory.mktemp("broken")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    data = simulated_runs(60, seeds=(0, 1, 2))
    data.runs["flag"], data.runs["flag_reason"], data.runs["error"] = None, None, None
    flagged, failed = data.runs.run_id == "sum-s1", data.runs.run_id == "sum-s2"
    data.runs.loc[flagged, ["flag", "flag_reason"]] = ["grad_norm_zero", "gradient norm was 0 at step 4"]
    data.runs.loc[failed, ["status", "error"]] = ["FAILED", "NonFiniteError: train/loss=nan at step 3; the run stops"]
    parent = log_sweep(uri, tmp, data)
    nan_eval = simulated_runs(60)
    nan_eval.evals.loc[(nan_eval.evals.run_id == "sum-s1") & (nan_eval.evals.example_id == "ex-0000007"),
                       ["loss_sum", "loss_mean"]] = float("nan")
    nan_curve = simulated_runs(60)
    nan_curve.curves.loc[nan_curve.curves.run_id == "mean-s0", "value"] = float("nan")
    parents = {"nan_eval": log_sweep(uri, tmp, nan_eval, experiment="nan_eval"),
               "nan_curve": log_sweep(uri, tmp, nan_curve, experiment="nan_curve")}
    return uri, parent, parents


@pytest.mark.slow
def test_failed_and_flagged_runs_are_refused_by_name_unless_included(tmp_path, broken_store, analysis_main):
    uri, parent, _ = broken_store
    out = tmp_path / "out"
    args = ["--tracking-uri", uri, "--parent-run-id", parent, "--out", str(out), "--no-plots"]
    refused = analysis_main(args)
    assert refused.returncode == 2 and not out.exists()
    line, = refused.stderr.strip().splitlines()
    assert line.startswith("error: 2 run(s) did not finish or were flagged: ")
    assert "sum-s2 (FAILED: NonFiniteError: train/loss=nan at step 3" in line
    assert "sum-s1 (flag=grad_norm_zero: gradient norm was 0 at step 4)" in line

    # included: the flagged run is compared, the failed one left out (its pair is then incomplete)
    unpaired = analysis_main(args + ["--include-flagged"])
    assert unpaired.returncode == 2 and "pair pair-2 (mean-s2) has no run for sum" in unpaired.stderr
    done = analysis_main(args + ["--include-flagged", "--allow-unpaired"])
    assert done.returncode == 0, done.stderr[-2000:]
    md = (out / "report.md").read_text()
    assert md.splitlines()[0] == "# How each reduction treats long vs short examples (UNPAIRED, FLAGGED RUNS)"
    assert "- **FLAGGED run, compared anyway**: sum-s1: grad_norm_zero" in md
    assert "- **left out, did not finish**: sum-s2 (FAILED: NonFiniteError: train/loss=nan at step 3" in md
    assert "- **runs**: 5" in md


@pytest.mark.slow
@pytest.mark.parametrize("case, expected", [
    ("nan_eval", "run sum-s1 has 1 non-finite value(s) in eval/step_00000100.parquet (e.g. example ex-0000007)"),
    ("nan_curve", "run mean-s0 logged a non-finite train/loss at step 2"),
])
def test_non_finite_numbers_are_refused_not_skipped(tmp_path, broken_store, case, expected, analysis_main):
    uri, _, parents = broken_store
    proc = analysis_main(["--tracking-uri", uri, "--parent-run-id", parents[case], "--out", str(tmp_path / "out")])
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert line == f"error: {expected}; its results are not numbers"


@pytest.mark.slow
def test_out_replaces_only_a_folder_the_tool_wrote(tmp_path, store, analysis_main):
    uri, parent = store
    args = ["--tracking-uri", uri, "--parent-run-id", parent, "--no-plots", "--out"]
    foreign = tmp_path / "mine"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "report.md").write_text("my own notes")
    (foreign / "sub" / "data.csv").write_text("1,2")
    proc = analysis_main(args + [str(foreign)])
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: --out {foreign} holds files this tool did not write (report.md, sub)")
    assert (foreign / "report.md").read_text() == "my own notes" and (foreign / "sub" / "data.csv").exists()

    out = tmp_path / "report"
    assert analysis_main(args + [str(out)]).returncode == 0
    first = (out / "report.md").read_text()
    again = analysis_main(args + [str(out), "--reference", "sum"])  # its own report: replaced
    assert again.returncode == 0 and (out / "report.md").read_text() != first
    (out / "notes.txt").write_text("keep me")
    proc = analysis_main(args + [str(out)])
    assert proc.returncode == 2
    assert "holds an earlier report and files this tool did not write (notes.txt)" in proc.stderr
    assert (out / "notes.txt").read_text() == "keep me" and (out / "report.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


@pytest.mark.slow
def test_tracking_uri_is_used_from_any_working_folder(tmp_path):
    """The store lives elsewhere; the working folder stays empty (no stray mlflow.db)."""
    store = tmp_path / "elsewhere"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    log_sweep(uri, store, simulated_runs(60, rng=np.random.default_rng(4)))
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    proc = run_cli(["--tracking-uri", uri, "--experiment", "reduce-loss", "--out", str(out), "--no-plots"], work, module="analysis")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "analysis of 4 runs" in proc.stderr
    assert (out / "report.md").exists()
    assert list(work.iterdir()) == []
