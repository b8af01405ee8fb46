"""Per-token NLL, computed here rather than taken from `outputs.loss` (a scalar mean)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.batching import MicroBatch
from harness.chat_format import IGNORE


def token_nll(model, batch: MicroBatch) -> torch.Tensor:
    """NLL of every token's target, shape [rows, length]; 0 where there is no target."""
    # Unpacked rows are right-padded, so the default positions and causal mask are exact; packed
    # rows pass position ids that restart per example, from which the document mask is built.
    position_ids = batch.position_ids if batch.packed else None
    logits = model(input_ids=batch.input_ids, position_ids=position_ids, use_cache=False).logits
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return nll.view_as(batch.targets)


def per_example_sums(values: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
    """Sum of `values` over each example's tokens, shape [len(batch.examples)]."""
    sums = torch.zeros(len(batch.examples) + 1, dtype=values.dtype, device=values.device)
    sums.index_add_(0, (batch.seq_index + 1).flatten(), values.flatten())
    return sums[1:]
