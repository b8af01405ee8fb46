"""Run names, the sweep's swept keys, and a tracking server that stops answering (harness/runs/tracking.py)."""

import os

import mlflow
from mlflow.tracking import MlflowClient

from harness.artifacts import TAG_SWEPT_KEYS
from harness.runs.tracking import run_name, swept_keys
from tests.helpers.store import new_store


def test_swept_keys_are_the_keys_whose_value_differs_between_jobs():
    jobs = [["reduce_loss=mean", "seed=0", "+experiment=a", "trainer.lr=0.1"],
            ["reduce_loss=sum", "seed=0", "+experiment=a", "trainer.lr=0.1"],
            ["reduce_loss=mean", "seed=0", "+experiment=a", "trainer.lr=0.2"],
            ["reduce_loss=sum", "seed=0", "+experiment=a", "trainer.lr=0.2"]]
    assert swept_keys(jobs) == ["reduce_loss", "trainer.lr"]


def test_run_names_carry_the_other_swept_values_so_they_never_repeat(tmp_path):
    mlflow.set_tracking_uri(new_store(tmp_path / "mlflow.db"))
    client = MlflowClient()
    exp = client.create_experiment("e")
    parent = client.create_run(exp, tags={TAG_SWEPT_KEYS: "reduce_loss,+experiment,trainer.lr"}).info.run_id
    names = {run_name(mode, 0, [f"reduce_loss={mode}", "seed=0", f"+experiment={e}", f"trainer.lr={lr}",
                                "trainer.max_steps=6"], parent)
             for mode in ("mean", "sum") for e in ("a", "b") for lr in ("0.1", "0.2")}
    assert len(names) == 8
    assert "mean-seed0 experiment=a trainer.lr=0.1" in names
    assert run_name("mean", 3, ["trainer.lr=0.1"], None) == "mean-seed3"  # no sweep: the plain name


def test_a_server_that_stops_answering_stops_the_retries_until_it_answers_again(monkeypatch):
    import harness.runs.tracking as tracking

    answers = []

    def check(uri):
        if not answers.pop(0):
            raise ConnectionError(f"the MLflow server tracking.uri={uri} does not answer")

    monkeypatch.setattr(tracking, "check_server", check)
    monkeypatch.setattr(tracking, "_retries_before", None)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")  # the user's own setting
    answers[:] = [False, True]  # a blip: the second probe answers
    assert tracking.server_gone("http://h:1", wait_s=0) is None
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    answers[:] = [False, False, False]
    assert "does not answer" in tracking.server_gone("http://h:1", wait_s=0)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"  # later calls fail at once
    answers[:] = [True]
    assert tracking.server_gone("http://h:1", wait_s=0) is None
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"  # back to the user's setting
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")  # no setting of the user's: none afterwards either
    answers[:] = [False, False, False, True]
    assert tracking.server_gone("http://h:1", wait_s=0) is not None
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert tracking.server_gone("http://h:1", wait_s=0) is None
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert answers == []


def test_the_link_opens_the_runs_tab_in_the_model_training_view():
    from harness.runs.tracking import runs_link
    assert runs_link("sqlite:////tmp/x/mlflow.db", "3", "abc") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=abc"
    assert runs_link("http://user:secret@host:5001/", "3") == \
        "http://***@host:5001/#/experiments/3/runs?workflowType=machine_learning"
    assert runs_link("databricks", "3") is None


def test_the_sweeps_view_lists_its_runs_and_their_bucket_columns(tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from harness.runs.tracking import SHARED_VIEW_PREFIX, SWEEP_TAG, set_runs_view
    from tests.helpers.store import new_store
    client = MlflowClient(new_store(tmp_path / "mlflow.db"))
    exp = client.create_experiment("e")
    parent = client.create_run(exp, run_name="sweep x").info.run_id
    client.set_tag(parent, SWEEP_TAG, parent)
    child = client.create_run(exp, run_name="mean-seed0", tags={SWEEP_TAG: parent}).info.run_id
    client.log_metric(child, "val/seq_loss/b1_1-9", 2.0, step=3)
    client.log_metric(child, "val/token_loss/b1_1-9", 2.0, step=3)
    client.log_metric(parent, "diff_vs_mean/sum/b1_1-9", 0.1)
    client.log_metric(parent, "diff_vs_mean/sum/b1_1-9/ci_low", 0.0)
    assert set_runs_view(client, parent) == parent
    view = json.loads(client.get_experiment(exp).tags[SHARED_VIEW_PREFIX + parent])
    assert view["searchFilter"] == f"tags.{SWEEP_TAG} = '{parent}'"
    found = client.search_runs([exp], view["searchFilter"])
    assert sorted(r.info.run_name for r in found) == ["mean-seed0", "sweep x"]
    metrics = [c for c in view["selectedColumns"] if c.startswith("metrics.")]
    assert metrics[-2:] == ["metrics.`val/seq_loss/b1_1-9`", "metrics.`diff_vs_mean/sum/b1_1-9`"]
