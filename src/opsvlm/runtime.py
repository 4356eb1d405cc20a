"""Connecting to Ray: the one place that decides between a cluster and a local instance, and what reaches the console.

``ray job submit`` sets ``RAY_ADDRESS`` for the job's driver, so a job connects to its cluster; run as a plain
script on a laptop it starts a local Ray instance bound to 127.0.0.1 (Ray's own servers otherwise listen on all
interfaces).

By default the console shows the job's own stage lines only: worker output, Ray's driver-side logs (dataset plans,
progress bars, Train controller messages) and MLflow's chatter go to files in the Ray session's log folder
(``/tmp/ray/session_latest/logs``: ``opsvlm-driver.log`` for the driver, ``worker-*.out/err`` for the workers).
``verbose=True`` (the jobs' ``--verbose``) restores Ray's usual output.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

__all__ = ["init_ray"]

DRIVER_LOG = "opsvlm-driver.log"
# Loggers whose console output is Ray's or a library's business, not the job's.
_QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.serve", "mlflow", "alembic", "DeepSpeed", "py.warnings")


def init_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Connect to Ray once per process.

    Args:
        address: Cluster address (``ray://...``, ``host:port`` or ``auto``). ``None`` uses ``RAY_ADDRESS`` when
            set (as under ``ray job submit``), else starts a local instance on 127.0.0.1.
        num_cpus: CPUs for a local instance (default: all).
        verbose: Show worker output and Ray's logs on the console (default: they go to the session's log files).
    """
    import ray

    if ray.is_initialized():
        return
    if not verbose:  # MLflow draws a progress bar for every artifact download and prints a link for every run
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        import torch

        if not torch.cuda.is_available():  # DeepSpeed otherwise warns on import that it fell back to the CPU
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    held = None if verbose else _hold_library_logs()  # ray.init itself logs (auth token, dashboard): keep it quiet
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose)
    else:
        # address="local": always a fresh instance, never attach to some other `ray start` cluster on this machine
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=verbose,
        )
    if held is not None:
        _quiet_console(_driver_log_dir(ray.get_runtime_context().get_session_name()), held)


def _driver_log_dir(session_name: str) -> Path:
    """The log folder of this Ray session on the driver's machine (Ray's temp root is ``RAY_TMPDIR`` or /tmp)."""
    root = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
    return root / session_name / "logs"


def _hold_library_logs() -> logging.handlers.MemoryHandler:
    """Take Ray's and MLflow's loggers off the console; keep what they log until the session's log file exists."""
    held = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        for existing in list(logger.handlers):
            if isinstance(existing, logging.StreamHandler) and not isinstance(existing, logging.FileHandler):
                logger.removeHandler(existing)
        logger.addHandler(held)
        logger.propagate = False
    logging.captureWarnings(True)  # library warnings (deprecations, fallbacks) go to the same place
    return held


def _quiet_console(log_dir: Path, held: logging.handlers.MemoryHandler) -> None:
    """Send Ray's and MLflow's driver-side logs (and what ``held`` kept) to ``<log_dir>/opsvlm-driver.log``, and turn
    off Ray Data's progress bars and execution banners (the jobs print their own progress)."""
    import mlflow  # noqa: F401  (imported here so that the console handler it installs on import is removed below)
    import ray.data
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" when the tiny fixture is built
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / DRIVER_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    held.setTarget(handler)
    held.flush()
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.removeHandler(held)
        # ray.data installs its own console handler when first imported: remove it as well
        for existing in list(logger.handlers):
            if isinstance(existing, logging.StreamHandler) and not isinstance(existing, logging.FileHandler):
                logger.removeHandler(existing)
        logger.addHandler(handler)
