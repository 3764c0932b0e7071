"""Adding vectors to the residual stream of any decoder-only Hugging Face model.

Hooks return a new tensor instead of editing the layer's output in place, so gradients flow
through a steered model (needed to train a steering vector, or LoRA under a fixed vector), and
they handle layers that return a bare tensor (Llama in transformers >= 4.57) as well as a tuple.

Steering "after the prompt" needs to know, for every forward, which absolute token columns the
current chunk covers (with a KV cache, generation feeds one new column at a time) and where each
row's prompt ends. The first comes from a pre-hook on the model's own forward (cache position or
attention-mask width); the second is declared by the caller with `prompt_boundary` — the
`LanguageModel` wrapper does that for every forward and generation it runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Literal, Mapping

import torch
from torch import nn

Positions = Literal["all", "after_prompt"]

# Where each architecture keeps its decoder blocks. Written as an explicit table rather than a
# search over named_modules so an unsupported model fails loudly instead of hooking the wrong list.
_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma 2/3, Phi-3
    "model.language_model.layers",  # Gemma 3 multimodal wrappers
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "transformer.h",  # GPT-2, GPT-J
    "model.decoder.layers",  # OPT
)

# Column of each row's last prompt token, for the forwards running inside `prompt_boundary`.
_PROMPT_LAST: ContextVar[torch.Tensor | None] = ContextVar("steerscale_prompt_last", default=None)


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


def _hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _add(output: torch.Tensor | tuple, vector: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | tuple:
    hidden = _hidden(output)
    shift = vector.to(dtype=hidden.dtype, device=hidden.device)
    if mask is not None:
        shift = shift * mask.to(dtype=hidden.dtype, device=hidden.device)[..., None]
    steered = hidden + shift  # a new tensor: the layer's own output stays untouched for autograd
    return (steered, *output[1:]) if isinstance(output, tuple) else steered


@contextmanager
def prompt_boundary(last_prompt_column: torch.Tensor) -> Iterator[None]:
    """Declare each row's last prompt column (batch,) for the forwards inside; `after_prompt` steers from it."""
    token = _PROMPT_LAST.set(last_prompt_column)
    try:
        yield
    finally:
        _PROMPT_LAST.reset(token)


def _chunk_columns(args: tuple, kwargs: dict[str, Any]) -> tuple[int, torch.Tensor]:
    """(batch size, absolute column of each position) of the chunk a model forward is about to run."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    batch, width = ids.shape[:2] if ids is not None else embeds.shape[:2]
    device = (ids if ids is not None else embeds).device
    cache_position, mask, past = kwargs.get("cache_position"), kwargs.get("attention_mask"), kwargs.get("past_key_values")
    if cache_position is not None:
        offset = int(cache_position.reshape(-1)[0])
    elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
        offset = mask.shape[-1] - width  # generation passes the mask of past + new columns
    elif past is not None and hasattr(past, "get_seq_length"):
        offset = int(past.get_seq_length())
    else:
        offset = 0
    return batch, torch.arange(offset, offset + width, device=device)


@contextmanager
def steer(model: nn.Module, vectors: Mapping[int, torch.Tensor], positions: Positions = "all") -> Iterator[None]:
    """Add `vectors[layer]` to the output of each given decoder layer, at all positions or only after the prompt.

    With `after_prompt`, a position is steered when its column is at or after the row's last prompt
    token (the one whose output predicts the first answer token), as in CAA. Forwards that run
    outside any `prompt_boundary` have no known prompt and are steered everywhere.
    """
    layers = decoder_layers(model)
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def set_mask(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        last = _PROMPT_LAST.get()
        if last is None:
            state["mask"] = None
            return
        batch, columns = _chunk_columns(args, kwargs)
        if last.shape[0] != batch:
            raise ValueError(f"prompt boundary covers {last.shape[0]} rows but the forward has {batch}")
        state["mask"] = columns[None, :] >= last.to(columns.device)[:, None]

    handles = []
    try:
        if positions == "after_prompt":
            handles.append(model.register_forward_pre_hook(set_mask, with_kwargs=True))
        for index, vector in vectors.items():
            handles.append(layers[index].register_forward_hook(lambda _m, _i, out, v=vector: _add(out, v, state["mask"])))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def last_token_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each decoder layer's output at each row's last real token (right padding): (layers, batch, d).

    Read with hooks on the layers themselves, not from `output_hidden_states`, whose last entry is
    after the final norm in most architectures: this is exactly what a steering hook adds to.
    """
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    last = attention_mask.sum(-1) - 1
    captured: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda _m, _i, out: captured.append(_hidden(out)[rows, last].float()))
        for layer in decoder_layers(model)
    ]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(captured)
