"""What a sweep prints when it ends: where its results are, and the answer in a few lines."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def difference_table(results) -> pd.DataFrame:
    """Per mode and length bucket, at the final step: the paired difference of per-example
    validation loss (mode - reference; each example weighs the same), its interval and the
    seeds and examples it rests on."""
    d = results.paired_diff
    d = d[d.step == results.final_step]
    pct = int(results.options.confidence * 100)
    return pd.DataFrame({
        "mode": d.reduce_loss.astype(str),
        f"{results.options.bucket_by} bucket": [results.labels[int(b)] for b in d.bucket],
        "diff": d["diff"].map(lambda v: f"{v:+.4f}"),
        f"{pct}% interval": [f"[{lo:+.4f}, {hi:+.4f}]" if lo == lo and hi == hi else "n/a (too few examples)"
                             for lo, hi in zip(d.ci_low, d.ci_high)],
        "seeds": d.seeds.astype(int),
        "examples": d.examples.astype(int),
        "": d.distinguishable.map({True: "*", False: ""}),
    })


def mlflow_ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


def sweep_summary(sweep_dir: Path, uri: str, results=None, failures: list[str] = (), link: str | None = None,
                  notes: list[str] = ()) -> str:
    """The lines a sweep ends with. `results`: the analysis (analysis/compute.py Results), or
    None when there is none; `link`: the UI's page of the sweep's runs (harness/runs/tracking.py
    runs_link), shown under the command that serves it; `notes`: lines that say why (no failure)."""
    sweep_dir = Path(sweep_dir).resolve()
    lines = ["", "== sweep finished ==" if not failures else "== sweep finished WITH FAILURES ==",
             f"sweep folder: {sweep_dir}"]
    report = sweep_dir / "analysis" / "report.html"
    if results is not None and report.exists():
        lines.append(f"report:       {report}")
        if hasattr(results, "summary_lines"):  # per value of a swept key, or tuned (analysis/tuning.py)
            lines += results.summary_lines(difference_table)
        elif not (table := difference_table(results)).empty:
            lines += ["", f"validation loss at step {results.final_step}, paired difference vs "
                          f"{results.options.reference} (per-example mean loss, example-weighted; "
                          "* = interval excludes 0, not adjusted for multiple comparisons):",
                      table.to_string(index=False)]
    lines += notes
    for failure in failures:
        lines.append(f"FAILED: {failure}")
    lines += ["", f"open the runs: {mlflow_ui_command(uri)}"]
    if link:
        lines.append(f"then browse:   {link}" if not uri.startswith(("http://", "https://")) else f"in its UI:     {link}")
    return "\n".join(lines)
