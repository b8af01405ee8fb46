"""The loss reductions, defined once.

One optimizer step sees every micro-batch of the step on every rank. With

    l_t  the NLL of target token t          N    target tokens in the step
    B    sequences in the step              n_i  target tokens of sequence i
    n_m  target tokens of micro-batch m     G    micro-batches per rank (accumulation)
    W    ranks

each mode's objective is ``sum_t weight_t * l_t`` with the per-token weight below.
`example_weights` is the only place these formulas are written down; the training step and
the gradient-weight accounting both call it.

    mean        1 / (G W n_m)   token mean per micro-batch, averaged over micro-batches and ranks
    sum         loss_scale      plain sum over the step (times a constant; `auto_loss_scale`)
    token_mean  1 / N           global token mean of the step
    seq_mean    1 / (B n_i)     every sequence weighs the same

Every weight is the same for all target tokens of one sequence, and depends on how the step
is split only through the counts. So the split that defines a mode (the recipe's G, W and
micro-batches: the *semantic* split) is given here as data, and the batches the GPU actually
runs (the *physical* split) can be anything: the gradient is the same.
"""

from __future__ import annotations

import torch

from harness.artifacts import MODES


def example_weights(mode: str, target_tokens: torch.Tensor, chunk: torch.Tensor, chunks: int,
                    loss_scale: float = 1.0) -> torch.Tensor:
    """Weight of each target token of every sequence of one optimizer step (float64, [B]).

    target_tokens: n_i of each sequence of the step.
    chunk: the semantic micro-batch (0 .. chunks-1) each sequence belongs to, over all ranks.
    chunks: G * W of the semantic split.
    """
    n = target_tokens.to(torch.float64)
    if mode == "mean":
        n_m = torch.zeros(chunks, dtype=torch.float64).index_add_(0, chunk, n)
        return 1.0 / (chunks * n_m[chunk].clamp(min=1))
    if mode == "sum":
        return torch.full_like(n, float(loss_scale))
    if mode == "token_mean":
        return torch.full_like(n, 1.0 / max(float(n.sum()), 1.0))
    if mode == "seq_mean":
        return 1.0 / (len(n) * n.clamp(min=1))
    raise ValueError(f"reduce_loss={mode!r} is not one of {', '.join(MODES)}")


def token_weights(sequence_weights: torch.Tensor, seq_index: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Spread per-sequence weights onto the tokens of a micro-batch: `seq_index` says which
    sequence each token belongs to (-1 for padding); tokens without a target weigh 0."""
    padded = torch.cat([sequence_weights.new_zeros(1), sequence_weights])
    return padded[seq_index + 1] * target_mask


def micro_batch_loss(token_nll: torch.Tensor, weights: torch.Tensor, world_size: int) -> torch.Tensor:
    """The scalar to call backward() on for one micro-batch.

    Gradients of all micro-batches of a rank add up; DDP then averages over ranks, so each
    rank's share is multiplied by W (the real number of ranks) to leave exactly
    sum_t weight_t * grad(l_t).
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
