"""Compare the training-loss curves of the newest run in two MLflow stores.

    python benchmarks/compare_loss_curves.py sqlite:///one_gpu.db sqlite:///two_gpus.db

Prints the largest absolute and relative difference of `train/loss` per step, and the final
validation metrics of both runs.
"""

from __future__ import annotations

import sys

import numpy as np
from mlflow.tracking import MlflowClient


def newest_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.reduce_loss != ''", order_by=["attributes.start_time DESC"], max_results=1)
    return client, runs[0]


def curve(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def main(uri_a: str, uri_b: str) -> None:
    (ca, ra), (cb, rb) = newest_run(uri_a), newest_run(uri_b)
    a, b = curve(ca, ra.info.run_id, "train/loss"), curve(cb, rb.info.run_id, "train/loss")
    steps = sorted(set(a) & set(b))
    x, y = np.array([a[s] for s in steps]), np.array([b[s] for s in steps])
    print(f"{len(steps)} common steps; train/loss max |diff| {np.abs(x - y).max():.3e}, "
          f"max rel diff {(np.abs(x - y) / np.abs(x)).max():.3e}; first {x[0]:.5f} vs {y[0]:.5f}, last {x[-1]:.5f} vs {y[-1]:.5f}")
    for key in ("val/token_loss", "val/seq_loss"):
        va, vb = ra.data.metrics.get(key), rb.data.metrics.get(key)
        print(f"{key}: {va:.5f} vs {vb:.5f}")
    for tag in ("init_fingerprint", "data_fingerprint"):
        print(f"{tag}: {ra.data.tags.get(tag)} vs {rb.data.tags.get(tag)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
