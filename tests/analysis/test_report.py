"""report.md from constructed runs, in process: what it states about seeds, clipping and
sections it leaves out."""

import re

import pandas as pd

from analysis import report
from analysis.compute import Options, analyse
from analysis.simulate import simulated_runs


def write_report(data, tmp_path, images=()) -> str:
    res = analyse(data, Options(buckets=3))
    report.write(res, tmp_path, list(images))
    return (tmp_path / "report.md").read_text()


def findings(md: str) -> list[str]:
    return [line for line in md.splitlines() if "nats/token (example-weighted), 95% CI" in line]


def with_clipping(data, fractions: dict[str, float], norms: dict[str, float], threshold="1.0"):
    data.runs["clipped_fraction"] = data.runs.reduce_loss.map(fractions)
    data.runs["grad_norm_median"] = data.runs.reduce_loss.map(norms)
    data.runs["trainer.max_grad_norm"] = threshold
    return data


def test_every_interval_names_its_seeds_and_one_seed_is_within_seed_only(tmp_path):
    md = write_report(simulated_runs(90, seeds=(0,)), tmp_path)
    lines = findings(md)
    assert len(lines) == 3 and all("(30 examples, 1 seed, within-seed only)" in line for line in lines)
    assert "intervals are within-seed only (1 seed)" in md

    (tmp_path / "three").mkdir()
    md = write_report(simulated_runs(90, seeds=(0, 1, 2)), tmp_path / "three")
    lines = findings(md)
    assert len(lines) == 3 and all("(30 examples, 3 seeds)" in line for line in lines)
    assert "within-seed only" not in md and "intervals over seeds and examples" in md


def test_clipping_on_most_steps_of_both_modes_is_said_plainly(tmp_path):
    data = with_clipping(simulated_runs(60, modes=("mean", "sum", "token_mean")),
                         {"mean": 0.97, "sum": 1.0, "token_mean": 0.3}, {"mean": 1.8, "sum": 1460.0, "token_mean": 0.9})
    md = write_report(data, tmp_path)
    assert "Clipping dominates the comparison of sum with mean: both were clipped on most steps " \
           "(sum on 100% of steps, mean on 97%; trainer.max_grad_norm=1.0)" in md
    assert "Clipping shapes the comparison of token_mean with mean: mean was clipped on most steps" in md
    assert "sum's median pre-clip gradient norm is 811 times mean's" in md
    table = pd.read_csv(tmp_path / "clipping.csv").set_index("reduce_loss")
    assert table.loc["sum", "clipped_fraction"] == 1.0 and table.loc["mean", "runs"] == 2
    assert "## Clipping: share of steps whose gradient was clipped" in md


def test_no_clipping_statement_when_clipping_is_rare(tmp_path):
    data = with_clipping(simulated_runs(60), {"mean": 0.02, "sum": 0.0}, {"mean": 1.8, "sum": 1.7}, threshold="None")
    md = write_report(data, tmp_path)
    assert "Clipping dominates" not in md and "Clipping shapes" not in md and "times mean's" not in md
    clipping_rows = md.split("## Clipping:")[1].splitlines()
    assert any(row.startswith("| mean") and row.rstrip(" |").endswith("None") for row in clipping_rows)  # clipping off


def test_absent_sections_say_why(tmp_path):
    data = simulated_runs(60)
    data.grad_weights = pd.DataFrame()
    md = write_report(data, tmp_path)
    assert "## Share of gradient weight during training\n\nAbsent: none of the runs has the artifact " \
           "train/train_grad_weight.parquet." in md
    assert "## Clipping\n\nAbsent: none of the runs logged the metric train/clipped_fraction" in md
    assert "## Plots\n\nNot drawn (--no-plots)." in md


def test_resolved_loss_scale_is_shown_beside_auto(tmp_path):
    data = simulated_runs(60)
    data.runs["loss_scale"] = "auto"
    data.runs["loss_scale_value"] = repr(1 / 211.25)
    md = write_report(data, tmp_path)
    assert "- **loss_scale (sum)**: auto (= 0.004734)" in md


def markdown_table(md: str, heading_start: str) -> pd.DataFrame:
    """The Markdown table under the first `## heading_start...` heading, as strings."""
    section = md.split(f"## {heading_start}")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert re.fullmatch(r"\|(:?-+:?\|)+", rows[1].replace(" ", "")), rows[1]  # the Markdown separator row
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    return pd.DataFrame(cells[2:], columns=cells[0])


def test_tables_are_markdown_and_findings_subtract_from_the_table_beside_them(tmp_path):
    md = write_report(simulated_runs(90, seeds=(0,)), tmp_path)
    tokens = markdown_table(md, "Token-weighted validation loss").set_index("bucket_range").astype(float)
    examples = markdown_table(md, "Example-weighted validation loss").set_index("bucket_range").astype(float)
    diff = markdown_table(md, "Paired difference against mean")
    assert list(diff.columns[:3]) == ["reduce_loss", "bucket_range", "diff"]  # no stray pandas index
    assert not tokens.equals(examples)  # the two weightings differ on these data
    assert len(findings(md)) == len(examples) == 3
    for line, (bucket, row) in zip(findings(md), examples.iterrows()):
        stated = float(re.search(r"sum − mean = ([-+]\d+\.\d+)", line).group(1))
        assert abs(stated - (row["sum"] - row["mean"])) <= 2e-4, (line, row)  # rounding of both tables
        assert f"seq_len {bucket} " in line
    assert "not adjusted for multiple comparisons" in md and "3 separate 95% intervals" in md
