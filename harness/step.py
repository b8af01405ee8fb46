"""One optimizer step, the same function for training, the throughput benchmark and the
gradient tests: split the step's examples into this rank's micro-batches, lay them out,
count what the mode needs over the whole step, forward and backward with the mode's token
weights, clip, and update."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from harness import distributed
from harness.batching import Example, MicroBatch, collate, to_device
from harness.data_order import split_step
from harness.losses import per_example_sums, token_nll
from harness.reduction import StepCounts, micro_batch_loss, token_weights


@dataclass
class StepRecord:
    """What one step did, as tensors on the device where that avoids a host sync."""

    nll_sum: torch.Tensor  # this rank's summed token NLL (0-d, float64)
    objective: torch.Tensor  # this rank's share of the mode's objective (0-d, float64)
    counts: StepCounts  # N, B, G, W over the whole step
    grad_norm: torch.Tensor  # total gradient norm before clipping (0-d)
    clipped: torch.Tensor  # whether clipping rescaled the gradient (0-d bool)
    example_index: torch.Tensor  # this rank's examples, as indices into the training set
    example_weight: torch.Tensor  # the gradient weight each carried (its token weights, summed; float64)
    tokens: int  # all tokens of the step, padding excluded, over all ranks


def step_counts(batches: list[MicroBatch], world: distributed.World, device) -> StepCounts:
    """N and B over the whole step: this rank's micro-batches, summed over all ranks."""
    local_tokens = sum(e.target_tokens for b in batches for e in b.examples)
    local_seqs = sum(len(b.examples) for b in batches)
    tokens, seqs = distributed.all_reduce_sum([local_tokens, local_seqs], device)
    return StepCounts(tokens, seqs, len(batches), world.size)


def train_step(model, optimizer, scheduler, examples: list[Example], step: list[int], *, mode: str,
               loss_scale: float, max_grad_norm: float | None, grad_accum: int, world: distributed.World,
               layout: dict, device: torch.device, autocast_dtype: torch.dtype | None = None) -> StepRecord:
    """Train on the examples `step` indexes. `model` may be wrapped in DDP. Gradients are
    cleared first, so after the call `.grad` holds this step's (clipped) gradient.
    `scheduler` may be None; `max_grad_norm=None` measures the norm without clipping."""
    optimizer.zero_grad(set_to_none=True)
    micro = split_step(step, world.size, grad_accum, world.rank)
    batches = [collate([examples[i] for i in idx], **layout).to(device) for idx in micro]
    counts = step_counts(batches, world, device)
    ddp = isinstance(model, DistributedDataParallel)
    nll_sum = torch.zeros((), device=device, dtype=torch.float64)
    objective = torch.zeros((), device=device, dtype=torch.float64)
    weights_per_example = []
    for k, batch in enumerate(batches):
        last = k == len(batches) - 1
        with model.no_sync() if ddp and not last else nullcontext():  # DDP all-reduces on the last one
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                nll = token_nll(model, batch)
            weights = token_weights(mode, batch.target_mask, batch.seq_target_tokens, counts, loss_scale)
            loss = micro_batch_loss(nll, weights, counts.world_size)
            loss.backward()
        nll_sum += nll.detach().sum()
        objective += loss.detach() / counts.world_size
        weights_per_example.append(per_example_sums(weights, batch))

    limit = float("inf") if max_grad_norm is None else max_grad_norm
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return StepRecord(
        nll_sum=nll_sum, objective=objective, counts=counts, grad_norm=grad_norm, clipped=grad_norm > limit,
        example_index=to_device(torch.tensor([i for idx in micro for i in idx]), device),
        example_weight=torch.cat(weights_per_example),
        tokens=sum(examples[i].seq_len for idx in micro for i in idx) * world.size,
    )
