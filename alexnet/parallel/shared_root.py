"""Every rank sees the run folder rank 0 writes (run.root on a shared file system).

Rank 0 alone writes a run's checkpoints, metrics and summary. With run.root on node-local disks
(`/tmp`, a node's scratch) a multi-node run trained as if all were well, its checkpoints on rank
0's node alone; the loss showed only at the resume, hours later: ranks that found different
checkpoints stopped (rank 0's node among them), or, on a fresh set of nodes, none found any and
the run started over from step 0 without a word. So at the start rank 0 makes a file of a new
name in the run folder and every rank looks for it.

For a new run the file goes into the deepest folder above the run folder that exists: the run
folder and run.root are made on the same storage once the run starts, and a run that cannot
start leaves no folders behind. A rank that does not find the file lists its folder before it
says so: a file system that caches lookups (NFS keeps "no such file" answers for a while) reads
a listing from the server.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from alexnet.config import ConfigError
from alexnet.parallel.agree import gather_from_ranks, ranks_text

PROBE_PREFIX = ".shared-check-"
_HOSTS_SHOWN = 4


@dataclass(frozen=True)
class Probe:
    """The file rank 0 made: its name, its folder as the run folder's `up`-th parent (0: the run
    folder itself; each rank finds that folder in its own spelling of run.root, which nodes may
    spell their own way), and where rank 0 sees it (for the message)."""

    name: str
    up: int
    path: str
    host: str


def probe_folder(run_dir: Path, up: int) -> Path:
    """The run folder's `up`-th parent, of its absolute form (a relative run.root has few)."""
    run_dir = run_dir.absolute()
    return run_dir if up == 0 else run_dir.parents[up - 1]


def make_probe(run_dir: Path) -> Probe:
    """Rank 0: a new empty file in the deepest folder of the run folder's path that exists."""
    chain = [run_dir.absolute(), *run_dir.absolute().parents]  # ends at "/", which exists
    up, folder = next((i, f) for i, f in enumerate(chain) if f.is_dir())
    try:
        fd, path = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
    except OSError as exc:  # named by its folder: the file's random name means nothing to anyone
        raise OSError(exc.errno, exc.strerror, str(folder)) from None
    os.close(fd)
    return Probe(Path(path).name, up, path, socket.gethostname())


def remove_probe(probe: Probe) -> None:
    Path(probe.path).unlink(missing_ok=True)


def why_unseen(probe: Probe, run_dir: Path) -> str | None:
    """None where this rank sees `probe`; else why not, in a few words. Never raises: a rank
    that raised here would leave the others waiting in the collective that follows."""
    try:
        folder = probe_folder(run_dir, probe.up)
        if (folder / probe.name).exists() or probe.name in os.listdir(folder):  # the listing: the server's own
            return None
        return "no such file"
    except IndexError:
        return f"its run folder {run_dir} has fewer than {probe.up} folders above it"
    except OSError as exc:
        named = f"{exc.filename}: " if exc.filename else ""
        return f"{named}{exc.strerror or exc}"


def check_probe_seen(probe: Probe, run_dir: Path) -> None:
    """Collective: every rank finds `probe` in its own spelling of the folder, else every rank
    raises a ConfigError naming the ranks and hosts that do not."""
    unseen = unseen_message(probe, gather_from_ranks((why_unseen(probe, run_dir), socket.gethostname())))
    if unseen is not None:
        raise ConfigError(unseen, ("run.root",))


def unseen_message(probe: Probe, gathered: list[tuple[str | None, str]]) -> str | None:
    """The error where some rank did not see `probe` (`gathered`: by rank, why not, None where it
    did, and its host), else None: the ranks and their hosts said once (a node of 8 ranks is one
    host), with the first one's reason."""
    seen = [why is None for why, _ in gathered]
    if all(seen):
        return None
    hosts = list(dict.fromkeys(host for why, host in gathered if why is not None))
    shown = f"host{'s' if len(hosts) > 1 else ''} " + ", ".join(hosts[:_HOSTS_SHOWN])
    shown += " ..." if len(hosts) > _HOSTS_SHOWN else ""
    first = seen.index(False)
    return (
        f"config key 'run.root': {ranks_text(seen, False)} (of {len(gathered)}; {shown}) cannot see the file "
        f"{probe.path} that rank 0 (host {probe.host}) made (rank {first}: {gathered[first][0]}); run.root must "
        "be a folder every rank sees (a shared file system): rank 0 alone writes the checkpoints, and a resume "
        "on other nodes would not find them (nothing was trained)"
    )
