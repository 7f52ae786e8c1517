"""The real sbatch script (slurm/alexnet.sh) on a real Slurm: slurmctld, two slurmd and munged
from the Debian packages, started by slurm/local_cluster.sh on this machine (installed with
apt-get when missing). Jobs train the recovery tests' recipe and must end with the weights of the
uninterrupted torchrun run, bit for bit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from _helpers import REPO
from dist.reference import RECIPE, TOTAL_STEPS, assert_same_weights, reference_weights

from alexnet.metrics import read_metrics

pytestmark = pytest.mark.slow
CLUSTER = REPO / "slurm" / "local_cluster.sh"
SCRIPT = REPO / "slurm" / "alexnet.sh"
# The batch script's defaults ask for 8 GPUs and 64 CPUs; the command line shrinks them, as users
# do on a CPU-only partition.
CPU_JOB = ["--gpus-per-node=0", "--time=15"]


def cannot_install_slurm() -> str:
    """Why this machine cannot run a local Slurm ("" when it can)."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    have = all(Path(p).exists() for p in ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged"))
    if have and shutil.which("sbatch"):
        return "" if os.geteuid() == 0 else "not root (the local cluster's daemons need root)"
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return ""


@pytest.fixture(scope="module")
def cluster():
    """A 2-node local cluster for this module; yields the environment its commands need."""
    reason = cannot_install_slurm()
    if not reason:
        proc = subprocess.run([str(CLUSTER), "install"], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            reason = f"apt-get could not install Slurm: {proc.stderr.strip()[-500:]}"
    if reason:
        pytest.skip(f"!!! SLURM TESTS SKIPPED: {reason}. The sbatch script was NOT tested against Slurm. !!!")
    # Under /tmp, not pytest's private temp folder: the daemons run as the users slurm and munge.
    folder = Path(tempfile.mkdtemp(prefix="alexnet-slurm-", dir="/tmp"))
    start = subprocess.run(
        [str(CLUSTER), "start", "--nodes", "2", "--cpus", "2", "--dir", str(folder)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    env = {
        **os.environ,
        "SLURM_CONF": str(folder / "slurm.conf"),
        "ALEXNET_PYTHON": sys.executable,  # the interpreter with this checkout installed
        "OMP_NUM_THREADS": "1",
    }
    try:
        assert start.returncode == 0, f"local cluster did not start:\n{start.stderr[-4000:]}"
        yield env
    finally:
        subprocess.run([str(CLUSTER), "stop", "--dir", str(folder)], capture_output=True, text=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    return reference_weights(tmp_path_factory.getbasetemp(), tiny_data)


def submit(env: dict, workdir: Path, sbatch_options: list[str], train_args: list[str]) -> str:
    """sbatch the real script from `workdir` (so SLURM_SUBMIT_DIR is not the checkout)."""
    cmd = ["sbatch", "--parsable", f"--output={workdir}/slurm-%j.out", *sbatch_options, str(SCRIPT), *train_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir, timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_info(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def job_state(env: dict, job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, env=env).stdout
    return out.strip()


def wait_for_job(env: dict, job: str, workdir: Path, timeout: float = 300) -> dict[str, str]:
    """Poll squeue once a second (sbatch --wait polls every 32 s) until the job has left it."""
    deadline = time.monotonic() + timeout
    while job_state(env, job):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env)
            pytest.fail(f"job {job} still queued or running after {timeout} s:\n{job_log(workdir, job)[-4000:]}")
        time.sleep(1)
    return job_info(env, job)


def job_log(workdir: Path, job: str) -> str:
    path = workdir / f"slurm-{job}.out"
    return path.read_text() if path.exists() else "(no output file)"


def assert_completed(info: dict[str, str], workdir: Path, job: str) -> str:
    log = job_log(workdir, job)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{log[-6000:]}"
    return log


def train_steps(metrics: Path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(metrics) if r.get("split") == "train"]
    except (OSError, ValueError):  # not there yet, or a line being written
        return []


@pytest.mark.dali
def test_two_node_job_meets_at_the_first_node(cluster, tiny_data, tmp_path, reference):
    """Two emulated nodes, one worker each: the torchruns on ci-node1 and ci-node2 meet at the
    c10d rendezvous on ci-node1 and train as one world of 2."""
    args = [*RECIPE, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=two-nodes"]
    job = submit(cluster, tmp_path, ["--nodes=2", "--cpus-per-task=1", *CPU_JOB], args)
    info = wait_for_job(cluster, job, tmp_path)
    log = assert_completed(info, tmp_path, job)
    assert info["NodeList"] == "ci-node[1-2]"
    assert "on 2 node(s) ci-node1 ci-node2: 1 worker(s) per node, rendezvous ci-node1:" in log
    summary = json.loads((tmp_path / "two-nodes" / "summary.json").read_text())
    assert summary["completed"] and summary["world_size"] == 2 and summary["steps"] == TOTAL_STEPS
    assert_same_weights(tmp_path / "two-nodes" / "checkpoints" / "last.pt", reference)


@pytest.mark.dali
def test_usr1_checkpoints_requeues_resumes_and_ends_as_if_never_stopped(cluster, tiny_data, tmp_path, reference):
    """SIGUSR1 to the batch script (what --signal=B:USR1@120 sends before the time limit): every
    rank stops at the same step and checkpoints, the job requeues itself, keeps its id and run
    folder, resumes from the checkpoint and ends with the uninterrupted run's weights. Prints the
    cost of the preemption.

    Also what a one-node job of its own, the same submission left uninterrupted, checked (a whole
    Slurm job less; the two-node job is the uninterrupted one): one node, 2 CPUs, no GPUs: 2 gloo
    workers; the run folder named after the job id; every step's and epoch's metrics; the stop
    file removed at the end."""
    args = [*RECIPE, f"data.root={tiny_data}", f"run.root={tmp_path}", "checkpoint.every_steps=0"]
    job = submit(cluster, tmp_path, ["--nodes=1", "--cpus-per-task=2", *CPU_JOB], args)
    run = tmp_path / f"demo-{job}"  # default run name: the config's name and the job id
    deadline = time.monotonic() + 240
    while max(train_steps(run / "metrics.jsonl"), default=0) < 3:
        assert job_state(cluster, job) in ("PENDING", "RUNNING", "CONFIGURING"), job_log(tmp_path, job)
        assert time.monotonic() < deadline, f"no training step 3 in 240 s:\n{job_log(tmp_path, job)}"
        time.sleep(0.1)
    signalled = time.monotonic()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)

    summary_path = run / "summary.json"
    while not (summary_path.exists() and "preempted" in summary_path.read_text()):
        assert time.monotonic() - signalled < 120, f"no checkpoint after SIGUSR1:\n{job_log(tmp_path, job)}"
        time.sleep(0.05)
    checkpointed = time.monotonic()
    stopped = json.loads(summary_path.read_text())
    stop_step = stopped["steps"]
    assert 3 <= stop_step < TOTAL_STEPS and stopped["stop_reason"] == "preempted"
    payload = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert payload["progress"]["step"] == stop_step and set(payload["loaders"]["train"]) == {"0", "1"}

    states = set()
    while stop_step + 1 not in train_steps(run / "metrics.jsonl")[stop_step:]:
        states.add(job_state(cluster, job))
        assert time.monotonic() - signalled < 240, f"training did not resume:\n{job_log(tmp_path, job)}"
        time.sleep(0.1)
    resumed = time.monotonic()
    info = wait_for_job(cluster, job, tmp_path)
    log = assert_completed(info, tmp_path, job)

    assert info["Restarts"] == "1" and states & {"PENDING", "REQUEUED"}, (info, states)
    assert "2 worker(s) per node" in log and "training ended with exit status 0" in log
    assert "got SIGUSR1" in log and f"requeueing job {job}" in log and f"job {job} (restart 1)" in log
    last = re.escape(str(run / "checkpoints" / "last.pt"))
    resume_line = rf"resumed from {last} after step {stop_step} \(\d epochs? completed\)\n"  # the stop's checkpoint
    assert re.search(resume_line, log), log[-4000:]
    records = read_metrics(run / "metrics.jsonl")
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert steps == list(range(1, TOTAL_STEPS + 1)), "the requeued job resumed at the next step"
    assert [r["count"] for r in records if r["split"] == "val"] == [50, 50]
    summary = json.loads(summary_path.read_text())
    assert summary["completed"] and summary["steps"] == TOTAL_STEPS and summary["world_size"] == 2
    assert_same_weights(run / "checkpoints" / "last.pt", reference)
    assert not list(tmp_path.glob(".alexnet-stop-*")), "the stop file was not removed"
    print(
        f"\npreemption cost (SIGUSR1 at step {stop_step}): {checkpointed - signalled:.1f} s to the checkpoint, "
        f"{resumed - signalled:.1f} s until the requeued job finished its first step "
        f"({resumed - checkpointed:.1f} s of requeue, start and resume)"
    )


def test_workers_per_node_follow_the_gpus_slurm_gave(cluster, tmp_path):
    """With GPUs (the local cluster's are fake), one worker per GPU and the task's CPUs shared
    among them; ALEXNET_DRY_RUN prints the launch instead of running it."""
    env = {**cluster, "ALEXNET_DRY_RUN": "1"}
    env.pop("OMP_NUM_THREADS")
    job = submit(env, tmp_path, ["--nodes=2", "--gpus-per-node=2", "--cpus-per-task=2", "--time=5"], ["train.epochs=1"])
    log = assert_completed(wait_for_job(env, job, tmp_path, timeout=120), tmp_path, job)
    assert "on 2 node(s) ci-node1 ci-node2: 2 worker(s) per node" in log
    assert "OMP_NUM_THREADS=1 TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 " in log  # a fresh store for each restart
    assert f"PYTHONPATH={REPO}" in log  # the checkout's own package, whatever pip installed
    assert "--nproc_per_node=2 " in log and "--nnodes=2 " in log
    assert f"--rdzv_endpoint=ci-node1:{20000 + int(job) % 10000} " in log and " train.epochs=1" in log


def test_hosts_lines_of_two_clusters_are_kept_apart(tmp_path):
    """stop removes its own folder's /etc/hosts line only (a cluster in DIR-ci keeps its node
    names); start replaces its own line and keeps the other's. On a copy of the file."""
    hosts, ours, other = tmp_path / "hosts", tmp_path / "c", tmp_path / "c-ci"
    ours.mkdir(), other.mkdir()
    line = "127.0.0.1 ci-node1 ci-node2 # alexnet-local-cluster:{}"
    hosts.write_text(f"127.0.0.1 localhost\n{line.format(ours)}\n{line.format(other)}\n")

    def call(function):
        script = f'source "$1"; DIR="$2"; {function}'
        subprocess.run(["bash", "-c", script, "_", CLUSTER, str(ours)], check=True,
                       env={**os.environ, "ALEXNET_HOSTS_FILE": str(hosts)})  # fmt: skip
        return hosts.read_text().splitlines()

    assert call("hosts_remove") == ["127.0.0.1 localhost", line.format(other)]
    assert call("hosts_add") == ["127.0.0.1 localhost", line.format(other), line.format(ours)]
    assert call("hosts_add") == ["127.0.0.1 localhost", line.format(other), line.format(ours)]  # once


FAKE_SRUN = """#!/bin/bash
# Stands in for srun: the stop request arrives while the workers run; they stop on it, or have
# completed the run first and say so, and exit 0.
kill -USR1 "$PPID"
sleep 1
[[ -e $ALEXNET_STOP_FILE ]] || exit 7  # the script must have turned SIGUSR1 into the stop file
if [[ $FAKE_WORKERS == complete ]]; then
    echo "completed at step 14" >"$ALEXNET_STOP_FILE.completed"
fi
exit 0
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
    "show hostnames") echo ci-node1 ;;
    "requeue "*) echo "$2" >>"$FAKE_REQUEUED" ;;
esac
"""


@pytest.mark.parametrize("workers", ["stop", "complete"])
def test_usr1_requeues_a_run_unless_it_completed(tmp_path, workers):
    """SIGUSR1 near the time limit requeues the job unless the workers marked the run completed
    before the request took effect (a requeue would start it once more for nothing). With
    stand-ins for srun and scontrol, no cluster needed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    requeued = tmp_path / "requeued"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "41",
           "SLURM_JOB_NODELIST": "ci-node1", "SLURM_SUBMIT_DIR": str(tmp_path), "ALEXNET_REPO": str(REPO),
           "FAKE_WORKERS": workers, "FAKE_REQUEUED": str(requeued)}  # fmt: skip
    proc = subprocess.run(["bash", str(SCRIPT), "train.epochs=1"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "got SIGUSR1" in proc.stderr
    if workers == "stop":
        assert requeued.read_text() == "41\n" and "requeueing job 41" in proc.stderr
    else:
        assert not requeued.exists() and "before the SIGUSR1 stop request took effect: not requeued" in proc.stderr
    assert not list(tmp_path.glob(".alexnet-stop-41*")), "the stop file or its marker was left behind"


PASS_THROUGH_SRUN = """#!/bin/bash
# Stands in for srun on one node: runs the task's command (from its `bash -c` on) as node 0.
while [[ $1 != bash ]]; do shift; done
SLURM_NODEID=0 exec "$@"
"""
# Stands in for torchrun's interpreter: SIGUSR1 comes to the whole job step (scancel
# --signal=USR1 without --batch); the workers stop on it and rank 0 leaves the reason.
STEP_SIGNALLED_PYTHON = """#!/bin/bash
kill -USR1 $$
sleep 0.2
echo "stopped at step 5 by signal $FAKE_SIGNAL" >"$ALEXNET_STOP_FILE.stopped"
exit 0
"""


def fake_slurm(tmp_path: Path, srun: str, **env: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", srun), ("scontrol", FAKE_SCONTROL), ("python", STEP_SIGNALLED_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "41",
            "SLURM_JOB_NODELIST": "ci-node1", "SLURM_SUBMIT_DIR": str(tmp_path), "ALEXNET_REPO": str(REPO),
            "FAKE_REQUEUED": str(tmp_path / "requeued"), "ALEXNET_PYTHON": str(bin_dir / "python"), **env}  # fmt: skip


@pytest.mark.parametrize("signal_name", ["SIGUSR1", "SIGTERM"])
def test_a_sigusr1_sent_to_the_job_step_requeues_and_torchrun_survives_it(tmp_path, signal_name):
    """torchrun had no SIGUSR1 handler and died of it (exit 138, no requeue) while the workers
    wrote their checkpoint; the script, which got no signal, did not requeue. Now torchrun ignores
    it and the workers' .stopped marker has the script requeue after a SIGUSR1 (not a SIGTERM)."""
    env = fake_slurm(tmp_path, PASS_THROUGH_SRUN, FAKE_SIGNAL=signal_name)
    proc = subprocess.run(["bash", str(SCRIPT), "train.epochs=1"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    requeued = tmp_path / "requeued"
    if signal_name == "SIGUSR1":
        assert "the workers got SIGUSR1 directly (stopped at step 5 by signal SIGUSR1;" in proc.stderr
        assert requeued.read_text() == "41\n" and "requeueing job 41" in proc.stderr
    else:
        assert "training ended with exit status 0 (stopped at step 5 by signal SIGTERM)" in proc.stderr
        assert not requeued.exists()
    assert not list(tmp_path.glob(".alexnet-stop-41*")), "the stop file or a marker was left behind"


def test_a_stop_file_that_cannot_be_made_stops_the_job_at_its_start(tmp_path):
    """Found only at SIGUSR1, under `set -e`: the script died and left the workers training
    unparented, with no checkpoint and no requeue."""
    env = fake_slurm(tmp_path, "#!/bin/bash\ntouch \"$SLURM_SUBMIT_DIR/srun-ran\"\n",
                     ALEXNET_STOP_FILE=str(tmp_path / "missing" / "stop"))  # fmt: skip
    proc = subprocess.run(["bash", str(SCRIPT), "train.epochs=1"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and not (tmp_path / "srun-ran").exists()
    assert f"alexnet.sh: error: cannot create the stop file {tmp_path / 'missing' / 'stop'} (ALEXNET_STOP_FILE;" in (
        proc.stderr
    )


RECORDING_SRUN = """#!/bin/bash
# Stands in for srun: records that the launch ran, and its PYTHONPATH.
echo "$PYTHONPATH" >"$FAKE_SRUN_RAN"
"""


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("ALEXNET_RDZV_PORT", "abc", "ALEXNET_RDZV_PORT must be a port number in [1, 65535]; got 'abc'"),
        ("ALEXNET_RDZV_PORT", "0", "ALEXNET_RDZV_PORT must be a port number in [1, 65535]; got '0'"),
        ("ALEXNET_RDZV_PORT", "99999", "ALEXNET_RDZV_PORT must be a port number in [1, 65535]; got '99999'"),
        ("ALEXNET_MAX_RESTARTS", "-1", "ALEXNET_MAX_RESTARTS must be a whole number >= 0; got '-1'"),
        ("ALEXNET_MAX_RESTARTS", "$(id)", "ALEXNET_MAX_RESTARTS must be a whole number >= 0; got '$(id)'"),
        ("ALEXNET_DRY_RUN", "maybe", "ALEXNET_DRY_RUN must be 1 (print the launch and exit) or 0; got 'maybe'"),
        ("ALEXNET_REPO", "/no/such", "ALEXNET_REPO=/no/such holds no launch/train.py (set it to the checkout's root)"),
        # Outside Slurm: `set -u`'s "unbound variable", exit 1 ("abc: unbound variable" of a job id abc).
        ("SLURM_JOB_ID", "abc", "SLURM_JOB_ID must be a job number; got 'abc'"),
        ("SLURM_JOB_NODELIST", "", "SLURM_JOB_NODELIST is not set: submit with sbatch (or run inside salloc)"),
    ],
)
def test_the_script_s_environment_is_checked_before_the_launch(tmp_path, variable, value, said):
    """A bad port or restart count failed once per node inside torchrun (a traceback; port 0
    hung on several nodes); ALEXNET_DRY_RUN=0 was a dry run; a wrong ALEXNET_REPO was passed
    over for the submit folder's checkout. Each is now one line before srun, exit 2."""
    env = fake_slurm(tmp_path, RECORDING_SRUN, FAKE_SRUN_RAN=str(tmp_path / "ran"), **{variable: value})
    proc = subprocess.run(["bash", str(SCRIPT), "train.epochs=1"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(said), proc.stderr
    assert not (tmp_path / "ran").exists()


def test_the_launch_imports_the_checkout_s_own_package(tmp_path):
    """Only launch/ was on the path: the workers imported whichever copy of `alexnet` pip had
    installed, not the checkout the script named. And ALEXNET_DRY_RUN=0 launches."""
    env = fake_slurm(tmp_path, RECORDING_SRUN, FAKE_SRUN_RAN=str(tmp_path / "ran"), ALEXNET_DRY_RUN="0",
                     PYTHONPATH="/elsewhere")  # fmt: skip
    subprocess.run(["bash", str(SCRIPT), "train.epochs=1"], capture_output=True, text=True, env=env, timeout=60)
    assert (tmp_path / "ran").read_text() == f"{REPO}:/elsewhere\n"


def test_a_config_file_that_is_not_there_is_named_before_the_launch(tmp_path):
    """`--config launch/configs/...` submitted from another folder than the checkout's root was
    read from the submit folder on every node, after the queue wait: torchrun's report per node."""
    env = fake_slurm(tmp_path, RECORDING_SRUN, FAKE_SRUN_RAN=str(tmp_path / "ran"))
    for args in (["--config", "launch/configs/demo.yaml"], ["--config=launch/configs/demo.yaml"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60,
                              cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 2 and not (tmp_path / "ran").exists(), proc.stderr
        assert proc.stderr.strip().endswith(
            f"--config launch/configs/demo.yaml: no such file (relative to {tmp_path}, the submit folder); the "
            f"checkout has {REPO}/launch/configs/demo.yaml: give that path, or submit from the checkout's root"
        ), proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT), "--config", str(REPO / "launch/configs/demo.yaml")],
                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)  # fmt: skip
    assert (tmp_path / "ran").exists(), proc.stderr
