"""The answer where MLflow's UI shows it: the sweep's parent run's description.

MLflow renders a run's tag `mlflow.note.content` as Markdown at the top of the run's overview.
The description is built from sections (`Section`: a heading over Markdown text, a table, or
both), so that other parts of the analysis can add theirs: `description(sections)` makes the
Markdown of any list of sections, `sweep_sections(results, ...)` those of a sweep's analysis,
and `set_description(client, run_id, sections)` writes them to the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import pandas as pd
from mlflow.tracking import MlflowClient

from analysis import report
from analysis.compute import Results

NOTE_TAG = "mlflow.note.content"
MAX_CHARS = 8000  # MLflow's limit on a run tag's value
# The report, as logged to the parent run (analysis/run.py): the HTML one, whose plots are embedded, so
# MLflow's artifact view shows them; its Markdown preview drops every image (MLflow 3.18).
REPORT = "analysis/report.html"
PLOT = "analysis/paired_difference.png"


@dataclass
class Section:
    heading: str
    text: str = ""  # Markdown, above the table
    table: pd.DataFrame | None = None  # shown as a Markdown table; its index is a column when it has a name


def _markdown(section: Section) -> str:
    parts = [f"#### {section.heading}"]
    if section.text:
        parts.append(section.text)
    if section.table is not None and not section.table.empty:
        # as given: tabulate would otherwise read "+0.0123" as a number and drop its sign
        parts.append(section.table.to_markdown(index=section.table.index.name is not None, disable_numparse=True))
    return "\n\n".join(parts)


def description(sections: list[Section], footer: str = "") -> str:
    """The Markdown of `sections`, then `footer`. Sections that do not fit MLflow's limit on a
    tag are left out from the last one on, and the footer says so."""
    shown = list(sections)
    while True:
        dropped = len(sections) - len(shown)
        tail = [footer] if footer else []
        if dropped:
            tail.insert(0, f"*{dropped} more section(s) did not fit here: see the report.*")
        text = "\n\n".join([_markdown(s) for s in shown] + tail)
        if len(text) <= MAX_CHARS or not shown:
            return text[:MAX_CHARS]
        shown.pop()


def difference_table(res: Results) -> pd.DataFrame:
    """Per mode and length bucket at the final step: the paired difference, its interval, and the
    seeds and examples it rests on."""
    d = res.paired_diff[res.paired_diff.step == res.final_step]
    pct = int(res.options.confidence * 100)
    interval = [f"[{lo:+.4f}, {hi:+.4f}]" if lo == lo and hi == hi else "n/a (too few examples)"
                for lo, hi in zip(d.ci_low, d.ci_high)]
    return pd.DataFrame({
        "mode": d.reduce_loss.astype(str).to_numpy(),
        f"{res.options.bucket_by}": [res.labels[int(b)] for b in d.bucket],
        f"mode − {res.options.reference}": [f"{v:+.4f}" for v in d["diff"]],
        f"{pct}% interval": interval,
        "seeds": d.seeds.astype(int).to_numpy(),
        "examples": d.examples.astype(int).to_numpy(),
        "excludes 0": d.distinguishable.map({True: "yes", False: ""}).to_numpy(),
    })


def grad_share_table(res: Results) -> pd.DataFrame | None:
    if res.grad_share.empty:
        return None
    g = res.grad_share.assign(bucket=[res.labels[int(b)] for b in res.grad_share.bucket])
    share = (100 * g.pivot(index="bucket", columns="reduce_loss", values="share")).round(1)
    share["training tokens"] = (100 * g.groupby("bucket").token_share.first()).round(1)
    share.index.name = f"training {res.options.bucket_by}"
    share.columns.name = None
    return share.loc[res.labels].map(lambda v: f"{v:.1f}%")


def clipping_text(res: Results) -> str:
    if res.clipping.empty:
        return "Not logged by these runs."
    c = res.clipping
    shares = ", ".join(f"{m} on {100 * f:.0f}% of steps (median pre-clip norm {n:.3g})"
                       for m, f, n in zip(c.reduce_loss, c.clipped_fraction, c.grad_norm_median))
    threshold = ", ".join(sorted(set(c.max_grad_norm)))
    said = report.clipping_sentences(res)
    return " ".join([f"trainer.max_grad_norm={threshold}: clipped {shares}."] + said)


def sweep_sections(res: Results) -> list[Section]:
    """The sections of a sweep's analysis: the paired difference per bucket, the gradient-weight
    shares, clipping."""
    ref, pct = res.options.reference, int(res.options.confidence * 100)
    caveat = f" **{', '.join(res.caveats)}**." if res.caveats else ""
    seeds = sorted(res.paired_diff.seeds.unique()) if not res.paired_diff.empty else []
    sign = (f"**Above zero: the mode did worse than `{ref}` on those examples; below zero: better.**{caveat}")
    how = (f"Validation loss at step {res.final_step}: for each example, its mean loss (nats/token) under the mode "
           f"minus under `{ref}`, averaged over the bucket's examples and the seeds (each example weighs the same). "
           f"{report.interval_note(res)}. Separate {pct}% intervals, not adjusted for multiple comparisons: with no "
           f"real difference, about {100 - pct}% of them exclude zero by chance."
           + (" With one seed they leave out training noise: run more seeds." if seeds == [1] else ""))
    sections = [Section(f"Paired difference against {ref}, per validation {res.options.bucket_by} bucket", sign,
                        difference_table(res)), Section("What the difference is", how)]
    share = grad_share_table(res)
    sections.append(Section("Share of gradient weight during training",
                            "Per bucket of training examples, the share of each run's total gradient weight it "
                            "carried (mean over seeds); `training tokens`: the bucket's share of the training "
                            "target tokens." if share is not None else
                            "Absent: the runs have no train/train_grad_weight.parquet.", share))
    sections.append(Section("Clipping", clipping_text(res)))
    return sections


def report_footer(experiment_id: str, run_id: str, plot: bool = True, plot_path: str = PLOT) -> str:
    """Links to the report and (`plot`) the plot of the differences (`plot_path`) among the run's
    artifacts, relative to the UI's address."""
    # MLflow's UI takes its view from the address: without this it opens the report in its GenAI view
    page = f"#/experiments/{experiment_id}/runs/{run_id}/artifacts/{REPORT}?workflowType=machine_learning"
    image = f"get-artifact?path={quote(plot_path, safe='')}&run_uuid={run_id}"
    return ((f"![paired difference per bucket]({image})\n\n" if plot else "") +
            f"Full report: [{REPORT}]({page}) (plots, tables, setup), also `analysis/report.md` and the "
            "tables as CSV among this run's artifacts.")


def set_description(client: MlflowClient, run_id: str, sections: list[Section], footer: str = "") -> None:
    client.set_tag(run_id, NOTE_TAG, description(sections, footer))


def describe_sweep(client: MlflowClient, run_id: str, res: Results, extra: list[Section] = (),
                   plot: bool = True) -> None:
    """The parent run's description: the sweep's sections, then `extra` (e.g. a tuned comparison);
    `plot`: the analysis drew its plots (they are among the run's artifacts)."""
    experiment = client.get_run(run_id).info.experiment_id
    set_description(client, run_id, sweep_sections(res) + list(extra), report_footer(experiment, run_id, plot))


def describe(client: MlflowClient, run_id: str, results, images: list[str]) -> None:
    """The parent run's description for any analysis: one comparison (Results), or a sweep that
    varies other keys (analysis/tuning.py Sweep: tuned, or per value), whose sections it gives."""
    if isinstance(results, Results):
        describe_sweep(client, run_id, results, plot="paired_difference.png" in images)
        return
    sections, plot = results.description_sections(), results.description_plot()
    experiment = client.get_run(run_id).info.experiment_id
    set_description(client, run_id, sections,
                    report_footer(experiment, run_id, plot in images, f"analysis/{plot}") if plot else
                    report_footer(experiment, run_id, False))
