import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.compute import Options, analyse, assign, seed_example_interval
from analysis.load import AnalysisError
from analysis.simulate import simulated_runs

TOP = 900  # seq_len above this is (part of) the longest bucket


def planted(mode, seq_len):
    return np.where((mode == "sum") & (seq_len >= TOP), 0.1, 0.0)


def test_effect_planted_in_longest_bucket_is_found_there_only():
    """Over 20 data sets (one per evaluation step) of 3 seeds: the planted bucket is detected
    every time, with the right size; the other buckets (true difference 0) are detected no more
    often than a 95% interval allows."""
    data = simulated_runs(1200, seeds=(0, 1, 2), steps=tuple(range(1, 21)), effect=planted,
                          rng=np.random.default_rng(1))
    # fixed edges so the planted bucket is exactly the longest one
    final = analyse(data, Options(edges=[200, 400, 600, 800, TOP])).paired_diff
    top = final.bucket == final.bucket.max()
    assert len(final[top]) == 20
    assert final[top].distinguishable.all() and (final[top].ci_low > 0.05).all()
    assert (final[top]["diff"] - 0.1).abs().max() < 0.02
    others = final[~top]
    assert (others["diff"].abs() < 0.02).all()
    assert others.distinguishable.mean() <= 0.10, others.distinguishable.sum()


def test_interval_covers_zero_without_an_effect():
    data = simulated_runs(120, seeds=(0, 1, 2), steps=tuple(range(1, 201)), rng=np.random.default_rng(7))
    res = analyse(data, Options(buckets=2))
    assert len(res.paired_diff) == 400
    rate = ((res.paired_diff.ci_low <= 0) & (res.paired_diff.ci_high >= 0)).mean()
    assert 0.9 <= rate <= 0.995, rate  # 400 intervals; a 95% interval should cover ~95%


def gradual(mode, seq_len):
    return np.where(mode == "sum", 0.0001 * seq_len, 0.0)  # a true difference that grows with length


@pytest.mark.parametrize("seeds, example_sd", [(3, 0.0), (5, 0.0), (5, 0.05)])
def test_intervals_cover_the_truth_with_a_seed_level_random_effect(seeds, example_sd):
    """Each seed moves every paired difference by a N(0, 0.05) draw (training noise), optionally
    each example by its own N(0, example_sd) in all seeds: over 300 data sets (one per step), the
    95% intervals cover the true bucket difference in at least 90% of cases. (Intervals over
    examples alone covered about 20% here: the seed draw is 25 times the examples' standard error.)"""
    data = simulated_runs(120, seeds=tuple(range(seeds)), steps=tuple(range(1, 301)), effect=gradual,
                          seed_sd=0.05, example_sd=example_sd, rng=np.random.default_rng(seeds))
    res = analyse(data, Options(buckets=2))
    examples = data.evals.drop_duplicates("example_id")
    truth = pd.Series(gradual("sum", examples.seq_len.to_numpy())).groupby(assign(examples.seq_len.to_numpy(), res.edges)).mean()
    pdf = res.paired_diff
    assert len(pdf) == 600 and (pdf.seeds == seeds).all()
    covered = (pdf.ci_low <= pdf.bucket.map(truth)) & (pdf.bucket.map(truth) <= pdf.ci_high)
    assert 0.90 <= covered.mean() <= 0.99, covered.mean()


def test_bucket_effect_larger_than_the_seed_noise_is_detected_with_five_seeds():
    """Seed noise N(0, 0.05) on every paired difference; 0.15 planted in the longest bucket."""
    def bigger(mode, seq_len):
        return np.where((mode == "sum") & (seq_len >= TOP), 0.15, 0.0)

    data = simulated_runs(600, seeds=tuple(range(5)), steps=tuple(range(1, 101)), effect=bigger, seed_sd=0.05,
                          rng=np.random.default_rng(11))
    pdf = analyse(data, Options(edges=[300, 600, TOP])).paired_diff
    top = pdf.bucket == pdf.bucket.max()
    assert pdf[top].distinguishable.mean() >= 0.9, pdf[top].distinguishable.mean()
    assert (pdf[top].ci_low > 0).mean() >= 0.9
    assert pdf[~top].distinguishable.mean() <= 0.1


def test_interval_is_students_t_over_seed_means_when_seeds_alone_vary():
    """Known answer: every example of a seed differs by the same amount, so the interval is the
    textbook t interval of the S seed means; with one seed it is the t interval of the examples."""
    seed_shift = np.array([0.3, -0.1, 0.2, 0.05])
    table = np.repeat(seed_shift[:, None], 50, axis=1)  # seeds x examples
    low, high, se, df = interval_from_table(table)
    half = stats.t.ppf(0.975, 3) * seed_shift.std(ddof=1) / 2
    assert np.isclose(low, seed_shift.mean() - half) and np.isclose(high, seed_shift.mean() + half) and df == 3

    one_seed = np.random.default_rng(0).normal(0.1, 0.2, (1, 40))
    low, high, se, df = interval_from_table(one_seed)
    half = stats.t.ppf(0.975, 39) * one_seed.std(ddof=1) / np.sqrt(40)
    assert np.isclose(low, one_seed.mean() - half) and np.isclose(high, one_seed.mean() + half) and df == 39


def test_interval_includes_an_example_component_shared_by_all_seeds():
    """Examples that differ the same way in every seed (no seed noise at all): the interval is the
    t interval of the example means, as if there were one seed."""
    example_diff = np.random.default_rng(1).normal(0.1, 0.3, 60)
    table = np.tile(example_diff, (4, 1)) + np.random.default_rng(2).normal(0, 1e-6, (4, 60))
    low, high, se, df = interval_from_table(table)
    expected_se = example_diff.std(ddof=1) / np.sqrt(60)
    assert np.isclose(se, expected_se, rtol=1e-3) and abs(df - 59) < 1
    assert low < example_diff.mean() < high


def interval_from_table(table: np.ndarray):
    """seed_example_interval on one seeds x examples table, from its sums of squares."""
    S, n = table.shape
    grand, seed_means, example_means = table.mean(), table.mean(axis=1), table.mean(axis=0)
    ss_seed = n * ((seed_means - grand) ** 2).sum()
    ss_example = S * ((example_means - grand) ** 2).sum()
    ss_residual = ((table - grand) ** 2).sum() - ss_seed - ss_example
    return [float(x[0]) for x in seed_example_interval([grand], [S], [n], [ss_seed], [ss_example], [ss_residual], 0.95)]


def test_bucket_edges_are_shared_by_every_run_and_step():
    data = simulated_runs(600, modes=("mean", "sum", "token_mean"), seeds=(0, 1), steps=(10, 20))
    res = analyse(data, Options(buckets=6))
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
        analyse(data, Options())
    res = analyse(data, Options(allow_unpaired=True))
    assert res.paired is False


def test_different_validation_examples_are_refused():
    data = simulated_runs(100)
    data.evals = data.evals[~((data.evals.run_id == "sum-s0") & (data.evals.example_id == "ex-0000003"))]
    with pytest.raises(AnalysisError, match="were validated on different examples"):
        analyse(data, Options())


def test_only_one_mode_is_refused():
    with pytest.raises(AnalysisError, match=r"only one reduction \(mean\)"):
        analyse(simulated_runs(50, modes=("mean",)), Options())


def test_empty_buckets_are_refused():
    data = simulated_runs(50)
    with pytest.raises(AnalysisError, match="leaves empty buckets"):
        analyse(data, Options(buckets=200))  # more buckets than examples


def test_edges_outside_the_data_are_left_out_with_a_warning(caplog):
    data = simulated_runs(60)
    seq_len = data.evals.drop_duplicates("example_id").seq_len
    inside = float(seq_len.median())
    res = analyse(data, Options(edges=[1, inside, 5000, 6000]))
    assert res.edges.tolist() == [seq_len.min(), inside, seq_len.max() + 1]
    assert res.paired_diff.groupby("step").bucket.nunique().eq(2).all()
    assert "--edges 1,5000,6000 outside the validation seq_len range" in caplog.text


def test_gradient_share_follows_the_mode_weights():
    res = analyse(simulated_runs(600), Options(buckets=3))
    share = res.grad_share.pivot(index="bucket", columns="reduce_loss", values="share")
    assert np.allclose(share.sum(), 1.0)
    assert share["sum"].iloc[-1] > share["mean"].iloc[-1]  # sum weighs long examples by their tokens
    assert abs(share["mean"].iloc[0] - 1 / 3) < 0.02  # equal weight per example, equal-count buckets


def test_token_share_is_each_buckets_share_of_training_target_tokens():
    data = simulated_runs(600)
    res = analyse(data, Options(buckets=3))
    train = data.grad_weights.drop_duplicates("example_id")
    bucket = assign(train.seq_len.to_numpy(dtype=float), res.edges)
    expected = train.target_tokens.groupby(bucket).sum() / train.target_tokens.sum()
    for mode, part in res.grad_share.groupby("reduce_loss"):
        assert np.allclose(part.set_index("bucket").token_share.sort_index().to_numpy(), expected.to_numpy()), mode
    assert expected.iloc[-1] > expected.iloc[0] + 0.2  # long examples hold more tokens: the line is not flat


def test_reference_defaults_to_mean_else_token_mean():
    res = analyse(simulated_runs(60, modes=("mean", "sum", "token_mean")), Options())
    assert res.options.reference == "mean" and set(res.paired_diff.reduce_loss) == {"sum", "token_mean"}
    res = analyse(simulated_runs(60, modes=("sum", "token_mean")), Options())
    assert res.options.reference == "token_mean" and set(res.paired_diff.reduce_loss) == {"sum"}
    with pytest.raises(AnalysisError, match="reference mode 'mean' is not among the runs"):
        analyse(simulated_runs(60, modes=("sum", "token_mean")), Options(reference="mean"))
