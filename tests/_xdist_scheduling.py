"""pytest-xdist's `--dist loadfile` (the README's test command), with a crashed worker recovered
instead of hanging the run. tests/conftest.py registers the hook; a pytest run outside this
folder takes it with `-p _xdist_scheduling` and this folder on PYTHONPATH.

pytest-xdist 3.8.0 (the newest release) puts a crashed worker's whole workload back on the queue,
the files it had already finished included (pytest-xdist#1378, #1323). Each finished file then
goes to a worker as an empty batch that never reports back, so no more work is handed out, and a
replacement worker given a file of one test waits for a second one that never comes (#1327): a
worker runs a test only once it holds the next one, or its shutdown. One worker that aborted at
95% of a CI run (gloo's "Resource deadlock avoided") left every worker waiting until CI's own
90-minute limit, with no summary. pytest-timeout's thread method and the faulthandler timeout
(setup.cfg) end a stuck test by ending its worker: without this scheduling, into the same hang.
"""

from __future__ import annotations

import pytest
from xdist.scheduler import LoadFileScheduling


class RecoveringLoadFileScheduling(LoadFileScheduling):
    """xdist's loadfile scheduling, but a crashed worker's unfinished tests alone go back on the
    queue, without the test it crashed in (reported failed already; run again, a test that ends
    its process would end the replacement's too), and a worker is kept more than two tests
    ahead while work remains."""

    def remove_node(self, node) -> str | None:
        workload = self.assigned_work.pop(node)
        unfinished = {scope: tests for scope, tests in workload.items() if not all(tests.values())}
        if not unfinished:
            return None  # a worker that ended normally
        # A worker runs its tests in the order it was given them: the first unfinished one is the
        # one it was running.
        scope, crashed = next(
            (scope, nodeid) for scope, tests in unfinished.items() for nodeid, done in tests.items() if not done
        )
        unfinished[scope][crashed] = True
        self.workqueue.update({other: tests for other, tests in unfinished.items() if not all(tests.values())})
        for other in self.assigned_work:
            self._reschedule(other)
        return crashed

    def _reschedule(self, node) -> None:
        """xdist's rule (more work once two or fewer tests are pending; shutdown once the queue is
        empty), applied until it holds: xdist assigns one file per call, and a file of one test
        left a fresh worker with a single test it would not start."""
        while not node.shutting_down:
            if not self.workqueue:
                node.shutdown()
                return
            if self._pending_of(self.assigned_work[node]) > 2:
                return
            self._assign_work_unit(node)


@pytest.hookimpl(optionalhook=True)  # unknown to a run with `-p no:xdist`
def pytest_xdist_make_scheduler(config, log):
    """Ours for `--dist loadfile`; xdist's own for every other mode."""
    if config.getvalue("dist") == "loadfile":
        return RecoveringLoadFileScheduling(config, log)
    return None
