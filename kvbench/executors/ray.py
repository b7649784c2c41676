"""``--executor ray``: the cells of a run go to Ray actors; this process (the driver) is the only writer.

The driver expands the grid and drops the stored cells (``kvbench.runner.plan``), starts the actors (one GPU each,
or one CPU each), and sends each ready actor one cell at a time; rows come back as cells finish and are appended
at once, so the "at most the cells in flight are lost" promise holds with one cell in flight per actor. Each actor
loads the run's model and prepares its methods once, in its constructor.

An actor that dies (killed, out of host memory, its node lost) costs only its cell in flight: that cell goes to
another actor, and a cell whose second actor dies too is recorded as an error row (a cell that kills every process
running it must not end the sweep). A dead actor is replaced, up to as many replacements as there are workers;
when none is left, the driver stops with one line, finished rows kept. Ctrl-C kills the actors and keeps what
finished. A cell that raises is an ordinary error row, as in a serial run (``kvbench.runner.evaluate_row``).
"""

from __future__ import annotations

import os
import socket
from collections import Counter, deque
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from itertools import count
from typing import Any

import ray
from ray.exceptions import RayActorError

from kvbench.evaluate import Cell
from kvbench.executors import ExecutorError
from kvbench.provenance import device_name
from kvbench.results import ResultsStore
from kvbench.runner import RunConfig, evaluate_row, load_prepared, progress_bar, row_for
from kvbench.tasks import Sample

LOCAL_OBJECT_STORE_BYTES = 256 << 20  # rows and samples are small; a local cluster need not reserve 30 % of RAM
_state = {"started_here": False}


def connect(address: str | None, workers: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local one with room for ``workers`` CPU
    actors. Does nothing when Ray is already initialised (a caller's cluster is left as it is)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, workers or 1), include_dashboard=False,
                     log_to_driver=False, configure_logging=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES)
            _state["started_here"] = True
    except Exception as error:  # noqa: BLE001 - any failure to reach the cluster means the same to the user
        raise ValueError(f"--executor ray: cannot {'reach the Ray cluster at ' + address if address else 'start Ray'}"
                         f" ({_last_line(error)})") from None


def disconnect() -> None:
    """Shut down the local cluster this process started; a cluster it joined goes on."""
    if _state["started_here"]:
        ray.shutdown()
        _state["started_here"] = False


def cluster_device(requested: str | None, address: str | None, workers: int | None = None) -> str:
    """The workers' device: ``cuda`` when the cluster has GPUs (each actor gets one), else ``cpu``; ``--device`` may
    force ``cpu``, or ask for ``cuda``, which the cluster must then have (this machine need not)."""
    if requested is not None and requested not in ("cpu", "cuda"):
        raise ValueError(f"--device {requested[:40]}: with --executor ray, use cpu or cuda (each worker gets a GPU "
                         "of its own)")
    connect(address, workers)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if requested == "cuda" and not gpus:
        raise ValueError("--device cuda: the Ray cluster has no GPU; use --device cpu")
    return requested or ("cuda" if gpus else "cpu")


@dataclass(frozen=True)
class Job:
    """A cell as sent to an actor: names the actor resolves against its own prepared methods and tasks."""

    method: str
    budget: float
    task: str
    sample: Sample
    query_aware: bool

    @classmethod
    def of(cls, cell: Cell) -> Job:
        return cls(cell.spec.canonical, cell.budget, cell.task.name, cell.sample, cell.query_aware)


class Worker:
    """One actor: the run's model, loaded and prepared once, evaluating the cells it is sent."""

    def __init__(self, config: RunConfig) -> None:
        device = "cuda" if config.device.startswith("cuda") else "cpu"  # Ray shows an actor only its own GPU
        self.config = config
        self.model, self.tokenizer = load_prepared(config.model, device, config.dtype, config.attn_implementation,
                                                   config.methods)
        self.specs = {spec.canonical: spec for spec in config.methods}
        self.tasks = {task.name: task() for task in config.tasks}
        self.device = device_name(device)

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": self.device}

    def evaluate(self, job: Job) -> dict[str, Any]:
        cell = Cell(self.specs[job.method], job.budget, self.tasks[job.task], job.sample, job.query_aware)
        return evaluate_row(self.config, self.model, self.tokenizer, cell)


def worker_count(config: RunConfig) -> int:
    if config.workers is not None:
        return config.workers
    return max(1, int(ray.cluster_resources().get("GPU", 0))) if config.device.startswith("cuda") else 1


def run_cells(config: RunConfig, store: ResultsStore, todo: Sequence[Cell]) -> int:
    """Evaluate ``todo`` on Ray actors, appending each row as it arrives; returns the number of error rows."""
    connect(config.ray_address, config.workers)
    try:
        return _Dispatch(config, store, todo).run()
    finally:
        disconnect()


class _Dispatch:
    """The driver's loop: actors start, each takes a cell when idle, rows are written as they come back."""

    def __init__(self, config: RunConfig, store: ResultsStore, todo: Sequence[Cell]) -> None:
        self.config, self.store, self.todo = config, store, todo
        self.workers = min(worker_count(config), len(todo))  # a worker without a cell would load a model for nothing
        resources = {"num_gpus": 1} if config.device.startswith("cuda") else {"num_cpus": 1}
        self.factory = ray.remote(max_restarts=0, max_task_retries=0, **resources)(Worker)
        self.starts_left = 2 * self.workers  # the first start of each worker, then as many replacements
        self.numbers = count()
        self.actors: dict[int, Any] = {}
        self.pending: dict[Any, tuple[int, int | None]] = {}  # result -> (worker, cell index; None: its start)
        self.idle: deque[int] = deque()
        self.queue = deque(range(len(todo)))
        self.deaths: Counter[int] = Counter()  # per cell: actors that died running it
        self.failures = 0

    def run(self) -> int:
        with progress_bar(self.config, len(self.todo)) as self.progress:
            self.progress.set_postfix_str(f"starting {self.workers} Ray workers")
            try:
                for _ in range(self.workers):
                    self._start()
                while self.queue or any(index is not None for _, index in self.pending.values()):
                    self._dispatch()
                    if not self.pending:
                        raise ExecutorError(f"every Ray worker died; {len(self.queue)} cell(s) were not run: rerun "
                                            "with the same --run-id to resume")
                    ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=1.0)  # short: Ctrl-C gets in
                    for ref in ready:
                        self._receive(ref)
            finally:
                for actor in self.actors.values():
                    _kill(actor)
        return self.failures

    def _start(self) -> None:
        number = next(self.numbers)
        self.starts_left -= 1
        actor = self.factory.remote(self.config)
        self.actors[number] = actor
        self.pending[actor.ready.remote()] = (number, None)

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            number, index = self.idle.popleft(), self.queue.popleft()
            self.pending[self.actors[number].evaluate.remote(Job.of(self.todo[index]))] = (number, index)
            self.progress.set_postfix_str(f"{len(self.actors)} workers")

    def _receive(self, ref: Any) -> None:
        number, index = self.pending.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as error:
            self._lost(number, index, error)
            return
        self.idle.append(number)
        if index is None:
            self.progress.write(f"kvbench: Ray worker {number} ready: pid {result['pid']} on {result['host']}, "
                                f"{result['device']}")
            return
        self.store.append(result)
        self.failures += result["status"] == "error"
        self.progress.update(1)

    def _lost(self, number: int, index: int | None, error: Exception) -> None:
        """An actor died: its cell goes to another actor (or becomes an error row the second time)."""
        _kill(self.actors.pop(number))
        reason = _last_line(error)
        what = "while starting" if index is None else f"running {self.todo[index].spec.canonical} @ " \
               f"{self.todo[index].budget:g} {self.todo[index].sample.sample_id}"
        self.progress.write(f"kvbench: Ray worker {number} died {what} ({reason})")
        if index is not None:
            self.deaths[index] += 1
            if self.deaths[index] >= 2:
                row = row_for(self.config, self.todo[index])
                self.store.append(row | {"status": "error", "error": f"WorkerDied: two Ray workers died running "
                                                                     f"this cell (last: {reason})"})
                self.failures += 1
                self.progress.update(1)
            else:
                self.queue.appendleft(index)
        if self.starts_left > 0:
            self._start()


def _kill(actor: Any) -> None:
    with suppress(Exception):  # an actor already gone needs no killing
        ray.kill(actor)


def _last_line(error: BaseException) -> str:
    """The informative line of a Ray error (its message ends with the cause), at most 200 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:200] + "…"
