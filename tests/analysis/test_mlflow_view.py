"""The parent run's description (analysis/mlflow_view.py): the numbers of the analysis, the sign
convention, sections that others add, and MLflow's limit on a tag."""

import numpy as np
import pandas as pd

from analysis import mlflow_view
from analysis.compute import Options, analyse
from analysis.mlflow_view import MAX_CHARS, Section, description, sweep_sections
from analysis.simulate import simulated_runs


def planted():
    # sum does worse on short examples by 0.3 nats, nothing on long ones
    effect = lambda mode, seq_len: np.where((mode == "sum") & (seq_len < 300), 0.3, 0.0)  # noqa: E731
    return analyse(simulated_runs(300, seeds=(0, 1, 2), effect=effect), Options(buckets=3))


def test_the_description_holds_each_buckets_difference_interval_and_seeds():
    res = planted()
    md = description(sweep_sections(res), mlflow_view.report_footer("1", "abc"))
    final = res.paired_diff[res.paired_diff.step == res.final_step]
    rows = [line for line in md.splitlines() if line.startswith("| sum ")]
    assert len(rows) == len(final) == 3
    for row, (_, d) in zip(rows, final.iterrows()):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == res.labels[int(d.bucket)] and cells[2] == f"{d['diff']:+.4f}"
        assert cells[3] == f"[{d.ci_low:+.4f}, {d.ci_high:+.4f}]" and cells[4] == "3"
        assert cells[6] == ("yes" if d.distinguishable else "")
    first, last = [[c.strip() for c in r.strip("|").split("|")] for r in (rows[0], rows[-1])]
    assert first[6] == "yes" and float(first[2]) > 0.2  # the planted effect, found, with its sign
    assert "Above zero: the mode did worse than `mean`" in md
    assert "Share of gradient weight" in md and "#### Clipping" in md
    assert ("[analysis/report.html](#/experiments/1/runs/abc/artifacts/analysis/report.html"
            "?workflowType=machine_learning)") in md
    assert "![paired difference per bucket](get-artifact?path=analysis%2Fpaired_difference.png&run_uuid=abc)" in md


def test_sections_from_elsewhere_are_added_and_what_does_not_fit_is_named():
    res = planted()
    tuned = Section("Tuned comparison", "each mode at its best learning rate",
                    pd.DataFrame({"mode": ["mean", "sum"], "lr": ["1e-3", "3e-3"]}))
    md = description(sweep_sections(res) + [tuned])
    assert md.index("#### Paired difference") < md.index("#### Tuned comparison")
    assert "| sum    | 3e-3 |" in md

    huge = Section("Huge", "x" * MAX_CHARS)
    md = description(sweep_sections(res) + [huge], footer="the footer")
    assert len(md) <= MAX_CHARS and "Huge" not in md and "#### Paired difference" in md
    assert "1 more section(s) did not fit here" in md and md.endswith("the footer")
