"""How often 95% intervals of a paired difference cover the truth when every seed shifts the
difference by a N(0, seed_sd) draw, for three ways of computing them (docs/analysis.md):

- examples only: resample validation examples, seeds fixed (what the analysis did before);
- two-stage bootstrap: resample seeds, then examples (one draw shared by the chosen seeds);
- seeds and examples (analysis.compute.seed_example_interval): Student's t, crossed random effects.

    python benchmarks/interval_coverage.py [--data-sets 400] [--examples 120]
"""

from __future__ import annotations

import argparse

import numpy as np

from analysis.compute import seed_example_interval


def covers(table: np.ndarray, rng: np.random.Generator, n_boot: int) -> tuple[bool, bool, bool]:
    """Whether each interval of one seeds x examples table of differences (truth 0) covers 0."""
    S, n = table.shape
    examples = rng.integers(0, n, (n_boot, n))
    boot = table.mean(axis=0)[examples].mean(axis=1)
    examples_only = np.quantile(boot, 0.025) <= 0 <= np.quantile(boot, 0.975)

    counts = np.stack([np.bincount(row, minlength=n) for row in examples])  # (n_boot, n)
    per_seed = table @ counts.T / n  # (S, n_boot): each seed's mean over the resampled examples
    seeds = rng.integers(0, S, (n_boot, S))
    boot = per_seed[seeds, np.arange(n_boot)[:, None]].mean(axis=1)
    two_stage = np.quantile(boot, 0.025) <= 0 <= np.quantile(boot, 0.975)

    grand = table.mean()
    ss_seed = n * ((table.mean(axis=1) - grand) ** 2).sum()
    ss_example = S * ((table.mean(axis=0) - grand) ** 2).sum()
    ss_residual = ((table - grand) ** 2).sum() - ss_seed - ss_example
    low, high, _, _ = seed_example_interval([grand], [S], [n], [ss_seed], [ss_example], [ss_residual], 0.95)
    return examples_only, two_stage, bool(low[0] <= 0 <= high[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-sets", type=int, default=400)
    p.add_argument("--examples", type=int, default=120)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--noise", type=float, default=0.05 * np.sqrt(2), help="per-example spread of a difference")
    args = p.parse_args()
    rng = np.random.default_rng(5)
    print(f"{args.data_sets} data sets of {args.examples} examples; coverage of 95% intervals (truth 0)")
    print(f"{'seeds':>5} {'seed_sd':>8} {'examples only':>14} {'two-stage boot':>15} {'seeds+examples':>15}")
    for n_seeds in (2, 3, 5, 10):
        for seed_sd in (0.0, 0.01, 0.05):
            hits = np.zeros(3)
            for _ in range(args.data_sets):
                table = rng.normal(0, args.noise, (n_seeds, args.examples)) + rng.normal(0, seed_sd, (n_seeds, 1))
                hits += covers(table, rng, args.n_boot)
            rates = hits / args.data_sets
            print(f"{n_seeds:>5} {seed_sd:>8} {rates[0]:>14.1%} {rates[1]:>15.1%} {rates[2]:>15.1%}")


if __name__ == "__main__":
    main()
