"""The GPU paths on a real CUDA device: fp32 cells give the CPU's numbers, bf16 and fp16 cells still
learn (fp32 master weights), a rerun gives the same row, a fractional worker keeps to its share of
the GPU, and an out-of-memory cell becomes a failed row while its worker goes on.

Skipped where no CUDA device is visible (CI has none); `make test-gpu` runs them on a GPU machine.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from workers.cache import WorkerCache
from workers.cell import CellConfig, EvalConfig, ModelSpec
from workers.methods import resolve_config
from workers.run_cell import CellRun, deterministic_cuda, fit_process_to, model_revision, run_cell

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

if torch.cuda.is_available():
    deterministic_cuda()  # at import, before any test starts CUDA, as a worker does before its first cell

METHODS = ("lora", "full_ft", "steer_mean", "steer_trained", "prompt", "task_vector")
TRAINED = ("lora", "full_ft", "steer_trained")
STEPS = 24
SETTINGS = {  # enough steps at a rate that moves the tiny model for training to show in its losses
    "lora": {"train": {"lr": 1e-2, "min_steps": STEPS, "max_steps": STEPS, "checkpoints": 0}},
    "full_ft": {"train": {"lr": 3e-3, "min_steps": STEPS, "max_steps": STEPS, "checkpoints": 0}},
    "steer_trained": {"train": {"lr": 3e-2, "min_steps": STEPS, "max_steps": STEPS, "checkpoints": 0}},
}
CHOICES = ("trainable_params", "post_train_flops", "train_tokens", "layer", "alpha", "selection")
FLOATS = ("nll", "nll_base", "neutral_kl", "neutral_ppl_ratio", "score_base")


def _cell(model_id: str, method: str, *, device: str = "cuda", dtype: str = "float32") -> CellConfig:
    spec = ModelSpec(id=model_id, device=device, dtype=dtype)
    spec = spec.model_copy(update={"revision": model_revision(spec)})
    return CellConfig(
        sweep="gpu", model=spec, task="facts", method=method,
        method_config=resolve_config(method, SETTINGS.get(method, {})).model_dump(mode="json"),
        budget=32, seed=3, eval=EvalConfig(test_size=40, validation_size=16, neutral_size=4, offtask_size=10),
        offtask=("arith",),
    )


def _ok(row: dict) -> dict:
    assert row["status"] == "ok", row["error"]
    return row


def _close(a: object, b: object, path: str = "hparams") -> None:
    """The same hyper-parameter record up to float32 rounding: keys, choices and lists equal, floats close."""
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-5), path
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _loss_drop(row: dict) -> float:
    """How far training lowered the training loss: the first step's against the mean of the last four."""
    losses = json.loads(row["hparams"])["losses"]
    return losses[0] - sum(losses[-4:]) / 4


@pytest.fixture(scope="module")
def model_id(test_ladder) -> str:
    return test_ladder[-1]


@pytest.mark.parametrize("method", METHODS)
def test_fp32_on_the_gpu_gives_the_cpus_numbers(model_id, method):
    """Same cell, same weights: the GPU makes the same choices (layer, scale, checkpoint) and its
    losses agree to float32 rounding (no TF32 matmuls slipped in; no device-dependent data path)."""
    cpu = _ok(run_cell(_cell(model_id, method, device="cpu"), CellRun(cache=WorkerCache())))
    gpu = _ok(run_cell(_cell(model_id, method), CellRun(cache=WorkerCache())))
    assert gpu["device"] == "cuda" and cpu["device"] == "cpu"
    assert {k: gpu[k] for k in CHOICES} == {k: cpu[k] for k in CHOICES}
    _close(json.loads(gpu["hparams"]), json.loads(cpu["hparams"]))
    for column in FLOATS:
        assert gpu[column] == pytest.approx(cpu[column], rel=1e-3, abs=1e-4), column
    differing = sum(a != b for a, b in zip(gpu["score_outcomes"], cpu["score_outcomes"]))
    assert differing <= 1, f"{differing} of {len(cpu['score_outcomes'])} test answers differ between CPU and GPU"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", TRAINED)
def test_half_precision_cells_learn_as_fp32_cells_do(model_id, method, dtype):
    """bf16 weights cannot take an AdamW step of lr 1e-3 near 1.0 (spacing 2^-7); fp16 gradients
    underflow without a loss scale. With fp32 master weights and the scale, a half-precision cell's
    training loss must fall at least half as far as the fp32 cell's over the same steps and batches."""
    full = _ok(run_cell(_cell(model_id, method), CellRun(cache=WorkerCache())))
    half = _ok(run_cell(_cell(model_id, method, dtype=dtype), CellRun(cache=WorkerCache())))
    assert _loss_drop(full) > 0.03, f"the fp32 {method} cell must really learn for this test to mean anything"
    assert _loss_drop(half) > 0.5 * _loss_drop(full), (dtype, _loss_drop(half), _loss_drop(full))
    assert json.loads(half["hparams"])["skipped_steps"] < STEPS // 4  # fp16: few overflowed steps, not most
    assert math.isfinite(half["nll"]) and half["nll_base"] == pytest.approx(full["nll_base"], rel=0.05)  # the same model, rounded


@pytest.mark.parametrize("method", ["lora", "steer_trained"])
def test_a_rerun_on_the_gpu_gives_the_same_row(model_id, method):
    """deterministic_cuda: cuBLAS and the backward kernels sum in a fixed order, so a retried cell
    repeats its row exactly, and a worker that ran full fine-tuning first leaves no trace."""
    columns = CHOICES + FLOATS + ("hparams", "score", "score_outcomes", "offtask_score_delta")
    first = _ok(run_cell(_cell(model_id, method), CellRun(cache=WorkerCache())))
    shared = WorkerCache()
    _ok(run_cell(_cell(model_id, "full_ft"), CellRun(cache=shared)))
    again = _ok(run_cell(_cell(model_id, method), CellRun(cache=shared)))
    assert {k: again[k] for k in columns} == {k: first[k] for k in columns}
    assert shared.loads == 1
    assert first["peak_mem_bytes"] > 0  # read from the GPU allocator, not the host


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_attention_backward_repeats_bit_for_bit(dtype):
    """Training's attention backward (flash in bf16, memory-efficient in fp32) accumulates with atomics
    unless deterministic algorithms are on strictly: at a long sequence its gradients then differ
    from run to run. Under deterministic_cuda they must repeat bit for bit."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 2048, 64, device="cuda", dtype=dtype, generator=generator).requires_grad_() for _ in range(3))
    runs = []
    for _ in range(4):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        runs.append(torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


def test_sharded_placement_on_one_gpu_gives_the_same_numbers(model_id):
    """`gpus_per_cell > 1` loads through accelerate's device_map="auto"; on one GPU every layer lands
    on it (none offloaded: the loader refuses that), and the numbers are the plain load's."""
    cell = _cell(model_id, "steer_mean")
    sharded = _ok(run_cell(cell, CellRun(cache=WorkerCache(), shard=True)))
    plain = _ok(run_cell(cell, CellRun(cache=WorkerCache())))
    columns = CHOICES + FLOATS + ("hparams", "score_outcomes")
    assert {k: sharded[k] for k in columns} == {k: plain[k] for k in columns}


def _fractional_worker(share: float, cell_json: str) -> dict:
    """One process as a Ray worker of `share` GPU would be set up: what it can allocate, and its row."""
    fit_process_to(cpus=2, gpus=share)
    total = torch.cuda.get_device_properties(0).total_memory
    probe = {}
    for fraction in (0.5 * share, 1.2 * share):
        try:
            block = torch.empty(int(fraction * total), dtype=torch.uint8, device="cuda")
            del block
            probe[fraction] = True
        except torch.cuda.OutOfMemoryError:
            probe[fraction] = False
        torch.cuda.empty_cache()
    row = run_cell(CellConfig.model_validate_json(cell_json), CellRun(cache=WorkerCache()))
    return {"within": probe[0.5 * share], "beyond": probe[1.2 * share], "row": {k: row[k] for k in ("status", "error", "nll", "layer", "alpha")}}


def test_quarter_gpu_workers_keep_to_their_share_and_run_side_by_side(model_id):
    """Four workers of gpus_per_cell 0.25 on one GPU, as the pool packs them: each can allocate half
    its share and not more than its share, and their concurrent cells give the row one process gives."""
    cell = _cell(model_id, "steer_mean")
    alone = _ok(run_cell(cell, CellRun(cache=WorkerCache())))
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(max_workers=4, mp_context=context) as pool:
        results = list(pool.map(_fractional_worker, [0.25] * 4, [cell.model_dump_json()] * 4))
    assert [r["within"] for r in results] == [True] * 4
    assert [r["beyond"] for r in results] == [False] * 4, "a quarter-GPU worker allocated more than its share"
    expected = {"status": "ok", "error": None, "nll": alone["nll"], "layer": alone["layer"], "alpha": alone["alpha"]}
    assert [r["row"] for r in results] == [expected] * 4


def _starved_then_fed(cell_json: str) -> list[dict]:
    """Run a cell with almost no GPU memory allowed, then with the whole GPU, in one process."""
    fit_process_to(cpus=2, gpus=1e-5)  # ~1.4 MB of an H200: less than one 2 MB allocator segment
    cell = CellConfig.model_validate_json(cell_json)
    cache = WorkerCache()
    starved = run_cell(cell, CellRun(cache=cache))
    after_failure = torch.cuda.memory_reserved()
    torch.cuda.set_per_process_memory_fraction(1.0)
    fed = run_cell(cell, CellRun(cache=cache))
    return [{k: starved[k] for k in ("status", "error")}, {"reserved": after_failure}, {k: fed[k] for k in ("status", "error")}]


def test_an_out_of_memory_cell_is_a_failed_row_and_its_worker_goes_on(model_id):
    """CUDA out-of-memory inside a cell is data: a failed row naming it, the failed cell's blocks
    handed back to the GPU, and the same worker runs its next cell."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        starved, memory, fed = pool.submit(_starved_then_fed, _cell(model_id, "lora").model_dump_json()).result()
    assert starved["status"] == "failed" and "out of memory" in starved["error"].lower(), json.dumps(starved)[:2000]
    assert memory["reserved"] == 0
    assert fed == {"status": "ok", "error": None}
