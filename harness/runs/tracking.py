"""MLflow: where runs go, the sweep's parent run, and each training run (rank 0 only)."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import nullcontext, suppress
from pathlib import Path

import mlflow
import requests
from filelock import FileLock
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from harness.artifacts import PARENT_ID_FILE, TAG_SWEPT_KEYS, resolve_uri
from harness.runs.signals import Interrupted
from harness.runs.credentials import redact

log = logging.getLogger(__name__)
MAX_PARAM_CHARS = 500
SWEEP_KEY_TAG = "sweep_key"  # on a sweep's parent run: a repeated sweep finds and reuses it
# A tracking server that goes away must not stall training for minutes per call (MLflow's
# defaults: 7 retries with backoff factor 2 and a 120 s timeout). With these, a call to a dead
# server gives up within about 20 s, the run fails and the sweep ends; set the variables to
# override them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
PROBE_TIMEOUT_S = 5


def bound_http_retries() -> None:
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def check_server(uri: str) -> None:
    """Raise ConnectionError in one line if `uri` is an MLflow server that does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S)
    except requests.RequestException as e:
        raise ConnectionError(f"the MLflow server tracking.uri={redact(uri)} does not answer ({type(e).__name__}); "
                              f"start it (mlflow server) or choose another tracking.uri") from None
    if response.status_code != 200:
        raise ConnectionError(f"the MLflow server tracking.uri={redact(uri)} answered /health with "
                              f"HTTP {response.status_code}; is it an MLflow server?")


_retries_before = None  # MLFLOW_HTTP_REQUEST_MAX_RETRIES before the server stopped answering ("" if unset)


def server_gone(uri: str, probes: int = 3, wait_s: float = 1.0) -> str | None:
    """Why `uri` is an MLflow server that no longer answers (after `probes` tries, `wait_s`
    apart), or None. While it does not answer, the calls this process still makes to it fail at
    once instead of retrying each (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0); the runs stay RUNNING there
    until the next sweep against it marks them KILLED (harness/runs/jobs.py end_orphans)."""
    global _retries_before
    for attempt in range(probes):
        try:
            check_server(uri)
        except ConnectionError as e:
            why = str(e)
            if attempt + 1 < probes:
                time.sleep(wait_s)
            continue
        if _retries_before is not None:  # it answers again: the retries as they were
            if _retries_before:
                os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = _retries_before
            else:
                del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
            _retries_before = None
        return None
    if _retries_before is None:
        log.warning("%s; this process no longer retries calls to it", why)
        _retries_before = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "")
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    return why


def _default_artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def store_lock(uri: str):
    """A lock beside a SQLite store: several processes creating one store at once corrupt it."""
    if uri.startswith("sqlite:///"):
        return FileLock(uri[len("sqlite:///"):] + ".lock")
    return nullcontext()


# MLflow 3.0-3.x UIs open an experiment with this tag in their model-training view. The UIs of
# MLflow 3.17 and 3.18 no longer read it: they take the view from the URL (`workflowType=` below),
# else from the browser's last choice, else GenAI. Hence the link `runs_link` makes.
MODEL_TRAINING = {"mlflow.experimentKind": "custom_model_development"}
WORKFLOW_ML = "workflowType=machine_learning"
SWEEP_TAG = "sweep_run_id"  # on a sweep's parent run and its children: the parent's id (one filter finds them all)
# A view of the runs table that the UI loads from `?viewStateShareKey=<key>` (MLflow's "Share"
# button writes the same): an experiment tag named this prefix + key, holding the view as JSON.
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def experiment_id(tracking_cfg) -> str:
    """Point MLflow at the configured store and return the experiment's id (creating both)."""
    uri = resolve_uri(tracking_cfg.uri)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(tracking_cfg.experiment)
        if experiment is not None:
            return experiment.experiment_id
        root = tracking_cfg.get("artifact_location") or _default_artifact_root(uri)
        return client.create_experiment(tracking_cfg.experiment, artifact_location=root, tags=MODEL_TRAINING)


def ui_base(uri: str) -> str | None:
    """Where the MLflow UI of the store `uri` is: the server itself, or `mlflow ui` on its
    default address for a local store; None for a store of another kind (e.g. databricks)."""
    if uri.startswith(("http://", "https://")):
        return redact(uri).rstrip("/")
    if uri.startswith("databricks"):
        return None
    return LOCAL_UI  # SQLite, a database, a folder: `mlflow ui --backend-store-uri` serves them


def runs_link(uri: str, experiment: str, view: str | None = None) -> str | None:
    """The UI's page of the experiment's runs table, in its model-training view; with `view`,
    the sweep's runs and columns (`set_runs_view`)."""
    base = ui_base(uri)
    if base is None:
        return None
    # the runs tab itself: the experiment's page redirects to it, keeping the view but not the viewStateShareKey
    return f"{base}/#/experiments/{experiment}/runs?{WORKFLOW_ML}" + (f"&viewStateShareKey={view}" if view else "")


# Columns of the runs table that a sweep's view shows, before its metrics (`set_runs_view`).
VIEW_COLUMNS = ["tags.`reduce_loss`", "tags.`seed`", "params.`trainer.lr`", "params.`loss_scale_value`",
                "metrics.`val/token_loss`", "metrics.`val/seq_loss`"]
VIEW_METRICS = re.compile(r"^(val/seq_loss/b\d+_|diff_vs_[^/]+/[^/]+/b\d+_[^/]*$)")  # per bucket, no intervals


def set_runs_view(client: MlflowClient, parent_id: str) -> str:
    """Store the view of the runs table that shows the sweep of parent run `parent_id`: its
    parent and child runs, flat (a search filter, which MLflow shows unnested), the parent first,
    with the modes, seeds, learning rates, validation losses (overall and per length bucket) and
    the parent's per-bucket differences as columns. Returns the view's key (the parent's id)."""
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{SWEEP_TAG}` = '{parent_id}'", max_results=10_000)
    metrics = sorted({k for r in [parent, *runs] for k in r.data.metrics if VIEW_METRICS.match(k)},
                     key=lambda k: (k.startswith("diff_vs_"), k))  # the children's losses, then the parent's differences
    view = {"searchFilter": f"tags.{SWEEP_TAG} = '{parent_id}'", "orderByKey": "tags.`mlflow.runName`",
            "orderByAsc": False,  # `sweep ...` before `sum-...` and `mean-...`
            "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
            "selectedColumns": VIEW_COLUMNS + [f"metrics.`{k}`" for k in metrics]}
    client.set_experiment_tag(parent.info.experiment_id, SHARED_VIEW_PREFIX + parent_id, json.dumps(view))
    return parent_id


def runs_tagged(tracking_cfg, tag: str, value: str | None = None, status: str | None = None) -> list:
    """The experiment's runs with `tag` (= `value`, if given), newest first (deleted runs excluded)."""
    exp = experiment_id(tracking_cfg)
    query = f"tags.`{tag}` = '{value}'" if value is not None else f"tags.`{tag}` != ''"
    if status is not None:
        query += f" and attributes.status = '{status}'"
    return list(MlflowClient().search_runs([exp], query, max_results=10_000, order_by=["attributes.start_time DESC"]))


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


def start_parent_run(tracking_cfg, sweep_dir: Path, sweep_key: str, tags: dict[str, str]) -> str:
    """The sweep's parent run: the one an earlier run of the same sweep left (running again), or
    a new one. Its id goes into the sweep folder for the jobs."""
    exp = experiment_id(tracking_cfg)
    client = MlflowClient()
    with store_lock(resolve_uri(tracking_cfg.uri)):  # two identical sweeps started together share one
        earlier = client.search_runs([exp], f"tags.`{SWEEP_KEY_TAG}` = '{sweep_key}'", max_results=1,
                                     order_by=["attributes.start_time DESC"])
        if earlier:
            run_id = earlier[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            if "analysis_error" in earlier[0].data.tags:
                client.delete_tag(run_id, "analysis_error")
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
            log.info("sweep continues in parent run %s", run_id)
        else:
            run_id = client.create_run(exp, run_name=f"sweep {sweep_dir.name}",
                                       tags=tags | {SWEEP_KEY_TAG: sweep_key}).info.run_id
        client.set_tag(run_id, SWEEP_TAG, run_id)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / PARENT_ID_FILE).write_text(run_id)
    return run_id


def _key_and_value(override: str) -> tuple[str, str]:
    """`+group=x` -> ("group", "x"): the key without Hydra's add/delete prefix."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def swept_keys(jobs: list[list[str]]) -> list[str]:
    """The keys whose value differs between the jobs (each a list of `key=value` overrides)."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for key, value in map(_key_and_value, job):
            values.setdefault(key, set()).add(value)
    return [k for k, v in values.items() if len(v) > 1]


def job_values(jobs: list[list[str]], key: str, default: str) -> set[str]:
    """The values `key` takes across the jobs (`default` in a job that does not set it)."""
    return {dict(map(_key_and_value, job)).get(key, default) for job in jobs}


def run_name(mode: str, seed: int, job_overrides: list[str], parent_id: str | None) -> str:
    """`<mode>-seed<seed>`, then the job's values of the other keys its sweep varies (from the
    parent run's tag), so that runs of one sweep never share a name."""
    name = f"{mode}-seed{seed}"
    if parent_id is None:
        return name
    tag = MlflowClient().get_run(parent_id).data.tags.get(TAG_SWEPT_KEYS, "")
    swept = {k.lstrip("+~") for k in tag.split(",")} - {"reduce_loss", "seed"}
    extra = [o.lstrip("+~") for o in job_overrides if _key_and_value(o)[0] in swept]
    return " ".join([name, *extra])


class RunLogger:
    """Logs one training run; a no-op on ranks other than 0.

    A resumed run continues the MLflow run an interrupted attempt left. Steps that attempt logged
    after its last checkpoint are trained again; their metrics are not logged twice."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.run_id: str | None = None
        self.logged_until: dict[str, int] = {}  # metric -> last step already in the run
        self.logged_params: set[str] = set()

    def start(self, tracking_cfg, run_name: str, tags: dict, parent_id: str | None,
              resume_id: str | None = None, resume_step: int = 0) -> None:
        if not self.enabled:
            return
        exp = experiment_id(tracking_cfg)
        if parent_id is not None:
            tags = tags | {SWEEP_TAG: parent_id}
        if resume_id is None:
            run = mlflow.start_run(experiment_id=exp, run_name=run_name, tags=tags, parent_run_id=parent_id)
        else:
            run = mlflow.start_run(run_id=resume_id)
            client = MlflowClient()
            for stale in ("error", "stopped"):
                if stale in run.data.tags:
                    client.delete_tag(resume_id, stale)
            mlflow.set_tags(tags | {"resumed_from_step": str(resume_step)})
            self.logged_until = {key: max(m.step for m in client.get_metric_history(resume_id, key))
                                 for key in run.data.metrics}
            self.logged_params = set(run.data.params)
        self.run_id = run.info.run_id
        log.info("MLflow run %s (%s) in %s%s", run_name, self.run_id, mlflow.get_tracking_uri(),
                 f", resumed after step {resume_step}" if resume_id else "")

    def params(self, params: dict) -> None:
        if self.enabled:
            mlflow.log_params({k: v for k, v in params.items() if k not in self.logged_params})

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        new = {k: v for k, v in metrics.items() if step > self.logged_until.get(k, -1)}
        if new:
            mlflow.log_metrics(new, step=step)

    def tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            mlflow.set_tags(tags)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self.enabled:
            mlflow.log_artifact(str(path), artifact_path=folder)

    def end(self, error: BaseException | None = None) -> None:
        """FINISHED; KILLED when a stop signal ended it (it resumes); FAILED on any other error."""
        if not self.enabled or mlflow.active_run() is None:
            return
        if error is not None and server_gone(mlflow.get_tracking_uri()):
            with suppress(Exception):
                mlflow.end_run("FAILED")  # forgets the run here; telling the server fails at once
            return
        if isinstance(error, Interrupted):
            mlflow.set_tag("stopped", str(error)[:5000])
            mlflow.end_run("KILLED")
            return
        if error is not None:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
        mlflow.end_run("FAILED" if error is not None else "FINISHED")
