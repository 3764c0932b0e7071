"""The post-training method protocol: fit on a budget of examples, return an adapter to apply.

A method never leaves the model changed: `fit` may train in place but restores the model before
it returns, and the adapter re-applies the result only inside `adapter.applied()`, a context
manager that undoes itself in `finally`. That is what lets one loaded base model serve many cells,
lets compositions stack (`with a.applied(): with b.applied(): ...`), and makes full fine-tuning
just another method rather than a special case in the driver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Generic, Literal, Protocol, TypeVar, get_args

from torch import nn

from workers.config import StrictConfig
from workers.lm import LanguageModel, body_and_head_params
from workers.tasks.base import Example, Task, target_nll
from workers.training import training_configs

ConfigT = TypeVar("ConfigT", bound=StrictConfig)
ConfigT_contra = TypeVar("ConfigT_contra", bound=StrictConfig, contravariant=True)


@dataclass
class FitContext:
    """What a method may use: the model, the task, its budget, and the shared validation set.

    `validation` is one fixed, recorded set shared by every method of the sweep (the fair-selection
    protocol "shared_validation"): hyper-parameters chosen on it do not count against the budget,
    and every method may choose "do nothing" (scale 0, no steps) on it.
    """

    lm: LanguageModel
    task: Task
    train: list[Example]
    validation: list[Example]
    seed: int
    selection_metric: Literal["nll", "score"] = "nll"  # the sweep's eval.selection_metric
    # Examples like the off-task evaluation's (its tasks' training questions, as many), which the adapted
    # model is shown after the fit: a method that takes context (`prompt`) leaves room for their kind.
    # Not for training or choosing.
    offtask: list[Example] = field(default_factory=list)

    def validator(self) -> Callable[[], float] | None:
        """The model as it is now on the shared validation set, higher is better (−NLL, or the task
        score, per `selection_metric`): what every method's choices maximise. None when there is no set."""
        if not self.validation:
            return None

        def value() -> float:
            # Outputs gone NaN make the worst candidate (a NaN would never lose a comparison it came
            # first in; with NaN log-probs a score is that of always choice 0).
            if self.selection_metric == "nll":  # the NLL alone: choice scoring or generation would be work (and FLOPs) unread
                nll = target_nll(self.lm, self.validation)
                return -nll if math.isfinite(nll) else -math.inf
            result = self.task.evaluate(self.lm, self.validation)
            return result.score if math.isfinite(result.nll) else -math.inf

        return value

    @property
    def selection(self) -> str:
        """The rows' `selection` label for a choice made by `validator`."""
        return "shared_validation_nll" if self.selection_metric == "nll" else "shared_validation"


@dataclass
class FitReport:
    """What the fit did and chose, in the units of the results schema."""

    trainable_params: int = 0
    train_tokens: int = 0  # what the method read of the budget, its own way (README: results schema)
    post_train_flops: float = 0.0
    layer: int | None = None
    alpha: float | None = None
    selection: str = "none"  # how hyper-parameters were chosen
    val_labels: int = 0  # validation labels that choice used
    hparams: dict[str, Any] = field(default_factory=dict)


class Adapter(Protocol):
    report: FitReport

    def applied(self) -> ContextManager[None]:
        """Apply the post-training to the model it was fitted on; undo it on exit, even on error."""
        ...


# Which side of the study a method is on. The analysis (which never imports workers) derives it
# from the method's name by `analysis.methods.method_kind`; each method declares it here too, and a
# test holds the two equal, so a new steering method must be named so the analysis sees it as one.
MethodKind = Literal["reference", "steering", "finetuning", "composition"]


class Method(Protocol, Generic[ConfigT_contra]):
    name: str
    kind: MethodKind
    config_class: type[StrictConfig]

    def fit(self, ctx: FitContext, config: ConfigT_contra) -> Adapter: ...

    # Optional: `version`, an int (1 where absent) raised when a change moves what the method computes, as a
    # task's data_version: part of its cells' ids from 2 on, so a resumed sweep reruns them (a composition's
    # cells carry each part's);
    # `reads_examples`, False for a method whose fit reads none of the budget's examples (`base`): a sweep plans
    # it at budget 0 alone unless its method_budgets say otherwise;
    # `peft_use(config) -> PeftUse`, for a method that puts PEFT layers into the model;
    # `validation_choice(config) -> str | None`, for one that must choose on the shared validation set;
    # `model_problem(config, architecture) -> str | None`, for one whose config names parts of the model;
    # `batch_note`, what `eval.batch_size` counts in the method's own passes where not texts (a row that ran out of
    # memory says so beside the batch it was halved to).


def registration_problems(name: str, method: object) -> list[str]:
    """What keeps `method` from being registered under `name`: the rules of `Method` that nothing else checks, a
    method breaking them would run and store wrong rows (a plain pydantic config drops a mistyped key in silence)."""
    problems = [f"it has no {member}" for member in ("name", "kind", "config_class", "fit") if not hasattr(method, member)]
    if problems:
        return problems
    config_class, kinds = getattr(method, "config_class"), [kind for kind in get_args(MethodKind) if kind != "composition"]  # `A+B`'s alone
    if getattr(method, "name") != name:
        problems.append(f"its name is {getattr(method, 'name')!r}")
    if "+" in name:
        problems.append("'+' joins a composition's parts (A+B), so no method's own name may hold it")
    if getattr(method, "kind") not in kinds:
        problems.append(f"its kind {getattr(method, 'kind')!r} is none of {', '.join(kinds)}")
    if not (isinstance(config_class, type) and issubclass(config_class, StrictConfig)):
        problems.append(f"its config_class {config_class!r} is no workers.config.StrictConfig: a key mistyped in a sweep would be "
                        "dropped in silence, and its cells run with the default")  # fmt: skip
    return problems


@dataclass(frozen=True)
class PeftUse:
    """When a method has PEFT (LoRA) layers in the model. PEFT injects them in place under one adapter
    name and its `unload()` removes every LoRA layer, so one injection cannot run inside another:
    compositions refuse that pairing (see compose.py)."""

    fitting: bool = False  # during `fit`
    applied: bool = False  # inside `adapter.applied()`


def peft_use(method: Method, config: StrictConfig) -> PeftUse:
    """`method`'s PeftUse under `config`; none for a method that does not declare one."""
    declared: Callable[[StrictConfig], PeftUse] | None = getattr(method, "peft_use", None)
    return declared(config) if declared is not None else PeftUse()


def validation_choice(method: Method, config: StrictConfig) -> str | None:
    """What `method` under `config` must choose on the shared validation set ("a scale among [0, 1]"),
    whatever the model; None when it needs none. Planning refuses such a config without a validation set,
    which would otherwise fail every one of its cells."""
    choices = [declared_validation_choice(method, config), learning_rate_choice(config)]
    return "; ".join(choice for choice in choices if choice) or None


def declared_validation_choice(method: Method, config: StrictConfig) -> str | None:
    """The choice `method` itself declares (its `validation_choice`), without its configs' learning rates."""
    declared: Callable[[StrictConfig], str | None] | None = getattr(method, "validation_choice", None)
    return declared(config) if declared is not None else None


def learning_rate_choice(config: StrictConfig) -> str | None:
    """The learning rates a `train.lr_search` anywhere in `config` chooses among (on validation
    checkpoints), whichever method nests the TrainConfig; None when every training has one rate."""
    searches = [f"{path.lstrip('.')}.lr_search chooses a learning rate among {list(train.learning_rates)}"
                for path, train in training_configs(config) if len(train.learning_rates) > 1]  # fmt: skip
    return "; ".join(searches) or None


def model_problem(method: Method, config: StrictConfig, architecture: Callable[[], nn.Module]) -> str | None:
    """Why `method` under `config` cannot run as configured on a model (e.g. a module name it targets that
    the architecture lacks), or None. `architecture()` builds the model on the meta device from its
    config; a method calls it only when its config names parts of the model, so planning pays for
    transformers' model code only then."""
    declared: Callable[[StrictConfig, Callable[[], nn.Module]], str | None] | None = getattr(method, "model_problem", None)
    return declared(config, architecture) if declared is not None else None


# Analytic post-training cost. A forward pass costs F = 2·N_body·T + 2·N_head·H (`LanguageModel.flops_run`):
# T tokens through the blocks, and the output head (N_head of N = `matmul_params(model)`) at the H positions it
# ran at — the scored ones, where the model takes `logits_to_keep`; every position (padding included) where it does not —
# less the last block's MLP at the tokens no logit is read at, where it does not run (`workers/last_block.py`).
# N_body includes adapters a method has put into the blocks while they are in (LoRA's P: `LanguageModel.running_added`).
#   forward (inference, validation passes)   F
#   full fine-tuning                         3·F  (forward 1 + backward 2: activation and weight grads)
#   LoRA with P adapter parameters           2·F + 2·P·T  (F with the adapters in; the frozen base needs activation
#                                                           grads (F, less 2·N'·T for the N' linear parameters whose input
#                                                           needs none: `lora.linear_params_without_input_grad`) but no
#                                                           weight grads; the adapters' weight grads 2·P·T,
#                                                           billed at every token, though those in the last block's MLP run
#                                                           at the scored ones alone: < 0.5 % of a ladder xl step too much)
#   trained steering vectors                 F + (F − 2·N_before·T)  (activation grads through the blocks after
#                                                           the earliest steered layer and the head; none through
#                                                           the N_before parameters up to it; the vector's own
#                                                           gradient is an O(d·T) sum; steering the last block, the
#                                                           head's part of F alone: that block's MLP ran at the scored
#                                                           positions only)
#   steering extraction                      exact: the blocks up to the deepest read (`last_token_flops`)
# Attention's sequence-length term (2·n_layer·ctx·d per token) is left out, as in Kaplan et al.


def forward_flops(params: int, tokens: int) -> float:
    """Forward pass cost ≈ 2 · N · tokens (one multiply-add per parameter per token)."""
    return 2.0 * params * tokens


def matmul_params(model: nn.Module) -> int:
    """N for the FLOP formulas: every parameter a token multiplies through (`body_and_head_params`: embedding
    lookups left out, an output head tied to the input embedding counted)."""
    return sum(body_and_head_params(model))