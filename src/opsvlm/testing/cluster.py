"""A benchmark's own local Ray instance: never someone else's cluster, with exactly the CPUs asked for."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import ray

from opsvlm.runtime import init_ray

__all__ = ["start_ray"]


def start_ray(cpus: int, who: str | None = None) -> float:
    """Start a local Ray instance with ``cpus`` CPUs and Ray Data's progress bars off.

    Args:
        cpus: CPUs the instance offers (timings are compared at a fixed CPU count).
        who: Name in the exit messages; the running script's name when None.

    Returns:
        Seconds the start took.

    Raises:
        SystemExit: ``RAY_ADDRESS`` is set (the benchmark would attach to another instance), or Ray reports another
            CPU count than asked for.
    """
    who = who or Path(sys.argv[0]).stem
    if os.environ.get("RAY_ADDRESS"):
        sys.exit(f"{who}: unset RAY_ADDRESS: the benchmark needs its own local Ray instance with --cpus CPUs")
    started = time.perf_counter()
    init_ray(num_cpus=cpus)
    have = ray.cluster_resources().get("CPU", 0)
    if have != cpus:
        sys.exit(f"{who}: Ray has {have} CPUs, expected {cpus} (connected to another instance?)")
    ray.data.DataContext.get_current().enable_progress_bars = False
    return time.perf_counter() - started
