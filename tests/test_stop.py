"""Stop requests by signal: Ctrl-C stops as SIGTERM and SIGUSR1 do (at an agreed step, with a
checkpoint); a second Ctrl-C interrupts at once (a process without torchrun; under torchrun the
second one ends torchrun, which kills its workers)."""

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


def test_ctrl_c_asks_for_a_stop_and_a_second_one_interrupts(restored_handlers, capfd, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    stop = StopRequest(torch.device("cpu"))
    stop.install()
    # Not installed, the signal below would interrupt the test session itself.
    assert signal.getsignal(signal.SIGINT) == stop._on_signal
    os.kill(os.getpid(), signal.SIGINT)  # was a KeyboardInterrupt traceback on every rank, no checkpoint
    assert stop.requested_here() and stop.agreed() and stop.reason() == "signal SIGINT"
    heard = "Ctrl-C: stopping with a checkpoint after the next step (in a validation, before its next batch)"
    assert heard in capfd.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_under_torchrun_its_sigterm_after_a_ctrl_c_is_a_stop_request(restored_handlers, capfd, monkeypatch):
    """torchrun passes the first Ctrl-C on as SIGINT and a second one as SIGTERM."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    stop = StopRequest(torch.device("cpu"))
    stop.install()
    assert signal.getsignal(signal.SIGINT) == stop._on_signal
    os.kill(os.getpid(), signal.SIGINT)
    assert "if that ends before torchrun kills the workers (--shutdown-timeout" in capfd.readouterr().err
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.reason() == "signal SIGTERM"


def test_a_completion_marker_that_cannot_be_written_is_a_warning(tmp_path, caplog):
    """At a completed run's very end: it made rank 0 exit 1 with the run and its checkpoint done."""
    stop = StopRequest(torch.device("cpu"), str(tmp_path / "gone" / "STOP"))  # its folder does not exist
    stop.mark_completed(7)
    assert f"could not write {tmp_path / 'gone' / 'STOP.completed'}" in caplog.text
    StopRequest(torch.device("cpu"), str(tmp_path / "STOP")).mark_completed(7)
    assert (tmp_path / "STOP.completed").read_text() == "completed at step 7\n"


def test_a_served_request_leaves_its_reason_for_the_slurm_script(restored_handlers, tmp_path):
    """A SIGUSR1 that reached the workers and not the batch script (sent to the job step) ended
    the job with exit 0 and no requeue: the script learns of it from the .stopped marker. A stop
    at train.max_steps, which no one requested, leaves none; the stop file is removed either way."""
    stop = StopRequest(torch.device("cpu"), str(tmp_path / "STOP"))
    stop.install()
    (tmp_path / "STOP").write_text("")
    os.kill(os.getpid(), signal.SIGUSR1)
    stop.served(12, stop.requests())
    assert (tmp_path / "STOP.stopped").read_text() == "stopped at step 12 by signal SIGUSR1\n"
    assert not (tmp_path / "STOP").exists()
    unasked = StopRequest(torch.device("cpu"), str(tmp_path / "STOP"))
    unasked.served(20, unasked.requests())  # max_steps: nothing requested, and the earlier session's marker goes
    assert not (tmp_path / "STOP.stopped").exists()
    os.kill(os.getpid(), signal.SIGUSR1)
    stop.served(30, stop.requests())
    unasked.mark_completed(40)  # a later session finished the run: a scheduler would requeue it by the .stopped
    assert [p.name for p in tmp_path.iterdir()] == ["STOP.completed"]
    stop.served(50, stop.requests())  # a longer run (train.epochs raised) stopped again
    assert [p.name for p in tmp_path.iterdir()] == ["STOP.stopped"]


def test_the_end_of_the_launcher_is_a_stop_request():
    """A torchrun killed by SIGKILL signals none of its workers (they run in sessions of their
    own): its end shows as a changed parent pid, a request like a signal's."""
    cpu = torch.device("cpu")
    assert not StopRequest(cpu).requested_here()  # no launcher (one process)
    assert not StopRequest(cpu, launcher_pid=os.getppid()).requested_here()  # the launcher is alive
    gone = StopRequest(cpu, launcher_pid=os.getppid() + 1)  # reparented: the launcher has ended
    assert gone.requested_here() and gone.agreed()
    assert gone.reason() == f"the end of torchrun (pid {os.getppid() + 1}), which left its workers running"


@pytest.mark.dali
@pytest.mark.slow
def test_a_run_in_a_process_that_goes_on_puts_its_signal_handlers_back(restored_handlers, tiny_data, tmp_path):
    """A notebook after run_training: SIGTERM and Ctrl-C reached the ended run's handler, which
    only took note of them (and printed "Ctrl-C: stopping with a checkpoint ..."), so neither
    stopped the process any more."""
    from _helpers import TINY_TRAIN

    from alexnet.config import load_config
    from alexnet.run import run_training

    def callers(signum, frame):  # noqa: ARG001
        pass

    for sig in STOP_SIGNALS:
        signal.signal(sig, callers)
    cfg = load_config(None, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=nb",
                             "train.max_steps=1"])  # fmt: skip
    run_training(cfg, None)
    assert all(signal.getsignal(sig) is callers for sig in STOP_SIGNALS)
    run_training(cfg, None, keep_stop_handlers=True)  # launch/train.py: its exit ignores them
    assert all(getattr(signal.getsignal(sig), "__self__", None).__class__ is StopRequest for sig in STOP_SIGNALS)


def test_a_signal_during_the_setup_is_served_after_the_first_step(restored_handlers, tmp_path, monkeypatch):
    """The handlers came after the setup (indexing the data, loading a checkpoint: minutes on
    ImageNet): a SIGTERM there killed the process with nothing said, Ctrl-C was a traceback."""
    import json

    from _helpers import SYNTHETIC_TRAIN

    from alexnet.config import load_config
    from alexnet.run import run_training
    from alexnet.trainer import Trainer

    reading = Trainer._read_data_and_checkpoint

    def signalled_while_reading(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return reading(self)

    monkeypatch.setattr(Trainer, "_read_data_and_checkpoint", signalled_while_reading)
    cfg = load_config(None, [*SYNTHETIC_TRAIN, f"run.root={tmp_path}", "run.name=s", "train.epochs=2"])
    summary = run_training(cfg, None)
    assert (summary["steps"], summary["stop_reason"], summary["completed"]) == (1, "preempted", False)
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["stop_reason"] == "preempted"
    assert (tmp_path / "s" / "checkpoints" / "last.pt").is_file()


def test_a_sigusr1_while_the_worker_imports_is_kept_for_its_handler(tmp_path):
    """slurm/alexnet.sh has torchrun ignore SIGUSR1 and the workers inherit that: a SIGUSR1 to
    the job step while they imported torch was discarded, and the run trained to its end (a job
    then runs into its time limit, not requeued). launch/train.py blocks it from its first lines;
    the signal is sent once the block shows in /proc, seconds before the handler exists."""
    import json
    import subprocess
    import sys
    import time

    from _helpers import SYNTHETIC_TRAIN, TRAIN

    args = [*SYNTHETIC_TRAIN, f"run.root={tmp_path}", "run.name=s", "train.epochs=3"]
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN), *args],
        preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN),  # as torchrun's workers start
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    usr1 = 1 << (signal.SIGUSR1 - 1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = open(f"/proc/{proc.pid}/status").read()
        if int(status.split("SigBlk:")[1].split()[0], 16) & usr1:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert proc.returncode == 0 and (summary["steps"], summary["stop_reason"]) == (1, "preempted"), err
