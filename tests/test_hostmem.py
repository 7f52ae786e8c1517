"""train.host_memory: with "retain", a steady loop of big CPU tensors stops faulting in fresh pages."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# A step-like loop: two 40 MiB tensors allocated and freed per iteration (above glibc's mmap
# threshold, as a batch-32 conv1 activation is). Minor page faults are counted by the kernel, so
# the figure is exact, not a timing.
LOOP = """
import json, resource, sys, torch
from alexnet.hostmem import apply_host_memory
applied = apply_host_memory(sys.argv[1])
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(10 * 2**20)
    y = x * 2 + 1
    del x, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""

PAGES_PER_ITERATION = 2 * 40 * 2**20 // 4096  # two 40 MiB tensors in 4 KiB pages


def _loop(policy: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOOP, policy], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")
def test_retain_reuses_warm_pages_and_system_keeps_glibc_defaults():
    system, retain = _loop("system"), _loop("retain")
    assert system["applied"] is False and retain["applied"] is True
    # glibc's default: every iteration maps fresh pages for both tensors
    assert min(system["faults"][-3:]) > 0.9 * PAGES_PER_ITERATION
    # retained: once the heap has grown to the working set, the loop touches no new page
    assert max(retain["faults"][-3:]) < 0.01 * PAGES_PER_ITERATION


def test_unknown_policy_is_a_config_error():
    from alexnet.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.host_memory"):
        load_config(None, ["train.host_memory=huge"])
