"""Stop signals in process: raised at once outside the training loop, deferred to the end of
the step inside it, and never deferred twice."""

import os
import signal

import pytest
import torch

from harness import signals
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
