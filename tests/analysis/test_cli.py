"""python -m analysis against an MLflow store holding constructed runs."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from analysis.simulate import simulated_runs

PLOTS = {"val_loss_by_bucket.png", "paired_difference.png", "train_loss.png",
         "val_loss_by_bucket_over_steps.png", "gradient_weight_share.png"}


def log_sweep(uri: str, tmp: Path, data, with_eval: bool = True) -> str:
    """Log `data` as a sweep: a parent run and one child per run, as the harness does."""
    client = MlflowClient(uri)
    exp = client.create_experiment("reduce-loss", artifact_location=(tmp / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="sweep").info.run_id
    for run in data.runs.itertuples():
        tags = {k: getattr(run, k) for k in ("reduce_loss", "seed", "pair_id", "init_fingerprint", "data_fingerprint")}
        child = client.create_run(exp, run_name=run.run_name, tags=tags | {"mlflow.parentRunId": parent}).info.run_id
        folder = tmp / "files" / child
        (folder / "eval").mkdir(parents=True)
        for step, part in data.evals[data.evals.run_id == run.run_id].groupby("step"):
            part.drop(columns=["run_id", "step"]).to_parquet(folder / "eval" / f"step_{step:08d}.parquet")
        if with_eval:
            client.log_artifacts(child, str(folder / "eval"), "eval")
        grads = data.grad_weights[data.grad_weights.run_id == run.run_id].drop(columns="run_id")
        grads.to_parquet(folder / "train_grad_weight.parquet")
        client.log_artifact(child, str(folder / "train_grad_weight.parquet"), "train")
        for step in (1, 2, 3):
            client.log_metric(child, "train/loss", 3.0 - 0.1 * step, step=step)
        client.set_terminated(child, "FINISHED")
    return parent


def run_analysis_cli(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


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
])
def test_bad_selection_fails_in_one_line_leaving_nothing(tmp_path, case, expected):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    args = ["--tracking-uri", uri, "--out", str(out)]
    if case in ("one_mode", "no_artifacts", "empty_buckets"):
        modes = ("mean",) if case == "one_mode" else ("mean", "sum")
        parent = log_sweep(uri, tmp_path, simulated_runs(60, modes=modes), with_eval=case != "no_artifacts")
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
