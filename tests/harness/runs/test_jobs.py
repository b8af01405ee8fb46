"""What makes a job and a sweep the same across invocations, and how a sweep ends, in process."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from harness import artifacts

from harness.runs import jobs
from harness.config import CONF_DIR, CONFIG_NAME
from harness.runs.jobs import end_orphans, job_key, job_lock_path
from harness.runs.tracking import experiment_id
from harness.launch.sweep_callback import SweepTracking, end_open_parent, sweep_key
from tests.helpers.store import new_store

IDENTITY = {artifacts.TAG_INIT: "init-a", artifacts.TAG_DATA: "data-a"}


def key(*overrides, identity=IDENTITY, world_size=1, parent="parent-a") -> str:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(CONFIG_NAME, overrides=list(overrides))
    return job_key(cfg, identity, world_size, parent)


def test_a_job_is_its_config_weights_data_world_and_sweep_not_its_checkpoint_settings():
    base = key()
    assert key("trainer.checkpoint_every=7", "trainer.keep_checkpoints=5", "trainer.checkpoint_dir=/x") == base
    others = [key("reduce_loss=sum"), key("seed=1"), key("trainer.lr=0.1"),
              key(identity=IDENTITY | {artifacts.TAG_DATA: "data-b"}),  # same config, edited data
              key(identity=IDENTITY | {artifacts.TAG_INIT: "init-b"}),
              key(world_size=2), key(parent="parent-b"), key(parent=None)]
    assert len({base, *others}) == 1 + len(others)


def tracking(uri: str):
    return OmegaConf.create({"uri": uri, "experiment": "reduce-loss", "artifact_location": None})


def sweep(task: list[str], params: dict | None = None, sweep_dir: str = "s", uri: str = "sqlite:///m.db"):
    return OmegaConf.create({
        "hydra": {"sweep": {"dir": sweep_dir}, "overrides": {"task": task}, "sweeper": {"params": params}},
        "tracking": tracking(uri), "trainer": {"checkpoint_dir": str(Path(sweep_dir).parent / "checkpoints")},
    })


def test_a_sweep_is_the_set_of_its_jobs_in_any_order():
    assert sweep_key(sweep(["reduce_loss=mean,sum", "seed=0"])) == sweep_key(sweep(["seed=0", "reduce_loss=sum,mean"]))
    assert sweep_key(sweep(["reduce_loss=mean,sum", "seed=0"])) != sweep_key(sweep(["reduce_loss=mean,sum", "seed=1"]))
    preset = sweep(["+experiment=all_modes"], {"seed": "0,1"})
    assert sweep_key(preset) != sweep_key(sweep(["+experiment=all_modes"], {"seed": "0,1,2"}))
    assert sweep_key(preset) == sweep_key(sweep(["+experiment=all_modes", "seed=0,1"]))


@pytest.mark.slow
def test_a_repeated_sweep_reuses_its_parent_and_a_failed_analysis_fails_the_sweep(tmp_path, monkeypatch):
    import analysis.run

    uri = new_store(tmp_path / 'mlflow.db')
    client = MlflowClient(uri)
    first = sweep(["reduce_loss=mean,sum"], sweep_dir=str(tmp_path / "a"), uri=uri)
    SweepTracking().on_multirun_start(first)
    parent = artifacts.parent_run_id(tmp_path / "a")
    end_open_parent("KILLED")
    assert client.get_run(parent).info.status == "KILLED"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(analysis.run, "run_analysis", full_disk)
    again = sweep(["reduce_loss=sum,mean"], sweep_dir=str(tmp_path / "b"), uri=uri)
    callback = SweepTracking()
    callback.on_multirun_start(again)
    assert artifacts.parent_run_id(tmp_path / "b") == parent
    assert client.get_run(parent).info.status == "RUNNING"
    with pytest.raises(SystemExit) as exit:
        callback.on_multirun_end(again)  # no job failed; only the analysis
    assert exit.value.code == 1
    run = client.get_run(parent)
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["analysis_error"]

    other = sweep(["reduce_loss=mean,sum", "seed=1"], sweep_dir=str(tmp_path / "c"), uri=uri)
    SweepTracking(analyse=False).on_multirun_start(other)
    assert artifacts.parent_run_id(tmp_path / "c") != parent
    end_open_parent("FINISHED")


HOLD_LOCK = "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(60)"


@pytest.mark.slow
def test_runs_left_running_by_a_process_that_died_are_ended_and_no_others(tmp_path):
    uri, root = new_store(tmp_path / 'mlflow.db'), tmp_path / "checkpoints"
    exp, client = experiment_id(tracking(uri)), MlflowClient(uri)
    runs = {key: client.create_run(exp, tags={artifacts.TAG_JOB: key}).info.run_id
            for key in ("dead", "alive", "elsewhere", "own")}
    for key in ("dead", "alive", "own"):
        job_lock_path(root, key).parent.mkdir(parents=True)
        job_lock_path(root, key).touch()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(job_lock_path(root, "alive"))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        end_orphans(tracking(uri), artifacts.TAG_JOB, lambda key: job_lock_path(root, key), own_key="own")
    finally:
        holder.kill()
    status = {key: client.get_run(run_id).info.status for key, run_id in runs.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING", "own": "RUNNING"}


def test_a_run_that_ends_between_the_search_and_its_lock_keeps_its_status(tmp_path, monkeypatch):
    uri, root = new_store(tmp_path / 'mlflow.db'), tmp_path / "checkpoints"
    exp, client = experiment_id(tracking(uri)), MlflowClient(uri)
    run_id = client.create_run(exp, tags={artifacts.TAG_JOB: "other"}).info.run_id
    job_lock_path(root, "other").parent.mkdir(parents=True)
    job_lock_path(root, "other").touch()
    search = jobs.runs_tagged

    def search_then_finish(*args, **kwargs):
        found = search(*args, **kwargs)  # the run is RUNNING here
        client.set_terminated(run_id, "FINISHED")  # then its process ends it and releases its lock
        return found

    monkeypatch.setattr(jobs, "runs_tagged", search_then_finish)
    end_orphans(tracking(uri), artifacts.TAG_JOB, lambda key: job_lock_path(root, key), own_key="own")
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize("exitcode, status", [(-9, "KILLED"), (15 + 128, "RUNNING")])
def test_a_rank_that_dies_hard_leaves_no_run_running(tmp_path, monkeypatch, exitcode, status):
    """A rank killed by SIGKILL ends nothing itself; its job marks the run KILLED as soon as the
    launcher reports it. A rank stopped by a signal ends its own run (here: left as it is)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    import torch.distributed.launcher.api as launcher_api

    from harness.runs import signals
    from harness.launch.job_ranks import run_ranks

    uri, root = new_store(tmp_path / 'mlflow.db'), tmp_path / "checkpoints"
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(CONFIG_NAME, overrides=[f"tracking.uri={uri}", f"trainer.checkpoint_dir={root}",
                                              "trainer.ranks_per_job=2"])
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id(cfg.tracking), tags={artifacts.TAG_JOB: "crashed"}).info.run_id
    job_lock_path(root, "crashed").parent.mkdir(parents=True)
    job_lock_path(root, "crashed").touch()  # left by rank 0, which held it until it died

    def ranks_that_fail(config, entrypoint):
        def launched(*args):
            failure = ProcessFailure(local_rank=0, pid=1, exitcode=exitcode, error_file="")
            raise ChildFailedError("rank", {0: failure})
        return launched

    monkeypatch.setattr(launcher_api, "elastic_launch", ranks_that_fail)
    with pytest.raises(signals.Interrupted if exitcode > 128 else ChildFailedError):
        run_ranks(cfg, tmp_path / "job", None, None, None)
    assert client.get_run(run_id).info.status == status
