"""Time the analysis (without plotting) on about 1,000,000 per-example rows.

    python benchmarks/analysis_speed.py                 # 4 modes x 3 seeds x 83,334 examples, one step
    python benchmarks/analysis_speed.py --steps 3       # the same rows spread over 3 evaluation steps
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from analysis import report
from analysis.compute import Options, analyse
from analysis.simulate import simulated_runs

MODES = ("mean", "sum", "token_mean", "seq_mean")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=1)
    args = p.parse_args()
    n_examples = -(-args.rows // (len(MODES) * 3 * args.steps))
    data = simulated_runs(n_examples, modes=MODES, seeds=(0, 1, 2), steps=tuple(range(1, args.steps + 1)))
    print(f"{len(data.evals):,} per-example rows: {len(MODES)} modes x 3 seeds x {args.steps} step(s) x {n_examples:,} examples")
    tic = time.perf_counter()
    res = analyse(data, Options())
    mid = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        report.write(res, Path(out), images=[])
    end = time.perf_counter()
    print(f"analyse (pairing, buckets, tables, intervals): {mid - tic:.2f} s")
    print(f"report and CSV tables: {end - mid:.2f} s")
    print(f"total without plotting: {end - tic:.2f} s")


if __name__ == "__main__":
    main()
