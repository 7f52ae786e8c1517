"""tests/_helpers.launch, which most multi-rank tests use instead of torchrun: its ranks must see
what torchrun's workers see, and a failed or stuck launch must end as torchrun's does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import forks_ranks, launch, reported_statuses, torchrun

pytestmark = pytest.mark.skipif(not forks_ranks(), reason="a machine with a GPU launches with torchrun itself")

# torchrun's variables that describe its agent, not the worker: an error file the agent reads
# and the signals the agent itself handles.
AGENT_ONLY = {"TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_SIGNALS_TO_HANDLE"}
PER_LAUNCH = {"MASTER_PORT", "TORCHELASTIC_RUN_ID"}  # a value of each launch's own

REPORT = """
import json, os, random, sys, numpy as np, torch
added = {k: v for k, v in os.environ.items() if k not in json.loads(os.environ["BEFORE"])}
report = {"added": added, "argv": sys.argv, "name": __name__, "cwd": os.getcwd(), "path0": sys.path[0],
          "seeds": [torch.initial_seed(), np.random.get_state()[1][:4].tolist(), random.random()],
          "stdout_buffered": not sys.stdout.write_through,
          "session_leader": os.getsid(0) == os.getpid()}
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(report, f)
"""


def reports(tmp_path: Path, starter, name: str) -> list[dict]:
    folder = tmp_path / name
    folder.mkdir()
    script = tmp_path / "report.py"
    script.write_text(REPORT)
    env = {"BEFORE": json.dumps(sorted({*os.environ, "OMP_NUM_THREADS", "BEFORE"}))}
    proc = starter([script, folder, "--flag"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_a_launch_gives_each_rank_what_torchrun_gives_its_workers(tmp_path):
    """The same script under torchrun and under launch: the same variables (values apart from
    the port and run id), argv, __main__, working folder, import path, unbuffered stdout, a
    session of its own, and generators (torch, numpy, random) seeded apart."""
    real, forked = reports(tmp_path, torchrun, "torchrun"), reports(tmp_path, launch, "launch")
    for rank in (0, 1):
        want, got = real[rank], forked[rank]
        assert set(want["added"]) - AGENT_ONLY == set(got["added"]), (want["added"], got["added"])
        for key in set(got["added"]) - PER_LAUNCH:
            assert got["added"][key] == want["added"][key], key
        assert got["argv"][::2] == want["argv"][::2] and got["argv"][1:] == [str(tmp_path / "launch"), "--flag"]
        for key in ("name", "cwd", "path0", "stdout_buffered", "session_leader"):
            assert got[key] == want[key], key
    for launched in (real, forked):  # each rank's interpreter seeds its generators itself
        assert all(a != b for a, b in zip(launched[0]["seeds"], launched[1]["seeds"]))
    assert forked[0]["name"] == "__main__" and forked[0]["added"]["RANK"] == "0" and forked[1]["added"]["RANK"] == "1"


FAILING = """
import os, signal, subprocess, sys, time
if os.environ["RANK"] == "1":
    time.sleep(1)
    sys.exit(3)
# A child in rank 0's session (a DataLoader worker, say) that says whether it got SIGTERM.
child = (
    "import signal, sys, time\\n"
    "def said(*_):\\n"
    "    open(sys.argv[1], 'w').write('SIGTERM')\\n"
    "    sys.exit(0)\\n"
    "signal.signal(signal.SIGTERM, said)\\n"
    "time.sleep(120)\\n"
)
subprocess.Popen([sys.executable, "-c", child, sys.argv[1]])
time.sleep(120)
"""


def test_a_failed_rank_stops_the_others_sessions_and_the_launch_exits_1(tmp_path):
    """As under torchrun: the first rank to fail gets the others' sessions a SIGTERM (their
    children too), and the launch exits 1 (with the statuses that torchrun reports, which launch
    reads where it runs torchrun)."""
    script = tmp_path / "fail.py"
    script.write_text(FAILING)
    real = torchrun([script, tmp_path / "torchrun_child"], timeout=100)
    assert (real.returncode, reported_statuses(real.stderr, 2)) == (1, [-15, 3]), real.stderr[-3000:]
    proc = launch([script, tmp_path / "launch_child"], timeout=100)
    assert (proc.returncode, proc.statuses) == (1, [-15, 3])
    for name in ("torchrun_child", "launch_child"):
        assert (tmp_path / name).read_text() == "SIGTERM"


def test_a_launch_ends_with_the_last_process_that_holds_its_output(tmp_path):
    """A rank's child that outlives it keeps a torchrun launch's captured output open: its lines
    are the launch's, and the launch ends after it (a process left behind shows, as under torchrun)."""
    script = tmp_path / "leaves.py"
    script.write_text(
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import sys, time; time.sleep(2); sys.stdout.write(\"late\\\\n\")'])\n"
    )
    proc = launch([script])
    assert (proc.returncode, proc.stdout.count("late\n")) == (0, 2), proc.stderr[-3000:]


def test_a_server_killed_during_a_launch_fails_it_and_the_next_launch_starts_another(tmp_path):
    """A server killed (out of memory, say) holds no pipe open through its store or ranks: the
    launch fails at once instead of waiting for pytest's timeout, and the next one works."""
    kills = tmp_path / "kills_server.py"
    kills.write_text("import os, signal\nif os.environ['RANK'] == '0':\n    os.kill(os.getppid(), signal.SIGKILL)\n")
    with pytest.raises(RuntimeError, match="gave no reply"):
        launch([kills], timeout=60)
    fine = tmp_path / "fine.py"
    fine.write_text("import os, sys\nsys.stdout.write(f\"rank {os.environ['RANK']}\\n\")\n")
    proc = launch([fine])
    assert proc.returncode == 0 and sorted(proc.stdout.splitlines()) == ["rank 0", "rank 1"]


def test_an_uncaught_exception_is_the_interpreter_s_own_report(tmp_path):
    script = tmp_path / "raise.py"
    script.write_text("import os\nif os.environ['RANK'] == '0':\n    raise ValueError('broken on rank 0')\n")
    proc = launch([script])
    assert proc.returncode == 1 and proc.statuses[0] == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().endswith("ValueError: broken on rank 0")


def test_a_launch_past_its_timeout_kills_its_ranks_and_their_children(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"with open(os.path.join({str(tmp_path)!r}, 'pids' + os.environ['RANK']), 'w') as f:\n"
        "    f.write(f'{os.getpid()} {child.pid}')\n"
        "time.sleep(300)\n"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        launch([script], timeout=10)
    pids = [int(p) for rank in (0, 1) for p in (tmp_path / f"pids{rank}").read_text().split()]
    assert len(pids) == 4
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists() and not zombie(pid)]


def zombie(pid: int) -> bool:
    """A child killed but not yet collected by its parent (init, for the ranks' orphans)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_launch_that_changes_what_a_process_reads_as_it_starts_runs_under_torchrun(tmp_path):
    """PYTHONPATH (like OMP_NUM_THREADS) is read as the interpreter starts, which a fork cannot
    redo: such a launch runs under torchrun itself."""
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "marker_module.py").write_text("VALUE = 7\n")
    script = tmp_path / "uses_path.py"
    # One write per line: the ranks share stdout, unbuffered (`python -u`), and print() writes each part.
    script.write_text("import marker_module, sys\nsys.stdout.write(f'value {marker_module.VALUE}\\n')\n")
    proc = launch([script], env={"PYTHONPATH": f"{tmp_path / 'extra'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("value 7\n") == 2 and proc.args[1:3] == ["-m", "torch.distributed.run"]
    assert sys.executable == proc.args[0]
