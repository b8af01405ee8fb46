"""Sweep-level work, as a Hydra callback: the parent MLflow run and the analysis at the end."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import mlflow
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from harness.artifacts import parent_run_id, resolve_uri
from harness.credentials import redact
from harness.distributed import world_from_env
from harness.tracking import start_parent_run

log = logging.getLogger(__name__)


class SweepTracking(Callback):
    def __init__(self, analyse: bool = True) -> None:
        self.analyse = analyse
        self.failures: list[str] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not world_from_env().is_main:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        overrides = redact(" ".join(config.hydra.overrides.task))
        start_parent_run(config.tracking, sweep_dir, tags={"sweep_dir": str(sweep_dir.resolve()),
                                                           "sweep_overrides": overrides})

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED:
            self.failures.append(f"{job_return.overrides}: raised (see the job's log)")
        elif isinstance(job_return.return_value, dict) and "failed" in job_return.return_value:
            self.failures.append(f"{job_return.overrides}: {job_return.return_value['failed']}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not world_from_env().is_main:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        parent = parent_run_id(sweep_dir)
        client = MlflowClient(mlflow.get_tracking_uri())
        status = "FAILED" if self.failures else "FINISHED"
        if self.analyse:
            from analysis.compute import Options  # the one place the harness reaches the analysis
            from analysis.run import run_analysis

            try:
                run_analysis(resolve_uri(config.tracking.uri), sweep_dir / "analysis", Options(), parent_run_id=parent)
            except Exception as e:  # the runs are safe in MLflow; say why the analysis is missing
                log.error("analysis of the sweep failed: %s", e)
                client.set_tag(parent, "analysis_error", str(e)[:5000])
                status = "FAILED"
        client.set_terminated(parent, status)
        if self.failures:
            for failure in self.failures:
                log.error("failed job %s", failure)
            sys.exit(1)
