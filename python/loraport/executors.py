"""Where a catalog's tasks run (loraport.catalog): a process pool on this machine (the default,
nothing to start) or Ray (a local instance, or a cluster joined by address). Both run module-level
functions with picklable arguments and yield each task's result as it arrives, so the catalog's
two phases are one code path whichever runs them.

Faults: a task whose worker process dies (killed, out of memory) is run again, up to
``max_retries`` times. Ray does this itself (``max_retries`` of the remote function); a process
pool cannot say which of its tasks the dead worker held, so every task in flight when the pool
broke counts one attempt and is resubmitted to a fresh pool. Exceptions raised by a task are its
own business: the catalog's tasks return their errors as rows and never raise for bad input."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

DEFAULT_RETRIES = 3
# A local Ray instance's shared-memory object store: the catalog passes subspace cache entries
# and LoRA files through it only with transfer="object-store"; the rest is small.
LOCAL_OBJECT_STORE_BYTES = 200 << 20


class WorkerDied(RuntimeError):
    """A task's worker died on every attempt."""


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ProcessPool:
    """``workers`` fresh processes (spawned: no forked torch state) on this machine."""

    name = "process pool"

    def __init__(self, workers: int | None = None, max_retries: int = DEFAULT_RETRIES):
        self.workers = workers or cpu_count()
        self.max_retries = max_retries
        self._pool = None

    def slots(self) -> int:
        return self.workers

    def run(self, fn, tasks: list[tuple]):
        """Yield (index, result) for ``fn(*tasks[index])``, in completion order; a task that
        raised yields its exception, one whose worker died more than max_retries times a
        WorkerDied. The pool's processes are kept for the next call."""
        pending = dict(enumerate(tasks))
        attempts = dict.fromkeys(pending, 0)
        while pending:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            broken = False
            futures = {self._pool.submit(fn, *args): i for i, args in pending.items()}
            while futures and not broken:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in done:
                    i = futures.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        broken = True  # this task's worker, or another one, died
                        continue
                    except Exception as e:  # noqa: BLE001  (the task's own error, handed to the caller)
                        result = e
                    del pending[i]
                    yield i, result
            if broken:
                self.close(kill=True)
                for i in list(pending):
                    attempts[i] += 1
                    if attempts[i] > self.max_retries:
                        del pending[i]
                        yield i, WorkerDied(f"its worker process died {attempts[i]} times")

    def close(self, kill: bool = False) -> None:
        """Shut the pool down; ``kill``: a broken pool, whose surviving workers are killed first.
        Its manager thread joins them, and a survivor writing its result into a pipe nobody reads
        any more never exits: the test that kills a worker hung there about once in 20 runs."""
        if self._pool is not None:
            if kill:
                for process in list((getattr(self._pool, "_processes", None) or {}).values()):
                    process.kill()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayCluster:
    """Ray: ``address`` "local" starts a private instance on this machine (``workers`` CPUs, a
    small object store, no dashboard) and stops it on close; any other address joins that
    cluster (e.g. "auto" or "10.0.0.5:6379", after ``ray start --head`` there). ``workers``
    then caps the tasks in flight (default: the cluster's CPUs). A program that called ray.init
    itself keeps its connection, before and after."""

    name = "Ray"

    def __init__(self, address: str, workers: int | None = None, max_retries: int = DEFAULT_RETRIES):
        try:
            import ray
        except ImportError as e:
            raise ValueError("loraport: --ray needs Ray, which is not installed: pip install 'loraport[ray]'") from e
        self.ray = ray
        self.max_retries = max_retries
        self.started = not ray.is_initialized()
        if self.started and address == "local":
            # address="local": a new instance even where a cluster runs on this machine (without
            # it ray.init joins that cluster and then refuses num_cpus)
            ray.init(address="local", num_cpus=workers or cpu_count(), include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=False)  # fmt: skip
        elif self.started:
            ray.init(address=address, log_to_driver=False)
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.local = address == "local"

    def slots(self) -> int:
        return self.workers

    def run(self, fn, tasks: list[tuple]):
        """As ProcessPool.run, with at most ``workers`` tasks in flight (one CPU each)."""
        ray = self.ray
        remote = ray.remote(num_cpus=1, max_retries=self.max_retries, retry_exceptions=False)(fn)
        queue = list(enumerate(tasks))[::-1]
        flying: dict = {}
        while queue or flying:
            while queue and len(flying) < self.workers:
                i, args = queue.pop()
                flying[remote.remote(*args)] = i
            done, _ = ray.wait(list(flying), num_returns=1)
            for ref in done:
                i = flying.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.WorkerCrashedError as e:
                    result = WorkerDied(f"its worker process died {self.max_retries + 1} times ({e})")
                except ray.exceptions.RayTaskError as e:
                    result = e.as_instanceof_cause()
                yield i, result

    def put(self, value):
        return self.ray.put(value)

    def get(self, refs):
        return self.ray.get(refs)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
