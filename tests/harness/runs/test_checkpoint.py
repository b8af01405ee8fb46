"""Checkpoints in process: a run continued from one is bit for bit the run that never stopped."""

import pickle

import pytest
import torch
from transformers import get_scheduler

from harness.runs.checkpoint import Checkpoints, LoopState
from harness.distributed import World
from harness.training.losses import CausalLMLoss
from harness.training.step import Split, train_step
from tests.helpers.models import make_examples, tiny_model

EXAMPLES = make_examples([5, 9, 17, 33, 12, 60, 7, 25])
STEPS = [[0, 1, 2, 3], [4, 5, 6, 7], [2, 4, 6, 0], [1, 3, 5, 7]]


def fresh():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=len(STEPS))
    return model, optimizer, scheduler, LoopState(0, torch.zeros(len(EXAMPLES), dtype=torch.float64),
                                                  torch.zeros(len(EXAMPLES), dtype=torch.long), 0,
                                                  {"first": torch.tensor([7, 9, 11])})


def train(model, optimizer, scheduler, state: LoopState, until: int) -> LoopState:
    for step in range(state.step + 1, until + 1):
        record = train_step(CausalLMLoss(model), optimizer, scheduler, EXAMPLES, STEPS[step - 1], mode="token_mean",
                            loss_scale=1.0, split=Split(2), max_grad_norm=1.0, world=World(),
                            device=torch.device("cpu"), layout=dict(pad_id=0, packing=False, row_length=64))
        state.grad_weight.index_add_(0, record.example_index, record.example_weight)
        state.times_seen.index_add_(0, record.example_index, torch.ones_like(record.example_index))
        state = LoopState(step, state.grad_weight, state.times_seen, state.tokens_seen + record.tokens, state.guard)
    return state


def test_training_continued_from_a_checkpoint_is_bitwise_the_uninterrupted_run(tmp_path):
    model, optimizer, reference_scheduler, state = fresh()
    uninterrupted = train(model, optimizer, reference_scheduler, state, until=4)
    rng_after = torch.rand(3)

    stopped, optimizer, scheduler, state = fresh()
    state = train(stopped, optimizer, scheduler, state, until=2)
    checkpoints = Checkpoints(tmp_path, keep=2, world=World())
    saved = checkpoints.save(state, stopped, optimizer, scheduler, run_id="run-1")
    torch.rand(100)  # whatever happens to the RNG after the save is undone by the load

    continued, optimizer2, scheduler2, _ = fresh()
    assert checkpoints.latest() == saved and saved.name == "step_00000002"
    loaded = checkpoints.load(saved, continued, optimizer2, scheduler2, torch.device("cpu"))
    assert loaded.step == 2 and loaded.tokens_seen == state.tokens_seen
    assert torch.equal(loaded.guard["first"], torch.tensor([7, 9, 11]))  # the guard's watch goes on
    resumed = train(continued, optimizer2, scheduler2, loaded, until=4)

    assert torch.equal(torch.rand(3), rng_after)
    for (name, a), b in zip(model.state_dict().items(), continued.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(resumed.grad_weight, uninterrupted.grad_weight)
    assert torch.equal(resumed.times_seen, uninterrupted.times_seen)
    assert resumed.tokens_seen == uninterrupted.tokens_seen
    assert scheduler2.get_last_lr() == reference_scheduler.get_last_lr()


def test_only_the_newest_checkpoints_are_kept_and_half_written_ones_are_ignored(tmp_path):
    model, optimizer, scheduler, state = fresh()
    checkpoints = Checkpoints(tmp_path, keep=2, world=World())
    for step in (1, 2, 3, 4):
        checkpoints.save(LoopState(step, state.grad_weight, state.times_seen, 0, {}), model, optimizer, scheduler, "r")
    assert [p.name for p in checkpoints.all()] == ["step_00000003", "step_00000004"]

    (tmp_path / ".tmp-step_00000009").mkdir()  # a process killed while saving step 9
    (tmp_path / "job.lock").write_text("")
    (tmp_path / "notes").mkdir()
    assert checkpoints.latest().name == "step_00000004"
    checkpoints.remove_all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.lock", "notes"]  # only its own folders go


class Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_a_checkpoint_file_holding_arbitrary_objects_is_refused(tmp_path):
    model, optimizer, scheduler, state = fresh()
    checkpoints = Checkpoints(tmp_path, keep=1, world=World())
    saved = checkpoints.save(state, model, optimizer, scheduler, "r")
    torch.save({"optimizer": Payload()}, saved / "optimizer.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        checkpoints.load(saved, *fresh()[:3], torch.device("cpu"))
