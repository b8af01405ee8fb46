"""The lr_grid preset through the real command line, at short settings: a sweep over the learning
rate ends in the tuned comparison (each mode at its own best learning rate, on the test split)."""

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.cli import QUICK, child_runs, run_cli

# 2 modes x 3 learning rates x 2 seeds = 12 runs of 6 steps
SHORT = [*QUICK, "data.num_test=64", "reduce_loss=mean,sum", "trainer.threads=1"]


@pytest.mark.slow
def test_lr_grid_preset_ends_in_the_tuned_comparison_on_the_test_split(tmp_path):
    proc = run_cli(["-m", "+experiment=lr_grid", *SHORT], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parents, children = child_runs(tmp_path)
    assert len(children) == 12 and (children.status == "FINISHED").all()
    assert sorted(children["params.trainer.lr"].unique()) == ["0.003", "0.01", "0.03"]
    for _, runs in children.groupby("tags.seed"):  # paired across learning rates: same weights, same data
        assert runs["tags.init_fingerprint"].nunique() == 1 and runs["tags.data_fingerprint"].nunique() == 1
        assert runs["tags.pair_id"].nunique() == 3  # the pair id includes the learning rate, by design
    assert children["metrics.test/token_loss"].notna().all()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert all(client.list_artifacts(r, "eval")[-1].path.endswith("test.parquet") or
               any(a.path == "eval/test.parquet" for a in client.list_artifacts(r, "eval")) for r in children.run_id)

    report = next(tmp_path.glob("multirun/*/*/analysis/report.md")).read_text()
    assert "![Final validation loss against the tuned value" in report and "(sensitivity.png)" in report
    assert "(sensitivity_by_bucket.png)" in report and "(tuned_paired_difference.png)" in report
    assert "## Final validation loss, token-weighted: each token weighs the same, per trainer.lr" in report
    assert "| trainer.lr=0.003" in report and "At the chosen values, test split: Paired difference" in report
    assert "each at its own best trainer.lr" in report
    # the end-of-sweep summary prints the tuned table and the test-split comparison
    assert "final validation loss (token-weighted) per trainer.lr" in proc.stdout
    assert "test split at the chosen values, paired difference vs mean" in proc.stdout
    parent = parents.iloc[0]
    assert parent["metrics.tuned/mean/trainer.lr"] in (3e-3, 1e-2, 3e-2)
    assert parent["metrics.tuned/sum/trainer.lr"] in (3e-3, 1e-2, 3e-2)
