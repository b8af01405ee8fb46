"""Select runs, analyse, write plots, tables and report into one folder, log it to MLflow.

The folder is built beside `out` and moved into place at the end, so a failure leaves
nothing partial behind. An existing `out` is replaced only if this tool made it: it holds
the marker file MARKER, listing what the tool wrote, and nothing else.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from analysis import mlflow_view, plots, report, tuning
from analysis.compute import Options, Results, analyse
from analysis.load import AnalysisError, load, parent_swept_keys, select_runs

log = logging.getLogger(__name__)
MARKER = ".reduce-loss-analysis"  # in every folder this tool writes: the names it wrote, one per line


def run_analysis(uri: str, out: Path, opts: Options, *, experiment: str | None = None,
                 parent_run_id: str | None = None, draw: bool = True, tune: str | None = None,
                 select_by: str = "token") -> Results | tuning.Sweep:
    """A `Results` when the runs vary nothing but reduce_loss and seed; else the comparison per
    value of what they vary, or tuned (analysis/tuning.py)."""
    out = Path(out)
    check_replaceable(out)
    runs, left_out = select_runs(uri, experiment=experiment, parent_run_id=parent_run_id,
                                 include_flagged=opts.include_flagged)
    data = load(uri, runs)
    results = tuning.analyse_sweep(data, opts, tune=tune, select_by=select_by,
                                   swept=parent_swept_keys(uri, parent_run_id)) or analyse(data, opts)
    for res in ([results] if isinstance(results, Results) else
                [res for _, res in results.per_value] + ([results.tuned.test] if results.tuned else [])):
        res.left_out = left_out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if isinstance(results, tuning.Sweep):
            images = tuning.draw(results, staging) if draw else []
            tuning.write(results, staging, images)
        else:
            images = plots.draw_all(results, staging) if draw else []
            report.write(results, staging, images)
        (staging / MARKER).write_text("".join(f"{p.name}\n" for p in sorted(staging.iterdir())))
        replace(out, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if parent_run_id:
        client = MlflowClient(uri)
        client.log_artifacts(parent_run_id, str(out), "analysis")
        if isinstance(results, tuning.Sweep):
            tuning.log_to_parent(client, parent_run_id, results)
        mlflow_view.describe(client, parent_run_id, results, images)
    log.info("analysis of %d runs written to %s", len(runs), out.resolve())
    return results


def check_replaceable(out: Path) -> None:
    """Refuse an `out` that holds anything this tool did not write there."""
    if not out.exists():
        return
    if not out.is_dir():
        raise AnalysisError(f"--out {out} is a file, not a folder; choose a new or empty folder")
    present = {p.name for p in out.iterdir()}
    if not present:
        return
    marker = out / MARKER
    if not marker.is_file():
        raise AnalysisError(f"--out {out} holds files this tool did not write ({', '.join(sorted(present)[:3])}"
                            f"{', ...' if len(present) > 3 else ''}); choose a new or empty folder")
    foreign = present - set(marker.read_text().split("\n")) - {MARKER}
    if foreign:
        raise AnalysisError(f"--out {out} holds an earlier report and files this tool did not write "
                            f"({', '.join(sorted(foreign)[:3])}); move them, or choose another folder")


def replace(out: Path, staging: Path) -> None:
    """Move the finished `staging` folder to `out`, removing the earlier report (checked to be
    this tool's) only once the new one is in place."""
    if not out.exists():
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
    out.rename(old / out.name)
    staging.rename(out)
    shutil.rmtree(old)
