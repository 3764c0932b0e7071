"""One cell on a real tiny ladder model: reuse of a loaded model is invisible in the results."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import workers.run_cell
from workers.cache import WorkerCache, estimated_bytes
from workers.cell import CellConfig, EvalConfig, ModelSpec
from workers.methods import resolve_config
from workers.run_cell import CellRun, git_sha, main, model_revision, run_cell
from workers.schema import SCHEMA_VERSION

MEASURED = ("score", "score_outcomes", "score_base", "nll", "nll_base", "neutral_kl", "neutral_ppl_ratio", "offtask_score_delta",
            "trainable_params", "post_train_flops", "train_tokens", "layer", "alpha", "hparams")


def _cell(model_id: str, method: str, budget: int = 32, settings: dict | None = None) -> CellConfig:
    spec = ModelSpec(id=model_id)
    spec = spec.model_copy(update={"revision": model_revision(spec)})
    return CellConfig(
        sweep="unit", model=spec, task="facts", method=method,
        method_config=resolve_config(method, settings or {}).model_dump(mode="json"),
        budget=budget, seed=3, eval=EvalConfig(test_size=40, validation_size=16, neutral_size=4, offtask_size=10),
        offtask=("arith",),
    )


def _measured(row: dict) -> dict:
    assert row["status"] == "ok", row["error"]
    return {k: row[k] for k in MEASURED}


@pytest.fixture(scope="module")
def model_id(test_ladder) -> str:
    return test_ladder[-1]


def test_a_reused_model_gives_the_same_rows_as_a_fresh_load(model_id):
    """Cells that trained, steered and tuned fully on the same loaded model must leave no trace."""
    # two checkpoints: the validation NLL keeps the middle one, so reuse must also restore a mid-run checkpoint
    lora = _cell(model_id, "lora", settings={"train": {"lr": 3e-3, "checkpoints": 2}})
    fresh = _measured(run_cell(lora, CellRun(cache=WorkerCache())))
    shared = WorkerCache()
    for method in ("full_ft", "steer_mean"):  # the most invasive fit, and hooks
        assert run_cell(_cell(model_id, method), CellRun(cache=shared))["status"] == "ok"
    reused = _measured(run_cell(lora, CellRun(cache=shared)))
    assert shared.loads == 1
    assert reused == fresh
    assert fresh["neutral_kl"] > 0, "the LoRA in this test must really change the model"


def test_the_peak_memory_window_opens_after_the_base_models_passes(model_id, monkeypatch):
    """The base model's reference passes run in a worker's first cell of a model and task only: inside the
    peak's window, that cell's peak_mem_bytes would be larger than the same cell's run later."""
    import workers.run_cell as module

    events: list[str] = []
    real_baseline, real_reset = module.baseline, module.reset_peak_memory
    monkeypatch.setattr(module, "baseline", lambda *args: events.append("base passes") or real_baseline(*args))
    monkeypatch.setattr(module, "reset_peak_memory", lambda device: events.append("peak reset") or real_reset(device))
    assert run_cell(_cell(model_id, "base", budget=0), CellRun(cache=WorkerCache()))["status"] == "ok"
    assert events == ["base passes", "peak reset"]


def test_a_cells_peak_leaves_out_the_models_its_worker_holds_when_the_window_opens(test_ladder, monkeypatch):
    """The worker's other models were counted before the base model's passes, whose new neutral reference can make
    them make way: one evicted before the peak's window opened was still taken off the peak (too low, even < 0)."""
    xs, s = test_ladder
    monkeypatch.setattr(workers.run_cell, "peak_memory_bytes", lambda device: 10**9)  # the subtraction alone is tested
    cache = WorkerCache(max_bytes=10**12)
    assert run_cell(_cell(xs, "base", budget=0), CellRun(cache=cache))["status"] == "ok"
    only_xs = cache.resident_bytes  # its weights and neutral reference
    beside = run_cell(_cell(s, "base", budget=0), CellRun(cache=cache))
    xs_weights = cache.others_bytes(_cell(s, "base").model, torch.device("cpu"))
    assert len(cache.held()) == 2 and beside["peak_mem_bytes"] == 10**9 - xs_weights > 0
    cache = WorkerCache(max_bytes=only_xs + estimated_bytes(_cell(s, "base").model) + 10)  # s loads beside xs; its reference does not fit
    assert run_cell(_cell(xs, "base", budget=0), CellRun(cache=cache))["status"] == "ok"
    alone = run_cell(_cell(s, "base", budget=0), CellRun(cache=cache))
    assert [ModelSpec.model_validate_json(held).id for held in cache.held()] == [s]  # xs made way for s's reference
    assert alone["peak_mem_bytes"] == 10**9


def test_a_cell_that_fails_on_its_own_settings_keeps_the_workers_model(model_id):
    """A budget past the task's data, an unknown task: the cell failed only after loading its model (evicting the
    worker's others for it), and every failure discarded the model, so the next cell loaded it again."""
    cache = WorkerCache(max_bytes=10**9)
    assert run_cell(_cell(model_id, "steer_mean"), CellRun(cache=cache))["status"] == "ok"
    too_big = run_cell(_cell(model_id, "steer_mean", budget=10**7), CellRun(cache=cache))
    assert too_big["status"] == "failed" and "budget" in too_big["error"]
    assert run_cell(_cell(model_id, "lora"), CellRun(cache=cache))["status"] == "ok"
    assert cache.loads == 1


def test_cells_of_different_tasks_share_one_neutral_reference(model_id, monkeypatch):
    """The neutral texts do not depend on the task: a worker computes and holds their full-vocabulary
    reference once per model, and the KL measured against it is the same as with a reference of its own."""
    import workers.run_cell

    cells = [_cell(model_id, "lora", settings={"train": {"lr": 3e-3, "min_steps": 4, "max_steps": 4, "checkpoints": 0}})]
    cells.append(cells[0].model_copy(update={"task": "arith", "offtask": ("facts",)}))
    alone = [_measured(run_cell(cell, CellRun(cache=WorkerCache()))) for cell in cells]
    used = []  # the reference each cell's KL was measured against
    shift = workers.run_cell.neutral_shift
    monkeypatch.setattr(workers.run_cell, "neutral_shift", lambda lm, reference: used.append(reference) or shift(lm, reference))
    shared = WorkerCache()
    together = [_measured(run_cell(cell, CellRun(cache=shared))) for cell in cells]
    assert len(used) == 2 and used[0] is used[1] and shared.loads == 1
    assert together == alone and all(row["neutral_kl"] > 0 for row in together)


def test_a_cell_measures_selectivity_on_the_natural_text_it_names(model_id):
    """eval.neutral_source: the base model's neutral NLL is its NLL on that source's texts, a cell reading the
    world's grammar beside it gets its own reference, and the row pins the source's rows in `versions`."""
    from workers.cell import NeutralTextSource
    from workers.metrics import neutral_reference
    from workers.tasks import neutral_text_digest, neutral_texts

    source = NeutralTextSource(dataset=str(Path(__file__).parent / "fixtures" / "neutral"))
    world = _cell(model_id, "steer_mean")
    natural = world.model_copy(update={"eval": EvalConfig(**{**world.eval.model_dump(), "neutral_min_words": 20, "neutral_source": source})})
    cache = WorkerCache()
    rows = [run_cell(cell, CellRun(cache=cache)) for cell in (world, natural)]
    assert [row["status"] for row in rows] == ["ok", "ok"] and cache.loads == 1
    expected = neutral_reference(cache.model(natural.model, 4), neutral_texts(4, 20, source))
    assert rows[1]["base_neutral_nll_per_byte"] == pytest.approx(expected.nll_per_byte, rel=1e-6)
    assert rows[1]["base_neutral_nll_per_byte"] != pytest.approx(rows[0]["base_neutral_nll_per_byte"], rel=1e-3)
    versions = [json.loads(row["versions"]) for row in rows]
    assert "neutral_texts" not in versions[0] and versions[1]["neutral_texts"] == neutral_text_digest(neutral_texts(4, 20, source))


@pytest.mark.parametrize("method, says_pairs", [("steer_mean", True), ("prompt+steer_mean", True), ("lora", False)])
def test_the_out_of_memory_note_says_pairs_only_where_steer_mean_ran(method, says_pairs):
    """A halving in steer_mean's contrast forwards counts pairs of texts; a row of another method said so too (helper-156)."""
    from types import SimpleNamespace

    from workers.run_cell import out_of_memory_note

    note = out_of_memory_note(_cell("ladder:test/s", method), SimpleNamespace(halved_to=4, train_parts=1))
    assert note is not None and note.startswith("ran out of accelerator memory, and went on smaller: scoring batches were halved, down to 4")
    assert ("steer_mean's contrast forwards count pairs of texts" in note) == says_pairs


def test_a_cell_whose_scoring_runs_out_of_memory_halves_its_batches_and_says_so(model_id, capfd):
    """At a 150k vocabulary one scoring batch's logits can outgrow the card: the cell goes on in smaller batches, with
    the same numbers up to rounding, and its ok row says so; the fit's halving does not carry into the evaluation."""
    from conftest_methods import out_of_memory_past

    cell = _cell(model_id, "prompt")  # its fit scores too (choosing how many demonstrations)
    clean = _measured(run_cell(cell, CellRun(cache=WorkerCache())))
    cache = WorkerCache()
    lm = cache.model(cell.model, cell.eval.batch_size)
    method, at_fit = workers.run_cell.get_method(cell.method), []
    fit = method.fit
    capfd.readouterr()
    with out_of_memory_past(lm, 10), pytest.MonkeyPatch.context() as patch:
        patch.setattr(method, "fit", lambda ctx, config: at_fit.append(lm.batch_size) or fit(ctx, config))
        row = run_cell(cell, CellRun(cache=cache))
    assert row["status"] == "ok", row["error"]
    assert row["error"] == ("ran out of accelerator memory, and went on smaller: scoring batches were halved, down to 8 "
                            "(eval.batch_size 64: scores move by float rounding only); peak_mem_bytes includes the failed try")
    # the 40 test questions: 40 > 20 > 10 for the baseline (cached per worker: not this cell's to report, nor to carry
    # into its fit); the 16 validation questions 16 > 8 in the fit; the evaluation starts at 64 again: 40 > 20 > 10
    said = capfd.readouterr().err
    assert at_fit == [64] and said.count("on a batch of 40;") == 2 and said.count("on a batch of 16;") == 1
    halved = _measured(row)
    # (not its FLOPs: a smaller batch runs the demonstrations, a prefix its rows share, once per batch, so more often)
    assert halved["score"] == clean["score"] and json.loads(halved["hparams"])["shots"] == json.loads(clean["hparams"])["shots"]
    assert halved["nll"] == pytest.approx(clean["nll"], rel=1e-5) and halved["neutral_kl"] == pytest.approx(clean["neutral_kl"], rel=1e-4, abs=1e-7)


def test_a_cell_whose_training_runs_out_of_memory_goes_on_in_micro_batches_and_says_so(model_id):
    from conftest_methods import out_of_memory_past

    cell = _cell(model_id, "lora", settings={"train": {"lr": 3e-3, "min_steps": 4, "max_steps": 4, "checkpoints": 0}})
    cache = WorkerCache()
    lm = cache.model(cell.model, cell.eval.batch_size)
    with out_of_memory_past(lm, 10):  # training batches of 16 examples: 2 micro-batches of 8
        row = run_cell(cell, CellRun(cache=cache))
    assert row["status"] == "ok", row["error"]
    assert row["error"] == ("ran out of accelerator memory, and went on smaller: scoring batches were halved, down to 10 (eval.batch_size 64: "
                            "scores move by float rounding only); training steps ran in 2 micro-batches each (the same gradients, "
                            "summed, up to float rounding; a model's dropout draws other masks); peak_mem_bytes includes the failed try")
    clean = _measured(run_cell(cell, CellRun(cache=WorkerCache())))
    assert _measured(row)["score"] == clean["score"] and _measured(row)["nll"] == pytest.approx(clean["nll"], rel=1e-4)
    assert cache.model(cell.model, cell.eval.batch_size).train_parts == 1  # the next cell starts whole again


def test_sharded_placement_gives_the_same_numbers(model_id):
    """`gpus_per_cell > 1` loads with accelerate's device_map; on a CPU box every layer lands on CPU."""
    cell = _cell(model_id, "steer_mean")
    cache = WorkerCache()
    sharded = _measured(run_cell(cell, CellRun(cache=cache, shard=True)))
    assert cache.loads == 1
    assert sharded == _measured(run_cell(cell, CellRun(cache=WorkerCache())))


def test_a_cell_that_raises_is_a_failed_row_with_the_error(model_id):
    cell = _cell(model_id, "lora").model_copy(update={"task": "no_such_task"})
    cache = WorkerCache()
    row = run_cell(cell, CellRun(cache=cache, attempt=2))
    assert row["status"] == "failed" and row["attempt"] == 2
    assert "unknown task 'no_such_task'" in row["error"]
    assert row["cell_id"] == cell.cell_id and row.get("score") is None
    assert cache.loads == 0  # it failed on its own settings, before loading a model


def test_an_error_inside_a_model_forward_names_the_phase_it_happened_in(model_id):
    """The innermost frames of an error in a forward are torch's; the row must still say that the fit
    (here LoRA's training loop) failed, not the baseline or the final evaluation."""
    from workers.steering import decoder_layers

    cell = _cell(model_id, "lora", settings={"train": {"min_steps": 2, "max_steps": 2, "checkpoints": 0}})
    cache = WorkerCache()
    lm = cache.model(cell.model, cell.eval.batch_size)

    def broken_in_training(module, args, output):
        # training forwards only: the baseline's evaluation runs without grad, LoRA's one-token probe of the layers
        # that need input gradients with it
        hidden = output[0] if isinstance(output, tuple) else output
        if torch.is_grad_enabled() and hidden.shape[1] > 1:
            raise RuntimeError("a forward broke")

    decoder_layers(lm.model)[0].register_forward_hook(broken_in_training)
    row = run_cell(cell, CellRun(cache=cache))
    error = row["error"]
    assert row["status"] == "failed" and error.startswith("RuntimeError: a forward broke\n"), error
    assert "in evaluate_cell\n    adapter = method.fit(fit_context, config)" in error
    assert "workers/methods/lora.py" in error and "workers/training.py" in error
    assert "in broken_in_training\n" in error  # the innermost frame stays
    assert "library frames left out" in error and len(error) <= 4000
    # a cell that failed in its fit may have left its model half-changed (here: a hook): the next cell loads it afresh
    assert cache.held() == [] and run_cell(_cell(model_id, "base"), CellRun(cache=cache))["status"] == "ok" and cache.loads == 2


@pytest.mark.parametrize("leak", ["weight", "hook", "prefix"])
def test_a_method_that_leaves_the_model_changed_fails_its_cell_and_the_next_cell_gets_a_fresh_model(model_id, monkeypatch, leak):
    """One loaded model serves many cells only if every method restores it (methods/protocol.py): a method that zeroed a
    weight made every later cell of its worker one of a changed model, a `base` row "gaining" 0.375 over its own
    score_base, and every row said ok (helper-172)."""
    from workers.methods.steer_mean import SteerMean

    cache = WorkerCache()
    clean = _measured(run_cell(_cell(model_id, "base"), CellRun(cache=cache)))
    fit = SteerMean.fit

    def leaky_fit(self, ctx, config):
        if leak == "weight":
            with torch.no_grad():
                ctx.lm.model.get_input_embeddings().weight[5].zero_()
        elif leak == "hook":
            ctx.lm.model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: out * 0.5)
        else:
            ctx.lm.prefix = "tom: "
        return fit(self, ctx, config)

    monkeypatch.setattr(SteerMean, "fit", leaky_fit)
    row = run_cell(_cell(model_id, "steer_mean"), CellRun(cache=cache))
    assert row["status"] == "failed" and row["error"].startswith("ModelLeftChangedError: method steer_mean left the model changed"), row.get("error")
    named = {"weight": ".weight's values changed", "hook": "+1 hooks", "prefix": "the text put before every prompt"}[leak]
    assert named in row["error"], row["error"]
    again = _measured(run_cell(_cell(model_id, "base"), CellRun(cache=cache)))
    assert cache.loads == 2 and again["score"] == clean["score"] and again["nll"] == clean["nll"]


def test_a_long_error_keeps_both_ends_within_the_bound():
    from workers.run_cell import error_text

    try:
        raise ValueError("head " + "x" * 20000 + " tail")
    except ValueError as exc:
        error = error_text(exc, limit=4000)
    assert len(error) <= 4000 and error.startswith("ValueError: head ") and " tail\n" in error
    assert "in test_a_long_error_keeps_both_ends_within_the_bound" in error


def test_a_cell_out_of_memory_beside_the_workers_other_models_runs_again_alone(test_ladder, monkeypatch):
    """The cache budgets the models' bytes, not a cell's working memory: a cell that runs out beside a neighbour
    would fit alone, and was stored failed. Alone from the start, an out-of-memory cell is not run twice."""
    import workers.methods.steer_mean as steer_mean

    xs, s = test_ladder
    cache = WorkerCache(max_bytes=10**9)
    fits: list[int] = []
    real_fit = steer_mean.SteerMean.fit

    def fit_needing_the_room(self, ctx, config):
        fits.append(len(cache.held()))
        if len(cache.held()) > 1:  # and restoring the model after it fails too: the out-of-memory is behind it
            try:
                raise torch.OutOfMemoryError("CUDA out of memory (a neighbour holds the room)")
            finally:
                raise KeyError("restore failed")  # noqa: B012
        return real_fit(self, ctx, config)

    monkeypatch.setattr(steer_mean.SteerMean, "fit", fit_needing_the_room)
    assert run_cell(_cell(xs, "base", budget=0), CellRun(cache=cache))["status"] == "ok"
    row = run_cell(_cell(s, "steer_mean"), CellRun(cache=cache))
    assert row["status"] == "ok" and fits == [2, 1]  # the row says it ran again, and after what
    assert row["error"] == "ran again alone after running out of memory beside the worker's other cached models " \
                           "(OutOfMemoryError: CUDA out of memory (a neighbour holds the room))"
    assert [ModelSpec.model_validate_json(held).id for held in cache.held()] == [s] and cache.loads == 3
    monkeypatch.setattr(steer_mean.SteerMean, "fit", lambda *_: (_ for _ in ()).throw(torch.OutOfMemoryError("alone too")))
    row = run_cell(_cell(s, "steer_mean"), CellRun(cache=cache))
    assert row["status"] == "failed" and row["error"].startswith("OutOfMemoryError: alone too") and cache.loads == 3  # no reload: run once
    assert "ran again" not in row["error"]
    assert run_cell(_cell(xs, "base", budget=0), CellRun(cache=cache))["status"] == "ok"  # a neighbour again: run twice, both errors kept
    error = run_cell(_cell(s, "steer_mean"), CellRun(cache=cache))["error"]
    assert error.startswith("OutOfMemoryError: alone too") and error.endswith("cached models (OutOfMemoryError: alone too)")


def test_an_error_raised_while_handling_another_keeps_the_first():
    """A restore failing after an out-of-memory must not hide the out-of-memory."""
    from workers.run_cell import error_text

    try:
        try:
            raise MemoryError("out of memory in the fit")
        finally:
            raise KeyError("restore failed")
    except KeyError as exc:
        error = error_text(exc)
    assert error.startswith("KeyError: 'restore failed'\n  while handling MemoryError: out of memory in the fit\n")


def test_a_model_whose_outputs_go_nan_is_a_failed_row_not_an_ok_one(model_id, tmp_path):
    """With NaN log-probabilities every multiple-choice argmax picks choice 0: a score, but garbage."""
    import shutil

    from safetensors.torch import load_file, save_file

    from workers.models.loading import resolve_path

    broken = tmp_path / "nan-model"
    shutil.copytree(resolve_path(ModelSpec(id=model_id)), broken)
    weights = load_file(broken / "model.safetensors")
    norm = next(name for name in weights if name.endswith("norm.weight") and "layers" not in name)  # the final norm
    weights[norm] = torch.full_like(weights[norm], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    row = run_cell(_cell(str(broken), "base"), CellRun(cache=WorkerCache()))
    assert row["status"] == "failed" and "NonFiniteMetricError" in row["error"], row.get("error")
    assert re.search(r"(^|[ ,])nll=nan", row["error"]) and row.get("score") is None  # the test NLL itself, not only base_neutral_nll


def test_outputs_gone_nan_on_the_off_task_questions_alone_fail_the_cell(model_id, monkeypatch):
    """An overflow only the off-task prompts trigger (fp16, a large scale on longer prompts) scored every off-task
    question as its first choice: offtask_score_delta stayed finite and the row was ok (helper-126)."""
    from workers.tasks.arith import Arith

    cache = WorkerCache()
    assert run_cell(_cell(model_id, "base"), CellRun(cache=cache))["status"] == "ok"  # the base model's passes, cached
    evaluate = Arith.evaluate

    def nan_logits(self, lm, examples, *, elicited=False):
        handle = lm.model.model.norm.register_forward_hook(lambda module, inputs, out: out * float("nan"))
        try:
            return evaluate(self, lm, examples, elicited=elicited)
        finally:
            handle.remove()

    monkeypatch.setattr(Arith, "evaluate", nan_logits)
    row = run_cell(_cell(model_id, "lora", budget=8), CellRun(cache=cache))
    assert row["status"] == "failed" and "NonFiniteMetricError" in row["error"], row.get("error")
    assert "arith off-task nll=nan" in row["error"] and "base model" not in row["error"], row["error"]


def test_outputs_gone_nan_on_the_elicited_prompts_alone_fail_the_cell(model_id, monkeypatch):
    """The elicited prompts (the task's instruction in front) are the longest the base model scores: NaN there alone
    stored score_elicited as every question's first choice, in an ok row the latent-gap analysis reads."""
    from workers.tasks.facts import Facts

    evaluate = Facts.evaluate

    def nan_when_elicited(self, lm, examples, *, elicited=False):
        handle = lm.model.model.norm.register_forward_hook(lambda module, inputs, out: out * float("nan")) if elicited else None
        try:
            return evaluate(self, lm, examples, elicited=elicited)
        finally:
            if handle is not None:
                handle.remove()

    monkeypatch.setattr(Facts, "evaluate", nan_when_elicited)
    row = run_cell(_cell(model_id, "base", budget=0), CellRun(cache=WorkerCache()))
    assert row["status"] == "failed" and "NonFiniteMetricError: elicited nll (base model)=nan" in row["error"], row.get("error")


def test_a_perplexity_ratio_past_floats_is_an_ok_row_with_inf(model_id, monkeypatch):
    """neutral_shift returns +inf for a rise of over 709 nats a token (exp overflows): a measured
    collapse of the neutral text, stored as such; it used to fail the cell as a non-finite metric."""
    import workers.run_cell

    monkeypatch.setattr(workers.run_cell, "neutral_shift", lambda lm, reference: (812.5, float("inf")))
    row = run_cell(_cell(model_id, "base"), CellRun(cache=WorkerCache()))
    assert row["status"] == "ok", row["error"]
    assert row["neutral_ppl_ratio"] == float("inf") and row["neutral_kl"] == 812.5


def test_a_hub_model_row_records_the_commit_its_weights_came_from(model_id, tmp_path):
    """A hub id without a revision follows `main`: the row says which commit it got. Loaded offline
    from a hub cache laid out as huggingface_hub lays it out, through `python -m workers.run_cell`."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from workers.models.loading import resolve_path

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--steerscale-test--tiny"
    shutil.copytree(resolve_path(ModelSpec(id=model_id)), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cell = _cell(model_id, "base").model_copy(update={"model": ModelSpec(id="steerscale-test/tiny")})
    (tmp_path / "cell.json").write_text(cell.model_dump_json())
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "workers.run_cell", str(tmp_path / "cell.json"), str(tmp_path / "row.parquet")],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    row = pq.read_table(tmp_path / "row.parquet").to_pylist()[0]
    assert row["status"] == "ok" and json.loads(row["versions"])["model_commit"] == commit


def test_a_ladder_row_records_its_weights_and_the_fit_names_a_model_whose_rows_mix_two_builds(model_id, ladder_cache, tmp_path, monkeypatch):
    """A rung's id names its recipe, not its weights: a node of another CPU kind rebuilds it with other
    floats under the same id (here: one weight nudged by 1e-6 in a second cache). Each row records a
    digest of the weights it ran on, and `steerscale fit` names a model whose rows mix two."""
    import hashlib
    import shutil

    import pyarrow.parquet as pq
    from safetensors.torch import load_file, save_file

    import analysis
    from workers.models.loading import resolve_path
    from workers.schema import to_table

    built = Path(resolve_path(ModelSpec(id=model_id)))
    first = run_cell(_cell(model_id, "base"), CellRun(cache=WorkerCache()))
    rebuilt = tmp_path / "other-node" / built.relative_to(ladder_cache)
    shutil.copytree(built, rebuilt)
    weights = load_file(rebuilt / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-6
    save_file(weights, rebuilt / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setenv("STEERSCALE_CACHE", str(tmp_path / "other-node"))
    second = run_cell(_cell(model_id, "base").model_copy(update={"seed": 4}), CellRun(cache=WorkerCache()))
    digests = [json.loads(row["versions"])["model_weights_sha256"] for row in (first, second)]
    assert digests[0] == hashlib.sha256(b"model.safetensors" + (built / "model.safetensors").read_bytes()).hexdigest()
    assert digests[1] != digests[0] and first["score"] is not None and second["score"] is not None
    # and which version of each task's questions it was scored on (analysis fits the newest only)
    assert json.loads(first["versions"])["task_data"] == {"facts": 1, "arith": 3}

    results = tmp_path / "results"
    (results / "cells").mkdir(parents=True)
    pq.write_table(to_table([first]), results / "cells" / "first.parquet")
    assert "different weights" not in analysis.fit_results(str(results), bootstrap=0).to_text()
    pq.write_table(to_table([second]), results / "cells" / "second.parquet")
    text = analysis.fit_results(str(results), bootstrap=0).to_text()
    assert "The rows of 1 model(s) were computed with different weights" in text
    assert all(f"model_weights_sha256 {d[:12]}… in 1 rows" in text for d in digests), text


def test_a_rows_base_columns_are_the_base_models_and_its_deltas_are_adapted_minus_base(model_id, monkeypatch):
    """nll_base and score_base are what a `base` cell measures; offtask_score_delta is the adapted
    model's off-task score minus the base model's, in that order (a flipped sign reads damage as gain)."""
    from workers.tasks import get_task

    lora = _cell(model_id, "lora", settings={"train": {"lr": 1e-2, "min_steps": 8, "max_steps": 8, "checkpoints": 0}})
    lora = lora.model_copy(update={"eval": lora.eval.model_copy(update={"offtask_size": 40})})  # 10 questions: 0 right before and after
    base = _measured(run_cell(_cell(model_id, "base"), CellRun(cache=WorkerCache())))
    arith = type(get_task("arith"))
    scores = []  # every off-task evaluation of the LoRA cell, in order: the base model's, then the adapted one's
    evaluate = arith.evaluate
    monkeypatch.setattr(arith, "evaluate", lambda self, lm, examples: scores.append(evaluate(self, lm, examples)) or scores[-1])
    row = _measured(run_cell(lora, CellRun(cache=WorkerCache())))
    assert (row["nll_base"], row["score_base"]) == (base["nll"], base["score"]) and row["nll"] != row["nll_base"]
    # the test questions' own outcomes, in order, behind the score: what analysis redraws (analysis/bootstrap.py)
    assert len(row["score_outcomes"]) == 40 and sum(row["score_outcomes"]) / 40 == row["score"]
    assert len(scores) == 2 and scores[0].score != scores[1].score, "the LoRA must move the off-task score for the sign to show"
    assert row["offtask_score_delta"] == pytest.approx(scores[1].score - scores[0].score)


def test_prompts_demonstrations_leave_room_for_the_offtask_questions(model_id, monkeypatch):
    """The demonstrations fit the off-task evaluation's longer questions too: sized from the task's own
    (facts), 40 of them left a gridworld question no room, and it was cut into the first demonstration."""
    from workers.lm import LanguageModel

    cut: list[int] = []  # tokens dropped from an encoded row that had demonstrations in front of it
    clipped = LanguageModel.clipped
    monkeypatch.setattr(
        LanguageModel, "clipped",
        lambda lm, ids: (cut.append(len(ids) - lm.max_length) if lm.prefix and len(ids) > lm.max_length else None) or clipped(lm, ids),
    )  # fmt: skip
    cell = _cell(model_id, "prompt", budget=64, settings={"separator": " ; ", "choose_shots": False})
    alone = run_cell(cell.model_copy(update={"offtask": ()}), CellRun(cache=WorkerCache()))
    cut.clear()  # the neutral texts, longer than any question, may push the oldest demonstrations out (metrics.neutral_shift)
    with_gridworld = cell.model_copy(update={"offtask": ("gridworld",), "eval": cell.eval.model_copy(update={"offtask_size": 100})})
    row = run_cell(with_gridworld, CellRun(cache=WorkerCache()))
    assert row["status"] == "ok", row["error"]
    assert alone["status"] == "ok", alone["error"]
    shots_alone, shots = (json.loads(r["hparams"])["shots"] for r in (alone, row))
    assert 0 < shots < shots_alone and cut == []


def test_a_cell_file_that_is_missing_or_not_a_cell_is_a_clean_error(tmp_path, capsys):
    """`python -m workers.run_cell` on a missing or malformed cell.json was a FileNotFoundError or a 30-line
    pydantic traceback; now exit 2 naming the file and, for a bad key, its path and the nearest valid one."""
    assert main([str(tmp_path / "none.json"), str(tmp_path / "out.parquet")]) == 2
    assert "none.json: [Errno 2] No such file or directory" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"sweep": "x", "modle": {}}')
    assert main([str(bad), str(tmp_path / "out.parquet")]) == 2
    err = capsys.readouterr().err
    assert "cell.modle: unknown key (did you mean 'model'?)" in err and "Traceback" not in err
    assert not (tmp_path / "out.parquet").exists()


def test_an_output_path_that_cannot_take_the_row_is_refused_before_the_cell_runs(tmp_path, capsys, monkeypatch):
    """A directory as the output, or a file where a directory above it must be: the cell ran (hours on a GPU), then
    the write failed with IsADirectoryError / FileExistsError and the row was lost (helper-129)."""
    import workers.run_cell

    cell = tmp_path / "cell.json"
    cell.write_text(_cell("ladder:test/xs", "base").model_dump_json())
    monkeypatch.setattr(workers.run_cell, "run_cell", lambda cell: pytest.fail("the cell ran"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "afile").write_text("")
    assert main([str(cell), str(tmp_path / "dir")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'dir'}: is a directory; give the Parquet file to write the row to (e.g. row.parquet)"
    assert main([str(cell), str(tmp_path / "afile" / "sub" / "row.parquet")]) == 2
    assert f"{tmp_path / 'afile'} is a file, so nothing can be written under it" in capsys.readouterr().err


def test_an_output_uri_is_written_where_it_points_and_an_unwritable_place_is_refused_first(tmp_path, capsys, monkeypatch):
    """The output went through `Path`, which made `s3://b/row.parquet` the local `s3:/b/row.parquet`: the row landed in
    a folder named `s3:`. And a place the user may not write was found only after the cell had run, as a traceback
    with the row lost (helper-144). (The tests run as root, which mode bits do not stop: the write is made to fail.)"""
    import workers.rowfile
    import workers.run_cell

    cell = tmp_path / "cell.json"
    cell.write_text(_cell("ladder:test/xs", "base").model_dump_json())
    now = datetime.now(timezone.utc)
    stored = {"schema_version": SCHEMA_VERSION, "sweep": "s", "cell_id": "c", "slug": "c", "status": "ok", "score": 0.5,
              "started_at": now, "finished_at": now}  # fmt: skip
    monkeypatch.setattr(workers.run_cell, "run_cell", lambda cell: stored)
    monkeypatch.chdir(tmp_path)
    assert main([str(cell), f"file://{tmp_path}/out/row.parquet"]) == 0
    assert pq.read_table(tmp_path / "out" / "row.parquet").column("score").to_pylist() == [0.5]
    assert not (tmp_path / "file:").exists()

    def read_only(filesystem, path, data):
        raise OSError(30, "Read-only file system", path)

    monkeypatch.setattr(workers.run_cell, "run_cell", lambda cell: pytest.fail("the cell ran"))
    monkeypatch.setattr(workers.rowfile, "write_atomically", read_only)
    assert main([str(cell), str(tmp_path / "ro" / "row.parquet")]) == 2
    assert f"error: {tmp_path / 'ro' / 'row.parquet'}: cannot write there ([Errno 30] Read-only file system" in capsys.readouterr().err
    assert main([str(cell), "nosuch://bucket/row.parquet"]) == 2  # a traceback from pyarrow's URI parser before
    assert "cannot write there (Unrecognized filesystem type in URI: nosuch://bucket/row.parquet)" in capsys.readouterr().err


def test_a_misspelled_method_key_in_a_cell_file_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """`rnak` in a cell.json's method_config: the model loaded, the cell wrote a failed row, then a ConfigError traceback (helper-141)."""
    import workers.run_cell

    cell = _cell("ladder:test/xs", "lora")
    path = tmp_path / "cell.json"
    path.write_text(cell.model_copy(update={"method_config": {**cell.method_config, "rnak": 2}}).model_dump_json())
    monkeypatch.setattr(workers.run_cell, "run_cell", lambda cell: pytest.fail("the cell ran"))
    assert main([str(path), str(tmp_path / "row.parquet")]) == 2
    assert "cell.method_config.rnak: unknown key (did you mean 'rank'?)" in capsys.readouterr().err
    assert not (tmp_path / "row.parquet").exists()


def test_a_row_from_an_edited_tree_does_not_claim_its_commits_code(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    assert git_sha(tmp_path) is None  # not a checkout yet
    git("init", "-q")
    (tmp_path / "method.py").write_text("SCALE = 1\n")
    (tmp_path / "notes.md").write_text("draft\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    sha = git("rev-parse", "HEAD")
    (tmp_path / "notes.md").write_text("edited, not code\n")
    (tmp_path / "scratch.py").write_text("untracked\n")
    assert git_sha.__wrapped__(tmp_path) == sha
    (tmp_path / "method.py").write_text("SCALE = 2\n")
    assert git_sha.__wrapped__(tmp_path) == f"{sha}-dirty"
