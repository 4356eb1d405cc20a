"""Connecting to Ray: the one place that decides between a cluster and a local instance.

``ray job submit`` sets ``RAY_ADDRESS`` for the job's driver, so a job connects to its cluster; run as a plain
script on a laptop it starts a local Ray instance bound to 127.0.0.1 (Ray's own servers otherwise listen on all
interfaces).
"""

from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process.

    Args:
        address: Cluster address (``ray://...``, ``host:port`` or ``auto``). ``None`` uses ``RAY_ADDRESS`` when
            set (as under ``ray job submit``), else starts a local instance on 127.0.0.1.
        num_cpus: CPUs for a local instance (default: all).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": always a fresh instance, never attach to some other `ray start` cluster on this machine
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )
