import numpy as np
import pytest

from analysis.compute import Options, analyse
from analysis.load import AnalysisError
from analysis.simulate import simulated_runs

TOP = 900  # seq_len above this is (part of) the longest bucket


def planted(mode, seq_len):
    return np.where((mode == "sum") & (seq_len >= TOP), 0.1, 0.0)


def test_effect_planted_in_longest_bucket_is_found_there_only():
    """Over 20 data sets: the planted bucket is detected every time, with the right size; the
    other buckets (true difference 0) are detected no more often than a 95% interval allows."""
    rng = np.random.default_rng(1)
    false_alarms, nulls = 0, 0
    for _ in range(20):
        data = simulated_runs(1200, effect=planted, rng=rng)
        # fixed edges so the planted bucket is exactly the longest one
        res = analyse(data, Options(edges=[200, 400, 600, 800, TOP], n_boot=500, rng_seed=int(rng.integers(1 << 30))))
        final = res.paired_diff.set_index("bucket")
        top = final.index.max()
        assert final.loc[top, "distinguishable"] and final.loc[top, "ci_low"] > 0.05
        assert abs(final.loc[top, "diff"] - 0.1) < 0.02
        others = final.drop(index=top)
        assert (others["diff"].abs() < 0.02).all()
        false_alarms += int(others.distinguishable.sum())
        nulls += len(others)
    assert false_alarms / nulls <= 0.10, (false_alarms, nulls)


def test_interval_covers_zero_without_an_effect():
    rng = np.random.default_rng(7)
    covered = []
    for _ in range(200):
        data = simulated_runs(120, seeds=(0, 1, 2), rng=rng)
        res = analyse(data, Options(buckets=2, n_boot=400, rng_seed=int(rng.integers(1 << 30))))
        covered += list((res.paired_diff.ci_low <= 0) & (res.paired_diff.ci_high >= 0))
    rate = np.mean(covered)
    assert 0.9 <= rate <= 0.995, rate  # 400 intervals; a 95% interval should cover ~95%


def test_bucket_edges_are_shared_by_every_run_and_step():
    data = simulated_runs(600, modes=("mean", "sum", "token_mean"), seeds=(0, 1), steps=(10, 20))
    res = analyse(data, Options(buckets=6, n_boot=50))
    counts = res.bucket_losses.pivot_table(index="bucket", columns=["step", "reduce_loss"], values="examples")
    assert (counts.nunique(axis=1) == 1).all()  # same examples per bucket in every run and step
    assert counts.iloc[:, 0].sum() == 600 and counts.iloc[:, 0].max() - counts.iloc[:, 0].min() <= 2
    seq = data.evals.drop_duplicates("example_id").seq_len.to_numpy()
    assert res.edges[0] == seq.min() and res.edges[-1] == seq.max() + 1
    assert len(res.edges) == 7


def test_unpaired_selection_is_refused_naming_runs_and_difference():
    data = simulated_runs(100)
    data.runs.loc[data.runs.run_id == "sum-s1", "init_fingerprint"] = "other"
    with pytest.raises(AnalysisError, match=r"runs mean-s1, sum-s1 share pair pair-1 but differ in init_fingerprint"):
        analyse(data, Options(n_boot=50))
    res = analyse(data, Options(n_boot=50, allow_unpaired=True))
    assert res.paired is False


def test_different_validation_examples_are_refused():
    data = simulated_runs(100)
    data.evals = data.evals[~((data.evals.run_id == "sum-s0") & (data.evals.example_id == "ex-0000003"))]
    with pytest.raises(AnalysisError, match="were validated on different examples"):
        analyse(data, Options(n_boot=50))


def test_only_one_mode_is_refused():
    with pytest.raises(AnalysisError, match=r"only one reduction \(mean\)"):
        analyse(simulated_runs(50, modes=("mean",)), Options())


def test_empty_buckets_are_refused():
    data = simulated_runs(50)
    with pytest.raises(AnalysisError, match="leaves empty buckets"):
        analyse(data, Options(edges=[5000, 6000]))


def test_gradient_share_follows_the_mode_weights():
    res = analyse(simulated_runs(600), Options(buckets=3, n_boot=50))
    share = res.grad_share.pivot(index="bucket", columns="reduce_loss", values="share")
    assert np.allclose(share.sum(), 1.0)
    assert share["sum"].iloc[-1] > share["mean"].iloc[-1]  # sum weighs long examples by their tokens
    assert abs(share["mean"].iloc[0] - 1 / 3) < 0.02  # equal weight per example, equal-count buckets
