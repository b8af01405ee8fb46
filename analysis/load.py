"""MLflow runs and their per-example artifacts, as pandas frames."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from harness import artifacts

log = logging.getLogger(__name__)
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
    superseded: list[str] = field(default_factory=list)  # earlier runs of a job that ran again, left out
    tests: pd.DataFrame = field(default_factory=pd.DataFrame)  # run_id + artifacts.EVAL_COLUMNS: the test split


# End-of-run metrics read into `runs` (column name: metric); absent in runs that did not log them.
RUN_METRICS = {"clipped_fraction": artifacts.CLIPPED_FRACTION_METRIC,
               "grad_norm_median": artifacts.GRAD_NORM_MEDIAN_METRIC}


def param_columns(runs: pd.DataFrame) -> list[str]:
    """The columns of `runs` (as `select_runs` gives them) that hold the runs' config params."""
    fixed = {"run_id", "status", "start_time", "run_name", "loss_scale_value", "group", artifacts.TAG_FLAG,
             artifacts.TAG_FLAG_REASON, artifacts.TAG_ERROR, *artifacts.RUN_TAGS, *RUN_METRICS}
    return [c for c in runs.columns if c not in fixed]


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


def select_runs(uri: str, *, experiment: str | None = None, parent_run_id: str | None = None,
                include_flagged: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """The training runs to compare, and the runs left out (with --include-flagged, those that
    did not finish). Without include_flagged, a run that did not finish or was flagged is refused."""
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
    runs, left_out = _screen(runs, include_flagged)
    if runs.empty:
        raise AnalysisError("the selected runs include none that FINISHED")
    _require_schema(runs)
    require_two_modes(runs[f"tags.{artifacts.TAG_MODE}"])  # before any artifact is downloaded
    out = runs[["run_id", "status", "start_time"]].copy()
    out["run_name"] = runs.get("tags.mlflow.runName")
    for tag in artifacts.RUN_TAGS + [artifacts.TAG_FLAG]:
        out[tag] = runs.get(f"tags.{tag}")
    out["loss_scale_value"] = runs.get(f"tags.{artifacts.TAG_LOSS_SCALE}")  # `auto` resolved
    for column, metric in RUN_METRICS.items():
        out[column] = runs.get(f"metrics.{metric}")
    params = [c for c in runs.columns if c.startswith("params.") and c[len("params."):] not in out]
    out = out.join(runs[params].rename(columns=lambda c: c[len("params."):]))
    return out.reset_index(drop=True), left_out


def _screen(runs: pd.DataFrame, include_flagged: bool) -> tuple[pd.DataFrame, list[str]]:
    """Refuse runs that did not finish (FAILED, KILLED, RUNNING) or were flagged, naming them;
    with include_flagged, keep the flagged ones and leave the others out."""
    flag = runs.get(f"tags.{artifacts.TAG_FLAG}", pd.Series(None, index=runs.index)).fillna("")
    unfinished = runs["status"] != "FINISHED"
    flagged = ~unfinished & (flag != "")
    left_out = [_describe(run, f"{run.status}: {_first_line(run, artifacts.TAG_ERROR)}")
                for _, run in runs[unfinished].iterrows()]
    if (unfinished | flagged).any() and not include_flagged:
        named = left_out + [_describe(run, f"flag={flag[i]}: {_first_line(run, artifacts.TAG_FLAG_REASON)}")
                            for i, run in runs[flagged].iterrows()]
        raise AnalysisError(f"{len(named)} run(s) did not finish or were flagged: {'; '.join(named[:5])}"
                            f"{'; ...' if len(named) > 5 else ''} (--include-flagged analyses the flagged "
                            "runs, leaves out those that did not finish, and marks the report)")
    return runs[~unfinished], left_out


def _describe(run: pd.Series, why: str) -> str:
    return f"{run.get('tags.mlflow.runName') or run.run_id} ({why})"


def _first_line(run: pd.Series, tag: str) -> str:
    value = run.get(f"tags.{tag}")
    return str(value).splitlines()[0][:160] if isinstance(value, str) and value else "no reason recorded"


def _search(client: MlflowClient, experiment_ids: list[str], query: str) -> pd.DataFrame:
    """Runs as one row each (run_id, status, start_time, tags.*, params.*, metrics.*), read from the
    client's store (never the process-wide tracking URI)."""
    rows, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=query, max_results=5000, page_token=token)
        for run in page:
            row = {"run_id": run.info.run_id, "status": run.info.status,
                   "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True)}
            for prefix, values in (("tags", run.data.tags), ("params", run.data.params), ("metrics", run.data.metrics)):
                row.update({f"{prefix}.{k}": v for k, v in values.items()})
            rows.append(row)
        token = page.token
        if not token:
            return pd.DataFrame(rows)


def _require_schema(runs: pd.DataFrame) -> None:
    """Refuse runs written under an artifact contract this analysis does not read (see
    artifacts.READABLE_SCHEMAS)."""
    found = runs.get(f"tags.{artifacts.TAG_SCHEMA}", pd.Series(None, index=runs.index))
    other = runs[~found.fillna("none").isin(artifacts.READABLE_SCHEMAS)]
    if not other.empty:
        names = ", ".join(other.get("tags.mlflow.runName", other.run_id).fillna("?").astype(str).head(5))
        raise AnalysisError(
            f"{len(other)} run(s) ({names}) have artifact schema {sorted(set(found[other.index].fillna('none')))}, "
            f"this analysis reads schemas {', '.join(artifacts.READABLE_SCHEMAS)}; analyse them with the version "
            "that wrote them")


def parent_swept_keys(uri: str, parent_run_id: str | None) -> list[str]:
    """The keys the sweep's parent run says its jobs vary (tag swept_keys), `+`/`~` removed."""
    if not parent_run_id:
        return []
    tag = MlflowClient(uri).get_run(parent_run_id).data.tags.get(artifacts.TAG_SWEPT_KEYS, "")
    return [k.lstrip("+~") for k in tag.split(",") if k]


def _per_example(path: Path, run_name: str) -> pd.DataFrame:
    """A run's per-example losses (artifacts.EVAL_COLUMNS) from one of its eval files, all finite."""
    df = pd.read_parquet(path, columns=artifacts.EVAL_COLUMNS)
    _require_finite(df, ["loss_sum", "loss_mean"], run_name, f"{artifacts.EVAL_DIR}/{path.name}")
    return df


def _read_artifacts(client: MlflowClient, run_id: str, folder: str, dest: Path) -> list[Path]:
    try:
        local = client.download_artifacts(run_id, folder, str(dest))
    except Exception:
        return []
    return sorted(Path(local).glob("*.parquet"))


def latest_of_each_job(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(latest, earlier): when a job ran more than once (same pair_id and reduce_loss: the same
    config, weights and data), the latest run of it, and the earlier ones left out."""
    by_time = runs.sort_values("start_time", kind="stable") if "start_time" in runs else runs
    earlier = by_time.duplicated(["pair_id", "reduce_loss"], keep="last")
    return by_time[~earlier].sort_index().reset_index(drop=True), by_time[earlier]


def load(uri: str, runs: pd.DataFrame) -> RunData:
    """The per-example artifacts and training curves of `runs` (the latest run of each job)."""
    runs, earlier = latest_of_each_job(runs)
    superseded = [f"{r.run_name} ({r.run_id})" for r in earlier.itertuples()]
    if superseded:
        log.warning("%d run(s) repeat a job that ran again later and are left out: %s",
                    len(superseded), ", ".join(superseded))
    client = MlflowClient(uri)
    names = dict(zip(runs.run_id, runs.run_name.fillna(runs.run_id)))
    evals, grads, curves, tests = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in runs.run_id:
            files = _read_artifacts(client, run_id, artifacts.EVAL_DIR, Path(tmp) / run_id)
            steps = [(artifacts.step_of(f.name), f) for f in files if artifacts.step_of(f.name) is not None]
            if not steps:
                raise AnalysisError(f"run {run_id} has no per-example validation artifacts "
                                    f"({artifacts.EVAL_DIR}/{artifacts.eval_file(0).replace('00000000', '*')})")
            evals += [_per_example(f, names[run_id]).assign(run_id=run_id, step=step) for step, f in steps]
            tests += [_per_example(f, names[run_id]).assign(run_id=run_id)
                      for f in files if f.name == artifacts.TEST_EVAL]  # the test split (schema 2 on)
            for f in _read_artifacts(client, run_id, artifacts.TRAIN_DIR, Path(tmp) / run_id / "t"):
                if f.name == artifacts.GRAD_WEIGHT_FILE:
                    df = pd.read_parquet(f, columns=artifacts.GRAD_WEIGHT_COLUMNS)
                    _require_finite(df, ["grad_weight"], names[run_id], f"{artifacts.TRAIN_DIR}/{f.name}")
                    df["run_id"] = run_id
                    grads.append(df)
            history = client.get_metric_history(run_id, artifacts.TRAIN_LOSS_METRIC)
            bad = [m.step for m in history if not math.isfinite(m.value)]
            if bad:
                raise AnalysisError(f"run {names[run_id]} logged a non-finite {artifacts.TRAIN_LOSS_METRIC} at step "
                                    f"{min(bad)}; its results are not numbers")
            curves.append(pd.DataFrame({"run_id": run_id, "step": [m.step for m in history],
                                        "value": [m.value for m in history]}))
    return RunData(
        runs=runs,
        evals=pd.concat(evals, ignore_index=True),
        grad_weights=pd.concat(grads, ignore_index=True) if grads else pd.DataFrame(),
        curves=pd.concat(curves, ignore_index=True),
        superseded=superseded,
        tests=pd.concat(tests, ignore_index=True) if tests else pd.DataFrame(),
    )


def _require_finite(df: pd.DataFrame, columns: list[str], run: str, name: str) -> None:
    """pandas skips NaN in sums and means; a non-finite value must stop the analysis instead."""
    bad = ~np.isfinite(df[columns].to_numpy(dtype=float)).all(axis=1)
    if bad.any():
        raise AnalysisError(f"run {run} has {int(bad.sum())} non-finite value(s) in {name} "
                            f"(e.g. example {df.example_id[bad].iloc[0]}); its results are not numbers")
