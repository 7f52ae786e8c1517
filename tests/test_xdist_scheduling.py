"""The test command's loadfile scheduling survives a crashed worker (tests/_xdist_scheduling.py):
a small pytest run whose worker ends mid-file finishes, with that one test failed."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def files(how_it_ends: str) -> dict[str, str]:
    return {
        # Two files the worker finishes before it ends: xdist 3.8.0 handed them out again, empty.
        "test_a_first.py": "def test_one():\n    pass\n\n\ndef test_two():\n    pass\n",
        "test_b_second.py": "def test_three():\n    pass\n",
        # pytest-timeout at 1 s for this test alone: a test of the others slowed that long by a
        # busy machine would end its worker too.
        "test_c_ends.py": f"import ctypes, os\n\nimport pytest\n\n\n@pytest.mark.timeout(1, method='thread')\n"
        f"def test_ends_its_worker():\n    {how_it_ends}\n\n\ndef test_after_it():\n    pass\n",
        # A file of one test for the replacement worker: alone, xdist's worker never started it.
        "test_d_last.py": "def test_last():\n    pass\n",
    }


def run_nested_pytest(folder: Path, how_it_ends: str, *args: str) -> subprocess.CompletedProcess:
    folder.mkdir()
    for name, text in files(how_it_ends).items():
        (folder / name).write_text(text)
    (folder / "pytest.ini").write_text("[pytest]\n")  # not this project's setup.cfg
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(TESTS), env.get("PYTHONPATH"))))
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # each worker loads just these plugins: seconds less
    plugins = ["-p", "xdist.plugin", "-p", "pytest_timeout", "-p", "_xdist_scheduling", "-p", "no:cacheprovider"]
    command = [sys.executable, "-m", "pytest", *plugins, "-rf", *args]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def assert_the_run_ended_with_one_failure(proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "1 failed, 5 passed" in out, out
    # Reported once, and not run again on the replacement (a test that ended one worker would
    # end the next).
    assert out.count("FAILED test_c_ends.py::test_ends_its_worker") == 1, out
    assert "replacing crashed worker" in out, out


def test_a_crashed_worker_s_file_finishes_on_its_replacement_and_the_run_ends(tmp_path):
    """Without `-p _xdist_scheduling` (xdist 3.8.0's own scheduling) both runs hang until the
    timeout: with one worker and with two."""
    for workers in ("1", "2"):
        proc = run_nested_pytest(tmp_path / workers, "os._exit(1)", "-n", workers, "--dist", "loadfile")
        assert_the_run_ended_with_one_failure(proc)


def test_a_test_stuck_with_the_gil_held_ends_its_worker_and_the_run_ends(tmp_path):
    """The guard in setup.cfg: a native call that never returns with the GIL held (libc's sleep
    through ctypes.PyDLL here; a deadlocked destructor in real life) keeps pytest-timeout's
    thread from running, even at its 1-second timeout; faulthandler's watchdog ends the worker."""
    stuck = "ctypes.PyDLL(None).sleep(600)"
    guard = ["-o", "faulthandler_timeout=4", "-o", "faulthandler_exit_on_timeout=true"]
    proc = run_nested_pytest(tmp_path / "stuck", stuck, *guard, "-n", "2", "--dist", "loadfile")
    assert_the_run_ended_with_one_failure(proc)
    assert "Timeout (0:00:04)!" in proc.stderr, proc.stderr  # faulthandler's, with every thread's stack
