"""Stop requests by signal: Ctrl-C stops as SIGTERM and SIGUSR1 do (at an agreed step, with a
checkpoint); a second Ctrl-C interrupts at once."""

import os
import signal

import pytest
import torch

from alexnet.stop import STOP_SIGNALS, StopRequest


@pytest.fixture
def restored_handlers():
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_ctrl_c_asks_for_a_stop_and_a_second_one_interrupts(restored_handlers):
    stop = StopRequest(torch.device("cpu"))
    stop.install()
    # Not installed, the signal below would interrupt the test session itself.
    assert signal.getsignal(signal.SIGINT) == stop._on_signal
    os.kill(os.getpid(), signal.SIGINT)  # was a KeyboardInterrupt traceback on every rank, no checkpoint
    assert stop.requested_here() and stop.agreed() and stop.reason() == "signal SIGINT"
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_torchruns_sigterm_between_two_ctrl_cs_is_a_stop_request(restored_handlers):
    stop = StopRequest(torch.device("cpu"))
    stop.install()
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)  # torchrun's SIGTERM follows the terminal's SIGINT
    assert stop.reason() == "signal SIGTERM"
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
