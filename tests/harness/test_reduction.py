"""Gradients of every reduction mode against its formula, written out here, per example.

The reference computes each example's token NLLs alone (no padding, no packing), then
weights them as the README's table says; the harness path (`train_step`) batches, pads or
packs, splits across micro-batches and ranks, and uses harness.reduction.
"""

import pytest
import torch
import torch.multiprocessing as mp

from harness.reduction import MODES, auto_loss_scale
from tests.helpers.gradients import (EQUAL, LOSS_SCALE, TOL, UNEQUAL, chunks_of, formula_grad, harness_grad,
                                     two_rank_worker)
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


@pytest.mark.slow
def test_two_ranks_with_gloo_match_formula(tmp_path):
    out = str(tmp_path / "grads")
    mp.spawn(two_rank_worker, args=("gloo", str(tmp_path / "init"), out), nprocs=2, join=True)
    per_rank = [torch.load(f"{out}.{r}") for r in range(2)]
    examples = make_examples(UNEQUAL)
    for (mode, packing), got in per_rank[0].items():
        assert torch.equal(got, per_rank[1][(mode, packing)])  # DDP leaves both ranks the same gradient
        assert rel_err(got, formula_grad(examples, mode, chunks_of(8, 4))) <= TOL, (mode, packing)
        assert rel_err(got, harness_grad(examples, mode, 4)) <= TOL, (mode, packing)


def test_auto_loss_scale_is_one_over_mean_target_tokens_per_step():
    target_tokens = [10, 20, 30, 40]
    steps = [[0, 1], [2, 3], [0, 3]]  # N = 30, 70, 50: mean 50
    assert auto_loss_scale(target_tokens, steps) == pytest.approx(1 / 50)
