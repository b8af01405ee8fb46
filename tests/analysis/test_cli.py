"""python -m analysis against an MLflow store holding constructed runs."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from analysis.simulate import simulated_runs
from tests.helpers.cli import run_cli
from tests.helpers.mlflow_sweep import log_sweep

PLOTS = {"val_loss_by_bucket.png", "paired_difference.png", "train_loss.png",
         "val_loss_by_bucket_over_steps.png", "gradient_weight_share.png"}


def run_analysis_cli(args, cwd):
    return run_cli(args, cwd, module="analysis")


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
    ("old_schema", "have artifact schema ['0'], this analysis reads schema 1"),
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
        args += ["--parent-run-id", parent] + (["--edges", "5000,6000"] if case == "empty_buckets" else [])
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
    proc = run_analysis_cli(["--tracking-uri", uri, "--experiment", "reduce-loss", "--out", str(out), "--no-plots"], work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "analysis of 4 runs" in proc.stderr
    assert (out / "report.md").exists()
    assert list(work.iterdir()) == []
