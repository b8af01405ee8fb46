"""python -m analysis: compare the reductions of training runs, bucketed by length.

Select the runs by sweep folder (default: the newest under multirun/), by sweep parent run id,
or by MLflow experiment.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from analysis.compute import Options
from analysis.load import AnalysisError, parent_from_sweep_dir
from analysis.run import run_analysis
from harness.artifacts import redact, resolve_uri


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--sweep-dir", type=Path, help="a sweep folder (multirun/<date>/<time>)")
    which.add_argument("--parent-run-id", help="the MLflow id of a sweep's parent run")
    which.add_argument("--experiment", help="every training run of this MLflow experiment")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store (default: %(default)s)")
    p.add_argument("--out", type=Path, help="output folder (default: <sweep dir>/analysis, else ./analysis_out)")
    p.add_argument("--bucket-by", choices=["seq_len", "target_tokens"], default="seq_len")
    p.add_argument("--buckets", type=int, default=6, help="equal-count quantile buckets (default: %(default)s)")
    p.add_argument("--edges", type=lambda s: [float(x) for x in s.split(",")],
                   help="fixed inner bucket edges instead of quantiles, e.g. 32,64,128,256")
    p.add_argument("--reference", help="the mode others are compared against "
                                        "(default: mean, else token_mean, sum, seq_mean: the first among the runs)")
    p.add_argument("--allow-unpaired", action="store_true",
                   help="compare runs that are not verified pairs; every output is marked UNPAIRED")
    p.add_argument("--include-flagged", action="store_true",
                   help="analyse runs flagged as broken (loss rose, zero gradient) and leave out runs that did "
                        "not finish, instead of refusing; the report names them and is marked FLAGGED RUNS")
    p.add_argument("--tune", metavar="KEY",
                   help="a numeric key the sweep varies (e.g. trainer.lr, the default when it varies it; loss_scale): "
                        "each reduction at its own best value, chosen on validation, compared on the test split")
    p.add_argument("--select-by", choices=["token", "example"], default="token",
                   help="the final validation loss that chooses --tune's value: token-weighted (default) or "
                        "example-weighted")
    p.add_argument("--no-plots", action="store_true", help="tables and report only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    uri = resolve_uri(args.tracking_uri)
    try:
        if args.buckets < 1:
            raise AnalysisError(f"--buckets {args.buckets}: must be at least 1")
        parent, sweep_dir = args.parent_run_id, args.sweep_dir
        if not (parent or args.experiment):
            sweep_dir = sweep_dir or _newest_sweep()
            parent = parent_from_sweep_dir(sweep_dir)
        out = args.out or (sweep_dir / "analysis" if sweep_dir else Path("analysis_out"))
        opts = Options(bucket_by=args.bucket_by, buckets=args.buckets, edges=args.edges,
                       reference=args.reference, allow_unpaired=args.allow_unpaired,
                       include_flagged=args.include_flagged)
        run_analysis(uri, out, opts, experiment=args.experiment, parent_run_id=parent, draw=not args.no_plots,
                     tune=args.tune, select_by=args.select_by)
    except AnalysisError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    print(f"report: {out / 'report.html'}")
    return 0


def _newest_sweep() -> Path:
    sweeps = sorted(Path("multirun").glob("*/*/mlflow_parent_run_id"))
    if not sweeps:
        raise AnalysisError("no sweep folder under ./multirun; give --sweep-dir, --parent-run-id or --experiment")
    return sweeps[-1].parent


if __name__ == "__main__":
    sys.exit(main())
