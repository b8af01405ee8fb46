"""Sweeps that vary more than the reduction and the seed: never pooled as if they were seeds.

Runs that differ in a config key (the learning rate, the batch size, ...) are compared per value
of it (`per_value`), or, with a key to tune (`--tune`, by default `trainer.lr` when the sweep
varies it), each reduction at its own best value (`tuned`): chosen on the validation split by
the mean final validation loss over seeds, reported on the test split, paired by seed with the
reference reduction at its own best value. Runs of schema 1 have no test split; there the
comparison is reported on the validation split it was selected on, and says so everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from analysis import plots, report
from analysis.compute import Options, Results, analyse, assign, bucket_edges, bucket_labels, varied_keys
from analysis.load import AnalysisError, RunData
from harness import artifacts

log = logging.getLogger(__name__)

DEFAULT_TUNED = "trainer.lr"
SAME_SPLIT = "SELECTED AND REPORTED ON THE SAME SPLIT"
SELECT_BY = {"token": "token-weighted (each token weighs the same)",
             "example": "example-weighted (each example's mean loss weighs the same)"}


@dataclass
class Tuned:
    """Each reduction at the value of `key` with the lowest mean final validation loss."""
    key: str
    select_by: str  # token | example
    per_run: pd.DataFrame  # reduce_loss, value, seed, run_id, val_loss: the final validation loss of every run
    grid: pd.DataFrame  # reduce_loss, value, mean, sd, seeds: over seeds
    chosen: dict[str, float]  # reduce_loss -> its chosen value
    edge: list[str]  # the reduction whose choice is at the edge of the grid: one warning each
    left_out: pd.DataFrame  # reduce_loss, left_out_seed, chosen: the choice without each seed
    by_bucket: pd.DataFrame  # reduce_loss, value, bucket, mean, sd: token-weighted validation loss per length bucket
    bucket_labels: list[str]  # of the validation buckets of `by_bucket`
    test: Results  # the paired comparison at the chosen values, on the test split (or validation: same_split)
    same_split: bool  # runs without a test split: selected and reported on validation

    @property
    def values(self) -> list[float]:
        return sorted(self.grid.value.unique())

    def stable(self, mode: str) -> bool:
        part = self.left_out[self.left_out.reduce_loss == mode]
        return bool((part.chosen == self.chosen[mode]).all())


@dataclass
class Sweep:
    """What the analysis of a sweep with varied keys gives: the modes per value, or tuned."""
    keys: list[str]  # the varied keys besides reduce_loss and seed
    options: Options
    note: str  # the one line that says how the runs are compared
    per_value: list[tuple[dict[str, str], Results]] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)  # values whose runs hold fewer than two modes
    tuned: Tuned | None = None

    @property
    def caveats(self) -> list[str]:
        if self.tuned is not None:
            return self.tuned.test.caveats
        return sorted({c for _, res in self.per_value for c in res.caveats})

    def summary_lines(self, difference_table) -> list[str]:
        """What the sweep prints at its end (harness/runs/summary.py gives its `difference_table`)."""
        return summary_lines(self, difference_table)

    def description_sections(self) -> list:
        """The parent run's description (analysis/mlflow_view.py): how the runs are compared, then
        the tuned choice and the comparison at the chosen values, or each value's comparison."""
        from analysis.mlflow_view import Section, sweep_sections
        if self.tuned is not None:
            t = self.tuned
            split = "validation split" if t.same_split else "test split"
            return [Section(f"Each reduction at its own {t.key}", "\n\n".join(tuned_sentences(self)),
                            grid_table(t))] + \
                [replace(s, heading=f"{s.heading} ({split}, each mode at its chosen {t.key})")
                 for s in sweep_sections(t.test)]
        out = [Section("How the runs are compared", self.note)]
        for values, res in self.per_value:
            label = ", ".join(f"{k}={v}" for k, v in values.items())
            out += [replace(s, heading=f"{label}: {s.heading}") for s in sweep_sections(res)[:1]]
        return out

    def description_plot(self) -> str | None:
        """The plot the description shows, among the analysis folder's images."""
        if self.tuned is not None:
            return "tuned_paired_difference.png"
        return f"paired_difference_{_slug(self.per_value[0][0])}.png" if self.per_value else None


def analyse_sweep(data: RunData, opts: Options, *, tune: str | None = None, select_by: str = "token",
                  swept: list[str] = ()) -> Sweep | None:
    """None when the runs vary nothing besides reduce_loss and seed (analysis/compute.py then
    compares them as one); else the comparison per value of the varied keys, or the tuned one."""
    keys = varied_keys(data.runs, list(swept))
    if tune is not None and tune not in keys:
        raise AnalysisError(f"--tune {tune}: the runs do not vary it "
                            f"({'they vary ' + ', '.join(keys) if keys else 'they vary nothing besides reduce_loss and seed'})")
    if select_by not in SELECT_BY:
        raise AnalysisError(f"--select-by {select_by!r}: choose {' or '.join(SELECT_BY)}")
    if not keys:
        return None
    if tune is None and DEFAULT_TUNED in keys:
        tune = DEFAULT_TUNED
    if tune is None:
        return _per_value(data, opts, keys)
    others = [k for k in keys if k != tune]
    if others:
        raise AnalysisError(f"--tune {tune}: the runs also vary {', '.join(others)}; tune one key at a time "
                            "(select the runs of one value of the others, e.g. one sweep each)")
    tuned = tuned_comparison(data, opts, tune, select_by)
    split = "the validation split (these runs have no test split)" if tuned.same_split else "the test split"
    note = (f"The runs vary {tune}: each reduction is compared at its own best {tune} (lowest mean final "
            f"{SELECT_BY[select_by].split(' (')[0]} validation loss over seeds), on {split}; the runs of other "
            f"values are never pooled as if they were seeds.")
    return Sweep([tune], opts, note, tuned=tuned)


def _subset(data: RunData, run_ids) -> RunData:
    keep = set(run_ids)

    def part(df):
        return df[df.run_id.isin(keep)].reset_index(drop=True) if not df.empty else df
    return RunData(part(data.runs), part(data.evals), part(data.grad_weights), part(data.curves),
                   data.superseded, part(data.tests))


def _per_value(data: RunData, opts: Options, keys: list[str]) -> Sweep:
    runs = data.runs.assign(**{k: data.runs[k].astype(str) for k in keys})
    out, skipped = [], []
    for values, group in runs.groupby(keys, sort=True):
        values = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
        label = ", ".join(f"{k}={v}" for k, v in values.items())
        modes = set(group.reduce_loss)
        if len(modes) < 2 or (opts.reference and opts.reference not in modes):
            skipped.append(f"{label} (runs of {', '.join(sorted(modes))} only)")
            continue
        out.append((values, analyse(_subset(data, group.run_id), opts)))
    if not out:
        raise AnalysisError(f"the runs vary {', '.join(keys)}, and no value of it holds two reductions to compare: "
                            + "; ".join(skipped))
    note = (f"The runs vary {', '.join(keys)}: the reductions are compared separately for each value "
            f"({len(out)} comparisons), never pooled as if the values were seeds"
            + (f"; --tune {keys[0]} compares each reduction at its own best value" if len(keys) == 1 else "") + ".")
    return Sweep(keys, opts, note, per_value=out, not_compared=skipped)


def _numeric(runs: pd.DataFrame, key: str) -> pd.Series:
    try:
        return runs[key].astype(float)
    except (TypeError, ValueError):
        found = ", ".join(sorted(runs[key].astype(str).unique())[:6])
        raise AnalysisError(f"--tune {key}: its values are not all numbers ({found})") from None


def final_losses(evals: pd.DataFrame) -> pd.DataFrame:
    """Per run at its last evaluation: the token-weighted and example-weighted loss."""
    last = evals[evals.step == evals.groupby("run_id").step.transform("max")]
    g = last.groupby("run_id")
    return pd.DataFrame({"token": g.loss_sum.sum() / g.target_tokens.sum(), "example": g.loss_mean.mean()})


def _check_grid(runs: pd.DataFrame, key: str) -> None:
    """Every reduction has a run for every value and every seed, exactly one."""
    modes, values, seeds = sorted(runs.reduce_loss.unique()), sorted(runs.value.unique()), sorted(runs.seed.unique())
    count = runs.groupby(["reduce_loss", "value", "seed"]).size()
    full = pd.MultiIndex.from_product([modes, values, seeds], names=count.index.names)
    missing = [f"{m} {key}={v:g} seed {s}" for m, v, s in full.difference(count.index)]
    if missing:
        raise AnalysisError(f"--tune {key}: the grid is not complete, it has no run for {'; '.join(missing[:6])}"
                            f"{'; ...' if len(missing) > 6 else ''} (every reduction needs every value and seed)")


def _check_fingerprints(runs: pd.DataFrame, key: str, allow_unpaired: bool) -> bool:
    """Runs of one seed start from the same weights and see the same data at every value and in
    every mode; False (the comparison is UNPAIRED) only with allow_unpaired."""
    problems = []
    for seed, group in runs.groupby("seed"):
        for column in artifacts.FINGERPRINT_TAGS:
            if group[column].nunique(dropna=False) > 1:
                by_value = group.groupby("value")[column].agg(lambda v: ",".join(sorted(set(map(str, v)))))
                problems.append(f"seed {seed} differs in {column} across {key} "
                                f"({'; '.join(f'{v:g}: {f}' for v, f in by_value.items())})")
    if problems and not allow_unpaired:
        raise AnalysisError(f"--tune {key}: runs are not paired across values: {'; '.join(problems)} "
                            "(--allow-unpaired compares them anyway, marked UNPAIRED)")
    return not problems


def _test_split(data: RunData, runs: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """The per-example losses the comparison is reported on, and whether they are the validation
    split itself (runs without a test split). Refuses a test split that differs between runs,
    is empty, or shares an example with training."""
    has_test = set(data.tests.run_id) if not data.tests.empty else set()
    if not has_test:
        last = data.evals[data.evals.step == data.evals.groupby("run_id").step.transform("max")]
        return last, True
    lacking = runs[~runs.run_id.isin(has_test)]
    if not lacking.empty:
        raise AnalysisError(f"{len(lacking)} run(s) have no test split ({', '.join(lacking.run_name.astype(str)[:4])}) "
                            f"while others do; analyse runs of one artifact schema")
    tests = data.tests
    sizes = tests.groupby("run_id").size()
    if (sizes == 0).any():
        raise AnalysisError("the test split is empty")
    if not data.grad_weights.empty:
        shared = sorted(set(tests.example_id) & set(data.grad_weights.example_id))
        if shared:
            raise AnalysisError(f"the test split overlaps training: {len(shared)} example id(s) are on both sides "
                                f"(e.g. {shared[0]})")
    shared = sorted(set(tests.example_id) & set(data.evals.example_id))
    if shared:
        raise AnalysisError(f"the test split overlaps validation: {len(shared)} example id(s) are on both sides "
                            f"(e.g. {shared[0]})")
    step = int(data.evals.step.max())
    return tests.assign(step=step), False


def tuned_comparison(data: RunData, opts: Options, key: str, select_by: str = "token") -> Tuned:
    runs = data.runs.assign(value=_numeric(data.runs, key), seed=data.runs.seed.astype(str))
    _check_grid(runs, key)
    paired = _check_fingerprints(runs, key, opts.allow_unpaired)
    report_on, same_split = _test_split(data, runs)

    per_run = runs[["run_id", "run_name", "reduce_loss", "value", "seed"]].join(
        final_losses(data.evals)[select_by].rename("val_loss"), on="run_id")
    grid = per_run.groupby(["reduce_loss", "value"]).val_loss.agg(mean="mean", sd="std", seeds="size").reset_index()
    chosen = choose(per_run)
    values = sorted(grid.value.unique())
    edge = [m for m, v in chosen.items() if v in (values[0], values[-1])]
    seeds = sorted(per_run.seed.unique())
    left_out = pd.DataFrame([dict(reduce_loss=m, left_out_seed=s, chosen=v)
                             for s in (seeds if len(seeds) > 1 else [])
                             for m, v in choose(per_run[per_run.seed != s]).items()],
                            columns=["reduce_loss", "left_out_seed", "chosen"])
    by_bucket, labels = _by_bucket(data, runs, opts)

    # The comparison: each mode at its chosen value, paired by seed with the reference at its own.
    picked = runs[runs.value == runs.reduce_loss.map(chosen)]
    sub = _subset(data, picked.run_id)
    sub.runs = sub.runs.assign(pair_id="tuned-seed-" + sub.runs.seed.astype(str))
    sub.evals = report_on[report_on.run_id.isin(picked.run_id)].reset_index(drop=True)
    marks = [SAME_SPLIT] if same_split else []
    test_opts = replace(opts, allow_unpaired=opts.allow_unpaired or not paired)
    # the key differs between the modes by design (each at its own value); within a mode it does not
    sub.runs = sub.runs.drop(columns=[key])
    test = analyse(sub, test_opts)
    test.marks = marks
    test.split = "validation" if same_split else "test"
    test.runs = test.runs.assign(**{key: test.runs.reduce_loss.map(chosen)})
    if not paired:
        test.paired = False
    return Tuned(key, select_by, per_run, grid, chosen, edge, left_out, by_bucket, labels, test, same_split)


def choose(per_run: pd.DataFrame) -> dict[str, float]:
    """Per mode, the value with the lowest mean loss over seeds (the smaller value on a tie)."""
    means = per_run.groupby(["reduce_loss", "value"]).val_loss.mean().reset_index()
    best = means.sort_values(["reduce_loss", "val_loss", "value"], kind="stable").drop_duplicates("reduce_loss")
    return dict(zip(best.reduce_loss, best.value.astype(float)))


def _by_bucket(data: RunData, runs: pd.DataFrame, opts: Options) -> tuple[pd.DataFrame, list[str]]:
    """Token-weighted final validation loss per length bucket, per mode and value (over seeds)."""
    last = data.evals[data.evals.step == data.evals.groupby("run_id").step.transform("max")]
    examples = last.drop_duplicates("example_id")
    edges = bucket_edges(examples[opts.bucket_by].to_numpy(dtype=float), opts)
    bucket = pd.Series(assign(examples[opts.bucket_by].to_numpy(dtype=float), edges), index=examples.example_id)
    last = last.assign(bucket=bucket.reindex(last.example_id).to_numpy()).join(
        runs.set_index("run_id")[["reduce_loss", "value"]], on="run_id")
    g = last.groupby(["run_id", "reduce_loss", "value", "bucket"])
    per_run = (g.loss_sum.sum() / g.target_tokens.sum()).rename("loss").reset_index()
    out = per_run.groupby(["reduce_loss", "value", "bucket"]).loss.agg(mean="mean", sd="std").reset_index()
    return out, bucket_labels(edges)


# ---- what the tuned comparison shows: tables, sentences, plots, the report, MLflow, the summary


def fmt(value: float) -> str:
    return f"{value:g}"


def grid_table(tuned: Tuned) -> pd.DataFrame:
    """Mode x value: mean final validation loss over seeds, its spread (sd), the chosen value starred."""
    cells = tuned.grid.assign(cell=[f"{m:.4f} ± {s:.4f}{' *' if tuned.chosen[r] == v else ''}" if s == s else
                                    f"{m:.4f}{' *' if tuned.chosen[r] == v else ''}"
                                    for r, v, m, s in zip(tuned.grid.reduce_loss, tuned.grid.value, tuned.grid["mean"],
                                                          tuned.grid.sd)])
    table = cells.pivot(index="reduce_loss", columns="value", values="cell")
    table.columns = [f"{tuned.key}={fmt(v)}" for v in table.columns]
    table.index.name = "reduce_loss"
    return table


def tuned_sentences(sweep: Sweep) -> list[str]:
    t = sweep.tuned
    seeds = sorted(t.per_run.seed.unique())
    out = [sweep.note]
    if t.same_split:
        out.append(f"{SAME_SPLIT}: these runs (artifact schema 1) have no test split, so the comparison below is "
                   "reported on the validation split the values were chosen on; it favours every mode's own choice.")
    for mode, value in t.chosen.items():
        row = t.grid[(t.grid.reduce_loss == mode) & (t.grid.value == value)].iloc[0]
        stable = ("stable: the same value is chosen with any one seed left out" if t.stable(mode) else
                  "NOT stable: with one seed left out the choice is " + ", ".join(
                      f"{fmt(r.chosen)} (without seed {r.left_out_seed})"
                      for r in t.left_out[t.left_out.reduce_loss == mode].itertuples()))
        out.append(f"{mode}: {t.key}={fmt(value)} chosen (mean final validation loss {row['mean']:.4f} over "
                   f"{int(row.seeds)} seed(s)); " + (stable if len(seeds) > 1 else "one seed: its stability cannot "
                                                     "be checked"))
    for mode in t.edge:
        side = "smallest" if t.chosen[mode] == t.values[0] else "largest"
        out.append(f"WARNING: {mode}'s best {t.key} ({fmt(t.chosen[mode])}) is the {side} value of the grid; its "
                   f"optimum may lie beyond it: widen the grid.")
    return out


def _tuned_tables(t: Tuned) -> dict[str, pd.DataFrame]:
    split = "validation" if t.same_split else "test"
    tables = report.tables(t.test)
    shown = {f"Final validation loss, {SELECT_BY[t.select_by].replace(' (', ': ').rstrip(')')}, per {t.key}: "
             "mean ± sd over seeds; * = chosen":
             grid_table(t)}
    stability = t.left_out.pivot(index="reduce_loss", columns="left_out_seed", values="chosen")
    if not stability.empty:
        stability.columns = [f"without seed {c}" for c in stability.columns]
        shown[f"Chosen {t.key} with each seed left out"] = stability.map(fmt)
    for caption, df in report._final_tables(t.test, tables).items():
        caption = caption.replace("validation loss", f"{split} loss")
        shown[f"At the chosen values, {split} split: {caption}"] = df
    return shown


def _value_axis(ax, t: Tuned) -> None:
    """A log axis (for positive values) ticked at the grid's values only."""
    if min(t.values) > 0:
        ax.set_xscale("log")
    ax.set_xticks(t.values, [fmt(v) for v in t.values])
    ax.minorticks_off()


def sensitivity_plot(t: Tuned, path: Path, suffix: str) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for mode, part in t.per_run.groupby("reduce_loss"):
        means = part.groupby("value").val_loss.agg(["mean", "min", "max"])
        color = plots._color(mode)
        ax.plot(means.index, means["mean"], "o-", color=color, label=f"{mode} (mean over seeds)")
        ax.fill_between(means.index, means["min"], means["max"], color=color, alpha=0.15)
        ax.scatter(part.value, part.val_loss, color=color, s=12, alpha=0.6)
        ax.axvline(t.chosen[mode], color=color, ls=":", lw=1)
    _value_axis(ax, t)
    ax.set_xlabel(t.key)
    ax.set_ylabel(f"final validation loss, {t.select_by}-weighted (nats / token)")
    ax.set_title(f"Sensitivity to {t.key}: seeds as points, their range as a band, chosen value dotted{suffix}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sensitivity_by_bucket_plot(t: Tuned, path: Path, bucket_by: str, suffix: str) -> None:
    import matplotlib.pyplot as plt
    fig, axes, panels = plots.bucket_panels(len(t.bucket_labels))
    for b, ax in panels:
        part = t.by_bucket[t.by_bucket.bucket == b]
        for mode, p in part.groupby("reduce_loss"):
            ax.errorbar(p.value, p["mean"], yerr=p.sd.fillna(0), fmt="o-", ms=3, capsize=2,
                        color=plots._color(mode), label=mode)
            best = p.loc[p["mean"].idxmin()]
            ax.plot([best.value], [best["mean"]], "*", ms=11, color=plots._color(mode))
        _value_axis(ax, t)
        ax.set_title(f"{bucket_by} {t.bucket_labels[b]}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel(t.key)
    for ax in axes[:, 0]:
        ax.set_ylabel("val NLL (nats / token)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Final token-weighted validation loss per length bucket against {t.key} (mean ± sd over seeds; "
                 f"star: the bucket's best){suffix}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CAPTIONS = {
    "sensitivity.png": "Final validation loss against the tuned value, per reduction: each seed a point, their "
                       "range a band, the mean a line; the dotted line is the chosen value.",
    "sensitivity_by_bucket.png": "The same per validation length bucket: do long and short examples prefer "
                                 "different values?",
    "tuned_paired_difference.png": "Paired difference per length bucket of each reduction at its chosen value "
                                   "against the reference at its own, on the test split, with its interval over "
                                   "seeds and examples.",
    "gradient_weight_share.png": plots.CAPTIONS["gradient_weight_share.png"] + " At the chosen values.",
}


def _slug(values: dict[str, str]) -> str:
    return "_".join(f"{k}={v}" for k, v in values.items()).replace("/", "_")


def draw(sweep: Sweep, out: Path) -> list[str]:
    suffix = f" ({', '.join(sweep.caveats)})" if sweep.caveats else ""
    drawn = []
    if sweep.tuned is not None:
        t = sweep.tuned
        sensitivity_plot(t, out / "sensitivity.png", suffix)
        sensitivity_by_bucket_plot(t, out / "sensitivity_by_bucket.png", sweep.options.bucket_by, suffix)
        plots.paired_difference(t.test, out / "tuned_paired_difference.png")
        drawn += ["sensitivity.png", "sensitivity_by_bucket.png", "tuned_paired_difference.png"]
        if not t.test.grad_share.empty:
            plots.gradient_share(t.test, out / "gradient_weight_share.png")
            drawn.append("gradient_weight_share.png")
        return drawn
    for values, res in sweep.per_value:
        name = f"paired_difference_{_slug(values)}.png"
        plots.paired_difference(res, out / name)
        CAPTIONS[name] = f"{', '.join(f'{k}={v}' for k, v in values.items())}: " + plots.CAPTIONS["paired_difference.png"]
        drawn.append(name)
    return drawn


def _sections(sweep: Sweep) -> tuple[list[tuple[str, str]], list[str], dict[str, pd.DataFrame]]:
    """(setup lines, findings, tables) of the report."""
    if sweep.tuned is not None:
        t = sweep.tuned
        split = "validation" if t.same_split else "test"
        setup = []
        for k, v in report.setup_lines(t.test):
            if k == "paired" and t.test.paired:
                v = (f"yes (each seed's runs share init_fingerprint and data_fingerprint at every value of {t.key} "
                     f"and in every mode, and the same {split} examples)")
            elif k == "runs":
                v = f"{v} compared (each mode at its chosen value) of {len(t.per_run)} in the grid"
            elif k == "buckets":
                v = v.replace("by validation", f"by {split}")
            setup.append((k, v))
        setup.insert(3, (f"{t.key} grid", ", ".join(fmt(v) for v in t.values)))
        setup.insert(4, ("selected on", f"validation, {SELECT_BY[t.select_by]}"))
        setup.insert(5, ("reported on", "validation (no test split: " + SAME_SPLIT + ")" if t.same_split
                         else "the test split (examples neither trained on nor used to choose)"))
        said = tuned_sentences(sweep) + report.clipping_sentences(t.test) + report.sentences(t.test)
        return setup, said, _tuned_tables(t)
    setup = [("compared per value of", ", ".join(sweep.keys))]
    said, shown = [sweep.note] + [f"not compared: {s}" for s in sweep.not_compared], {}
    for values, res in sweep.per_value:
        label = ", ".join(f"{k}={v}" for k, v in values.items())
        setup.append((label, f"{len(res.runs)} runs; " + "; ".join(f"{k}: {v}" for k, v in report.setup_lines(res)
                                                                   if k in ("reductions", "seeds", "paired"))))
        said += [f"{label}: {s}" for s in report.sentences(res)]
        for caption, df in report._final_tables(res, report.tables(res)).items():
            shown[f"{label}: {caption}"] = df
    return setup, said, shown


def write(sweep: Sweep, out: Path, images: list[str]) -> None:
    """report.md, report.html and the tables as CSV, as analysis/report.py writes them."""
    csv = {}
    if sweep.tuned is not None:
        t = sweep.tuned
        csv["tuning_grid"] = t.grid.assign(chosen=t.grid.value == t.grid.reduce_loss.map(t.chosen))
        csv["tuning_runs"] = t.per_run
        csv["tuning_left_out_seed"] = t.left_out
        csv["tuning_by_bucket"] = t.by_bucket.assign(bucket_range=t.by_bucket.bucket.map(dict(enumerate(t.bucket_labels))))
        csv |= {f"tuned_{name}": df for name, df in report.tables(t.test).items()}
    else:
        for values, res in sweep.per_value:
            csv |= {f"{name}_{_slug(values)}": df for name, df in report.tables(res).items()}
    for name, df in csv.items():
        df.assign(caveats=", ".join(sweep.caveats)).to_csv(out / f"{name}.csv", index=False)
    kind = f"each at its own best {sweep.tuned.key}" if sweep.tuned else f"per value of {', '.join(sweep.keys)}"
    title = f"How each reduction treats long vs short examples, {kind}" + (
        f" ({', '.join(sweep.caveats)})" if sweep.caveats else "")
    setup, said, shown = _sections(sweep)
    report.write_documents(out, title, setup, said, shown, images, CAPTIONS | plots.CAPTIONS, list(csv))


def log_to_parent(client, parent: str, sweep: Sweep) -> None:
    """The chosen values and the tuned differences on the sweep's parent run (metrics, so that
    MLflow's run comparison shows them), or the per-value differences."""
    import time

    from mlflow.entities import Metric
    now, metrics, tags = int(time.time() * 1000), {}, {"comparison": sweep.note[:5000]}
    if sweep.caveats:
        tags["caveats"] = ", ".join(sweep.caveats)
    if sweep.tuned is not None:
        t = sweep.tuned
        res, prefix = t.test, f"tuned_diff_vs_{t.test.options.reference}"
        for mode, value in t.chosen.items():
            metrics[f"tuned/{mode}/{t.key}"] = value
            row = t.grid[(t.grid.reduce_loss == mode) & (t.grid.value == value)].iloc[0]
            metrics[f"tuned/{mode}/val_loss"] = row["mean"]
            tags[f"tuned_{mode}"] = f"{t.key}={fmt(value)}"
        tags["tuned_edge_warning"] = ", ".join(t.edge) or "none"
        results = [("", res)]
    else:
        results = [("_".join(f"{k}_{x}" for k, x in v.items()) + "/", res) for v, res in sweep.per_value]
        prefix = "diff_vs"
    for sub, res in results:
        final = res.paired_diff[res.paired_diff.step == res.final_step]
        for row in final.itertuples():
            name = f"{prefix}{'' if sweep.tuned else '_' + res.options.reference}/{sub}{row.reduce_loss}/{res.labels[int(row.bucket)]}"
            metrics |= {name: row.diff, f"{name}/ci_low": row.ci_low, f"{name}/ci_high": row.ci_high}
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v == v])
    for k, v in tags.items():
        client.set_tag(parent, k, v)


def summary_lines(sweep: Sweep, difference_table) -> list[str]:
    lines = ["", sweep.note]
    if sweep.caveats:
        lines.append(f"marked: {', '.join(sweep.caveats)}")
    if sweep.tuned is not None:
        t = sweep.tuned
        split = "validation (no test split)" if t.same_split else "test"
        lines += ["", f"final validation loss ({t.select_by}-weighted) per {t.key}, mean ± sd over seeds; * = chosen:",
                  grid_table(t).to_string()]
        lines += [s for s in tuned_sentences(sweep)[1:] if s.startswith("WARNING") or "NOT stable" in s]
        lines += ["", f"{split} split at the chosen values, paired difference vs {t.test.options.reference} "
                      "(example-weighted; * = interval excludes 0, not adjusted for multiple comparisons):",
                  difference_table(t.test).to_string(index=False)]
        return lines
    for values, res in sweep.per_value:
        lines += ["", f"{', '.join(f'{k}={v}' for k, v in values.items())}: paired difference vs "
                      f"{res.options.reference} at step {res.final_step} (example-weighted; * = interval excludes 0):",
                  difference_table(res).to_string(index=False)]
    return lines
