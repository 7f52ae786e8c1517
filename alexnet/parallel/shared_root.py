"""Every rank sees the run folder rank 0 writes (run.root on a shared file system).

Rank 0 alone writes a run's checkpoints, metrics and summary. With run.root on node-local disks
(`/tmp`, a node's scratch) a multi-node run trained as if all were well, its checkpoints on rank
0's node alone; the loss showed only at the resume, hours later: ranks that found different
checkpoints stopped (rank 0's node among them), or, on a fresh set of nodes, none found any and
the run started over from step 0 without a word. So at the start rank 0 makes a file of a new
name in the folder and every rank looks for it.

A new name: a file system that caches lookups (NFS keeps "no such file" answers for a while)
answers a name nobody has asked for from the server.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from alexnet.config import ConfigError
from alexnet.parallel.agree import ranks_text

PROBE_PREFIX = ".shared-check-"
_HOSTS_SHOWN = 4


@dataclass(frozen=True)
class Probe:
    """The file rank 0 made: its name, whether it is in the run folder (a folder that exists,
    which a resume reads) or in run.root (a new run's folder is not made yet: a run that cannot
    start leaves none), and where rank 0 sees it (for the message)."""

    name: str
    in_run_dir: bool
    path: str
    host: str


def make_probe(run_dir: Path) -> Probe:
    """Rank 0: a new empty file in the run folder where it exists, else in run.root (made if
    missing, as the run would make it)."""
    in_run_dir = run_dir.is_dir()
    folder = run_dir if in_run_dir else run_dir.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
    os.close(fd)
    return Probe(Path(path).name, in_run_dir, path, socket.gethostname())


def remove_probe(probe: Probe) -> None:
    Path(probe.path).unlink(missing_ok=True)


def check_probe_seen(probe: Probe, run_dir: Path) -> None:
    """Collective: every rank finds `probe` in its own spelling of the folder (run.root may name
    a node's mount its own way), else every rank raises a ConfigError naming the ranks and hosts
    that do not."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    folder = run_dir if probe.in_run_dir else run_dir.parent
    gathered: list[tuple[bool, str]] = [(True, "")] * dist.get_world_size()
    dist.all_gather_object(gathered, ((folder / probe.name).exists(), socket.gethostname()))
    unseen = unseen_message(probe, gathered)
    if unseen is not None:
        raise ConfigError(unseen, ("run.root",))


def unseen_message(probe: Probe, gathered: list[tuple[bool, str]]) -> str | None:
    """The error where some rank did not see `probe` (`gathered`: by rank, whether it did and its
    host), else None: the ranks and their hosts said once (a node of 8 ranks is one host)."""
    seen = [s for s, _ in gathered]
    if all(seen):
        return None
    hosts = list(dict.fromkeys(host for s, host in gathered if not s))
    shown = f"host{'s' if len(hosts) > 1 else ''} " + ", ".join(hosts[:_HOSTS_SHOWN])
    shown += " ..." if len(hosts) > _HOSTS_SHOWN else ""
    return (
        f"config key 'run.root': {ranks_text(seen, False)} (of {len(gathered)}; {shown}) cannot see the file "
        f"{probe.path} that rank 0 (host {probe.host}) made; run.root must be a folder every rank sees (a shared "
        "file system): rank 0 alone writes the checkpoints, and a resume on other nodes would not find them "
        "(nothing was trained)"
    )
