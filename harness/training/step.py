"""One optimizer step, the same code for training, the throughput benchmark and the gradient
tests.

A step is planned on the host (`plan_step`): its sequences get the token weights of the
*semantic* split that defines the mode (harness/training/reduction.py), and this rank's sequences are
laid out in *physical* micro-batches, which need not be the semantic ones (rows sized in
tokens for speed, see `Split`). Then `run_step` does forward and backward with those
weights, clips and updates. `train_step` is both in one call.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from itertools import combinations

import torch
from torch.nn.parallel import DistributedDataParallel

from harness import distributed
from harness.data.batching import Example, MicroBatch, collate, pack_into_rows, to_device
from harness.data.data_order import split_step
from harness.training.losses import position_ids_of
from harness.training.reduction import example_weights, token_weights


@dataclass(frozen=True)
class Split:
    """How a step's sequences are split.

    Semantic (defines the mode's weights): `grad_accum` micro-batches per rank on
    `world_size` ranks (None: the real number of ranks), equal numbers of sequences each.
    Physical (what runs): with `tokens_per_micro_batch`, this rank's sequences are packed into
    rows of exactly that many tokens (or of the shortest of `shorter_rows` that holds them),
    one row per micro-batch; otherwise the semantic micro-batches run as they are, padded or
    packed as `layout` says."""

    grad_accum: int
    world_size: int | None = None
    tokens_per_micro_batch: int | None = None
    # With tokens_per_micro_batch: the shorter row lengths a row may be cut to, when its
    # sequences fit (fewer padding tokens; each length is one more shape to compile).
    shorter_rows: tuple[int, ...] = ()

    @property
    def row_lengths(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.shorter_rows) | {self.tokens_per_micro_batch}))

    def semantic_world(self, world: distributed.World) -> int:
        return self.world_size or world.size


@dataclass
class StepPlan:
    """Everything the device needs for one step, built on the host (in a background thread
    while the previous step runs) so the step itself never waits for the host."""

    batches: list[MicroBatch]  # this rank's physical micro-batches
    token_weights: list[torch.Tensor]  # the mode's weight of every token of each micro-batch
    example_index: torch.Tensor  # this rank's sequences, as indices into the training set
    example_weight: torch.Tensor  # the gradient weight each carries (its token weights, summed; float64)
    target_tokens: int  # N over the whole step
    tokens: int  # all tokens of the step, padding excluded, over all ranks
    row_tokens: int = 0  # this rank's micro-batch tokens as run, padding included
    real_tokens: int = 0  # this rank's tokens, padding excluded

    def pin(self) -> "StepPlan":
        """Page-locked copies, so copies to the GPU run without blocking the host."""
        self.batches = [b.pin() for b in self.batches]
        self.token_weights = [t.pin_memory() for t in self.token_weights]
        self.example_index, self.example_weight = self.example_index.pin_memory(), self.example_weight.pin_memory()
        return self


@dataclass
class StepRecord:
    """What one step did, as tensors on the device where that avoids a host sync."""

    nll_sum: torch.Tensor  # this rank's summed token NLL (0-d, float64)
    objective: torch.Tensor  # this rank's share of the mode's objective (0-d, float64)
    target_tokens: int  # N over the whole step
    grad_norm: torch.Tensor  # total gradient norm before clipping (0-d)
    clipped: torch.Tensor  # whether clipping rescaled the gradient (0-d bool)
    example_index: torch.Tensor  # this rank's sequences, as indices into the training set
    example_weight: torch.Tensor  # the gradient weight each carried (its token weights, summed; float64)
    tokens: int  # all tokens of the step, padding excluded, over all ranks
    row_tokens: int = 0  # this rank's micro-batch tokens as run, padding included
    real_tokens: int = 0  # this rank's tokens, padding excluded


def plan_step(examples: list[Example], step: list[int], *, mode: str, loss_scale: float, split: Split,
              world: distributed.World, layout: dict) -> StepPlan:
    """Weights of the step's sequences and this rank's micro-batches (host work only: no sync)."""
    semantic_world = split.semantic_world(world)
    chunks = split.grad_accum * semantic_world
    semantic = split_step(list(range(len(step))), 1, chunks, 0)  # every rank's chunks, in order
    chunk_of = torch.tensor([c for c, chunk in enumerate(semantic) for _ in chunk])
    n = torch.tensor([examples[i].target_tokens for i in step])
    weights = example_weights(mode, n, chunk_of, chunks, loss_scale)

    if chunks % world.size:
        raise ValueError(f"grad_accum*world_size={chunks} of the semantic split is not a multiple of the "
                         f"{world.size} ranks running it")
    per_rank = chunks // world.size
    mine = semantic[world.rank * per_rank : (world.rank + 1) * per_rank]
    if split.tokens_per_micro_batch is None:
        positions = mine
        batches = [collate([examples[step[p]] for p in chunk], **layout) for chunk in positions]
    else:
        flat = [p for chunk in mine for p in chunk]
        rows = pack_into_rows([examples[step[p]].seq_len for p in flat], split.tokens_per_micro_batch)
        positions = [[flat[k] for k in row] for row in rows]
        lengths = split.row_lengths
        batches = [collate([examples[step[p]] for p in row], layout["pad_id"], packing=True, fixed_length=True,
                           row_length=fitting_length(sum(examples[step[p]].seq_len for p in row), lengths))
                   for row in positions]
    mine_flat = torch.tensor([p for chunk in positions for p in chunk])
    real = sum(examples[step[p]].seq_len for chunk in positions for p in chunk)
    return StepPlan(
        batches=batches,
        token_weights=[token_weights(weights[torch.tensor(chunk)], b.seq_index, b.target_mask)
                       for chunk, b in zip(positions, batches)],
        example_index=torch.tensor(step)[mine_flat],
        example_weight=weights[mine_flat] * n[mine_flat],
        target_tokens=int(n.sum()),
        tokens=sum(examples[i].seq_len for i in step),
        row_tokens=sum(b.input_ids.numel() for b in batches),
        real_tokens=real,
    )


ROW_FILL_TARGET = 0.9  # `auto` rows: at least this share of a step's row tokens are real tokens, where it can
ROW_GRANULE = 256  # `auto` row lengths are multiples of this (FlexAttention works in blocks of 128)
ROW_STEPS = 8  # `auto`: a row shorter than the longest is cut to a multiple of 1/ROW_STEPS of it ...
MAX_SHORT_ROWS = 3  # ... of at most this many lengths (with the longest: at most 4 shapes to compile), by default
PLANNED_STEPS = 64  # `auto` sizes rows on this many steps of a training order (host time stays ~1 s)


@dataclass(frozen=True)
class RowChoice:
    lengths: tuple[int, ...]  # the row lengths a step may use, ascending; the last is the longest
    fill: float  # real tokens / row tokens over the planned steps and ranks
    rows_per_step: tuple[int, ...]  # the distinct numbers of rows a rank runs per step

    @property
    def tokens(self) -> int:
        return self.lengths[-1]


def rank_lengths(examples: list[Example], step: list[int], split: Split, world_size: int) -> list[list[int]]:
    """The sequence lengths each of `world_size` ranks packs for `step`, in plan_step's order."""
    chunks = split.grad_accum * (split.world_size or world_size)
    semantic = split_step(list(range(len(step))), 1, chunks, 0)
    per_rank = chunks // world_size
    return [[examples[step[p]].seq_len for chunk in semantic[r * per_rank : (r + 1) * per_rank] for p in chunk]
            for r in range(world_size)]


def fitting_length(content: int, lengths: tuple[int, ...]) -> int:
    """The shortest of the row lengths (ascending) that holds `content` tokens."""
    return next(n for n in lengths if n >= content)


def _try_rows(lengths: list[list[int]], longest: int, granule: int, short_rows: int) -> RowChoice:
    """Rows of `longest` tokens, each cut to the shortest length that holds it out of `longest`
    and at most `short_rows` multiples of longest/ROW_STEPS, those that leave the least padding."""
    part = -(-longest // ROW_STEPS // granule) * granule
    grid = sorted({k * part for k in range(1, ROW_STEPS)} - set(range(longest, ROW_STEPS * part + 1)))
    contents, rows_per_step = [], set()
    for ls in lengths:
        rows = pack_into_rows(ls, longest)
        rows_per_step.add(len(rows))
        contents += [sum(ls[i] for i in row) for row in rows]
    real = sum(contents)
    best = None
    for k in range(min(short_rows, len(grid)) + 1):
        for shorter in combinations(grid, k):
            allowed = (*shorter, longest)
            run = sum(fitting_length(c, allowed) for c in contents)
            if best is None or run < best[0]:
                best = (run, allowed)
    run, allowed = best
    used = tuple(n for n in allowed if any(fitting_length(c, allowed) == n for c in contents) or n == longest)
    return RowChoice(used, real / run, tuple(sorted(rows_per_step)))


def choose_rows(examples: list[Example], steps: list[list[int]], split: Split, world_size: int, *,
                longest: int, most: int, granule: int = ROW_GRANULE, short_rows: int = MAX_SHORT_ROWS) -> RowChoice:
    """`trainer.tokens_per_micro_batch=auto`, from the first PLANNED_STEPS steps' sequences as each
    rank packs them (first fit, in order, as plan_step does): rows of a few lengths, at most
    1 + `short_rows` (a compiled model compiles once per length, in the first steps). The
    longest row is the longest multiple of `granule` from `longest` (the longest example,
    which must fit a row) to `most` tokens whose rows are at least ROW_FILL_TARGET full on
    average; if none is, the fullest. Longer rows run faster on a GPU (fewer, larger kernels);
    the shorter lengths keep a step's last row from being mostly padding. Depends only on the
    data, its order and the split: equal for every mode of a pair."""
    lengths = [ls for step in steps[:PLANNED_STEPS] for ls in rank_lengths(examples, step, split, world_size)]
    low = -(-longest // granule) * granule
    high = max(low, min(most, -(-max(map(sum, lengths)) // granule) * granule))
    choices = [_try_rows(lengths, n, granule, short_rows) for n in range(low, high + 1, granule)]
    full = [c for c in choices if c.fill >= ROW_FILL_TARGET]
    return max(full, key=lambda c: c.tokens) if full else max(choices, key=lambda c: (c.fill, c.tokens))


def run_step(model, optimizer, scheduler, plan: StepPlan, *, max_grad_norm: float | None,
             world: distributed.World, device: torch.device, autocast_dtype: torch.dtype | None = None) -> StepRecord:
    """Forward and backward over this rank's micro-batches, clip, update. `model` is a
    harness.training.losses.CausalLMLoss, possibly wrapped in DDP or compiled. Gradients are cleared
    first, so after the call `.grad` holds this step's (clipped) gradient. `scheduler` may be
    None; `max_grad_norm=None` measures the norm without clipping. No host-device sync."""
    optimizer.zero_grad(set_to_none=True)
    ddp = isinstance(model, DistributedDataParallel)
    nll_sum = torch.zeros((), device=device, dtype=torch.float64)
    objective = torch.zeros((), device=device, dtype=torch.float64)
    for k, (host_batch, host_weights) in enumerate(zip(plan.batches, plan.token_weights)):
        batch, weights = host_batch.to(device), to_device(host_weights, device)
        last = k == len(plan.batches) - 1
        with model.no_sync() if ddp and not last else nullcontext():  # DDP all-reduces on the last one
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                loss, nll = model(batch.input_ids, position_ids_of(batch), batch.targets, weights, batch.target_index)
            # DDP averages gradients over ranks; W times each rank's share leaves the sum.
            (loss * world.size).backward()
        nll_sum += nll.sum()
        objective += loss.detach()

    limit = float("inf") if max_grad_norm is None else max_grad_norm
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return StepRecord(nll_sum=nll_sum, objective=objective, target_tokens=plan.target_tokens, grad_norm=grad_norm,
                      clipped=grad_norm > limit, example_index=to_device(plan.example_index, device),
                      example_weight=to_device(plan.example_weight, device), tokens=plan.tokens,
                      row_tokens=plan.row_tokens, real_tokens=plan.real_tokens)


def train_step(model, optimizer, scheduler, examples: list[Example], step: list[int], *, mode: str,
               loss_scale: float, split: Split, max_grad_norm: float | None, world: distributed.World,
               layout: dict, device: torch.device, autocast_dtype: torch.dtype | None = None) -> StepRecord:
    """`plan_step` then `run_step`: one whole optimizer step on the examples `step` indexes."""
    plan = plan_step(examples, step, mode=mode, loss_scale=loss_scale, split=split, world=world, layout=layout)
    return run_step(model, optimizer, scheduler, plan, max_grad_norm=max_grad_norm, world=world, device=device,
                    autocast_dtype=autocast_dtype)
