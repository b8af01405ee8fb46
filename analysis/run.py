"""Select runs, analyse, write plots, tables and report into one folder, log it to MLflow.

The folder is built beside `out` and moved into place at the end, so a failure leaves
nothing partial behind.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from analysis import plots, report
from analysis.compute import Options, Results, analyse
from analysis.load import AnalysisError, load, select_runs

log = logging.getLogger(__name__)


def run_analysis(uri: str, out: Path, opts: Options, *, experiment: str | None = None,
                 parent_run_id: str | None = None, draw: bool = True) -> Results:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "report.md").exists():
        raise AnalysisError(f"--out {out} exists and does not hold an earlier report; choose an empty folder")
    runs, left_out = select_runs(uri, experiment=experiment, parent_run_id=parent_run_id,
                                 include_flagged=opts.include_flagged)
    data = load(uri, runs)
    results = analyse(data, opts)
    results.left_out = left_out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        images = plots.draw_all(results, staging) if draw else []
        report.write(results, staging, images)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if parent_run_id:
        MlflowClient(uri).log_artifacts(parent_run_id, str(out), "analysis")
    log.info("analysis of %d runs written to %s", len(runs), out)
    return results
