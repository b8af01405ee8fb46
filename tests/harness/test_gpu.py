"""The gradient checks again on CUDA (float64), one GPU and two GPUs with NCCL."""

import pytest
import torch
import torch.multiprocessing as mp

from harness.reduction import MODES
from tests.helpers.gradients import TOL, UNEQUAL, chunks_of, formula_grad, harness_grad, two_rank_worker
from tests.helpers.models import make_examples, rel_err


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packing", [False, True])
def test_cuda_gradient_matches_formula(mode, packing):
    examples = make_examples(UNEQUAL)
    got = harness_grad(examples, mode, 4, packing, device="cuda")
    assert rel_err(got, formula_grad(examples, mode, chunks_of(8, 4))) <= TOL


@pytest.mark.multigpu
def test_two_gpus_with_nccl_match_formula(tmp_path):
    out = str(tmp_path / "grads")
    mp.spawn(two_rank_worker, args=("nccl", str(tmp_path / "init"), out), nprocs=2, join=True)
    examples = make_examples(UNEQUAL)
    for (mode, packing), got in torch.load(f"{out}.0").items():
        assert rel_err(got, formula_grad(examples, mode, chunks_of(8, 4))) <= TOL, (mode, packing)
