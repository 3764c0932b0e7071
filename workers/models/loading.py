"""Load any causal LM the same way: `from_pretrained` on a hub id, a local directory or a ladder rung.

Weights load from safetensors only, and `trust_remote_code` stays off unless the model's config
asks for it by name. Ladder rungs are built on first use (from their recipe, seeded), so a fresh
worker on a cluster node needs nothing copied to it; CPUs of different kinds round the pretraining
differently, though, so every row records a digest of the weights it used (`weights_provenance`).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import TYPE_CHECKING

import torch
import transformers

from workers.cell import LADDER_PREFIX, ModelSpec
from workers.lm import LanguageModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: ModelSpec) -> str:
    if spec.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec.device


def parse_ladder_id(model_id: str) -> tuple[str, str]:
    """`ladder:s` -> ("default", "s"); `ladder:test/s` -> ("test", "s")."""
    rest = model_id.removeprefix(LADDER_PREFIX)
    recipe, _, size = rest.rpartition("/")
    return recipe or "default", size


def ladder_revision(spec: ModelSpec) -> str | None:
    """The revision a model is pinned to: a ladder rung's recipe hash; a hub model's or a directory's entry's own
    `revision` (None where it names none)."""
    if not spec.id.startswith(LADDER_PREFIX):
        return spec.revision
    from workers.models import ladder

    return ladder.recipe_hash(parse_ladder_id(spec.id)[0])


def resolve_path(spec: ModelSpec, *, progress: bool = False) -> str:
    """Where `from_pretrained` should look: a built ladder directory, or the id itself (a rung not cached
    is pretrained first, with a progress bar if asked: minutes)."""
    if not spec.id.startswith(LADDER_PREFIX):
        return spec.id
    from workers.models import ladder  # imported here: hub models need no ladder code

    recipe, size = parse_ladder_id(spec.id)
    if spec.revision is not None and spec.revision != ladder.recipe_hash(recipe):
        raise ValueError(
            f"{spec.id}: the cell was planned for ladder recipe hash {spec.revision}, but the recipe "
            f"now hashes to {ladder.recipe_hash(recipe)}; re-plan the sweep"
        )
    return str(ladder.ensure_built(size, recipe, progress=progress))


def is_hub_model(spec: ModelSpec) -> bool:
    """Whether `spec` names a model on the hub: not a ladder rung, not a local directory."""
    return not spec.id.startswith(LADDER_PREFIX) and not os.path.isdir(spec.id)


def hub_commit(spec: ModelSpec) -> str | None:
    """The commit a hub model's files were loaded from (its snapshot in the local hub cache); None
    for ladder rungs and local directories, whose identity is their recipe hash or path."""
    if not is_hub_model(spec):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec.id, "config.json", revision=spec.revision)
    match = re.search(r"/snapshots/([0-9a-f]{40})/", str(found).replace(os.sep, "/")) if isinstance(found, str) else None
    return match.group(1) if match else None


def safetensors_sha256(directory: str) -> str:
    """SHA-256 over a directory's safetensors files, in name order: what identifies a ladder rung's weights."""
    digest = hashlib.sha256()
    for name in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        digest.update(name.encode())
        with open(os.path.join(directory, name), "rb") as weights:
            for block in iter(lambda: weights.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def weights_provenance(spec: ModelSpec, path: str) -> dict[str, str]:
    """What pins the weights a row was computed with, for its `versions`.

    A hub model: the commit its files came from (`main` can move between a sweep's cells). A ladder
    rung: a digest of its weights, because its id names a recipe, and a rung rebuilt on a node of
    another CPU kind is not the same model bit for bit (an AMD EPYC's build of the default ladder's
    `l` has another held-out loss than a Xeon's); `steerscale fit` says when one model's rows mix
    them. A local directory: a digest of a sample of its weight files (`sampled_weights_sha256`), as its
    path stays the same when its weights are saved over (rows of the old and new weights were fitted
    together, unsaid: helper-174).
    """
    if spec.id.startswith(LADDER_PREFIX):
        return {"model_weights_sha256": safetensors_sha256(path)}
    if os.path.isdir(path):
        return {"model_weights_sample_sha256": sampled_weights_sha256(path)}
    commit = hub_commit(spec)
    return {"model_commit": commit} if commit else {}


HEAD_BYTES, WINDOWS, WINDOW_BYTES = 1 << 20, 64, 1 << 14


def sampled_weights_sha256(directory: str) -> str:
    """SHA-256 over each safetensors file's name, size, first MiB (its header names every tensor's shape and place)
    and 64 windows of 16 KiB spread evenly over the rest, its last bytes included: 2 MiB read a file where hashing a whole 15 GB checkpoint
    would cost more than a cell, and from the contents, so a copy on another node matches. A sample: weights saved over
    the old ones are told apart unless they differ only between its windows (a change to one small tensor can be)."""
    digest = hashlib.sha256()
    for name in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        file = os.path.join(directory, name)
        size = os.path.getsize(file)
        digest.update(f"{name}\0{size}\0".encode())
        with open(file, "rb") as weights:
            digest.update(weights.read(HEAD_BYTES))
            rest = size - HEAD_BYTES - WINDOW_BYTES  # the windows' span: from the head's end to the file's last window
            if rest <= 0:
                digest.update(weights.read())
            for i in range(WINDOWS if rest > 0 else 0):
                weights.seek(HEAD_BYTES + rest * i // (WINDOWS - 1))
                digest.update(weights.read(WINDOW_BYTES))
    return digest.hexdigest()


def count_parameters(model: PreTrainedModel) -> tuple[int, int]:
    """(total, non-embedding) parameter counts; tied input/output embeddings are counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already de-duplicates tied weights
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    # every lookup table (tokens; learned positions: GPT-2's wpe, OPT's embed_positions), and the output head
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    output = model.get_output_embeddings()
    if output is not None:
        embedding_ids.add(id(output.weight))
    embedding = sum(p.numel() for p in model.parameters() if id(p) in embedding_ids)
    return total, total - embedding


def _dtype_kwarg() -> str:
    """transformers renamed `torch_dtype` to `dtype` in 4.56; older releases only know the old name."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def leave_on_cpu(model: torch.nn.Module, key: str) -> None:
    """Have accelerate pass the keyword argument `key` of a model split over GPUs as it is. Its hook on
    the whole model moves every keyword tensor to the first GPU, but `logits_to_keep` indexes the hidden
    states on the last one, which a tensor on another GPU cannot (`LanguageModel._head_positions` hands
    it over on the CPU for that reason). A model on one device has no such hook: nothing to do."""
    hook = getattr(model, "_hf_hook", None)
    if hook is None or not hasattr(hook, "skip_keys"):
        return
    skipped = [hook.skip_keys] if isinstance(hook.skip_keys, str) else list(hook.skip_keys or [])
    hook.skip_keys = [*skipped, key] if key not in skipped else skipped


def load_language_model(spec: ModelSpec, batch_size: int = 32, *, shard: bool = False) -> LanguageModel:
    """Load tokenizer and model; `shard` spreads the layers over every visible GPU with accelerate.

    Sharding is a placement decision (the cell reserved more than one GPU), not part of the cell's
    identity: the same weights give the same numbers wherever their layers sit.
    """
    path = resolve_path(spec)
    revision = None if spec.id.startswith(LADDER_PREFIX) else spec.revision  # ladder revisions are recipe hashes
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=spec.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 and Pythia ship without a pad token
    device = resolve_device(spec)
    # On a GPU the weights load straight onto it: through host memory first, eight workers of a node
    # loading a 7B model at once would need eight copies in RAM (and Ray's memory monitor kills them).
    placement = "auto" if shard else {"": device} if device != "cpu" else None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path,
        revision=revision,
        use_safetensors=True,
        trust_remote_code=spec.trust_remote_code,
        device_map=placement,
        **{_dtype_kwarg(): DTYPES[spec.dtype]},
    )
    if shard:
        leave_on_cpu(model, "logits_to_keep")
    offloaded = sorted({str(d) for d in getattr(model, "hf_device_map", {}).values() if str(d) in ("cpu", "disk")})
    if shard and torch.cuda.is_available() and offloaded:  # layers put off the GPUs: full_ft's and task_vector's weight swaps break on them, or crawl
        raise MemoryError(f"{spec.id} does not fit the GPUs reserved for it (accelerate placed layers on {', '.join(offloaded)}); raise gpus_per_cell")
    model.eval()
    # read right after the load: a later look at the hub cache could find `main` moved by another worker's download
    return LanguageModel(model=model, tokenizer=tokenizer, batch_size=batch_size, provenance=weights_provenance(spec, path))
