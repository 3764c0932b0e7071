"""The last decoder block's MLP run at the positions whose logits are used, not at every position.

A training step or a scoring pass reads the logits at a few positions a row (the answer's tokens:
64 of 579 on a step of the ladder's arith); the head already runs there alone (`logits_to_keep`).
The last block's MLP is position-wise and feeds only the block's output at its own position, which
only the final norm and the head read, so it too needs to run at those positions alone: the larger
half of the last block (113k of the xl rung's 163k parameters in a block) at a tenth of the tokens.
Its input is gathered at those positions before it runs and its output scattered back into zeros
after, so the block's residual add stays the model's own; the block's output at the other positions
then lacks the MLP's part, and nothing reads it. Same numbers up to float rounding (a matmul over
fewer rows may add in another order).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from workers.steering import position_wise_mlp

# a mixture of experts returns its router's logits beside its output, one per token it ran at
_ROUTED_MLP_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe"})


def read_positions_mlp(model: nn.Module) -> nn.Module | None:
    """The last block's MLP where it can run at the read positions alone; None where it runs whole.
    Whole too while it trains with a dropout inside (GPT-2's): the dropout would draw its mask over
    other positions, and every later draw of the random stream would move."""
    if getattr(getattr(model, "config", None), "model_type", None) in _ROUTED_MLP_TYPES:
        return None
    mlp = position_wise_mlp(model, -1)
    if mlp is not None and mlp.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in mlp.modules()):
        return None
    return mlp


@contextmanager
def mlp_at(mlp: nn.Module, read: torch.Tensor) -> Iterator[None]:
    """While open, `mlp` (a last block's) runs at the True entries of `read` (rows, columns) alone; its
    output elsewhere is zero."""
    shapes: list[torch.Size] = []

    def gather(_m: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        shapes.append(hidden.shape)
        return (hidden[read.to(hidden.device)].unsqueeze(0), *args[1:])

    def scatter(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        where = read.to(out.device).unsqueeze(-1)
        return out.new_zeros(shapes.pop()).masked_scatter(where, out[0])

    handles = [mlp.register_forward_pre_hook(gather), mlp.register_forward_hook(scatter)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
