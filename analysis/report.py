"""report.md, a self-contained report.html, and the tables as CSV."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.compute import Results

SETUP_PARAMS = [
    ("model", ["model.name_or_path", "model.kind"]),
    ("data", ["data.path", "data.kind"]),
    ("optimizer steps", ["trainer.max_steps"]),
    ("sequences per step", ["trainer.batch_size"]),
    ("gradient accumulation", ["trainer.grad_accum"]),
    ("learning rate", ["trainer.lr"]),
    ("loss_scale (sum)", ["loss_scale"]),
    ("packing", ["data.packing"]),
]


def setup_lines(res: Results) -> list[tuple[str, str]]:
    runs = res.runs
    lines = [("reductions", ", ".join(sorted(runs.reduce_loss.unique()))),
             ("seeds", ", ".join(sorted(runs.seed.astype(str).unique()))),
             ("runs", str(len(runs))),
             *([("left out", f"{len(res.superseded)} earlier run(s) of jobs that ran again (the latest of each is "
                             f"compared): {', '.join(res.superseded)}")] if res.superseded else []),
             ("paired", "yes (same init_fingerprint, data_fingerprint and validation examples within each pair)"
              if res.paired else "NO: compared with --allow-unpaired")]
    for label, keys in SETUP_PARAMS:
        for key in keys:
            if key in runs and runs[key].notna().any() and str(runs[key].dropna().iloc[0]) not in ("None", "???"):
                lines.append((label, ", ".join(sorted(runs[key].dropna().astype(str).unique()))))
                break
    if "loss_scale_value" in runs and runs.loss_scale_value.notna().any():
        asked = sorted(runs["loss_scale"].dropna().astype(str).unique()) if "loss_scale" in runs else []
        used = ", ".join(f"{float(v):.4g}" for v in sorted(runs.loss_scale_value.dropna().astype(float).unique()))
        lines = [(k, v) if k != "loss_scale (sum)" else (k, f"{', '.join(asked)} (= {used})" if "auto" in asked else used)
                 for k, v in lines]
    lines.append(("buckets", f"{len(res.labels)} by validation {res.options.bucket_by}: {', '.join(res.labels)}"))
    for run in res.flagged.itertuples():
        lines.append(("FLAGGED run, compared anyway", f"{run.run_name or run.run_id}: {run.flag}"))
    for run in res.left_out:
        lines.append(("left out, did not finish", run))
    lines.append(("intervals", interval_note(res)))
    return lines


def interval_note(res: Results) -> str:
    pct = int(res.options.confidence * 100)
    seeds = sorted(res.paired_diff.seeds.unique()) if not res.paired_diff.empty else []
    if seeds == [1]:
        return (f"{pct}% intervals are within-seed only (1 seed): they show how precisely the validation "
                "examples measure these runs, not how much another seed would change the difference; "
                "run more seeds (seed=0,1,2) for intervals that include training noise")
    return (f"{pct}% intervals over seeds and examples (Student's t; {', '.join(map(str, seeds))} seeds per "
            "interval): seed-to-seed training noise is part of them")


def _seeds(n: int) -> str:
    return "1 seed, within-seed only" if n == 1 else f"{n} seeds"


def tables(res: Results) -> dict[str, pd.DataFrame]:
    label = dict(enumerate(res.labels))
    out = {}
    for name, df in [("bucket_losses", res.bucket_losses), ("paired_difference", res.paired_diff),
                     ("gradient_weight_share", res.grad_share)]:
        df = df.copy()
        df.insert(df.columns.get_loc("bucket") + 1, "bucket_range", df.bucket.map(label))
        out[name] = df
    if not res.clipping.empty:
        out["clipping"] = res.clipping
    return out


def sentences(res: Results) -> list[str]:
    ref, pct = res.options.reference, int(res.options.confidence * 100)
    final = res.paired_diff[res.paired_diff.step == res.final_step]
    out = []
    for row in final.itertuples():
        verdict = (f"distinguishable from zero ({row.reduce_loss} is {'worse' if row.diff > 0 else 'better'})"
                   if row.distinguishable else "not distinguishable from zero")
        out.append(f"{res.options.bucket_by} {res.labels[row.bucket]} ({row.examples} examples, {_seeds(row.seeds)}): "
                   f"{row.reduce_loss} − {ref} = {row.diff:+.4f} nats/token (example-weighted), {pct}% CI "
                   f"[{row.ci_low:+.4f}, {row.ci_high:+.4f}]: {verdict}.")
    if len(final) > 1:
        out.append(f"These are {len(final)} separate {pct}% intervals, not adjusted for multiple comparisons: with no "
                   f"real difference anywhere, about {100 - pct}% of them would still exclude zero by chance, so one "
                   "distinguishable bucket among many is weak evidence; look for a consistent pattern over "
                   "buckets and seeds.")
    return out


def clipping_sentences(res: Results) -> list[str]:
    """Plain statements on clipping, for each mode against the reference."""
    if res.clipping.empty or res.options.reference not in set(res.clipping.reduce_loss):
        return []
    by_mode, ref = res.clipping.set_index("reduce_loss"), res.options.reference
    threshold = ", ".join(sorted(set(by_mode.max_grad_norm)))
    out = []
    for mode, row in by_mode.drop(index=ref).iterrows():
        base = by_mode.loc[ref]
        shares = (f"{mode} on {100 * row.clipped_fraction:.0f}% of steps, {ref} on {100 * base.clipped_fraction:.0f}%; "
                  f"trainer.max_grad_norm={threshold}")
        if row.mostly_clipped and base.mostly_clipped:
            out.append(f"Clipping dominates the comparison of {mode} with {ref}: both were clipped on most steps "
                       f"({shares}). A clipped step has the same length whatever the reduction's scale, so these "
                       "runs differ mostly by clipping (sum and token_mean, whose gradients differ only by a "
                       "factor, take identical steps as long as both are clipped). Raise trainer.max_grad_norm "
                       "or set it to null, and use loss_scale=auto for sum, to compare the reductions themselves.")
        elif row.mostly_clipped or base.mostly_clipped:
            which = mode if row.mostly_clipped else ref
            out.append(f"Clipping shapes the comparison of {mode} with {ref}: {which} was clipped on most steps, "
                       f"the other was not ({shares}), so part of the difference is the clipping of {which}'s updates.")
        ratio = row.grad_norm_median / base.grad_norm_median if base.grad_norm_median else float("nan")
        if ratio > 10 or ratio < 0.1:
            out.append(f"{mode}'s median pre-clip gradient norm is {ratio:.3g} times {ref}'s "
                       f"({row.grad_norm_median:.3g} against {base.grad_norm_median:.3g}): their scales differ"
                       + (" (loss_scale=auto gives sum the scale of token_mean on an average step)." if "sum" in (mode, ref) else "."))
    return out


def absent_sections(res: Results, images: list[str]) -> list[tuple[str, str]]:
    """(section, why it is absent) for every section this report leaves out."""
    out = []
    if res.grad_share.empty:
        out.append(("Share of gradient weight during training",
                    "Absent: none of the runs has the artifact train/train_grad_weight.parquet."))
    if res.clipping.empty:
        out.append(("Clipping", "Absent: none of the runs logged the metric train/clipped_fraction "
                                "(runs written before it was logged)."))
    if not images:
        out.append(("Plots", "Not drawn (--no-plots)."))
    return out


def _final_tables(res: Results, t: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    losses = t["bucket_losses"][t["bucket_losses"].step == res.final_step].pivot(
        index="bucket_range", columns="reduce_loss", values="token_loss")
    diff = t["paired_difference"][t["paired_difference"].step == res.final_step].drop(columns=["step", "bucket"])
    example_losses = t["bucket_losses"][t["bucket_losses"].step == res.final_step].pivot(
        index="bucket_range", columns="reduce_loss", values="example_loss")
    shown = {f"Token-weighted validation loss (nats/token: each token weighs the same), step {res.final_step}":
             losses.loc[res.labels].round(4),
             f"Example-weighted validation loss (each example's mean nats/token, averaged over examples), "
             f"step {res.final_step}": example_losses.loc[res.labels].round(4),
             f"Paired difference against {res.options.reference} (example-weighted: mode − "
             f"{res.options.reference} of each example's mean loss; the findings use these)": diff.round(4)}
    if not res.grad_share.empty:
        share = t["gradient_weight_share"].pivot(index="bucket_range", columns="reduce_loss", values="share")
        shown["Share of gradient weight during training (%)"] = (100 * share.loc[res.labels]).round(1)
    if not res.clipping.empty:
        c = res.clipping.set_index("reduce_loss")
        shown["Clipping: share of steps whose gradient was clipped, and the pre-clip gradient norm"] = pd.DataFrame({
            "runs": c.runs,
            "clipped steps (%)": (100 * c.clipped_fraction).round(1),
            "range over runs (%)": [f"{100 * lo:.1f}-{100 * hi:.1f}" for lo, hi in zip(c.clipped_min, c.clipped_max)],
            "median pre-clip norm": c.grad_norm_median.map(lambda v: f"{v:.4g}"),
            "max_grad_norm": c.max_grad_norm,
        })
    return shown


def write(res: Results, out: Path, images: list[str]) -> None:
    t = tables(res)
    for name, df in t.items():
        df.to_csv(out / f"{name}.csv", index=False)
    title = "How each reduction treats long vs short examples" + (f" ({', '.join(res.caveats)})" if res.caveats else "")
    setup, said, shown = setup_lines(res), clipping_sentences(res) + sentences(res), _final_tables(res, t)
    absent = absent_sections(res, images)

    write_documents(out, title, setup, said, shown, images, plots.CAPTIONS, list(t), absent)


def write_documents(out: Path, title: str, setup: list[tuple[str, str]], said: list[str], shown: dict[str, pd.DataFrame],
                    images: list[str], captions: dict[str, str], csv_names: list[str],
                    absent: list[tuple[str, str]] = ()) -> None:
    """report.md and report.html (the plots embedded) from the same parts: setup lines,
    findings, tables, sections that are absent and why, plots, the names of the CSV tables."""
    md = [f"# {title}", "", "## Setup", ""] + [f"- **{k}**: {v}" for k, v in setup]
    md += ["", "## Findings", ""] + [f"- {s}" for s in said]
    for caption, df in shown.items():
        md += ["", f"## {caption}", "", _markdown(df)]
    for caption, why in absent:
        md += ["", f"## {caption}", "", why]
    if images:
        md += ["", "## Plots"]
        for name in images:
            md += ["", f"![{captions.get(name, name)}]({name})", "", f"*{captions.get(name, name)}*"]
    md += ["", "Tables as CSV: " + ", ".join(f"`{n}.csv`" for n in csv_names), ""]
    (out / "report.md").write_text("\n".join(md))

    body = [f"<h1>{html.escape(title)}</h1>", "<h2>Setup</h2><ul>"]
    body += [f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in setup] + ["</ul>"]
    body += ["<h2>Findings</h2><ul>"] + [f"<li>{html.escape(s)}</li>" for s in said] + ["</ul>"]
    for caption, df in shown.items():
        body += [f"<h2>{html.escape(caption)}</h2>", df.to_html(border=0, index=df.index.name is not None)]
    for caption, why in absent:
        body += [f"<h2>{html.escape(caption)}</h2>", f"<p>{html.escape(why)}</p>"]
    body += ["<h2>Plots</h2>"] if images else []
    for name in images:
        data = base64.b64encode((out / name).read_bytes()).decode()
        body.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                    f'<figcaption>{html.escape(captions.get(name, name))}</figcaption></figure>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}img{max-width:100%}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
                                     f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>")


def _markdown(df: pd.DataFrame) -> str:
    """A Markdown table; the index is a column only when it names something (e.g. the bucket)."""
    return df.to_markdown(index=df.index.name is not None)
