"""`hydra/launcher=slurm` against a real SLURM cluster on 127.0.0.1 (tests/helpers/slurm.py):
sweeps submitted as job arrays by sbatch, their state read through sacct, preemption by
`scontrol requeue` and by the time-limit signal of `--signal`, `scancel`, a job that fails, and
a job of two ranks started as two SLURM tasks.

`python -m pytest -m slurm` runs these alone; they skip where root or the packages are missing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from contextlib import suppress
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.cli import QUICK, child_runs, has_module, run_cli
from tests.helpers.slurm import signal_pending, slurm_cluster, stopped, slurm_job_id, task_pids  # noqa: F401 (a fixture)
from tests.helpers.submitit_jobs import RUN_LINE, job_logs, start_sweep, wait_for

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(not has_module("hydra_plugins.hydra_submitit_launcher"),
                       reason="needs hydra-submitit-launcher (pip install '.[launchers]')"),
]
STEPS = 24
# CPU jobs on the test cluster: no GPUs, no memory request, one core and one thread each
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=null", "hydra.launcher.timeout_min=5", "hydra.sweep.dir=sweep",
            "trainer.device=cpu", "trainer.threads=1", f"trainer.max_steps={STEPS}", f"trainer.eval_every={STEPS}"]
SLURM = [*LAUNCHER, *[a for a in QUICK if not a.startswith(("trainer.max_steps=", "trainer.eval_every="))]]


def _ended(launch, timeout_s: float = 300) -> int:
    """The launching process's exit code; killed (by its pid) if it is still waiting after
    `timeout_s`, as it does forever for a job whose state sacct cannot tell."""
    try:
        return launch.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        launch.kill()
        launch.wait()
        raise AssertionError(f"the launching process still waited after {timeout_s} s") from None


def _client(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")


def _steps_logged(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, "train/loss")]


def _job_of(sweep: Path, name: str) -> tuple[str, str] | None:
    """(SLURM job id, MLflow run id) of the job whose run is `name` (e.g. `sum-seed1`), once its log names it."""
    for log in job_logs(sweep):
        found = dict(RUN_LINE.findall(log.read_text(errors="replace")))
        if name in found:
            return slurm_job_id(log), found[name]
    return None


def _freeze_after_step(cluster, sweep: Path, job_id: str, launch, step: int = 2) -> list[int]:
    """Stop (SIGSTOP) the job's tasks as soon as its progress bar shows `step` done; their pids.
    The log is read, not MLflow, and the pids found beforehand: these CPU jobs train 24 steps in
    about 3 s, faster than a round trip through the store."""
    tasks = task_pids(cluster, job_id)

    def past_step():
        done = [int(k) for k in re.findall(rf"\| *(\d+)/{STEPS} \[", _job_log(sweep, job_id))]
        return True if done and max(done) >= step else None
    wait_for(f"{job_id}'s step {step}", past_step, launch, timeout_s=120)
    assert tasks and any(Path(f"/proc/{pid}").exists() for pid in tasks), f"{job_id} ended before it could be stopped"
    for pid in tasks:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    return tasks


def _thaw_once_signalled(tasks: list[int], signum: int, launch) -> None:
    """Continue the stopped tasks once SLURM's signal `signum` waits for them (or SLURM has
    continued them itself, as it does before SIGTERM): it is handled mid-run."""
    wait_for(f"signal {signum} sent to the job", lambda: True if any(signal_pending(p, signum) for p in tasks)
             or not any(stopped(p) for p in tasks) else None, launch, timeout_s=60)
    for pid in tasks:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _status(client: MlflowClient, run_id: str, status: str):
    return lambda: True if client.get_run(run_id).info.status == status else None


def _final_losses(cwd: Path, run_id: str) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval/final.parquet",
                                               tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}", dst_path=str(cwd / run_id))
    return pd.read_parquet(path).sort_values("example_id").reset_index(drop=True)


def _job_log(sweep: Path, job_id: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((sweep / ".submitit" / job_id).glob("*_log.*")))


def _held_array(cluster, sweep: Path) -> str | None:
    for script in sweep.glob(".submitit/*/*_submission.sh"):
        array = script.parent.name
        if "JobHeldUser" in cluster.run("squeue", "-h", "-j", array, "-o", "%r", check=False):
            return array
    return None


def _assert_sweep(cwd: Path, launch_out: str, modes_seeds: list[tuple[str, int]], analysed: bool = True) -> pd.DataFrame:
    """One parent FINISHED, every child FINISHED under it and paired, each step logged once, the
    analysis written once (where `analysed`) and the summary printed by the launching process;
    the children."""
    parents, children = child_runs(cwd)
    assert len(parents) == 1 and parents.status.iloc[0] == "FINISHED"
    assert len(children) == len(modes_seeds) and (children.status == "FINISHED").all(), children.status
    assert (children["tags.mlflow.parentRunId"] == parents.run_id.iloc[0]).all()
    assert sorted(zip(children["tags.reduce_loss"], children["tags.seed"].astype(int))) == sorted(modes_seeds)
    for _, pair in children.groupby("tags.seed"):
        for tag in ("pair_id", "init_fingerprint", "data_fingerprint"):
            assert pair[f"tags.{tag}"].nunique() == 1, tag
    for run_id in children.run_id:
        assert _steps_logged(_client(cwd), run_id) == list(range(1, STEPS + 1)), run_id
    assert [p.parent for p in cwd.glob("sweep/**/report.md")] == ([cwd / "sweep" / "analysis"] if analysed else [])
    assert launch_out.count("== sweep finished ==") == 1, launch_out[-2000:]
    assert launch_out.count("analysis of") == int(analysed), launch_out[-2000:]
    return children


def test_a_paired_sweep_runs_as_a_job_array_and_survives_requeue_and_the_time_limit_signal(slurm_cluster, tmp_path):
    """Two sweeps at once. `paired` (mean, sum x seeds 0, 1): one job array; its job sum-seed1 is
    sent `scontrol requeue` mid-run. `limited` (sum x seeds 0, 1): its job sum-seed0 reaches its
    time limit mid-run and gets the signal of `--signal`. Each interrupted run is compared with
    the same job, uninterrupted, in the other sweep. `limited` is submitted held: its job sum-seed0
    is released once the requeue is done (these jobs train 24 steps in seconds and would otherwise
    end unwatched), sum-seed1 once sum-seed0 has been signalled (a task stopped for a minute may
    hold the SQLite store's lock, which a job starting meanwhile waits for only 5 s)."""
    cluster = slurm_cluster
    paired, limited = tmp_path / "paired", tmp_path / "limited"
    for cwd in (paired, limited):
        cwd.mkdir()
    started = time.monotonic()
    launches = {paired: start_sweep(["-m", "reduce_loss=mean,sum", "seed=0,1", *SLURM, "trainer.checkpoint_every=0"],
                                    paired),
                limited: start_sweep(["-m", "reduce_loss=sum", "seed=0,1", *SLURM, "trainer.checkpoint_every=0",
                                      "+hydra.launcher.additional_parameters.hold=true",
                                      "hydra.callbacks.sweep_tracking.analyse=false"], limited)}  # one mode: nothing to compare
    try:
        # scontrol requeue: SLURM sends SIGTERM, kills the job KillWait later, and starts it again
        client = _client(paired)
        requeued, requeued_run = wait_for("sum-seed1's run", lambda: _job_of(paired / "sweep", "sum-seed1"),
                                          launches[paired])
        tasks = _freeze_after_step(cluster, paired / "sweep", requeued, launches[paired])
        cluster.run("scontrol", "requeue", requeued)
        _thaw_once_signalled(tasks, signal.SIGTERM, launches[paired])
        wait_for("sum-seed1 KILLED", _status(client, requeued_run, "KILLED"), launches[paired], timeout_s=90)

        # the time limit: SLURM sends USR2 signal_delay_s before it, at its next time-limit check
        # (every 30 s). The job's task is stopped (to SLURM it still runs, and a signal sent to it
        # waits), its limit shortened to 2 minutes (within the 120 s lead time), and continued
        # once the signal waits for it: the signal arrives mid-run.
        client = _client(limited)
        array = wait_for("the held job array", lambda: _held_array(cluster, limited / "sweep"), launches[limited])
        cluster.run("scontrol", "release", f"{array}_0")  # sum-seed0 (job #0) alone
        timed, timed_run = wait_for("sum-seed0's run", lambda: _job_of(limited / "sweep", "sum-seed0"),
                                    launches[limited])
        tasks = _freeze_after_step(cluster, limited / "sweep", timed, launches[limited])
        cluster.run("scontrol", "update", f"JobId={timed}", "TimeLimit=2")
        _thaw_once_signalled(tasks, signal.SIGUSR2, launches[limited])
        wait_for("sum-seed0 KILLED", _status(client, timed_run, "KILLED"), launches[limited], timeout_s=60)
        # the requeued job gets its time back (else the same signal would come again at its start)
        cluster.run("scontrol", "update", f"JobId={timed}", "TimeLimit=5")
        cluster.run("scontrol", "release", f"{array}_1")
    finally:
        returncodes = {cwd: _ended(proc) for cwd, proc in launches.items()}
    elapsed = time.monotonic() - started
    for cwd, code in returncodes.items():
        assert code == 0, (cwd / "launch.err").read_text()[-3000:]

    for cwd, job_id, run_id, signame, modes_seeds, twin in (
            (paired, requeued, requeued_run, "SIGTERM", [(m, s) for m in ("mean", "sum") for s in (0, 1)], limited),
            (limited, timed, timed_run, "SIGUSR2", [("sum", 0), ("sum", 1)], paired)):
        children = _assert_sweep(cwd, (cwd / "launch.out").read_text(), modes_seeds, analysed=cwd == paired)
        log = _job_log(cwd / "sweep", job_id)
        stopped = re.findall(rf"stopped by {signame} after step (\d+) \(checkpoint saved\)", log)
        assert len(stopped) == 1 and 2 <= int(stopped[0]) < STEPS, log[-3000:]
        assert log.count(f"({run_id})") == 2, log[-3000:]  # the requeued job logs into the same run
        run = children.set_index("run_id").loc[run_id]
        assert run["tags.resumed_from_step"] == stopped[0]
        assert "Restarts=1" in cluster.run("scontrol", "show", "job", job_id)
        _, others = child_runs(twin)
        seed = int(run["tags.seed"])
        uninterrupted = others[(others["tags.reduce_loss"] == "sum") & (others["tags.seed"] == str(seed))].run_id.iloc[0]
        assert "tags.resumed_from_step" not in others or pd.isna(others.set_index("run_id").loc[uninterrupted,
                                                                                              "tags.resumed_from_step"])
        pd.testing.assert_frame_equal(_final_losses(cwd, run_id), _final_losses(twin, uninterrupted), check_exact=True)
    assert "USR2@120" in (limited / "sweep" / ".submitit" / timed.split("_")[0] / f"{timed.split('_')[0]}_submission.sh"
                          ).read_text()
    print(f"paired sweep and time-limited sweep: {elapsed:.0f} s")


def test_a_cancelled_job_ends_killed_and_the_same_command_trains_only_what_is_missing(slurm_cluster, tmp_path):
    args = ["-m", "reduce_loss=mean,sum", *SLURM, "trainer.checkpoint_every=0"]
    client = _client(tmp_path)
    started = time.monotonic()
    launch = start_sweep(args, tmp_path)
    try:
        cancelled, run_id = wait_for("sum-seed0's run", lambda: _job_of(tmp_path / "sweep", "sum-seed0"), launch)
        tasks = _freeze_after_step(slurm_cluster, tmp_path / "sweep", cancelled, launch)
        slurm_cluster.run("scancel", cancelled)
        _thaw_once_signalled(tasks, signal.SIGTERM, launch)
        wait_for("sum-seed0 KILLED", _status(client, run_id, "KILLED"), launch, timeout_s=90)
    finally:
        returncode = _ended(launch)
    first = time.monotonic() - started
    err = (tmp_path / "launch.err").read_text()
    assert returncode != 0
    assert f"Job {cancelled} " in err and "CANCELLED" in err, err[-3000:]
    stopped = re.findall(r"stopped by SIGTERM after step (\d+) \(checkpoint saved\)", _job_log(tmp_path / "sweep", cancelled))
    assert len(stopped) == 1 and 2 <= int(stopped[0]) < STEPS
    assert client.get_run(run_id).info.status == "KILLED"  # not left RUNNING

    again = run_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    children = _assert_sweep(tmp_path, again.stdout, [("mean", 0), ("sum", 0)])
    resumed = children.set_index("run_id").loc[run_id]
    assert resumed["tags.resumed_from_step"] == stopped[0]
    logs = "".join(p.read_text(errors="replace") for p in job_logs(tmp_path / "sweep"))
    assert logs.count("nothing to train") == 1  # mean FINISHED in the first sweep: skipped
    print(f"cancelled sweep {first:.0f} s, then the same command {time.monotonic() - started - first:.0f} s")


def _conversations(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"question {i} " + "x" * (i % 7)},
                          {"role": "assistant", "content": f"answer {i} " + "y" * (i * 13 % 40)}]} for i in range(n)]


def test_a_job_that_fails_is_named_and_the_others_finish(slurm_cluster, tmp_path):
    """Two jobs on two data files; one file is spoilt after the launching process checked it
    (the jobs are submitted held, then released), so its job fails in its own SLURM job."""
    files = {}
    for name in ("good", "bad"):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in _conversations(48)))
    args = ["-m", "reduce_loss=sum", "data=hf", "data.path=json", f"data.data_files={files['good']},{files['bad']}",
            "data.val_fraction=0.25", f"data.cache_dir={tmp_path / 'cache'}", "trainer.batch_size=8", *LAUNCHER,
            "+hydra.launcher.additional_parameters.hold=true", "hydra.callbacks.sweep_tracking.analyse=false"]
    started = time.monotonic()
    launch = start_sweep(args, tmp_path)
    try:
        array = wait_for("the held job array", lambda: _held_array(slurm_cluster, tmp_path / "sweep"), launch)
        files["bad"].write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n' * 48)
        slurm_cluster.run("scontrol", "release", array)
    finally:
        returncode = _ended(launch)
    elapsed = time.monotonic() - started
    out = (tmp_path / "launch.out").read_text()
    assert returncode == 1, out[-3000:]
    parents, children = child_runs(tmp_path)
    assert list(parents.status) == ["FAILED"]
    by_file = children.set_index("params.data.data_files")
    assert by_file.loc[str(files["good"]), "status"] == "FINISHED"
    assert _steps_logged(_client(tmp_path), by_file.loc[str(files["good"]), "run_id"]) == list(range(1, STEPS + 1))
    # the job failed loading its data, before training: its run is FAILED with the error on it
    bad = by_file.loc[str(files["bad"])]
    assert bad.status == "FAILED" and bad["tags.error"].startswith("DataError") and "no assistant turn" in bad["tags.error"]
    failed = [line for line in out.splitlines() if line.startswith("FAILED: ")]
    assert len(failed) == 1, out[-3000:]
    assert f"({bad.run_id}) ended FAILED: DataError" in failed[0] and "no assistant turn" in failed[0], failed
    print(f"sweep with a failing job: {elapsed:.0f} s")


def test_a_job_of_two_ranks_runs_as_two_slurm_tasks_as_under_the_local_launcher(slurm_cluster, tmp_path):
    """trainer.ranks_per_job=2: SLURM starts the two gloo ranks as the job's two tasks
    (tasks_per_node follows ranks_per_job); the run equals the same job of two ranks that the
    basic launcher starts with torch's elastic launcher."""
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    for cwd in (on_slurm, local):
        cwd.mkdir()
    job = ["-m", "reduce_loss=mean", "trainer.ranks_per_job=2", "hydra.callbacks.sweep_tracking.analyse=false"]
    started = time.monotonic()
    launch = start_sweep([*job, *SLURM], on_slurm)
    try:
        ref = run_cli([*job, *[a for a in SLURM if not a.startswith("hydra.launcher") and a != "hydra/launcher=slurm"]],
                      local)
        assert ref.returncode == 0, ref.stderr[-3000:]
    finally:
        returncode = _ended(launch)
    assert returncode == 0, (on_slurm / "launch.err").read_text()[-3000:]
    elapsed = time.monotonic() - started
    (job_id,) = [p.parent.name for p in on_slurm.glob("sweep/.submitit/*/*_submission.sh")]  # one job: no array
    assert "#SBATCH --ntasks-per-node=2" in (on_slurm / "sweep/.submitit" / job_id / f"{job_id}_submission.sh").read_text()
    assert "NumTasks=2" in slurm_cluster.run("scontrol", "show", "job", job_id)
    assert len(list((on_slurm / "sweep/.submitit" / job_id).glob("*_result.pkl"))) == 2  # each task ran the job
    runs = {}
    for cwd in (on_slurm, local):
        parents, children = child_runs(cwd)
        assert len(children) == 1 and children.status.iloc[0] == "FINISHED" and children["tags.world_size"].iloc[0] == "2"
        runs[cwd] = children.run_id.iloc[0]
    histories = {cwd: [(m.step, m.value) for m in _client(cwd).get_metric_history(run_id, "train/grad_norm")]
                 for cwd, run_id in runs.items()}
    assert [s for s, _ in histories[on_slurm]] == list(range(1, STEPS + 1))
    assert histories[on_slurm] == pytest.approx(histories[local], rel=1e-6)
    pd.testing.assert_frame_equal(_final_losses(on_slurm, runs[on_slurm]), _final_losses(local, runs[local]),
                                  check_exact=True)
    print(f"two-rank job on SLURM and under the basic launcher: {elapsed:.0f} s")
