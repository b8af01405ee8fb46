"""report.md, a self-contained report.html, and the tables as CSV."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

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
    lines.append(("buckets", f"{len(res.labels)} by validation {res.options.bucket_by}: {', '.join(res.labels)}"))
    for run in res.flagged.itertuples():
        lines.append(("FLAGGED run, compared anyway", f"{run.run_name or run.run_id}: {run.flag}"))
    for run in res.left_out:
        lines.append(("left out, did not finish", run))
    return lines


def tables(res: Results) -> dict[str, pd.DataFrame]:
    label = dict(enumerate(res.labels))
    out = {}
    for name, df in [("bucket_losses", res.bucket_losses), ("paired_difference", res.paired_diff),
                     ("gradient_weight_share", res.grad_share)]:
        df = df.copy()
        df.insert(df.columns.get_loc("bucket") + 1, "bucket_range", df.bucket.map(label))
        out[name] = df
    return out


def sentences(res: Results) -> list[str]:
    ref, pct = res.options.reference, int(res.options.confidence * 100)
    final = res.paired_diff[res.paired_diff.step == res.final_step]
    out = []
    for row in final.itertuples():
        verdict = (f"distinguishable from zero ({row.reduce_loss} is {'worse' if row.diff > 0 else 'better'})"
                   if row.distinguishable else "not distinguishable from zero")
        out.append(f"{res.options.bucket_by} {res.labels[row.bucket]} ({row.examples} examples, {row.seeds} seed(s)): "
                   f"{row.reduce_loss} − {ref} = {row.diff:+.4f} nats/token, {pct}% CI "
                   f"[{row.ci_low:+.4f}, {row.ci_high:+.4f}]: {verdict}.")
    return out


def _final_tables(res: Results, t: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    losses = t["bucket_losses"][t["bucket_losses"].step == res.final_step].pivot(
        index="bucket_range", columns="reduce_loss", values="token_loss")
    diff = t["paired_difference"][t["paired_difference"].step == res.final_step].drop(columns=["step", "bucket"])
    shown = {f"Token-weighted validation loss (nats/token), step {res.final_step}": losses.loc[res.labels].round(4),
             f"Paired difference against {res.options.reference}": diff.round(4)}
    if not res.grad_share.empty:
        share = t["gradient_weight_share"].pivot(index="bucket_range", columns="reduce_loss", values="share")
        shown["Share of gradient weight during training (%)"] = (100 * share.loc[res.labels]).round(1)
    return shown


def write(res: Results, out: Path, images: list[str]) -> None:
    t = tables(res)
    for name, df in t.items():
        df.to_csv(out / f"{name}.csv", index=False)
    title = "How each reduction treats long vs short examples" + (f" ({', '.join(res.caveats)})" if res.caveats else "")
    setup, said, shown = setup_lines(res), sentences(res), _final_tables(res, t)

    md = [f"# {title}", "", "## Setup", ""] + [f"- **{k}**: {v}" for k, v in setup]
    md += ["", "## Findings", ""] + [f"- {s}" for s in said]
    for caption, df in shown.items():
        md += ["", f"## {caption}", "", df.to_markdown() if _has_tabulate() else df.to_string()]
    md += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    md += ["", "Tables as CSV: " + ", ".join(f"`{n}.csv`" for n in t), ""]
    (out / "report.md").write_text("\n".join(md))

    body = [f"<h1>{html.escape(title)}</h1>", "<h2>Setup</h2><ul>"]
    body += [f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in setup] + ["</ul>"]
    body += ["<h2>Findings</h2><ul>"] + [f"<li>{html.escape(s)}</li>" for s in said] + ["</ul>"]
    for caption, df in shown.items():
        body += [f"<h2>{html.escape(caption)}</h2>", df.to_html(border=0)]
    body += ["<h2>Plots</h2>"]
    for name in images:
        data = base64.b64encode((out / name).read_bytes()).decode()
        body.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}img{max-width:100%}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
                                     f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>")


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
