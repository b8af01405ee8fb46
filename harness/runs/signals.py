"""SIGTERM (what a cluster scheduler sends on preemption) and SIGINT (Ctrl-C) stop a run cleanly.

Outside the training loop a signal raises `Interrupted` at once. Inside it (`deferred()`) the
signal is only recorded; the loop finishes its step, saves a checkpoint and then raises, so the
work done so far is kept. A second signal does not wait.

A job that submitit runs (hydra/launcher=slurm, submitit_local) is submitit's worker process:
`main()` and `install()` never run there, and submitit has its own handlers: SIGUSR2 (its
preemption and timeout signal) checkpoints the job's callable and requeues it, SIGTERM is logged
and ignored. `requeue_on_preemption` takes SIGUSR2 over for the length of the job, so the run
stops the same way, and then hands it to submitit's handler to requeue the job. Under SLURM it
takes SIGTERM too: SLURM sends it when it ends a job (`scancel`, `scontrol requeue`, the time
limit, preemption without a user signal) and kills the job KillWait seconds later, so the run
stops the same way (checkpoint, KILLED) and the job exits; SLURM requeues it where it does."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only when a run starts: python -m harness --help imports this module
    import torch

    from harness.distributed import World

log = logging.getLogger(__name__)
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


def submitit_preemption_signal() -> int | None:
    """The signal submitit requeues a job on, inside a submitit job; None elsewhere."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):  # set by submitit in the jobs it starts
        return None
    from submitit import JobEnvironment  # an optional dependency: only imported in its jobs
    return getattr(signal, "SIG" + JobEnvironment.USR_SIG)  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise


def requeue_on_preemption(task):
    """Decorate a Hydra task function. In a submitit job, submitit's preemption signal stops the
    run like SIGTERM elsewhere (the step ends, a checkpoint is saved, the run ends KILLED); then
    submitit's own handler checkpoints the job and requeues it, and the requeued job resumes into
    the same run. Elsewhere the task runs as it is."""

    @functools.wraps(task)
    def job(cfg):
        signum = submitit_preemption_signal()
        if signum is None:
            return task(cfg)
        under_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        submitits = signal.signal(signum, _handle)
        bypassed = signal.signal(signal.SIGTERM, _handle) if under_slurm else None
        try:
            return task(cfg)
        except Interrupted as stop:
            if under_slurm and stop.signum == signal.SIGTERM:
                log.warning("%s; SLURM ends the job (and requeues it where it does)", stop)
                sys.exit(128 + stop.signum)
            if stop.signum != signum or not callable(submitits):
                raise
            log.warning("%s; submitit requeues the job", stop)
            signal.signal(signum, submitits)  # a second signal from here on is submitit's
            submitits(signum, None)  # checkpoints the job's callable, requeues it and exits (rank 0; another rank returns)
            raise
        finally:
            if submitits is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signum, submitits)
            if bypassed is not None:
                signal.signal(signal.SIGTERM, bypassed)

    return job
