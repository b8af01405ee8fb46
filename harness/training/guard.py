"""What stops a run, and what flags a run that finished but looks broken.

The first non-finite training loss or gradient norm stops the run: from that step on, every
number it would report is meaningless. The test runs on the device at every step and is read
only where the loop waits for the device anyway (before logging or evaluating, and at the end),
so it adds no host sync; the loop reads it before anything of a step is logged or evaluated,
so nothing is ever reported from past a non-finite step.

A run that finishes can still be broken: its training loss ended above where it started, or
its gradient was exactly zero at some step (the model stopped learning, e.g. saturated at a
huge learning rate). Such a run is flagged (artifacts.TAG_FLAG) and the analysis refuses it
unless told otherwise.
"""

from __future__ import annotations

import torch

from harness import artifacts, distributed

NONE = torch.iinfo(torch.long).max  # "no such step yet"
# loss_rose needs this many steps: in a shorter run it would compare the first batch with the
# last one, which differ by their examples more than by what the model learned
MIN_STEPS_LOSS_ROSE = 5
QUANTITIES = ("train/loss", "train/grad_norm")


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm that is NaN or infinite; says which and at which step."""


class StepGuard:
    """Watches every step of one run (the same steps on every rank)."""

    def __init__(self, max_steps: int, device: torch.device):
        self.max_steps = max_steps
        self.window = max(1, max_steps // 10)  # loss_rose compares the first and last 10% of steps
        # first step with a non-finite loss, a non-finite gradient norm, a zero gradient norm
        self.first = torch.full((3,), NONE, dtype=torch.long, device=device)
        self.value = torch.zeros(2, dtype=torch.float64, device=device)  # the non-finite values
        self.nll = torch.zeros(2, dtype=torch.float64, device=device)  # summed NLL: first, last window
        self.tokens = [0, 0]  # target tokens of those windows, over all ranks

    def update(self, step: int, record) -> None:
        """Record step `step` (a harness.training.step.StepRecord) on the device, without waiting for it."""
        values = torch.stack([record.nll_sum.double(), record.grad_norm.double()])
        bad = torch.cat([~torch.isfinite(values), (record.grad_norm == 0).view(1)])
        new = bad & (self.first == NONE)
        self.value = torch.where(new[:2], values, self.value)
        self.first = torch.where(new, step, self.first)
        if step <= self.window:
            self.nll[0] += record.nll_sum
            self.tokens[0] += record.target_tokens
        if step > self.max_steps - self.window:
            self.nll[1] += record.nll_sum
            self.tokens[1] += record.target_tokens

    def check(self) -> None:
        """Raise NonFiniteError naming the first non-finite step, if any (waits for the device)."""
        first = distributed.min_tensor(self.first).tolist()
        step = min(first[:2])
        if step == NONE:
            return
        which = first.index(step)
        local = self.first[which].item() == step
        value = f"{self.value[which].item()}" if local else "not finite (on another rank)"
        raise NonFiniteError(f"{QUANTITIES[which]}={value} at step {step}; the run stops there")

    def flags(self) -> dict[str, str]:
        """Flags of a run that trained to the end: {flag: the figures behind it} (all ranks)."""
        zero_at = distributed.min_tensor(self.first)[2].item()
        nll = distributed.sum_tensor(self.nll).tolist()
        start, end = [n / max(tokens, 1) for n, tokens in zip(nll, self.tokens)]
        found = {}
        if end > start and min(self.tokens) > 0 and self.max_steps >= MIN_STEPS_LOSS_ROSE:
            last = self.max_steps - self.window + 1
            found[artifacts.FLAG_LOSS_ROSE] = (
                f"training loss rose from {start:.4f} (steps 1-{self.window}) to {end:.4f} "
                f"(steps {last}-{self.max_steps})")
        if zero_at != NONE:
            found[artifacts.FLAG_GRAD_ZERO] = f"gradient norm was 0 at step {zero_at}"
        return found

    def state_dict(self) -> dict:
        return {"first": self.first, "value": self.value, "nll": self.nll, "tokens": torch.tensor(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        self.first.copy_(state["first"])
        self.value.copy_(state["value"])
        self.nll.copy_(state["nll"])
        self.tokens = [int(t) for t in state["tokens"]]
