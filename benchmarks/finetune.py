"""Comparison 1: fine-tuning throughput of steerscale's training loop vs Hugging Face Trainer + PEFT.

Both sides train the same ladder model on the same examples in the same batch order (the order
steerscale's loop draws; the Trainer gets it through a sequential sampler), with the same AdamW,
cosine schedule, LoRA initialisation and no gradient clipping, so their loss trajectories must
agree step for step before their speeds are compared. The Trainer side is what a user would glue
together: a pre-tokenised dataset, a padding collator with -100 labels, `Trainer.train()`.

Each side runs at two step counts: a run's time is fixed costs (set-up, tear-down) plus steps ×
a step's time, so the difference of the two gives the steady per-step rate and the fixed cost
apart; a ratio per run alone mixes them in proportions that depend on the step count.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, replace
from typing import Callable
from unittest import mock

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch.utils.data import SequentialSampler
from torch.utils.flop_counter import FlopCounterMode
from transformers import PrinterCallback, Trainer, TrainingArguments

from benchmarks.common import Check, Result, Row, Timing, fmt_paired, fmt_time, time_alternating, time_call
from workers.cell import ModelSpec
from workers.last_block import read_positions_mlp
from workers.lm import LanguageModel
from workers.methods import lora_layer
from workers.methods.lora import LoraConfig, lora_injected
from workers.methods.protocol import forward_flops, matmul_params
from workers.models.loading import load_language_model
from workers.tasks import get_task
from workers.tasks.base import Example
from workers.training import TrainConfig, TrainResult, batch_order, train

LOSS_ATOL = 1e-4  # per-step loss agreement; fp32, same data, init and fused AdamW agree to ~2e-7 (a learning rate 1.5× off: 7e-3)


@dataclass(frozen=True)
class Settings:
    model: str
    task: str
    steps: int
    batch_size: int
    lr_lora: float
    lr_full: float
    lora_rank: int
    warmup: int
    repeats: int
    long_steps: int  # the second run's steps: (long − short) ÷ its extra steps is a step's time
    mm_sizes: tuple[int, ...]  # the peak is the fastest of these square products
    seed: int = 0


QUICK = Settings(
    "ladder:test/s", "arith", steps=6, batch_size=8, lr_lora=3e-3, lr_full=1e-4, lora_rank=4, warmup=1, repeats=2,
    long_steps=12, mm_sizes=(256, 512),
)  # fmt: skip
# batch 64: at the ladder's widths (d_model ≤ 96) a step of 16 short sequences is mostly per-op
# overhead, which a larger batch spreads over more tokens (benchmarks/CHANGES.md, session 20)
FULL = Settings(
    "ladder:default/xl", "arith", steps=30, batch_size=64, lr_lora=3e-3, lr_full=1e-4, lora_rank=4, warmup=1, repeats=5,
    long_steps=90, mm_sizes=(128, 256, 512, 1024, 2048),
)  # fmt: skip


class _InOrderTrainer(Trainer):
    """The one override a user needs to feed batches in a given order instead of shuffled."""

    def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001 - Trainer's signature
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def _collate(pad_id: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["prompt"]) + len(r["target"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            seq = r["prompt"] + r["target"]
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            labels[i, len(r["prompt"]) : len(seq)] = torch.tensor(r["target"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def tokenized(lm: LanguageModel, examples: list[Example]) -> list[dict[str, list[int]]]:
    """The examples tokenized once, as a user would (`dataset.map`) before building the Trainer."""
    tok = lm.tokenizer
    return [{"prompt": tok(ex.prompt)["input_ids"], "target": tok(ex.target, add_special_tokens=False)["input_ids"]} for ex in examples]


def hf_train(lm: LanguageModel, rows: list[dict[str, list[int]]], order: list[int], s: Settings, lr: float, lora: bool) -> list[float]:
    """Trainer (+ PEFT when `lora`) on the tokenized `rows` in `order`; returns the per-step losses."""
    tok = lm.tokenizer
    data = [rows[i] for i in order]
    model = lm.model
    for p in model.parameters():  # PEFT's unload() leaves the base frozen after a LoRA run
        p.requires_grad_(not lora)
    if lora:
        torch.manual_seed(s.seed)
        model = get_peft_model(
            lm.model, PeftLoraConfig(r=s.lora_rank, lora_alpha=2.0 * s.lora_rank, target_modules="all-linear", lora_dropout=0.0)
        )
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=s.batch_size, max_steps=s.steps, learning_rate=lr,
            lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
            save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, remove_unused_columns=False,
            dataloader_pin_memory=False, seed=s.seed,
        )  # fmt: skip
        trainer = _InOrderTrainer(model=model, args=args, train_dataset=data, data_collator=_collate(tok.pad_token_id))
        trainer.remove_callback(PrinterCallback)  # logging_steps=1 is for the loss check; printing each step is not the peer's work
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if lora:
        model.unload()
    return losses


def ours_train(lm: LanguageModel, examples: list[Example], s: Settings, lr: float, lora: bool) -> TrainResult:
    config = TrainConfig(lr=lr, epochs=1, min_steps=s.steps, max_steps=s.steps, batch_size=s.batch_size, checkpoints=0)
    if lora:
        torch.manual_seed(s.seed)  # as workers/methods/lora.py does before injecting
        with lora_injected(lm, LoraConfig(rank=s.lora_rank, alpha=2.0 * s.lora_rank), None) as peft_model:
            return train(lm, [p for p in peft_model.parameters() if p.requires_grad], examples, config, s.seed)
    params = list(lm.model.parameters())
    for p in params:
        p.requires_grad_(True)
    return train(lm, params, examples, config, s.seed)


def ours_train_adapter_free(lm: LanguageModel, examples: list[Example], s: Settings) -> TrainResult:
    """A LoRA step with its adapters free: every weight frozen and the embeddings' output made to need a
    gradient, so the backward runs each linear's input gradient through every block (as LoRA's does) and
    computes no weight gradient (the ladder ties its head to the input embeddings: training them would)."""
    config = TrainConfig(lr=s.lr_lora, epochs=1, min_steps=s.steps, max_steps=s.steps, batch_size=s.batch_size, checkpoints=0)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    hook = lm.model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_())
    idle = torch.nn.Parameter(torch.zeros(1))  # the optimiser needs a parameter; no gradient ever reaches it
    try:
        return train(lm, [idle], examples, config, s.seed)
    finally:
        hook.remove()


MM_WARMUP, MM_REPEATS = 3, 20  # the peak and the step's shapes alike: a best of fewer runs reads lower


def mm_peak(sizes: tuple[int, ...]) -> dict[int, float]:
    """This machine's dense fp32 matmul rate (FLOP/s) at each square `size`: the best of `MM_REPEATS`
    torch.mm. The peak is the fastest of them: one large size alone understates it where smaller
    operands stay in cache (which size wins varies from run to run), and that would flatter every
    fraction of it."""
    rates = {}
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        best = min(time_call(lambda: torch.mm(a, b), warmup=MM_WARMUP, repeats=MM_REPEATS).seconds)
        rates[size] = 2.0 * size**3 / best
    return rates


def per_step(short: Timing, long: Timing, extra_steps: int) -> Timing:
    """A step's wall and CPU seconds, repeat by repeat: (long run − short run) ÷ the steps between them
    (each repeat of `time_alternating` runs every side once, back to back, so its runs share the machine's load)."""
    def diff(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
        return tuple((y - x) / extra_steps for x, y in zip(a, b))

    return Timing(diff(short.seconds, long.seconds), diff(short.cpu_seconds, long.cpu_seconds))


def fixed_cost(run: Timing, step: Timing, steps: int) -> Timing:
    """What a run costs beyond `steps` steady steps, repeat by repeat (set-up, tear-down, the first steps' warm-up)."""
    return Timing(
        tuple(r - steps * t for r, t in zip(run.seconds, step.seconds)),
        tuple(r - steps * t for r, t in zip(run.cpu_seconds, step.cpu_seconds)),
    )  # fmt: skip


def mm_rate_at_shapes(model: torch.nn.Module, rows: int, scored: int, *, weight_grads: bool) -> float:
    """FLOP/s of torch.mm alone at a training step's matmul shapes: each decoder linear's forward
    (rows × in @ in × out; the last block's MLP at the `scored` rows), its input gradient and, with
    `weight_grads` (full FT), its weight gradient. How far a step's FLOP/s is below this says how much
    of it is work other than its matmuls."""
    last_mlp = read_positions_mlp(model)
    at_scored = set() if last_mlp is None else {id(m) for m in last_mlp.modules()}
    shapes: dict[tuple[int, int, int], int] = {}  # (m, k, n) -> how many matmuls of it a step runs
    for module in model.get_decoder().modules():
        if isinstance(module, torch.nn.Linear):
            d_in, d_out = module.in_features, module.out_features
            rows_here = scored if id(module) in at_scored else rows
            for shape in [(rows_here, d_in, d_out), (rows_here, d_out, d_in)] + ([(d_out, rows_here, d_in)] if weight_grads else []):
                shapes[shape] = shapes.get(shape, 0) + 1
    flops = seconds = 0.0
    for (m, k, n), count in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        seconds += count * min(time_call(lambda: torch.mm(a, b), warmup=MM_WARMUP, repeats=MM_REPEATS).seconds)
        flops += count * 2.0 * m * k * n
    return flops / seconds


def flops_merging_saves(run: Callable[[], object]) -> float:
    """The FLOPs a run of steerscale's LoRA did not run by merging each layer's update into its weight where the
    batch has rows enough (`lora_layer.merges`), against the same run with every update added to the output
    (PEFT's computation, which the FLOP/s rows bill both sides for): torch's FLOP counter on both."""
    counted = []
    for merging in (False, True):
        with mock.patch.object(lora_layer, "merges", lora_layer.merges if merging else lambda x, weight: False), FlopCounterMode(display=False) as counter:
            run()
        counted.append(counter.get_total_flops())
    return counted[0] - counted[1]


def _profile(fn: Callable[[], object], top: int = 6) -> str:
    """The top operators by self CPU time of one run: where a low FLOP/s fraction goes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
    return ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events)


def run(quick: bool) -> Result:
    s = QUICK if quick else FULL
    spec = ModelSpec(id=s.model)
    ours_lm, hf_lm = load_language_model(spec), load_language_model(spec)
    base = {k: v.clone() for k, v in ours_lm.model.state_dict().items()}
    examples = get_task(s.task).examples("train", 4 * s.batch_size, s.seed)
    order = [i for take in batch_order(len(examples), s.steps, s.batch_size, s.seed) for i in take]
    rows = tokenized(hf_lm, examples)  # outside the timing, as steerscale's encoding is outside its own
    n = matmul_params(ours_lm.model)
    head = ours_lm.model.get_output_embeddings().weight.numel()  # in n, tied or not
    n_lora, n_lora_last_mlp = _lora_params(ours_lm, s)
    last_mlp = read_positions_mlp(ours_lm.model)  # what a scored forward runs at the scored tokens alone
    n_last_mlp = 0 if last_mlp is None else sum(p.numel() for p in last_mlp.parameters())

    def restore() -> None:
        for lm in (ours_lm, hf_lm):
            lm.model.load_state_dict(base)

    result = Result("1. Fine-tuning throughput: steerscale train loop vs HF Trainer + PEFT", settings={
        **s.__dict__, "matmul_params": n, "examples": len(examples), "threads": torch.get_num_threads(),
        "output_head_params": head, "hf_optim": "Trainer default (adamw_torch_fused)", "ours_optim": "torch.optim.AdamW (fused)",
    })  # fmt: skip
    rates = mm_peak(s.mm_sizes)
    peak = max(rates.values())
    result.settings["mm_gflops_by_size"] = {size: round(rate / 1e9, 1) for size, rate in rates.items()}
    result.settings["mm_peak_gflops"] = round(peak / 1e9, 2)
    long = replace(s, steps=s.long_steps)
    order_long = [i for take in batch_order(len(examples), long.steps, s.batch_size, s.seed) for i in take]
    extra = long.steps - s.steps
    for name, lora, lr in (("LoRA", True, s.lr_lora), ("full FT", False, s.lr_full)):
        trained = {}  # steps -> steerscale's TrainResult, for the tokens each run ran
        for run_s, run_order in ((s, order), (long, order_long)):
            ours = trained[run_s.steps] = ours_train(ours_lm, examples, run_s, lr, lora)
            restore()
            theirs = hf_train(hf_lm, rows, run_order, run_s, lr, lora)
            restore()
            diff = max(abs(a - b) for a, b in zip(ours.losses, theirs)) if len(theirs) == len(ours.losses) else math.inf
            result.checks.append(Check(
                f"{name}: per-step loss, max |ours − Trainer| over {run_s.steps} steps", f"{diff:.2e} (tol {LOSS_ATOL})", diff <= LOSS_ATOL
            ))  # fmt: skip

        def run_ours(run_s: Settings = s) -> None:
            ours_train(ours_lm, examples, run_s, lr, lora)
            restore()

        def run_hf(run_s: Settings = s, run_order: list[int] = order) -> None:
            hf_train(hf_lm, rows, run_order, run_s, lr, lora)
            restore()

        times: dict[str, Timing] = time_alternating({
            "ours": run_ours, "hf": run_hf,
            "ours_long": lambda: run_ours(long), "hf_long": lambda: run_hf(long, order_long),
        }, warmup=s.warmup, repeats=s.repeats)  # fmt: skip
        step = {side: per_step(times[side], times[f"{side}_long"], extra) for side in ("ours", "hf")}
        fixed = {side: fixed_cost(times[side], step[side], s.steps) for side in ("ours", "hf")}

        def data_tokens(run_order: list[int]) -> int:  # the data's, padding aside
            return sum(len(rows[i]["prompt"]) + len(rows[i]["target"]) for i in run_order)

        tokens, step_tokens = data_tokens(order), (data_tokens(order_long) - data_tokens(order)) / extra
        short, longer = trained[s.steps], trained[long.steps]
        # per step in the steady state: the extra steps' tokens run (less each batch's last column, labels
        # only, which steerscale does not run) and scored
        ran = (longer.sequence_tokens - short.sequence_tokens) / extra
        scored = (longer.tokens - short.tokens) / extra
        # The analytic counts of workers/methods/protocol.py (6·N·T full, 4·N·T + 6·P·T LoRA) on the
        # tokens the loss needs run, with the output head and the last block's MLP (its adapters too)
        # counted only at the scored tokens. The Trainer also runs the last column, and the head and that
        # MLP at every position (steerscale only where scored: `LanguageModel.scored_logits`,
        # workers/last_block.py); that work is not counted for either side.
        unscored = ran - scored
        forward = forward_flops(n - head, ran) + forward_flops(head, scored) - forward_flops(n_last_mlp, unscored)
        adapters = forward_flops(n_lora, ran) - forward_flops(n_lora_last_mlp, unscored)
        flops = 2 * forward + 3 * adapters if lora else 3 * forward
        # the step's own matmul shapes ran faster than any square size (104 % of that peak): the peak is the best of both,
        # or every fraction below reads high (helper-146)
        saved = flops_merging_saves(run_ours) / s.steps if lora else 0.0  # a step's, counted by torch
        shapes_rate = mm_rate_at_shapes(ours_lm.model, round(ran), round(scored), weight_grads=not lora)
        step_peak = max(peak, shapes_rate)
        result.rows += [
            Row(f"{name}: tokens/s per {s.steps}-step run, fixed costs included ({tokens} tokens)",
                f"{tokens / times['ours'].median:.0f}  ({fmt_time(times['ours'])})",
                f"{tokens / times['hf'].median:.0f}  ({fmt_time(times['hf'])})", fmt_paired(times["hf"], times["ours"]), "≥ 1.2×"),
            Row(f"{name}: tokens/s in the steady state, per step: the {long.steps}- and {s.steps}-step runs' difference "
                f"÷ {extra} steps ({step_tokens:.0f} tokens a step)",
                f"{step_tokens / step['ours'].median:.0f}  ({fmt_time(step['ours'])})",
                f"{step_tokens / step['hf'].median:.0f}  ({fmt_time(step['hf'])})", fmt_paired(step["hf"], step["ours"]), "≥ 1.2×"),
            Row(f"{name}: fixed cost of a run (set-up, tear-down, warm-up of the first steps): the {s.steps}-step run "
                f"less {s.steps} steady steps", fmt_time(fixed["ours"]), fmt_time(fixed["hf"]), "", ""),
            Row(f"{name}: achieved FLOP/s in the steady state ÷ one core's torch.mm peak ({step_peak / 1e9:.1f} GFLOP/s: the best of "
                "the square sizes and this step's own shapes; each side trains on one thread, "
                f"as a cell does), {s.model}, {ran:.0f} tokens run a step ({scored:.0f} scored; the output head and the last "
                "block's MLP counted at those only)",
                f"{100 * flops / step['ours'].median / step_peak:.2f} %" + (
                    f" (at the FLOPs it ran, the bill less {100 * saved / flops:.1f} % its merged LoRA layers saved: "
                    f"{100 * (flops - saved) / step['ours'].median / step_peak:.2f} %)" if saved > 0 else ""),
                f"{100 * flops / step['hf'].median / step_peak:.2f} %", "",
                "≥ 25 % on the largest rung (full run; the quick run's model is far narrower)"),
            Row(f"{name}: torch.mm alone at this step's matmul shapes (each decoder linear's forward, input gradient"
                f"{' and weight gradient' if not lora else ''} at {ran:.0f} rows, the last block's MLP's at {scored:.0f}, warm "
                "cache) ÷ the same peak: "
                "what the step's matmuls could reach; the gap to the row above is its other work (norms, rotary, attention, "
                "activations, autograd; the profile below)",
                f"{100 * shapes_rate / step_peak:.1f} %", "", "", ""),
        ]  # fmt: skip
        if lora:
            def run_adapter_free(run_s: Settings = s) -> None:
                ours_train_adapter_free(ours_lm, examples, run_s)
                restore()

            free_runs = time_alternating({"short": run_adapter_free, "long": lambda: run_adapter_free(long)}, warmup=s.warmup, repeats=s.repeats)
            free = per_step(free_runs["short"], free_runs["long"], extra)
            result.rows.append(Row(
                f"{name}: the same steps with the adapters free (every weight frozen, the gradient started at the "
                "embeddings' output: each linear's input gradient still runs, no weight gradient, no adapter op), per step "
                "in the steady state, at LoRA's billed FLOPs ÷ the same peak: a ceiling on steerscale's LoRA row for any "
                "adapter implementation on this model",
                f"{100 * flops / free.median / step_peak:.2f} %  ({fmt_time(free)})", "", "", "",
            ))  # fmt: skip
        result.notes.append(
            f"{name}: each run is timed from its set-up to the end of training: the Trainer's construction (on examples "
            "tokenized once, outside the timing) and train(); steerscale's `train` (its encoding of the examples inside). "
            f"Both sides' timings include {'injecting and removing the LoRA layers and ' if lora else ''}restoring both "
            "models' weights; the steady-state rows take those out with the difference of two step counts, repeat by "
            "repeat. The Trainer logs every step's loss (for the check above) without printing it."
        )
        if not quick:
            result.notes.append(f"{name} profile of one steerscale run (top self-CPU operators): {_profile(run_ours)}")
    return result


def _lora_params(lm: LanguageModel, s: Settings) -> tuple[int, int]:
    """LoRA's trainable parameters: all of them, and those in the last block's MLP (which runs at the scored tokens alone)."""
    with lora_injected(lm, LoraConfig(rank=s.lora_rank, alpha=2.0 * s.lora_rank), None) as peft_model:
        trainable = {id(p) for p in peft_model.parameters() if p.requires_grad}
        mlp = read_positions_mlp(lm.model)
        in_mlp = 0 if mlp is None else sum(p.numel() for p in mlp.parameters() if id(p) in trainable)
        return sum(p.numel() for p in peft_model.parameters() if p.requires_grad), in_mlp
