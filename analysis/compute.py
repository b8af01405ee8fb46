"""Pairing check, length buckets, per-bucket losses, paired intervals over seeds and examples,
clipping, gradient shares.

Everything here works on pandas frames and returns frames; nothing plots or writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from analysis.load import AnalysisError, RunData, param_columns, require_two_modes
from harness import artifacts

log = logging.getLogger(__name__)


REFERENCES = ("mean", "token_mean", "sum", "seq_mean")  # the default reference, in order of preference


@dataclass
class Options:
    bucket_by: str = artifacts.BUCKET_BY  # seq_len | target_tokens
    buckets: int = artifacts.BUCKETS  # equal-count quantile buckets of the validation set ...
    edges: list[float] | None = None  # ... unless fixed inner edges are given
    reference: str | None = None  # None: the first of REFERENCES among the runs
    allow_unpaired: bool = False
    include_flagged: bool = False  # analyse flagged runs, leave out those that did not finish
    confidence: float = 0.95


@dataclass
class Results:
    options: Options
    runs: pd.DataFrame  # with `group`: runs compared with each other share it
    paired: bool
    edges: np.ndarray
    labels: list[str]
    bucket_losses: pd.DataFrame  # step, reduce_loss, bucket, token_loss, example_loss, examples
    paired_diff: pd.DataFrame  # step, reduce_loss, bucket, diff, ci_low, ci_high, se, df, examples, seeds, distinguishable
    grad_share: pd.DataFrame  # reduce_loss, bucket, share, train_examples, token_share (of training target tokens)
    curves: pd.DataFrame  # run_id, reduce_loss, seed, step, value
    final_step: int
    superseded: list[str] = field(default_factory=list)  # earlier runs of repeated jobs, left out
    left_out: list[str] = field(default_factory=list)  # runs that did not finish (--include-flagged)
    clipping: pd.DataFrame = field(default_factory=pd.DataFrame)  # per mode (`clipping`); empty if not logged
    marks: list[str] = field(default_factory=list)  # further caveats every output carries (analysis/tuning.py)
    split: str = "validation"  # the examples compared: validation, or the test split (analysis/tuning.py)

    @property
    def flagged(self) -> pd.DataFrame:
        """Flagged runs among those compared (only with --include-flagged)."""
        flag = self.runs.get(artifacts.TAG_FLAG, pd.Series(None, index=self.runs.index))
        return self.runs[flag.fillna("") != ""]

    @property
    def caveats(self) -> list[str]:
        """What every output is marked with: UNPAIRED, FLAGGED RUNS."""
        flagged = len(self.flagged) > 0 or len(self.left_out) > 0
        return (["UNPAIRED"] if not self.paired else []) + (["FLAGGED RUNS"] if flagged else []) + self.marks


def varied_keys(runs: pd.DataFrame, named: list[str] = ()) -> list[str]:
    """The config keys, besides reduce_loss and seed, whose value differs between runs of one
    reduction: runs that differ in one are not seeds of one comparison. `named` (the sweep's
    swept_keys) come first, in their order; a key not among the runs' params is not a key here."""
    params = [c for c in param_columns(runs) if c not in (artifacts.TAG_MODE, artifacts.TAG_SEED)]
    varied = [c for c in params if (runs.groupby(artifacts.TAG_MODE)[c].nunique(dropna=False) > 1).any()]
    return [k for k in named if k in varied] + [k for k in varied if k not in named]


def check_pairs(data: RunData, allow_unpaired: bool) -> tuple[pd.DataFrame, bool]:
    """Runs with a `group` column; refuse comparisons that are not paired."""
    runs = data.runs.copy()
    require_two_modes(runs.reduce_loss)
    varied = varied_keys(runs)
    if varied:  # never pooled as if they were seeds, paired or not
        values = "; ".join(f"{k}: {', '.join(sorted(runs[k].astype(str).unique()))}" for k in varied)
        raise AnalysisError(f"the runs of one reduction differ in {', '.join(varied)} ({values}), so they are not "
                            "seeds of one comparison; compare them per value (python -m analysis does) or tune "
                            f"(--tune {varied[0]})")
    modes = sorted(runs.reduce_loss.unique())
    final = data.evals[data.evals.step == data.evals.groupby("run_id").step.transform("max")]
    # each run's set of validation examples, as an order-free fingerprint (hashes summed, and counted)
    hashed = final.assign(h=pd.util.hash_pandas_object(final.example_id, index=False).to_numpy())
    example_sets = hashed.groupby("run_id").h.agg(lambda h: (int(h.sum()), len(h)))
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
    """Bucket edges [lo, e1, ..., hi] computed once from the validation examples
    (harness/artifacts.py: the runs' per-bucket metrics use the same function)."""
    if opts.edges:
        asked = np.unique(np.asarray(opts.edges, dtype=float))
        outside = asked[(asked <= values.min()) | (asked > values.max())]
        if len(outside):
            log.warning("--edges %s outside the validation %s range %g-%g left out",
                        ",".join(f"{e:g}" for e in outside), opts.bucket_by, values.min(), values.max())
    try:
        return artifacts.bucket_edges(values, opts.buckets, opts.edges)
    except artifacts.BucketError as e:
        raise AnalysisError(f"bucketing {opts.bucket_by} with {e} leaves empty buckets; ask for fewer buckets or other --edges") from None


assign = artifacts.assign_buckets
bucket_labels = artifacts.bucket_labels


def seed_example_interval(mean, seeds, examples, ss_seed, ss_example, ss_residual, confidence: float):
    """Confidence interval of a grand mean over a seeds x examples table of paired differences,
    with seeds and examples both random (a crossed two-way random-effects model):

        d[s, i] = mu + u[s] + v[i] + e[s, i],   u ~ (0, su2), v ~ (0, sv2), e ~ (0, se2)

    u is the seed's training noise (shared by all its examples), v an example's own part of the
    difference (shared by all seeds), e the rest. The grand mean's variance is
    su2/S + sv2/n + se2/(S n) = (MS_seed + MS_example - MS_residual) / (S n) in ANOVA mean
    squares. The example term MS_example - MS_residual is dropped when negative (it has many
    degrees of freedom); the seed term never is, since with a few seeds a small MS_seed is weak
    evidence of no seed variance. Student's t with Satterthwaite's degrees of freedom (at least
    S - 1, about S - 1 when seeds dominate). docs/analysis.md has the coverage this gives and why it is not
    a bootstrap. With one seed there is no between-seed variance to estimate: the interval is
    within-seed only (the examples' spread).

    Arguments are arrays, one entry per interval; returns (low, high, standard error, degrees
    of freedom). An interval that rests on one seed and one example is nan."""
    mean, S, n = (np.asarray(x, dtype=float) for x in (mean, seeds, examples))
    ss_seed, ss_example, ss_residual = (np.asarray(x, dtype=float) for x in (ss_seed, ss_example, ss_residual))
    with np.errstate(divide="ignore", invalid="ignore"):
        df_s, df_e, df_r = S - 1, n - 1, (S - 1) * (n - 1)
        ms_s, ms_e, ms_r = ss_seed / df_s, ss_example / df_e, np.maximum(ss_residual, 0) / df_r
        example_term = ms_e > ms_r
        crossed = ms_s + np.where(example_term, ms_e - ms_r, 0)  # = S n var(grand mean)
        crossed_df = crossed ** 2 / (ms_s ** 2 / df_s + np.where(example_term, ms_e ** 2 / df_e + ms_r ** 2 / df_r, 0))
        # Satterthwaite falls below every mean square's own df when a small MS_seed meets the
        # difference of two large, nearly equal ones; no estimate here is less reliable than those.
        crossed_df = np.maximum(crossed_df, np.minimum(df_s, df_e))
        one_seed = S == 1  # within-seed only: the examples' spread
        one_example = (n == 1) & (S > 1)  # the seeds' spread
        var = np.select([one_seed, one_example], [ms_e / n, ms_s / S], crossed / (S * n))
        df = np.select([one_seed, one_example], [df_e, df_s], crossed_df)
        se = np.sqrt(var)
        t_quantile = student_t.ppf((1 + confidence) / 2, np.where(var > 0, df, 1))
        half = np.where(var > 0, t_quantile * se, np.where(var == 0, 0.0, np.nan))
    return mean - half, mean + half, se, df


def _paired_differences(evals: pd.DataFrame, modes: list[str], reference: str) -> pd.DataFrame:
    """One row per (step, group, example, mode): loss_mean(mode) - loss_mean(reference).

    Examples that a (step, mode) lacks in some of its groups (possible only for unpaired runs)
    are left out, so each (step, mode) is a complete groups x examples table."""
    wide = evals.pivot_table(index=["step", "group", "example_id"], columns="reduce_loss",
                             values="loss_mean", aggfunc="first", observed=True)
    diffs = wide[modes].sub(wide[reference], axis=0)
    long = diffs.melt(ignore_index=False, var_name="reduce_loss", value_name="diff").dropna().reset_index()
    groups = long.groupby(["step", "reduce_loss"]).group.transform("nunique")
    seen_in = long.groupby(["step", "reduce_loss", "example_id"]).group.transform("size")
    return long[seen_in == groups]


def interval_table(diffs: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Per (step, mode, bucket): the mean paired difference and its interval over seeds and
    examples (`seed_example_interval`), from sums of squares computed group-wise."""
    keys = ["step", "reduce_loss", "bucket"]
    d = diffs[keys + ["group", "example_id", "diff"]]
    cells = d.groupby(keys).agg(diff=("diff", "mean"), seeds=("group", "nunique"), examples=("example_id", "nunique"))
    dev = d.assign(dev=d["diff"] - d.groupby(keys)["diff"].transform("mean"))
    ss_total = dev.assign(sq=dev.dev ** 2).groupby(keys).sq.sum()
    seed_means = dev.groupby(keys + ["group"]).dev.mean()
    example_means = dev.groupby(keys + ["example_id"]).dev.mean()
    ss_seed = (seed_means ** 2).groupby(level=keys).sum() * cells.examples
    ss_example = (example_means ** 2).groupby(level=keys).sum() * cells.seeds
    low, high, se, df = seed_example_interval(cells["diff"], cells.seeds, cells.examples, ss_seed, ss_example,
                                              ss_total - ss_seed - ss_example, confidence)
    out = cells.assign(ci_low=low, ci_high=high, se=se, df=df).reset_index()
    out["distinguishable"] = (out.ci_low > 0) | (out.ci_high < 0)
    return out[["step", "reduce_loss", "bucket", "diff", "ci_low", "ci_high", "se", "df", "examples", "seeds",
                "distinguishable"]]


def analyse(data: RunData, opts: Options) -> Results:
    runs, paired = check_pairs(data, opts.allow_unpaired)
    if opts.reference is None:
        present = set(runs.reduce_loss)
        opts = replace(opts, reference=next((m for m in REFERENCES if m in present), sorted(present)[0]))
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
    diffs = _paired_differences(evals, others, opts.reference)
    diffs["bucket"] = bucket_of.reindex(diffs.example_id).to_numpy()
    paired_diff = interval_table(diffs, opts.confidence)

    curves = data.curves.join(info, on="run_id")
    return Results(opts, runs, paired, edges, bucket_labels(edges), bucket_losses, paired_diff,
                   grad_share(data.grad_weights, info, edges, opts.bucket_by), curves, final_step, data.superseded,
                   clipping=clipping(runs))


MOSTLY = 0.5  # a mode whose runs were clipped on more than this share of steps is "mostly clipped"


def clipping(runs: pd.DataFrame) -> pd.DataFrame:
    """Per mode, over its runs that logged it: the share of steps whose gradient was clipped
    (mean, min, max over runs), the median pre-clip gradient norm (median of the runs'
    medians), the clipping threshold, and whether the mode was mostly clipped."""
    columns = ["reduce_loss", "runs", "clipped_fraction", "clipped_min", "clipped_max", "grad_norm_median",
               "max_grad_norm", "mostly_clipped"]
    if "clipped_fraction" not in runs or runs.clipped_fraction.isna().all():
        return pd.DataFrame(columns=columns)
    logged = runs.dropna(subset=["clipped_fraction"]).assign(
        max_grad_norm=runs.get("trainer.max_grad_norm", pd.Series("?", index=runs.index)).fillna("?"))
    out = logged.groupby("reduce_loss").agg(
        runs=("run_id", "size"), clipped_fraction=("clipped_fraction", "mean"), clipped_min=("clipped_fraction", "min"),
        clipped_max=("clipped_fraction", "max"), grad_norm_median=("grad_norm_median", "median"),
        max_grad_norm=("max_grad_norm", lambda v: ", ".join(sorted(set(map(str, v)))))).reset_index()
    out["mostly_clipped"] = out.clipped_fraction > MOSTLY
    return out[columns]


def grad_share(grad_weights: pd.DataFrame, info: pd.DataFrame, edges: np.ndarray, bucket_by: str) -> pd.DataFrame:
    """Share of each run's total gradient weight that each length bucket of training examples
    received, averaged over seeds."""
    if grad_weights.empty:
        return pd.DataFrame(columns=["reduce_loss", "bucket", "share", "train_examples", "token_share"])
    g = grad_weights.join(info, on="run_id")
    g["bucket"] = assign(g[bucket_by].to_numpy(dtype=float), edges)
    per_run = g.groupby(["run_id", "reduce_loss", "bucket"], observed=True).agg(
        weight=("grad_weight", "sum"), train_examples=("example_id", "size"), tokens=("target_tokens", "sum")).reset_index()
    per_run["share"] = per_run.weight / per_run.groupby("run_id").weight.transform("sum")
    per_run["token_share"] = per_run.tokens / per_run.groupby("run_id").tokens.transform("sum")
    return per_run.groupby(["reduce_loss", "bucket"]).agg(
        share=("share", "mean"), train_examples=("train_examples", "first"),
        token_share=("token_share", "first")).reset_index()
