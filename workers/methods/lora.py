"""`lora`: low-rank adapters trained with PEFT on the budget's examples.

PEFT injects its layers into the model in place, so the adapter is applied by injecting a fresh
LoRA with the trained weights and removed by `unload()`, which puts the original Linear modules
back: outside `applied()` the model is bit-for-bit the base model again. That `unload()` removes every
LoRA layer, so a second injection cannot run inside this one: compositions refuse it (`PeftUse`).
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from pydantic import Field, field_validator
from torch import nn

from workers.config import StrictConfig
from workers.lm import LanguageModel
from workers.registry import did_you_mean
from workers.methods.protocol import FitContext, FitReport, MethodKind, PeftUse, forward_flops
from workers.training import TrainConfig, train

if TYPE_CHECKING:
    from peft import PeftModel


ALL_LINEAR = "all-linear"


class LoraConfig(StrictConfig):
    rank: int = Field(4, ge=1)
    alpha: float = Field(8.0, gt=0, description="LoRA scaling numerator: the update is (alpha / rank) · B A")
    target_modules: str | tuple[str, ...] = Field(
        ALL_LINEAR,
        description="module names to adapt (a list: each takes every module of that name), a regular expression whole module names must match, or 'all-linear' (every Linear/Conv1D but the output head: any architecture)",
    )
    train: TrainConfig = TrainConfig()

    @field_validator("target_modules")
    @classmethod
    def _a_string_is_a_pattern(cls, target: str | tuple[str, ...]) -> str | tuple[str, ...]:
        if not target:
            raise ValueError(f"no module to adapt: give module names, a regular expression, or '{ALL_LINEAR}'")
        if is_all_linear(target):
            return ALL_LINEAR  # one spelling, one cell id
        if not isinstance(target, str):
            # a name listed twice takes the same modules; the order is kept, though PEFT's does not matter: sorting would
            # give every stored cell of an unsorted list (q, k, v, o) a new id, and its rerun costs more than it saves
            return tuple(dict.fromkeys(target))
        try:
            re.compile(target)
        except re.error as err:
            raise ValueError(f"a single string is a regular expression of module names (PEFT's rule), and {target!r} is not one: {err}") from None
        return target


def is_all_linear(target: str | tuple[str, ...]) -> bool:
    """PEFT's shorthand for every linear layer but the output head, which it takes in any case."""
    return isinstance(target, str) and target.lower() == ALL_LINEAR


def _targets(name: str, target: str | tuple[str, ...]) -> bool:
    """PEFT's rule for whether `target_modules` takes the module called `name` (`check_target_module_exists`):
    a string other than 'all-linear' is a regular expression the whole name must match; a list entry
    takes the module of that name, at any depth. Restated here because planning checks targets
    without importing peft (seconds); tests/test_methods.py holds it to PEFT's own function."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return name in target or any(name.endswith(f".{entry}") for entry in target)


def target_problem(config: LoraConfig, model: nn.Module) -> str | None:
    """What in `target_modules` names no module of `model`, or None. PEFT refuses targets of which none
    matches, but adapts the rest of a list where one entry is mistyped: a run that adapts fewer
    modules than its config (and its rows) say, so every target must take some module."""
    target = config.target_modules
    if is_all_linear(target):
        return None
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(target, str):
        missing = [] if any(_targets(name, target) for name in names) else [target]
    else:
        missing = [entry for entry in dict.fromkeys(target) if not any(_targets(name, (entry,)) for name in names)]
    if not missing:
        return None
    # what a target would usually name: the layers holding a weight matrix (Linear, GPT-2's Conv1D, embeddings)
    leaves = {name.rpartition(".")[2] for name, module in model.named_modules() if getattr(module, "weight", None) is not None and module.weight.dim() == 2}
    hints = []
    for entry in missing:
        hint = f"'{entry}' matches no module of {type(model).__name__}"
        if isinstance(target, str) and any(_targets(name, (entry,)) for name in names):
            hint += f": a single string is a regular expression the whole module name must match (PEFT's rule); write [{entry}] for every module of that name"
        else:
            hint += did_you_mean(entry, leaves)
        hints.append(hint)
    return f"lora target_modules: {'; '.join(hints)}. Its weight matrices are named {', '.join(sorted(leaves))}; or use '{ALL_LINEAR}'"


@contextmanager
def lora_injected(lm: LanguageModel, config: LoraConfig, state: dict[str, torch.Tensor] | None) -> Iterator[PeftModel]:
    """LoRA layers in `lm.model` (fresh, or loaded from `state`) for the duration; base restored after."""
    import peft  # here, not at the top: planning imports this module, and peft takes seconds (workers/__init__.py)

    problem = target_problem(config, lm.model)
    if problem is not None:
        raise ValueError(problem)
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    from workers.methods.lora_layer import FusedLoraLinear  # imports peft

    peft_config = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets, lora_dropout=0.0)
    peft_config._register_custom_module({nn.Linear: FusedLoraLinear})  # PEFT's (experimental) hook for its own layer classes
    requires_grad = {name: p.requires_grad for name, p in lm.model.named_parameters()}
    base_params = sum(p.numel() for p in lm.model.parameters())
    with warnings.catch_warnings():
        # PEFT (<= 0.21) reads transformers' deprecated `is_gradient_checkpointing` on every wrap; the
        # FutureWarning is about PEFT's code, not the user's, and would print once per LoRA cell
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = peft.get_peft_model(lm.model, peft_config)
    try:
        if state is not None:
            peft.set_peft_model_state_dict(peft_model, state)
        with lm.running_added(sum(p.numel() for p in lm.model.parameters()) - base_params):  # injected in place
            yield peft_model
    finally:
        peft_model.unload()
        for name, param in lm.model.named_parameters():
            param.requires_grad_(requires_grad[name])


def linear_params_without_input_grad(model: nn.Module) -> int:
    """Parameters of the linear layers whose input needs no gradient while the adapters train: every source of it is
    frozen (the first adapted block's projections read the frozen embeddings), so backward runs no activation gradient
    through them, where 2·F bills one through every layer (10-20 % of a ladder rung's backward, helper-120). Found by
    a one-token probe forward, not billed, with the random state kept (a dropout would otherwise draw from it)."""
    without: dict[int, int] = {}

    def note(module: nn.Module, args: tuple) -> None:
        if not args[0].requires_grad:
            without[id(module)] = module.weight.numel()

    from transformers.pytorch_utils import Conv1D  # GPT-2's projections: linear layers by another name

    device = next(model.parameters()).device
    hooks = [m.register_forward_pre_hook(note) for m in model.modules() if isinstance(m, (nn.Linear, Conv1D))]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return sum(without.values())


@dataclass
class LoraAdapter:
    lm: LanguageModel
    config: LoraConfig
    state: dict[str, torch.Tensor]
    report: FitReport

    @contextmanager
    def applied(self) -> Iterator[None]:
        with lora_injected(self.lm, self.config, self.state):
            yield


class Lora:
    name = "lora"
    kind: MethodKind = "finetuning"
    config_class = LoraConfig

    def peft_use(self, config: LoraConfig) -> PeftUse:
        return PeftUse(fitting=True, applied=True)

    def model_problem(self, config: LoraConfig, architecture: Callable[[], nn.Module]) -> str | None:
        return None if is_all_linear(config.target_modules) else target_problem(config, architecture())

    def fit(self, ctx: FitContext, config: LoraConfig) -> LoraAdapter:
        torch.manual_seed(ctx.seed)  # LoRA's A matrices are initialised randomly
        from peft import get_peft_model_state_dict  # imported late, as in lora_injected

        with lora_injected(ctx.lm, config, None) as peft_model:
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            n_lora = sum(p.numel() for p in trainable)
            no_input_grad = linear_params_without_input_grad(ctx.lm.model)
            result = train(ctx.lm, trainable, ctx.train, config.train, ctx.seed, ctx.validator())
            state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        t = result.sequence_tokens
        report = FitReport(
            trainable_params=n_lora,
            train_tokens=result.tokens,
            # 2·F + 2·P·T for training, F counting the adapters (see protocol.py), less the activation gradients no layer
            # needs (`linear_params_without_input_grad`), plus the validations' F
            post_train_flops=2 * result.sequence_flops - forward_flops(no_input_grad, t) + forward_flops(n_lora, t) + result.validation_flops,
            selection=ctx.selection if result.validation_scores else "fixed",
            val_labels=len(ctx.validation) if result.validation_scores else 0,
            hparams={
                **config.model_dump(mode="json"),
                **result.summary(),
            },
        )
        return LoraAdapter(ctx.lm, config, state, report)
