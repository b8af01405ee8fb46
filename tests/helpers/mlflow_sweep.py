"""Constructed runs logged to a real MLflow store exactly as a sweep logs them."""

from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from analysis.load import RUN_METRICS, param_columns
from harness import artifacts
from tests.helpers.store import new_store


def log_sweep(uri: str, tmp: Path, data, with_eval: bool = True, experiment: str = "reduce-loss") -> str:
    """Log `data` (analysis.load.RunData) as a sweep: a parent run and one child per run."""
    if uri.startswith("sqlite:///"):
        new_store(Path(uri.removeprefix("sqlite:///")))
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    exp = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=(tmp / "artifacts" / experiment).as_uri())
    params = param_columns(data.runs)  # config keys, e.g. trainer.lr: logged as the runs' params
    swept = [k for k in params if data.runs[k].nunique() > 1]
    parent = client.create_run(exp, run_name="sweep", tags={artifacts.TAG_SWEPT_KEYS: ",".join(
        ["reduce_loss", "seed", *swept])}).info.run_id
    for run in data.runs.itertuples():
        tags = {k: getattr(run, k) for k in artifacts.RUN_TAGS}
        for k in (artifacts.TAG_FLAG, artifacts.TAG_FLAG_REASON, artifacts.TAG_ERROR):  # when the run has them
            if isinstance(getattr(run, k, None), str):
                tags[k] = getattr(run, k)
        child = client.create_run(exp, run_name=run.run_name, tags=tags | {"mlflow.parentRunId": parent}).info.run_id
        folder = tmp / "files" / child
        for key in params:
            if pd.notna(data.runs.at[run.Index, key]):
                client.log_param(child, key, str(data.runs.at[run.Index, key]))
        loss = data.curves[data.curves.run_id == run.run_id].value
        losses = [3.0 - 0.1 * step for step in (1, 2, 3)] if loss.notna().all() else [3.0, float("nan"), float("nan")]
        (folder / artifacts.EVAL_DIR).mkdir(parents=True)
        for step, part in data.evals[data.evals.run_id == run.run_id].groupby("step"):
            part[artifacts.EVAL_COLUMNS].to_parquet(folder / artifacts.EVAL_DIR / artifacts.eval_file(step))
        if not data.tests.empty:  # the test split (schema 2)
            test = data.tests[data.tests.run_id == run.run_id]
            test[artifacts.EVAL_COLUMNS].to_parquet(folder / artifacts.EVAL_DIR / artifacts.TEST_EVAL)
        if with_eval:
            client.log_artifacts(child, str(folder / artifacts.EVAL_DIR), artifacts.EVAL_DIR)
        grads = data.grad_weights[data.grad_weights.run_id == run.run_id][artifacts.GRAD_WEIGHT_COLUMNS]
        grads.to_parquet(folder / artifacts.GRAD_WEIGHT_FILE)
        client.log_artifact(child, str(folder / artifacts.GRAD_WEIGHT_FILE), artifacts.TRAIN_DIR)
        for step, value in zip((1, 2, 3), losses):
            client.log_metric(child, artifacts.TRAIN_LOSS_METRIC, value, step=step)
        for column, metric in RUN_METRICS.items():  # end-of-run metrics, where `data.runs` has them
            if column in data.runs and pd.notna(getattr(run, column)):
                client.log_metric(child, metric, float(getattr(run, column)), step=3)
        client.set_terminated(child, run.status)
    return parent
