"""Giving accelerator memory back: after a dropped model, a failed cell, a batch that ran out."""

from __future__ import annotations

import gc

import torch


def release_memory() -> None:
    """Free what dropped models, a failed cell's or a failed batch's tensors held, now: a reference cycle keeps a model alive
    past `del` (accelerate's hooks on a model split over GPUs keep a bound forward on each module), and then
    the next load's placement, and the GPU's other workers, would find its memory taken. CUDA's cached
    blocks go back to the GPU after; a broken CUDA context refuses, which the worker finds out next
    (`CellWorker.device_usable`)."""
    gc.collect()
    if not torch.cuda.is_initialized():
        return
    try:
        torch.cuda.empty_cache()
    except RuntimeError:
        pass
