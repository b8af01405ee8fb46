"""The real command line, in a subprocess, in a temporary launch directory."""

import math
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from harness.config import CONF_DIR
from tests.helpers.cli import QUICK, child_runs, entry_check, run_cli
from tests.helpers.store import new_store

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.slow
def test_sweep_makes_paired_runs_with_tags_metrics_and_artifacts(tmp_path):
    new_store(tmp_path / "mlflow.db")
    proc = run_cli(["-m", "reduce_loss=mean,sum", "seed=0,1", "trainer.max_grad_norm=1.5", *QUICK], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parents, children = child_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    parent_id = parents.run_id.iloc[0]
    assert (children["tags.mlflow.parentRunId"] == parent_id).all()
    assert parents["tags.swept_keys"].iloc[0] == "reduce_loss,seed"  # the constant overrides are not swept
    assert sorted(children["tags.mlflow.runName"]) == ["mean-seed0", "mean-seed1", "sum-seed0", "sum-seed1"]
    assert (children.status == "FINISHED").all() and parents.status.iloc[0] == "FINISHED"

    for seed, pair in children.groupby("tags.seed"):
        assert sorted(pair["tags.reduce_loss"]) == ["mean", "sum"]
        for tag in ("pair_id", "init_fingerprint", "data_fingerprint"):
            assert pair[f"tags.{tag}"].nunique() == 1, (seed, tag)
    for tag in ("pair_id", "init_fingerprint", "data_fingerprint"):
        assert children.groupby("tags.seed")[f"tags.{tag}"].first().nunique() == 2, tag
    for seed, pair in children.groupby("tags.seed"):  # loss_scale=auto (the default): one value per pair
        assert pair["tags.loss_scale"].nunique() == 1 and 0 < float(pair["tags.loss_scale"].iloc[0]) < 0.1
        assert (pair["params.loss_scale"] == "auto").all()
        assert (pair["params.loss_scale_value"] == pair["tags.loss_scale"]).all()  # in full: the UI rounds metrics
        assert (pair["metrics.train/loss_scale"] == float(pair["tags.loss_scale"].iloc[0])).all()

    client = MlflowClient()
    run_id = children.run_id.iloc[0]
    assert children["params.trainer.max_steps"].iloc[0] == "6"
    history = client.get_metric_history(run_id, "val/token_loss")
    assert [m.step for m in history] == [3, 6]
    for metric in ("train/loss", "val/seq_loss"):
        assert client.get_metric_history(run_id, metric)
    for _, run in children.iterrows():  # counted on the device over all steps = the per-step logs (log_every=1)
        norms = [m.value for m in sorted(client.get_metric_history(run.run_id, "train/grad_norm"), key=lambda m: m.step)]
        clipped = [m.value for m in sorted(client.get_metric_history(run.run_id, "train/clipped"), key=lambda m: m.step)]
        assert len(norms) == len(clipped) == 6
        assert clipped == [float(n > 1.5) for n in norms]
        assert run["metrics.train/clipped_fraction"] == pytest.approx(sum(clipped) / 6)
        assert run["metrics.train/grad_norm_median"] == pytest.approx(float(np.median(norms)), rel=1e-6)
    names = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert names == {"eval/step_00000003.parquet", "eval/step_00000006.parquet", "eval/final.parquet",
                     "eval/final.csv", "eval/test.parquet"}  # the test split, once, at the end
    assert "resolved_config.yaml" in {a.path for a in client.list_artifacts(run_id)}
    final = pd.read_parquet(client.download_artifacts(run_id, "eval/final.parquet", str(tmp_path)))
    assert len(final) == 24 and final.example_id.is_unique
    assert {"example_id", "seq_len", "target_tokens", "loss_sum", "loss_mean"} <= set(final.columns)
    assert (final.loss_mean - final.loss_sum / final.target_tokens).abs().max() < 1e-12
    assert (final.target_tokens < final.seq_len).all()

    sweep_dir = next(tmp_path.glob("multirun/*/*"))
    written = {p.name for p in (sweep_dir / "analysis").iterdir()}
    report = (sweep_dir / "analysis" / "report.md").read_text()
    assert "## Clipping: share of steps whose gradient was clipped" in report and "clipping.csv" in written
    assert "examples, 2 seeds)" in report
    assert {"val_loss_by_bucket.png", "paired_difference.png", "train_loss.png", "gradient_weight_share.png",
            "val_loss_by_bucket_over_steps.png", "report.md", "report.html"} <= written
    logged = {a.path for a in client.list_artifacts(parent_id, "analysis")}
    assert "analysis/report.html" in logged and "analysis/paired_difference.png" in logged

    parent = client.get_run(parent_id)
    assert parent.data.params["trainer.max_steps"] == "6" and "seed=0,1" in parent.data.params["sweep_overrides"]
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3's model-training view
    # the sweep ends with its answer: where things are, the differences per bucket, how to open MLflow
    summary = proc.stdout[proc.stdout.index("== sweep finished =="):].splitlines()
    assert f"sweep folder: {sweep_dir.resolve()}" in summary
    assert f"report:       {(sweep_dir / 'analysis' / 'report.html').resolve()}" in summary
    assert summary[-2] == f"open the runs: mlflow ui --backend-store-uri sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert summary[-1] == (f"then browse:   http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs?"
                           f"workflowType=machine_learning&viewStateShareKey={parent_id}")
    table = summary[summary.index(next(l for l in summary if l.startswith("validation loss at step 6"))) + 1:-3]
    assert "example-weighted" in summary[summary.index(table[0]) - 1] and "seeds" in table[0]
    analysed = pd.read_csv(sweep_dir / "analysis" / "paired_difference.csv")
    final = analysed[analysed.step == 6]
    assert len(table) == 1 + len(final)  # header, then one row per bucket
    for row, (_, expected) in zip(table[1:], final.iterrows()):
        assert f"{expected['diff']:+.4f}" in row and f"{expected.ci_low:+.4f}" in row
        assert row.rstrip(" *").split()[-2:] == ["2", str(expected.examples)]  # seeds, examples
    for _, expected in final.iterrows():  # the headline on the parent run, buckets named to sort: b1_69-73, ...
        name = f"diff_vs_mean/sum/b{expected.bucket + 1}_{expected.bucket_range}"
        assert parent.data.metrics[name] == pytest.approx(expected["diff"])
        assert parent.data.metrics[f"{name}/ci_low"] == pytest.approx(expected.ci_low)
        assert parent.data.metrics[f"{name}/ci_high"] == pytest.approx(expected.ci_high)
    # the answer in the parent's description, the same numbers
    note = parent.data.tags["mlflow.note.content"]
    for _, expected in final.iterrows():
        assert f"| {expected.bucket_range} " in note and f"[{expected.ci_low:+.4f}, {expected.ci_high:+.4f}]" in note
    assert "Above zero: the mode did worse than `mean`" in note and "analysis/report.md" in note
    # each child logged its per-bucket validation losses at every evaluation, cut at the analysis's edges
    labels = list(analysed[analysed.step == 6].sort_values("bucket").bucket_range)
    first = pd.read_parquet(client.download_artifacts(run_id, "eval/final.parquet", str(tmp_path / "first")))
    for i, label in enumerate(labels):
        lo, hi = map(int, label.split("-"))
        rows = first[(first.seq_len >= lo) & (first.seq_len <= hi)]
        token = client.get_metric_history(run_id, f"val/token_loss/b{i + 1}_{label}")
        example = client.get_metric_history(run_id, f"val/seq_loss/b{i + 1}_{label}")
        assert [m.step for m in token] == [m.step for m in example] == [3, 6]
        assert token[-1].value == pytest.approx(rows.loss_sum.sum() / rows.target_tokens.sum(), rel=1e-9)
        assert example[-1].value == pytest.approx(rows.loss_mean.mean(), rel=1e-9)
    assert parent.data.metrics["distinguishable_buckets"] == final.distinguishable.sum()
    # each job said its final validation loss, as MLflow has it
    for _, run in children.iterrows():
        assert (f"{run['tags.reduce_loss']} seed {run['tags.seed']}: validation loss at step 6: "
                f"{run['metrics.val/token_loss']:.4f} per token") in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("override, expected", [
    ("reduce_loss=median", "reduce_loss='median' is not valid; choose one of: mean, sum, token_mean, seq_mean"),
    ("model=nope", "model=nope is not a known option; choose one of: gemma3, hf, smollm2, tiny_llama"),
    ("seed=abc", "seed='abc' is not an integer"),
    ("trainer.batch_size=1", "trainer.batch_size=1 leaves a rank without data"),
    ("loss_scale=0", "loss_scale=0 must be a number > 0"),
    ("data.packing=true data.pack_length=abc", "data.pack_length='abc' is not an integer"),
    ("data.packing=true data.pack_length=100", "data.pack_length=100 is shorter than data.max_seq_len=512"),
])
def test_bad_input_fails_in_one_line_before_anything_starts(tmp_path, override, expected, monkeypatch, capsys):
    argv = ["-m", "reduce_loss=mean,sum", *override.split()]
    code, stderr = entry_check(argv, tmp_path, through_cli=override in ("model=nope", "trainer.batch_size=1"),
                               monkeypatch=monkeypatch, capsys=capsys)
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "multirun").exists()


IN_A_STEP = """
    import harness.training.step as step
    real = step.example_weights
    def failing(mode, *args, **kwargs):
        if mode == "sum":
            raise RuntimeError("injected failure in the sum run")
        return real(mode, *args, **kwargs)
    step.example_weights = failing
"""
# before the job's MLflow run exists (its data or model does not load): it gets a FAILED run all the same
IN_SET_UP = """
    import harness.training.loop as loop
    real = loop.set_up
    def failing(cfg, *args, **kwargs):
        if cfg.reduce_loss == "sum":
            raise RuntimeError("injected failure in the sum run's set-up")
        return real(cfg, *args, **kwargs)
    loop.set_up = failing
"""


@pytest.mark.slow
@pytest.mark.parametrize("prelude", [IN_A_STEP, IN_SET_UP], ids=["in-a-step", "in-set-up"])
def test_failed_job_is_marked_failed_and_the_sweep_goes_on(tmp_path, prelude):
    new_store(tmp_path / "mlflow.db")
    proc = run_cli(["-m", "reduce_loss=sum,mean", *QUICK], tmp_path, prelude)
    assert proc.returncode != 0
    parents, children = child_runs(tmp_path)
    status = dict(zip(children["tags.reduce_loss"], children.status))
    assert status == {"sum": "FAILED", "mean": "FINISHED"}
    assert "injected failure" in children.set_index("tags.reduce_loss").loc["sum", "tags.error"]
    assert parents.status.iloc[0] == "FAILED"
    summary = proc.stdout[proc.stdout.index("== sweep finished WITH FAILURES =="):]
    assert "FAILED: ['reduce_loss=sum'" in summary and "injected failure" in summary
    assert "mlflow ui --backend-store-uri sqlite:///" in summary.splitlines()[-2]
    assert summary.splitlines()[-1].startswith("then browse:   http://127.0.0.1:5000/#/experiments/")  # a failed sweep too


@pytest.mark.slow
def test_a_sweep_of_one_reduction_finishes_and_says_there_is_nothing_to_compare(tmp_path):
    new_store(tmp_path / "mlflow.db")
    proc = run_cli(["-m", "reduce_loss=sum", "seed=0,1", *QUICK], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parents, children = child_runs(tmp_path)
    assert sorted(children.status) == ["FINISHED", "FINISHED"] and parents.status.iloc[0] == "FINISHED"
    summary = proc.stdout[proc.stdout.index("== sweep finished =="):]
    assert "nothing to compare: every job of this sweep used reduce_loss=sum" in summary
    assert "-m reduce_loss=mean,sum" in summary and "FAILED" not in summary
    assert not list(tmp_path.glob("multirun/*/*/analysis"))


@pytest.mark.slow
def test_help_and_cfg_job(tmp_path):
    help_text = run_cli(["--help"], tmp_path)
    assert help_text.returncode == 0 and "reduce_loss" in help_text.stdout
    assert "+experiment=NAME" in help_text.stdout and "trainer.threads" in help_text.stdout
    cfg = run_cli(["--cfg", "job", "reduce_loss=sum"], tmp_path)
    assert cfg.returncode == 0 and "reduce_loss: sum" in cfg.stdout
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_cfg_job_on_every_preset_prints_offline_and_opens_nothing(tmp_path, monkeypatch):
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf"))):
        monkeypatch.setenv(name, value)
    work = tmp_path / "work"
    work.mkdir()
    for name in EXPERIMENTS:
        proc = run_cli([f"+experiment={name}", "--cfg", "job"], work)
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        assert "reduce_loss:" in proc.stdout and "trainer:" in proc.stdout, name
    assert list(work.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("override, expected", [
    ("model=hf model.name_or_path=nobody-here/no-such-model",
     "error: model.name_or_path='nobody-here/no-such-model': cannot load it from the Hub or the local cache "
     "(HF_HUB_OFFLINE is set)"),
    ("data=hf data.path=nobody-here/no-such-data",
     "error: data.path='nobody-here/no-such-data' (nobody-here/no-such-data): Couldn't reach"),
])
def test_unreachable_hub_is_one_line_before_anything_starts(tmp_path, monkeypatch, override, expected):
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf"))):
        monkeypatch.setenv(name, value)
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli(override.split(), work)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-2000:]
    assert list(work.iterdir()) == []


@pytest.mark.slow
def test_torchrun_split_that_leaves_a_rank_without_data_fails_before_training(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "harness",
           "trainer.batch_size=2", "trainer.grad_accum=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("error: trainer.batch_size=2 leaves a rank without data: it must be at least "
            "grad_accum*world_size=2*2=4") in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


@pytest.mark.slow
def test_a_diverging_run_fails_naming_the_step_and_the_analysis_refuses_it(tmp_path):
    new_store(tmp_path / "mlflow.db")
    proc = run_cli(["-m", "reduce_loss=mean,sum", "trainer.lr=1e20", *QUICK], tmp_path)
    assert proc.returncode != 0
    parents, children = child_runs(tmp_path)
    assert (children.status == "FAILED").all() and parents.status.iloc[0] == "FAILED"
    for run in children.to_dict("records"):
        error = run["tags.error"]
        found = re.search(r"NonFiniteError: train/(loss|grad_norm)=(nan|inf) at step (\d+); the run stops", error)
        assert found, error
        step = int(found.group(3))
        # every step before it was logged, finite; nothing from it on; no evaluation summarised a NaN
        assert [s for s, _ in metric_history(run["run_id"], "train/loss")] == list(range(1, step))
        for key in ("train/loss", "train/grad_norm", "val/token_loss", "val/seq_loss"):
            assert all(math.isfinite(v) for _, v in metric_history(run["run_id"], key)), key
        evaluated = [s for s, _ in metric_history(run["run_id"], "val/token_loss")]
        assert all(s < step for s in evaluated)
        assert len(MlflowClient().list_artifacts(run["run_id"], "eval")) == len(evaluated)
    analysis_error = parents["tags.analysis_error"].iloc[0]
    assert "2 run(s) did not finish or were flagged: " in analysis_error and "mean-seed0 (FAILED: " in analysis_error
    sweep_dir = next(tmp_path.glob("multirun/*/*"))
    again = run_cli(["--sweep-dir", str(sweep_dir)], tmp_path, module="analysis")
    assert again.returncode == 2 and "sum-seed0 (FAILED: NonFiniteError" in again.stderr
    assert not (sweep_dir / "analysis").exists()


@pytest.mark.slow
def test_a_run_that_stops_learning_is_flagged_and_refused(tmp_path):
    new_store(tmp_path / "mlflow.db")
    proc = run_cli(["-m", "reduce_loss=mean,sum", "trainer.lr=1e4", *QUICK], tmp_path)
    parents, children = child_runs(tmp_path)
    assert (children.status == "FINISHED").all()
    for run in children.to_dict("records"):
        assert set(run["tags.flag"].split(",")) == {"loss_rose", "grad_norm_zero"}
        zero_at = int(re.search(r"gradient norm was 0 at step (\d+)", run["tags.flag_reason"]).group(1))
        grad = dict(metric_history(run["run_id"], "train/grad_norm"))
        assert grad[zero_at] == 0.0 and all(v > 0 for s, v in grad.items() if s < zero_at)
        loss = dict(metric_history(run["run_id"], "train/loss"))
        assert f"training loss rose from {loss[1]:.4f} (steps 1-1) to {loss[6]:.4f} (steps 6-6)" in run["tags.flag_reason"]
    assert proc.stdout.count("run flagged loss_rose,grad_norm_zero") == 2
    assert "did not finish or were flagged" in parents["tags.analysis_error"].iloc[0]  # the jobs finished; it refused
    sweep_dir = next(tmp_path.glob("multirun/*/*"))
    included = run_cli(["--sweep-dir", str(sweep_dir), "--include-flagged", "--no-plots"], tmp_path, module="analysis")
    assert included.returncode == 0, included.stderr[-2000:]
    assert "(FLAGGED RUNS)" in (sweep_dir / "analysis" / "report.md").read_text().splitlines()[0]


@pytest.mark.slow
def test_job_folders_stay_in_the_sweep_and_credentials_are_stored_nowhere(tmp_path):
    secret = "s3cr3t-pw"
    uri = f"http://alice:{secret}@tracking.example:5000"
    # the store is a local file; the configured URI, with its password, is what gets written down
    prelude = """
        import os
        import harness.launch.sweep_callback, harness.runs.tracking
        local = "sqlite:///" + os.path.abspath("mlflow.db")
        harness.runs.tracking.resolve_uri = harness.launch.sweep_callback.resolve_uri = lambda uri: local
        harness.runs.tracking.check_server = lambda uri: None  # no server behind the URI: the local file serves
    """
    long_value = "x" * 300
    new_store(tmp_path / "mlflow.db")
    proc = run_cli(["-m", "reduce_loss=mean,sum", f"tracking.uri={uri}", "+note=../../escaped/x",
                    f"+long={long_value}", *QUICK], tmp_path, prelude)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert secret not in proc.stdout + proc.stderr

    sweep_dir = next(tmp_path.glob("multirun/*/*"))
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name != "analysis")
    assert [name.split("-", 1)[0] for name in jobs] == ["0", "1"]
    assert all(len(name) <= 110 and ".." not in name for name in jobs)
    # nothing escaped (checkpoints/ and the store's lock are the harness's own)
    assert {p.name for p in tmp_path.iterdir()} <= {"mlflow.db", "mlflow.db.lock", "mlartifacts", "multirun", "checkpoints"}
    assert not list(tmp_path.rglob("escaped"))
    for path in tmp_path.rglob("*"):
        assert secret not in str(path)
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path

    parents, children = child_runs(tmp_path)
    assert (children["params.tracking.uri"] == "http://***@tracking.example:5000").all()
    assert "tracking.uri=http://***@tracking.example:5000" in parents["tags.sweep_overrides"].iloc[0]
    assert "://***@tracking.example" in (sweep_dir / jobs[0] / ".hydra" / "overrides.yaml").read_text()
