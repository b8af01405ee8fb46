"""Which examples each optimizer step trains on, and how a step is split.

The order depends only on the seed and the number of training examples, never on the
reduction, so the runs of a pair see the same examples in the same order.
"""

from __future__ import annotations

import torch


def training_order(num_examples: int, batch_size: int, max_steps: int, seed: int) -> list[list[int]]:
    """Example indices of every step: a fresh permutation each epoch, `batch_size` per step."""
    generator = torch.Generator().manual_seed(seed)
    needed = batch_size * max_steps
    order: list[int] = []
    while len(order) < needed:
        order += torch.randperm(num_examples, generator=generator).tolist()
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(max_steps)]


def split_step(step: list[int], world_size: int, grad_accum: int, rank: int) -> list[list[int]]:
    """The micro-batches of `rank`: the step's examples in G*W consecutive, equal chunks,
    rank r taking chunks r*G ... r*G+G-1 (so W=2, G=2 sees the chunks of W=1, G=4)."""
    chunks = world_size * grad_accum
    size = len(step) // chunks
    if size == 0 or size * chunks != len(step):
        raise ValueError(
            f"trainer.batch_size={len(step)} must be a positive multiple of "
            f"grad_accum*world_size={grad_accum}*{world_size}={chunks}"
        )
    mine = range(rank * grad_accum, (rank + 1) * grad_accum)
    return [step[c * size : (c + 1) * size] for c in mine]
