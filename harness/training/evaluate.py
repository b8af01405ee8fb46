"""Validation (and, at the end, test) loss of every example, written where the analysis reads it
(harness/artifacts.py)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
import torch

from harness import artifacts
from harness.data.batching import collate, pack_into_rows
from harness.distributed import World, all_reduce_sum, gather_to_main
from harness.training.guard import NonFiniteError
from harness.training.losses import per_example_sums, token_nll

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model, examples, *, batch_size: int, pad_id: int, packing: bool, row_length: int,
             device: torch.device, world: World, chunk_tokens: int | None = None,
             step: int | None = None, tokens_per_row: int | None = None) -> pd.DataFrame | None:
    """One row per validation example (on rank 0; None elsewhere). Each rank evaluates every
    W-th example, so together they cover every example exactly once. A non-finite loss raises
    NonFiniteError naming `step` on every rank. `tokens_per_row`: the examples go packed into
    rows of exactly that many tokens, one row per forward pass (training's physical rows: a
    compiled model compiles once for validation, where padded batches recompile it per shape)."""
    was_training = model.training
    model.eval()
    mine = sorted(examples[world.rank :: world.size], key=lambda e: e.seq_len)  # less padding
    if tokens_per_row is None:
        batches = (collate(mine[start : start + batch_size], pad_id, packing, row_length)
                   for start in range(0, len(mine), batch_size))
    else:
        batches = (collate([mine[i] for i in row], pad_id, packing=True, row_length=tokens_per_row, fixed_length=True)
                   for row in pack_into_rows([e.seq_len for e in mine], tokens_per_row))
    rows = []
    for batch in batches:
        batch = batch.to(device)
        sums = per_example_sums(token_nll(model, batch, chunk_tokens), batch).double().cpu().tolist()
        rows += [(e.example_id, e.seq_len, e.target_tokens, s) for e, s in zip(batch.examples, sums)]
    model.train(was_training)
    bad = [r for r in rows if not math.isfinite(r[3])]
    if all_reduce_sum([len(bad)], device)[0]:  # every rank stops, before anything is written
        example = f"e.g. {bad[0][0]}: {bad[0][3]}" if bad else "on another rank"
        raise NonFiniteError(f"validation loss is not finite at step {step} ({example}); the weights after "
                             "that step are not finite")
    gathered = gather_to_main(rows, world)
    if not world.is_main:
        return None
    df = pd.DataFrame([r for part in gathered for r in part], columns=artifacts.EVAL_COLUMNS[:4])
    df["loss_mean"] = df.loss_sum / df.target_tokens
    return df.sort_values("example_id", ignore_index=True)


def summary(df: pd.DataFrame) -> dict[str, float]:
    """Token- and example-weighted means; a NaN stays NaN (pandas would skip it)."""
    return {
        "val/token_loss": float(df.loss_sum.sum(skipna=False) / df.target_tokens.sum()),
        "val/seq_loss": float(df.loss_mean.mean(skipna=False)),
    }


def bucket_summary(df: pd.DataFrame) -> dict[str, float]:
    """Token- and example-weighted means per length bucket, the buckets cut as the analysis cuts
    them by default (harness/artifacts.py), named so that they sort: `val/token_loss/b1_69-73`.
    Empty when the validation set cannot be cut so (too few distinct lengths)."""
    lengths = df[artifacts.BUCKET_BY].to_numpy(dtype=float)
    try:
        edges = artifacts.bucket_edges(lengths)
    except artifacts.BucketError as e:
        log.warning("no per-bucket validation metrics: %d buckets of %s with %s leave some empty", artifacts.BUCKETS,
                    artifacts.BUCKET_BY, e)
        return {}
    keys = artifacts.bucket_keys(artifacts.bucket_labels(edges))
    grouped = df.groupby(artifacts.assign_buckets(lengths, edges))
    token_loss = grouped.loss_sum.sum() / grouped.target_tokens.sum()
    example_loss = grouped.loss_mean.mean()
    out = {}
    for bucket, key in enumerate(keys):
        out[artifacts.VAL_BUCKET_METRICS["token_loss"].format(bucket=key)] = float(token_loss[bucket])
        out[artifacts.VAL_BUCKET_METRICS["example_loss"].format(bucket=key)] = float(example_loss[bucket])
    return out


def _evaluate_into(out_dir: Path, model, examples, **kwargs):
    """The per-example losses (None off rank 0) and the run's eval folder, made on rank 0."""
    df = evaluate(model, examples, **kwargs)
    folder = out_dir / artifacts.EVAL_DIR
    if df is not None:
        folder.mkdir(parents=True, exist_ok=True)
    return df, folder


def evaluate_and_log(model, examples, step: int, final: bool, out_dir: Path, tracker, *, batch_size: int,
                     layout: dict, device: torch.device, world: World, chunk_tokens: int | None,
                     tokens_per_row: int | None = None) -> dict[str, float]:
    """Evaluate, write `eval/step_<step>.parquet` (and `eval/final.parquet` at the end) into
    `out_dir` and the run, log the summary metrics, and return them (empty off rank 0)."""
    df, folder = _evaluate_into(out_dir, model, examples, batch_size=batch_size, device=device, world=world,
                                chunk_tokens=chunk_tokens, step=step, tokens_per_row=tokens_per_row, **layout)
    if df is None:
        return {}
    for name in [artifacts.eval_file(step)] + ([artifacts.FINAL_EVAL] if final else []):
        df.to_parquet(folder / name)
        tracker.artifact(folder / name, artifacts.EVAL_DIR)
    if final:
        df.to_csv(folder / artifacts.FINAL_EVAL_CSV, index=False)
        tracker.artifact(folder / artifacts.FINAL_EVAL_CSV, artifacts.EVAL_DIR)
    metrics = summary(df)
    tracker.metrics(metrics | bucket_summary(df), step=step)
    return metrics


def evaluate_test_and_log(model, examples, step: int, out_dir: Path, tracker, *, batch_size: int, layout: dict,
                          device: torch.device, world: World, chunk_tokens: int | None,
                          tokens_per_row: int | None = None) -> dict[str, float]:
    """The test split, once, after the last step: `eval/test.parquet` and the metrics
    test/token_loss and test/seq_loss (empty off rank 0)."""
    df, folder = _evaluate_into(out_dir, model, examples, batch_size=batch_size, device=device, world=world,
                                chunk_tokens=chunk_tokens, step=step, tokens_per_row=tokens_per_row, **layout)
    if df is None:
        return {}
    df.to_parquet(folder / artifacts.TEST_EVAL)
    tracker.artifact(folder / artifacts.TEST_EVAL, artifacts.EVAL_DIR)
    metrics = {artifacts.TEST_METRIC_PREFIX + k.split("/", 1)[1]: v for k, v in summary(df).items()}
    tracker.metrics(metrics, step=step)
    return metrics
