"""Where a study's calls run: in this process, in local worker processes, on Ray, or as SLURM jobs.

`StudyContext` hands its calls to an `Executor`: `submit` starts one call (or queues it) and `next_done` waits for
any of them to finish, so a caller may start new calls while others run (`StudyContext.train_and_analyse`); `run`
starts a list of calls and yields `(index, error, result)` as each finishes (`StudyContext.map`). Every backend runs a
call through `capture`, so a call's own exception comes back as its `error` the same way everywhere; a worker that
dies (killed, out of memory, a lost node, a job past its time limit) comes back as `WorkerLost`. Ctrl-C stops
everything in flight.

    LaunchConfig(launcher="local", workers=4)                  # spawned processes (the default)
    LaunchConfig(launcher="ray", address="auto")               # tasks on a running Ray cluster
    LaunchConfig(launcher="slurm", partition="gpu", time=120)  # one SLURM job per call (submitit)

Ray and submitit are optional extras (`pip install "toylab[ray]"`, `"toylab[slurm]"`), imported
only when their launcher is used; the machines they reach must have toylab installed.

Trust: submitit hands each SLURM job's result back as a pickle in the study's `launcher/` folder, which this
process unpickles, so whoever can write there can run code as the user running the study. `SlurmJobs` therefore
makes that folder private (0700) and refuses one that another user owns or that the group or others can write to;
the study directory above it must be as trusted as the user's own home.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from toylab import io
from toylab.errors import ToylabError

MAX_WORKERS = 1024
"""The most workers a launcher takes (a local pool's queues and semaphores overflow far beyond it)."""
Call = tuple[Any, ...]
Done = tuple[int, BaseException | None, Any]
"""A finished call: its index, its exception (None if it returned) and its result."""


class WorkerLost(Exception):
    """The worker running a call died before the call returned."""


@dataclass(frozen=True)
class LaunchConfig:
    """Where a study's training runs and other parallel work go (`toylab study run --launcher ...`)."""

    launcher: Literal["local", "ray", "slurm"] = "local"
    workers: int = 1
    """local: processes at once (1 runs everything in this process); ray: CPUs of a local instance."""
    address: str | None = None
    """ray: "auto" or "ray://HOST:PORT" of a running cluster; None starts a local instance."""
    partition: str | None = None
    """slurm: the partition to submit to (None: the cluster's default)."""
    time: int = 60
    """slurm: time limit of each job, in minutes."""
    cluster: Literal["slurm", "local", "debug"] = "slurm"
    """slurm: submitit's backend; "local" runs each job as a local process (for trying it out and tests)."""

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be in [1, {MAX_WORKERS}] (got {self.workers})")
        if self.time < 1:
            raise ValueError(f"time must be >= 1 minute (got {self.time})")
        if self.address is not None and self.launcher != "ray":
            raise ValueError(f"address applies to the ray launcher only (launcher is {self.launcher})")
        if self.partition is not None and self.launcher != "slurm":
            raise ValueError(f"partition applies to the slurm launcher only (launcher is {self.launcher})")
        if self.launcher == "slurm" and self.cluster == "slurm" and shutil.which("sbatch") is None:
            raise ValueError("the slurm launcher needs SLURM's sbatch, which is not on this machine's PATH; "
                             "run on a SLURM login node, or use --launcher local or ray")

    def check(self) -> None:
        """Refuse (one-line ToylabError) a launcher that cannot run anything, before a study's directory is made: a Ray
        address where nothing listens, or `auto` where Ray finds no running cluster (the slurm launcher's sbatch is
        checked on construction)."""
        if self.launcher == "ray" and self.address is not None:
            reachable(running_cluster() if self.address == "auto" else self.address)

    def executor(self, folder: Path) -> Executor:
        """An executor for this launcher; SLURM jobs keep their logs under `folder`."""
        if self.launcher == "ray":
            return RayTasks(self.address, self.workers)
        if self.launcher == "slurm":
            return SlurmJobs(Path(folder), self.cluster, self.partition, self.time)
        return LocalProcesses(self.workers) if self.workers > 1 else InProcess()


def capture(function: Callable[..., Any], args: Call, threads: int | None = None) -> tuple[BaseException | None, Any]:
    """Run `function(*args)` (in a worker) and return `(exception, None)` or `(None, result)`."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        return None, function(*args)
    except Exception as error:  # noqa: BLE001 - handed back to the caller, who decides
        return error, None


class Executor(ABC):
    """Runs calls somewhere and hands them back as they finish."""

    parallel: int = 1
    """How many calls may run at once (a caller keeps this many in flight; the progress bar says it)."""
    _submitted: int = 0

    def submit(self, function: Callable[..., Any], args: Call) -> int:
        """Start `function(*args)` (or queue it); its number, counting the calls submitted to this executor from 0."""
        number = self._submitted
        self._submitted += 1
        self.start(number, function, args)
        return number

    @abstractmethod
    def start(self, number: int, function: Callable[..., Any], args: Call) -> None:
        """Start call `number` (`submit`)."""

    @abstractmethod
    def next_done(self) -> Done:
        """Wait for a submitted call to finish and hand it back: `(its number, error, result)`, each call once."""

    def run(self, function: Callable[..., Any], calls: Sequence[Call]) -> Iterator[Done]:
        """Start every call and yield `(index in calls, error, result)` as each finishes."""
        index = {self.submit(function, args): i for i, args in enumerate(calls)}
        for _ in calls:
            number, error, result = self.next_done()
            yield index[number], error, result

    def stop(self) -> None:
        """Stop what is in flight now (after Ctrl-C or an error)."""

    def close(self) -> None:
        """Release the workers after a normal finish."""


class InProcess(Executor):
    """One call after another in this process, each when it is waited for."""

    def __init__(self) -> None:
        self._queue: deque[tuple[int, Callable[..., Any], Call]] = deque()

    def start(self, number: int, function: Callable[..., Any], args: Call) -> None:
        self._queue.append((number, function, args))

    def next_done(self) -> Done:
        number, function, args = self._queue.popleft()
        return number, *capture(function, args)

    def stop(self) -> None:
        self._queue.clear()


def start_worker(parent: int) -> None:
    """Set up a local worker process: one torch thread, Ctrl-C left to the parent, death with the parent.

    A thread polls the parent's pid: when the parent dies (even by SIGKILL), the worker exits within
    a second instead of training on as an orphan that could write into a run directory later. It starts
    first, so a parent killed while its workers still import torch (seconds) leaves none behind.
    """
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="toylab-parent-watch").start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)


class LocalProcesses(Executor):
    """A pool of spawned processes, started on first use and kept for every later `run`."""

    def __init__(self, workers: int) -> None:
        self.parallel = workers
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict[Future, int] = {}

    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(self.parallel, mp_context=context, initializer=start_worker, initargs=(os.getpid(),))
        return self._pool

    def start(self, number: int, function: Callable[..., Any], args: Call) -> None:
        try:
            future = self.pool().submit(capture, function, args)
        except BrokenProcessPool:  # a worker died: the calls in flight come back lost (`next_done`); a fresh pool takes this one
            self._kill()
            future = self.pool().submit(capture, function, args)
        self._futures[future] = number

    def next_done(self) -> Done:
        done, _ = wait(self._futures, return_when=FIRST_COMPLETED)
        future = min(done, key=self._futures.__getitem__)
        number = self._futures.pop(future)
        try:
            return number, *future.result()
        except (BrokenProcessPool, CancelledError) as error:  # a worker died: every call still in the pool is lost with it
            return number, WorkerLost(f"a worker process died ({error or 'its pool was shut down'})"), None

    def _kill(self) -> None:
        """Cancel what has not started and kill the processes running the rest."""
        if self._pool is None:
            return
        processes = list((getattr(self._pool, "_processes", None) or {}).values())  # no public way to kill them
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()
        for process in processes:
            process.join()
        self._pool = None

    def stop(self) -> None:
        """Kill the workers and forget every call in flight."""
        self._kill()
        self._futures.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def running_cluster() -> str:
    """The address `auto` connects to, found by Ray's own search (`RAY_ADDRESS`, then the cluster this machine last
    started); a one-line error when there is none (Ray would say so only after the study's directory is made)."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        address = canonicalize_bootstrap_address("auto")
    except ConnectionError:
        address = None
    if not address:
        raise ToylabError("--address auto found no running Ray cluster (none started on this machine, no RAY_ADDRESS); "
                          "start one (ray start --head), give its HOST:PORT, or leave --address out for a local instance")
    return address


def reachable(address: str, seconds: float = 5.0) -> None:
    """Fail fast, in one line, when nothing listens at a Ray address (Ray itself retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except ValueError:
        raise ToylabError(f"invalid Ray address {address!r}; valid: auto, HOST:PORT, ray://HOST:PORT") from None
    except OSError as error:
        raise ToylabError(f"cannot reach a Ray cluster at {address}: {error.strerror or error}; "
                          "check the address, or leave --address out for a local instance") from None


class RayTasks(Executor):
    """Ray tasks of one CPU each, on a running cluster or on a local instance started here."""

    def __init__(self, address: str | None, workers: int) -> None:
        try:
            import ray
        except ImportError:
            raise ToylabError('the ray launcher needs Ray: pip install "toylab[ray]"') from None
        self.ray, self.parallel = ray, workers
        self._started = False
        self._refs: dict[Any, int] = {}
        if not ray.is_initialized():
            if address not in (None, "auto"):
                reachable(address)
            options: dict[str, Any] = {"address": address} if address else {"num_cpus": workers, "include_dashboard": False}
            try:
                ray.init(**options, log_to_driver=False, logging_level="ERROR", configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise ToylabError(f"cannot reach a Ray cluster at {address}: {str(error).splitlines()[0]}; "
                                  "start one (`ray start --head`) or leave --address out for a local instance") from None
            self._started = True
            if address:
                self.parallel = max(1, int(ray.cluster_resources().get("CPU", 1)))

        self._remote = ray.remote(num_cpus=1, max_retries=0)(capture)

    def start(self, number: int, function: Callable[..., Any], args: Call) -> None:
        self._refs[self._remote.remote(function, args, 1)] = number

    def next_done(self) -> Done:
        (ready,), _ = self.ray.wait(list(self._refs), num_returns=1)
        number = self._refs.pop(ready)
        try:
            return number, *self.ray.get(ready)
        except self.ray.exceptions.RayError as error:  # the worker or its node died
            return number, WorkerLost(f"a Ray worker died ({str(error).splitlines()[0]})"), None

    def stop(self) -> None:
        for ref in self._refs:
            self.ray.cancel(ref, force=True)
        self._refs = {}
        self.close()

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False


def private_folder(folder: Path) -> Path:
    """`folder`, made 0700 if absent; a one-line ToylabError if another user owns it or the group or others may write
    to it (what is unpickled from it would run here: see the module's note on trust)."""
    with io.writing(folder):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ToylabError(f"refusing the launcher folder {folder}: other users can write to it (mode {stat.filemode(info.st_mode)}, "
                          f"owner uid {info.st_uid}), and job results are unpickled from it; chmod 700 it (or delete it)")
    return folder


class SlurmJobs(Executor):
    """One SLURM job per call through submitit; job logs and results go to the private `folder`."""

    def __init__(self, folder: Path, cluster: str, partition: str | None, minutes: int) -> None:
        try:
            import submitit
        except ImportError:
            raise ToylabError('the slurm launcher needs submitit: pip install "toylab[slurm]"') from None
        folder = private_folder(Path(folder))
        self.submitit = submitit
        self.executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
        parameters: dict[str, Any] = {"timeout_min": minutes, "cpus_per_task": 1, "name": "toylab"}
        if partition:
            parameters["slurm_partition"] = partition
        self.executor.update_parameters(**parameters)
        self.parallel = 1_000_000  # the scheduler decides
        self._jobs: list[tuple[Any, int]] = []

    def start(self, number: int, function: Callable[..., Any], args: Call) -> None:
        try:
            self._jobs.append((self.executor.submit(capture, function, args, 1), number))
        except Exception as error:  # noqa: BLE001 - sbatch missing or refusing: one line
            raise ToylabError(f"cannot submit SLURM jobs: {str(error).splitlines()[0]}") from None

    def next_done(self) -> Done:
        while True:
            for at, (job, number) in enumerate(self._jobs):
                if job.done():
                    del self._jobs[at]
                    return number, *self.result(job)
            time.sleep(0.5)

    def result(self, job: Any) -> tuple[BaseException | None, Any]:
        """A finished job's `capture` result, or `WorkerLost` when SLURM killed it or it failed outside the call."""
        try:
            return job.result()
        except self.submitit.core.utils.UncompletedJobError as error:  # killed, preempted, out of time
            return WorkerLost(f"SLURM job {job.job_id} did not finish ({str(error).splitlines()[0]})"), None
        except self.submitit.core.utils.FailedJobError as error:
            return WorkerLost(f"SLURM job {job.job_id} failed ({str(error).splitlines()[0]})"), None

    def stop(self) -> None:
        for job, _ in self._jobs:
            job.cancel(check=False)
        self._jobs = []
