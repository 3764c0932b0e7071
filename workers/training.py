"""One supervised training loop for every method that learns by gradient (LoRA, full FT, vectors).

Kept deliberately plain (AdamW, cosine decay, continuation-only loss) so that a method differs from
another only in *which* parameters it hands to `train`, never in how it is trained. The same loop
does fair early stopping for all of them: with `checkpoints` > 0 it scores the shared validation set
at step 0 and at evenly spaced steps and keeps the best parameters, so "do nothing" (step 0) is
always a candidate and ties go to fewer steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
from dataclasses import dataclass
from typing import Annotated, Callable, Iterator, Sequence

import torch
from pydantic import BaseModel, Field, PositiveFloat, ValidationInfo, field_validator, model_validator

from workers.config import Distinct, StrictConfig
from workers.lm import EncodedPair, LanguageModel, unless_out_of_memory
from workers.memory import release_memory
from workers.tasks.base import Example


@dataclass(frozen=True)
class Passes:
    """What a training put through the model: its steps' and its validations' tokens, and their forward
    FLOPs as run (`LanguageModel.flops_run`), which the methods' cost formulas scale."""

    sequence_tokens: int = 0
    validation_tokens: int = 0
    sequence_flops: float = 0.0
    validation_flops: float = 0.0
    sequence_head_flops: float = 0.0  # of sequence_flops, the output head's (`LanguageModel.head_flops_run`)

    def __add__(self, other: Passes) -> Passes:
        return Passes(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the cell fails with this instead of storing garbage.

    `spent`: what the run had put through the model by then, which a learning-rate search that goes on
    without this rate still bills."""

    def __init__(self, message: str, spent: Passes = Passes()) -> None:
        super().__init__(message)
        self.spent = spent


class TrainConfig(StrictConfig):
    """Optimisation settings shared by gradient-based methods (each method embeds its own copy)."""

    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(4, ge=1)
    min_steps: int = Field(20, ge=0, description="lower bound on optimizer steps, so tiny budgets still train")
    max_steps: int = Field(400, ge=1)
    batch_size: int = Field(16, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    checkpoints: int = Field(
        4, ge=0, description="validation checkpoints besides step 0; the best is kept (0 = keep the last step, no validation)"
    )
    lr_search: Annotated[tuple[PositiveFloat, ...], Distinct] = Field(
        (), description="more learning rates to try besides `lr`, each from the same start; the best validation "
        "checkpoint of any wins, and the cell's cost counts every try (tunes training as steering tunes its layer and scale)"
    )

    @field_validator("lr_search")
    @classmethod
    def _not_lr_again(cls, rates: tuple[float, ...], info: ValidationInfo) -> tuple[float, ...]:
        """`lr` is tried first in any case: listed here too, it is the same search, one cell id."""
        return tuple(rate for rate in rates if rate != info.data.get("lr"))

    @model_validator(mode="after")
    def _a_search_needs_checkpoints(self) -> "TrainConfig":
        if self.lr_search and not self.checkpoints:
            raise ValueError("lr_search chooses on validation checkpoints: set checkpoints >= 1")
        return self

    @model_validator(mode="after")
    def _min_steps_within_max_steps(self) -> "TrainConfig":
        """`max_steps` caps `min_steps` (`steps_for`): one set above it did nothing but change the cells' ids. The
        default `min_steps` above a `max_steps` set lower is that cap at work, not a slip — however it is written: a
        cell's stored config spells every default out, and is validated again wherever it is read."""
        if self.min_steps > self.max_steps and self.min_steps != type(self).model_fields["min_steps"].default:
            raise ValueError(f"min_steps {self.min_steps} is above max_steps {self.max_steps}, which caps it: "
                             "lower min_steps or raise max_steps")  # fmt: skip
        return self

    @property
    def learning_rates(self) -> tuple[float, ...]:
        """The learning rates one training tries, `lr` first (it wins ties)."""
        return tuple(dict.fromkeys((self.lr, *self.lr_search)))


@dataclass
class TrainResult:
    losses: list[float]  # one per optimizer step actually run
    tokens: int  # continuation tokens the optimizer saw (what the loss was computed on)
    sequence_tokens: int  # all tokens that went through the model in training
    chosen_step: int  # the step whose parameters were kept (== steps without checkpoints)
    validation_tokens: int = 0  # tokens the checkpoint validations ran through the model
    sequence_flops: float = 0.0  # the training forwards' FLOPs as run (what the methods' formulas scale)
    validation_flops: float = 0.0  # the checkpoint validations' FLOPs as run
    sequence_head_flops: float = 0.0  # of sequence_flops, the output head's
    validation_scores: dict[int, float] | None = None  # step -> validation score, when checkpoints ran
    skipped_steps: int = 0  # fp16 steps whose gradients overflowed: not taken (their losses are still listed)
    lr_scores: dict[float, float] | None = None  # with lr_search: each learning rate's best validation score
    chosen_lr: float | None = None  # with lr_search: the one kept (losses, steps and scores above are its run's)
    lr_diverged: dict[float, str] | None = None  # with lr_search: the rates whose loss went non-finite, and how

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def passes(self) -> Passes:
        return Passes(self.sequence_tokens, self.validation_tokens, self.sequence_flops, self.validation_flops, self.sequence_head_flops)

    @property
    def chosen_score(self) -> float:
        """The validation score of the parameters kept (of a run with validation checkpoints)."""
        return (self.validation_scores or {})[self.chosen_step]

    def summary(self) -> dict[str, object]:
        """What a method records of its training in the row's hparams (the loss curve included)."""
        return {
            "steps": self.steps,
            "chosen_step": self.chosen_step,
            "losses": self.losses,
            "sequence_tokens": self.sequence_tokens,
            "validation_tokens": self.validation_tokens,
            "sequence_flops": self.sequence_flops,
            "validation_flops": self.validation_flops,
            "validation_scores": self.validation_scores,
            "skipped_steps": self.skipped_steps,
            **({"lr_scores": self.lr_scores, "chosen_lr": self.chosen_lr, "lr_diverged": self.lr_diverged} if self.lr_scores is not None else {}),
        }


def training_configs(config: BaseModel, path: str = "") -> Iterator[tuple[str, TrainConfig]]:
    """Every TrainConfig inside a method's config, with its key path (compositions and task
    vectors nest the training of their parts)."""
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, TrainConfig):
            yield f"{path}.{name}", value
        elif isinstance(value, BaseModel):
            yield from training_configs(value, f"{path}.{name}")


def steps_for(n_examples: int, config: TrainConfig) -> int:
    """`epochs` passes over the examples in `batch_order`'s batches, which are full (a batch spans two
    shuffles; below a batch, a step draws every example): 4 epochs of 100 in batches of 16 are 25 steps."""
    per_step = min(config.batch_size, max(n_examples, 1))
    return min(config.max_steps, max(config.min_steps, math.ceil(config.epochs * n_examples / per_step)))


def steps_changed(n_examples: int, config: TrainConfig) -> bool:
    """Whether `steps_for` trains another number of steps than the rule before session 30 (2026-12-04), which rounded
    each epoch up to whole batches (`epochs · ceil(n / batch)`): only such cells compute something new
    and get new ids (workers.cell); every other cell, the quickstart's included, keeps the id of its row."""
    before = min(config.max_steps, max(config.min_steps, config.epochs * math.ceil(n_examples / config.batch_size)))
    return before != steps_for(n_examples, config)


def batches_changed(n_examples: int, config: TrainConfig) -> bool:
    """Whether `batch_order` may draw other batches than before session 41 (2026-12-06), when a batch spanning two
    shuffles could hold an example twice: where one spans them. Only such cells get new ids (workers.cell)."""
    per_step = config.batch_size
    return n_examples > per_step and n_examples % per_step != 0 and steps_for(n_examples, config) * per_step > n_examples


def batch_order(n_examples: int, steps: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Each step's example indices: seeded reshuffles of the examples, drawn `batch_size` at a time. A batch
    may span two shuffles; it then takes from the next one the first examples it does not hold yet, and the
    next shuffle keeps the others in its order (the old rule took the next shuffle's head, and one batch could
    train an example twice). Public so a reference loop can feed its batches in this order."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < min(batch_size, n_examples):
            held, need = set(order), batch_size - len(order)
            fresh = torch.randperm(n_examples, generator=generator).tolist()
            joining = [i for i in fresh if i not in held][:need]
            taken = set(joining)
            order += joining + [i for i in fresh if i not in taken]
        take, order = order[:batch_size], order[batch_size:]
        yield take


def checkpoint_steps(steps: int, checkpoints: int) -> list[int]:
    """Step 0 and `checkpoints` evenly spaced steps up to the last one."""
    return sorted({0, *(round(steps * k / checkpoints) for k in range(1, checkpoints + 1))})


Validator = Callable[[], float]  # score of the model as it is now on the shared validation set (higher is better)


def accumulated_step(lm: LanguageModel, weights: MasterWeights, pairs: Sequence[EncodedPair], parts: int) -> tuple[torch.Tensor, int]:
    """One step's forward and backward over `pairs` in `parts` micro-batches whose gradients add up to the whole
    batch's (each part's NLL summed over the whole batch's target tokens), up to float rounding and, in a model
    with dropout, its masks: the step's mean loss, detached, and its target tokens. With `parts` 1, the plain step."""
    parts = min(parts, len(pairs))
    bounds = [i * len(pairs) // parts for i in range(parts + 1)]  # `parts` of them, sizes one apart
    batches = [lm.collate(pairs[start:stop]) for start, stop in zip(bounds, bounds[1:])]
    tokens = sum(batch.target_tokens for batch in batches)
    loss: torch.Tensor | None = None
    # the parts summed in the fp32 masters as each gradient is computed, not in a half-precision parameter's own
    with weights.gathering() if parts > 1 else contextlib.nullcontext():
        for batch in batches:
            part = lm.token_nll(batch, lm.scored_logits(batch)).sum() / max(tokens, 1)
            weights.backward(part)
            loss = part.detach() if loss is None else loss + part.detach()
    assert loss is not None  # `pairs` is a step's: never empty
    return loss, tokens


class MasterWeights:
    """fp32 copies of half-precision parameters, for the optimizer to update (mixed precision,
    Micikevicius et al. 2018). An AdamW step on bf16 weights themselves is lost to rounding: near
    1.0 (norm weights) bf16's spacing is 2^-7, so steps of lr 1e-3 leave them unchanged. fp16
    gradients also get a dynamic loss scale, so that small ones do not underflow to zero; so do
    fp32 parameters trained through an fp16 model (LoRA adapters, steering vectors), whose gradients
    flow back through its fp16 activations. fp32 parameters are their own masters. The cost: an fp32
    copy and fp32 optimizer state for half-precision parameters (full fine-tuning in bf16 holds
    about twice the memory of the weights it would in fp32-free training).
    """

    GROWTH_INTERVAL = 2000  # overflow-free steps before the fp16 loss scale doubles

    def __init__(self, params: Sequence[torch.nn.Parameter], *, fp16_model: bool) -> None:
        self.params = list(params)
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_() for p in self.params]
        self.scale = 2.0**16 if fp16_model or any(p.dtype == torch.float16 for p in self.params) else 1.0
        self._good_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scale if self.scale != 1.0 else loss).backward()

    @contextlib.contextmanager
    def gathering(self) -> Iterator[None]:
        """Each half-precision parameter's gradient added into its fp32 master's as soon as a backward has it,
        and let go of: a step run in micro-batches sums its parts in fp32 (in bf16, 32 parts put a gradient
        0.71 % off fp32's, against 0.47 % for the whole batch at once: helper-152). The price: the fp32 sums
        (2 bytes a parameter more than a bf16 sum) are held through the later parts' forwards; gathered part by
        part instead, a part's bf16 gradients would sit beside them too."""
        hooks = [param.register_post_accumulate_grad_hook(functools.partial(_move_gradient, master=master))
                 for param, master in zip(self.params, self.masters) if master is not param]  # fmt: skip
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def gradients_to_masters(self) -> bool:
        """Move the (unscaled) gradients to the masters; False when they overflowed (skip the step)."""
        for param, master in zip(self.params, self.masters):
            if master is not param and param.grad is not None:  # a step in one part: its gradients are still the params'
                _move_gradient(param, master)
        if self.scale == 1.0:
            return True
        for master in self.masters:
            if master.grad is not None:
                master.grad.div_(self.scale)
        finite = all(bool(torch.isfinite(m.grad).all()) for m in self.masters if m.grad is not None)
        self._good_steps = self._good_steps + 1 if finite else 0
        if not finite:
            self.scale /= 2
        elif self._good_steps % self.GROWTH_INTERVAL == 0:
            self.scale *= 2
        return finite

    @torch.no_grad()
    def masters_to_params(self) -> None:
        for param, master in zip(self.params, self.masters):
            if master is not param:
                param.copy_(master)


def _move_gradient(param: torch.nn.Parameter, master: torch.Tensor) -> None:
    """A half-precision parameter's gradient, added into its fp32 master's (or made it), and let go of."""
    master.grad = param.grad.float() if master.grad is None else master.grad.add_(param.grad)
    param.grad = None


def train(
    lm: LanguageModel,
    params: Sequence[torch.nn.Parameter],
    examples: Sequence[Example],
    config: TrainConfig,
    seed: int,
    validate: Validator | None = None,
) -> TrainResult:
    """Minimise the continuation NLL of `examples` over `params`; raise on a non-finite loss.

    With `validate` and `config.checkpoints`, the parameters left in place are those of the best
    validation checkpoint (step 0 included); otherwise those of the last step. With
    `config.lr_search`, each learning rate trains from the same start on the same batches and the
    best checkpoint over all of them is kept; the sequence and validation tokens (the cost) are
    every run's, the rest (losses, training tokens read, scores) the kept run's. A rate whose loss
    goes non-finite drops out of the search (recorded, its tokens billed); only all of them failing
    fails the training.
    """
    rates = config.learning_rates
    if len(rates) == 1 or not examples:
        return _train_at(lm, params, examples, config, config.lr, seed, validate)
    if validate is None:
        raise ValueError("train.lr_search chooses on the shared validation set, and there is none (eval.validation_size = 0)")
    # The start and the best run so far are kept in host memory: a full fine-tune's search would
    # otherwise hold two more copies of the model on its GPU.
    start = [p.detach().to("cpu", copy=True) for p in params]
    results: dict[float, TrainResult] = {}
    diverged: dict[float, NonFiniteLossError] = {}
    best: tuple[float, float, list[torch.Tensor]] | None = None  # (validation score, lr, its parameters)
    start_score: float | None = None  # every rate starts from the same parameters: step 0 is validated once
    random_start = RandomState.now()  # and with the same random stream (dropout masks)
    for lr in rates:
        with torch.no_grad():
            for param, first in zip(params, start):
                param.copy_(first)
        random_start.restore()
        try:
            result = results[lr] = _train_at(lm, params, examples, config, lr, seed, validate, start_score)
        except NonFiniteLossError as err:  # a rate too high for this model: the search goes on without it
            # its message and bill only: the error's traceback holds the failed run's frames (its optimiser's state,
            # two copies of the trained weights), in a cycle through this frame that only the garbage collector breaks
            diverged[lr] = NonFiniteLossError(str(err), err.spent)
            continue
        start_score = (result.validation_scores or {})[0]  # checkpoints >= 1: TrainConfig checks
        if best is None or result.chosen_score > best[0]:  # strictly better: ties keep the earlier rate, `lr` first
            best = None  # the copy it replaces let go of first
            best = (result.chosen_score, lr, [p.detach().to("cpu", copy=True) for p in params])
    spent = sum([r.passes for r in results.values()] + [err.spent for err in diverged.values()], Passes())
    if best is None:
        reasons = "; ".join(f"lr {lr:g}: {err}" for lr, err in diverged.items())
        raise NonFiniteLossError(f"every learning rate of train.lr_search diverged ({reasons})", spent)
    with torch.no_grad():
        for param, value in zip(params, best[2]):
            param.copy_(value)
    return dataclasses.replace(
        results[best[1]],
        **dataclasses.asdict(spent),
        lr_scores={lr: r.chosen_score for lr, r in results.items()},
        chosen_lr=best[1],
        lr_diverged={lr: str(err) for lr, err in diverged.items()},
    )


@dataclass(frozen=True)
class RandomState:
    """torch's random generators (the CPU's and each CUDA device's), to replay a stream from a point."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor]

    @classmethod
    def now(cls) -> RandomState:
        return cls(torch.random.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])

    def restore(self) -> None:
        torch.random.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)


def _train_at(
    lm: LanguageModel,
    params: Sequence[torch.nn.Parameter],
    examples: Sequence[Example],
    config: TrainConfig,
    lr: float,
    seed: int,
    validate: Validator | None,
    start_score: float | None = None,
) -> TrainResult:
    """One training run at learning rate `lr` (see `train`); `start_score`, when known, is step 0's
    validation score (the parameters as they are now), which is then not run again."""
    if not examples:
        return TrainResult(losses=[], tokens=0, sequence_tokens=0, chosen_step=0)
    steps = steps_for(len(examples), config)
    # fused: one kernel over all parameters instead of a handful per group of tensors; the small
    # LoRA matrices made the foreach update ~5 % of a step on the ladder's models (benchmarks/CHANGES.md)
    weights = MasterWeights(params, fp16_model=any(p.dtype == torch.float16 for p in lm.model.parameters()))
    optimizer = torch.optim.AdamW(weights.masters, lr=lr, weight_decay=config.weight_decay, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    checks = checkpoint_steps(steps, config.checkpoints) if validate is not None and config.checkpoints else []
    scores: dict[int, float] = {}
    best: tuple[float, int, list[torch.Tensor]] | None = None  # (score, step, parameters)
    validation = sequence = Passes()
    was_training = lm.model.training
    losses: list[float] = []
    tokens = skipped = 0

    def ran_since(before: tuple[int, float, float]) -> tuple[int, float, float]:
        return tuple(now - then for now, then in zip(lm.counters, before))  # type: ignore[return-value]

    def checkpoint(step: int) -> None:
        nonlocal best, validation
        before = lm.counters
        lm.model.eval()
        with torch.no_grad():
            scores[step] = start_score if step == 0 and start_score is not None else validate()
        lm.model.train()
        ran, flops, _ = ran_since(before)
        validation += Passes(validation_tokens=ran, validation_flops=flops)
        if best is None or scores[step] > best[0]:  # strictly better: ties keep the earlier step
            # in host memory (on a GPU, full fine-tuning's copy would be another model's worth beside the optimiser's
            # state), in their own dtype: what is restored; the copy it replaces let go of first
            best = None
            best = (scores[step], step, [p.detach().to("cpu", copy=True) for p in params])

    pairs = lm.encode_pairs([ex.prompt for ex in examples], [ex.target for ex in examples], [ex.ends_text for ex in examples])  # once
    lm.model.train()
    try:
        for step, take in enumerate(batch_order(len(examples), steps, config.batch_size, seed)):
            _drop_gradients(optimizer, params)  # before a checkpoint's validation: the last step's are not kept through it
            if step in checks:
                checkpoint(step)
            step_pairs = [pairs[i] for i in take]
            while True:  # a step that runs out of accelerator memory runs again in twice the micro-batches, as do the rest
                before, random_state = lm.counters, RandomState.now()
                done = unless_out_of_memory(lambda: accumulated_step(lm, weights, step_pairs, lm.train_parts), last=lm.train_parts >= len(take))
                if done is not None:
                    break
                lm.counters = before  # the failed try is not billed,
                random_state.restore()  # nor draws the dropout masks of the steps after
                _drop_gradients(optimizer, params)
                lm.train_parts = min(2 * lm.train_parts, len(take))
                release_memory()
                print(f"steerscale: out of accelerator memory in a training step; {lm.train_parts} micro-batches a step from now on",
                      file=sys.stderr)  # fmt: skip
            loss, step_tokens = done
            ran, flops, head = ran_since(before)  # what ran: a batch's last column (labels only) does not
            sequence += Passes(sequence_tokens=ran, sequence_flops=flops, sequence_head_flops=head)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss became {loss.item()} at step {step}", sequence + validation)
            if weights.gradients_to_masters():  # an fp16 overflow skips the step, and the schedule with it
                optimizer.step()
                weights.masters_to_params()
                schedule.step()
            else:
                skipped += 1
            losses.append(loss.item())
            tokens += step_tokens
        if skipped == steps:  # the model never changed: a row would report an untrained model as trained
            raise NonFiniteLossError(
                f"every one of {steps} steps overflowed in fp16 (loss scale down to {weights.scale:g}); train in bf16 or fp32",
                sequence + validation,
            )
        # A gradient can overflow under a finite loss (no loss scale checks it outside fp16): the update then
        # writes NaN into the weights, which the next step's loss shows, but after the last step nothing
        # would, and a final checkpoint scoring -inf would quietly hand the cell an earlier one.
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise NonFiniteLossError(
                f"a trained parameter became non-finite at step {steps - 1} (its gradient overflowed under a finite loss)",
                sequence + validation,
            )
        chosen = steps
        if checks:
            _drop_gradients(optimizer, params)
            checkpoint(steps)
            assert best is not None
            chosen = best[1]
            with torch.no_grad():
                for param, kept in zip(params, best[2]):
                    param.copy_(kept)
    finally:
        _drop_gradients(optimizer, params)
        lm.model.train(was_training)
    return TrainResult(
        losses=losses,
        tokens=tokens,
        sequence_tokens=sequence.sequence_tokens,
        chosen_step=chosen,
        validation_tokens=validation.validation_tokens,
        sequence_flops=sequence.sequence_flops,
        validation_flops=validation.validation_flops,
        sequence_head_flops=sequence.sequence_head_flops,
        validation_scores=scores or None,
        skipped_steps=skipped,
    )


def _drop_gradients(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]) -> None:
    """No gradient left anywhere: on the masters, and on a half-precision parameter whose gradient a step
    that raised (or ran out of memory) did not move to its master."""
    optimizer.zero_grad(set_to_none=True)
    for param in params:
        param.grad = None
