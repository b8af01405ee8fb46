"""MLflow: where runs go, the sweep's parent run, and each training run (rank 0 only)."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from harness.artifacts import PARENT_ID_FILE, resolve_uri
from harness.credentials import redact

log = logging.getLogger(__name__)
MAX_PARAM_CHARS = 500


def _default_artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def experiment_id(tracking_cfg) -> str:
    """Point MLflow at the configured store and return the experiment's id (creating both)."""
    uri = resolve_uri(tracking_cfg.uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking_cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    root = tracking_cfg.get("artifact_location") or _default_artifact_root(uri)
    return client.create_experiment(tracking_cfg.experiment, artifact_location=root)


def flat_params(cfg) -> dict[str, str]:
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = redact(str(node))[:MAX_PARAM_CHARS]

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def start_parent_run(tracking_cfg, sweep_dir: Path, tags: dict[str, str]) -> str:
    """Create the sweep's parent run and leave its id in the sweep folder for the jobs."""
    exp = experiment_id(tracking_cfg)
    run = MlflowClient().create_run(exp, run_name=f"sweep {sweep_dir.name}", tags=tags)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / PARENT_ID_FILE).write_text(run.info.run_id)
    return run.info.run_id


class RunLogger:
    """Logs one training run; a no-op on ranks other than 0."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.run_id: str | None = None

    def start(self, tracking_cfg, run_name: str, tags: dict, parent_id: str | None) -> None:
        if not self.enabled:
            return
        exp = experiment_id(tracking_cfg)
        run = mlflow.start_run(experiment_id=exp, run_name=run_name, tags=tags, parent_run_id=parent_id)
        self.run_id = run.info.run_id
        log.info("MLflow run %s (%s) in %s", run_name, self.run_id, mlflow.get_tracking_uri())

    def params(self, params: dict) -> None:
        if self.enabled:
            mlflow.log_params(params)

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            mlflow.log_metrics(metrics, step=step)

    def tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            mlflow.set_tags(tags)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self.enabled:
            mlflow.log_artifact(str(path), artifact_path=folder)

    def end(self, error: BaseException | None = None) -> None:
        if not self.enabled or mlflow.active_run() is None:
            return
        if error is not None:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
        mlflow.end_run("FAILED" if error is not None else "FINISHED")
