"""One line per harness run in an MLflow store: status, wall time, mean tokens/s, final losses.

    python benchmarks/run_summary.py sqlite:///mlflow.db
"""

from __future__ import annotations

import sys

import numpy as np
from mlflow.tracking import MlflowClient


def main(uri: str) -> None:
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.reduce_loss != ''",
                              order_by=["attributes.start_time ASC"])
    print(f"{'run':<20}{'status':<10}{'device':<8}{'wall s':>8}{'tokens/s':>12}{'val token':>11}{'val seq':>10}")
    for run in runs:
        speeds = [m.value for m in client.get_metric_history(run.info.run_id, "train/tokens_per_s")]
        wall = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
        metrics = run.data.metrics
        print(f"{run.info.run_name:<20}{run.info.status:<10}{run.data.tags.get('device', '?'):<8}{wall:>8.1f}"
              f"{np.median(speeds[1:] or speeds or [np.nan]):>12,.0f}"
              f"{metrics.get('val/token_loss', np.nan):>11.4f}{metrics.get('val/seq_loss', np.nan):>10.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
