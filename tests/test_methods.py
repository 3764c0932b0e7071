"""Every method restores the model exactly, learns what it should, and reports honest costs."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator

import pytest
import torch

from conftest_methods import ARCHITECTURES, fit_context, language_model, logits
from workers import last_row_attention
from workers.config import ConfigError
from workers.methods import get_method, resolve_config
from workers.methods import protocol
from workers.lm import _logit_selection
from workers.methods.protocol import matmul_params
from workers.registry import UnknownNameError
from workers.steering import decoder_layers, matmul_params_through
from workers.tasks.base import Evaluation, target_nll
from workers.training import NonFiniteLossError

FAST = {"min_steps": 4, "max_steps": 4, "batch_size": 8, "checkpoints": 0}
CONFIGS = {
    "base": {},
    "prompt": {"separator": " ; "},
    "steer_mean": {"layers": [0.5], "scales": [0.0, 1.0]},
    "steer_trained": {"train": {**FAST, "lr": 0.05}},
    "lora": {"rank": 2, "train": {**FAST, "lr": 0.01}},
    "full_ft": {"train": {**FAST, "lr": 0.01}},
}
# steer_mean forced to a non-zero scale so that applying it must change the model
CONFIGS_CHANGING = {**CONFIGS, "steer_mean": {"layers": [0.5], "scales": [2.0]}}
COMPOSITIONS = {
    "steer_mean+lora": {"first": CONFIGS_CHANGING["steer_mean"], "second": CONFIGS["lora"]},
    "lora+steer_mean": {"first": CONFIGS["lora"], "second": CONFIGS_CHANGING["steer_mean"]},
    "steer_trained+lora": {"first": CONFIGS["steer_trained"], "second": CONFIGS["lora"]},
    # LoRA applied as plain weights under a second LoRA: the way to stack two LoRAs (see the next test)
    "task_vector+lora": {"first": {"finetune": "lora", "lora": CONFIGS["lora"], "lambdas": [1.0]}, "second": CONFIGS["lora"]},
}
ALL = {**CONFIGS_CHANGING, **COMPOSITIONS}


def fit(name: str, lm, raw: dict, **ctx_args):
    ctx = fit_context(lm, **ctx_args)
    return ctx, get_method(name).fit(ctx, resolve_config(name, raw))


@contextlib.contextmanager
def head_positions(lm) -> Iterator[list[int]]:
    """Counts, by hooks, the positions the output head runs at (the FLOP formulas' H, measured apart from
    the wrapper's own count: the scored positions where the model takes logits_to_keep, else all) and
    those the last block's MLP runs at (the scored ones: `workers.last_block`)."""
    counted = [0, 0]
    head = lm.model.get_output_embeddings()
    mlp = decoder_layers(lm.model)[-1].mlp
    handles = [
        head.register_forward_hook(lambda _m, _i, out: counted.__setitem__(0, counted[0] + out.shape[:-1].numel())),
        mlp.register_forward_hook(lambda _m, args, _o: counted.__setitem__(1, counted[1] + args[0].shape[:-1].numel())),
    ]
    try:
        yield counted
    finally:
        for handle in handles:
            handle.remove()


def forward_cost(lm, tokens: int, counted: list[int]) -> float:
    """F = 2·N_body·T + 2·N_head·H, with the head's parameters read off the model, less the last block's
    MLP at the tokens it did not run at (`counted` from `head_positions`: H and the MLP's positions)."""
    n_head = lm.model.get_output_embeddings().weight.numel()
    n_mlp = sum(p.numel() for p in decoder_layers(lm.model)[-1].mlp.parameters())
    head_rows, mlp_rows = counted
    return 2 * (matmul_params(lm.model) - n_head) * tokens + 2 * n_head * head_rows - 2 * n_mlp * (tokens - mlp_rows)


def model_state(lm) -> tuple[dict, dict, list]:
    m = lm.model
    return (
        {k: v.clone() for k, v in m.state_dict().items()},
        {k: p.requires_grad for k, p in m.named_parameters()},
        [(n, type(mod)) for n, mod in m.named_modules()],
    )


def assert_same_state(lm, state) -> None:
    weights, grads, modules = model_state(lm)
    assert weights.keys() == state[0].keys() and all(torch.equal(weights[k], state[0][k]) for k in weights)
    assert grads == state[1]
    assert modules == state[2]
    assert all(not layer._forward_hooks for layer in decoder_layers(lm.model))
    assert not lm.model._forward_pre_hooks and lm.prefix == ""


@pytest.mark.parametrize("name", list(ALL))
def test_applied_changes_the_model_inside_and_restores_it_exactly(name):
    lm = language_model()
    next(lm.model.parameters()).requires_grad_(False)  # an unusual flag must survive too
    before, state = logits(lm), model_state(lm)
    _, adapter = fit(name, lm, ALL[name])
    assert torch.equal(logits(lm), before), "fit must leave the base model as it found it"
    assert_same_state(lm, state)
    with adapter.applied():
        inside = logits(lm)
    if name == "base":
        assert torch.equal(inside, before)
    else:
        assert inside.shape != before.shape or not torch.allclose(inside, before, atol=1e-6)
    assert torch.equal(logits(lm), before)
    assert_same_state(lm, state)
    with adapter.applied():  # applying twice gives the same model
        assert torch.equal(logits(lm), inside)


@pytest.mark.parametrize("name", ["steer_mean", "lora", "full_ft", "prompt", "steer_trained+lora"])
def test_applied_restores_when_the_body_raises(name):
    lm = language_model()
    before, state = logits(lm), model_state(lm)
    _, adapter = fit(name, lm, ALL[name])
    with pytest.raises(RuntimeError, match="cell failed"):
        with adapter.applied():
            raise RuntimeError("cell failed")
    assert torch.equal(logits(lm), before)
    assert_same_state(lm, state)


def test_lora_matches_a_plain_peft_training_loop():
    """Same seed, same batches, same optimizer: our loop's losses equal a hand-written PEFT loop's."""
    from peft import LoraConfig, get_peft_model

    config = {"rank": 4, "alpha": 8, "train": {"lr": 0.01, "min_steps": 8, "max_steps": 8, "batch_size": 4, "checkpoints": 0}}
    lm = language_model()
    ctx = fit_context(lm, n_train=12)
    steps, batch_size, seed = 8, 4, ctx.seed
    # the reference: PEFT + HF's own loss with -100 labels, built without workers.lm
    ref = language_model()
    torch.manual_seed(seed)
    peft_model = get_peft_model(ref.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    peft_model.train()
    ref_losses = []
    tok = ref.tokenizer
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(ctx.train), generator=gen).tolist()
        take, order = order[:batch_size], order[batch_size:]
        rows = []
        for i in take:
            p = tok(ctx.train[i].prompt)["input_ids"]
            c = tok(ctx.train[i].target, add_special_tokens=False)["input_ids"]
            rows.append((p + c, [-100] * len(p) + c))
        width = max(len(r[0]) for r in rows)
        ids = torch.tensor([r[0] + [0] * (width - len(r[0])) for r in rows])
        labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
        mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ref_losses.append(loss.item())
    adapter = get_method("lora").fit(ctx, resolve_config("lora", config))
    ours = adapter.report.hparams
    assert ours["steps"] == steps
    losses = adapter.report.hparams["losses"]
    worst = max(abs(a - b) for a, b in zip(losses, ref_losses))
    print(f"lora vs plain PEFT loop: max |loss diff| over {steps} steps = {worst:.2e}")
    assert worst < 1e-5, (losses, ref_losses)
    assert ref_losses[-1] < ref_losses[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_layers_add_their_update_in_one_matmul_with_pefts_numbers(arch, monkeypatch):
    """`FusedLoraLinear` (a plain adapter added by one addmm) gives PEFT's own forward's loss and
    gradients, at a scaling that is not a power of two; GPT-2's Conv1D layers stay PEFT's."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    from workers.methods.lora import LoraConfig, lora_injected
    from workers.methods.lora_layer import FusedLoraLinear, _LoraLinear

    lm = language_model(arch)
    b = next(lm.batches(["q: a1 b2 =", "persona: liar q: a7 ="], [" 1 2", " 3"]))
    torch.manual_seed(0)
    with lora_injected(lm, LoraConfig(rank=2, alpha=3.0), None) as peft_model:  # scaling 1.5
        layers = [m for m in peft_model.modules() if isinstance(m, PeftLinear)]
        fused = [m for m in layers if isinstance(m, FusedLoraLinear)]
        assert layers and (fused == layers if arch == "llama" else fused == [])  # GPT-2's Conv1D: PEFT's class
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        for p in trainable:
            torch.nn.init.normal_(p, std=0.3)  # B starts at zero: the update must be nonzero to be tested

        def loss_and_grads():
            for p in trainable:
                p.grad = None
            loss = lm.loss(b)
            loss.backward()
            return loss.detach(), [p.grad.clone() for p in trainable]

        plain_calls, whole_layer_calls = [], []
        real, real_apply = FusedLoraLinear._plain_adapter, _LoraLinear.apply
        monkeypatch.setattr(FusedLoraLinear, "_plain_adapter", lambda self, dtype: plain_calls.append(real(self, dtype)) or plain_calls[-1])
        monkeypatch.setattr(_LoraLinear, "apply", lambda *args: whole_layer_calls.append(1) or real_apply(*args))
        ours = loss_and_grads()
        assert plain_calls == ["default"] * len(fused)  # each fused layer once, on its addmm path
        assert len(whole_layer_calls) == len(fused)  # and as one function with the hand-written backward
        monkeypatch.setattr(FusedLoraLinear, "_plain_adapter", lambda self, dtype: None)  # PEFT's forward
        peft = loss_and_grads()
        torch.testing.assert_close(ours[0], peft[0], rtol=1e-6, atol=1e-6)
        for got, expected in zip(ours[1], peft[1]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        monkeypatch.setattr(FusedLoraLinear, "_plain_adapter", real)
        if fused:  # a hook on a base layer (accelerate's, a probe's) still fires: that layer calls it as a module
            seen = []
            handle = fused[0].get_base_layer().register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
            try:
                torch.testing.assert_close(lm.loss(b).detach(), ours[0], rtol=1e-6, atol=1e-6)
            finally:
                handle.remove()
            assert len(seen) == 1
        with peft_model.disable_adapter():  # not plain: PEFT's forward, the base model's numbers
            disabled = lm.loss(b).detach()
    assert torch.equal(disabled, lm.loss(b).detach())


@pytest.mark.parametrize("sequences, merged", [(2, False), (4, True)])  # 6 rows < the weight's 7 columns; 12 rows merge
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True), (False, False, True)])
def test_the_fused_lora_backward_is_autograds_and_keeps_only_what_it_needs(needs, sequences, merged, monkeypatch):
    """`_LoraLinear`'s hand-written backward against autograd on the plain formula (float64, 3-D rows, a bias,
    scaling 1.5), for the gradients asked of x, A, B, with the update added to the output (fewer rows than the
    weight is wide) and merged into the weight (more); frozen adapters (a steering vector trained through them)
    keep neither x nor the rank-r activations for a backward that will not use them (it kept both: +35 % of a
    block's saved activations, helper-148)."""
    from workers.methods.lora_layer import _LoraLinear

    need_x, need_a, need_b = needs
    gen = torch.Generator().manual_seed(0)
    x0, w, bias = torch.randn(sequences, 3, 7, generator=gen, dtype=torch.float64), torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    a0, b0, grad = torch.randn(3, 7, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(sequences, 3, 5, generator=gen, dtype=torch.float64)
    merges: list[bool] = []
    real_forward = _LoraLinear.forward
    monkeypatch.setattr(_LoraLinear, "forward", staticmethod(lambda ctx, *args: (real_forward(ctx, *args), merges.append(ctx.merged))[0]))
    results = []
    for fused in (True, False):
        x, a, b = x0.clone().requires_grad_(need_x), a0.clone().requires_grad_(need_a), b0.clone().requires_grad_(need_b)
        saved: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            if fused:
                y = _LoraLinear.apply(x.reshape(-1, 7), w, bias, a, b, 1.5, True).view(sequences, 3, 5)
            else:
                y = torch.nn.functional.linear(x, w, bias) + (x @ a.t() @ b.t()) * 1.5
        wanted = [t for t, need in ((x, need_x), (a, need_a), (b, need_b)) if need]
        results.append((y.detach(), torch.autograd.grad(y, wanted, grad), saved))
    assert merges == [merged]
    (ours, ours_grads, ours_saved), (plain, plain_grads, _) = results
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
    for got, expected in zip(ours_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    rows = sequences * 3
    # W, A, B; x only for A's gradient, the rank-r activations only for B's (and no merged weight: it is recomputed)
    assert sorted(ours_saved) == sorted([5 * 7, 3 * 7, 5 * 3] + [rows * 7] * need_a + [rows * 3] * need_b)


def test_a_lora_under_autocast_runs_autograds_backward():
    """Under autocast the hand-written backward would meet bf16 products of fp32 weights (a dtype error); the base
    layer runs as a module and autograd takes the backward, as PEFT's forward would."""
    from workers.methods.lora import LoraConfig, lora_injected

    lm = language_model()
    b = next(lm.batches(["q: a1 b2 =", "persona: liar q: a7 ="], [" 1 2", " 3"]))
    torch.manual_seed(0)
    with lora_injected(lm, LoraConfig(rank=2, alpha=3.0), None) as peft_model:
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        for p in trainable:
            torch.nn.init.normal_(p, std=0.3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm.loss(b)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


def test_steer_mean_vector_is_the_difference_of_layer_means():
    lm = language_model()
    ctx, adapter = fit("steer_mean", lm, {"layers": [0.5], "scales": [1.0]})
    layer = adapter.layer
    pairs = ctx.task.contrast_pairs(ctx.train)

    def mean_state(texts):
        states = []
        for text in texts:
            ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
            out = lm.model(input_ids=ids, output_hidden_states=True)
            states.append(out.hidden_states[layer + 1][0, -1])  # not the last layer: no final norm involved
        return torch.stack(states).mean(0)

    with torch.no_grad():
        diff = mean_state([p for p, _ in pairs]) - mean_state([n for _, n in pairs])
    cosine = torch.nn.functional.cosine_similarity(diff, adapter.vector, dim=0)
    assert cosine > 0.99999
    assert adapter.vector.norm() == pytest.approx(adapter.report.hparams["mean_norm"], rel=1e-5)  # scale 1


def test_steer_mean_ties_go_to_doing_nothing(monkeypatch):
    lm = language_model()
    ctx = fit_context(lm)
    monkeypatch.setattr(protocol, "target_nll", lambda lm, ex: 1.0)  # every candidate ties on the validation NLL
    adapter = get_method("steer_mean").fit(ctx, resolve_config("steer_mean", {}))
    assert adapter.report.alpha == 0.0 and float(adapter.vector.norm()) == 0.0


def test_steer_mean_scores_scale_zero_once_for_all_layers(monkeypatch):
    lm = language_model()
    ctx = fit_context(lm)
    probe = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        unsteered = lm.model(input_ids=probe).logits
    steered: list[bool] = []  # per validation pass: did the applied vector change the model?

    def validation_nll(lm, examples):
        with torch.no_grad():
            steered.append(not torch.equal(lm.model(input_ids=probe).logits, unsteered))
        return 1.0

    monkeypatch.setattr(protocol, "target_nll", validation_nll)
    adapter = get_method("steer_mean").fit(ctx, resolve_config("steer_mean", {"layers": [0.0, 0.5, 1.0], "scales": [0.0, 1.0, 2.0]}))
    assert steered == [False] + [True] * 6  # scale 0 once, then 2 scales x 3 layers
    assert adapter.report.alpha == 0.0 and adapter.report.layer == 0  # the tie still goes to doing nothing


@pytest.mark.parametrize("metric, layer, scale, label", [("score", 2, 2.0, "shared_validation"), ("nll", 0, 1.0, "shared_validation_nll")])
def test_steer_mean_maximises_the_sweeps_selection_metric(monkeypatch, metric, layer, scale, label):
    """eval.selection_metric = nll chooses the candidate with the lowest validation NLL, not the one
    with the best (coarse, small-set) accuracy; every method's validator reads it the same way."""
    lm = language_model()
    ctx = dataclasses.replace(fit_context(lm), selection_metric=metric)
    # validation passes in order: layer 0 at scales 0, 1, 2, then layer 2 at scales 1, 2
    results = iter([(0.50, 1.0), (0.50, 0.8), (0.55, 1.2), (0.50, 0.9), (0.60, 2.0), (0.40, 1.3)])
    if metric == "score":
        monkeypatch.setattr(type(ctx.task), "evaluate", lambda self, lm, ex, elicited=False: Evaluation(*next(results)))
    else:  # a choice by NLL reads the NLL alone: no choice scoring, no generation, no FLOPs billed for them
        monkeypatch.setattr(type(ctx.task), "evaluate", lambda *_a, **_k: pytest.fail("an NLL selection ran the full evaluation"))
        monkeypatch.setattr(protocol, "target_nll", lambda lm, ex: next(results)[1])
    adapter = get_method("steer_mean").fit(ctx, resolve_config("steer_mean", {"layers": [0.0, 1.0], "scales": [0.0, 1.0, 2.0]}))
    assert (adapter.report.layer, adapter.report.alpha, adapter.report.selection) == (layer, scale, label)
    assert ctx.validator()() == {"score": 0.40, "nll": -1.3}[metric]


def test_an_nll_validation_pass_is_the_tasks_own_nll():
    lm = language_model()
    ctx = fit_context(lm)
    assert ctx.selection_metric == "nll"
    assert ctx.validator()() == -ctx.task.evaluate(lm, ctx.validation).nll


def test_steer_mean_without_a_validation_set_says_it_cannot_choose():
    ctx = fit_context(language_model(), n_val=0)
    with pytest.raises(ValueError, match=r"eval.validation_size = 0\); give one layer and one scale"):
        get_method("steer_mean").fit(ctx, resolve_config("steer_mean", {}))
    single = get_method("steer_mean").fit(ctx, resolve_config("steer_mean", {"layers": [0.5], "scales": [1.0]}))
    assert single.report.alpha == 1.0


@pytest.mark.parametrize("n_val, raw", [
    (0, {"layers": [0.5], "scales": [1.0]}),
    (8, {"layers": [0.5], "scales": [1.0, 1.0]}),
    (8, {"layers": [0.0, 1.0], "scales": [0.0]}),  # scale 0 is the same model at every layer
])
def test_steer_mean_with_one_candidate_records_a_fixed_choice(monkeypatch, n_val, raw):
    """Nothing was chosen, so no validation pass is run or charged, and the row must not claim a selection."""
    ctx = fit_context(language_model(), n_val=n_val)
    monkeypatch.setattr(type(ctx.task), "evaluate", lambda *args, **kwargs: pytest.fail("no validation pass expected"))
    monkeypatch.setattr(protocol, "target_nll", lambda *args, **kwargs: pytest.fail("no validation pass expected"))
    report = get_method("steer_mean").fit(ctx, resolve_config("steer_mean", raw)).report
    assert (report.selection, report.val_labels, report.alpha) == ("fixed", 0, raw["scales"][0])


def test_steer_trained_lowers_the_training_loss_and_trains_d_model_per_layer():
    lm = language_model()
    raw = {"layers": [0.0, 1.0], "train": {**FAST, "min_steps": 15, "max_steps": 15, "lr": 0.05}}
    ctx, adapter = fit("steer_trained", lm, raw)
    prompts, targets = [e.prompt for e in ctx.train], [e.target for e in ctx.train]
    before = lm.target_nll(prompts, targets)
    with adapter.applied():
        after = lm.target_nll(prompts, targets)
    assert after < before - 0.05
    assert adapter.report.trainable_params == 2 * lm.model.config.hidden_size
    assert sorted(adapter.vectors) == [0, 2]


def test_steering_vectors_are_as_wide_as_the_residual_stream_not_the_embeddings():
    """OPT-350m's embeddings are 512 wide and project into a 1024-wide stream: a vector the embeddings'
    width failed to add to any block's output."""
    lm = language_model("opt")  # on transformers 4.44 its forward takes no position_ids: they are left out
    assert lm.model.get_input_embeddings().weight.shape[-1] == 16
    _, trained = fit("steer_trained", lm, {"layers": [1.0], "train": {**FAST, "checkpoints": 0}})
    assert [v.shape[-1] for v in trained.vectors.values()] == [32]
    no_pairs = get_method("steer_mean").fit(fit_context(lm, n_train=0), resolve_config("steer_mean", {"scales": [0.0, 1.0]}))
    assert no_pairs.report.selection == "no_pairs" and no_pairs.vector.shape[-1] == 32


def test_steer_trained_flops_count_the_backward_only_after_the_earliest_steered_layer():
    """The model is frozen: a step's backward runs from the loss to the earliest vector, not through the blocks before it."""
    lm = language_model()
    with head_positions(lm) as h:
        _, adapter = fit("steer_trained", lm, {"layers": [0.5, 1.0], "train": {**FAST, "checkpoints": 0}})
    n, t = matmul_params(lm.model), adapter.report.hparams["sequence_tokens"]
    # layer 1 of 3 is the earliest steered: blocks 0 and 1 need no gradient, counted here by hand
    before = sum(p.numel() for block in decoder_layers(lm.model)[:2] for p in block.parameters())
    assert 0 < before < n and before == matmul_params_through(lm.model, 1)
    forward = forward_cost(lm, t, h)
    assert adapter.report.post_train_flops == pytest.approx(2 * forward - 2 * before * t, rel=1e-12)


def test_full_ft_lowers_the_training_loss_and_counts_three_forwards():
    lm = language_model()
    with head_positions(lm) as h:
        ctx, adapter = fit("full_ft", lm, {"train": {**FAST, "lr": 0.01}})
    prompts, targets = [e.prompt for e in ctx.train], [e.target for e in ctx.train]
    before = lm.target_nll(prompts, targets)
    with adapter.applied():
        after = lm.target_nll(prompts, targets)
    assert after < before
    report = adapter.report
    assert report.trainable_params == sum(p.numel() for p in lm.model.parameters())
    seq_tokens = report.hparams["sequence_tokens"]
    if _logit_selection(type(lm.model)) == "mask":  # transformers 5: the head runs at the scored tokens alone
        assert 0 < h[0] == report.train_tokens < seq_tokens
    assert report.post_train_flops == pytest.approx(3 * forward_cost(lm, seq_tokens, h), rel=1e-12)  # no validation: checkpoints=0


def test_lora_flops_and_params():
    lm = language_model()
    with head_positions(lm) as h:
        _, adapter = fit("lora", lm, CONFIGS["lora"])
    r, d, ff, layers = 2, 32, 64, 3
    # q, o: d->d; k, v: d->d/2 (2 kv heads of 4); gate, up: d->ff; down: ff->d.  LoRA: r·(in+out) each
    per_layer = r * ((d + d) * 2 + (d + d // 2) * 2 + (d + ff) * 3)
    assert adapter.report.trainable_params == layers * per_layer
    t = adapter.report.hparams["sequence_tokens"]
    p = adapter.report.trainable_params
    p_last_mlp = r * (d + ff) * 3  # in F, the last block's MLP adapters run at the scored positions alone, as it does
    h = [h[0] - 1, h[1] - 1]  # less the unbilled one-token probe of which layers need input gradients
    forward = forward_cost(lm, t, h) + 2 * p * t - 2 * p_last_mlp * (t - h[1])
    # block 0's q, k, v (and their LoRA A) read the frozen embeddings: backward runs no activation gradient through them
    no_input_grad = d * d + 2 * d * (d // 2) + 3 * r * d
    assert adapter.report.post_train_flops == pytest.approx(2 * forward - 2 * no_input_grad * t + 2 * p * t, rel=1e-12)


def test_steer_mean_flops_count_every_forward_token_through_the_layers_it_ran():
    lm = language_model()
    tokens = lm.forward_tokens
    with head_positions(lm) as h:
        ctx, adapter = fit("steer_mean", lm, CONFIGS["steer_mean"])
    report = adapter.report
    extraction = report.hparams["extraction_forward_tokens"]
    assert 0 < extraction < lm.forward_tokens - tokens
    # layer 0.5 of 3 is block 1: extraction runs blocks 0 and 1 only, block 1's MLP and its attention's
    # query and output projections on each distinct text's last token alone; the selection passes run everything
    texts = len({text for pair in ctx.task.contrast_pairs(ctx.train) for text in pair})
    blocks = lm.model.model.layers
    last_only = [blocks[1].mlp]
    if last_row_attention.supported(lm.model, blocks[1].self_attn):  # transformers >= 4.48
        last_only += [blocks[1].self_attn.q_proj, blocks[1].self_attn.o_proj]
    mlp = sum(p.numel() for module in last_only for p in module.parameters())
    through = sum(p.numel() for block in blocks[:2] for p in block.parameters())
    assert report.layer == 1 and through < matmul_params(lm.model) and texts < extraction
    assert report.post_train_flops == pytest.approx(
        2 * (through - mlp) * extraction + 2 * mlp * texts + forward_cost(lm, lm.forward_tokens - tokens - extraction, h), rel=1e-12
    )  # the extraction never reaches the head: every head position counted is the selection passes


def test_prompt_uses_as_many_demonstrations_as_fit():
    lm = language_model()
    fixed = {"separator": " ; ", "choose_shots": False}
    ctx, adapter = fit("prompt", lm, {**fixed, "max_context_tokens": 40}, n_train=32)
    shots = adapter.report.hparams["shots"]
    # each demonstration 'q: aX bY = Z ; ' is 6 tokens; the longest query ('<bos> q: aX bY = Z') is reserved twice
    assert shots == adapter.report.hparams["shots_fit"] == (40 - 2 * 6) // 6 == 4
    assert adapter.report.train_tokens == 6 * shots
    assert adapter.report.selection == "fixed" and adapter.report.post_train_flops == 0
    with adapter.applied():
        assert lm.token_count(ctx.train[0].prompt, prompt=True) == 1 + 6 * shots + 4
    _, capped = fit("prompt", lm, {**fixed, "max_shots": 2}, n_train=32)
    assert capped.report.hparams["shots"] == 2
    _, everything = fit("prompt", lm, fixed, n_train=32)
    assert everything.report.hparams["shots"] == 32


def test_a_generated_answers_demonstrations_end_with_the_end_of_text_token_its_nll_reads():
    """gsm8k's and function_calling's targets end with the end-of-text token in their NLL (`Example.ends_text`): their
    demonstrations ended with the separator alone, so every shot taught the model to write on after an answer and the
    NLL the shots are chosen on charged it for that. A choice-scored example's demonstration gets no such token."""
    lm = language_model()
    ctx = fit_context(lm, n_train=4)
    ended = dataclasses.replace(ctx, train=[dataclasses.replace(ex, ends_text=True) for ex in ctx.train])
    config = resolve_config("prompt", {"separator": " ; ", "choose_shots": False})
    plain, generated = (get_method("prompt").fit(c, config) for c in (ctx, ended))
    eos = lm.tokenizer.eos_token
    assert plain.prefix.count(eos) == 0 and generated.prefix.count(eos) == generated.report.hparams["shots"] == 4
    assert generated.prefix.startswith(ctx.train[0].prompt + ctx.train[0].target + eos + " ; ")
    # read back as the token itself, not as its characters
    assert lm.token_count(generated.prefix, prompt=False) == lm.token_count(plain.prefix, prompt=False) + 4


@pytest.mark.parametrize("best, chosen", [(4, 4), (None, 0)])
def test_prompt_chooses_how_many_demonstrations_on_validation(monkeypatch, best, chosen):
    """Among 0, 1, 2, 4, … and all that fit, the count with the best validation value; ties go to fewer."""
    lm = language_model()
    ctx = fit_context(lm, n_train=32)
    tried: list[int] = []

    def validation_nll(lm, examples):
        tried.append(lm.prefix.count(" ; "))  # demonstrations in front of the validation questions
        target_nll(lm, examples)  # the real pass, whose tokens the FLOP count must include
        return 1.0 if best is None else 1.0 + abs(tried[-1] - best)

    monkeypatch.setattr(protocol, "target_nll", validation_nll)
    adapter = get_method("prompt").fit(ctx, resolve_config("prompt", {"separator": " ; "}))
    report = adapter.report
    assert tried == [0, 1, 2, 4, 8, 16, 32] and report.hparams["shots_fit"] == 32
    assert report.hparams["shots"] == chosen and report.train_tokens == 6 * chosen
    assert report.selection == "shared_validation_nll" and report.val_labels == len(ctx.validation)
    lm.forward_tokens = 0
    with head_positions(lm) as h:
        for k in tried:
            with lm.prefixed(" ; ".join(f"{ex.prompt}{ex.target}" for ex in ctx.train[:k]) + " ; " * bool(k)):
                target_nll(lm, ctx.validation)
    assert report.post_train_flops == pytest.approx(forward_cost(lm, lm.forward_tokens, h), rel=1e-12)  # the seven passes that chose


def test_prompt_refuses_to_choose_its_demonstrations_without_a_validation_set():
    """With no validation set the choice fell back to all that fit while the row said choose_shots: true."""
    lm = language_model()
    with pytest.raises(ValueError, match="set choose_shots: false to use all that fit"):
        fit("prompt", lm, {"separator": " ; "}, n_train=8, n_val=0)
    _, adapter = fit("prompt", lm, {"separator": " ; ", "choose_shots": False}, n_train=8, n_val=0)
    assert adapter.report.hparams["shots"] == 8 and adapter.report.selection == "fixed"


def test_composition_config_names_and_metrics():
    config = resolve_config("steer_mean+lora", {"first": {"scales": [0.5]}, "second": {"rank": 2}})
    assert config.first.scales == (0.5,) and config.second.rank == 2 and config.second.alpha == 8.0
    with pytest.raises(ConfigError, match=r"methods\.steer_mean\+lora\.second\.rnak: unknown key \(did you mean 'rank'\?\)"):
        resolve_config("steer_mean+lora", {"second": {"rnak": 2}})
    with pytest.raises(UnknownNameError, match="did you mean 'steer_mean'"):
        get_method("steer_maen+lora")
    with pytest.raises(UnknownNameError, match="did you mean 'lora'"):
        get_method("steer_mean+lroa")
    assert get_method("lora+steer_mean").name == "lora+steer_mean"

    lm = language_model()
    ctx = fit_context(lm)
    nll = {}
    for name in ("steer_mean", "lora", "steer_mean+lora"):
        adapter = get_method(name).fit(ctx, resolve_config(name, ALL[name]))
        with adapter.applied():
            nll[name] = ctx.task.evaluate(lm, ctx.validation).nll
        if name == "steer_mean+lora":
            report = adapter.report
    assert len(set(nll.values())) == 3, nll
    assert report.layer is not None and report.alpha == 2.0 and report.trainable_params > 0
    assert report.hparams["first"]["method"] == "steer_mean" and report.hparams["second"]["method"] == "lora"


def test_a_compositions_second_part_is_fitted_on_the_model_with_the_first_applied():
    """Its vector is the mean difference read through the LoRA, not the base model's (fitting the second
    part on the base model kept every assertion of the test above true)."""
    from workers.methods.steer_mean import mean_difference

    lm = language_model()
    ctx = fit_context(lm)
    stacked = get_method("lora+steer_mean").fit(ctx, resolve_config("lora+steer_mean", COMPOSITIONS["lora+steer_mean"]))
    pairs = ctx.task.contrast_pairs(ctx.train)
    with stacked.first.applied():
        through_lora = mean_difference(lm, pairs, [stacked.second.layer])[0][0]
    on_base = mean_difference(lm, pairs, [stacked.second.layer])[0][0]
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(stacked.second.vector, through_lora, dim=0) > 1 - 1e-6
    assert cosine(stacked.second.vector, on_base, dim=0) < 1 - 1e-4


@pytest.mark.parametrize("name", ["lora", "steer_trained", "full_ft"])
def test_reported_flops_are_what_a_counter_measures_alone_and_under_a_lora(name, monkeypatch):
    """post_train_flops against torch's FLOP counter, within the attention term the formulas leave out. Fitted
    under a LoRA, steer_trained reported 0.88 and full_ft 0.91 of what ran: passes billed the base model's
    parameters only, while the adapters ran on every token (LoRA's own validations left them out too). The bill
    is PEFT's computation, the update added to the output: merged into the weight (`lora_layer.merges`, batches
    with at least as many rows as a layer is wide and high: these training batches) fewer FLOPs run, never more."""
    from torch.utils.flop_counter import FlopCounterMode

    from workers.methods import lora_layer

    lm = language_model()
    ctx = fit_context(lm, n_train=16)
    train = {"min_steps": 8, "max_steps": 8, "batch_size": 16, "checkpoints": 4}  # 16 examples: ≥ 64 rows, the widest layer's
    raw = {"lora": {"rank": 2, "train": {**train, "lr": 0.05}}, "steer_trained": {"train": {**train, "lr": 0.5}},
           "full_ft": {"train": {**train, "lr": 0.01}}}  # fmt: skip
    lora = get_method("lora").fit(ctx, resolve_config("lora", raw["lora"]))
    ratios, counts, merged_ran = [], [], []
    merges, merged_backwards = lora_layer.merges, []
    backward = lora_layer._LoraLinear.backward
    monkeypatch.setattr(lora_layer._LoraLinear, "backward", staticmethod(lambda ctx, grad: merged_backwards.append(ctx.merged) or backward(ctx, grad)))
    for under in [contextlib.nullcontext] + ([lora.applied] if name != "lora" else []):  # one PEFT injection at a time
        ran = {}
        for merging in (False, True):
            monkeypatch.setattr(lora_layer, "merges", merges if merging else lambda x, weight: False)
            with under(), FlopCounterMode(display=False) as counter:
                report = get_method(name).fit(ctx, resolve_config(name, raw[name])).report
            ran[merging] = counter.get_total_flops()
        ratios.append(report.post_train_flops / ran[False])
        counts.append(report.trainable_params)
        merged_ran.append(ran[True] / ran[False])
    assert all(0.97 < ratio < 1.025 for ratio in ratios), ratios  # LoRA billed 1.041: backward through block 0's q/k/v
    # the training batches merged, the backward too (full_ft's base layers train: autograd's path, no merge)
    assert all(share <= 1 for share in merged_ran) and (name == "full_ft" or (merged_ran[-1] < 1 and any(merged_backwards))), merged_ran
    # under a LoRA, full_ft trains the adapters too, but they are the LoRA part's to count (lora+full_ft counted them twice)
    assert len(set(counts)) == 1 and lora.report.trainable_params > 0


def test_lora_on_gpt2_bills_its_conv1d_projections_as_linear_layers():
    """GPT-2's projections are `Conv1D`s: the probe for layers whose input needs no gradient hooked `nn.Linear` alone,
    so block 0's c_attn was billed a backward it never ran: LoRA 1.087 of the counter where full_ft read 1.039 (the
    attention term the formulas leave out, alike for both; helper-126)."""
    from torch.utils.flop_counter import FlopCounterMode

    train = {"min_steps": 8, "max_steps": 8, "batch_size": 4, "checkpoints": 0}
    ratios = {}
    for name, settings in (("lora", {"rank": 2, "train": {**train, "lr": 0.05}}), ("full_ft", {"train": {**train, "lr": 0.01}})):
        ctx = fit_context(language_model("gpt2"), n_train=16)
        with FlopCounterMode(display=False) as counter:
            report = get_method(name).fit(ctx, resolve_config(name, settings)).report
        ratios[name] = report.post_train_flops / counter.get_total_flops()
    assert abs(ratios["lora"] - ratios["full_ft"]) < 0.01, ratios


@pytest.mark.parametrize("layers", [[0.0], [1.0]])
def test_a_trained_vector_on_the_first_or_last_block_bills_what_a_counter_measures(layers):
    """Steering the last block, the backward runs through the head alone; billed as the forward less 2·N_before·T,
    where the forward had run that block's MLP at the scored positions only, it was 0.7 of what ran on the ladder's
    m rung and below zero on a one-block model."""
    from torch.utils.flop_counter import FlopCounterMode

    lm = language_model()
    ctx = fit_context(lm, n_train=16)
    config = resolve_config("steer_trained", {"layers": layers, "train": {"min_steps": 8, "max_steps": 8, "batch_size": 4, "checkpoints": 2, "lr": 0.5}})
    with FlopCounterMode(display=False) as counter:
        report = get_method("steer_trained").fit(ctx, config).report
    assert 0.97 < report.post_train_flops / counter.get_total_flops() < 1.05, (report.post_train_flops, counter.get_total_flops())


def test_a_compositions_costs_are_its_parts_and_prompt_demonstrations_count_once():
    """`prompt+steer_mean` counted the demonstrations again in front of every contrast text (16 pairs, a
    96-token prefix: 3,360 tokens where the parts read 96 + 192)."""
    lm = language_model()
    prompt, steer = {"separator": " ; ", "choose_shots": False}, CONFIGS_CHANGING["steer_mean"]
    _, alone = fit("prompt", lm, prompt)
    _, steered = fit("steer_mean", lm, steer)
    _, both = fit("prompt+steer_mean", lm, {"first": prompt, "second": steer})
    assert alone.report.train_tokens > 0 and steered.report.train_tokens > 0
    assert both.report.train_tokens == alone.report.train_tokens + steered.report.train_tokens
    # the extraction's forwards did run with the demonstrations in front: its FLOPs say so
    assert both.report.post_train_flops > alone.report.post_train_flops + steered.report.post_train_flops
    _, chosen = fit("steer_mean", lm, CONFIGS["steer_mean"])  # a choice among two scales: both values recorded
    scores = chosen.report.hparams["scores"]
    assert len(scores) == 2 and scores[f"{chosen.layer}:{chosen.report.alpha}"] == max(scores.values())


def test_a_compositions_row_keeps_the_scale_of_whichever_part_has_one():
    """A task vector's λ has no layer: `task_vector+lora` used to take lora's empty scale instead."""
    from workers.methods.compose import combined_report

    task_vector, lora = protocol.FitReport(alpha=1.5), protocol.FitReport(trainable_params=8)
    assert combined_report(("task_vector", task_vector), ("lora", lora)).alpha == 1.5
    assert combined_report(("lora", lora), ("task_vector", task_vector)).alpha == 1.5
    steer = protocol.FitReport(layer=2, alpha=0.5)
    assert (combined_report(("steer_mean", steer), ("task_vector", task_vector)).alpha, combined_report(("task_vector", task_vector), ("steer_mean", steer)).layer) == (0.5, None)


@pytest.mark.parametrize("name, raw", [
    ("lora+lora", {}),
    ("lora+task_vector", {"second": {"finetune": "lora"}}),
    ("steer_mean+lora+lora", {"second": {}}),
])
def test_a_composition_nesting_peft_layers_is_refused_when_its_config_is_resolved(name, raw):
    """PEFT cannot inject a LoRA inside another and remove only the inner one: refused before anything
    trains, with the config's path, rather than a KeyError after the first part's training."""
    with pytest.raises(ConfigError, match=r"methods\.\S+: .*cannot run: lora keeps its PEFT LoRA layers in the model while applied"):
        resolve_config(name, raw)
    for fine in ("lora+task_vector", "task_vector+lora", "lora+steer_mean", "steer_mean+lora"):  # no LoRA inside a LoRA
        resolve_config(fine, {"first": {"finetune": "lora"}} if fine.startswith("task_vector") else {})


@pytest.mark.parametrize("name", ["lora", "steer_trained", "full_ft", "steer_mean"])
def test_same_seed_same_result(name):
    def run():
        lm = language_model()
        ctx, adapter = fit(name, lm, ALL[name])
        with adapter.applied():
            return logits(lm), adapter.report

    (a, ra), (b, rb) = run(), run()
    assert torch.equal(a, b) and ra == rb


@pytest.mark.parametrize("name", ["lora", "full_ft", "steer_trained"])
def test_nan_loss_fails_the_fit_and_leaves_the_model_restored(name):
    lm = language_model()
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[1] = float("nan")  # <bos>: every sequence goes NaN
    state = model_state(lm)
    with pytest.raises(NonFiniteLossError):
        fit(name, lm, ALL[name])
    weights = lm.model.state_dict()
    assert all(torch.equal(weights[k], v) or torch.isnan(v).any() for k, v in state[0].items())
    assert [(n, type(m)) for n, m in lm.model.named_modules()] == state[2]
    assert {k: p.requires_grad for k, p in lm.model.named_parameters()} == state[1]


TARGETS = [("q_proj", "v_proj"), ("self_attn.q_proj", "mlp.up_proj"), ("c_attn",), ("fc1", "dense"), (r".*\.(q_proj|v_proj)",), ("q_proj",), ("layers.0.mlp.down_proj",)]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_lora_target_matching_is_pefts_own(arch):
    """Planning checks targets without importing peft: its rule must pick the modules PEFT picks, by name."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from workers.methods.lora import _targets

    names = [name for name, _ in ARCHITECTURES[arch]().named_modules() if name]
    for target in [*TARGETS, *(t[0] for t in TARGETS)]:  # a tuple is a list of names; a single string, a pattern
        config = LoraConfig(target_modules=list(target) if isinstance(target, tuple) else target)
        assert [bool(check_target_module_exists(config, n)) for n in names] == [_targets(n, target) for n in names], (arch, target)


@pytest.mark.parametrize(("name", "raw"), [
    ("lora", {**CONFIGS["lora"], "target_modules": ["q_proj", "v_porj"]}),
    ("task_vector", {"finetune": "lora", "lora": {**CONFIGS["lora"], "target_modules": ["v_porj"]}, "lambdas": [1.0]}),
])  # fmt: skip
def test_a_lora_target_the_model_lacks_is_refused_not_dropped(name, raw):
    """PEFT refuses a target list none of whose entries match, but adapts the rest of one with a typo: a run
    that adapts q_proj alone while its row says q_proj and v_proj. The cell must fail, naming the entry."""
    lm = language_model()
    before = logits(lm)
    with pytest.raises(ValueError, match=r"'v_porj' matches no module of LlamaForCausalLM \(did you mean 'v_proj'\?\)"):
        fit(name, lm, raw)
    assert torch.equal(logits(lm), before) and not any("lora" in n for n, _ in lm.model.named_modules())
    assert protocol.model_problem(get_method(name), resolve_config(name, raw), lambda: lm.model) is not None  # what planning asks


def test_a_single_target_string_is_a_pattern_and_the_refusal_says_so():
    lm = language_model()
    problem = protocol.model_problem(get_method("lora"), resolve_config("lora", {"target_modules": "q_proj"}), lambda: lm.model)
    assert problem is not None and "write [q_proj] for every module of that name" in problem
    assert protocol.model_problem(get_method("lora"), resolve_config("lora", {"target_modules": r".*q_proj"}), lambda: lm.model) is None
    with pytest.raises(ConfigError, match=r"methods.lora.target_modules: .*'q_proj\[' is not one"):
        resolve_config("lora", {"target_modules": "q_proj["})
    with pytest.raises(ConfigError, match="methods.lora.target_modules: .*no module to adapt"):  # PEFT would refuse it in every cell
        resolve_config("lora", {"target_modules": []})
    # PEFT takes its shorthand in any case: not a pattern to refuse
    assert protocol.model_problem(get_method("lora"), resolve_config("lora", {"target_modules": "ALL-LINEAR"}), lambda: lm.model) is None


@pytest.mark.parametrize("name", ["lora", "steer_mean+lora", "task_vector", "base"])
def test_default_configs_are_checked_without_building_the_architecture(name):
    """`run` asks every method before its cells; a config that names no module must not make the driver load
    transformers' model code (seconds) to build the model on the meta device."""

    def architecture():
        raise AssertionError("the architecture was built for a config that names no module")

    assert protocol.model_problem(get_method(name), resolve_config(name, {}), architecture) is None


def test_a_depth_fraction_halfway_between_two_blocks_goes_the_same_way_at_every_depth():
    """Python's `round` sent a half to the even block: 0.5 was block 2 of 6 (40 % of the depth) and block 6 of 12 (55 %),
    so one setting steered at depths that moved with model size. Now the middle's tie goes down at every depth, a tie
    off the middle towards its own end (mirror fractions give mirror blocks), and the ladder's blocks stay as they were."""
    from workers.methods.steer_mean import layer_indices

    assert [layer_indices((0.5,), depth)[0] for depth in (2, 4, 6, 8, 12, 16)] == [0, 1, 2, 3, 5, 7]
    for depth in range(1, 40):
        for fraction in (0.1, 0.25, 1 / 3, 0.375, 0.45):
            (low,), (high,) = layer_indices((fraction,), depth), layer_indices((1 - fraction,), depth)
            assert low + high == depth - 1, (depth, fraction, low, high)
    # the default ladder's 2- and 3-block rungs: the blocks the quickstart's cells steered
    assert layer_indices((0.25, 0.5, 0.75), 2) == [0, 1] and layer_indices((0.25, 0.5, 0.75), 3) == [0, 1, 2]
    # rungs of 1-3 blocks map as `round` did for every fraction (their cells keep their ids, no version moved)
    assert all(layer_indices((k / 1000,), depth) == [round(k / 1000 * (depth - 1))] for depth in (1, 2, 3) for k in range(1001))
    # a tie a float misses by an ulp is still a tie: 0.7 of 46 blocks is 31.499999999999996 (Gemma-2-27B)
    assert layer_indices((0.7,), 46) == [32] and layer_indices((0.3,), 46) == [13] and layer_indices((0.14,), 26) == [3]
