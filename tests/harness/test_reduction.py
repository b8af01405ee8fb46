"""Gradients of every reduction mode against its formula, written out here, per example.

The reference computes each example's token NLLs alone (no padding, no packing), then
weights them as the README's table says; the harness path batches, pads or packs, splits
across micro-batches and ranks, and uses harness.reduction.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from harness.batching import collate
from harness.chat_format import IGNORE
from harness.distributed import World
from harness.reduction import MODES
from harness.schedule import split_step
from harness.train import accumulate_gradients, step_counts
from tests.conftest import flat_grad, make_examples, rel_err, tiny_model

UNEQUAL = [5, 9, 17, 33, 12, 60, 7, 25]
EQUAL = [20] * 8
LOSS_SCALE = 0.37
TOL = 1e-6


def example_nll(model, ex) -> torch.Tensor:
    """NLL of each target token of one example, computed on the example alone."""
    logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
    targets = torch.tensor(ex.targets)
    keep = targets != IGNORE
    return F.cross_entropy(logits[keep], targets[keep], reduction="none")


def formula_objective(model, examples, mode: str, chunks: list[list[int]]) -> torch.Tensor:
    """The step objective of README's table, from per-example NLLs.

    chunks: the step's micro-batches over all ranks (G*W of them), as example indices."""
    nll = [example_nll(model, ex) for ex in examples]
    n = [len(x) for x in nll]
    N, B, GW = sum(n), len(examples), len(chunks)
    if mode == "mean":  # token weight 1/(G W n_m)
        return sum(sum(nll[i].sum() for i in c) / sum(n[i] for i in c) for c in chunks) / GW
    if mode == "sum":  # token weight loss_scale
        return LOSS_SCALE * sum(x.sum() for x in nll)
    if mode == "token_mean":  # token weight 1/N
        return sum(x.sum() for x in nll) / N
    if mode == "seq_mean":  # token weight 1/(B n_i)
        return sum(x.sum() / len(x) for x in nll) / B
    raise AssertionError(mode)


def formula_grad(examples, mode, chunks) -> torch.Tensor:
    model = tiny_model()
    formula_objective(model, examples, mode, chunks).backward()
    return flat_grad(model)


def harness_grad(examples, mode, grad_accum, packing=False, world: World = World(), device="cpu") -> torch.Tensor:
    """The gradient the harness leaves after one step, on this rank (DDP when world.size > 1)."""
    device = torch.device(device)
    model = tiny_model().to(device)
    wrapped = model
    if world.size > 1:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    micro = split_step(list(range(len(examples))), world.size, grad_accum, world.rank)
    batches = [collate([examples[i] for i in idx], pad_id=0, packing=packing, row_length=128).to(device)
               for idx in micro]
    counts = step_counts(batches, world, device)
    accumulate_gradients(wrapped, batches, counts, mode, LOSS_SCALE)
    return flat_grad(model).cpu()


def chunks_of(n: int, parts: int) -> list[list[int]]:
    size = n // parts
    return [list(range(c * size, (c + 1) * size)) for c in range(parts)]


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


def two_rank_worker(rank: int, backend: str, init_file: str, out: str) -> None:
    """One of two ranks (gloo on CPUs, nccl on GPUs): every mode's gradient with G=2 per rank."""
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    examples = make_examples(UNEQUAL)
    grads = {(mode, packing): harness_grad(examples, mode, 2, packing, World(rank, 2, rank), device)
             for mode in MODES for packing in (False, True)}
    torch.save(grads, f"{out}.{rank}")
    dist.destroy_process_group()


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
