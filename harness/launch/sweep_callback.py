"""Sweep-level work, as a Hydra callback: the parent MLflow run and the analysis at the end."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from harness.artifacts import TAG_SWEPT_KEYS, bucket_keys, parent_run_id, resolve_uri
from harness.runs.credentials import redact
from harness.distributed import world_from_env
from harness.runs.fingerprint import config_fingerprint
from harness.runs.jobs import end_orphans, sweep_lock_path
from harness.launch.preflight import expand_jobs
from harness.runs.summary import sweep_summary
from harness.runs.tracking import (SWEEP_KEY_TAG, job_values, runs_link, server_gone,
                                   set_runs_view, start_parent_run, swept_keys)

log = logging.getLogger(__name__)

_open_parent: tuple[str, str] | None = None  # (store, run id) of the parent run until the sweep ends
_sweep_lock: FileLock | None = None  # held while the sweep runs: its parent RUNNING is not an orphan


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The overrides of each of the sweep's jobs."""
    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=True) if params else {}
    return expand_jobs([f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task))


def sweep_key(config: DictConfig, jobs: list[list[str]] | None = None) -> str:
    """The same for every run of the same sweep: a hash of its jobs' overrides (`sweep_jobs`,
    expanded here unless given), in any order."""
    jobs = sweep_jobs(config) if jobs is None else jobs
    return config_fingerprint({"experiment": config.tracking.experiment, "jobs": sorted(sorted(j) for j in jobs)})


def failed_elsewhere(config: DictConfig, since_ms: int, expected: int) -> list[str]:
    """The failed jobs of a sweep whose jobs ran in other processes (submitit, joblib), where
    their `on_job_end` ran too: the sweep's child runs that ended otherwise than FINISHED after
    `since_ms`, and jobs that left no run at all (of the `expected` jobs)."""
    sweep_dir, uri = Path(config.hydra.sweep.dir), resolve_uri(config.tracking.uri)
    client, parent = MlflowClient(uri), parent_run_id(sweep_dir)
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent}'", max_results=10_000)
    failures = [f"MLflow run {r.info.run_name} ({r.info.run_id}) ended {r.info.status}: "
                f"{(r.data.tags.get('error') or r.data.tags.get('stopped') or 'see its log')[:300]}"
                for r in children if r.info.status != "FINISHED" and (r.info.end_time or since_ms) >= since_ms]
    if len(children) < expected:
        errors = [f"job {p.parent.name}: {p.read_text(errors='replace').strip()[:300]}"
                  for p in sorted(sweep_dir.glob(f"*/{JOB_ERROR_FILE}"))
                  if p.stat().st_mtime * 1000 >= since_ms and not run_started(p.parent, since_ms)]
        failures.append(f"{expected - len(children)} of {expected} jobs made no MLflow run"
                        + (f", failing before it started: {'; '.join(errors)}" if errors else "")
                        + f" (see their logs in {sweep_dir})")
    return failures


# A job that fails in a process of its own writes its error here, in its folder, for the launching
# process: the only trace of a job that failed before its MLflow run started (bad data, a model
# that does not load) when the jobs ran on other machines.
JOB_ERROR_FILE = "job_error.txt"


def write_job_error(job_dir: Path, error: str) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / JOB_ERROR_FILE).write_text(redact(error) + "\n")


def run_started(job_dir: Path, since_ms: int) -> bool:
    """Whether the job's run started in this sweep (it writes resolved_config.yaml when it does)."""
    config = job_dir / "resolved_config.yaml"
    return config.exists() and config.stat().st_mtime * 1000 >= since_ms


def end_open_parent(status: str | None) -> None:
    """End the sweep's parent run if the sweep could not (a stop signal, an error in Hydra);
    `None`: let go of it without telling the store (a server that no longer answers)."""
    global _open_parent, _sweep_lock
    if _open_parent is not None:
        uri, run_id = _open_parent
        _open_parent = None
        if status is not None:
            MlflowClient(uri).set_terminated(run_id, status)
    if _sweep_lock is not None:
        _sweep_lock.release()
        _sweep_lock = None


def _hold_sweep_lock(path: Path) -> FileLock | None:
    """The sweep's lock, unless the same sweep runs in another process right now (then both
    share its parent run, and each job runs once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


class SweepTracking(Callback):
    def __init__(self, analyse: bool = True) -> None:
        self.analyse = analyse
        self.failures: list[str] = []
        self.jobs_ended = 0  # in this process; 0 when a launcher ran them in others
        self.started_ms = 0
        self.jobs: list[list[str]] = []  # each job's overrides
        self.notes: list[str] = []  # for the summary: why there is no comparison, say

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _open_parent, _sweep_lock
        if not world_from_env().is_main:
            return
        self.started_ms = int(time.time() * 1000)
        sweep_dir = Path(config.hydra.sweep.dir)
        overrides = redact(" ".join(config.hydra.overrides.task))
        self.jobs = sweep_jobs(config)
        key, root = sweep_key(config, self.jobs), Path(config.trainer.checkpoint_dir)
        try:
            _sweep_lock = _hold_sweep_lock(sweep_lock_path(root, key))
            end_orphans(config.tracking, SWEEP_KEY_TAG, lambda k: sweep_lock_path(root, k), key)
            parent = start_parent_run(config.tracking, sweep_dir, key,
                                      tags={"sweep_dir": str(sweep_dir.resolve()), "sweep_overrides": overrides,
                                            TAG_SWEPT_KEYS: ",".join(swept_keys(self.jobs))})
        except Exception as e:  # Hydra would only warn and run the jobs without a parent
            sys.exit(f"error: cannot start the sweep's MLflow run in {config.tracking.uri}: "
                     f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        _open_parent = (resolve_uri(config.tracking.uri), parent)
        params = {k: redact(str(OmegaConf.select(config, k))) for k in SWEEP_PARAMS if OmegaConf.select(config, k) is not None}
        client = MlflowClient(_open_parent[0])
        logged = client.get_run(parent).data.params  # a repeated sweep reuses its parent: params stay as first logged
        client.log_batch(parent, params=[Param(k, v[:6000]) for k, v in
                                         (params | {"sweep_overrides": overrides}).items() if k not in logged])
        set_runs_view(client, parent)  # the link the summary prints works from now on

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        self.jobs_ended += 1
        if job_return.status == JobStatus.FAILED:
            self.failures.append(f"{job_return.overrides}: raised (see the job's log)")
        elif isinstance(job_return.return_value, dict) and "failed" in job_return.return_value:
            self.failures.append(f"{job_return.overrides}: {job_return.return_value['failed']}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not world_from_env().is_main:
            return
        failed, results, link = list(self.failures), None, None
        uri = resolve_uri(config.tracking.uri)
        if server_gone(uri):
            failed.append(f"the MLflow server {uri} no longer answers: no analysis, and the sweep's runs stay "
                          "RUNNING there until the next sweep against it marks them KILLED")
            end_open_parent(None)
        else:
            if not self.jobs_ended:
                try:
                    failed += failed_elsewhere(config, self.started_ms, len(self.jobs))
                except Exception as e:
                    failed.append(f"reading the jobs' runs from MLflow: {type(e).__name__}: {e}")
            try:
                results = self._analyse(config)
            except Exception as e:  # the runs are safe in MLflow; say why the analysis is missing
                log.error("analysis of the sweep failed: %s", e)
                failed.append(f"the analysis of the sweep: {e}")
            try:
                link = self._runs_view(config)
            except Exception as e:
                failed.append(f"the view of the sweep's runs in MLflow: {type(e).__name__}: {e}")
            try:
                end_open_parent("FAILED" if failed else "FINISHED")
            except Exception as e:  # Hydra would only warn, and exit 0
                failed.append(f"ending the sweep's MLflow run: {e}")
        print(redact(sweep_summary(Path(config.hydra.sweep.dir), uri, results, failed, link, self.notes)), flush=True)
        if failed:
            sys.exit(1)

    @staticmethod
    def _runs_view(config: DictConfig) -> str | None:
        """The view of the sweep's runs, now with their metrics as columns; the UI's link to it."""
        parent, uri = parent_run_id(Path(config.hydra.sweep.dir)), resolve_uri(config.tracking.uri)
        client = MlflowClient(uri)
        view = set_runs_view(client, parent)
        return runs_link(uri, client.get_run(parent).info.experiment_id, view)

    def _analyse(self, config: DictConfig):
        if not self.analyse:
            return None
        modes = job_values(self.jobs, "reduce_loss", str(OmegaConf.select(config, "reduce_loss", default="mean")))
        if len(modes) < 2:  # seed noise of one reduction, say: nothing to compare, and no failure
            self.notes.append(f"nothing to compare: every job of this sweep used reduce_loss={modes.pop()}; "
                              "sweep two or more reductions for a comparison (-m reduce_loss=mean,sum ...)")
            return None
        from analysis.compute import Options  # the one place the harness reaches the analysis
        from analysis.run import run_analysis

        sweep_dir = Path(config.hydra.sweep.dir)
        parent, uri = parent_run_id(sweep_dir), resolve_uri(config.tracking.uri)
        try:
            results = run_analysis(uri, sweep_dir / "analysis", Options(), parent_run_id=parent)
        except Exception as e:
            MlflowClient(uri).set_tag(parent, "analysis_error", str(e)[:5000])
            raise
        if not hasattr(results, "tuned"):  # a sweep that varies more keys logs its own (analysis/tuning.py)
            log_headline(MlflowClient(uri), parent, results)
        return results


# The sweep's settings worth seeing on its parent run (every job's full config is on its own run).
SWEEP_PARAMS = ["model.name_or_path", "model.kind", "data.kind", "data.path", "trainer.max_steps",
                "trainer.batch_size", "trainer.lr", "trainer.max_grad_norm", "loss_scale"]


def log_headline(client: MlflowClient, parent: str, results) -> None:
    """The answer on the parent run: per mode and bucket, the final paired difference against the
    reference and its interval (example-weighted), and how many intervals exclude zero."""
    final = results.paired_diff[results.paired_diff.step == results.final_step]
    metrics = {"distinguishable_buckets": float(final.distinguishable.sum())}
    keys = bucket_keys(results.labels)  # b1_69-73, ...: MLflow lists them in the buckets' order
    for row in final.itertuples():
        name = f"diff_vs_{results.options.reference}/{row.reduce_loss}/{keys[int(row.bucket)]}"
        metrics |= {name: row.diff, f"{name}/ci_low": row.ci_low, f"{name}/ci_high": row.ci_high}
    step = results.final_step
    client.log_batch(parent, metrics=[Metric(k, float(v), int(time.time() * 1000), step)
                                      for k, v in metrics.items() if v == v])
