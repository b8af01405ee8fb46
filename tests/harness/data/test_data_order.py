import pytest

from harness.data.data_order import split_step, training_order


def test_each_epoch_is_a_permutation_and_the_order_depends_on_the_seed_only():
    steps = training_order(num_examples=12, batch_size=4, max_steps=6, seed=3)
    flat = [i for s in steps for i in s]
    assert [len(s) for s in steps] == [4] * 6
    assert sorted(flat[:12]) == list(range(12)) and sorted(flat[12:]) == list(range(12))
    assert steps == training_order(12, 4, 6, seed=3)
    assert steps != training_order(12, 4, 6, seed=4)


def test_ranks_take_consecutive_chunks_so_w2_g2_sees_the_chunks_of_w1_g4():
    step = list(range(8))
    one_rank = split_step(step, world_size=1, grad_accum=4, rank=0)
    assert one_rank == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert split_step(step, 2, 2, 0) + split_step(step, 2, 2, 1) == one_rank


@pytest.mark.parametrize("size", [6, 3])
def test_a_step_that_does_not_split_evenly_is_refused(size):
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        split_step(list(range(size)), world_size=1, grad_accum=4, rank=0)
