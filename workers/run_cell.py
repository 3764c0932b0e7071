"""One cell -> one result row. The only entry point the orchestrator uses; needs no Ray.

    python -m workers.run_cell cell.json out.parquet

runs a single cell on any machine with torch/transformers/peft (a GPU box without Ray included)
and writes its row atomically. A cell that raises becomes a `failed` row carrying the error, so
a sweep never loses the record of what was tried.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from pyarrow import fs
from pydantic import ValidationError

from workers.cache import PROCESS_CACHE, Baseline, WorkerCache, estimated_params, method_problems
from workers.cell import CellConfig, ModelSpec
from workers.config import ConfigError, format_errors
from workers.lm import LanguageModel
from workers.memory import release_memory
from workers.methods import FitContext, get_method, resolve_config
from workers.metrics import NeutralReference, neutral_reference, neutral_shift, peak_memory_bytes, reset_peak_memory
from workers.model_state import check_unchanged, state_as_loaded
from workers.models.loading import count_parameters, is_hub_model, ladder_revision, resolve_device, resolve_path
from workers.registry import UnknownNameError
from workers.rowfile import check_writable_at, filesystem_and_path, write_rows
from workers.schema import SCHEMA_VERSION
from workers.tasks import data_version, get_task, hub_data_digest, neutral_text_digest, neutral_texts
from workers.tasks.base import Example, Split, Task


def _now() -> datetime:
    return datetime.now(timezone.utc)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions_json(
    cell: CellConfig, provenance: Mapping[str, str] | None = None, task_rows: Mapping[str, str] | None = None,
    neutral_texts: str | None = None,
) -> str:
    """The row's `versions`: the libraries, the data version of every task the cell reads (analysis
    leaves out rows scored on questions a newer version replaced), and once the cell has run what pins
    its weights (`weights_provenance`: a hub commit, a ladder rung's weights digest), for hub tasks
    their rows (`hub_data_digest`), and for natural neutral texts theirs (`neutral_text_digest`)."""
    task_data = {task: data_version(task) for task in cell.tasks_read}
    pins = {**(provenance or {}), **({"task_rows": dict(task_rows)} if task_rows else {}), **({"neutral_texts": neutral_texts} if neutral_texts else {})}
    return json.dumps({**library_versions(), "task_data": task_data, **pins}, sort_keys=True)


@functools.cache  # once per process: versions do not change between cells
def library_versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": np.__version__,
    }


@functools.cache
def git_sha(checkout: Path = Path(__file__).parent) -> str | None:
    """The commit of the code a row came from, "-dirty" when its Python files differ from that commit
    (a row from a tree being edited does not claim the commit's code); None outside a git checkout
    (e.g. a Ray job's uploaded working directory)."""

    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            done = subprocess.run(["git", *args], cwd=checkout, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done if done.returncode == 0 else None

    head, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no", "--", ":/*.py")
    if head is None or not head.stdout.strip():
        return None
    return head.stdout.strip() + ("-dirty" if changes is None or changes.stdout.strip() else "")


def model_revision(spec: ModelSpec) -> str | None:
    """What pins a model's weights (a ladder rung's recipe hash, or the revision its entry names); part of every cell id
    that uses it."""
    return ladder_revision(spec)


# what `load_language_model` reads of a hub repository (safetensors weights only): not .bin/.pt copies
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def prepare_model(spec: ModelSpec, *, progress: bool = False) -> str:
    """Make the model available before cells need it: build a ladder rung, or download a hub model's
    files into the local hub cache, once, here (a local run's driver) instead of in every worker at
    once. A hub model that cannot be fetched fails here, once, instead of in each of its cells after
    a network timeout. Returns the path `from_pretrained` reads."""
    path = resolve_path(spec, progress=progress)
    if is_hub_model(spec):
        from huggingface_hub import snapshot_download

        patterns = [*HUB_FILES, "*.py"] if spec.trust_remote_code else HUB_FILES
        snapshot_download(spec.id, revision=spec.revision, allow_patterns=patterns)  # a cached snapshot is used offline
    return path


@dataclass
class CellRun:
    """What a worker passes in besides the cell: the cache it keeps across cells, and the attempt."""

    cache: WorkerCache = PROCESS_CACHE
    attempt: int = 1
    shard: bool = False  # the cell reserved more than one GPU: spread the model over them


def identity_columns(cell: CellConfig, attempt: int) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "sweep": cell.sweep,
        "cell_id": cell.cell_id,
        "slug": cell.slug,
        "attempt": attempt,
        "model": cell.model.id,
        "family": cell.model.family_name,
        "task": cell.task,
        "method": cell.method,
        "budget": cell.budget,
        "seed": cell.seed,
        "versions": versions_json(cell),
        "git_sha": git_sha(),
        "device": resolve_device(cell.model),
    }


def baseline(
    lm: LanguageModel, task: Task, test: list[Example], offtask: dict[str, list[Example]], neutral: NeutralReference
) -> Baseline:
    """The untouched model on the test split (plain and elicited) and the other tasks, with its neutral reference."""
    return Baseline(
        test=task.evaluate(lm, test),
        elicited=task.evaluate(lm, test, elicited=True) if any(ex.elicited_prompt for ex in test) else None,
        neutral=neutral,
        offtask={name: get_task(name).evaluate(lm, examples) for name, examples in offtask.items()},
    )


def cached_neutral(cell: CellConfig, run: CellRun, lm: LanguageModel, texts: list[str]) -> NeutralReference:
    """The base model's reference on the cell's neutral `texts`, one per worker for the cells of every task: keyed by
    the texts themselves (a hub source's `main` may move between cells), kept per text, whatever the batch size."""
    return run.cache.neutral(cell.model, neutral_text_digest(texts), lambda: neutral_reference(lm, texts))


def drawn(task: Task, split: Split, n: int, seed: int) -> tuple[list[Example], int]:
    """`n` examples of the task's `split` and how many of them are distinct: a synthetic draw repeats
    its pool past the end, a hub split stops short of `n`. None drawn where the pool is known to be short:
    the callers refuse the cell, and a budget of 10^7 spent 75 s drawing it first."""
    pool = task.pool_size(split)
    if pool is not None and pool < n:
        return [], pool
    examples = task.examples(split, n, seed)
    return examples, len(examples) if pool is None else min(len(examples), pool)


def training_examples(task: Task, budget: int, seed: int) -> list[Example]:
    """The cell's `budget` training examples; raises when the task has fewer distinct ones.

    A short pool would train on fewer (a hub split) or repeated (a synthetic draw) examples while the
    row claims the full budget, putting the cell at the wrong place on every fit's data axis.
    Planning refuses the pools it can count; this catches the rest (hub ids, cells run by hand).
    """
    examples, distinct = drawn(task, "train", budget, seed)
    if distinct < budget:
        raise ValueError(f"task '{task.name}' has {distinct} distinct training examples, fewer than the cell's budget of {budget}")
    return examples


def evaluation_examples(task: Task, split: Split, n: int, seed: int, setting: str) -> list[Example]:
    """`n` examples of the task's `split` for evaluation; raises when the split has fewer distinct ones
    (a hub test split of 872 rows asked for 1,000; a synthetic draw past its pool, which repeats
    questions), which would be scored in silence as if it were `n`."""
    examples, distinct = drawn(task, split, n, seed)
    if distinct < n:
        raise ValueError(f"task '{task.name}' has {distinct} distinct {split} examples, fewer than {setting} = {n}: lower it")
    return examples


class NonFiniteMetricError(FloatingPointError):
    """A measured column came out NaN or infinite: the model's outputs overflowed (fp16, a large
    steering scale, weights gone NaN). The cell fails with this instead of storing the garbage:
    with NaN log-probabilities every multiple-choice argmax picks the first choice."""


def check_finite(measured: dict[str, Any], expected: tuple[str, ...]) -> None:
    """Raise NonFiniteMetricError naming the `expected` columns of `measured` that are not finite."""
    bad = [name for name in expected if not np.isfinite(float(measured[name]))]
    if bad:
        raise NonFiniteMetricError(", ".join(f"{name}={measured[name]}" for name in bad) + " (the model's outputs are not finite)")


def task_rows(cell: CellConfig) -> dict[str, str]:
    """The digest of every hub task's rows the cell read (loaded by now: computed once per worker)."""
    digests = {name: hub_data_digest(name) for name in cell.tasks_read}
    return {name: digest for name, digest in digests.items() if digest is not None}


def out_of_memory_note(cell: CellConfig, lm: LanguageModel) -> str | None:
    """What an ok row says of batches that ran out of accelerator memory and went on smaller (`LanguageModel.in_batches`,
    `workers.training.accumulated_step`): scores and losses move by float rounding only (a dropout model draws other
    masks), seconds and peak memory include the failed tries; None where none did."""
    pairs = "".join(f"; {note}" for part in cell.method.split("+") if (note := getattr(get_method(part), "batch_note", None)))
    smaller = [f"scoring batches were halved, down to {lm.halved_to} (eval.batch_size {cell.eval.batch_size}{pairs}: scores move by "
               "float rounding only)"] if lm.halved_to else []  # fmt: skip
    smaller += [f"training steps ran in {lm.train_parts} micro-batches each (the same gradients, summed, up to float rounding; "
                "a model's dropout draws other masks)"] if lm.train_parts > 1 else []  # fmt: skip
    return f"ran out of accelerator memory, and went on smaller: {'; '.join(smaller)}; peak_mem_bytes includes the failed try" if smaller else None


def evaluate_cell(cell: CellConfig, run: CellRun) -> dict[str, Any]:
    """The measured columns of an ok row. Raises on any failure; `run_cell` turns that into a row."""
    # The cell's own problems (a bad config, an unknown task, a budget past the data) first: they fail
    # the cell before it loads a model, or evicts the worker's others for it.
    task = get_task(cell.task)
    method = get_method(cell.method)
    config = resolve_config(cell.method, cell.method_config, path="cell.method_config")
    train = training_examples(task, cell.budget, cell.seed)
    validation = evaluation_examples(task, "validation", cell.eval.validation_size, cell.eval.validation_seed, "eval.validation_size")
    test = evaluation_examples(task, "test", cell.eval.test_size, 0, "eval.test_size")
    offtask = {name: evaluation_examples(get_task(name), "test", cell.eval.offtask_size, 0, "eval.offtask_size") for name in cell.offtask}
    # as many of each off-task task's training questions: what a method that takes context sizes its room by
    # (the test questions' own lengths stay out of every choice the method makes)
    offtask_like = [example for name in cell.offtask for example in get_task(name).examples("train", cell.eval.offtask_size, 0)]
    neutral_cuts = neutral_texts(cell.eval.neutral_size, cell.eval.neutral_min_words, cell.eval.neutral_source)

    lm = run.cache.model(cell.model, cell.eval.batch_size, shard=run.shard)
    device = str(lm.device)
    as_given = state_as_loaded(lm)  # what the method must leave as it found it: taken outside the measured seconds and peak

    started = time.perf_counter()
    context = json.dumps([cell.task, cell.offtask, cell.eval.model_dump(mode="json")])
    base = run.cache.baseline(cell.model, context, lambda: baseline(lm, task, test, offtask, cached_neutral(cell, run, lm, neutral_cuts)))
    base_seconds = time.perf_counter() - started
    # the peak from here: the base model's passes run in the first cell of a worker only, and a cell's figure
    # must not depend on which cell ran first; nor a halving those passes met (`LanguageModel.in_batches`)
    reset_peak_memory(device)
    # resident in that peak, not this cell's: counted as the window opens (the baseline's new neutral reference may
    # have made some of them make way)
    others = run.cache.others_bytes(cell.model, lm.device)
    lm.batch_size, lm.halved_to = cell.eval.batch_size, None

    # Seeded here, after the model load and the baseline: whether those came from the worker's cache
    # (and drew random numbers, as building a ladder rung does) must not change what the method draws.
    seed_everything(cell.seed)
    started = time.perf_counter()
    fit_context = FitContext(
        lm=lm,
        task=task,
        train=train,
        validation=validation,
        seed=cell.seed,
        selection_metric=cell.eval.selection_metric,
        offtask=offtask_like,
    )
    try:
        adapter = method.fit(fit_context, config)
        train_seconds = time.perf_counter() - started
        lm.batch_size = cell.eval.batch_size  # a halving beside training's gradients and optimiser state need not hold now
        started = time.perf_counter()
        with adapter.applied():
            result = task.evaluate(lm, test)
            kl, ppl_ratio = neutral_shift(lm, base.neutral)
            offtask_results = {name: get_task(name).evaluate(lm, examples) for name, examples in offtask.items()}
    except BaseException:
        # The method may have died half-way through changing the model: the next cell loads it afresh. (A
        # failure before this, in the load or the baseline, leaves the cached weights as they were.)
        run.cache.discard(cell.model)
        raise
    eval_seconds = time.perf_counter() - started + base_seconds
    peak = peak_memory_bytes(device) - others
    try:  # after the seconds and the peak are read: the check's own pass over the weights is no part of the cell's
        check_unchanged(as_given, lm, cell.method)
    except BaseException:  # a changed model must not serve the next cell, which would be blamed for it
        run.cache.discard(cell.model)
        raise

    total, nonembed = count_parameters(lm.model)
    report = adapter.report
    measured = {
        "params_total": total,
        "params_nonembed": nonembed,
        "task_type": task.task_type,
        "train_tokens": report.train_tokens,
        "score": result.score,
        "score_outcomes": list(result.outcomes) or None,
        "score_base": base.test.score,
        "score_elicited": base.elicited.score if base.elicited else None,
        "nll": result.nll,
        "nll_base": base.test.nll,
        "base_neutral_nll": base.neutral.nll,
        "base_neutral_nll_per_byte": base.neutral.nll_per_byte,
        "offtask_score_delta": (
            float(np.mean([offtask_results[name].score - base.offtask[name].score for name in offtask])) if offtask else None
        ),
        "neutral_kl": kl,
        "neutral_ppl_ratio": ppl_ratio,
        "trainable_params": report.trainable_params,
        "post_train_flops": report.post_train_flops,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "peak_mem_bytes": peak,
        "layer": report.layer,
        "alpha": report.alpha,
        "selection": report.selection,
        "val_labels": report.val_labels,
        "hparams": json.dumps(report.hparams, sort_keys=True, default=str),
        "versions": versions_json(cell, lm.provenance, task_rows(cell), neutral_text_digest(list(base.neutral.texts)) if cell.eval.neutral_source and neutral_cuts else None),
        "error": out_of_memory_note(cell, lm),
    }
    # not the perplexity ratio: past a rise of 709 nats a token it is +inf by design (metrics.neutral_shift), a
    # measured collapse; a NaN there comes with a NaN KL, which is checked
    neutral_columns = ("base_neutral_nll", "neutral_kl") if cell.eval.neutral_size else ()
    # the off-task NLLs too, though no column keeps them: NaN log-probs score every question as its first choice, so a
    # NaN off-task pass gave a finite offtask_score_delta and an ok row
    unstored_nll = {f"{name} off-task nll{side}": result.nll for name in offtask
                    for side, result in (("", offtask_results[name]), (" (base model)", base.offtask[name]))}  # fmt: skip
    # and the elicited prompts' (an instruction or header in front: longer, so first to overflow in fp16), or
    # score_elicited is a first-choice score stored as the base model's latent ability
    unstored_nll |= {"elicited nll (base model)": base.elicited.nll} if base.elicited else {}
    check_finite({**measured, **unstored_nll}, ("score", "nll", "score_base", "nll_base", *neutral_columns, *unstored_nll))
    return measured


OWN_CODE = Path(__file__).resolve().parent  # workers/: the frames that say what the cell was doing


def _is_own(frame: traceback.FrameSummary) -> bool:
    return Path(frame.filename).resolve().is_relative_to(OWN_CODE)


def _shorten(text: str, limit: int) -> str:
    """`text` in at most `limit` characters, its middle left out: both ends say the most."""
    if len(text) <= limit:
        return text
    cut = "\n  ...\n"
    half = (limit - len(cut)) // 2
    return f"{text[:half]}{cut}{text[len(text) - half :]}"


def error_text(exc: BaseException, innermost: int = 4, limit: int = 4000) -> str:
    """A failed row's `error`: the exception, then the frames that place it.

    Those are every frame in steerscale's own code, which say whether the baseline, the fit, its
    selection or the final evaluation failed (and on which line of which method), and the innermost
    `innermost`, where it was raised (often torch's or transformers' code); the library frames
    between them are counted, not printed. At most `limit` characters.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    lines, left_out = ["Traceback (steerscale's frames and the innermost ones):\n"], 0
    for i, frame in enumerate(frames):
        if i < len(frames) - innermost and not _is_own(frame):
            left_out += 1
            continue
        if left_out:
            lines.append(f"  ... {left_out} library frame{'s' * (left_out > 1)} left out\n")
            left_out = 0
        lines.extend(traceback.format_list([frame]))
    message = _shorten("\n".join(_chain(exc)), limit // 4)
    return f"{message}\n{_shorten(''.join(lines), limit - len(message) - 1)}"


def _chain(exc: BaseException) -> list[str]:
    """The exception, then what it was raised from or while handling (a restore failing after an
    out-of-memory must not hide the out-of-memory)."""
    links = _links(exc)
    return [f"{type(exc).__name__}: {exc}"] + [
        f"  {'raised from' if link is before.__cause__ else 'while handling'} {type(link).__name__}: {link}"
        for before, link in zip(links, links[1:])
    ]


def _links(exc: BaseException) -> list[BaseException]:
    """The exception and, in turn, what each was raised from or raised while handling."""
    links, seen = [exc], {id(exc)}
    while (link := exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)) is not None and id(link) not in seen:
        seen.add(id(link))
        links.append(link)
        exc = link
    return links


def run_cell(cell: CellConfig, run: CellRun | None = None) -> dict[str, Any]:
    """The cell's row: `status` ok with its metrics, or `failed` with the error. Never raises."""
    run = run or CellRun()
    started_at = _now()
    row = identity_columns(cell, run.attempt)
    for alone in (False, True):
        out_of_memory: str | None = None  # its first line: the exception itself would pin the cell's tensors
        try:
            row.update({"error": None, **evaluate_cell(cell, run)}, status="ok")  # an ok row's `error` is a note, if any
        except Exception as exc:  # a failed cell is data: keep the error, let the sweep go on
            row.update(status="failed", error=error_text(exc))
            out_of_memory = next((f"{type(link).__name__}: {link}".partition("\n")[0] for link in _links(exc)
                                  if isinstance(link, (MemoryError, torch.OutOfMemoryError))), None)  # fmt: skip
        if row["status"] == "ok":
            break
        release_memory()  # here, not in the except block: its traceback still holds the failed cell's tensors
        # Out of memory beside the other models this worker keeps (their bytes are budgeted, the cell's working
        # memory is not): once more with them evicted, as the cell would run on a worker of its own.
        if alone or out_of_memory is None or not run.cache.evict_others(cell.model):
            break
        first_run = out_of_memory
    if alone:  # the row says what the first run met, ok or not: a retry must not look like a first run
        note = f"ran again alone after running out of memory beside the worker's other cached models ({first_run})"
        row["error"] = "\n".join(filter(None, (row["error"], note)))
    row.update(started_at=started_at, finished_at=_now())
    return row


def deterministic_cuda() -> None:
    """The same row for the same cell on a GPU, as on a CPU: cuBLAS (split-K) and a few kernels
    (index_add_, embedding backward, the fused attention backward) otherwise sum in a run-dependent
    order, and a retried or rerun cell could select another checkpoint, layer or scale. Call before
    CUDA starts. Strict, not `warn_only`: under `warn_only` the flash and memory-efficient attention
    kernels keep their non-deterministic backward and only warn (seen on an H200, torch 2.11); an op
    with no deterministic kernel fails its cell with torch's message naming it (none did in the
    methods' paths on Llama, GPT-NeoX, Qwen2 and Gemma there)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def fit_process_to(cpus: float, gpus: float) -> None:
    """Keep this worker process to what its cell reserved, before anything here starts CUDA.

    No GPU reserved: hide the GPUs (Ray >= 2.48 no longer hides them from an actor that reserved
    none, and every such worker on a GPU node would pick `cuda` under device auto and crowd onto GPU 0
    unreserved). A fraction of one: cap the caching allocator at that share, so that workers packed
    onto one GPU fail their own cells with out-of-memory rather than each other's. Threads: one per
    reserved core (two torch processes with all threads each on 2 cores were ~9x slower,
    shared/notes/offline-world.md)."""
    if gpus == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    else:
        deterministic_cuda()
        if gpus < 1 and torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(gpus)
    torch.set_num_threads(max(1, int(cpus)))


def _out_problem(out: str) -> str | None:
    """Why the row could not be written to `out`, a path or URI (None where it can): a directory there, a file where a
    directory above it must be, or a place this user may not write. Found after the cell had run, the row was lost
    with its compute (helper-129, helper-144)."""
    try:  # an unknown scheme, or a bucket this user cannot reach, as a message (ArrowInvalid is a ValueError)
        filesystem, path = filesystem_and_path(out)
        if filesystem.get_file_info(path).type == fs.FileType.Directory:
            return "is a directory; give the Parquet file to write the row to (e.g. row.parquet)"
        if "://" not in out:
            existing = next((parent for parent in Path(path).parents if parent.exists()), None)
            if existing is not None and not existing.is_dir():
                return f"{existing} is a file, so nothing can be written under it"
        check_writable_at(filesystem, path.rsplit("/", 1)[0])
    except (OSError, ValueError) as err:
        return f"cannot write there ({err})"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.run_cell", description=__doc__.split("\n")[0])
    parser.add_argument("cell", type=Path, help="JSON file with a resolved CellConfig")
    parser.add_argument("out", help="Parquet file to write the row to (atomically): a path, or a URI such as s3://bucket/row.parquet")
    args = parser.parse_args(argv)
    try:
        cell = CellConfig.model_validate_json(args.cell.read_text())
    except (OSError, ValidationError) as err:  # a missing file, or not a cell's JSON: say which key, no traceback
        problem = format_errors(CellConfig, err, "cell") if isinstance(err, ValidationError) else err
        print(f"error: {args.cell}: {problem}\n(`steerscale plan CONFIG --cell SLUG > cell.json` writes one)", file=sys.stderr)
        return 2
    if problem := _out_problem(args.out):  # before the cell runs (hours on a GPU), not when its row is written
        print(f"error: {args.out}: {problem}", file=sys.stderr)
        return 2
    try:  # before the model loads: a misspelled key wrote a failed row after the load, with a traceback (helper-141)
        resolve_config(cell.method, cell.method_config, path="cell.method_config")
    except (ConfigError, UnknownNameError) as err:
        print(f"error: {args.cell}: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(int(os.environ.get("STEERSCALE_THREADS", torch.get_num_threads())))
    if torch.cuda.is_available():
        deterministic_cuda()
    row = run_cell(cell)
    write_rows(args.out, [row])
    print(f"{row['slug']}: {row['status']}" + (f" score={row.get('score'):.3f}" if row["status"] == "ok" else f"\n{row['error']}"))
    return 0 if row["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
