"""Stop signals in process: raised at once outside the training loop, deferred to the end of
the step inside it, and never deferred twice. In a submitit job, submitit's preemption signal is
deferred the same way and then handed to submitit's own handler."""

import importlib.util
import os
import signal

import pytest
import torch

from harness.runs import signals
from harness.distributed import World


@pytest.fixture
def handlers():
    saved = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    signals.install()
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def stop() -> int | None:
    return signals.stop_requested(World(), torch.device("cpu"))


@pytest.mark.parametrize("signum", signals.STOP_SIGNALS)
def test_outside_the_loop_a_signal_raises_at_once(handlers, signum):
    with pytest.raises(signals.Interrupted, match=signal.Signals(signum).name) as caught:
        os.kill(os.getpid(), signum)
    assert caught.value.signum == signum


def test_inside_the_loop_the_first_signal_waits_for_the_step_to_end(handlers):
    ran_on = False
    with pytest.raises(signals.Interrupted):
        with signals.deferred():
            assert stop() is None
            os.kill(os.getpid(), signal.SIGTERM)
            ran_on = True  # the step goes on
            assert stop() == signal.SIGTERM
            raise signals.Interrupted(signal.SIGTERM, " after step 1")
    assert ran_on


def test_a_second_signal_does_not_wait(handlers):
    with pytest.raises(signals.Interrupted, match="SIGINT"):
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the second signal should have raised")


def test_a_signal_left_pending_at_the_end_of_the_loop_raises_there(handlers):
    with pytest.raises(signals.Interrupted, match="SIGTERM"):
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
    with signals.deferred():  # nothing carries over into the next job's loop
        assert stop() is None


needs_submitit = pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="needs submitit")


@pytest.fixture
def submitit_job(monkeypatch):
    """Inside a (pretend) submitit job: submitit's handler for its preemption signal records its calls."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    calls = []
    saved = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR2, saved)


def preempted_mid_step(cfg):
    """A training loop sent SIGUSR2 during its first step."""
    ended_step = False
    with signals.deferred():
        os.kill(os.getpid(), signal.SIGUSR2)
        ended_step = True
        signum = stop()
        assert signum == signal.SIGUSR2 and ended_step
        raise signals.Interrupted(signum, " after step 1 (checkpoint saved)")


@needs_submitit
def test_in_a_submitit_job_the_preemption_signal_ends_the_step_then_goes_to_submitits_handler(submitit_job):
    submitits = signal.getsignal(signal.SIGUSR2)
    with pytest.raises(signals.Interrupted, match="SIGUSR2 after step 1"):
        signals.requeue_on_preemption(preempted_mid_step)(None)
    assert submitit_job == [signal.SIGUSR2]  # once, after the step (submitit's requeues the job and exits)
    assert signal.getsignal(signal.SIGUSR2) is submitits


@needs_submitit
def test_a_submitit_job_that_ends_normally_leaves_submitits_handler_in_place(submitit_job):
    submitits = signal.getsignal(signal.SIGUSR2)
    assert signals.requeue_on_preemption(lambda cfg: signal.getsignal(signal.SIGUSR2))("cfg") is not submitits
    assert signal.getsignal(signal.SIGUSR2) is submitits and submitit_job == []


@needs_submitit
def test_submitits_preemption_signal_is_the_one_it_is_configured_with(submitit_job, monkeypatch):
    import submitit
    monkeypatch.setattr(submitit.JobEnvironment, "USR_SIG", "HUP")  # SUBMITIT_PREEMPT_SIGNAL=HUP
    assert signals.submitit_preemption_signal() == signal.SIGHUP


def test_outside_a_submitit_job_the_task_runs_as_it_is(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    before = signal.getsignal(signal.SIGUSR2)
    assert signals.submitit_preemption_signal() is None
    assert signals.requeue_on_preemption(lambda cfg: signal.getsignal(signal.SIGUSR2))("cfg") is before


@needs_submitit
def test_without_a_handler_of_submitits_the_signal_stops_the_run_like_sigterm(monkeypatch):
    """A process started from inside a submitit job inherits its environment, not its handlers."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    saved = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        with pytest.raises(signals.Interrupted, match="SIGUSR2 after step 1"):
            signals.requeue_on_preemption(preempted_mid_step)(None)
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, saved)


@needs_submitit
def test_in_a_slurm_job_sigterm_ends_the_step_and_the_job_exits_without_asking_submitit(submitit_job, monkeypatch):
    """SLURM sends SIGTERM when it ends a job (scancel, scontrol requeue, the time limit), and
    requeues it itself where it does; submitit's own handler would only log it."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    submitits_bypass = lambda signum, frame: None  # noqa: E731
    saved = signal.signal(signal.SIGTERM, submitits_bypass)

    def terminated_mid_step(cfg):
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop() == signal.SIGTERM  # recorded; the step went on
            raise signals.Interrupted(signal.SIGTERM, " after step 1 (checkpoint saved)")

    try:
        with pytest.raises(SystemExit) as exited:
            signals.requeue_on_preemption(terminated_mid_step)(None)
        assert exited.value.code == 128 + signal.SIGTERM and submitit_job == []
        assert signal.getsignal(signal.SIGTERM) is submitits_bypass
    finally:
        signal.signal(signal.SIGTERM, saved)
