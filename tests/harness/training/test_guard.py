"""The non-finite guard and the run flags, on constructed step records and a real evaluation."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness import artifacts
from harness.distributed import World
from harness.training.evaluate import evaluate, summary
from harness.training.guard import MIN_STEPS_LOSS_ROSE, NonFiniteError, StepGuard
from tests.helpers.models import make_examples, tiny_model

NAN, INF = float("nan"), float("inf")


def record(loss: float, grad_norm: float, tokens: int = 100):
    """What train_step returns, as far as the guard reads it: device tensors, nothing synced."""
    return SimpleNamespace(nll_sum=torch.tensor(loss * tokens, dtype=torch.float64),
                           grad_norm=torch.tensor(grad_norm), target_tokens=tokens)


def guarded(steps: list[tuple[float, float]]) -> StepGuard:
    guard = StepGuard(len(steps), torch.device("cpu"))
    for step, (loss, grad_norm) in enumerate(steps, 1):
        guard.update(step, record(loss, grad_norm))
    return guard


def falling(n: int) -> list[tuple[float, float]]:
    return [(4.0 - 0.1 * s, 1.0) for s in range(n)]


def test_a_finite_run_passes_and_is_not_flagged():
    guard = guarded(falling(20))
    guard.check()
    assert guard.flags() == {}


@pytest.mark.parametrize("at, loss, grad_norm, named", [
    (3, NAN, 1.0, "train/loss=nan at step 3"),
    (7, 2.0, INF, "train/grad_norm=inf at step 7"),
    (5, NAN, NAN, "train/loss=nan at step 5"),  # both at once: the loss is named
    (1, -INF, 1.0, "train/loss=-inf at step 1"),
])
def test_the_first_non_finite_step_and_quantity_are_named(at, loss, grad_norm, named):
    steps = falling(10)
    steps[at - 1] = (loss, grad_norm)
    for later in range(at, 10):  # a diverged run stays diverged, with other values
        steps[later] = (INF if later % 2 else NAN, NAN)
    guard = guarded(steps[: at - 1])
    guard.check()  # nothing non-finite before `at`
    guard = guarded(steps)
    with pytest.raises(NonFiniteError, match=named.replace("+", r"\+")):
        guard.check()


def test_a_zero_gradient_norm_is_flagged_with_its_first_step():
    steps = falling(20)
    for s in range(11, 20):
        steps[s] = (3.0, 0.0)
    flags = guarded(steps).flags()
    assert flags == {artifacts.FLAG_GRAD_ZERO: "gradient norm was 0 at step 12"}


def test_a_loss_that_ends_above_its_start_is_flagged():
    # first 10% (steps 1-3): mean 4.0; last 10% (steps 28-30): mean 4.2
    steps = [(4.0, 1.0)] * 3 + [(3.0, 1.0)] * 24 + [(4.1, 1.0), (4.2, 1.0), (4.3, 1.0)]
    flags = guarded(steps).flags()
    assert flags == {artifacts.FLAG_LOSS_ROSE: "training loss rose from 4.0000 (steps 1-3) to 4.2000 (steps 28-30)"}


@pytest.mark.parametrize("steps, flagged", [(MIN_STEPS_LOSS_ROSE - 1, False), (MIN_STEPS_LOSS_ROSE, True)])
def test_a_run_too_short_to_judge_is_not_flagged_loss_rose(steps, flagged):
    guard = guarded([(3.0, 1.0)] + [(3.5, 1.0)] * (steps - 1))
    assert (artifacts.FLAG_LOSS_ROSE in guard.flags()) is flagged


def test_the_loss_windows_are_token_weighted():
    guard = StepGuard(20, torch.device("cpu"))  # windows of 2 steps: (4*10 + 3*1000)/1010 vs 3.5
    for step in range(1, 21):
        loss, tokens = {1: (4.0, 10), 2: (3.0, 1000)}.get(step, (3.5, 100))
        guard.update(step, record(loss, 1.0, tokens))
    assert artifacts.FLAG_LOSS_ROSE in guard.flags()


def test_the_guard_state_round_trips():
    steps = falling(10)
    steps[6] = (3.0, 0.0)
    whole = guarded(steps)
    first = guarded(steps[:4])
    resumed = StepGuard(10, torch.device("cpu"))
    resumed.load_state_dict(first.state_dict())
    for step in range(5, 11):
        resumed.update(step, record(*steps[step - 1]))
    assert resumed.flags() == whole.flags() != {}


def _two_ranks(rank: int, init_file: str, out: str) -> None:
    """Rank 1's loss is NaN at step 3, rank 0's never: both must stop at the same check."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    guard = StepGuard(6, torch.device("cpu"))
    stopped = None
    for step in range(1, 7):
        guard.update(step, record(NAN if (rank, step) == (1, 3) else 4.0 - 0.1 * step, 1.0))
        try:
            guard.check()
        except NonFiniteError as e:
            stopped = (step, str(e))
            break
    finite = StepGuard(5, torch.device("cpu"))  # rank 0's loss falls, rank 1's rises more: the mean rises
    for step, losses in ((1, (4.0, 1.0)), (2, (2.0, 2.0)), (3, (2.0, 2.0)), (4, (2.0, 2.0)), (5, (3.0, 3.0))):
        # 100 tokens per rank, N = 200 over both
        finite.update(step, SimpleNamespace(nll_sum=torch.tensor(100 * losses[rank], dtype=torch.float64),
                                            grad_norm=torch.tensor(1.0), target_tokens=200))
    Path(f"{out}.{rank}").write_text(json.dumps({"stopped": stopped, "flags": finite.flags()}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_stops_at_the_same_check(tmp_path):
    out = str(tmp_path / "out")
    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert [r["stopped"][0] for r in ranks] == [3, 3]
    assert ranks[0]["stopped"][1].startswith("train/loss=not finite (on another rank) at step 3")
    assert ranks[1]["stopped"][1].startswith("train/loss=nan at step 3")
    assert ranks[0]["flags"] == ranks[1]["flags"] == {
        artifacts.FLAG_LOSS_ROSE: "training loss rose from 2.5000 (steps 1-1) to 3.0000 (steps 5-5)"}


def test_non_finite_weights_stop_the_evaluation_naming_the_step():
    model = tiny_model()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"validation loss is not finite at step 12 \(e\.g\. ex-"):
        evaluate(model, make_examples([5, 9, 17]), batch_size=2, pad_id=0, packing=False, row_length=64,
                 device=torch.device("cpu"), world=World(), step=12)


def test_summary_never_turns_nan_into_a_number():
    df = pd.DataFrame({"loss_sum": [1.0, NAN], "target_tokens": [2, 3], "loss_mean": [0.5, NAN]})
    assert all(math.isnan(v) for v in summary(df).values())


@pytest.mark.gpu
def test_watching_a_step_makes_the_host_wait_for_nothing():
    device = torch.device("cuda")
    guard = StepGuard(10, device)
    step = SimpleNamespace(nll_sum=torch.tensor(300.0, dtype=torch.float64, device=device),
                           grad_norm=torch.tensor(1.0, device=device), target_tokens=100)
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        for s in range(1, 11):
            guard.update(s, step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    guard.check()
    assert guard.flags() == {}
    guard.update(11, SimpleNamespace(nll_sum=torch.tensor(NAN, dtype=torch.float64, device=device),
                                     grad_norm=step.grad_norm, target_tokens=step.target_tokens))
    with pytest.raises(NonFiniteError, match="train/loss=nan at step 11"):
        guard.check()
