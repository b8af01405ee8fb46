import pytest
import torch

from harness.data.batching import collate, pack, pad
from harness.data.chat_format import IGNORE
from tests.helpers.models import make_examples

LENGTHS = [5, 9, 17, 33, 12]


def test_padding_gives_one_row_per_example_and_marks_padding():
    examples = make_examples(LENGTHS)
    batch = pad(examples, pad_id=0)
    assert batch.input_ids.shape == (5, 33) and not batch.packed
    for r, ex in enumerate(examples):
        assert batch.input_ids[r, : ex.seq_len].tolist() == ex.input_ids
        assert (batch.seq_index[r, : ex.seq_len] == r).all() and (batch.seq_index[r, ex.seq_len :] == -1).all()
        assert (batch.targets[r, ex.seq_len :] == IGNORE).all()


def test_packing_is_first_fit_keeps_examples_whole_and_restarts_positions():
    examples = make_examples(LENGTHS)
    batch = pack(examples, row_length=40, pad_id=0)
    # first fit into 40-token rows: 5+9+17 = 31; 33 opens row 2; 12 fits in neither (9 and 7 left)
    rows = [sorted(set(batch.seq_index[r].tolist()) - {-1}) for r in range(batch.input_ids.shape[0])]
    assert rows == [[0, 1, 2], [3], [4]] and batch.packed
    at = 0
    for i in rows[0]:
        n = examples[i].seq_len
        assert batch.position_ids[0, at : at + n].tolist() == list(range(n))
        assert batch.input_ids[0, at : at + n].tolist() == examples[i].input_ids
        at += n
    assert int(batch.target_mask.sum()) == sum(e.target_tokens for e in examples)


def test_packing_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="33 tokens, more than the row length 20"):
        pack(make_examples([5, 33]), row_length=20, pad_id=0)


def test_collate_chooses_the_layout():
    examples = make_examples(LENGTHS)
    assert torch.equal(collate(examples, 0, packing=False, row_length=64).input_ids, pad(examples, 0).input_ids)
    assert collate(examples, 0, packing=True, row_length=64).input_ids.shape[0] == 2


def test_fixed_length_rows_have_one_shape_whatever_they_hold():
    batch = collate(make_examples(LENGTHS), 0, packing=True, row_length=64, fixed_length=True)
    assert batch.input_ids.shape == (2, 64)  # 5+9+17+33 fill row 1; 12 tokens in row 2
    assert (batch.seq_index[1, :12] == 4).all() and (batch.seq_index[1, 12:] == -1).all()
