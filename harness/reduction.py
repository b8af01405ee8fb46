"""The loss reductions, defined once.

One optimizer step sees every micro-batch of the step on every rank. With

    l_t  the NLL of target token t          N    target tokens in the step
    B    sequences in the step              n_i  target tokens of sequence i
    n_m  target tokens of micro-batch m     G    micro-batches per rank (accumulation)
    W    ranks

each mode's objective is ``sum_t weight_t * l_t`` with the per-token weight below.
`token_weights` is the only place these formulas are written down; the training loop and
the gradient-weight accounting both call it.

    mean        1 / (G W n_m)   token mean per micro-batch, averaged over micro-batches and ranks
    sum         loss_scale      plain sum over the step (times a constant; `auto_loss_scale`)
    token_mean  1 / N           global token mean of the step
    seq_mean    1 / (B n_i)     every sequence weighs the same
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("mean", "sum", "token_mean", "seq_mean")


@dataclass(frozen=True)
class StepCounts:
    """Counts over the whole optimizer step (all micro-batches, all ranks)."""

    tokens: int  # N
    sequences: int  # B
    micro_batches_per_rank: int  # G
    world_size: int  # W


def token_weights(
    mode: str,
    target_mask: torch.Tensor,
    seq_target_tokens: torch.Tensor,
    counts: StepCounts,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """Weight of every token of one micro-batch in the step's objective.

    target_mask: bool, True where a token carries loss (its label is not -100).
    seq_target_tokens: for every token, n_i of the sequence it belongs to (0 where no sequence).
    Tokens that carry no loss get weight 0.
    """
    mask = target_mask.to(torch.float64)
    if mode == "mean":
        n_m = mask.sum().clamp(min=1)  # a tensor: no device sync
        weights = mask / (counts.micro_batches_per_rank * counts.world_size * n_m)
    elif mode == "sum":
        weights = mask * loss_scale
    elif mode == "token_mean":
        weights = mask / counts.tokens
    elif mode == "seq_mean":
        weights = mask / (counts.sequences * seq_target_tokens.clamp(min=1).to(torch.float64))
    else:
        raise ValueError(f"reduce_loss={mode!r} is not one of {', '.join(MODES)}")
    return weights


def micro_batch_loss(
    token_nll: torch.Tensor, weights: torch.Tensor, world_size: int
) -> torch.Tensor:
    """The scalar to call backward() on for one micro-batch.

    Gradients of all micro-batches of a rank add up; DDP then averages over ranks, so each
    rank's share is multiplied by W to leave exactly sum_t weight_t * grad(l_t).
    """
    return (weights.to(token_nll.dtype) * token_nll).sum() * world_size


def auto_loss_scale(target_tokens: list[int], steps: list[list[int]]) -> float:
    """`loss_scale=auto`: 1 / (mean target tokens per optimizer step over the training order).

    `target_tokens[i]` is n_i of training example i, `steps` the examples of every step (all
    ranks). It depends on the data and the seed only, so both runs of a pair get the same value,
    and `sum` then has `token_mean`'s scale on an average step: the two differ only in how steps
    with more or fewer tokens than average weigh."""
    tokens_per_step = sum(target_tokens[i] for step in steps for i in step) / len(steps)
    return 1.0 / tokens_per_step
