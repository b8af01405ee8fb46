"""Lay examples out as tensors: one padded row per example, or packed rows.

Every token carries `seq_index`, the position of its example in `MicroBatch.examples`
(-1 for padding), so losses can be attributed to examples in either layout. Attention
masks are not passed: rows are right-padded, so causal attention never reaches padding,
and in packed rows the position ids restart at every example, from which transformers
builds a block-diagonal (document) causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from harness.data.chat_format import IGNORE


@dataclass
class Example:
    example_id: str
    input_ids: list[int]
    targets: list[int]  # targets[t] is the label of token t+1; IGNORE where no loss

    @classmethod
    def from_labels(cls, example_id: str, input_ids: list[int], labels: list[int]) -> "Example":
        """From labels aligned with the inputs (labels[t] is token t, if it carries loss)."""
        return cls(example_id, list(input_ids), list(labels[1:]) + [IGNORE])

    @property
    def seq_len(self) -> int:
        return len(self.input_ids)

    @cached_property
    def target_tokens(self) -> int:
        return sum(t != IGNORE for t in self.targets)

    @cached_property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, targets) as tensors, made once and reused by every batch."""
        return torch.tensor(self.input_ids), torch.tensor(self.targets)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [rows, length]
    targets: torch.Tensor  # [rows, length], IGNORE where no loss
    position_ids: torch.Tensor  # [rows, length]
    seq_index: torch.Tensor  # [rows, length], -1 for padding
    target_index: torch.Tensor  # flat positions (in rows * length) of the tokens that carry loss
    examples: list[Example]
    packed: bool = False  # several examples per row: the model needs the position ids

    @property
    def target_mask(self) -> torch.Tensor:
        return self.targets != IGNORE

    def _map(self, fn) -> "MicroBatch":
        tensors = (self.input_ids, self.targets, self.position_ids, self.seq_index, self.target_index)
        return MicroBatch(*(fn(t) for t in tensors), self.examples, self.packed)

    def to(self, device) -> "MicroBatch":
        return self._map(lambda t: to_device(t, device))

    def pin(self) -> "MicroBatch":
        return self._map(torch.Tensor.pin_memory)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Copy without making the host wait for the GPU (from pinned memory)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _rows_to_batch(rows: list[list[int]], examples: list[Example], pad_id: int, packed: bool,
                   length: int | None = None) -> MicroBatch:
    length = length or max(sum(examples[i].seq_len for i in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    seq_index = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ex = examples[i]
            n = ex.seq_len
            input_ids[r, at : at + n], targets[r, at : at + n] = ex.tensors
            position_ids[r, at : at + n] = torch.arange(n)
            seq_index[r, at : at + n] = i
            at += n
        position_ids[r, at:] = torch.arange(length - at)  # padding: a segment of its own
    target_index = (targets.flatten() != IGNORE).nonzero().squeeze(1)
    return MicroBatch(input_ids, targets, position_ids, seq_index, target_index, examples, packed)


def pad(examples: list[Example], pad_id: int) -> MicroBatch:
    return _rows_to_batch([[i] for i in range(len(examples))], examples, pad_id, packed=False)


def pack_into_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """First-fit packing in the given order: which items go in which row; none is split."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > row_length:
            raise ValueError(f"an example has {n} tokens, more than the row length {row_length}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(row_length - n)
    return rows


def pack(examples: list[Example], row_length: int, pad_id: int, fixed_length: bool = False) -> MicroBatch:
    """Examples packed first-fit into rows; `fixed_length` pads every row to `row_length`
    (stable shapes for a compiled model)."""
    rows = pack_into_rows([ex.seq_len for ex in examples], row_length)
    return _rows_to_batch(rows, examples, pad_id, packed=True, length=row_length if fixed_length else None)


def collate(examples: list[Example], pad_id: int, packing: bool, row_length: int, fixed_length: bool = False) -> MicroBatch:
    return pack(examples, row_length, pad_id, fixed_length) if packing else pad(examples, pad_id)
