"""MLflow runs and their per-example artifacts, as pandas frames."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from analysis.errors import AnalysisError
from harness.tracking import PARENT_ID_FILE, parent_run_id

# Hundreds of small downloads would each draw a progress bar.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

RUN_TAGS = ["reduce_loss", "seed", "pair_id", "init_fingerprint", "data_fingerprint"]


@dataclass
class RunData:
    runs: pd.DataFrame  # one row per run: run_id, run_name, status + RUN_TAGS
    evals: pd.DataFrame  # run_id, step, example_id, seq_len, target_tokens, loss_sum, loss_mean
    grad_weights: pd.DataFrame  # run_id, example_id, seq_len, target_tokens, times_seen, grad_weight
    curves: pd.DataFrame  # run_id, step, value (train/loss)
    parent_run_id: str | None = None


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
    parent = parent_run_id(Path(sweep_dir))
    if parent is None:
        raise AnalysisError(f"{sweep_dir} is not a harness sweep folder (no {PARENT_ID_FILE} in it)")
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
        experiment_ids, query = [found.experiment_id], "tags.reduce_loss != ''"
    runs = mlflow.search_runs(experiment_ids, filter_string=query, output_format="pandas",
                              max_results=50_000, search_all_experiments=False)
    if runs.empty:
        where = f"parent run {parent_run_id}" if parent_run_id else f"experiment {experiment!r}"
        raise AnalysisError(f"no harness runs match {where} in {uri}")
    runs = runs[runs["status"] == "FINISHED"]
    if runs.empty:
        raise AnalysisError("the selected runs include none that FINISHED")
    require_two_modes(runs["tags.reduce_loss"])  # before any artifact is downloaded
    out = runs[["run_id", "status"]].copy()
    out["run_name"] = runs.get("tags.mlflow.runName")
    for tag in RUN_TAGS:
        out[tag] = runs.get(f"tags.{tag}")
    params = [c for c in runs.columns if c.startswith("params.") and c[len("params."):] not in out]
    out = out.join(runs[params].rename(columns=lambda c: c[len("params."):]))
    return out.reset_index(drop=True)


def _read_artifacts(client: MlflowClient, run_id: str, folder: str, dest: Path) -> list[Path]:
    try:
        local = client.download_artifacts(run_id, folder, str(dest))
    except Exception:
        return []
    return sorted(Path(local).glob("*.parquet"))


def load(uri: str, runs: pd.DataFrame, parent_run_id: str | None = None) -> RunData:
    client = MlflowClient(uri)
    evals, grads, curves = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in runs.run_id:
            files = _read_artifacts(client, run_id, "eval", Path(tmp) / run_id)
            steps = [f for f in files if f.stem.startswith("step_")]
            if not steps:
                raise AnalysisError(f"run {run_id} has no per-example validation artifacts (eval/step_*.parquet)")
            for f in steps:
                df = pd.read_parquet(f)
                df["run_id"], df["step"] = run_id, int(f.stem.split("_")[1])
                evals.append(df)
            for f in _read_artifacts(client, run_id, "train", Path(tmp) / run_id / "t"):
                df = pd.read_parquet(f)
                df["run_id"] = run_id
                grads.append(df)
            history = client.get_metric_history(run_id, "train/loss")
            curves.append(pd.DataFrame({"run_id": run_id, "step": [m.step for m in history],
                                        "value": [m.value for m in history]}))
    return RunData(
        runs=runs,
        evals=pd.concat(evals, ignore_index=True),
        grad_weights=pd.concat(grads, ignore_index=True) if grads else pd.DataFrame(),
        curves=pd.concat(curves, ignore_index=True),
        parent_run_id=parent_run_id,
    )
