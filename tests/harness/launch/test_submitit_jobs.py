"""Jobs that submitit runs (SLURM's launcher, run locally), each in its own process: a job killed
outright resumes when the command is run again; a job sent submitit's preemption signal
checkpoints at that step, is requeued by submitit and resumes, both into the same MLflow run; a
job that fails fails the sweep."""

import os
import re
import signal

import pytest
from mlflow.tracking import MlflowClient

from harness.runs.checkpoint import read_meta
from tests.helpers.cli import QUICK, child_runs, has_module, run_cli
from tests.helpers.submitit_jobs import job_logs, run_ids, start_sweep, task_pid, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not has_module("hydra_plugins.hydra_submitit_launcher"),
                       reason="needs hydra-submitit-launcher (pip install '.[launchers]')"),
]
STEPS = 24
SWEEP = ["-m", "reduce_loss=mean,sum", "hydra/launcher=submitit_local", "hydra.sweep.dir=sweep",
         *[a for a in QUICK if not a.startswith(("trainer.max_steps=", "trainer.eval_every="))],
         f"trainer.max_steps={STEPS}", f"trainer.eval_every={STEPS}"]


def _client(cwd) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")


def _steps_logged(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, "train/loss")]


def _checkpoint_of(cwd, run_id: str):
    for path in cwd.glob("checkpoints/*/step_*"):
        try:
            if read_meta(path)["run_id"] == run_id:
                return path
        except FileNotFoundError:
            pass  # replaced by a newer one meanwhile
    return None


def _assert_one_paired_sweep(cwd, resumed_run: str, resumed_from: int) -> None:
    """Both runs FINISHED under one parent, still paired, every step logged once; the analysis
    written; `resumed_run` continued after step `resumed_from`."""
    parents, children = child_runs(cwd)
    assert len(parents) == 1 and parents.status.iloc[0] == "FINISHED"
    assert len(children) == 2 and (children.status == "FINISHED").all()
    assert (children["tags.mlflow.parentRunId"] == parents.run_id.iloc[0]).all()
    assert sorted(children["tags.reduce_loss"]) == ["mean", "sum"]
    for tag in ("pair_id", "init_fingerprint", "data_fingerprint"):
        assert children[f"tags.{tag}"].nunique() == 1, tag
    resumed = children.set_index("run_id").loc[resumed_run]
    assert resumed["tags.reduce_loss"] == "sum" and resumed["tags.resumed_from_step"] == str(resumed_from)
    for run_id in children.run_id:
        assert _steps_logged(_client(cwd), run_id) == list(range(1, STEPS + 1)), run_id
    assert (cwd / "sweep" / "analysis" / "report.md").exists()


def test_a_job_killed_mid_run_resumes_into_its_run_when_the_command_is_run_again(tmp_path):
    args = [*SWEEP, "trainer.checkpoint_every=4"]
    launch = start_sweep(args, tmp_path)
    sweep = tmp_path / "sweep"
    try:
        run_id = wait_for("sum's MLflow run", lambda: run_ids(sweep).get("sum-seed0"), launch)
        saved = wait_for("a checkpoint of sum's run", lambda: _checkpoint_of(tmp_path, run_id), launch)
        os.kill(task_pid(sweep, run_id), signal.SIGKILL)  # like a lost node: no handler runs
    finally:
        returncode = launch.wait(timeout=600)
    assert returncode != 0  # the launcher finds no result for the killed job
    assert _client(tmp_path).get_run(run_id).info.status == "RUNNING"  # killed before it finished
    last = read_meta(sorted(saved.parent.glob("step_*"))[-1])["step"]
    assert 4 <= last < STEPS

    again = run_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_one_paired_sweep(tmp_path, run_id, last)
    assert not list(tmp_path.glob("checkpoints/*/step_*"))


def test_submitits_preemption_signal_checkpoints_at_that_step_and_the_requeued_job_resumes(tmp_path):
    args = [*SWEEP, "trainer.checkpoint_every=0"]  # checkpoints only when a stop signal arrives
    launch = start_sweep(args, tmp_path)
    sweep, client = tmp_path / "sweep", _client(tmp_path)
    try:
        run_id = wait_for("sum's MLflow run", lambda: run_ids(sweep).get("sum-seed0"), launch)
        wait_for("sum's step 2", lambda: True if max(_steps_logged(client, run_id), default=0) >= 2 else None, launch)
        os.kill(task_pid(sweep, run_id), signal.SIGUSR2)  # what SLURM sends before preemption or timeout
        wait_for("sum's run KILLED", lambda: True if client.get_run(run_id).info.status == "KILLED" else None, launch)
    finally:
        returncode = launch.wait(timeout=600)
    assert returncode == 0, (tmp_path / "launch.err").read_text()[-3000:]

    log = next(p.read_text() for p in job_logs(sweep) if run_id in p.read_text())
    stopped = re.findall(r"stopped by SIGUSR2 after step (\d+) \(checkpoint saved\); submitit requeues the job", log)
    assert len(stopped) == 1 and 2 <= int(stopped[0]) < STEPS, log
    assert "Requeued job" in log and log.count(f"({run_id})") == 2  # the requeued job logs into the same run
    _assert_one_paired_sweep(tmp_path, run_id, int(stopped[0]))


def test_jobs_that_fail_in_their_own_processes_fail_the_sweep_and_are_named(tmp_path):
    no_analysis = "hydra.callbacks.sweep_tracking.analyse=false"  # the analysis would fail on them too
    proc = run_cli([*SWEEP, "trainer.lr=1e20", no_analysis], tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED: ")]
    assert len(failed) == 2 and all("ended FAILED: NonFiniteError: train/grad_norm=nan at step" in f for f in failed)
    assert {f.split()[3] for f in failed} == {"mean-seed0", "sum-seed0"}, failed
    parents, children = child_runs(tmp_path)
    assert list(parents.status) == ["FAILED"] and list(children.status) == ["FAILED", "FAILED"]
