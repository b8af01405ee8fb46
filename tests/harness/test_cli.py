"""The real command line, in a subprocess, in a temporary launch directory."""

import subprocess
import sys

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.cli import QUICK, child_runs, run_cli


@pytest.mark.slow
def test_sweep_makes_paired_runs_with_tags_metrics_and_artifacts(tmp_path):
    proc = run_cli(["-m", "reduce_loss=mean,sum", "seed=0,1", *QUICK], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parents, children = child_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    parent_id = parents.run_id.iloc[0]
    assert (children["tags.mlflow.parentRunId"] == parent_id).all()
    assert (children.status == "FINISHED").all() and parents.status.iloc[0] == "FINISHED"

    for seed, pair in children.groupby("tags.seed"):
        assert sorted(pair["tags.reduce_loss"]) == ["mean", "sum"]
        for tag in ("pair_id", "init_fingerprint", "data_fingerprint"):
            assert pair[f"tags.{tag}"].nunique() == 1, (seed, tag)
    for tag in ("pair_id", "init_fingerprint", "data_fingerprint"):
        assert children.groupby("tags.seed")[f"tags.{tag}"].first().nunique() == 2, tag

    client = MlflowClient()
    run_id = children.run_id.iloc[0]
    assert children["params.trainer.max_steps"].iloc[0] == "6"
    history = client.get_metric_history(run_id, "val/token_loss")
    assert [m.step for m in history] == [3, 6]
    for metric in ("train/loss", "val/seq_loss"):
        assert client.get_metric_history(run_id, metric)
    names = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert names == {"eval/step_00000003.parquet", "eval/step_00000006.parquet", "eval/final.parquet"}
    assert "resolved_config.yaml" in {a.path for a in client.list_artifacts(run_id)}
    final = pd.read_parquet(client.download_artifacts(run_id, "eval/final.parquet", str(tmp_path)))
    assert len(final) == 24 and final.example_id.is_unique
    assert {"example_id", "seq_len", "target_tokens", "loss_sum", "loss_mean"} <= set(final.columns)
    assert (final.loss_mean - final.loss_sum / final.target_tokens).abs().max() < 1e-12
    assert (final.target_tokens < final.seq_len).all()

    sweep_dir = next(tmp_path.glob("multirun/*/*"))
    written = {p.name for p in (sweep_dir / "analysis").iterdir()}
    assert {"val_loss_by_bucket.png", "paired_difference.png", "train_loss.png", "gradient_weight_share.png",
            "val_loss_by_bucket_over_steps.png", "report.md", "report.html"} <= written
    logged = {a.path for a in client.list_artifacts(parent_id, "analysis")}
    assert "analysis/report.html" in logged and "analysis/paired_difference.png" in logged


@pytest.mark.slow
@pytest.mark.parametrize("override, expected", [
    ("reduce_loss=median", "reduce_loss='median' is not valid; choose one of: mean, sum, token_mean, seq_mean"),
    ("model=nope", "model=nope is not a known option; choose one of: hf, tiny_llama"),
    ("seed=abc", "seed='abc' is not an integer"),
    ("trainer.batch_size=1", "trainer.batch_size=1 leaves a rank without data"),
    ("loss_scale=0", "loss_scale=0 must be a number > 0"),
    ("data.packing=true data.pack_length=abc", "data.pack_length='abc' is not an integer"),
    ("data.packing=true data.pack_length=100", "data.pack_length=100 is shorter than data.max_seq_len=512"),
])
def test_bad_input_fails_in_one_line_before_anything_starts(tmp_path, override, expected):
    proc = run_cli(["-m", "reduce_loss=mean,sum", *override.split()], tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_failed_job_is_marked_failed_and_the_sweep_goes_on(tmp_path):
    prelude = """
        import harness.step as step
        real = step.example_weights
        def failing(mode, *args, **kwargs):
            if mode == "sum":
                raise RuntimeError("injected failure in the sum run")
            return real(mode, *args, **kwargs)
        step.example_weights = failing
    """
    proc = run_cli(["-m", "reduce_loss=sum,mean", *QUICK], tmp_path, prelude)
    assert proc.returncode != 0
    parents, children = child_runs(tmp_path)
    status = dict(zip(children["tags.reduce_loss"], children.status))
    assert status == {"sum": "FAILED", "mean": "FINISHED"}
    assert "injected failure" in children.set_index("tags.reduce_loss").loc["sum", "tags.error"]
    assert parents.status.iloc[0] == "FAILED"


@pytest.mark.slow
def test_help_and_cfg_job(tmp_path):
    help_text = run_cli(["--help"], tmp_path)
    assert help_text.returncode == 0 and "reduce_loss" in help_text.stdout
    cfg = run_cli(["--cfg", "job", "reduce_loss=sum"], tmp_path)
    assert cfg.returncode == 0 and "reduce_loss: sum" in cfg.stdout
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_torchrun_split_that_leaves_a_rank_without_data_fails_before_training(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "harness",
           "trainer.batch_size=2", "trainer.grad_accum=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("error: trainer.batch_size=2 leaves a rank without data: it must be at least "
            "grad_accum*world_size=2*2=4") in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()
