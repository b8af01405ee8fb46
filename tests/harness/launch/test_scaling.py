"""Sweeps on the engines researchers scale out with: a shared MLflow server, parallel jobs
through joblib, and submitit (SLURM's launcher, run locally)."""

import time

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.cli import QUICK, child_runs, has_module, run_cli
from tests.helpers.mlflow_server import free_port, mlflow_server
from tests.helpers.store import new_store


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
    with mlflow_server(tmp_path / "server") as (uri, _):
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


@pytest.mark.slow
def test_a_server_that_goes_away_mid_run_fails_the_sweep_within_a_bounded_time(tmp_path, monkeypatch):
    prelude = """
        import os, signal
        import harness.runs.tracking as tracking
        log_metrics = tracking.RunLogger.metrics
        def metrics(self, values, step):
            if step == 3:  # the server dies in the middle of the first run
                os.killpg(int(os.environ["SERVER_PID"]), signal.SIGKILL)
            return log_metrics(self, values, step)
        tracking.RunLogger.metrics = metrics
    """
    with mlflow_server(tmp_path / "server") as (uri, server):
        monkeypatch.setenv("SERVER_PID", str(server.pid))
        started = time.monotonic()
        proc = run_cli(["-m", "reduce_loss=mean,sum", f"tracking.uri={uri}", *QUICK], tmp_path, prelude)
        elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert elapsed < 150, elapsed  # 30 s here alone; every call retrying took 68 s, MLflow's own retries minutes per call
    # only the call that found the server gone retried; the next job and the sweep's end gave up at once
    assert (proc.stdout + proc.stderr).count("Retrying (Retry(") <= 3, proc.stderr[-3000:]
    assert "job 1 failed" in proc.stdout + proc.stderr
    assert "no longer answers: no analysis" in proc.stdout


def _needs(module: str):
    return pytest.mark.skipif(not has_module(module),
                              reason=f"needs {module} (pip install '.[launchers]')")


def _assert_local_sweep(tmp_path):
    parents, children = child_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 2
    assert parents.status.iloc[0] == "FINISHED" and (children.status == "FINISHED").all()
    assert (children["tags.mlflow.parentRunId"] == parents.run_id.iloc[0]).all()
    assert sorted(children["tags.reduce_loss"]) == ["mean", "sum"]
    for tag in ("pair_id", "init_fingerprint", "data_fingerprint"):
        assert children[f"tags.{tag}"].nunique() == 1, tag
    reports = list((tmp_path / "multirun").glob("*/*/analysis/report.md"))
    assert len(reports) == 1


@pytest.mark.slow
@_needs("hydra_plugins.hydra_joblib_launcher")
def test_joblib_runs_the_jobs_side_by_side_with_pairing_and_analysis(tmp_path):
    proc = run_cli(["-m", "reduce_loss=mean,sum", "hydra/launcher=gpus", "hydra.launcher.n_jobs=2", *QUICK], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_local_sweep(tmp_path)


@pytest.mark.slow
@_needs("hydra_plugins.hydra_submitit_launcher")
def test_submitit_local_runs_a_sweep_with_pairing_and_analysis(tmp_path):
    proc = run_cli(["-m", "reduce_loss=mean,sum", "hydra/launcher=submitit_local", *QUICK], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_local_sweep(tmp_path)


@pytest.mark.slow
def test_a_job_of_two_ranks_trains_as_ddp_with_pairing_and_analysis(tmp_path):
    new_store(tmp_path / "sweep" / "mlflow.db")
    proc = run_cli(["-m", "reduce_loss=mean,sum", "trainer.ranks_per_job=2", "trainer.device=cpu", *QUICK],
                   tmp_path / "sweep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_local_sweep(tmp_path / "sweep")
    _, children = child_runs(tmp_path / "sweep")
    assert (children["tags.world_size"] == "2").all()
    # `mean` weighs tokens by micro-batch and rank: the two ranks' job must equal one process
    # running the same semantic split (trainer.world_size=2), and differ from a world of one
    # (both runs in one sweep, without its analysis: one mode has nothing to compare).
    new_store(tmp_path / "one" / "mlflow.db")
    proc = run_cli(["-m", "reduce_loss=mean", "trainer.world_size=2,1", "trainer.device=cpu",
                    "hydra.callbacks.sweep_tracking.analyse=false", *QUICK], tmp_path / "one")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = child_runs(tmp_path / "one")
    names = {"2": "as_two", "1": "world_of_one"}
    loss = {names[size]: value for size, value in zip(runs["params.trainer.world_size"], runs["metrics.val/token_loss"])}
    job = children[children["tags.reduce_loss"] == "mean"]["metrics.val/token_loss"].iloc[0]
    assert job == pytest.approx(loss["as_two"], rel=1e-5)
    assert abs(job - loss["world_of_one"]) > 1e-4
