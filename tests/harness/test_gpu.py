"""The gradient checks again on CUDA (float64), one GPU and two GPUs with NCCL."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from harness.batching import collate
from harness.distributed import World
from harness.reduction import MODES
from harness.schedule import split_step
from harness.train import accumulate_gradients, step_counts
from tests.conftest import flat_grad, make_examples, rel_err, tiny_model
from tests.harness.test_reduction import LOSS_SCALE, TOL, UNEQUAL, chunks_of, formula_grad


def cuda_grad(examples, mode, world: World, grad_accum: int, packing: bool, device) -> torch.Tensor:
    model = tiny_model().to(device)
    wrapped = DistributedDataParallel(model, device_ids=[device.index]) if world.size > 1 else model
    micro = split_step(list(range(len(examples))), world.size, grad_accum, world.rank)
    batches = [collate([examples[i] for i in idx], pad_id=0, packing=packing, row_length=128).to(device)
               for idx in micro]
    counts = step_counts(batches, world, device)
    accumulate_gradients(wrapped, batches, counts, mode, LOSS_SCALE)
    return flat_grad(model).cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packing", [False, True])
def test_cuda_gradient_matches_formula(mode, packing):
    examples = make_examples(UNEQUAL)
    got = cuda_grad(examples, mode, World(), 4, packing, torch.device("cuda", 0))
    assert rel_err(got, formula_grad(examples, mode, chunks_of(8, 4))) <= TOL


def _nccl_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    examples = make_examples(UNEQUAL)
    grads = {(m, p): cuda_grad(examples, m, World(rank, 2, rank), 2, p, device) for m in MODES for p in (False, True)}
    torch.save(grads, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.multigpu
def test_two_gpus_with_nccl_match_formula(tmp_path):
    out = str(tmp_path / "grads")
    mp.spawn(_nccl_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    examples = make_examples(UNEQUAL)
    for (mode, packing), got in torch.load(f"{out}.0").items():
        assert rel_err(got, formula_grad(examples, mode, chunks_of(8, 4))) <= TOL, (mode, packing)
