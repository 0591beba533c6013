"""Which processes this one may fork, how many are worth it, and ending them."""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
from pathlib import Path

# Each worker copies the pages whose reference counts it touches; beyond a few workers memory
# grows faster than Phase 1 speeds up.
MAX_WORKERS = 8
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores() -> int:
    """CPU cores this process may use: its affinity, capped by a cgroup (container) quota."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def fork_unsafe_reason() -> str:
    """Why this process must not fork now; empty when it may."""
    if not hasattr(os, "fork"):
        return "this platform cannot fork"
    if threading.active_count() > 1:
        return "another thread is running (forking now could deadlock a child)"
    return ""


def workers_for(amount: int, *, per_worker: int) -> int:
    """How many processes are worth using for ``amount`` of work (1: stay serial).

    ``min(cores, amount // per_worker)``, at most :data:`MAX_WORKERS`; 1 where forking is not
    possible or not safe (another thread is running).
    """
    if fork_unsafe_reason():
        return 1
    return max(1, min(available_cores(), amount // max(1, per_worker), MAX_WORKERS))


def reap(process: multiprocessing.process.BaseProcess, grace: float) -> int | None:
    """Wait up to ``grace`` seconds for a child, then end it (terminate, then kill); its exit
    code, or None for a child never started."""
    if process.pid is None:
        return None
    process.join(grace)
    if process.is_alive():
        process.terminate()
        process.join(1.0)
    if process.is_alive():
        process.kill()
        process.join()
    return process.exitcode
