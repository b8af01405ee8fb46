"""Pairing check, length buckets, per-bucket losses, paired bootstrap intervals, gradient shares.

Everything here works on pandas frames and returns frames; nothing plots or writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.load import AnalysisError, RunData, require_two_modes
from harness import artifacts


@dataclass
class Options:
    bucket_by: str = "seq_len"  # seq_len | target_tokens
    buckets: int = 6  # equal-count quantile buckets of the validation set ...
    edges: list[float] | None = None  # ... unless fixed inner edges are given
    reference: str = "mean"
    allow_unpaired: bool = False
    include_flagged: bool = False  # analyse flagged runs, leave out those that did not finish
    n_boot: int = 1000
    confidence: float = 0.95
    rng_seed: int = 0


@dataclass
class Results:
    options: Options
    runs: pd.DataFrame  # with `group`: runs compared with each other share it
    paired: bool
    edges: np.ndarray
    labels: list[str]
    bucket_losses: pd.DataFrame  # step, reduce_loss, bucket, token_loss, example_loss, examples
    paired_diff: pd.DataFrame  # step, reduce_loss, bucket, diff, ci_low, ci_high, examples, seeds, distinguishable
    grad_share: pd.DataFrame  # reduce_loss, bucket, share
    curves: pd.DataFrame  # run_id, reduce_loss, seed, step, value
    final_step: int
    superseded: list[str] = field(default_factory=list)  # earlier runs of repeated jobs, left out
    left_out: list[str] = field(default_factory=list)  # runs that did not finish (--include-flagged)

    @property
    def flagged(self) -> pd.DataFrame:
        """Flagged runs among those compared (only with --include-flagged)."""
        flag = self.runs.get(artifacts.TAG_FLAG, pd.Series(None, index=self.runs.index))
        return self.runs[flag.fillna("") != ""]

    @property
    def caveats(self) -> list[str]:
        """What every output is marked with: UNPAIRED, FLAGGED RUNS."""
        flagged = len(self.flagged) > 0 or len(self.left_out) > 0
        return (["UNPAIRED"] if not self.paired else []) + (["FLAGGED RUNS"] if flagged else [])


def check_pairs(data: RunData, allow_unpaired: bool) -> tuple[pd.DataFrame, bool]:
    """Runs with a `group` column; refuse comparisons that are not paired."""
    runs = data.runs.copy()
    require_two_modes(runs.reduce_loss)
    modes = sorted(runs.reduce_loss.unique())
    final = data.evals[data.evals.step == data.evals.groupby("run_id").step.transform("max")]
    example_sets = final.groupby("run_id").example_id.agg(frozenset)
    names = dict(zip(runs.run_id, runs.run_name.fillna(runs.run_id)))
    problems = []
    for pair_id, group in runs.groupby("pair_id", dropna=False):
        label = ", ".join(names[r] for r in group.run_id)
        if group.reduce_loss.duplicated().any():
            problems.append(f"pair {pair_id} holds the same reduction twice ({label})")
        for column in ("init_fingerprint", "data_fingerprint"):
            if group[column].nunique(dropna=False) > 1:
                problems.append(f"runs {label} share pair {pair_id} but differ in {column}")
        if len({example_sets[r] for r in group.run_id}) > 1:
            problems.append(f"runs {label} were validated on different examples")
        if sorted(group.reduce_loss) != modes:
            missing = sorted(set(modes) - set(group.reduce_loss))
            problems.append(f"pair {pair_id} ({label}) has no run for {', '.join(missing)}")
    if problems and not allow_unpaired:
        raise AnalysisError("runs are not paired: " + "; ".join(problems) + " (--allow-unpaired compares them anyway)")
    runs["group"] = runs.pair_id if not problems else runs.seed
    return runs, not problems


def bucket_edges(values: np.ndarray, opts: Options) -> np.ndarray:
    """Bucket edges [lo, e1, ..., hi] computed once from the validation examples."""
    if opts.edges:
        inner = np.sort(np.asarray(opts.edges, dtype=float))
        edges = np.concatenate([[min(values.min(), inner[0])], inner, [max(values.max(), inner[-1]) + 1]])
    else:
        edges = np.quantile(values, np.linspace(0, 1, opts.buckets + 1))
        edges[-1] += 1  # the top bucket includes the maximum
    counts = np.bincount(assign(values, edges), minlength=len(edges) - 1)
    if (np.diff(edges) <= 0).any() or (counts == 0).any():
        raise AnalysisError(
            f"bucketing {opts.bucket_by} with edges {np.round(edges, 1).tolist()} leaves empty buckets; "
            "ask for fewer buckets or other --edges"
        )
    return edges


def assign(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)


def bucket_labels(edges: np.ndarray) -> list[str]:
    return [f"{int(np.ceil(lo))}-{int(np.ceil(hi)) - 1}" for lo, hi in zip(edges[:-1], edges[1:])]


def bootstrap_mean_ci(values: np.ndarray, n_boot: int, confidence: float, rng: np.random.Generator,
                      chunk: int = 250) -> tuple[float, float]:
    """Percentile interval of the mean, resampling the given units with replacement."""
    n = len(values)
    if n == 1:
        return float(values[0]), float(values[0])
    means = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(size, n), dtype=np.int32)
        means[start : start + size] = values[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def _paired_differences(evals: pd.DataFrame, modes: list[str], reference: str) -> pd.DataFrame:
    """Per (step, example) and mode: loss_mean(mode) - loss_mean(reference), averaged over the
    groups (seeds). One example's differences in all seeds travel together as one block."""
    wide = evals.pivot_table(index=["step", "group", "example_id"], columns="reduce_loss",
                             values="loss_mean", aggfunc="first", observed=True)
    diffs = wide[modes].sub(wide[reference], axis=0)
    per_example = diffs.groupby(level=["step", "example_id"], observed=True)
    return per_example.mean().join(per_example.size().rename("seeds"))


def analyse(data: RunData, opts: Options) -> Results:
    runs, paired = check_pairs(data, opts.allow_unpaired)
    if opts.reference not in set(runs.reduce_loss):
        raise AnalysisError(f"reference mode {opts.reference!r} is not among the runs ({', '.join(sorted(set(runs.reduce_loss)))})")
    if opts.bucket_by not in ("seq_len", "target_tokens"):
        raise AnalysisError(f"--bucket-by {opts.bucket_by!r}: choose seq_len or target_tokens")
    info = runs.set_index("run_id")[["reduce_loss", "seed", "group"]]
    evals = data.evals.join(info, on="run_id")
    final_step = int(evals.step.max())

    examples = evals.drop_duplicates("example_id")[["example_id", opts.bucket_by]]
    edges = bucket_edges(examples[opts.bucket_by].to_numpy(dtype=float), opts)
    bucket_of = pd.Series(assign(examples[opts.bucket_by].to_numpy(dtype=float), edges), index=examples.example_id)
    evals["bucket"] = bucket_of.reindex(evals.example_id).to_numpy()

    grouped = evals.groupby(["step", "reduce_loss", "bucket"], observed=True)
    n_seeds = evals.groupby("reduce_loss").group.nunique()
    bucket_losses = grouped.agg(loss_sum=("loss_sum", "sum"), target_tokens=("target_tokens", "sum"),
                                example_loss=("loss_mean", "mean"), rows=("loss_mean", "size")).reset_index()
    bucket_losses["token_loss"] = bucket_losses.loss_sum / bucket_losses.target_tokens
    bucket_losses["examples"] = bucket_losses.rows // bucket_losses.reduce_loss.map(n_seeds)
    bucket_losses = bucket_losses[["step", "reduce_loss", "bucket", "token_loss", "example_loss", "examples"]]

    others = [m for m in sorted(set(runs.reduce_loss)) if m != opts.reference]
    diffs = _paired_differences(evals, others, opts.reference).reset_index()
    diffs["bucket"] = bucket_of.reindex(diffs.example_id).to_numpy()
    rng = np.random.default_rng(opts.rng_seed)
    rows = []
    for (step, bucket), part in diffs.groupby(["step", "bucket"], sort=True):
        for mode in others:
            values = part[mode].dropna().to_numpy()
            low, high = bootstrap_mean_ci(values, opts.n_boot, opts.confidence, rng)
            rows.append((step, mode, bucket, float(values.mean()), low, high, len(values),
                         int(part.seeds.max()), bool(low > 0 or high < 0)))
    paired_diff = pd.DataFrame(rows, columns=["step", "reduce_loss", "bucket", "diff", "ci_low", "ci_high",
                                              "examples", "seeds", "distinguishable"])

    curves = data.curves.join(info, on="run_id")
    return Results(opts, runs, paired, edges, bucket_labels(edges), bucket_losses, paired_diff,
                   grad_share(data.grad_weights, info, edges, opts.bucket_by), curves, final_step, data.superseded)


def grad_share(grad_weights: pd.DataFrame, info: pd.DataFrame, edges: np.ndarray, bucket_by: str) -> pd.DataFrame:
    """Share of each run's total gradient weight that each length bucket of training examples
    received, averaged over seeds."""
    if grad_weights.empty:
        return pd.DataFrame(columns=["reduce_loss", "bucket", "share", "train_examples"])
    g = grad_weights.join(info, on="run_id")
    g["bucket"] = assign(g[bucket_by].to_numpy(dtype=float), edges)
    per_run = g.groupby(["run_id", "reduce_loss", "bucket"], observed=True).agg(
        weight=("grad_weight", "sum"), train_examples=("example_id", "size")).reset_index()
    per_run["share"] = per_run.weight / per_run.groupby("run_id").weight.transform("sum")
    return per_run.groupby(["reduce_loss", "bucket"]).agg(
        share=("share", "mean"), train_examples=("train_examples", "first")).reset_index()
