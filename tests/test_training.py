"""The shared training loop: non-finite losses fail loudly; checkpoints keep the best (or nothing)."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from conftest_methods import fit_context, language_model
from workers.tasks.base import Example
from workers.training import (
    MasterWeights, NonFiniteLossError, TrainConfig, accumulated_step, batch_order, checkpoint_steps, steps_for, train,
)


def test_step_count_and_checkpoints():
    config = TrainConfig(epochs=2, batch_size=4, min_steps=3, max_steps=10)
    assert steps_for(1, config) == 3 and steps_for(12, config) == 6 and steps_for(100, config) == 10
    assert steps_for(13, config) == 7  # batches span shuffles: 26 examples in full batches of 4 (was 2·ceil(13/4) = 8)
    assert checkpoint_steps(10, 4) == [0, 2, 5, 8, 10]
    assert checkpoint_steps(2, 4) == [0, 1, 2]


@pytest.mark.parametrize("n_examples", [3, 16, 17, 100, 250])
def test_epochs_are_passes_over_the_examples(n_examples):
    """The steps draw `epochs` times the examples, short of one batch: rounding each epoch up to whole
    batches trained budget 100 for 4.48 epochs instead of 4."""
    config = TrainConfig(epochs=4, batch_size=16, min_steps=0, max_steps=10_000)
    drawn = sum(len(take) for take in batch_order(n_examples, steps_for(n_examples, config), config.batch_size, seed=0))
    assert 4 * n_examples <= drawn < 4 * n_examples + config.batch_size


@pytest.mark.parametrize("n_examples", [20, 40, 100, 250])
def test_a_batch_spanning_two_shuffles_holds_no_example_twice(n_examples):
    """Budget 20 in batches of 16: a batch takes 4 examples left of one shuffle and 12 of the next, which held one of
    the 4 again in 12 of 20 batches (helper-138). Each shuffle still trains every example once, in its order; a batch
    that spans none is the old rule's."""
    config = TrainConfig(epochs=16, batch_size=16, min_steps=0, max_steps=10_000)
    batches = list(batch_order(n_examples, steps_for(n_examples, config), config.batch_size, seed=3))
    assert all(len(set(take)) == len(take) == 16 for take in batches)
    drawn = [i for take in batches for i in take]
    epochs = [drawn[k : k + n_examples] for k in range(0, len(drawn) - n_examples + 1, n_examples)]
    assert len(epochs) >= 15 and all(sorted(epoch) == list(range(n_examples)) for epoch in epochs)  # reordered at the seams only
    first = torch.randperm(n_examples, generator=torch.Generator().manual_seed(3)).tolist()
    assert drawn[: n_examples // 16 * 16] == first[: n_examples // 16 * 16]


def _setup(arch: str = "llama", **overrides):
    lm = language_model(arch)
    ctx = fit_context(lm, n_train=8)
    param = torch.nn.Parameter(torch.zeros(lm.model.config.hidden_size))
    head = lm.model.get_output_embeddings()
    bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]))
    handle = head.register_forward_hook(lambda _m, _i, out: out + bias + 0 * param.sum())
    config = TrainConfig(lr=0.1, min_steps=6, max_steps=6, batch_size=4, **overrides)
    return lm, ctx, [bias, param], handle, config


def test_losses_are_reproducible_and_decrease():
    runs = []
    for _ in range(2):
        lm, ctx, params, handle, config = _setup(checkpoints=0)
        runs.append(train(lm, params, ctx.train, config, seed=3))
        handle.remove()
    assert runs[0].losses == runs[1].losses and runs[0].losses[-1] < runs[0].losses[0]
    assert runs[0].chosen_step == 6 and runs[0].tokens == 6 * 4


@pytest.mark.parametrize(("scores", "chosen"), [([0.5, 0.4, 0.3, 0.2], 0), ([0.1, 0.2, 0.3, 0.9], 6), ([0.1, 0.5, 0.5, 0.5], 2)])
def test_checkpoints_keep_the_best_and_ties_keep_fewer_steps(scores, chosen):
    lm, ctx, params, handle, config = _setup(checkpoints=3)
    seen = []
    snapshots = {}

    def validate() -> float:
        snapshots[len(seen)] = params[0].detach().clone()
        seen.append(None)
        return scores[len(seen) - 1]

    result = train(lm, params, ctx.train, config, seed=0, validate=validate)
    handle.remove()
    assert sorted(result.validation_scores) == [0, 2, 4, 6]
    assert result.chosen_step == chosen
    assert torch.equal(params[0].detach(), snapshots[[0, 2, 4, 6].index(chosen)])
    assert result.validation_tokens == 0  # this validator runs no forwards
    assert result.steps == 6  # training always runs to the end; only the kept parameters differ


def test_nan_loss_raises():
    lm, ctx, params, handle, config = _setup(checkpoints=0)
    with torch.no_grad():
        params[0].fill_(float("nan"))
    handle.remove()
    head = lm.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _i, out: out + params[0].sum())
    with pytest.raises(NonFiniteLossError, match="step 0"):
        train(lm, params, ctx.train, config, seed=0)
    handle.remove()
    assert lm.model.training is False  # mode restored


@pytest.mark.parametrize("checkpoints", [0, 3])
def test_a_gradient_that_overflows_under_a_finite_loss_at_the_last_step_raises(checkpoints):
    """No later loss shows NaN weights written by the last update: with checkpoints, the final one scored
    -inf and an earlier one was kept in silence (the row said ok)."""
    lm, ctx, params, handle, config = _setup(checkpoints=checkpoints)
    steps = []
    params[0].register_hook(lambda grad: grad + (float("inf") if len(steps) == 6 else 0.0))
    hook = lm.model.register_forward_pre_hook(lambda *_: steps.append(None) if lm.model.training else None)

    def validate() -> float:
        return float(-params[0].detach().abs().sum())

    try:
        with pytest.raises(NonFiniteLossError, match="non-finite at step 5"):
            train(lm, params, ctx.train, config, seed=0, validate=validate if checkpoints else None)
    finally:
        handle.remove()
        hook.remove()
    assert len(steps) == 6


def test_no_examples_trains_nothing():
    lm, ctx, params, handle, config = _setup()
    result = train(lm, params, [], config, seed=0)
    handle.remove()
    assert result.steps == 0 and result.chosen_step == 0 and torch.equal(params[0], torch.zeros_like(params[0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_train_through_fp32_masters(dtype):
    """AdamW on bf16 weights themselves rounds steps of lr 1e-3 away near 1.0 (bf16 spacing there is
    2^-7): the norm weights never moved, a silent handicap for full fine-tuning against steering."""
    lm = language_model()
    lm.model.to(dtype)
    ctx = fit_context(lm, n_train=8)
    norm = lm.model.get_decoder().norm.weight
    before = norm.detach().clone()
    config = TrainConfig(lr=1e-3, min_steps=20, max_steps=20, batch_size=4, checkpoints=0)
    result = train(lm, list(lm.model.parameters()), ctx.train, config, seed=0)
    assert norm.dtype == dtype and all(p.grad is None for p in lm.model.parameters())
    assert (norm.detach() != before).float().mean() > 0.5, "the norm weights must move"
    assert result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_step_in_micro_batches_sums_its_parts_in_fp32(dtype):
    """Each part's gradient (in the parameters' own dtype) goes into the fp32 master as the backward computes it: the
    parts summed into a bf16 gradient put it 0.71 % off fp32's at 32 parts, against 0.47 % unsplit (helper-152);
    gathered after each part, a part's bf16 gradients were all held beside the fp32 sums (helper-155)."""
    lm = language_model()
    lm.model.to(dtype)
    targets = [" 1", " 2 3 ; q:", " 0", " 4 4", " 3 ; q: a1", " 2", " 1 0 0", " 4"]
    pairs = lm.encode_pairs([f"q: a{i} b{i} =" for i in range(len(targets))], targets)
    params = list(lm.model.parameters())
    weights = MasterWeights(params, fp16_model=dtype == torch.float16)
    tokens = lm.collate(pairs).target_tokens
    expected = [torch.zeros_like(master) for master in weights.masters]
    for batch in (lm.collate(pairs[i : i + 2]) for i in range(0, len(pairs), 2)):  # the four parts, one by one
        (lm.token_nll(batch, lm.scored_logits(batch)).sum() / tokens * weights.scale).backward()
        for total, param in zip(expected, params, strict=True):
            total.add_(param.grad.float())
            param.grad = None
    held = []  # half-precision gradients alive whenever a backward hands one over: one at a time, none kept beside the sums
    for param in params:
        param.register_post_accumulate_grad_hook(lambda _p: held.append(sum(q.grad is not None for q in params)))
    accumulated_step(lm, weights, pairs, 4)
    assert held and max(held) == 1
    assert weights.gradients_to_masters()
    for master, total in zip(weights.masters, expected, strict=True):
        assert torch.equal(master.grad, total / weights.scale)
    assert all(p.grad is None for p in params)


def test_an_fp16_overflow_skips_the_step_and_halves_the_loss_scale():
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    weights = MasterWeights([weight], fp16_model=True)
    assert weights.scale == 2.0**16 and weights.masters[0].dtype == torch.float32
    weights.backward((weight * 1e4).sum())  # 1e4 x 2^16 overflows fp16's 65504: the gradient is inf
    assert not weights.gradients_to_masters() and weights.scale == 2.0**15
    weights.masters[0].grad = None
    weights.backward((weight * 1e-8).sum())  # a gradient of 1e-8 is 0 in fp16; scaled by 2^15 it survives the backward
    assert weights.gradients_to_masters()
    assert weights.masters[0].grad == pytest.approx(torch.full((4,), 1e-8), rel=1e-2) and weight.grad is None


def test_sequence_tokens_count_the_real_tokens_not_the_padding():
    """post_train_flops is 6·N·sequence_tokens: the tokens that ran; padding to a batch's longest example is not work the method needs."""
    from workers.tasks import get_task
    from workers.training import batch_order

    lm = language_model()
    examples = get_task("gridworld").examples("train", 24, 0)  # prompts of very different lengths
    lengths = [len(pair.ids) for pair in lm.encode_pairs([e.prompt for e in examples], [e.target for e in examples])]
    assert len(set(lengths)) > 1
    param = torch.nn.Parameter(torch.zeros(()))
    handle = lm.model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: out + param)
    config = TrainConfig(lr=0.1, min_steps=5, max_steps=5, batch_size=8, checkpoints=0)
    try:
        result = train(lm, [param], examples, config, seed=1)
    finally:
        handle.remove()
    # and neither is a batch's last column, which holds labels only (scored_logits does not run it)
    batches = [[lengths[i] for i in take] for take in batch_order(len(examples), 5, 8, 1)]
    assert result.sequence_tokens == sum(sum(b) - b.count(max(b)) for b in batches)


def test_training_whose_every_fp16_step_overflows_raises_instead_of_reporting_an_untrained_model():
    lm = language_model()
    ctx = fit_context(lm, n_train=8)
    param = torch.nn.Parameter(torch.zeros(lm.model.get_output_embeddings().weight.shape[0], dtype=torch.float16))
    handle = lm.model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: out + (param * 1e4).float())
    try:
        with pytest.raises(NonFiniteLossError, match="every one of 4 steps overflowed in fp16"):
            train(lm, [param], ctx.train, TrainConfig(lr=0.1, min_steps=4, max_steps=4, batch_size=4, checkpoints=0), seed=0)
        result = train(lm, [param], ctx.train, TrainConfig(lr=0.1, min_steps=20, max_steps=20, batch_size=4, checkpoints=0), seed=0)
    finally:
        handle.remove()
    assert 0 < result.skipped_steps < 20 and result.summary()["skipped_steps"] == result.skipped_steps  # the scale came down far enough


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_learning_rate_search_keeps_the_best_run_exactly_and_bills_every_run(dropout):
    """Each rate trains from the same start on the same batches (and, in a model with dropout, the same
    dropout masks): the kept parameters are those a run at the winning rate alone leaves, and the cost
    (sequence and validation tokens) is every run's."""
    lm, ctx, params, handle, config = _setup("gpt2", checkpoints=2)
    for module in lm.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    validate = ctx.validator()
    try:
        alone = {}
        for lr in (1e-6, 0.1):
            for p in params:
                p.data.zero_()
            torch.manual_seed(7)
            alone[lr] = (train(lm, params, ctx.train, config.model_copy(update={"lr": lr}), 3, validate), [p.detach().clone() for p in params])
        for p in params:
            p.data.zero_()
        torch.manual_seed(7)
        searched = train(lm, params, ctx.train, config.model_copy(update={"lr": 1e-6, "lr_search": (0.1,)}), 3, validate)
    finally:
        handle.remove()
    best = max(alone, key=lambda lr: alone[lr][0].validation_scores[alone[lr][0].chosen_step])
    assert best == 0.1 and searched.chosen_lr == 0.1, "a rate of 1e-6 barely moves: the search must pick 0.1"
    assert all(torch.equal(p, kept) for p, kept in zip(params, alone[0.1][1]))
    assert searched.losses == alone[0.1][0].losses and searched.tokens == alone[0.1][0].tokens
    assert searched.sequence_tokens == sum(r.sequence_tokens for r, _ in alone.values())
    # step 0 is the same parameters for every rate: validated once, not once per rate
    per_pass = alone[0.1][0].validation_tokens // len(alone[0.1][0].validation_scores)
    assert searched.validation_tokens == sum(r.validation_tokens for r, _ in alone.values()) - per_pass > 0
    assert searched.lr_scores == {lr: r.validation_scores[r.chosen_step] for lr, (r, _) in alone.items()}
    assert searched.summary()["chosen_lr"] == 0.1


def test_a_learning_rate_search_needs_validation():
    with pytest.raises(ValueError, match="lr_search chooses on validation checkpoints"):
        TrainConfig(lr_search=(0.1,), checkpoints=0)
    lm, ctx, params, handle, config = _setup(checkpoints=2)
    try:
        with pytest.raises(ValueError, match="there is none"):
            train(lm, params, ctx.train, config.model_copy(update={"lr_search": (0.5,)}), 3, None)
    finally:
        handle.remove()
    assert TrainConfig(lr=0.1, lr_search=(0.1, 0.3)).learning_rates == (0.1, 0.3)  # a rate given twice is tried once


def test_a_rate_that_diverges_drops_out_of_the_search_and_is_still_billed():
    """A high rate in the search going NaN must not fail the cell when another rate trains: it is recorded
    and its tokens counted, and nothing of its run is kept (its error's traceback held the optimiser, a
    cycle only the garbage collector broke, while the next rate trained); only every rate diverging fails
    the training."""
    lm = language_model()
    ctx = fit_context(lm, n_train=8)
    head = lm.model.get_output_embeddings()
    bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]))
    # the logits go NaN once the bias has moved far: a rate of 100 gets there in one step, 0.1 never does
    handle = head.register_forward_hook(lambda _m, _i, out: out + bias + (float("nan") if bias.detach().abs().max() > 10 else 0.0))
    config = TrainConfig(lr=0.1, min_steps=6, max_steps=6, batch_size=4, checkpoints=2)
    try:
        alone = train(lm, [bias], ctx.train, config, 3, ctx.validator())
        bias.data.zero_()
        gc.collect()
        gc.disable()  # what the search leaves alive is freed by reference counts alone, as a GPU needs it freed at once
        try:
            searched = train(lm, [bias], ctx.train, config.model_copy(update={"lr_search": (100.0,)}), 3, ctx.validator())
            optimisers_alive = sum(isinstance(o, torch.optim.Optimizer) for o in gc.get_objects())
        finally:
            gc.enable()
        kept = bias.detach().clone()
        bias.data.zero_()
        with pytest.raises(NonFiniteLossError, match=r"every learning rate of train.lr_search diverged \(lr 100: loss became nan at step 1; lr 200"):
            train(lm, [bias], ctx.train, config.model_copy(update={"lr": 100.0, "lr_search": (200.0,)}), 3, ctx.validator())
    finally:
        handle.remove()
    assert searched.chosen_lr == 0.1 and list(searched.lr_scores) == [0.1] and list(searched.lr_diverged) == [100.0]
    assert optimisers_alive == 0  # the diverged rate's optimiser (its state: 2 copies of the trained weights) let go of
    assert "loss became nan at step 1" in searched.lr_diverged[100.0]
    assert searched.losses == alone.losses and kept.abs().max() < 10
    assert searched.sequence_tokens > alone.sequence_tokens  # the diverged run's step 0 and 1 forwards are billed
    assert searched.validation_tokens == alone.validation_tokens  # its step 0 was 0.1's, already validated


@pytest.mark.parametrize("ends_text", [True, False])
def test_a_generated_answers_target_ends_with_the_end_of_text_token_so_a_tuned_model_stops(ends_text: bool) -> None:
    """gsm8k's and function_calling's targets are whole answers, scored on a generation: trained without the end-of-text
    token a tuned model never learns to stop, writes on to the token limit (every question paying 256 tokens on a GPU)
    and a parser reads whatever it made up next. With it, greedy generation stops where the answer ends, the token is in
    the target's NLL, and a choice-scored example (ends_text False) gets no such token."""
    lm = language_model()
    example = Example(prompt="q: a1 b2 =", target=" 3 ; q: a4 b0 = 2", ends_text=ends_text)
    (pair,) = lm.encode_pairs([example.prompt], [example.target], [example.ends_text])
    assert (pair.ids[-1] == lm.end_of_text) == ends_text
    params = list(lm.model.parameters())
    for p in params:
        p.requires_grad_(True)
    train(lm, params, [example] * 8, TrainConfig(lr=1e-2, min_steps=60, max_steps=60, batch_size=8, checkpoints=0), seed=0)
    (generated,) = lm.generate([example.prompt], 12)
    assert generated.startswith(" 3 ; q: a4 b0 = 2") or generated.startswith("3 ; q: a4 b0 = 2"), generated
    stopped = generated.strip() == example.target.strip()
    assert stopped == ends_text, generated
    if ends_text:  # the stop is learned, and the NLL counts it
        assert lm.target_nll([example.prompt], [example.target], [True]) < 0.1
        lm.model.generation_config.eos_token_id = None  # a checkpoint whose generation config names no stop token
        assert lm.generate([example.prompt], 12)[0].strip() == example.target.strip()  # stops at the tokenizer's, trained on


@contextlib.contextmanager
def out_of_memory_at_call(lm, call: int):
    """The model's `call`-th forward (from 1) runs out of accelerator memory, once: in a step of micro-batches,
    the second one fails after the first one's backward, whose gradients must not count."""
    calls = 0

    def check(module, args, kwargs):
        nonlocal calls
        calls += 1
        if calls == call:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = lm.model.register_forward_pre_hook(check, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def test_a_step_that_runs_out_of_memory_runs_again_as_if_split_from_the_start(capfd):
    """At a 150k vocabulary a training batch's logits can outgrow the card: the step runs again in twice the
    micro-batches, and the rest keep them. What the failed try did (gradients of the parts before, dropout draws,
    forward counts) leaves no trace: the run equals one split so from its first step, bit for bit."""

    def trained(parts: int, failing_call: int | None = None):
        lm = language_model("gpt2")
        for module in lm.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.1  # the masks a retry must draw again, not after the failed try's
        lm.train_parts = parts
        ctx = fit_context(lm, n_train=8)
        config = TrainConfig(lr=1e-3, min_steps=4, max_steps=4, batch_size=8, checkpoints=0)
        with out_of_memory_at_call(lm, failing_call) if failing_call else contextlib.nullcontext():
            result = train(lm, list(lm.model.parameters()), ctx.train, config, seed=0)
        return lm, result, [p.detach().clone() for p in lm.model.parameters()]

    lm, split, params = trained(2, failing_call=2)  # step 0's second part, after the first part's backward
    assert lm.train_parts == 4 and "out of accelerator memory in a training step; 4 micro-batches a step" in capfd.readouterr().err
    clean_lm, clean, clean_params = trained(4)
    assert split.losses == clean.losses and all(torch.equal(a, b) for a, b in zip(params, clean_params, strict=True))
    assert (lm.forward_tokens, lm.flops_run, split.sequence_tokens) == (clean_lm.forward_tokens, clean_lm.flops_run, clean.sequence_tokens)
    assert all(p.grad is None for p in lm.model.parameters())
    lm.train_parts = 8
    with out_of_memory_at_call(lm, 1), pytest.raises(torch.OutOfMemoryError):  # one example that does not fit fails the cell
        train(lm, list(lm.model.parameters()), fit_context(lm, n_train=8).train, TrainConfig(min_steps=1, max_steps=1, batch_size=8, checkpoints=0), seed=0)


@pytest.mark.parametrize("parts", [2, 3, 8])
def test_micro_batches_sum_to_the_whole_batchs_loss_and_gradients(parts):
    lm = language_model()
    targets = [" 1", " 2 3 ; q:", " 0", " 4 4", " 3 ; q: a1", " 2", " 1 0 0", " 4"]  # of different lengths: tokens, not rows, weigh
    pairs = lm.encode_pairs([f"q: a{i} b{i} =" for i in range(len(targets))], targets)
    params = list(lm.model.parameters())
    weights = MasterWeights(params, fp16_model=False)

    def step(n: int) -> tuple[float, int, list[torch.Tensor]]:
        for p in params:
            p.grad = None
        loss, tokens = accumulated_step(lm, weights, pairs, n)
        return float(loss), tokens, [p.grad.clone() for p in params]

    (whole, tokens, grads), (split, split_tokens, split_grads) = step(1), step(parts)
    assert float(lm.loss(lm.collate(pairs))) == pytest.approx(whole, rel=1e-6)  # the plain step's loss
    assert split_tokens == tokens and split == pytest.approx(whole, rel=1e-6)
    for a, b in zip(split_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))

