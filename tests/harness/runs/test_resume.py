"""Interrupted, repeated and overlapping runs of the real command line."""

import subprocess

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.cli import QUICK, child_runs, cli_command, run_cli
from tests.helpers.store import new_store

CHECKPOINTED = [*QUICK, "trainer.checkpoint_every=2"]  # 6 steps, checkpoints after steps 2 and 4


def on_call(n: int, signal_name: str) -> str:
    """A prelude: the process sends itself `signal_name` when `run_step` is called the n-th time."""
    return f"""
        import os, signal
        import harness.training.loop as train
        real, calls = train.run_step, []
        def run_step(*args, **kwargs):
            calls.append(1)
            if len(calls) == {n}:
                os.kill(os.getpid(), signal.{signal_name})
            return real(*args, **kwargs)
        train.run_step = run_step
    """


def metric_history(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric point of a run except throughput and the job's timings (wall-clock dependent)."""
    keys = [k for k in client.get_run(run_id).data.metrics if k != "train/tokens_per_s" and not k.startswith("time/")]
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in sorted(keys)}


def artifact_bytes(client: MlflowClient, run_id: str, path: str, dest) -> bytes:
    return open(client.download_artifacts(run_id, path, str(dest)), "rb").read()


def by_mode(children) -> dict:
    return dict(zip(children["tags.reduce_loss"], children.run_id))


@pytest.mark.slow
def test_a_stopped_then_killed_sweep_resumes_into_its_runs_bitwise_and_then_trains_nothing(tmp_path):
    """SIGTERM stops the sweep in its first job. The same command resumes that job and is killed
    (SIGKILL) in the second, after a checkpoint. The same command again finishes the sweep in the
    same parent and child runs, bitwise equal to a sweep never interrupted. Once more, it trains
    nothing and adds no runs."""
    sweep, no_analysis = ["-m", "reduce_loss=mean,sum", *CHECKPOINTED], "hydra.callbacks.sweep_tracking.analyse=false"
    reference, work = tmp_path / "reference", tmp_path / "work"
    new_store(reference / "mlflow.db"), new_store(work / "mlflow.db")
    uninterrupted = subprocess.Popen(cli_command([*sweep, no_analysis]), cwd=reference, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    stopped = run_cli([*sweep, no_analysis], work, on_call(3, "SIGTERM"))  # during mean's step 3
    assert stopped.returncode == 128 + 15
    assert stopped.stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM after step 3")
    parents, children = child_runs(work)
    assert list(parents.status) == ["KILLED"] and list(children.status) == ["KILLED"]  # sum never started

    killed = run_cli([*sweep, no_analysis], work, on_call(9, "SIGKILL"))  # mean's steps 4-6, then sum's 1-5
    assert killed.returncode == -9
    parents2, children2 = child_runs(work)
    assert list(parents2.run_id) == list(parents.run_id)
    assert dict(zip(children2["tags.reduce_loss"], children2.status)) == {"mean": "FINISHED", "sum": "RUNNING"}
    assert by_mode(children2)["mean"] == children.run_id.iloc[0]
    assert sorted(p.name for p in work.glob("checkpoints/*/step_*")) == ["step_00000002", "step_00000004"]  # sum's

    resumed = run_cli([*sweep, no_analysis], work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    parents3, children3 = child_runs(work)
    assert list(parents3.run_id) == list(parents.run_id) and list(parents3.status) == ["FINISHED"]
    assert by_mode(children3) == by_mode(children2) and (children3.status == "FINISHED").all()
    assert dict(zip(children3["tags.reduce_loss"], children3["tags.resumed_from_step"])) == {"mean": "3", "sum": "4"}
    assert not list(work.glob("checkpoints/*/step_*"))  # finished runs keep no checkpoints

    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stderr.read()[-3000:]
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    ref_client = MlflowClient(f"sqlite:///{reference / 'mlflow.db'}")
    ref_ids = by_mode(child_runs(reference)[1])
    for mode, run_id in by_mode(children3).items():
        history = metric_history(client, run_id)
        assert [s for s, _ in history["train/loss"]] == [1, 2, 3, 4, 5, 6]  # sum's step 5 ran twice, logged once
        assert history == metric_history(ref_client, ref_ids[mode]), mode
        for path in ("eval/final.parquet", "eval/step_00000003.parquet", "train/train_grad_weight.parquet"):
            ours = artifact_bytes(client, run_id, path, tmp_path / "ours")
            assert ours == artifact_bytes(ref_client, ref_ids[mode], path, tmp_path / "ref"), (mode, path)

    histories = {run_id: metric_history(client, run_id) for run_id in children3.run_id}

    again = run_cli(sweep, work)  # the same sweep once more, now with its analysis
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("nothing to train") == 2
    parents4, children4 = child_runs(work)
    assert list(parents4.run_id) == list(parents.run_id) and by_mode(children4) == by_mode(children3)
    assert {run_id: metric_history(client, run_id) for run_id in children4.run_id} == histories
    newest = max(work.glob("multirun/*/*"), key=lambda d: d.stat().st_mtime)
    assert len(list(work.glob("multirun/*/*"))) == 4 and (newest / "analysis" / "report.md").exists()


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
