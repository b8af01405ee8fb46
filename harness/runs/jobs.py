"""One job across invocations: its key, its lock, the MLflow run it continues, its checkpoints.

A job is one training run of one resolved config. Its key hashes that config (without the
checkpoint settings), the initial weights and training data it fingerprints to, the world size
and the sweep's parent run. Running the same command again, or a scheduler relaunching the same
job from another folder or process, finds the same key: the MLflow run tagged with it, and the
checkpoints in `<trainer.checkpoint_dir>/<key>/`. A FINISHED job is not trained again; an
unfinished one continues in its run from its newest checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from harness import artifacts, distributed
from harness.runs.checkpoint import Checkpoints, read_meta
from harness.runs.fingerprint import config_fingerprint
from harness.runs.tracking import runs_tagged

log = logging.getLogger(__name__)
CHECKPOINT_SETTINGS = ("checkpoint_every", "keep_checkpoints", "checkpoint_dir")  # not part of the key
# Nor where a job runs and where its compiled graphs are cached: neither changes what it trains.
PLACEMENT_SETTINGS = ("jobs_per_gpu", "compile_cache_dir")
LOCK_FILE = "job.lock"


def job_lock_path(root: Path, key: str) -> Path:
    return Path(root) / key / LOCK_FILE


def sweep_lock_path(root: Path, key: str) -> Path:
    return Path(root) / "sweeps" / f"{key}.lock"


def end_orphans(tracking_cfg, tag: str, lock_of: Callable[[str], Path], own_key: str) -> None:
    """Mark KILLED the runs a dead process left RUNNING (kill -9, a lost node): runs tagged `tag`
    whose lock file `lock_of(key)` exists and no process holds. Others are left alone."""
    running = runs_tagged(tracking_cfg, tag, status="RUNNING")  # points MLflow at the store first
    client = MlflowClient()
    for run in running:
        key = run.data.tags[tag]
        path = lock_of(key)
        if key == own_key or not path.exists():
            continue
        lock = FileLock(path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # its process is alive
        try:
            if client.get_run(run.info.run_id).info.status != "RUNNING":
                continue  # it ended, and its process let go of the lock, after the search
            client.set_tag(run.info.run_id, "stopped", "found RUNNING after its process had ended")
            client.set_terminated(run.info.run_id, "KILLED")
            log.warning("MLflow run %s was left RUNNING by a process that ended; marked KILLED", run.info.run_id)
        finally:
            lock.release()


def job_key(cfg, identity: dict[str, str], world_size: int, parent_run_id: str | None) -> str:
    container = OmegaConf.to_container(cfg, resolve=True)
    for name in CHECKPOINT_SETTINGS + PLACEMENT_SETTINGS:
        container["trainer"].pop(name, None)
    return config_fingerprint({"config": container, "init": identity[artifacts.TAG_INIT],
                               "data": identity[artifacts.TAG_DATA], "world_size": world_size,
                               "parent": parent_run_id or ""})


@dataclass
class Job:
    key: str
    checkpoints: Checkpoints
    run_id: str | None = None  # the MLflow run to continue; None: start one
    resume_from: Path | None = None  # the checkpoint to continue from; None: step 0
    finished: dict[str, float] | None = None  # the run already FINISHED (its val metrics): nothing to train
    lock: FileLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def claim_job(cfg, identity: dict[str, str], world: distributed.World, parent_run_id: str | None) -> Job:
    """What earlier invocations left of this job. Holds the job's lock (on rank 0) until
    `release`; waits while another process trains the same job."""
    key = job_key(cfg, identity, world.size, parent_run_id)
    root = Path(cfg.trainer.checkpoint_dir)
    job = Job(key, Checkpoints(root / key, cfg.trainer.keep_checkpoints, world))
    if world.is_main:
        job.checkpoints.folder.mkdir(parents=True, exist_ok=True)
        job.lock = FileLock(job_lock_path(root, key))
        try:
            job.lock.acquire(timeout=0)
        except Timeout:
            log.warning("another process is training job %s; waiting for it (%s)", key, job.lock.lock_file)
            job.lock.acquire()
        try:
            end_orphans(cfg.tracking, artifacts.TAG_JOB, lambda k: job_lock_path(root, k), key)
            _find_earlier(job, cfg.tracking)
        except BaseException:
            job.release()
            raise
    job.run_id, job.resume_from, job.finished = distributed.broadcast_from_main(
        (job.run_id, job.resume_from, job.finished), world)
    return job


def _find_earlier(job: Job, tracking_cfg) -> None:
    runs = runs_tagged(tracking_cfg, artifacts.TAG_JOB, job.key)
    done = next((r for r in runs if r.info.status == "FINISHED"), None)
    if done is not None:
        job.run_id = done.info.run_id
        job.finished = {k: v for k, v in done.data.metrics.items() if k.startswith("val/")}
        job.checkpoints.remove_all()  # only needed to resume
        return
    latest = job.checkpoints.latest()
    owner = read_meta(latest).get("run_id") if latest is not None else None
    ids = [r.info.run_id for r in runs]
    if latest is not None and owner not in ids:
        log.warning("checkpoints in %s belong to no run of this job in the store; starting at step 0",
                    job.checkpoints.folder)
        job.checkpoints.remove_all()
        latest = None
    job.run_id = owner if latest is not None else (ids[0] if ids else None)
    job.resume_from = latest
