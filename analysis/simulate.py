"""Constructed runs with known answers, for tests and the speed benchmark."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.load import RunData
from harness import artifacts


def simulated_runs(n_examples: int, modes=("mean", "sum"), seeds=(0, 1), steps=(100,), effect=None,
                   noise: float = 0.05, rng: np.random.Generator | None = None) -> RunData:
    """Paired runs on one validation set. `effect(mode, seq_len) -> array` adds to loss_mean.

    Each example has a difficulty shared by all runs; each run adds independent noise, so the
    paired differences have mean `effect` and spread `noise * sqrt(2)`."""
    rng = rng or np.random.default_rng(0)
    seq_len = rng.integers(8, 1024, n_examples)
    target = np.maximum(1, (seq_len * rng.uniform(0.2, 0.9, n_examples)).astype(int))
    ids = np.array([f"ex-{i:07d}" for i in range(n_examples)])
    difficulty = rng.normal(2.0, 0.5, n_examples)
    runs, evals, grads, curves = [], [], [], []
    for seed in seeds:
        for mode in modes:
            run_id = f"{mode}-s{seed}"
            runs.append(dict(run_id=run_id, run_name=run_id, status="FINISHED", reduce_loss=mode, seed=str(seed),
                             pair_id=f"pair-{seed}", init_fingerprint=f"init-{seed}", data_fingerprint=f"data-{seed}",
                             schema_version=artifacts.SCHEMA_VERSION))
            for step in steps:
                loss_mean = difficulty + rng.normal(0, noise, n_examples)
                if effect is not None:
                    loss_mean = loss_mean + effect(mode, seq_len)
                evals.append(pd.DataFrame(dict(example_id=ids, seq_len=seq_len, target_tokens=target,
                                               loss_sum=loss_mean * target, loss_mean=loss_mean, run_id=run_id, step=step)))
            weight = target if mode == "sum" else np.ones(n_examples)
            grads.append(pd.DataFrame(dict(example_id=ids, seq_len=seq_len, target_tokens=target, times_seen=1,
                                           grad_weight=weight.astype(float), run_id=run_id)))
            curves.append(pd.DataFrame(dict(run_id=run_id, step=list(steps), value=[2.0] * len(steps))))
    return RunData(pd.DataFrame(runs), pd.concat(evals, ignore_index=True), pd.concat(grads, ignore_index=True),
                   pd.concat(curves, ignore_index=True))
