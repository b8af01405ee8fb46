"""Each mode's step gradient two ways: from README's formula written out per example
(`formula_grad`), and from the harness's own `train_step` (`harness_grad`)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from harness.data.chat_format import IGNORE
from harness.distributed import World
from harness.training.losses import CausalLMLoss
from harness.training.reduction import MODES
from harness.training.step import Split, train_step
from tests.helpers.models import flat_grad, make_examples, tiny_model

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


def harness_grad(examples, mode, grad_accum, packing=False, world: World = World(), device="cpu",
                 semantic_world: int | None = None, tokens_per_micro_batch: int | None = None,
                 chunk_tokens: int | None = None, compiled_loss: bool = False,
                 shorter_rows: tuple[int, ...] = ()) -> torch.Tensor:
    """The gradient `train_step` leaves after one step on this rank (DDP when world.size > 1).
    No clipping, and a zero learning rate, so `.grad` is the objective's gradient.
    `semantic_world`/`tokens_per_micro_batch`: a semantic split other than the physical one
    (`shorter_rows`: the shorter lengths its rows may be cut to);
    `chunk_tokens`: the chunked loss path; `compiled_loss`: its per-chunk functions compiled."""
    device = torch.device(device)
    model = tiny_model().to(device)
    wrapped = CausalLMLoss(model, chunk_tokens)
    wrapped.compiled = compiled_loss
    if world.size > 1:
        wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    train_step(wrapped, optimizer, None, examples, list(range(len(examples))), mode=mode, loss_scale=LOSS_SCALE,
               split=Split(grad_accum, semantic_world, tokens_per_micro_batch, shorter_rows), max_grad_norm=None, world=world,
               device=device, layout=dict(pad_id=0, packing=packing, row_length=128))
    return flat_grad(model).cpu()


def chunks_of(n: int, parts: int) -> list[list[int]]:
    size = n // parts
    return [list(range(c * size, (c + 1) * size)) for c in range(parts)]


# How the two-rank workers lay out a step with G=2 per rank:
# name: (packing, semantic W, tokens per physical micro-batch, semantic micro-batches G*W)
TWO_RANK_LAYOUTS = {
    "padded": (False, None, None, 4),
    "packed": (True, None, None, 4),
    "physical": (False, 4, 80, 8),  # the weights of G=2 on 4 ranks, run on 2 ranks in 80-token rows
}


def two_rank_worker(rank: int, backend: str, init_file: str, out: str) -> None:
    """One of two ranks (gloo on CPUs, nccl on GPUs): every mode's gradient with G=2 per rank,
    in every layout of TWO_RANK_LAYOUTS."""
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    examples = make_examples(UNEQUAL)
    grads = {(mode, name): harness_grad(examples, mode, 2, packing, World(rank, 2, rank), device,
                                        semantic_world=semantic_world, tokens_per_micro_batch=tokens)
             for mode in MODES for name, (packing, semantic_world, tokens, _) in TWO_RANK_LAYOUTS.items()}
    torch.save(grads, f"{out}.{rank}")
    dist.destroy_process_group()
