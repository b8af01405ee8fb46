"""Interrupted, repeated and overlapping runs of the real command line."""

import subprocess

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.cli import QUICK, child_runs, cli_command, run_cli

CHECKPOINTED = [*QUICK, "trainer.checkpoint_every=2"]  # 6 steps, checkpoints after steps 2 and 4


def on_step(n: int, signal_name: str) -> str:
    """A prelude that sends this process `signal_name` when training step `n` starts."""
    return f"""
        import os, signal
        import harness.train as train
        real, calls = train.run_step, []
        def run_step(*args, **kwargs):
            calls.append(1)
            if len(calls) == {n}:
                os.kill(os.getpid(), signal.{signal_name})
            return real(*args, **kwargs)
        train.run_step = run_step
    """


def all_runs(cwd) -> pd.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True)


def metric_history(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric point of a run except throughput (wall-clock dependent)."""
    keys = [k for k in client.get_run(run_id).data.metrics if k != "train/tokens_per_s"]
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in sorted(keys)}


def artifact_bytes(client: MlflowClient, run_id: str, path: str, dest) -> bytes:
    return open(client.download_artifacts(run_id, path, str(dest)), "rb").read()


@pytest.mark.slow
def test_run_killed_after_a_checkpoint_resumes_into_the_same_run_bitwise(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    reference.mkdir(), interrupted.mkdir()
    uninterrupted = subprocess.Popen(cli_command(CHECKPOINTED), cwd=reference, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    killed = run_cli(CHECKPOINTED, interrupted, on_step(6, "SIGKILL"))  # after step 5 was logged
    assert killed.returncode == -9
    runs = all_runs(interrupted)
    assert len(runs) == 1 and runs.status.iloc[0] == "RUNNING"
    run_id = runs.run_id.iloc[0]
    [job] = (interrupted / "checkpoints").iterdir()
    assert sorted(p.name for p in job.glob("step_*")) == ["step_00000002", "step_00000004"]

    resumed = run_cli(CHECKPOINTED, interrupted)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = all_runs(interrupted)
    assert list(runs.run_id) == [run_id] and runs.status.iloc[0] == "FINISHED"
    assert runs["tags.resumed_from_step"].iloc[0] == "4"
    assert not list(job.glob("step_*"))  # a finished run keeps no checkpoints

    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stderr.read()[-3000:]
    ref_runs = all_runs(reference)
    ref_client = MlflowClient(f"sqlite:///{reference / 'mlflow.db'}")
    client = MlflowClient(f"sqlite:///{interrupted / 'mlflow.db'}")
    ref_id = ref_runs.run_id.iloc[0]
    history = metric_history(client, run_id)
    assert [s for s, _ in history["train/loss"]] == [1, 2, 3, 4, 5, 6]  # step 5 trained twice, logged once
    assert history == metric_history(ref_client, ref_id)
    for path in ("eval/final.parquet", "eval/step_00000003.parquet", "train/train_grad_weight.parquet"):
        assert artifact_bytes(client, run_id, path, tmp_path / "a") == artifact_bytes(ref_client, ref_id, path,
                                                                                      tmp_path / "b"), path


@pytest.mark.slow
def test_sigterm_stops_a_sweep_then_the_same_command_resumes_it_and_then_trains_nothing(tmp_path):
    sweep = ["-m", "reduce_loss=mean,sum", *CHECKPOINTED, "hydra.callbacks.sweep_tracking.analyse=false"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    stopped = run_cli(sweep, tmp_path, on_step(3, "SIGTERM"))
    assert stopped.returncode == 128 + 15
    assert stopped.stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM after step 3")
    parents, children = child_runs(tmp_path)
    assert list(parents.status) == ["KILLED"] and list(children.status) == ["KILLED"]  # sum never started
    [job] = (tmp_path / "checkpoints").glob("*/step_00000003")

    resumed = run_cli(sweep, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    parents2, children2 = child_runs(tmp_path)
    assert list(parents2.run_id) == list(parents.run_id) and list(parents2.status) == ["FINISHED"]
    assert len(children2) == 2 and (children2.status == "FINISHED").all()
    mean = children2.set_index("tags.reduce_loss").loc["mean"]
    assert mean.run_id == children.run_id.iloc[0] and mean["tags.resumed_from_step"] == "3"
    assert [m.step for m in client.get_metric_history(mean.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    histories = {r: metric_history(client, r) for r in children2.run_id}

    again = run_cli(sweep[:-1], tmp_path)  # the same sweep (hydra.* settings aside), now with its analysis
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("nothing to train") == 2
    parents3, children3 = child_runs(tmp_path)
    assert list(parents3.run_id) == list(parents.run_id) and sorted(children3.run_id) == sorted(children2.run_id)
    assert {r: metric_history(client, r) for r in children3.run_id} == histories
    sweep_dirs = sorted(tmp_path.glob("multirun/*/*"), key=lambda d: d.stat().st_mtime)
    assert len(sweep_dirs) == 3 and (sweep_dirs[-1] / "analysis" / "report.md").exists()


FROZEN_CLOCK = """
    import datetime, hydra.core.utils
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)
    hydra.core.utils.datetime = Frozen  # the clock of ${now:...} in the sweep folder's name
"""


@pytest.mark.slow
def test_two_sweeps_started_in_the_same_second_in_a_fresh_folder_both_complete(tmp_path):
    no_analysis = "hydra.callbacks.sweep_tracking.analyse=false"  # tested elsewhere; saves time here
    procs = [subprocess.Popen(cli_command(["-m", "reduce_loss=mean,sum", f"seed={seed}", *QUICK, no_analysis],
                                          FROZEN_CLOCK),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    sweep_dirs = sorted(tmp_path.glob("multirun/2026-01-02/03-04-05-*"))
    assert len(sweep_dirs) == 2
    parents, children = child_runs(tmp_path)
    assert len(parents) == 2 and (parents.status == "FINISHED").all()
    assert len(children) == 4 and (children.status == "FINISHED").all()
    for parent in parents.itertuples():
        mine = children[children["tags.mlflow.parentRunId"] == parent.run_id]
        assert sorted(mine["tags.reduce_loss"]) == ["mean", "sum"] and mine["tags.seed"].nunique() == 1
    assert {(d / "mlflow_parent_run_id").read_text() for d in sweep_dirs} == set(parents.run_id)
    for d in sweep_dirs:
        jobs = [p for p in d.iterdir() if p.name[0].isdigit()]
        assert len(jobs) == 2 and all((job / "eval" / "final.parquet").exists() for job in jobs)
