"""MLflow runs and their per-example artifacts, as pandas frames."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from harness import artifacts

# Hundreds of small downloads would each draw a progress bar.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")



class AnalysisError(Exception):
    """Bad selection or options; the message is one line."""


@dataclass
class RunData:
    runs: pd.DataFrame  # one row per run: run_id, run_name, status, artifacts.RUN_TAGS, params, RUN_METRICS
    evals: pd.DataFrame  # run_id, step + artifacts.EVAL_COLUMNS
    grad_weights: pd.DataFrame  # run_id + artifacts.GRAD_WEIGHT_COLUMNS
    curves: pd.DataFrame  # run_id, step, value (train/loss)


# End-of-run metrics read into `runs` (column name: metric); absent in runs that did not log them.
RUN_METRICS = {"clipped_fraction": artifacts.CLIPPED_FRACTION_METRIC,
               "grad_norm_median": artifacts.GRAD_NORM_MEDIAN_METRIC}


def check_reachable(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not Path(path).is_file():
            raise AnalysisError(f"no MLflow store at {uri} (file {path} does not exist)")
    elif uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:
        raise AnalysisError(f"cannot reach the MLflow store {uri}: {str(e).splitlines()[0][:200]}") from None


def parent_from_sweep_dir(sweep_dir: str | Path) -> str:
    parent = artifacts.parent_run_id(Path(sweep_dir))
    if parent is None:
        raise AnalysisError(f"{sweep_dir} is not a sweep folder (no {artifacts.PARENT_ID_FILE} in it)")
    return parent


def require_two_modes(modes) -> None:
    modes = sorted(set(modes))
    if len(modes) < 2:
        raise AnalysisError(f"only one reduction ({modes[0]}) among the selected runs; a comparison needs two or more")


def select_runs(uri: str, *, experiment: str | None = None, parent_run_id: str | None = None) -> pd.DataFrame:
    check_reachable(uri)
    client = MlflowClient(uri)
    if parent_run_id:
        try:
            parent = client.get_run(parent_run_id)
        except Exception:
            raise AnalysisError(f"no run {parent_run_id} in {uri}") from None
        experiment_ids = [parent.info.experiment_id]
        query = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise AnalysisError(f"no experiment named {experiment!r} in {uri}")
        experiment_ids, query = [found.experiment_id], f"tags.{artifacts.TAG_MODE} != ''"
    runs = _search(client, experiment_ids, query)
    if runs.empty:
        where = f"parent run {parent_run_id}" if parent_run_id else f"experiment {experiment!r}"
        raise AnalysisError(f"no training runs match {where} in {uri}")
    runs = runs[runs["status"] == "FINISHED"]
    if runs.empty:
        raise AnalysisError("the selected runs include none that FINISHED")
    _require_schema(runs)
    require_two_modes(runs[f"tags.{artifacts.TAG_MODE}"])  # before any artifact is downloaded
    out = runs[["run_id", "status"]].copy()
    out["run_name"] = runs.get("tags.mlflow.runName")
    for tag in artifacts.RUN_TAGS:
        out[tag] = runs.get(f"tags.{tag}")
    out["loss_scale_value"] = runs.get(f"tags.{artifacts.TAG_LOSS_SCALE}")  # `auto` resolved
    for column, metric in RUN_METRICS.items():
        out[column] = runs.get(f"metrics.{metric}")
    params = [c for c in runs.columns if c.startswith("params.") and c[len("params."):] not in out]
    out = out.join(runs[params].rename(columns=lambda c: c[len("params."):]))
    return out.reset_index(drop=True)


def _search(client: MlflowClient, experiment_ids: list[str], query: str) -> pd.DataFrame:
    """Runs as one row each (run_id, status, tags.*, params.*, metrics.*), read from the
    client's store (never the process-wide tracking URI)."""
    rows, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=query, max_results=5000, page_token=token)
        for run in page:
            row = {"run_id": run.info.run_id, "status": run.info.status}
            for prefix, values in (("tags", run.data.tags), ("params", run.data.params), ("metrics", run.data.metrics)):
                row.update({f"{prefix}.{k}": v for k, v in values.items()})
            rows.append(row)
        token = page.token
        if not token:
            return pd.DataFrame(rows)


def _require_schema(runs: pd.DataFrame) -> None:
    """Refuse runs written under another artifact contract (see artifacts.SCHEMA_VERSION)."""
    found = runs.get(f"tags.{artifacts.TAG_SCHEMA}", pd.Series(None, index=runs.index))
    other = runs[found.fillna("none") != artifacts.SCHEMA_VERSION]
    if not other.empty:
        names = ", ".join(other.get("tags.mlflow.runName", other.run_id).fillna("?").astype(str).head(5))
        raise AnalysisError(
            f"{len(other)} run(s) ({names}) have artifact schema {sorted(set(found[other.index].fillna('none')))}, "
            f"this analysis reads schema {artifacts.SCHEMA_VERSION}; analyse them with the version that wrote them")


def _read_artifacts(client: MlflowClient, run_id: str, folder: str, dest: Path) -> list[Path]:
    try:
        local = client.download_artifacts(run_id, folder, str(dest))
    except Exception:
        return []
    return sorted(Path(local).glob("*.parquet"))


def load(uri: str, runs: pd.DataFrame) -> RunData:
    client = MlflowClient(uri)
    evals, grads, curves = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in runs.run_id:
            files = _read_artifacts(client, run_id, artifacts.EVAL_DIR, Path(tmp) / run_id)
            steps = [(artifacts.step_of(f.name), f) for f in files if artifacts.step_of(f.name) is not None]
            if not steps:
                raise AnalysisError(f"run {run_id} has no per-example validation artifacts "
                                    f"({artifacts.EVAL_DIR}/{artifacts.eval_file(0).replace('00000000', '*')})")
            for step, f in steps:
                df = pd.read_parquet(f, columns=artifacts.EVAL_COLUMNS)
                df["run_id"], df["step"] = run_id, step
                evals.append(df)
            for f in _read_artifacts(client, run_id, artifacts.TRAIN_DIR, Path(tmp) / run_id / "t"):
                if f.name == artifacts.GRAD_WEIGHT_FILE:
                    df = pd.read_parquet(f, columns=artifacts.GRAD_WEIGHT_COLUMNS)
                    df["run_id"] = run_id
                    grads.append(df)
            history = client.get_metric_history(run_id, artifacts.TRAIN_LOSS_METRIC)
            curves.append(pd.DataFrame({"run_id": run_id, "step": [m.step for m in history],
                                        "value": [m.value for m in history]}))
    return RunData(
        runs=runs,
        evals=pd.concat(evals, ignore_index=True),
        grad_weights=pd.concat(grads, ignore_index=True) if grads else pd.DataFrame(),
        curves=pd.concat(curves, ignore_index=True),
    )
