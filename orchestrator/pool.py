"""Long-lived worker actors that keep base models loaded across cells, and the pool that places them.

A `CellWorker` is a Ray actor that holds one cell's resources (`cpus_per_cell`, the model's
`gpus_per_cell`; more than one GPU means the model is sharded with accelerate inside it) for its
whole life. It imports torch, transformers and peft once and keeps the models it loaded in a cache
bounded by `resources.model_cache_bytes`, least recently used evicted. The pool starts workers while
the live nodes have room (or, with `resources.max_workers`, up to that many whether or not they
have: Ray holds the ones no node can take yet, and an autoscaler adds nodes for them), retires idle
ones whose resources no pending cell needs, and gives a free worker the next cell of a model it
already holds (`next_model`), so reloads are rare. A worker gets cells only once it has started, so
no cell waits on a worker that never does. Workers outlive one `run_cells` call: a loop that runs
batch after batch in one process keeps its models.
"""

from __future__ import annotations

import math
import os
import socket
from collections import deque
from dataclasses import dataclass, field

import ray
import torch
from ray import ObjectRef
from ray.actor import ActorHandle

from workers.cell import CellConfig
from workers.run_cell import CellRun, WorkerCache, fit_process_to, git_sha, library_versions, run_cell

CACHE_FRACTION = 0.5  # of the worker's memory share kept for cached models; the rest is for the cell's work


@dataclass(frozen=True)
class Shape:
    """What a worker reserves; a cell runs on a worker of its own shape."""

    cpus: float
    gpus: float
    cache_bytes: int | None  # None: CACHE_FRACTION of the worker's memory share


@dataclass(frozen=True)
class CellResult:
    row: dict
    worker: str  # host:pid of the actor
    loaded: bool  # the cell had to load its model
    held: tuple[str, ...]  # models (spec JSON) loaded after the cell, least recently used first
    # The cell failed and left the worker's CUDA context unusable (an illegal memory access, a
    # device-side assert break it for good): every later cell there would fail in seconds, so the
    # driver retires the worker and retries the cell on a fresh one, keeping this row's error if none is left.
    broken: bool = False


def on_gpus(shape: Shape) -> bool:
    return shape.gpus > 0 and torch.cuda.is_available()


def default_cache_bytes(shape: Shape) -> int:
    """Half of the worker's share of memory: of its GPUs (part of one for a fractional cell), else of RAM."""
    if on_gpus(shape):
        visible = sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
        return int(CACHE_FRACTION * visible * min(shape.gpus, 1.0))
    return host_cache_bytes(shape)


def host_cache_bytes(shape: Shape) -> int:
    """Half of the worker's share of RAM (its CPUs' share of the node's)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(CACHE_FRACTION * ram * min(1.0, shape.cpus / (os.cpu_count() or 1)))


def live_nodes() -> list[dict[str, float]]:
    """The resources of each live node of the cluster."""
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def node_capacity(shape: Shape, nodes: list[dict[str, float]]) -> int:
    """How many workers of `shape` the nodes can hold at once, counted node by node as Ray places
    them: a fraction of a GPU never spans two GPUs, more than one GPU means whole GPUs on one node.
    (Cluster totals would overcount: 3 workers of 0.6 GPU "fit" in 2 GPUs, and the third never starts.)"""
    count = 0
    for resources in nodes:
        fits = math.floor(resources.get("CPU", 0) / shape.cpus + 1e-9)
        if shape.gpus > 0:
            gpus = int(resources.get("GPU", 0) + 1e-9)
            per_gpu = math.floor(1 / shape.gpus + 1e-9) * gpus if shape.gpus < 1 else math.floor(gpus / shape.gpus + 1e-9)
            fits = min(fits, per_gpu)
        count += fits
    return count


class CellWorker:
    """Runs cells one at a time in one process, keeping loaded models between them."""

    def __init__(self, shape: Shape) -> None:
        fit_process_to(shape.cpus, shape.gpus)
        library_versions(), git_sha()  # paid once here (imports, a git call), not in the first cell
        self.shard = shape.gpus > 1
        # A GPU worker's host memory (neutral references) has a budget of its own, apart from its GPUs': its
        # RAM share, but never less than the GPU budget the references shared before (a node of many CPUs gives
        # a one-CPU worker a small share of RAM that its GPU's neighbours do not use).
        device_bytes = default_cache_bytes(shape) if shape.cache_bytes is None else shape.cache_bytes
        host_bytes = max(host_cache_bytes(shape), device_bytes) if on_gpus(shape) else None
        self.cache = WorkerCache(device_bytes, host_bytes=host_bytes)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def ready(self) -> str:
        """Answers once Ray has placed this actor and its `__init__` (the imports) is done."""
        return self.name

    def run(self, cell_json: str, attempt: int) -> CellResult:
        cell = CellConfig.model_validate_json(cell_json)
        loads = self.cache.loads
        row = run_cell(cell, CellRun(cache=self.cache, attempt=attempt, shard=self.shard))
        broken = row["status"] == "failed" and not self.device_usable()
        return CellResult(row, self.name, self.cache.loads > loads, tuple(self.cache.held()), broken)

    def device_usable(self) -> bool:
        """Whether this process can still run CUDA work (trivially so when it never started CUDA)."""
        if not torch.cuda.is_initialized():
            return True
        try:
            torch.cuda.synchronize()
            return torch.ones(1, device="cuda").add_(1).item() == 2
        except RuntimeError:
            return False


_RemoteCellWorker = ray.remote(CellWorker)


@dataclass(eq=False)
class Worker:
    """The driver's view of one actor: what it reserves, holds and is running."""

    actor: ActorHandle
    shape: Shape
    ready_ref: ObjectRef  # resolves when the actor has started (or raises: it died starting)
    started: bool = False  # cells go only to started workers: one Ray cannot place yet may never start
    held: list[str] = field(default_factory=list)  # mirror of the actor's cache, least recently used first
    running: str | None = None  # model of the cell in flight, if any


def next_model(worker: Worker, queues: dict[str, deque], others: list[Worker]) -> str:
    """The model whose next cell `worker` runs: the most recently used one it holds that has cells
    waiting; else the one with the most waiting cells per worker already on it (so two workers
    spread over two models instead of both loading the first)."""
    for model in reversed(worker.held):
        if queues.get(model):
            return model
    on = {m: sum(m in w.held or m == w.running for w in others) for m in queues}
    return max((m for m in queues if queues[m]), key=lambda m: len(queues[m]) / (1 + on[m]))


class WorkerPool:
    """The live workers of this process's Ray session."""

    def __init__(self) -> None:
        self.workers: list[Worker] = []
        self._session: str | None = None

    def attach(self) -> None:
        """Forget workers of an earlier Ray connection: they died with it. Keyed on the job and the
        node this driver runs on: a fresh local cluster's first job has the old one's job id (and so
        the same driver worker id), but a new node id; a new job on the same cluster, a new job id."""
        context = ray.get_runtime_context()
        session = f"{context.get_job_id()}@{context.get_node_id()}"
        if session != self._session:
            self.workers, self._session = [], session

    def idle(self, shape: Shape | None = None) -> list[Worker]:
        return [w for w in self.workers if w.started and w.running is None and (shape is None or w.shape == shape)]

    def pending(self, shape: Shape | None = None) -> list[Worker]:
        """Workers asked for that have not started: Ray has no node for them yet, or they are importing."""
        return [w for w in self.workers if not w.started and (shape is None or w.shape == shape)]

    def busy(self) -> int:
        return sum(w.running is not None for w in self.workers)

    def has_room(self, shape: Shape, max_workers: int | None = None) -> bool:
        """Whether to ask for one more worker of `shape`: with `max_workers`, while there are fewer
        (the cluster may grow to hold them); else whether the live nodes have the resources for it
        besides ours (exactly when all workers have one shape; with several, node by node for this
        shape and in total)."""
        if max_workers is not None:
            return len(self.workers) < max_workers
        total = ray.cluster_resources()
        cpus = sum(w.shape.cpus for w in self.workers) + shape.cpus
        gpus = sum(w.shape.gpus for w in self.workers) + shape.gpus
        if cpus > total.get("CPU", 0) + 1e-9 or gpus > total.get("GPU", 0) + 1e-9:
            return False
        return sum(w.shape == shape for w in self.workers) < node_capacity(shape, live_nodes())

    def usage(self) -> str:
        """What of the cluster is in use now, and how much of it by this driver's started workers: a run waiting
        for room on a cluster other jobs fill is told so, not only that an autoscaler may add a node."""
        total, free = ray.cluster_resources(), ray.available_resources()
        parts = []
        for key, unit, share in (("CPU", "CPUs", lambda shape: shape.cpus), ("GPU", "GPUs", lambda shape: shape.gpus)):
            if total.get(key) or key == "CPU":
                used = total.get(key, 0) - free.get(key, 0)
                started = sum(share(w.shape) for w in self.workers if w.started)
                starting = sum(share(w.shape) for w in self.pending())  # a placed one holds its share while it imports
                parts.append(f"{used:g} of {total.get(key, 0):g} {unit} ({started:g} by this run's workers, up to {starting:g} "
                             "more by those starting)")  # fmt: skip
        return "in use now: " + ", ".join(parts) + "; `ray status` shows the demand"

    def start(self, shape: Shape) -> Worker:
        actor = _RemoteCellWorker.options(num_cpus=shape.cpus, num_gpus=shape.gpus, max_restarts=0, max_task_retries=0).remote(shape)
        worker = Worker(actor, shape, actor.ready.remote())
        self.workers.append(worker)
        return worker

    def forget_dead(self, timeout_s: float = 10.0) -> None:
        """Retire idle workers that no longer answer: their node died while they waited (between an
        adaptive loop's batches, say). A cell handed to one would fail and use up one of its retries,
        and its reservation would keep a replacement from being asked for."""
        pings = {worker.actor.ready.remote(): worker for worker in self.idle()}
        done, _ = ray.wait(list(pings), num_returns=len(pings), timeout=timeout_s) if pings else ([], [])
        for ref in done:  # one that has not answered within the timeout is slow, not known dead: it stays
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                self.retire(pings[ref])

    def drop_unplaceable(self, shape: Shape, keep: int = 0) -> None:
        """Retire workers of `shape` not yet started, newest first, while more than `keep` are and
        the live nodes cannot hold every worker of the shape: the ones waiting for a node (to
        withdraw an autoscaler's demand, or because a node died since they were asked for). Those a
        live node holds are only importing: they stay, to take cells soon."""
        pending = self.pending(shape)
        if len(pending) <= keep:
            return
        capacity = node_capacity(shape, live_nodes())
        for worker in reversed(pending[keep:]):
            if sum(w.shape == shape for w in self.workers) <= capacity:
                return
            self.retire(worker)

    def retire(self, worker: Worker) -> None:
        """Stop the actor and give its resources back (also what to do with one that died)."""
        self.workers.remove(worker)
        ray.kill(worker.actor, no_restart=True)

    def shutdown(self) -> None:
        for worker in list(self.workers):
            self.retire(worker)


POOL = WorkerPool()
