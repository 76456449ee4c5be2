"""Where candidates are built and measured: a local process pool, or Ray.

Both run `measure_candidate` on plain-data jobs and return results in job order; neither is a
scheduler of ours. The process pool starts its workers with `spawn` (a forked torch or
onnxruntime is not safe) and keeps them for the whole search, so each imports torch once.
Ray (`--executor ray`, the `ray` extra) connects to the cluster in `RAY_ADDRESS` when set, else
starts a local one on this machine; each candidate is one Ray task.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol

from surgery.diagnostics import HintedError
from surgery.search.measure import Job, measure_candidate

EXECUTORS = ("process", "ray")


class Executor(Protocol):
    """Runs candidate jobs, in parallel where it can."""

    workers: int

    def run(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """The measurements of `jobs`, in order."""

    def close(self) -> None:
        """Release the workers."""


class ProcessExecutor:
    """A local pool of `workers` processes."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def run(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """Each job in a worker process; results in job order."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return list(self._pool.map(measure_candidate, jobs))

    def close(self) -> None:
        """Stop the workers."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


class RayExecutor:
    """Candidates as Ray tasks, each asking for `cpus_per_task` CPUs."""

    def __init__(self, workers: int, cpus_per_task: int = 1):
        try:
            import ray
        except ImportError as error:
            raise HintedError("--executor ray needs Ray", "pip install 'surgery[ray]'") from error
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(num_cpus=workers * cpus_per_task, **options)
            self._started = True
        self.workers = workers
        self._remote = ray.remote(num_cpus=cpus_per_task)(measure_candidate)

    def run(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """Each job as a Ray task; results in job order."""
        return self._ray.get([self._remote.remote(job) for job in jobs])

    def close(self) -> None:
        """Shut down the Ray instance this executor started (a cluster it joined stays up)."""
        if self._started:
            self._ray.shutdown()
            self._started = False


def make_executor(kind: str, workers: int) -> Executor:
    """The executor named on the command line."""
    if kind == "ray":
        return RayExecutor(workers)
    if kind == "process":
        return ProcessExecutor(workers)
    raise HintedError(f"unknown executor '{kind}'", "executors: " + ", ".join(EXECUTORS))
