"""Sweeps on the engines researchers scale out with: a shared MLflow server, parallel jobs
through joblib, and submitit (SLURM's launcher, run locally)."""

import importlib.util
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.cli import QUICK, child_runs, run_cli
from tests.helpers.mlflow_server import free_port, mlflow_server


def test_unreachable_server_fails_in_one_line_before_training(tmp_path):
    started = time.monotonic()
    proc = run_cli(["-m", "reduce_loss=mean,sum", f"tracking.uri=http://127.0.0.1:{free_port()}", *QUICK], tmp_path)
    assert time.monotonic() - started < 60
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not answer" in lines[0] and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "checkpoints").exists()


def _paired_sweep_in(client: MlflowClient) -> tuple:
    exp = client.get_experiment_by_name("reduce-loss")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert parents[0].info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted(r.data.tags["reduce_loss"] for r in children) == ["mean", "sum"]
    for tag in ("pair_id", "init_fingerprint", "data_fingerprint"):
        assert len({r.data.tags[tag] for r in children}) == 1, tag
    return parents[0], children


@pytest.mark.slow
def test_sweep_and_analysis_against_a_real_mlflow_server(tmp_path):
    with mlflow_server(tmp_path / "server") as uri:
        proc = run_cli(["-m", "reduce_loss=mean,sum", f"tracking.uri={uri}", *QUICK], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        parent, children = _paired_sweep_in(MlflowClient(uri))
        logged = {f.path for f in MlflowClient(uri).list_artifacts(children[0].info.run_id, "eval")}
        assert "eval/final.parquet" in logged
        assert (tmp_path / "server" / "artifacts").exists()  # artifacts went through the server
        assert not (tmp_path / "mlflow.db").exists()

        proc = run_cli(["--tracking-uri", uri, "--parent-run-id", parent.info.run_id, "--out", "again"],
                       tmp_path, module="analysis")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (tmp_path / "again" / "report.md").exists()
