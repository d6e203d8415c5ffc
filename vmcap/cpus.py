"""How many CPUs this process may use: the default for every compression thread count."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on: a capture kernel's nr_cpus=1, a taskset or a cpuset.

    A thread count of 0 means this many; 1 means compressing in the calling
    thread, with no pool.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
