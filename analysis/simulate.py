"""Constructed runs with known answers, for tests and the speed benchmark."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.load import RunData
from harness import artifacts


def simulated_runs(n_examples: int, modes=("mean", "sum"), seeds=(0, 1), steps=(100,), effect=None,
                   noise: float = 0.05, seed_sd: float = 0.0, example_sd: float = 0.0,
                   rng: np.random.Generator | None = None) -> RunData:
    """Paired runs on one validation set. `effect(mode, seq_len) -> array` adds to loss_mean.

    Each example has a difficulty shared by all runs. On top of it, at every evaluation step:
    - `noise`: every run adds independent N(0, noise) to each example, so the paired
      differences spread by noise * sqrt(2);
    - `seed_sd`: every run shifts all its examples by one N(0, seed_sd / sqrt(2)) draw, so a
      paired difference between two modes moves by N(0, seed_sd) per seed (training noise,
      which no number of validation examples averages away);
    - `example_sd`: every mode shifts each example by N(0, example_sd / sqrt(2)), the same in
      all seeds (an example-specific part of the effect, which no number of seeds averages away).
    The true paired difference is therefore `effect` alone. Steps draw independently of each
    other, so each step is an independent data set.
    """
    rng = rng or np.random.default_rng(0)
    seq_len = rng.integers(8, 1024, n_examples)
    target = np.maximum(1, (seq_len * rng.uniform(0.2, 0.9, n_examples)).astype(int))
    ids = np.array([f"ex-{i:07d}" for i in range(n_examples)])
    difficulty = rng.normal(2.0, 0.5, n_examples)
    n_seeds, n_modes, n_steps = len(seeds), len(modes), len(steps)

    # loss_mean[seed, mode, step, example]
    loss = difficulty + rng.normal(0, noise, (n_seeds, n_modes, n_steps, n_examples))
    if seed_sd:
        loss += rng.normal(0, seed_sd / np.sqrt(2), (n_seeds, n_modes, n_steps, 1))
    if example_sd:
        loss += rng.normal(0, example_sd / np.sqrt(2), (1, n_modes, n_steps, n_examples))
    if effect is not None:
        planted = np.stack([np.broadcast_to(effect(mode, seq_len), seq_len.shape) for mode in modes])
        loss += planted[None, :, None, :]

    run_ids = [f"{mode}-s{seed}" for seed in seeds for mode in modes]
    runs = pd.DataFrame([dict(run_id=f"{mode}-s{seed}", run_name=f"{mode}-s{seed}", status="FINISHED",
                              reduce_loss=mode, seed=str(seed), pair_id=f"pair-{seed}", init_fingerprint=f"init-{seed}",
                              data_fingerprint=f"data-{seed}", schema_version=artifacts.SCHEMA_VERSION)
                         for seed in seeds for mode in modes])
    per_run_step = n_steps * n_examples
    loss_mean = loss.reshape(-1)
    evals = pd.DataFrame(dict(
        example_id=np.tile(ids, n_seeds * n_modes * n_steps),
        seq_len=np.tile(seq_len, n_seeds * n_modes * n_steps),
        target_tokens=np.tile(target, n_seeds * n_modes * n_steps),
        loss_sum=loss_mean * np.tile(target, n_seeds * n_modes * n_steps),
        loss_mean=loss_mean,
        run_id=np.repeat(run_ids, per_run_step),
        step=np.tile(np.repeat(np.asarray(steps), n_examples), n_seeds * n_modes),
    ))
    grads = pd.concat([pd.DataFrame(dict(example_id=ids, seq_len=seq_len, target_tokens=target, times_seen=1,
                                         grad_weight=(target if mode == "sum" else np.ones(n_examples)).astype(float),
                                         run_id=f"{mode}-s{seed}"))
                       for seed in seeds for mode in modes], ignore_index=True)
    curves = pd.DataFrame(dict(run_id=np.repeat(run_ids, n_steps), step=np.tile(np.asarray(steps), len(run_ids)),
                               value=2.0))
    return RunData(runs, evals, grads, curves)


def simulated_grid(n_val: int, n_test: int, *, values=(1e-4, 3e-4, 1e-3, 3e-3), optimum=None,
                   modes=("mean", "sum"), seeds=(0, 1, 2), key: str = "trainer.lr", curvature: float = 0.2,
                   effect=None, noise: float = 0.05, seed_sd: float = 0.0, step: int = 100, n_train: int = 50,
                   rng: np.random.Generator | None = None) -> RunData:
    """A sweep of `modes` x `values` of `key` x `seeds`, with a validation and a test split of
    their own examples (ids val-*, test-*) and training examples (train-*). `optimum`: mode ->
    its best value (default: the middle of the grid).

    Every example's loss_mean is its difficulty, plus `curvature * (log10(value / optimum))**2`
    (so each mode is best at its optimum, on every split), plus `effect(mode, seq_len)` at the
    mode's optimum only, plus noise as in `simulated_runs`: `noise` per run and example, and
    per run one N(0, seed_sd / sqrt(2)) shift. Runs of one seed share init and data fingerprints
    at every value and in every mode; their pair_id differs by value (it includes the value)."""
    rng = rng or np.random.default_rng(0)
    values = tuple(float(v) for v in values)
    optimum = optimum or {m: values[len(values) // 2] for m in modes}

    def split(prefix: str, n: int):
        seq_len = rng.integers(8, 1024, n)
        target = np.maximum(1, (seq_len * rng.uniform(0.2, 0.9, n)).astype(int))
        return np.array([f"{prefix}-{i:06d}" for i in range(n)]), seq_len, target, rng.normal(2.0, 0.5, n)

    splits = {"val": split("val", n_val), "test": split("test", n_test)}
    train_ids, train_len, train_target, _ = split("train", n_train)
    runs, frames, grads, curves = [], {"val": [], "test": []}, [], []
    for seed in seeds:
        for value in values:
            for mode in modes:
                run_id = f"{mode}-{key}={value:g}-s{seed}"
                runs.append(dict(run_id=run_id, run_name=run_id, status="FINISHED", reduce_loss=mode, seed=str(seed),
                                 pair_id=f"pair-{seed}-{value:g}", init_fingerprint=f"init-{seed}",
                                 data_fingerprint=f"data-{seed}", schema_version=artifacts.SCHEMA_VERSION,
                                 **{key: repr(value)}))
                shift = rng.normal(0, seed_sd / np.sqrt(2)) if seed_sd else 0.0
                at_optimum = np.isclose(value, optimum[mode])
                for name, (ids, seq_len, target, difficulty) in splits.items():
                    loss = (difficulty + curvature * np.log10(value / optimum[mode]) ** 2 + shift
                            + rng.normal(0, noise, len(ids)))
                    if effect is not None and at_optimum:
                        loss = loss + np.broadcast_to(effect(mode, seq_len), seq_len.shape)
                    frames[name].append(pd.DataFrame(dict(example_id=ids, seq_len=seq_len, target_tokens=target,
                                                          loss_sum=loss * target, loss_mean=loss, run_id=run_id,
                                                          step=step)))
                grads.append(pd.DataFrame(dict(example_id=train_ids, seq_len=train_len, target_tokens=train_target,
                                               times_seen=1, grad_weight=(train_target if mode == "sum" else
                                                                          np.ones(n_train)).astype(float),
                                               run_id=run_id)))
                curves.append(pd.DataFrame(dict(run_id=[run_id], step=[step], value=[2.0])))
    tests = pd.concat(frames["test"], ignore_index=True).drop(columns="step")
    grads = pd.concat(grads, ignore_index=True) if n_train else pd.DataFrame()
    return RunData(pd.DataFrame(runs), pd.concat(frames["val"], ignore_index=True), grads,
                   pd.concat(curves, ignore_index=True), tests=tests)
