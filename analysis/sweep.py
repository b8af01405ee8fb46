"""What the harness's sweep callback calls when a multirun ends."""

from __future__ import annotations

from pathlib import Path

from analysis.compute import Options
from analysis.run import run_analysis
from harness.tracking import resolve_uri


def analyse_sweep(parent_run_id: str, tracking_cfg, out: Path) -> None:
    run_analysis(resolve_uri(tracking_cfg.uri), out, Options(), parent_run_id=parent_run_id)
