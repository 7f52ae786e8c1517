"""launch/gpu_check.sh's own control flow, on the CPU: a stand-in `python3` first on PATH plays a
PyTorch without a GPU (the script's dry run, GPU_CHECK_ALLOW_CPU=1), DALI, and each step, which
notes its start and sleeps."""

import os
import shutil
import signal
import subprocess
import time

from _helpers import REPO, running

STAND_IN = """#!/usr/bin/env bash
case "$*" in
  *torch.cuda.is_available*) exit 1 ;;
  *"import nvidia.dali"*) exit 0 ;;
  -) cat >/dev/null; echo "torch (stand-in)"; exit 0 ;;
  *) echo "$$ $*" >> "$STEPS_STARTED"; exec sleep 60 ;;
esac
"""


def test_ctrl_c_stops_the_running_step_and_the_check(tmp_path):
    """A step runs under `timeout`, which puts itself and the step in a process group of their
    own: Ctrl-C reached neither, the step ran to its end, and every later step still ran."""
    checkout = tmp_path / "checkout"  # the script works in its checkout's runs/gpu_check
    (checkout / "launch").mkdir(parents=True)
    shutil.copy(REPO / "launch" / "gpu_check.sh", checkout / "launch")
    stand_in = tmp_path / "bin" / "python3"
    stand_in.parent.mkdir()
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    started = tmp_path / "started.txt"
    env = {**os.environ, "PATH": f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}", "GPU_CHECK_ALLOW_CPU": "1",
           "STEPS_STARTED": str(started)}  # fmt: skip
    out = tmp_path / "out"
    proc = subprocess.Popen(
        ["bash", str(checkout / "launch" / "gpu_check.sh"), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal gives a job
        # A signal ignored when a script starts cannot be trapped in it; a terminal's job gets SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals its job's process group
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 130, output
        steps = started.read_text().splitlines()
        assert len(steps) == 1 and " launch/benchmark.py pipeline " in steps[0], steps
        deadline = time.monotonic() + 10
        while running(step_pid(steps[0])) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(step_pid(steps[0]))
        assert "interrupted: the step running was stopped and no later step run; no gpu_check.json" in output
        assert not (out / "gpu_check.json").exists()
    finally:  # after a failure: the script's process group, and the steps (in timeout's groups)
        steps = started.read_text().splitlines() if started.exists() else []
        for kill, pid in [(os.killpg, proc.pid), *((os.kill, step_pid(line)) for line in steps)]:
            if running(pid):
                kill(pid, signal.SIGKILL)
        proc.wait()


def step_pid(line: str) -> int:
    return int(line.split()[0])
