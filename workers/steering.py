"""Adding vectors to the residual stream of any decoder-only Hugging Face model.

Hooks return a new tensor instead of editing the layer's output in place, so gradients flow
through a steered model (needed to train a steering vector, or LoRA under a fixed vector), and
they handle layers that return a bare tensor (Llama in transformers >= 4.57) as well as a tuple.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import nn

# Where each architecture keeps its decoder blocks. Written as an explicit table rather than a
# search over named_modules so an unsupported model fails loudly instead of hooking the wrong list.
_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma 2/3, Phi-3
    "model.language_model.layers",  # Gemma 3 multimodal wrappers
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "transformer.h",  # GPT-2, GPT-J
    "model.decoder.layers",  # OPT
)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (through a PEFT wrapper if there is one)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    for path in _LAYER_PATHS:
        module: object = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}; known layouts: {', '.join(_LAYER_PATHS)}")


def _add(output: torch.Tensor | tuple, vector: torch.Tensor) -> torch.Tensor | tuple:
    hidden = output[0] if isinstance(output, tuple) else output
    steered = hidden + vector.to(dtype=hidden.dtype, device=hidden.device)
    return (steered, *output[1:]) if isinstance(output, tuple) else steered


@contextmanager
def steer(model: nn.Module, vectors: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Add `vectors[layer]` to the output of each given decoder layer at every position."""
    layers = decoder_layers(model)
    handles = []
    try:
        for index, vector in vectors.items():
            handles.append(layers[index].register_forward_hook(lambda _m, _i, out, v=vector: _add(out, v)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def last_token_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Residual stream after every decoder layer at each row's last real token: (layers, batch, d)."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, output_hidden_states=True)
    last = attention_mask.sum(-1) - 1
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return torch.stack([h[rows, last] for h in out.hidden_states[1:]]).float()
