"""Worker model cache and the long-lived worker actors: memory-bounded LRU, and loads per worker."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from datetime import datetime, timezone

import pyarrow as pa
import pytest
import ray
import torch

from orchestrator import driver, pool
from orchestrator.claims import Claims
from orchestrator.driver import run_cells, shutdown_workers, starved
from orchestrator.errors import ROWS_LOST_NOTE, StoreWriteError, WorkersNotStartingError
from orchestrator.grid import PlannedCell, expand
from orchestrator.pool import POOL, CellWorker, Shape, node_capacity
from orchestrator.spec import load_spec
from orchestrator.store import ResultsStore
from workers.cache import WorkerCache, estimated_bytes, estimated_params, model_bytes
from workers.models.loading import count_parameters, resolve_path
from workers.cell import CellConfig, ModelSpec
from workers.metrics import neutral_reference


@pytest.fixture(scope="module")
def specs(test_ladder) -> dict[str, ModelSpec]:
    xs, s = (ModelSpec(id=m) for m in test_ladder)
    return {"xs": xs, "s": s, "s16": s.model_copy(update={"dtype": "bfloat16"})}


@pytest.fixture(scope="module")
def sizes(specs) -> dict[str, int]:
    return {name: model_bytes(WorkerCache().model(spec, 8).model) for name, spec in specs.items()}


def test_the_size_estimate_is_what_the_loaded_model_takes(specs, sizes):
    assert {name: estimated_bytes(spec) for name, spec in specs.items()} == sizes
    assert sizes["xs"] < sizes["s16"] < sizes["s"], sizes  # the eviction test below relies on this order


def test_the_parameter_estimate_is_what_a_row_records(specs):
    """The adaptive cost model's prior for an unrun model: the count its rows will store (run_cell
    records count_parameters of the loaded model as params_total)."""
    counts = {name: estimated_params(spec) for name, spec in specs.items()}
    assert counts == {name: count_parameters(WorkerCache().model(spec, 8).model)[0] for name, spec in specs.items()}
    assert 0 < counts["xs"] < counts["s"] == counts["s16"], counts


def test_least_recently_used_models_are_evicted_by_bytes(specs, sizes):
    cache = WorkerCache(max_bytes=sizes["xs"] + sizes["s"])
    held = lambda: [ModelSpec.model_validate_json(s) for s in cache.held()]  # noqa: E731
    cache.model(specs["xs"], 8), cache.model(specs["s"], 8)
    assert held() == [specs["xs"], specs["s"]] and cache.loads == 2  # both fit exactly
    cache.model(specs["xs"], 8)  # a hit: xs becomes the most recently used
    assert held() == [specs["s"], specs["xs"]] and cache.loads == 2
    cache.model(specs["s16"], 8)  # xs + s + s16 is over budget: s, least recently used, goes
    assert held() == [specs["xs"], specs["s16"]] and cache.loads == 3
    assert cache.resident_bytes == sizes["xs"] + sizes["s16"] <= cache.max_bytes
    cache.model(specs["s"], 8)  # s16 + s is over budget too: xs and then s16 go
    assert held() == [specs["s"]] and cache.loads == 4


def test_a_model_bigger_than_the_budget_still_loads_alone(specs):
    cache = WorkerCache(max_bytes=0)
    cache.model(specs["xs"], 8), cache.model(specs["s"], 8)
    assert [ModelSpec.model_validate_json(s) for s in cache.held()] == [specs["s"]] and cache.loads == 2


def test_an_evicted_model_in_a_reference_cycle_is_freed_at_once(specs):
    """accelerate's hooks on a model split over GPUs put a bound forward on each module: a cycle that `del`
    leaves alive until Python's collector runs, holding the model's GPU memory while the next one is placed."""
    import gc
    import weakref

    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    def loaded_in_a_cycle(cache: WorkerCache, spec: ModelSpec) -> weakref.ref:
        model = cache.model(spec, 8).model
        add_hook_to_module(model, AlignDevicesHook(execution_device="cpu", io_same_device=True))
        return weakref.ref(model)

    gc.disable()  # the collector running by itself during a load would free it too, by chance
    try:
        cache = WorkerCache(max_bytes=0)
        evicted = loaded_in_a_cycle(cache, specs["xs"])
        cache.model(specs["s"], 8)  # no room for two: xs goes before s loads
        assert evicted() is None
    finally:
        gc.enable()


def test_a_discarded_model_reloads_but_keeps_its_baselines(specs):
    cache = WorkerCache(max_bytes=10**9)
    first = cache.model(specs["xs"], 8)
    computed = []
    cache.baseline(specs["xs"], "ctx", lambda: computed.append(1) or "baseline")
    cache.discard(specs["xs"])
    assert cache.held() == [] and cache.model(specs["xs"], 8) is not first and cache.loads == 2
    assert cache.baseline(specs["xs"], "ctx", lambda: computed.append(1) or "again") == "baseline" and computed == [1]


def test_a_reload_that_brings_other_weights_drops_the_baselines_kept_for_it(specs, monkeypatch):
    """A hub model reloaded after a failed cell can come back at another commit (its branch moved): the
    baselines kept across the discard were scored on the old weights, and a base cell would then show a shift."""
    import workers.cache

    cache = WorkerCache(max_bytes=10**9)
    cache.model(specs["xs"], 8)
    cache.baseline(specs["xs"], "ctx", lambda: "scored on c1")
    cache.discard(specs["xs"])
    load = workers.cache.load_language_model

    def moved(*args, **kwargs):
        lm = load(*args, **kwargs)
        lm.provenance = {**lm.provenance, "model_commit": "c2"}
        return lm

    monkeypatch.setattr(workers.cache, "load_language_model", moved)
    cache.model(specs["xs"], 8)
    assert cache.baseline(specs["xs"], "ctx", lambda: "scored on c2") == "scored on c2"
    cache.discard(specs["xs"])
    cache.model(specs["xs"], 8)  # the same weights again: what was scored on them is kept
    assert cache.baseline(specs["xs"], "ctx", lambda: "again") == "scored on c2"


def test_neutral_references_count_against_the_budget_and_leave_with_their_model(specs, sizes):
    """A reference is full-vocabulary log-probs in host memory (gigabytes at a 150k vocabulary):
    it counts against the budget, and one of a model no longer loaded is dropped."""
    cache = WorkerCache(max_bytes=sizes["xs"] + sizes["s"])  # both models fit exactly, without references
    texts = ["the river runs past the old mill and on to the sea"] * 4
    lm = cache.model(specs["xs"], 8)
    reference = cache.neutral(specs["xs"], "n", lambda: neutral_reference(lm, texts))
    assert reference.nbytes > 0 and cache.resident_bytes == sizes["xs"] + reference.nbytes
    cache.model(specs["s"], 8)  # xs + its reference + s is over budget: xs goes, and its reference with it
    assert cache.held() == [specs["s"].model_dump_json()] and cache.resident_bytes == sizes["s"]
    lm = cache.model(specs["s"], 8)
    cache.neutral(specs["s"], "n", lambda: neutral_reference(lm, texts))
    cache.discard(specs["s"])  # a failed cell: s is dropped, its reference kept for a reload
    assert cache.resident_bytes > 0
    cache.model(specs["xs"], 8)  # another model comes instead: s's reference is of no use any more
    assert cache.resident_bytes == sizes["xs"]


def test_a_new_neutral_reference_makes_the_other_models_make_way(specs, sizes):
    """A reference computed for a loaded model (new neutral settings) went over the budget and stayed there
    until the next load: the least recently used other model is evicted for it, never the model in use."""
    cache = WorkerCache(max_bytes=sizes["xs"] + sizes["s"])
    cache.model(specs["xs"], 8)
    lm = cache.model(specs["s"], 8)  # both fit exactly
    reference = cache.neutral(specs["s"], "n", lambda: neutral_reference(lm, ["the river runs past the old mill"] * 4))
    assert cache.held() == [specs["s"].model_dump_json()] and cache.resident_bytes == sizes["s"] + reference.nbytes


def test_on_a_gpu_worker_host_memory_and_the_gpus_have_budgets_of_their_own(specs, sizes, monkeypatch):
    """A neutral reference (host RAM) counted against the GPU models' budget: one over what was left evicted a GPU
    model that fit its GPU. Models on an accelerator count against
    `max_bytes`, references and CPU models against `host_bytes`."""
    from workers.metrics import NeutralReference

    # no GPU here: a model whose spec says device "auto" stands for one loaded on the GPU
    monkeypatch.setattr(WorkerCache, "_in_host_memory", lambda self, key: ModelSpec.model_validate_json(key[0]).device == "cpu")
    reference = NeutralReference(("text",), [torch.zeros(1000)], 1.0, 0.1)
    cache = WorkerCache(max_bytes=sizes["xs"] + sizes["s"], host_bytes=reference.nbytes)
    cache.model(specs["xs"], 8), cache.model(specs["s"], 8)  # both fit the GPU budget exactly
    cache.neutral(specs["s"], "n", lambda: reference)  # fits the host budget: no GPU model makes way for it
    assert cache.held() == [specs["xs"].model_dump_json(), specs["s"].model_dump_json()]
    cache.neutral(specs["xs"], "n", lambda: reference)  # past the host budget: s's reference goes, with s
    assert cache.held() == [specs["xs"].model_dump_json()]
    on_cpu = specs["s"].model_copy(update={"device": "cpu"})
    cache.model(on_cpu, 8)  # host memory: xs (its reference) makes way; the GPU budget has room but is not the one
    assert cache.held() == [on_cpu.model_dump_json()]


def test_a_cells_memory_peak_leaves_out_the_other_models_its_worker_holds(specs, sizes):
    cache = WorkerCache(max_bytes=10**9)
    cache.model(specs["xs"], 8), cache.model(specs["s"], 8)
    assert cache.others_bytes(specs["s"], torch.device("cpu")) == sizes["xs"]
    assert cache.others_bytes(specs["xs"], torch.device("cpu")) == sizes["s"]
    assert cache.others_bytes(specs["s"], torch.device("cuda", 0)) == 0  # the CPU copies are not in a GPU's peak


@pytest.fixture(scope="module")
def local_ray(ladder_cache):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        shutdown_workers()
        ray.shutdown()


@pytest.mark.slow  # ~1 minute on 2 busy cores, most of it Ray and two workers starting
def test_two_batches_over_two_models_load_each_model_once_per_worker(local_ray, test_ladder, write_sweep):
    """Two workers, two models, two `run_cells` calls: the workers (and what they hold) carry over."""
    spec = load_spec(write_sweep({
        "sweep": "actors", "models": [{"id": m} for m in test_ladder], "tasks": ["facts"], "methods": {"base": {}},
        "budgets": [0], "seeds": list(range(6)), "eval": {"test_size": 20, "validation_size": 0, "neutral_size": 2},
    }))  # fmt: skip
    cells = expand(spec)
    assert len(cells) == 12
    store = ResultsStore(spec.results_dir)
    first = run_cells([c for c in cells if c.config.seed < 3], store, spec.resources, progress=False, dashboard=False)
    workers_after_first = list(POOL.workers)  # a worker still importing when the batch ended is kept for the next
    second = run_cells([c for c in cells if c.config.seed >= 3], store, spec.resources, progress=False, dashboard=False)
    outcomes = [first, second]

    assert [o.ok for o in outcomes] == [6, 6] and [o.failed for o in outcomes] == [0, 0]
    rows = store.read().to_pandas()
    assert len(rows) == 12 and rows.cell_id.is_unique and (rows.status == "ok").all()
    loads = outcomes[0].loads + outcomes[1].loads
    assert loads and max(loads.values()) == 1, f"a worker loaded a model twice: {loads}"
    assert {model for _, model in loads} == set(test_ladder)
    assert len(POOL.workers) == 2 and POOL.workers == workers_after_first, "the second batch must run on the first batch's workers"
    assert sum(o.total_model_loads for o in outcomes) == sum(loads.values()) <= 4


@pytest.mark.slow  # ~1 minute: two fresh workers (the budget is part of what a worker is)
def test_workers_hold_no_more_models_than_their_memory_budget(local_ray, test_ladder, write_sweep, sizes):
    """Three models on two workers: someone must switch, and a budget that fits one model evicts the other."""
    budget = sizes["s16"]  # xs fits, s16 fits, xs + s16 does not (and s, over budget, loads alone)
    xs, s = test_ladder
    s16 = resolve_path(ModelSpec(id=s))  # s's weights under another id, in bf16 (one id twice would pool in the fits)
    spec = load_spec(write_sweep({
        "sweep": "budget", "models": [{"id": xs}, {"id": s}, {"id": s16, "dtype": "bfloat16"}], "tasks": ["facts"],
        "methods": {"base": {}}, "budgets": [0], "seeds": [0, 1], "eval": {"test_size": 20, "validation_size": 0, "neutral_size": 2},
        "resources": {"model_cache_bytes": budget},
    }))  # fmt: skip
    outcome = run_cells(expand(spec), ResultsStore(spec.results_dir), spec.resources, progress=False, dashboard=False)
    assert outcome.ok == 6 and outcome.total_model_loads >= 3
    assert len(POOL.workers) == 2 and all(w.shape.cache_bytes == budget for w in POOL.workers)
    # what each worker reported holding after its last cell (one that was still importing when the
    # other had run every cell holds nothing)
    assert sorted(len(w.held) for w in POOL.workers) in ([1, 1], [0, 1])


@pytest.mark.slow  # ~30 s: one fresh worker, six small cells
def test_the_longest_cells_are_handed_out_first(local_ray, test_ladder, write_sweep):
    """Planned cheapest first (base, then LoRA by budget); they must be handed out longest first, so
    the sweep's last cells are its shortest and no worker waits on one long straggler.

    One worker (2 CPUs a cell), so start order is hand-out order: with two, a worker whose start-up
    (imports) ends a second earlier runs its first cell and takes the next before the other starts.
    """
    spec = load_spec(write_sweep({
        "sweep": "order", "models": [{"id": test_ladder[0]}], "tasks": ["facts"],
        "methods": {"base": {}, "lora": {"rank": 2, "train": {"batch_size": 4, "epochs": 1, "min_steps": 1, "max_steps": 8, "checkpoints": 1}}},
        "budgets": [4, 16], "method_budgets": {"base": [0]}, "seeds": [0, 1],
        "eval": {"test_size": 8, "validation_size": 4, "neutral_size": 2}, "resources": {"cpus_per_cell": 2},
    }))  # fmt: skip
    cells = expand(spec)
    assert [(c.config.method, c.config.budget) for c in cells][::2] == [("base", 0), ("lora", 4), ("lora", 16)]
    outcome = run_cells(cells, ResultsStore(spec.results_dir), spec.resources, progress=False, dashboard=False)
    assert outcome.ok == 6
    rows = ResultsStore(spec.results_dir).read().to_pandas().sort_values("started_at")
    started = list(zip(rows.method, rows.budget))
    assert started == [("lora", 16)] * 2 + [("lora", 4)] * 2 + [("base", 0)] * 2, started


def _base_sweep(write_sweep, test_ladder, name: str, seeds: int, resources: dict):
    return load_spec(write_sweep({
        "sweep": name, "models": [{"id": test_ladder[0]}], "tasks": ["facts"], "methods": {"base": {}}, "budgets": [0],
        "seeds": list(range(seeds)), "eval": {"test_size": 8, "validation_size": 0, "neutral_size": 2}, "resources": resources,
    }))  # fmt: skip


class RefusingStore(ResultsStore):
    """A store that refuses the rows of the cells named, `times` times each (None: every time), as a bucket with
    a hiccup or a disk that filled up would."""

    def __init__(self, root: str, refuse: set[str], times: int | None, error: type[Exception] = OSError) -> None:
        super().__init__(root)
        self.refuse, self.times, self.error, self.refused = refuse, times, error, Counter[str]()

    def write(self, row: dict) -> None:
        if row["cell_id"] in self.refuse and row["status"] == "ok" and (self.times is None or self.refused[row["cell_id"]] < self.times):
            self.refused[row["cell_id"]] += 1
            raise self.error(f"the store refused {row['slug']}")
        super().write(row)


@pytest.mark.slow  # ~40 s: two runs on one worker, then a rerun
def test_a_row_the_store_refuses_is_written_again_and_one_it_keeps_refusing_stops_the_run_with_the_rest_stored(
    local_ray, test_ladder, write_sweep, monkeypatch
):  # fmt: skip
    """One refused write raised out of the run: the cells finished beside it were lost with their workers, and a
    hiccup of an object store stopped a sweep. Now a row is written again after a wait; one the store keeps
    refusing stops the run (exit 3) once the other finished rows are stored, and a rerun runs that cell alone."""
    monkeypatch.setattr(driver, "STORE_RETRY_SECONDS", (0.1, 0.2))
    spec = _base_sweep(write_sweep, test_ladder, "hiccup", 4, {"cpus_per_cell": 1})
    cells = expand(spec)
    hiccup = RefusingStore(spec.results_dir, {cells[1].cell_id}, times=2)
    outcome = run_cells(cells, hiccup, spec.resources, progress=False, dashboard=False)
    assert outcome.ok == 4 and hiccup.refused[cells[1].cell_id] == 2 and hiccup.read().num_rows == 4

    spec = _base_sweep(write_sweep, test_ladder, "refused", 4, {"cpus_per_cell": 1})
    cells = expand(spec)
    refusing = RefusingStore(spec.results_dir, {cells[1].cell_id}, times=None)
    with pytest.raises(StoreWriteError, match=rf"could not store the row of {cells[1].config.slug} after 3 tries: the store refused"):
        run_cells(cells, refusing, spec.resources, progress=False, dashboard=False)
    assert refusing.refused[cells[1].cell_id] == 3
    stored = set(refusing.read().column("cell_id").to_pylist())
    assert cells[1].cell_id not in stored
    rerun = run_cells([c for c in cells if c.cell_id not in stored], ResultsStore(spec.results_dir), spec.resources, progress=False, dashboard=False)
    assert rerun.skipped_claimed == 0, "the refused cell's claim must be released"
    rows = ResultsStore(spec.results_dir).read().to_pandas()
    assert sorted(rows.cell_id) == sorted(c.cell_id for c in cells) and (rows.status == "ok").all()

    # a row that does not fit the results schema (a worker's bug, not the store) is stored failed, and the sweep goes on
    spec = _base_sweep(write_sweep, test_ladder, "unfit", 4, {"cpus_per_cell": 1})
    cells = expand(spec)
    unfit = RefusingStore(spec.results_dir, {cells[1].cell_id}, times=None, error=pa.ArrowInvalid)
    outcome = run_cells(cells, unfit, spec.resources, progress=False, dashboard=False)
    rows = unfit.read().to_pandas().set_index("cell_id")
    assert outcome.ok == 3 and outcome.failed == 1 and len(rows) == 4
    assert rows.loc[cells[1].cell_id, "status"] == "failed"
    assert rows.loc[cells[1].cell_id, "error"].startswith("the cell's row could not be stored: ArrowInvalid: the store refused")


def test_a_worker_running_other_code_than_the_driver_stores_its_row_and_fails_the_planned_cell(local_ray, test_ladder, write_sweep):
    """The driver planned with one code and a worker ran another (a method's version bumped on disk mid-run): the row
    landed under an id no plan held, an adaptive run chose that cell again and again and overshot --max-cells
    (helper-129). Now the row is kept under its own id and the planned cell gets a failed row that says why."""
    spec = _base_sweep(write_sweep, test_ladder, "othercode", 2, {"cpus_per_cell": 1})
    cells = expand(spec)
    planned = cells[1].__dict__["cell_id"] = "0123456789abcdef0123"  # the id the driver's (older) code gave the cell
    store = ResultsStore(spec.results_dir)
    outcome = run_cells(cells, store, spec.resources, progress=False, dashboard=False)
    rows = store.read().to_pandas().set_index("cell_id")
    assert outcome.ok == 1 and outcome.failed == 1 and len(rows) == 3, rows[["slug", "status"]]
    assert rows.loc[cells[1].config.cell_id, "status"] == "ok"  # the worker's compute, under the id its code gave
    assert rows.loc[planned, "status"] == "failed" and rows.loc[planned, "error"].startswith(
        f"OtherCodeError: the worker computed this cell's id as {cells[1].config.cell_id}, not the planned {planned}"
    )
    assert "its row is stored under its own id, which a run planned with that code finds done" in rows.loc[planned, "error"]
    # a row of other code this driver's schema cannot hold (here: refused as such) does not stop the run
    spec = _base_sweep(write_sweep, test_ladder, "othercode-unfit", 2, {"cpus_per_cell": 1})
    cells = expand(spec)
    cells[1].__dict__["cell_id"] = planned
    unfit = RefusingStore(spec.results_dir, {cells[1].config.cell_id}, times=None, error=pa.ArrowInvalid)
    outcome = run_cells(cells, unfit, spec.resources, progress=False, dashboard=False)
    rows = unfit.read().to_pandas().set_index("cell_id")
    assert outcome.ok == 1 and outcome.failed == 1 and sorted(rows.index) == sorted([cells[0].cell_id, planned])
    assert f"its row is not stored (the store refused {cells[1].config.slug}) — rerun once" in rows.loc[planned, "error"], rows.loc[planned, "error"]


class RefusingClaims(Claims):
    """Claims whose store refuses the `refuse`-th acquire calls (counted from 1) of one run."""

    refuse: set[int] = set()
    calls = 0

    def acquire(self, cell_id: str, *, planned_at: float) -> bool:
        type(self).calls += 1
        if type(self).calls in self.refuse:
            raise OSError(f"the store refused the claim (call {type(self).calls})")
        return super().acquire(cell_id, planned_at=planned_at)


@pytest.mark.slow  # ~30 s: two runs on two workers, then a rerun
def test_a_claim_the_store_refuses_is_tried_again_and_one_it_keeps_refusing_stops_the_run_with_what_ran_stored(
    local_ray, test_ladder, write_sweep, monkeypatch
):  # fmt: skip
    """An OSError from claiming a cell raised out of the run: the cells running beside it were stopped and lost, and the
    CLI printed a traceback. Now a claim is tried again after a wait; one the store keeps refusing starts no more cells
    and stops the run (StoreWriteError, exit 3) once the cells running are stored, and a rerun runs the rest."""
    monkeypatch.setattr(driver, "STORE_RETRY_SECONDS", (0.1, 0.2))
    monkeypatch.setattr(driver, "Claims", RefusingClaims)
    monkeypatch.setattr(RefusingClaims, "refuse", {2})
    spec = _base_sweep(write_sweep, test_ladder, "claim-hiccup", 4, {"cpus_per_cell": 1})
    outcome = run_cells(expand(spec), ResultsStore(spec.results_dir), spec.resources, progress=False, dashboard=False)
    assert outcome.ok == 4 and RefusingClaims.calls == 5 and outcome.skipped_claimed == 0

    monkeypatch.setattr(RefusingClaims, "calls", 0)
    monkeypatch.setattr(RefusingClaims, "refuse", {3, 4, 5})  # the third cell's, every try
    spec = _base_sweep(write_sweep, test_ladder, "claim-refused", 4, {"cpus_per_cell": 1})
    cells, store = expand(spec), ResultsStore(spec.results_dir)
    with pytest.raises(StoreWriteError, match=r"could not claim \S+ after 3 tries: the store refused the claim \(call 5\); 2 cells not started"):
        run_cells(cells, store, spec.resources, progress=False, dashboard=False)
    assert store.read().num_rows == 2 and set(store.read().column("status").to_pylist()) == {"ok"}  # both cells that ran
    rerun = run_cells([c for c in cells if c.cell_id not in set(store.read().column("cell_id").to_pylist())], store,
                      spec.resources, progress=False, dashboard=False)  # fmt: skip
    assert rerun.ok == 2 and rerun.skipped_claimed == 0 and store.read().num_rows == 4


class InterruptedStore(RefusingStore):
    """Gets Ctrl-C as the driver writes a cell's row, and refuses that row once: the driver then waits to write it
    again."""

    def write(self, row: dict) -> None:
        if row["cell_id"] in self.refuse and not self.refused[row["cell_id"]]:
            os.kill(os.getpid(), signal.SIGINT)
        super().write(row)


@pytest.mark.slow  # ~10 s on a started worker
def test_ctrl_c_while_a_refused_row_waits_to_be_written_again_stops_the_run_once_the_row_is_stored(
    local_ray, test_ladder, write_sweep, monkeypatch
):  # fmt: skip
    """Ctrl-C in the wait before a refused row's next write raised there and lost the row, where the command's last
    line says every finished row is stored. Now the batch's rows are stored first, then the run stops."""
    monkeypatch.setattr(driver, "STORE_RETRY_SECONDS", (0.5, 0.5))
    spec = _base_sweep(write_sweep, test_ladder, "interrupted", 2, {"cpus_per_cell": 1, "max_workers": 1})
    cells = expand(spec)
    store = InterruptedStore(spec.results_dir, {cells[0].cell_id}, times=1)
    with pytest.raises(KeyboardInterrupt):
        run_cells(cells, store, spec.resources, progress=False, dashboard=False)
    assert cells[0].cell_id in set(store.read().column("cell_id").to_pylist()), "the interrupted row must be stored"
    assert store.refused[cells[0].cell_id] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_held_signal_is_delivered_to_the_handler_it_found_once_the_block_ends():
    """SIGTERM and Ctrl-C wait for the block (its rows stored), then reach the handlers in place before it, whatever
    those are; a second one breaks off the block at once; an ignored one stays ignored."""
    said, got = [], []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with driver._held_until_stored(said.append):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert got == [], "held while the block runs"
        assert got == [signal.SIGTERM] and len(said) == 1
    finally:
        signal.signal(signal.SIGTERM, previous)

    finished = []
    with pytest.raises(KeyboardInterrupt) as broken_off:
        with driver._held_until_stored(said.append):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            finished.append("first")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            finished.append("second")
    assert finished == ["first"] and said[-1].startswith("stopping now")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert ROWS_LOST_NOTE in broken_off.value.__notes__  # the CLI's last line then says rows were lost

    # the block stopping with an error of its own (a row the store refused for good) keeps it: that error says
    # what was lost, where the interrupt's message would say every finished row is stored
    with pytest.raises(StoreWriteError):
        with driver._held_until_stored(said.append):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise StoreWriteError("refused")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with driver._held_until_stored(said.append):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow  # seconds, on the module's Ray
def test_a_run_waiting_for_room_is_told_how_much_of_the_cluster_others_hold(local_ray):
    """A second sweep on a cluster another job fills waited with a message that an autoscaler adds a node; it now
    says what is in use and how little of it is its own."""
    shutdown_workers()

    @ray.remote(num_cpus=1)
    class OtherJob:
        def ping(self) -> int:
            return 1

    other = OtherJob.remote()
    ray.get(other.ping.remote())
    try:
        deadline = time.monotonic() + 20  # Ray's resource view catches up within its report period
        while (usage := POOL.usage()) != "in use now: 1 of 2 CPUs (0 by this run's workers, up to 0 more by those starting); `ray status` shows the demand":
            assert time.monotonic() < deadline, usage
            time.sleep(0.2)
    finally:
        ray.kill(other)


@pytest.mark.slow  # ~30 s: one worker starts
def test_workers_asked_for_beyond_what_the_cluster_holds_get_no_cells(local_ray, test_ladder, write_sweep):
    """max_workers 3 where one worker fits (2 CPUs a cell of 2): the other two wait, as they would
    for an autoscaler's node; a cell handed to one would wait forever. The started one runs every
    cell, and the two waiting are withdrawn when no cell is left for them."""
    shutdown_workers()  # an empty pool, whatever ran before
    spec = _base_sweep(write_sweep, test_ladder, "waiting", 4, {"cpus_per_cell": 2, "max_workers": 3})
    outcome = run_cells(expand(spec), ResultsStore(spec.results_dir), spec.resources, progress=False, dashboard=False)
    assert outcome.ok == 4 and len(outcome.model_loads) == 1, outcome
    assert len(POOL.workers) == 1 and not POOL.pending(), "the workers that never started must be withdrawn"
    shutdown_workers()


@pytest.mark.slow  # ~30 s: three workers start and die, then one starts
def test_workers_dying_as_they_start_stop_the_run_and_lose_nothing(local_ray, test_ladder, write_sweep, monkeypatch):
    """A worker whose start fails (a broken environment on its node) takes no cell; three in a row
    stop the run with the reason, every cell unclaimed, so a rerun with working workers runs them all."""

    class BrokenWorker(CellWorker):  # defined here, so Ray ships it by value to its worker processes
        def __init__(self, shape: Shape) -> None:
            raise ImportError("no module named 'flash_attn' on this node")

    shutdown_workers()
    spec = _base_sweep(write_sweep, test_ladder, "broken", 2, {"cpus_per_cell": 1})
    store = ResultsStore(spec.results_dir)
    monkeypatch.setattr(pool, "_RemoteCellWorker", ray.remote(BrokenWorker))
    with pytest.raises(WorkersNotStartingError, match=r"(?s)3 workers in a row died while starting.*flash_attn"):
        run_cells(expand(spec), store, spec.resources, progress=False, dashboard=False)
    assert store.read().num_rows == 0
    monkeypatch.undo()
    assert not POOL.workers
    outcome = run_cells(expand(spec), store, spec.resources, progress=False, dashboard=False)
    assert outcome.ok == 2 and outcome.skipped_claimed == 0, "the failed run must leave no cell claimed"
    shutdown_workers()


@pytest.mark.slow  # ~50 s: a Ray of two (declared) GPUs; four GPU workers die starting at once while two CPU workers run
def test_workers_of_one_shape_dying_as_they_start_leave_the_other_shapes_cells_running(local_ray, test_ladder, write_sweep, monkeypatch, tmp_path):
    """A GPU node group whose environment is broken stopped the run at its third failed worker, and the cells
    running on healthy CPU workers were cut off with it, hours of them perhaps. They finish and are stored; the
    broken shape's cells are not run (nor left claimed) and the run then stops with the reason. Its four workers
    die together: the fourth, given up with its shape, must not be retired a second time when its death is read."""
    starts = tmp_path / "failed-starts"

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 120
        while len(starts.read_text() if starts.exists() else "") < count and time.monotonic() < deadline:
            time.sleep(0.05)

    class HalfBrokenWorker(CellWorker):  # defined here, so Ray ships it by value to its worker processes
        def __init__(self, shape: Shape) -> None:
            if shape.gpus > 0:
                with open(starts, "a") as out:
                    out.write("x")
                wait_for(4)  # all four die within milliseconds: their deaths are read in one batch
                raise ImportError("no module named 'flash_attn' on the GPU nodes")
            super().__init__(shape)

        def run(self, cell_json: str, attempt: int):
            wait_for(4)  # running when the GPU workers die
            return super().run(cell_json, attempt)

    real_wait = ray.wait

    def wait_then_settle(refs, **options):
        ready = real_wait(refs, **options)
        if ready[0] and options.get("timeout") != 0 and starts.exists() and len(starts.read_text()) == 4:
            time.sleep(1.0)  # the other GPU workers' deaths land before the driver drains the batch
        return ready

    shutdown_workers()
    ray.shutdown()
    ray.init(num_cpus=6, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        monkeypatch.setattr(driver.ray, "wait", wait_then_settle)
        monkeypatch.setattr(pool, "_RemoteCellWorker", ray.remote(HalfBrokenWorker))
        spec = _base_sweep(write_sweep, test_ladder, "half-broken", 6, {"cpus_per_cell": 1})
        cells = [PlannedCell(c.config, 0.5 if c.config.seed >= 2 else 0.0) for c in expand(spec)]
        store = ResultsStore(spec.results_dir)
        with pytest.raises(WorkersNotStartingError, match=r"(?s)3 workers in a row died while starting.*flash_attn.*4 cells not run"):
            run_cells(cells, store, spec.resources, progress=False, dashboard=False)
        assert starts.read_text() == "xxxx"
        rows = store.read().to_pandas()
        assert sorted(rows.seed) == [0, 1] and (rows.status == "ok").all()
        assert not Claims(store).held_by_live_drivers(), "the cell not run must not stay claimed"
    finally:
        shutdown_workers()
        ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)  # local_ray's, for the tests after


@pytest.mark.slow  # ~30 s: two workers start, one after the other
def test_a_worker_whose_device_broke_is_replaced_and_the_last_attempt_keeps_the_cells_error(local_ray, test_ladder, write_sweep, monkeypatch, tmp_path):
    """A failed cell that leaves CUDA unusable (simulated: no CUDA here) retires its worker and runs
    again on a fresh one; with no retry left its row is stored with the cell's own error, not Ray's
    "the actor died"."""

    class UnusableDeviceWorker(CellWorker):  # defined here, so Ray ships it by value to its worker processes
        def device_usable(self) -> bool:
            return False

    shutdown_workers()
    (tmp_path / "broken-checkpoint").mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):  # plans, and fails to load in the cell
        (tmp_path / "broken-checkpoint" / name).write_text("{}")
    spec = load_spec(write_sweep({
        "sweep": "device", "models": [{"id": str(tmp_path / "broken-checkpoint")}], "tasks": ["facts"], "methods": {"base": {}},
        "budgets": [0], "seeds": [0], "eval": {"test_size": 8, "validation_size": 0, "neutral_size": 2},
        "resources": {"cpus_per_cell": 2, "max_retries": 1},
    }))  # fmt: skip
    monkeypatch.setattr(pool, "_RemoteCellWorker", ray.remote(UnusableDeviceWorker))
    store = ResultsStore(spec.results_dir)
    outcome = run_cells(expand(spec), store, spec.resources, progress=False, dashboard=False)
    row = store.read().to_pandas().iloc[0]
    assert outcome.failed == 1 and row.attempt == 2, (outcome, row.attempt)
    assert "ActorDiedError" not in row.error and "config" in row.error.lower(), row.error[:400]
    assert not POOL.workers, "both workers that ran it were retired"


def _wait_until_dead(actor: ray.actor.ActorHandle, timeout_s: float = 30.0) -> None:
    """Until a call on `actor` fails: a ping sent in the instant after `ray.kill` can still be answered."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.1)
    raise AssertionError(f"the killed actor still answered after {timeout_s:g}s")


@pytest.mark.slow  # ~30 s: one worker, then its replacement
def test_an_idle_worker_that_died_is_not_handed_a_cell(local_ray, test_ladder, write_sweep):
    """A worker whose node died while it sat idle (between an adaptive loop's batches) must not
    take the next batch's cells: with no retries they would be stored failed without having run."""
    shutdown_workers()
    spec = _base_sweep(write_sweep, test_ladder, "idle-death", 4, {"cpus_per_cell": 2, "max_retries": 0})
    cells, store = expand(spec), ResultsStore(spec.results_dir)
    assert run_cells(cells[:2], store, spec.resources, progress=False, dashboard=False).ok == 2
    [idle] = POOL.workers
    ray.kill(idle.actor, no_restart=True)  # the driver is not told, as when a node goes away
    _wait_until_dead(idle.actor)  # died while idle, before the next batch (ray.kill lands asynchronously)
    outcome = run_cells(cells[2:], store, spec.resources, progress=False, dashboard=False)
    assert (outcome.ok, outcome.failed) == (2, 0), outcome
    assert idle not in POOL.workers
    shutdown_workers()


@pytest.mark.slow  # ~20 s: one worker
def test_a_cell_stored_after_the_caller_read_the_store_is_not_run_again(local_ray, test_ladder, write_sweep):
    """Another driver stored the cell between this driver's reading the store and its run: the row stays as it is."""
    spec = _base_sweep(write_sweep, test_ladder, "planned", 1, {"cpus_per_cell": 2})
    cells, store = expand(spec), ResultsStore(spec.results_dir)
    read_at = time.time()
    assert run_cells(cells, store, spec.resources, progress=False, dashboard=False).ok == 1  # "the other driver"
    stored = store.read().to_pandas().started_at.tolist()
    outcome = run_cells(cells, store, spec.resources, progress=False, dashboard=False, planned_at=read_at)
    assert (outcome.ok, outcome.skipped_claimed) == (0, 1), outcome
    assert store.read().to_pandas().started_at.tolist() == stored


@pytest.mark.slow  # ~40 s: Ray restarts in this process
def test_a_fresh_ray_in_the_same_process_gets_fresh_workers(local_ray, test_ladder, write_sweep):
    """A notebook's `ray.shutdown(); ray.init()`: the new cluster's first job has the old one's job
    id, and the pool must not hand cells to the dead cluster's workers."""
    spec = _base_sweep(write_sweep, test_ladder, "restart", 2, {"cpus_per_cell": 2, "max_retries": 0})
    cells, store = expand(spec), ResultsStore(spec.results_dir)
    assert run_cells(cells[:1], store, spec.resources, progress=False, dashboard=False).ok == 1
    before = ray.get_runtime_context().get_job_id()
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    assert ray.get_runtime_context().get_job_id() == before  # what made a job id a poor key
    outcome = run_cells(cells[1:], store, spec.resources, progress=False, dashboard=False)
    assert (outcome.ok, outcome.failed) == (1, 0), outcome


@pytest.mark.slow  # ~40 s: two workers, one cell hangs for the timeout
def test_a_cell_past_its_timeout_is_a_failed_row_and_the_sweep_goes_on(local_ray, test_ladder, write_sweep, monkeypatch):
    class HangingWorker(CellWorker):  # defined here, so Ray ships it by value to its worker processes
        def run(self, cell_json: str, attempt: int):
            if CellConfig.model_validate_json(cell_json).seed == 0:
                time.sleep(3600)  # a collective that never returns
            return super().run(cell_json, attempt)

    shutdown_workers()
    spec = _base_sweep(write_sweep, test_ladder, "hang", 3, {"cpus_per_cell": 1, "cell_timeout_s": 15})
    monkeypatch.setattr(pool, "_RemoteCellWorker", ray.remote(HangingWorker))
    store = ResultsStore(spec.results_dir)
    outcome = run_cells(expand(spec), store, spec.resources, progress=False, dashboard=False)
    rows = store.read().to_pandas().set_index("seed")
    assert (outcome.ok, outcome.failed) == (2, 1) and len(rows) == 3, outcome
    assert rows.status[0] == "failed" and rows.error[0].startswith("TimeoutError: the cell ran past resources.cell_timeout_s (15 s)")
    assert (rows.finished_at[0] - rows.started_at[0]).total_seconds() >= 15  # from its hand-out to its stop (both were the stop)
    assert (rows.status[[1, 2]] == "ok").all()
    assert all(w.running is None for w in POOL.workers) and len(POOL.workers) == 1, "the hung worker was stopped"
    assert outcome.workers_lost == 1
    shutdown_workers()


@pytest.mark.slow  # ~40 s: a Ray of two (declared) GPUs, three workers
def test_idle_workers_of_another_shape_make_way_for_a_fraction_of_a_gpu_they_leave_too_small(local_ray, test_ladder, write_sweep, monkeypatch):
    """Two 0.6-GPU workers leave 0.4 of each GPU: the 0.5-GPU worker asked for the last cell can never be placed
    while they stay, idle, with no cell of theirs left. They are retired for it (they held their GPUs until
    resources.start_timeout_s stopped the run, one row short)."""
    monkeypatch.setattr(driver, "MAKE_WAY_SECONDS", 5.0)  # not the default's half minute of waiting
    shutdown_workers()
    ray.shutdown()
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        spec = _base_sweep(write_sweep, test_ladder, "fractions", 3, {"cpus_per_cell": 1, "start_timeout_s": 60})
        cells = [PlannedCell(c.config, 0.5 if c.config.seed == 2 else 0.6) for c in expand(spec)]
        store = ResultsStore(spec.results_dir)
        outcome = run_cells(cells, store, spec.resources, progress=False, dashboard=False)
        assert (outcome.ok, outcome.failed) == (3, 0), outcome
        assert sorted(store.read().to_pandas().seed) == [0, 1, 2]
    finally:
        shutdown_workers()
        ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)  # local_ray's, for the tests after


def test_node_capacity_counts_gpus_as_ray_places_them():
    two_gpus, four_cpus = {"CPU": 16.0, "GPU": 2.0}, {"CPU": 4.0}
    fits = lambda cpus, gpus, nodes: node_capacity(Shape(cpus, gpus, None), nodes)  # noqa: E731
    assert fits(1, 0.6, [two_gpus]) == 2  # not 3: a fraction of a GPU never spans two
    assert fits(1, 0.25, [two_gpus]) == 8 and fits(4, 0.25, [two_gpus]) == 4  # CPUs bound it too
    assert fits(1, 2, [two_gpus, two_gpus]) == 2 and fits(1, 4, [two_gpus, two_gpus]) == 0  # sharded: one node's GPUs
    assert fits(3, 0, [four_cpus, four_cpus]) == 2 and fits(8, 0, [four_cpus, four_cpus]) == 0  # 8 CPUs in total, 4 per node
    assert fits(1, 1, [four_cpus]) == 0


def test_a_shapes_start_clock_waits_while_another_shapes_workers_run_cells():
    """Half-GPU cells wait for workers while 0.6-GPU workers fill the GPUs: their cells ending makes room, so a
    healthy mixed run must not hit start_timeout_s. The clock runs only when nothing of another shape runs."""
    half, most = Shape(1, 0.5, None), Shape(1, 0.6, None)
    assert not starved(half, queued=4, pending=2, started=False, running={most})
    assert starved(half, queued=4, pending=2, started=False, running=set())
    assert starved(half, queued=4, pending=2, started=False, running={half})  # its own (none started) cannot be running
    assert not starved(half, queued=4, pending=2, started=True, running=set())  # one started: it takes the cells
    assert not starved(half, queued=0, pending=2, started=False, running=set())  # nothing waits
    assert not starved(half, queued=4, pending=0, started=False, running=set())  # no worker asked for yet


def test_a_gpu_worker_asks_cuda_for_deterministic_kernels_before_cuda_starts(monkeypatch):
    """cuBLAS and some kernels sum in a run-dependent order unless told otherwise: a retried cell would differ.
    Strictly: under warn_only the fused attention backward stays non-deterministic (tests/test_gpu.py)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    threads = torch.get_num_threads()
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        CellWorker(Shape(1.0, 1.0, 1 << 20))
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:  # this is the test process: as it was (on a GPU machine tests/test_gpu.py turned them on at import)
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.set_num_threads(threads)


def test_a_worker_that_reserved_no_gpu_cannot_see_one(monkeypatch):
    """Ray >= 2.48 leaves CUDA_VISIBLE_DEVICES alone for zero-GPU actors: device `auto` would pick GPU 0 unreserved."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    threads = torch.get_num_threads()
    try:
        CellWorker(Shape(1.0, 0.0, 1 << 20))
    finally:
        torch.set_num_threads(threads)  # the worker sets its own thread count; this is the test process
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_a_crashed_cells_row_does_not_claim_the_drivers_device(specs):
    """The row of a worker that died is written by the driver, whose device is not the worker's."""
    from orchestrator.driver import crashed_row
    from workers.cell import CellConfig

    cell = CellConfig(sweep="s", model=specs["xs"], task="facts", method="base", budget=0, seed=0)
    row = crashed_row(cell, RuntimeError("worker died"), attempt=2, handed_out=datetime.now(timezone.utc))
    assert (row["status"], row["attempt"], row["device"]) == ("failed", 2, None) and "worker died" in row["error"]
