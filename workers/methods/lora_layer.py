"""PEFT's LoRA linear layer with its update added in one matmul: `lora_injected` asks PEFT for it.

PEFT computes `result + lora_B(lora_A(x)) * scaling`: a multiply and an add over the layer's whole
output (tokens × d_out), forward and backward, for an update of rank r. The same numbers come from
scaling the rank-r activations instead and letting B's matmul add into the result (`addmm`, one BLAS
call): `result + (lora_A(x) · scaling) Bᵀ`. On the ladder's xl rung that cut a LoRA training step by
7–12 % (benchmarks/CHANGES.md, session 31); with the ladder's scaling of 2 (a power of two) the
losses are bit-equal. Everything else — parameters, initialisation, state dicts, `unload()` — is
PEFT's, and any call this path was not written for (merged or disabled adapters, several adapters,
dropout, DoRA or another variant, a LoRA bias, mixed dtypes, extra arguments) runs PEFT's forward.
So does a half-precision model: PEFT keeps its adapters in fp32 there (`autocast_adapter_dtype`).
PEFT's dispatch asks for it on every `nn.Linear`, subclasses too: a quantized linear (bitsandbytes,
torchao) would get this class instead of PEFT's quantized LoRA layer; steerscale loads none.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear
from torch import nn


class FusedLoraLinear(Linear):
    """`peft.tuners.lora.layer.Linear` whose single plain adapter is added by an `addmm`."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = None if args or kwargs else self._plain_adapter(x.dtype)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        low = self.lora_A[adapter](x) * self.scaling[adapter]
        fused = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]), self.lora_B[adapter].weight.t())
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
