"""A run's per-bucket validation metrics (harness/training/evaluate.py bucket_summary) cut the
validation set where the analysis does by default, and average as it does."""

import numpy as np
import pandas as pd

from analysis.compute import Options, bucket_edges
from harness import artifacts
from harness.training.evaluate import bucket_summary


def eval_frame(seq_len, target, loss_sum) -> pd.DataFrame:
    df = pd.DataFrame({"example_id": [f"e{i}" for i in range(len(seq_len))], "seq_len": seq_len,
                       "target_tokens": target, "loss_sum": loss_sum})
    df["loss_mean"] = df.loss_sum / df.target_tokens
    return df


def test_known_answer_per_bucket_and_the_analysis_edges():
    # 12 examples, lengths 10..120: six quantile buckets of two examples each
    seq_len = np.arange(1, 13) * 10
    target = np.array([1, 3] * 6)
    loss_sum = np.array([2.0, 3.0] * 6) * np.repeat(np.arange(1, 7), 2)  # bucket k: sums 2k and 3k
    metrics = bucket_summary(eval_frame(seq_len, target, loss_sum))
    edges = bucket_edges(seq_len.astype(float), Options())
    keys = artifacts.bucket_keys(artifacts.bucket_labels(edges))
    assert keys[0].startswith("b1_") and keys == sorted(keys) and len(keys) == 6
    for k, key in enumerate(keys, start=1):
        assert metrics[f"val/token_loss/{key}"] == (2 * k + 3 * k) / 4  # token-weighted: 5k nats over 4 tokens
        assert metrics[f"val/seq_loss/{key}"] == (2 * k + k) / 2  # example-weighted: (2k/1 + 3k/3) / 2
    assert len(metrics) == 12


def test_a_validation_set_that_cannot_be_cut_logs_no_bucket_metrics():
    assert bucket_summary(eval_frame([50] * 8, [10] * 8, [20.0] * 8)) == {}


def test_bucket_keys_sort_as_the_buckets_do():
    labels = [f"{i}-{i}" for i in range(12)]
    keys = artifacts.bucket_keys(labels)
    assert keys[0] == "b01_0-0" and keys[-1] == "b12_11-11" and keys == sorted(keys)
