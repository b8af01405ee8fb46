"""SIGTERM (what a cluster scheduler sends on preemption) and SIGINT (Ctrl-C) stop a run cleanly.

Outside the training loop a signal raises `Interrupted` at once. Inside it (`deferred()`) the
signal is only recorded; the loop finishes its step, saves a checkpoint and then raises, so the
work done so far is kept. A second signal does not wait."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only when a run starts: python -m harness --help imports this module
    import torch

    from harness.distributed import World

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal arrived. A BaseException, so that nothing treats it as a failed job and
    carries on with the next one."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}{detail}")


_deferring = False
_pending: int | None = None


def _handle(signum, frame) -> None:
    global _pending
    if _deferring and _pending is None:
        _pending = signum
        return
    raise Interrupted(signum)


def install() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handle)


@contextmanager
def deferred():
    """Signals inside this block wait for `stop_requested`; one still pending at the end raises."""
    global _deferring, _pending
    _deferring, _pending = True, None
    try:
        yield
    finally:
        _deferring = False
    if _pending is not None:
        raise Interrupted(_pending)


def stop_requested(world: World, device: torch.device) -> int | None:
    """The pending signal, if any (on any rank: all ranks stop at the same step)."""
    import torch
    import torch.distributed as dist

    signum = _pending
    if world.size > 1 and dist.is_initialized():
        t = torch.tensor([signum or 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        signum = int(t.item()) or None
    return signum
