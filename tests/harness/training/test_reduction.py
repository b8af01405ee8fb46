"""Gradients of every reduction mode against its formula, written out here, per example.

The reference computes each example's token NLLs alone (no padding, no packing), then
weights them as the README's table says; the harness path (`train_step`: plan_step, run_step) batches, pads or
packs, splits across micro-batches and ranks, and uses harness.training.reduction.
"""

import pytest
import torch
import torch.multiprocessing as mp

from harness.training.reduction import MODES, auto_loss_scale
from tests.helpers.gradients import (EQUAL, LOSS_SCALE, TOL, TWO_RANK_LAYOUTS, UNEQUAL, chunks_of, formula_grad,
                                     harness_grad, two_rank_worker)
from tests.helpers.models import make_examples, rel_err


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grad_accum", [1, 4])
@pytest.mark.parametrize("packing", [False, True])
def test_gradient_matches_formula(mode, grad_accum, packing):
    examples = make_examples(UNEQUAL)
    expected = formula_grad(examples, mode, chunks_of(len(examples), grad_accum))
    got = harness_grad(examples, mode, grad_accum, packing)
    assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("mode", ["sum", "token_mean", "seq_mean"])
def test_split_does_not_change_gradient(mode):
    examples = make_examples(UNEQUAL)
    one = harness_grad(examples, mode, 1)
    assert rel_err(harness_grad(examples, mode, 4), one) <= TOL
    assert rel_err(harness_grad(examples, mode, 4, packing=True), one) <= TOL


def test_mean_depends_on_the_split_on_unequal_lengths():
    examples = make_examples(UNEQUAL)
    g1, g4 = harness_grad(examples, "mean", 1), harness_grad(examples, "mean", 4)
    assert rel_err(g4, g1) > 1e-2
    assert rel_err(g1, formula_grad(examples, "mean", chunks_of(8, 1))) <= TOL
    assert rel_err(g4, formula_grad(examples, "mean", chunks_of(8, 4))) <= TOL


def test_sum_is_mean_times_token_count_on_equal_lengths():
    examples = make_examples(EQUAL)
    N = sum(e.target_tokens for e in examples)
    for g in (1, 4):
        mean, total = harness_grad(examples, "mean", g), harness_grad(examples, "sum", g)
        assert rel_err(total, LOSS_SCALE * N * mean) <= TOL


def test_sum_and_mean_differ_as_formulas_say_on_unequal_lengths():
    examples = make_examples(UNEQUAL)
    N = sum(e.target_tokens for e in examples)
    mean, total = harness_grad(examples, "mean", 4), harness_grad(examples, "sum", 4)
    assert rel_err(total, LOSS_SCALE * N * mean) > 1e-2
    assert rel_err(total, formula_grad(examples, "sum", [])) <= TOL
    assert rel_err(mean, formula_grad(examples, "mean", chunks_of(8, 4))) <= TOL


def test_seq_mean_and_token_mean_differ_on_unequal_lengths():
    examples = make_examples(UNEQUAL)
    assert rel_err(harness_grad(examples, "seq_mean", 1), harness_grad(examples, "token_mean", 1)) > 1e-2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grad_accum, semantic_world", [(8, 1), (1, 8), (2, 4), (4, 1)])
def test_physical_batches_other_than_the_semantic_split_give_its_gradient(mode, grad_accum, semantic_world):
    """The semantic split (G micro-batches on W ranks; (8, 1) and (1, 8) put one sequence in
    each, the regime where mean weighs every sequence alike) defines the weights; the one
    process running it packs its sequences into 80-token rows instead. Same gradient as the
    formula for the semantic split run literally, also for a semantic W larger than 1."""
    examples = make_examples(UNEQUAL)
    got = harness_grad(examples, mode, grad_accum, semantic_world=semantic_world, tokens_per_micro_batch=80)
    assert rel_err(got, formula_grad(examples, mode, chunks_of(len(examples), grad_accum * semantic_world))) <= TOL


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packing", [False, True])
def test_chunked_loss_gives_the_plain_gradient(mode, packing):
    examples = make_examples(UNEQUAL)
    plain = harness_grad(examples, mode, 2, packing)
    for chunk in (7, 64, 4096):
        assert rel_err(harness_grad(examples, mode, 2, packing, chunk_tokens=chunk), plain) <= TOL, chunk
    assert rel_err(plain, formula_grad(examples, mode, chunks_of(8, 2))) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_compiled_chunk_functions_give_the_formula_gradient(mode):
    examples = make_examples(UNEQUAL)  # chunks of 7 target tokens: the last one of a micro-batch is shorter
    got = harness_grad(examples, mode, 2, True, chunk_tokens=7, compiled_loss=True)
    assert rel_err(got, formula_grad(examples, mode, chunks_of(8, 2))) <= TOL


def test_the_semantic_split_decides_the_mean_gradient_not_the_physical_one():
    examples = make_examples(UNEQUAL)
    one_seq = harness_grad(examples, "mean", 8, tokens_per_micro_batch=128)  # 1 sequence per micro-batch
    whole = harness_grad(examples, "mean", 1, tokens_per_micro_batch=128)  # same rows on the device
    assert rel_err(one_seq, whole) > 1e-2
    assert rel_err(one_seq, formula_grad(examples, "seq_mean", [])) <= TOL  # mean, 1 seq/micro-batch == seq_mean


@pytest.mark.slow
def test_two_ranks_with_gloo_match_formula(tmp_path):
    out = str(tmp_path / "grads")
    mp.spawn(two_rank_worker, args=("gloo", str(tmp_path / "init"), out), nprocs=2, join=True)
    per_rank = [torch.load(f"{out}.{r}") for r in range(2)]
    examples = make_examples(UNEQUAL)
    for (mode, layout), got in per_rank[0].items():
        chunks = TWO_RANK_LAYOUTS[layout][-1]
        assert torch.equal(got, per_rank[1][(mode, layout)])  # DDP leaves both ranks the same gradient
        assert rel_err(got, formula_grad(examples, mode, chunks_of(8, chunks))) <= TOL, (mode, layout)
        assert rel_err(got, harness_grad(examples, mode, chunks)) <= TOL, (mode, layout)


def test_auto_loss_scale_is_one_over_mean_target_tokens_per_step():
    target_tokens = [10, 20, 30, 40]
    steps = [[0, 1], [2, 3], [0, 3]]  # N = 30, 70, 50: mean 50
    assert auto_loss_scale(target_tokens, steps) == pytest.approx(1 / 50)
