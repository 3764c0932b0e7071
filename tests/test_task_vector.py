"""`task_vector`: λ = 0 is `base`, λ = 1 is the fine-tune, λ < 0 removes the task; the model is the
base model bit for bit outside `applied()`.

Row parity runs whole cells through `run_cell` on the tiny `test` ladder. The removal test needs a
task that fine-tuning certainly teaches, which the weak test ladder does not give (its scores sit at
answer priors), so it uses a toy lookup task on a tiny model that has already half-learned it: a
fine-tune continuing from there is close to linear in the weights, so θ − Δθ undoes learning.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest_methods import ARCHITECTURES, N_A, N_ANSWERS, ToyTask, fit_context, language_model, logits

from workers.cache import WorkerCache
from workers.cell import CellConfig, EvalConfig, ModelSpec
from workers.config import ConfigError
from workers.lm import LanguageModel
from workers.steering import decoder_layers
from workers.methods import FitContext, get_method, resolve_config
from workers.methods.protocol import forward_flops, matmul_params
from workers.methods.task_vector import added
from workers.run_cell import CellRun, model_revision, run_cell
from workers.tasks import get_task
from workers.tasks.base import Example, target_nll
from workers.training import TrainConfig, train

FAST = {"lr": 3e-3, "min_steps": 6, "max_steps": 6, "batch_size": 8, "checkpoints": 0}  # always keep the trained weights
SOURCES = {"full_ft": {"train": FAST}, "lora": {"rank": 2, "train": {**FAST, "lr": 3e-2}}}
EVAL = EvalConfig(test_size=40, validation_size=16, neutral_size=4, offtask_size=10)


def _cell(model_id: str, method: str, settings: dict) -> CellConfig:
    spec = ModelSpec(id=model_id)
    spec = spec.model_copy(update={"revision": model_revision(spec)})
    return CellConfig(
        sweep="unit", model=spec, task="arith", method=method,
        method_config=resolve_config(method, settings).model_dump(mode="json"),
        budget=16, seed=1, eval=EVAL, offtask=("facts",),
    )


def _task_vector(finetune: str, lambdas: list[float]) -> dict:
    return {"finetune": finetune, finetune: SOURCES[finetune], "lambdas": lambdas}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread; on a busy box two threads thrash (30x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_id(test_ladder) -> str:
    return test_ladder[0]


class Cells:
    """Cells run on one loaded model (as a worker runs them), each at most once per module."""

    def __init__(self, model_id: str) -> None:
        self.model_id, self.cache, self.rows = model_id, WorkerCache(), {}

    def __call__(self, method: str, settings: dict) -> dict:
        key = json.dumps([method, settings], sort_keys=True)
        if key not in self.rows:
            self.rows[key] = run_cell(_cell(self.model_id, method, settings), CellRun(cache=self.cache))
            assert self.rows[key]["status"] == "ok", self.rows[key]["error"]
        return self.rows[key]


@pytest.fixture(scope="module")
def cells(model_id) -> Cells:
    return Cells(model_id)


def test_lambda_zero_reproduces_the_base_row(cells):
    base, zero = cells("base", {}), cells("task_vector", _task_vector("full_ft", [0.0]))
    for column in ("score", "nll", "neutral_kl", "neutral_ppl_ratio", "offtask_score_delta"):
        assert zero[column] == base[column], column
    assert zero["alpha"] == 0.0
    assert json.loads(zero["hparams"])["delta_norm"] > 0, "the fine-tune must really have moved the weights"


@pytest.mark.parametrize("finetune", ["full_ft", "lora"])
def test_lambda_one_reproduces_the_finetuned_row(cells, finetune):
    """Same seed and training settings, so the same Δθ; only float rounding differs.

    full_ft: θ_base + (θ_tuned − θ_base) gives back θ_tuned except where the subtraction rounded
    (≤ 1 ulp per weight). lora: the merged (W + s·B·A)·x against PEFT's W·x + s·B·(A·x), the same
    sum in another order. Both move the test NLL by ~1e-7 here; 1e-5 leaves room for other BLAS.
    """
    tuned, one = cells(finetune, SOURCES[finetune]), cells("task_vector", _task_vector(finetune, [1.0]))
    assert one["score"] == tuned["score"]
    assert one["nll"] == pytest.approx(tuned["nll"], abs=1e-5)
    assert one["neutral_kl"] == pytest.approx(tuned["neutral_kl"], rel=1e-3, abs=1e-7)
    assert tuned["neutral_kl"] > 1e-4, "the fine-tune must really change the model for the parity to mean anything"
    # one λ: nothing to choose, so the cost is exactly the fine-tune's
    assert one["post_train_flops"] == tuned["post_train_flops"]
    assert one["trainable_params"] == tuned["trainable_params"]
    assert one["train_tokens"] == tuned["train_tokens"]


def test_lambda_is_chosen_on_the_shared_validation_set(cells):
    grid = [-1.0, 0.0, 1.0, 2.0]
    chosen, fixed = cells("task_vector", _task_vector("full_ft", grid)), cells("task_vector", _task_vector("full_ft", [1.0]))
    hparams = json.loads(chosen["hparams"])
    scores = {float(k): v for k, v in hparams["lambda_scores"].items()}
    assert sorted(scores) == grid
    best = max(scores.values())
    # ties go to the smallest |λ| ("do nothing" first), then to adding over removing
    assert chosen["alpha"] == max((s for s in grid if scores[s] == best), key=lambda s: (-abs(s), s))
    assert chosen["selection"] == "shared_validation_nll" and chosen["val_labels"] == EVAL.validation_size
    assert hparams["delta_norm"] == json.loads(fixed["hparams"])["delta_norm"]
    # the cost: the fine-tune's plus one NLL pass over the validation set per λ
    lm = cells.cache.model(_cell(cells.model_id, "base", {}).model, EVAL.batch_size)
    before = lm.forward_tokens
    task = get_task("arith")
    head = lm.model.get_output_embeddings()
    positions, mlp_rows = [], []  # where the output head and the last block's MLP ran, by hooks: their share of the FLOPs
    mlp = decoder_layers(lm.model)[-1].mlp
    handles = [
        head.register_forward_hook(lambda _m, _i, out: positions.append(out.shape[:-1].numel())),
        mlp.register_forward_hook(lambda _m, args, _o: mlp_rows.append(args[0].shape[:-1].numel())),
    ]
    try:
        target_nll(lm, task.examples("validation", EVAL.validation_size, EVAL.validation_seed))  # what a choice by NLL runs
    finally:
        for handle in handles:
            handle.remove()
    tokens = lm.forward_tokens - before
    assert hparams["lambda_tokens"] == len(grid) * tokens
    n, n_head, n_mlp = matmul_params(lm.model), head.weight.numel(), sum(p.numel() for p in mlp.parameters())
    per_pass = forward_flops(n - n_head, tokens) + forward_flops(n_head, sum(positions)) - forward_flops(n_mlp, tokens - sum(mlp_rows))
    assert chosen["post_train_flops"] == pytest.approx(fixed["post_train_flops"] + len(grid) * per_pass)


class Lookup(ToyTask):
    """'q: a3 b5 =' -> b mod 5: one token decides the answer, so a tiny model learns it in a few steps."""

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        g = torch.Generator().manual_seed(seed * 3 + {"train": 0, "validation": 1, "test": 2}[split])
        pairs = torch.randint(0, N_A, (n, 2), generator=g).tolist()
        choices = tuple(f" {d}" for d in range(N_ANSWERS))
        return [Example(prompt=f"q: a{a} b{b} =", target=f" {b % N_ANSWERS}", choices=choices) for a, b in pairs]


STEPS = {"lr": 3e-3, "min_steps": 30, "max_steps": 30, "checkpoints": 0}


def half_trained() -> tuple[LanguageModel, FitContext]:
    """A tiny model 12 steps into learning the lookup (test score ~0.6), and a context to fine-tune it further."""
    lm, task = language_model("llama", seed=0), Lookup()
    train(lm, list(lm.model.parameters()), task.examples("train", 64, 100), TrainConfig(lr=3e-3, min_steps=12, max_steps=12, checkpoints=0), 0)
    lm.model.eval()
    return lm, FitContext(lm=lm, task=task, train=task.examples("train", 64, 0), validation=task.examples("validation", 64, 0), seed=0)


def test_negating_the_task_vector_removes_the_task():
    lm, ctx = half_trained()
    test = ctx.task.examples("test", 64, 0)
    base = ctx.task.evaluate(lm, test)
    tuned = get_method("full_ft").fit(ctx, resolve_config("full_ft", {"train": STEPS}))
    removed = get_method("task_vector").fit(ctx, resolve_config("task_vector", {"full_ft": {"train": STEPS}, "lambdas": [-1.0]}))
    with tuned.applied():
        learned = ctx.task.evaluate(lm, test)
    with removed.applied():
        unlearned = ctx.task.evaluate(lm, test)
    assert learned.score > base.score + 0.2, "fine-tuning must clearly help for removal to be measurable"
    assert unlearned.score < base.score - 0.2
    assert unlearned.nll > base.nll > learned.nll
    assert removed.report.alpha == -1.0


def test_removal_loses_to_doing_nothing_on_validation():
    """With 0 among the candidates, a grid of removals alone picks "do nothing"."""
    lm, ctx = half_trained()
    adapter = get_method("task_vector").fit(ctx, resolve_config("task_vector", {"full_ft": {"train": STEPS}, "lambdas": [-1.0, -0.5, 0.0]}))
    scores = adapter.report.hparams["lambda_scores"]
    assert scores["0.0"] > max(scores["-1.0"], scores["-0.5"])
    assert adapter.report.alpha == 0.0


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_merged_lora_update_matches_peft_on_every_architecture(arch):
    """λ = 1 with a LoRA source is PEFT's own forward, also where weights are stored transposed (GPT-2's Conv1D)."""
    lm = language_model(arch)
    ctx = fit_context(lm)
    lora = {"rank": 2, "train": {**FAST, "lr": 3e-2, "min_steps": 3, "max_steps": 3}}
    peft = get_method("lora").fit(ctx, resolve_config("lora", lora))
    merged = get_method("task_vector").fit(ctx, resolve_config("task_vector", {"finetune": "lora", "lora": lora, "lambdas": [1.0]}))
    base = logits(lm)
    with peft.applied():
        expected = logits(lm)
    with merged.applied():
        got = logits(lm)
    assert not torch.allclose(expected, base, atol=1e-4), "the LoRA must really change the logits"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_grid_without_a_validation_set_fails_before_training():
    lm = language_model()
    ctx = fit_context(lm, n_val=0)
    with pytest.raises(ValueError, match="give a single λ"):
        get_method("task_vector").fit(ctx, resolve_config("task_vector", {"lambdas": [0.0, 1.0]}))
    adapter = get_method("task_vector").fit(ctx, resolve_config("task_vector", {"full_ft": {"train": {**FAST, "min_steps": 2, "max_steps": 2}}, "lambdas": [1.0]}))
    assert adapter.report.alpha == 1.0 and adapter.report.selection == "fixed" and adapter.report.val_labels == 0


def _state(lm: LanguageModel) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in lm.model.state_dict().items()}


def _same(lm: LanguageModel, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(tensor, state[name]) for name, tensor in lm.model.state_dict().items())


@pytest.mark.parametrize("finetune", ["full_ft", "lora"])
def test_outside_applied_the_model_is_the_base_model_bit_for_bit(finetune):
    lm, ctx = half_trained()
    base = _state(lm)
    flags = {name: p.requires_grad for name, p in lm.model.named_parameters()}
    settings = {"finetune": finetune, finetune: {"train": {**STEPS, "min_steps": 4, "max_steps": 4}}, "lambdas": [-1.0, 2.0]}
    adapter = get_method("task_vector").fit(ctx, resolve_config("task_vector", settings))
    assert _same(lm, base), "fit must leave the model as it found it"
    with adapter.applied():
        assert not _same(lm, base)
    assert _same(lm, base)
    with pytest.raises(RuntimeError, match="inside"):
        with adapter.applied():
            raise RuntimeError("inside")
    assert _same(lm, base)
    assert {name: p.requires_grad for name, p in lm.model.named_parameters()} == flags


def test_a_lora_task_vector_on_a_bf16_model_keeps_its_dtype_and_restores_it():
    """PEFT keeps LoRA weights in fp32 on a bf16 model; θ + λ·Δθ must still be bf16, or the λ forwards
    fail on mixed dtypes (and the restored model would not be the one that was loaded)."""
    lm = language_model()
    lm.model.to(torch.bfloat16)
    ctx = fit_context(lm)
    base, before = _state(lm), logits(lm)
    lora = {"rank": 2, "train": {**FAST, "lr": 3e-2, "min_steps": 3, "max_steps": 3}}
    adapter = get_method("task_vector").fit(ctx, resolve_config("task_vector", {"finetune": "lora", "lora": lora, "lambdas": [0.0, 1.0, 2.0]}))
    assert sorted(adapter.report.hparams["lambda_scores"]) == ["0.0", "1.0", "2.0"]
    with added(lm, adapter.deltas, 1.0):
        assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
        assert not _same(lm, base)
    assert _same(lm, base) and torch.equal(logits(lm), before)
    assert all(v.dtype == base[k].dtype for k, v in lm.model.state_dict().items())


def test_config_is_strict_and_holds_only_the_chosen_finetune():
    config = resolve_config("task_vector", {"finetune": "lora"})
    assert config.lora == resolve_config("lora", {}) and config.full_ft is None and 0.0 in config.lambdas
    with pytest.raises(ConfigError, match=r"methods\.task_vector\.lora\.rnak: unknown key \(did you mean 'rank'\?\)"):
        resolve_config("task_vector", {"finetune": "lora", "lora": {"rnak": 2}})
    with pytest.raises(ConfigError, match="'full_ft' settings given but finetune is 'lora': remove the 'full_ft' settings"):
        resolve_config("task_vector", {"finetune": "lora", "full_ft": {}})
    with pytest.raises(ConfigError, match=r"methods\.task_vector\.finetune: .*'full_ft' or 'lora'") as typo:  # not "settings given"
        resolve_config("task_vector", {"finetune": "ful_ft", "full_ft": {}})
    assert "settings given" not in str(typo.value)
    with pytest.raises(ConfigError, match=r"methods\.task_vector\.lambdas"):
        resolve_config("task_vector", {"lambdas": []})
