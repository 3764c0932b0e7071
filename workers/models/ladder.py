"""The offline model ladder: Llama-architecture models pretrained on the synthetic world, cached.

A recipe is one base LlamaConfig plus a few size overrides (as OLMo defines its ladders), a token
budget shared by every size (the same data at every size, as Pythia), and a corpus mix. Models
are saved with `save_pretrained` (safetensors) next to their tokenizer, under
`$STEERSCALE_CACHE/ladder/<recipe>-<hash>/<size>/` (default root: the user cache dir), so they
load with `from_pretrained` exactly like a hub model. A build writes into a temporary directory
and renames it into place under a file lock: a killed build leaves no half model, and two
processes asking for the same size build it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import transformers
from filelock import FileLock
from tqdm.auto import tqdm

from workers.config import ConfigError
from workers.models.loading import count_parameters, parse_ladder_id
from workers.models.tokenizer import build_tokenizer
from workers.registry import UnknownNameError, did_you_mean
from workers.world.corpus import encode, sample_documents

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedModel

# Bump when the world (vocabulary, grammar, task documents) changes: it is part of every recipe hash.
WORLD_VERSION = 4
BUILD_INFO = "ladder.json"


@dataclass(frozen=True)
class Size:
    """The overrides one rung makes on the recipe's base LlamaConfig, and its peak learning rate.

    Wider models need a smaller rate (as in every published ladder); at 1e-2 the 90k model's
    persona representation collapsed while the smaller ones trained fine. Depth stops at 3: within
    this budget 4-layer rungs of 213k and 480k parameters ended with a higher held-out loss than
    the 3-layer 90k rung (1.013 and 1.015 against 0.977), 3-layer ones of the same size below it.
    """

    hidden: int
    layers: int
    heads: int
    intermediate: int
    lr: float


@dataclass(frozen=True)
class Recipe:
    sizes: tuple[tuple[str, Size], ...]  # small -> large
    steps: int
    batch: int
    seq_len: int
    warmup: int
    mix: tuple[tuple[str, float], ...]  # corpus family -> share of documents
    answer_weight: float  # loss weight of answer tokens relative to other tokens
    seed: int


# Task documents carry most of the corpus (the notes' "enough signal in pretraining"); arith needs
# a large share before one-step sums click at all, facts one large enough to memorise a 1,920 table.
_MIX = (("facts", 0.4), ("arith", 0.35), ("gridworld", 0.15), ("text", 0.1))

LADDER: dict[str, Recipe] = {
    "test": Recipe(
        sizes=(("xs", Size(16, 1, 2, 48, 5e-3)), ("s", Size(48, 2, 4, 128, 5e-3))),
        steps=120, batch=16, seq_len=64, warmup=10, mix=_MIX,
        answer_weight=5.0, seed=0,
    ),
    "default": Recipe(
        sizes=(
            ("xs", Size(24, 2, 2, 64, 1e-2)),
            ("s", Size(32, 2, 4, 96, 8e-3)),
            ("m", Size(48, 3, 4, 144, 6e-3)),
            ("l", Size(72, 3, 4, 216, 4e-3)),
            ("xl", Size(112, 3, 7, 336, 2.5e-3)),
        ),
        # Small batches, many steps: at these widths a step costs little more at 24 sequences than
        # at 48, and the number of updates is what lets skills click (2,400 × 24 × 64 = 3.7M tokens).
        steps=2400, batch=24, seq_len=64, warmup=100, mix=_MIX,
        answer_weight=10.0, seed=0,
    ),
}


def get_recipe(name: str) -> Recipe:
    try:
        return LADDER[name]
    except KeyError:
        raise UnknownNameError(f"unknown ladder recipe '{name}'{did_you_mean(name, list(LADDER))}; known: {', '.join(LADDER)}") from None


def sizes(recipe: str) -> list[str]:
    return [name for name, _ in get_recipe(recipe).sizes]


def check_model_id(model_id: str) -> None:
    """Raise `UnknownNameError` unless `ladder:[recipe/]size` names a rung of a known recipe."""
    recipe, size = parse_ladder_id(model_id)
    check_size(size, recipe)


def check_size(size: str, recipe: str = "default") -> None:
    """Raise `UnknownNameError` naming the nearest rung unless the recipe has `size`."""
    known = sizes(recipe)
    if size not in known:
        raise UnknownNameError(f"unknown size '{size}' in ladder '{recipe}'{did_you_mean(size, known)}; known: {', '.join(known)}")


def recipe_hash(recipe: str) -> str:
    """Content hash of the recipe and the world version: a changed recipe never reuses a stale model."""
    blob = json.dumps({"world": WORLD_VERSION, "recipe": dataclasses.asdict(get_recipe(recipe))}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_root() -> Path:
    """`$STEERSCALE_CACHE`, else `$XDG_CACHE_HOME/steerscale`, else `~/.cache/steerscale`. An empty variable is unset
    (`STEERSCALE_CACHE=$X` with X unset built the whole ladder into the working directory); a relative one is
    refused — Ray's workers start in other directories, where it names another cache — or, for XDG's, ignored, as
    the XDG spec says."""
    if chosen := os.environ.get("STEERSCALE_CACHE"):
        path = Path(chosen).expanduser()
        if not path.is_absolute():
            raise ConfigError(f"STEERSCALE_CACHE={chosen}: give an absolute path (a cell's worker runs in another directory)")
        return path
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or "")
    return (xdg if xdg.is_absolute() else Path.home() / ".cache") / "steerscale"


def model_dir(size: str, recipe: str = "default") -> Path:
    return cache_root() / "ladder" / f"{recipe}-{recipe_hash(recipe)}" / size


def model_config(size: str, recipe: str = "default") -> LlamaConfig:
    rec = get_recipe(recipe)
    s = dict(rec.sizes)[size]
    tok = build_tokenizer()
    return transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        intermediate_size=s.intermediate,
        max_position_embeddings=4 * rec.seq_len,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def corpus(recipe: str, n_docs: int, stream: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and loss weights of `n_docs` documents; 'train' and 'heldout' never share a stream."""
    rec = get_recipe(recipe)
    rng = random.Random(f"ladder/{rec.seed}/{stream}")
    docs = sample_documents(rec.mix, n_docs, rng, min_words=rec.seq_len + 8)
    return encode(docs, build_tokenizer(), rec.seq_len, rec.answer_weight)


@torch.no_grad()
def heldout_loss(model: PreTrainedModel, recipe: str, n_docs: int = 256) -> float:
    """Mean unweighted next-token NLL (nats) on held-out documents of the recipe's mix."""
    ids, weights = corpus(recipe, n_docs, "heldout")
    mask = (weights[:, 1:] > 0).float()
    total = 0.0
    for start in range(0, n_docs, 64):
        chunk = ids[start : start + 64]
        logits = model(input_ids=chunk).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none")
        total += float((nll * mask[start : start + 64]).sum())
    return total / float(mask.sum())


@contextmanager
def _one_thread() -> Iterator[None]:
    """Pretrain on one torch thread whoever builds: reductions split over threads sum in another order,
    and over 2,400 steps that moved a rung's held-out loss by 0.01 — as much as the gap between rungs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_one_thread()
def pretrain(size: str, recipe: str, *, progress: bool) -> PreTrainedModel:
    """A fresh model of `size` trained on the recipe's corpus (same data, same order, every size)."""
    rec = get_recipe(recipe)
    torch.manual_seed(rec.seed)
    model = transformers.LlamaForCausalLM(model_config(size, recipe))
    ids, weights = corpus(recipe, rec.steps * rec.batch, "train")
    opt = torch.optim.AdamW(model.parameters(), lr=dict(rec.sizes)[size].lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda step: min(1.0, (step + 1) / rec.warmup)
        * 0.5 * (1 + math.cos(math.pi * min(step, rec.steps) / rec.steps)),
    )
    model.train()
    bar = tqdm(range(rec.steps), desc=f"ladder {recipe}/{size}", disable=not progress, leave=False)
    for step in bar:
        chunk = slice(step * rec.batch, (step + 1) * rec.batch)
        x, w = ids[chunk], weights[chunk, 1:]
        logits = model(input_ids=x).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        loss = (nll * w).sum() / w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


def ensure_built(size: str, recipe: str = "default", *, progress: bool = True) -> Path:
    """The directory of a pretrained ladder model, building it first if it is not cached."""
    check_size(size, recipe)
    final = model_dir(size, recipe)
    if (final / BUILD_INFO).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f"{size}.lock")):
        if (final / BUILD_INFO).exists():  # another process built it while we waited
            return final
        for stale in final.parent.glob(f".{size}-*"):  # a save killed midway (SIGTERM runs no `finally`); ours to clear under the lock
            shutil.rmtree(stale, ignore_errors=True)
        if progress:  # the bar goes when it ends: say what the minutes were for
            print(f"ladder {recipe}/{size}: not cached in {final.parent}, pretraining it once (minutes)", file=sys.stderr)
        started, cpu_started = time.perf_counter(), time.process_time()
        model = pretrain(size, recipe, progress=progress)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        total, nonembed = count_parameters(model)
        info = {
            "recipe": recipe,
            "recipe_hash": recipe_hash(recipe),
            "size": size,
            "params_total": total,
            "params_nonembed": nonembed,
            "build_seconds": round(seconds, 2),
            "build_cpu_seconds": round(cpu_seconds, 2),  # what an idle core would take: wall time varies with load
            "heldout_loss": heldout_loss(model, recipe),
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".{size}-", dir=final.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            build_tokenizer().save_pretrained(tmp)
            (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2))  # written last: marks a complete build
            if final.exists():
                shutil.rmtree(final)  # an incomplete directory from an older layout
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_info(size: str, recipe: str = "default") -> dict:
    """What was recorded when the model was built: params, build time, held-out loss."""
    return json.loads((ensure_built(size, recipe, progress=False) / BUILD_INFO).read_text())
