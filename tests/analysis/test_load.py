"""Selecting runs from a real MLflow store, in process."""

import mlflow
import numpy as np
import pytest

from analysis.compute import Options
from analysis.run import run_analysis
from analysis.simulate import simulated_runs
from tests.helpers.mlflow_sweep import log_sweep


@pytest.mark.slow
def test_a_sweep_logged_twice_is_compared_once_using_the_latest_runs(tmp_path):
    """The same jobs ran twice (a repeated sweep before runs were resumed, or two sweeps sharing
    jobs): `--experiment` compares the latest run of each job and names the ones left out."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    rng = np.random.default_rng(5)
    log_sweep(uri, tmp_path, simulated_runs(200, rng=rng))
    planted = simulated_runs(200, effect=lambda mode, seq_len: np.where(mode == "sum", 0.5, 0.0), rng=rng)
    log_sweep(uri, tmp_path, planted)

    res = run_analysis(uri, tmp_path / "out", Options(buckets=2), experiment="reduce-loss", draw=False)
    assert len(res.runs) == 4 and sorted(res.runs.seed) == ["0", "0", "1", "1"]
    assert len(res.superseded) == 4
    final = res.paired_diff[res.paired_diff.step == res.final_step]
    assert (abs(final["diff"] - 0.5) < 0.05).all() and (final.seeds == 2).all()  # the second sweep's runs
    assert (res.bucket_losses.examples.groupby(res.bucket_losses.reduce_loss).sum() == 200).all()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**left out**: 4 earlier run(s)" in report and "mean-s0 (" in report
