"""PEFT's LoRA linear layer with its update added in one matmul and a backward of its own:
`lora_injected` asks PEFT for it.

PEFT computes `result + lora_B(lora_A(x)) * scaling`: a multiply and an add over the layer's whole
output (tokens × d_out), forward and backward, for an update of rank r. The same numbers come from
scaling the rank-r activations instead and letting B's matmul add into the result (`addmm`, one BLAS
call): `result + (lora_A(x) · scaling) Bᵀ`. On the ladder's xl rung that cut a LoRA training step by
7–12 % (benchmarks/CHANGES.md, session 31); with the ladder's scaling of 2 (a power of two) the
losses were bit-equal (they are not where the update is merged into the weight, below). Where the
base layer is a frozen plain `nn.Linear` with no hooks and no autocast is on, the whole layer runs
as one autograd function (`_LoraLinear`) whose backward takes the rank-r products in BLAS's fast
orientation and sums the input's two gradients in one call: another 12–14 % of the step
(benchmarks/CHANGES.md, session 43), and a batch with as many rows as the weight is wide and high
merges the update into the weight (3 %, session 45); otherwise (a hooked or trained base layer: a
probe, accelerate's offloading, a composition with full_ft) the base layer is called and autograd
runs the backward. Everything else — parameters, initialisation, state dicts,
`unload()` — is PEFT's, and any call this path was not written for (merged or disabled adapters,
several adapters, dropout, DoRA or another variant, a LoRA bias, mixed dtypes, extra arguments)
runs PEFT's forward. So does a half-precision model: PEFT keeps its adapters in fp32 there
(`autocast_adapter_dtype`). PEFT's dispatch asks for this class on every `nn.Linear`, subclasses
too: a quantized linear (bitsandbytes, torchao) would get this class instead of PEFT's quantized
LoRA layer; steerscale loads none.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear
from torch import nn
from torch.autograd.function import once_differentiable


class FusedLoraLinear(Linear):
    """`peft.tuners.lora.layer.Linear` whose single plain adapter is added by an `addmm`."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = None if args or kwargs else self._plain_adapter(x.dtype)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base, lora_a, lora_b = self.get_base_layer(), self.lora_A[adapter], self.lora_B[adapter]
        if _stands_in_for(base, lora_a, x):
            rows = _LoraLinear.apply(
                x.reshape(-1, x.shape[-1]), base.weight, base.bias, lora_a.weight, lora_b.weight, self.scaling[adapter], torch.is_grad_enabled()
            )
            return rows.view(*x.shape[:-1], rows.shape[-1])
        result = base(x)  # its hooks run, its weights train (a composition with full_ft): autograd's backward
        low = lora_a(x) * self.scaling[adapter]
        fused = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]), lora_b.weight.t())
        return fused.view(result.shape)

    def _plain_adapter(self, dtype: torch.dtype) -> str | None:
        """The one active adapter, if it is plain LoRA in `dtype` throughout; None for anything else."""
        if self.disable_adapters or self.merged:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        variant = name in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(name, False)  # PEFT >= 0.15 / before
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        plain = not variant and isinstance(self.lora_dropout[name], nn.Identity) and lora_b.bias is None
        same_dtype = lora_a.weight.dtype == lora_b.weight.dtype == self.get_base_layer().weight.dtype == dtype
        return name if plain and same_dtype else None


def _stands_in_for(base: nn.Module, lora_a: nn.Module, x: torch.Tensor) -> bool:
    """Whether `_LoraLinear` may replace calling `base` and `lora_A` as modules: `base` is an `nn.Linear` itself, not
    a subclass, with nothing in it trained; neither has module hooks of its own (accelerate's placement and offloading
    hooks, a probe's, a user's); and no autocast is on (the hand-written backward would meet its mixed dtypes). Hooks
    registered on every module at once (`register_module_forward_hook`) do not see the calls it replaces; `lora_B`
    was never called as a module (its weight goes into the `addmm`)."""
    hooked = any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks or hasattr(m, "_hf_hook")
                 for m in (base, lora_a))  # fmt: skip
    trained = any(p.requires_grad for p in base.parameters())
    return type(base) is nn.Linear and not hooked and not trained and not torch.is_autocast_enabled(x.device.type)


def merges(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `_LoraLinear` merges the update into the weight for these rows: at least as many as the weight
    is wide and high (from there the merged weight is the smaller sum both ways), in full precision: fp64, or
    fp32 with matmuls in full fp32 (TF32's 10-bit mantissa, like half precision, would round a small update
    away). It runs fewer FLOPs than the update added to the output; rows bill the latter (PEFT's computation,
    2·r·(d_in + d_out) a row forward): what a cell costs does not depend on its batch's shape or on this choice."""
    full = weight.dtype == torch.float64 or (weight.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest")
    return x.shape[0] >= max(weight.shape) and full


class _LoraLinear(torch.autograd.Function):
    """A frozen linear layer plus its LoRA update on 2-D rows, `x Wᵀ + b + scaling · (x Aᵀ) Bᵀ`,
    with a backward written out by hand.

    Autograd's own backward of the same forward computes the rank-r products as `g B` (rows × d_out
    @ d_out × r) and `gᵀ low`: BLAS runs a product with an output r columns wide 4–5× slower than its
    transpose, one r rows high (72 µs against 16 µs at 602 × 112, rank 4, on one core). Here each is
    taken as the transpose of the fast one, `(Bᵀ gᵀ)ᵀ`, and the scaling multiplies rank-r activations
    only. Where there are at least as many rows as the weight is wide and high (a training batch on a
    narrow model), the update is merged into the weight, `x (W + scaling · B A)ᵀ`, forward and backward:
    a d_out × d_in sum replaces a rows × d_out one in the forward and a rows × d_in one in the backward
    (−3 % of a LoRA step on the ladder's xl rung, benchmarks/CHANGES.md, session 45). Otherwise the
    update is added to the output and the input's two gradients summed inside one `addmm`. The merge is
    done in full precision only (`merges`). Without a graph (`graph` False: validation, scoring) the
    merged path skips the rank-r activations, which only B's gradient reads. The values are the same
    sums in another order (the parity test in tests/test_methods.py holds them to autograd's on the
    plain formula).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
        graph: bool,
    ) -> torch.Tensor:
        _, _, _, need_a, need_b, _, _ = ctx.needs_input_grad
        need_a, need_b = need_a and graph, need_b and graph  # apply() under no_grad still says the adapters need them
        ctx.merged = merges(x, weight)
        # the rank-r activations: the output's (unmerged) and B's gradient's
        low = torch.mm(x, a.t()) * scaling if need_b or not ctx.merged else None
        # only what the gradients asked for is kept: frozen adapters (a steering vector trained through them) keep no x or low
        ctx.save_for_backward(x if need_a else None, weight, a, b, low if need_b else None)
        ctx.scaling = scaling
        if ctx.merged:
            return F.linear(x, torch.addmm(weight, b, a, alpha=scaling), bias)
        return torch.addmm(F.linear(x, weight, bias), low, b.t())

    @staticmethod
    @once_differentiable  # a second derivative through this backward is refused, not silently wrong
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, a, b, low = ctx.saved_tensors
        need_x, _, _, need_a, need_b, _, _ = ctx.needs_input_grad
        grad_b = torch.mm(low.t(), grad).t() if need_b else None  # (lowᵀ g)ᵀ = gᵀ low
        through_low = need_a or (need_x and not ctx.merged)
        grad_low_t = torch.mm(b.t(), grad.t()) * ctx.scaling if through_low else None  # r × rows: (g B)ᵀ, scaled as low was
        grad_a = torch.mm(grad_low_t, x) if need_a else None
        if not need_x:
            grad_x = None
        elif ctx.merged:  # the merged weight again (recomputed: d_out × d_in, where keeping it would double the layer's)
            grad_x = torch.mm(grad, torch.addmm(weight, b, a, alpha=ctx.scaling))
        else:
            grad_x = torch.addmm(torch.mm(grad_low_t.t(), a), grad, weight)  # not addmm_: FLOP counters skip in-place ops
        return grad_x, None, None, grad_a, grad_b, None, None
