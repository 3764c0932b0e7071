"""Grid expansion is a pure, deterministic function; cell ids are content hashes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from orchestrator.grid import expand
from orchestrator.spec import load_spec
from workers.cell import CellConfig, EvalConfig, ModelSpec

SPEC = {
    "sweep": "grid",
    "models": [{"id": "ladder:test/xs"}, {"id": "ladder:test/s", "gpus_per_cell": 0.5}],
    "tasks": ["facts"],
    "methods": {"base": {}, "steer_mean": {}, "lora": {"rank": 2}},
    "budgets": [4, 16],
    "method_budgets": {"base": [0]},
    "seeds": [0, 1],
}


def _ids_in_subprocess(path) -> list[str]:
    code = "import sys; from orchestrator.grid import expand; from orchestrator.spec import load_spec; print(' '.join(c.cell_id for c in expand(load_spec(sys.argv[1]))))"
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_grid_size_order_and_scheduling_fields(write_sweep):
    cells = expand(load_spec(write_sweep(SPEC)))
    # per model: base 1 budget + 2 methods x 2 budgets, each x 2 seeds = 10
    assert len(cells) == 2 * 1 * (1 + 2 + 2) * 2
    assert [c.config.slug for c in cells][:2] == ["ladder-test-xs__facts__base__n0__s0", "ladder-test-xs__facts__base__n0__s1"]
    assert {c.gpus for c in cells} == {0.0, 0.5}
    assert all(c.config.model.revision for c in cells), "ladder recipe hash must be pinned in every cell"


def test_a_method_that_reads_no_examples_runs_at_budget_0_alone(write_sweep):
    """base without method_budgets ran once per budget, the same cell computed again at each; an explicit
    method_budgets entry still wins."""
    spec = {**SPEC, "models": SPEC["models"][:1], "method_budgets": {}}
    budgets = {(c.config.method, c.config.budget) for c in expand(load_spec(write_sweep(spec)))}
    assert {b for m, b in budgets if m == "base"} == {0}
    assert {b for m, b in budgets if m == "lora"} == {4, 16}
    assert {b for m, b in budgets if m == "lora+steer_mean"} == set()
    explicit = expand(load_spec(write_sweep({**spec, "method_budgets": {"base": [4]}})))
    assert {c.config.budget for c in explicit if c.config.method == "base"} == {4}


def test_a_family_written_as_the_inferred_one_keeps_the_ids(write_sweep):
    """`family: ladder-test` on ladder:test rungs named what was inferred, and gave every cell a new id."""
    spec = {**SPEC, "models": [{"id": "ladder:test/xs"}]}
    plain = [c.cell_id for c in expand(load_spec(write_sweep(spec)))]
    named = {**spec, "models": [{"id": "ladder:test/xs", "family": "ladder-test"}]}
    assert [c.cell_id for c in expand(load_spec(write_sweep(named)))] == plain
    other = {**spec, "models": [{"id": "ladder:test/xs", "family": "mine"}]}  # a family of one's own labels the rows
    cells = expand(load_spec(write_sweep(other)))
    assert cells[0].config.model.family_name == "mine" and cells[0].cell_id not in plain


@pytest.mark.parametrize("method, written, plain", [
    ("lora", {"target_modules": ["q_proj", "q_proj", "v_proj"]}, {"target_modules": ["q_proj", "v_proj"]}),
    ("lora", {"target_modules": "ALL-LINEAR"}, {}),
    ("lora", {"train": {"lr": 1e-3, "lr_search": [1e-3, 3e-3, 3e-3]}}, {"train": {"lr": 1e-3, "lr_search": [3e-3]}}),
    ("lora", {"train": {"lr": 1e-3, "lr_search": [1e-3]}}, {"train": {"lr": 1e-3}}),
    ("steer_mean", {"scales": [0, 0.0, 1], "layers": [0.5, 0.5]}, {"scales": [0, 1], "layers": [0.5]}),
    ("steer_trained", {"layers": [0.5, 0.5]}, {"layers": [0.5]}),
    ("task_vector", {"lambdas": [1, 1.0, 0.5]}, {"lambdas": [1, 0.5]}),
])  # fmt: skip
def test_settings_that_compute_the_same_get_one_id(method, written, plain, write_sweep):
    """A list's repeats, 'ALL-LINEAR' and a searched rate equal to `lr` changed the id of the same computation."""
    spec = {**SPEC, "models": [{"id": "ladder:test/xs"}], "method_budgets": {}, "budgets": [16], "seeds": [0]}
    ids = [[c.cell_id for c in expand(load_spec(write_sweep({**spec, "methods": {method: settings}})))] for settings in (written, plain)]
    assert ids[0] == ids[1]


def test_settings_built_in_code_are_normalised_as_loaded_ones():
    """An after-validator returning a copy is ignored when a config is built with its constructor."""
    import warnings

    from workers.training import TrainConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TrainConfig(lr=1e-3, lr_search=[1e-3, 3e-3]).lr_search == (3e-3,)
        assert ModelSpec(id="ladder:test/xs", family="ladder-test").family is None
        assert ModelSpec(id="EleutherAI/pythia-70m", family="pythia").family is None


def test_ids_are_stable_across_processes(write_sweep):
    path = write_sweep(SPEC)
    here = [c.cell_id for c in expand(load_spec(path))]
    assert _ids_in_subprocess(path) == here
    assert len(set(here)) == len(here)


def test_id_changes_when_any_setting_changes(write_sweep):
    cell = expand(load_spec(write_sweep(SPEC)))[-1].config
    variants = {
        "budget": cell.model_copy(update={"budget": cell.budget + 1}),
        "seed": cell.model_copy(update={"seed": 7}),
        "method_config": cell.model_copy(update={"method_config": {**cell.method_config, "rank": 3}}),
        "eval": cell.model_copy(update={"eval": cell.eval.model_copy(update={"test_size": 1})}),
        "selection metric": cell.model_copy(update={"eval": cell.eval.model_copy(update={"selection_metric": "score"})}),
        "model revision": cell.model_copy(update={"model": cell.model.model_copy(update={"revision": "other"})}),
        "schema": cell.model_copy(update={"schema_version": cell.schema_version + 1}),
    }
    for what, changed in variants.items():
        assert changed.cell_id != cell.cell_id, f"changing the {what} must change the cell id"
    # but scheduling, placement and the sweep's name are not identity:
    assert cell.model_copy(update={"sweep": "renamed"}).cell_id == cell.cell_id
    assert cell.model_copy(update={"eval": cell.eval.model_copy(update={"batch_size": 8})}).cell_id == cell.cell_id
    assert cell.model_copy(update={"model": cell.model.model_copy(update={"device": "cuda"})}).cell_id == cell.cell_id


def test_cells_stored_before_a_setting_existed_keep_their_ids():
    """eval.selection_metric came later (cells chose on the score before): asked for by name, `score`
    gives the id such a cell was stored under (computed with the code of d7d4784), so a rerun skips
    it; the new default (nll) is a different cell. The same for eval.neutral_min_words (96 before)."""
    cell = CellConfig(sweep="s", model=ModelSpec(id="ladder:test/xs", revision="543562a088b9"), task="facts",
                      method="lora", method_config={"rank": 2}, budget=16, seed=1)  # fmt: skip
    old = cell.model_copy(update={"eval": cell.eval.model_copy(update={"selection_metric": "score", "neutral_min_words": 96})})
    assert old.cell_id == "2d5a7d8ed5c228e51de6"
    assert cell.eval.selection_metric == "nll" and cell.eval.neutral_min_words == 48 and cell.cell_id != old.cell_id
    short_texts_by_score = old.model_copy(update={"eval": old.eval.model_copy(update={"neutral_min_words": 48})})
    assert short_texts_by_score.cell_id not in {old.cell_id, cell.cell_id}
    # eval.neutral_source came later still: unset (the world's grammar, as before) it leaves the id as it was
    natural = {"dataset": "Salesforce/wikitext", "config": "wikitext-103-raw-v1"}
    on_natural_text = old.model_copy(update={"eval": EvalConfig(**{**old.eval.model_dump(), "neutral_source": natural})})
    assert on_natural_text.cell_id != old.cell_id and old.eval.neutral_source is None


def test_cells_reading_a_task_whose_examples_changed_get_new_ids():
    """arith and gridworld changed their splits (data version 2): a cell scoring either, as its task
    or off-task, must not find a row scored on the old questions; a facts cell that reads neither
    keeps the id it was stored under (the one above)."""
    facts = CellConfig(sweep="s", model=ModelSpec(id="ladder:test/xs", revision="543562a088b9"), task="facts",
                       method="lora", method_config={"rank": 2}, budget=16, seed=1,
                       eval=EvalConfig(selection_metric="score", neutral_min_words=96))  # fmt: skip
    assert facts.cell_id == "2d5a7d8ed5c228e51de6"
    stored_before = {"offtask": "19d9a8df2b3b6aea8e42", "task": "78f60064f83b8f7b171e"}  # the code of 0025a7b
    assert facts.model_copy(update={"offtask": ("arith",)}).cell_id != stored_before["offtask"]
    assert facts.model_copy(update={"task": "gridworld"}).cell_id != stored_before["task"]


def test_cells_of_a_method_whose_computation_changed_get_new_ids(monkeypatch):
    """prompt 2 leaves room for the off-task questions (fewer demonstrations fit): its cells, and a composition's
    with it, must not find the rows of version 1; a method still at version 1 keeps its cells' ids (above)."""
    from workers.methods import method_versions, resolve_config

    def cell(method: str) -> CellConfig:
        return CellConfig(sweep="s", model=ModelSpec(id="ladder:test/xs", revision="543562a088b9"), task="facts", method=method,
                          method_config=resolve_config(method, {}).model_dump(mode="json"), budget=16, seed=1)  # fmt: skip

    assert method_versions("prompt") == {"prompt": 2} == method_versions("prompt+steer_mean") and method_versions("lora") == {}
    stored_by_version_1 = {"prompt": "799592699c89db75431d", "prompt+steer_mean": "3aa7d29b9a2c43c9b03d"}  # the code of ce3dada
    assert all(cell(method).cell_id != stored for method, stored in stored_by_version_1.items())
    from workers.methods.prompt import Prompt

    monkeypatch.setattr(Prompt, "version", 1)  # the version alone moved them
    assert all(cell(method).cell_id == stored for method, stored in stored_by_version_1.items())


def test_half_precision_cells_scored_from_bf16_logits_get_new_ids():
    """Half-precision models' scores come from fp32 logits (workers.lm.fp32_head): a bf16 cell must not find a row
    scored from bf16 logits, whose ties all went to the first choice; an fp32 cell keeps its id (above)."""
    cell = CellConfig(sweep="s", model=ModelSpec(id="ladder:test/xs", revision="543562a088b9", dtype="bfloat16"), task="facts",
                      method="lora", method_config={"rank": 2}, budget=16, seed=1,
                      eval=EvalConfig(selection_metric="score", neutral_min_words=96))  # fmt: skip
    assert cell.model_copy(update={"model": cell.model.model_copy(update={"dtype": "float32"})}).cell_id == "2d5a7d8ed5c228e51de6"
    assert cell.cell_id != "0e4d154f17431ef81e7f"  # its id under the code of acbc662


@pytest.mark.parametrize("method, stored", [
    ("lora", "7c096e346bc775c84f7a"), ("steer_mean+lora", "4361540782a0f3a84a6d"), ("task_vector", "3bff0bea3b91fe105b2f"),
])  # fmt: skip
def test_gradient_cells_stored_before_lr_search_existed_keep_their_ids(method, stored):
    """train.lr_search came later: at its default (no search) a cell has the id it was stored under
    (computed with the code of 6baea49), wherever its training sits; asking for a search is another cell."""
    from workers.methods import resolve_config

    def cell(raw):
        config = resolve_config(method, raw).model_dump(mode="json")
        return CellConfig(sweep="s", model=ModelSpec(id="ladder:test/xs", revision="543562a088b9"), task="facts",
                          method=method, method_config=config, budget=16, seed=1)  # fmt: skip

    assert cell({"rank": 2} if method == "lora" else {}).cell_id == stored
    searched = {"lora": {"rank": 2, "train": {"lr_search": [0.1]}}, "steer_mean+lora": {"second": {"train": {"lr_search": [0.1]}}},
                "task_vector": {"full_ft": {"train": {"lr_search": [0.1]}}}}[method]  # fmt: skip
    assert cell(searched).cell_id != stored


def test_defaults_are_resolved_into_the_id(write_sweep):
    """Writing a default explicitly gives the same cell as leaving it out."""
    from workers.methods import get_method

    default_alpha = get_method("lora").config_class().alpha
    explicit = {**SPEC, "methods": {**SPEC["methods"], "lora": {"rank": 2, "alpha": default_alpha}}}
    implicit_ids = [c.cell_id for c in expand(load_spec(write_sweep(SPEC)))]
    explicit_ids = [c.cell_id for c in expand(load_spec(write_sweep(explicit, "explicit.yaml")))]
    assert implicit_ids == explicit_ids


def test_cell_config_round_trips_through_json(write_sweep):
    cell = expand(load_spec(write_sweep(SPEC)))[3].config
    again = CellConfig.model_validate_json(json.dumps(json.loads(cell.model_dump_json())))
    assert again == cell and again.cell_id == cell.cell_id


def test_a_partly_given_train_config_keeps_the_methods_own_defaults(write_sweep):
    """full_ft trains at lr 1e-4 and steer_trained at 1e-2 by default; setting another `train` key
    must not reset their lr to the generic TrainConfig's 1e-3."""
    spec = {**SPEC, "method_budgets": {}, "methods": {"full_ft": {"train": {"max_steps": 7}}, "steer_trained": {"train": {"max_steps": 9}},
                                "task_vector": {"full_ft": {"train": {"epochs": 2}}}}}  # fmt: skip
    trains = {c.config.method: c.config.method_config for c in expand(load_spec(write_sweep(spec)))}
    assert (trains["full_ft"]["train"]["lr"], trains["full_ft"]["train"]["max_steps"]) == (1e-4, 7)
    assert (trains["steer_trained"]["train"]["lr"], trains["steer_trained"]["train"]["max_steps"]) == (1e-2, 9)
    assert (trains["task_vector"]["full_ft"]["train"]["lr"], trains["task_vector"]["full_ft"]["train"]["epochs"]) == (1e-4, 2)


def test_ids_do_not_depend_on_the_order_tasks_are_listed_in(write_sweep):
    """The off-task set of a cell is a set: listing the tasks in another order is the same sweep."""
    spec = {**SPEC, "tasks": ["facts", "arith", "gridworld"], "eval": {"offtask_size": 4}}
    ids = {c.cell_id for c in expand(load_spec(write_sweep(spec)))}
    reordered = {c.cell_id for c in expand(load_spec(write_sweep({**spec, "tasks": ["gridworld", "facts", "arith"]}, "re.yaml")))}
    assert ids == reordered


def test_a_budget_the_training_would_not_show_in_full_is_refused(write_sweep):
    """400 steps of 16 show 6,400 examples: a budget of 8,192 would leave a fifth unseen while its
    row claimed all of them. Nested trainings (a composition's LoRA) are checked too."""
    import pytest

    from workers.config import ConfigError

    spec = {**SPEC, "methods": {"lora": {"rank": 2}, "steer_mean+lora": {"second": {"train": {"max_steps": 10}}}},
            "method_budgets": {}, "budgets": [4, 200]}  # fmt: skip
    with pytest.raises(ConfigError) as err:
        expand(load_spec(write_sweep(spec)))
    assert str(err.value) == ("methods.steer_mean+lora.second.train: a budget of 200 needs 13 steps of 16 to show every "
                              "example once, but max_steps is 10; raise max_steps (or batch_size), or lower the budget")  # fmt: skip
    assert len(expand(load_spec(write_sweep({**spec, "budgets": [4, 160]}, "ok.yaml")))) == 16


def test_a_models_family_is_its_name_without_the_size():
    """Families pool sizes trained alike: Qwen2 and Qwen2.5, or deduped Pythia, are not one family;
    a ladder's family is its recipe."""
    names = {"Qwen/Qwen2.5-0.5B": "qwen2.5", "Qwen/Qwen2-7B": "qwen2", "EleutherAI/pythia-160m-deduped": "pythia-deduped",
             "EleutherAI/pythia-1.4b": "pythia", "meta-llama/Meta-Llama-3-8B": "meta-llama-3", "gpt2-medium": "gpt2",
             "HuggingFaceTB/SmolLM2-135M": "smollm2", "ladder:xs": "ladder", "ladder:test/s": "ladder-test",
             "bigscience/bloom-1b7": "bloom", "bigscience/bloom-560m": "bloom", "stabilityai/stablelm-2-1_6b": "stablelm-2",
             "t5-small": "t5", "t5-base": "t5"}  # fmt: skip
    assert {name: ModelSpec(id=name).family_name for name in names} == names
    assert ModelSpec(id="gpt2", family="mine").family_name == "mine"


def test_a_budget_of_exactly_the_tasks_pool_is_planned(write_sweep):
    from workers.tasks import get_task

    pool = get_task("facts").pool_size("train")
    spec = {**SPEC, "models": [{"id": "ladder:test/xs"}], "methods": {"steer_mean": {}}, "method_budgets": {}, "budgets": [pool], "seeds": [0]}
    assert [c.config.budget for c in expand(load_spec(write_sweep(spec)))] == [pool]


def test_a_slug_two_models_share_is_refused_with_each_ids_model(write_sweep, capsys):
    """Two hub models of one name from two organisations slug alike: `plan --cell` must say which id is which."""
    from orchestrator.cli import main

    models = [{"id": "org-a/tiny-lm"}, {"id": "org-b/tiny-lm"}]
    spec = {**SPEC, "models": models, "methods": {"base": {}}, "method_budgets": {}, "budgets": [0], "seeds": [0]}
    path = write_sweep(spec)
    cells = expand(load_spec(path))
    assert cells[0].config.slug == cells[1].config.slug
    assert main(["plan", str(path), "--cell", cells[0].config.slug]) == 2
    err = capsys.readouterr().err
    assert all(f"{c.cell_id} ({c.config.model.id})" in err for c in cells), err


def test_a_learning_rate_search_multiplies_a_cells_prior_cost(write_sweep):
    """The driver's cost prior (longest cells first, the adaptive loop's FLOPs) counts every rate tried."""
    from orchestrator.cellcost import work_units

    base = {"sweep": "unit", "models": [{"id": "ladder:test/xs"}], "tasks": ["facts"], "budgets": [16]}
    one = expand(load_spec(write_sweep({**base, "methods": {"lora": {"train": {"lr": 1e-3}}}})))[0]
    three = expand(load_spec(write_sweep({**base, "methods": {"lora": {"train": {"lr": 1e-3, "lr_search": [3e-3, 1e-2]}}}})))[0]
    assert work_units(three.config) == 3 * work_units(one.config) > 0
    assert three.cell_id != one.cell_id


def test_overrides_after_a_flag_apply_as_before_it(write_sweep, capsys):
    """`plan X.yaml --cell SLUG seeds=[3]` was refused ("unrecognized arguments"): overrides had to come first."""
    from orchestrator.cli import parse

    path = str(write_sweep({**SPEC, "models": [{"id": "ladder:test/xs"}], "methods": {"base": {}}, "method_budgets": {}, "budgets": [0], "seeds": [0]}))
    assert parse(["plan", path, "--cell", "x", "seeds=[3]", "budgets=[0]"]).overrides == ["seeds=[3]", "budgets=[0]"]
    assert parse(["run", path, "seeds=[3]", "--retry-failed", "budgets=[0]"]).overrides == ["seeds=[3]", "budgets=[0]"]
    with pytest.raises(SystemExit):
        parse(["run", path, "--retry-failed", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_ladder_build_refuses_zero_parallel_builds(capsys):
    """`--jobs 0` read as "unset" and quietly ran one build per core."""
    from orchestrator.cli import parse

    assert parse(["ladder", "build", "--jobs", "2"]).jobs == 2
    with pytest.raises(SystemExit):
        parse(["ladder", "build", "--jobs", "0"])
    assert "argument --jobs: must be at least 1, got 0" in capsys.readouterr().err


def test_plan_says_when_a_trained_method_has_no_budget_to_fit(write_sweep, capsys):
    """Budgets [0] only: lora's cells measure the untrained model, and no loss(D) curve can come of them;
    base (a reference, with no curve to fit) is not named."""
    from orchestrator.cli import main

    path = write_sweep({**SPEC, "models": [{"id": "ladder:test/xs"}], "methods": {"base": {}, "lora": {}}, "budgets": [0], "method_budgets": {}})
    assert main(["plan", str(path)]) == 0
    assert "these methods have fewer: lora (0)." in capsys.readouterr().out


@pytest.mark.parametrize("method, at_100, at_1024", [  # ids of the code of 2bfe7ce^, before the step rule changed
    ("lora", "6e51cb6be058bb34745d", "0e3456f0d4af817c0ead"), ("steer_mean+lora", "5e4d0c97f64c050caa7f", "124f5b2fc62582c90685"),
    ("task_vector", "8b6c7fff9f07d5080903", "6b8abe2a53d849e5a03c"), ("steer_trained", "f8bc2844eb9d2c30411d", "94a57f9ba1ed8ac2ee7c"),
])  # fmt: skip
def test_only_cells_whose_step_count_changed_get_new_ids(method, at_100, at_1024):
    """`epochs` became passes in full batches (budget 100 in 16s: 25 steps, was 28): those cells compute something
    new and must not find their old rows, while budget 1024 (64 steps a pass either way) keeps its id and rows."""
    from workers.methods import resolve_config

    def cell(budget: int) -> CellConfig:
        return CellConfig(sweep="s", model=ModelSpec(id="ladder:test/xs", revision="543562a088b9"), task="facts", method=method,
                          method_config=resolve_config(method, {}).model_dump(mode="json"), budget=budget, seed=1)  # fmt: skip

    assert cell(1024).cell_id == at_1024 and cell(100).cell_id != at_100


def test_plan_prices_the_cells_to_go_by_their_work(write_sweep):
    """Seed 0's LoRA cells at budgets 4 and 64 stored, taking 1 s + 1 ms per unit of prior work: the cells to go are
    priced on that line. The mean of the stored cells priced a budget-1024 cell (26 s here) like those two (~1.5 s)."""
    from orchestrator.cellcost import eval_units, work_units
    from orchestrator.cli import _compute_to_go
    from orchestrator.store import StoredCell, StoreScan

    spec = load_spec(write_sweep({"sweep": "cost", "models": [{"id": "ladder:test/xs"}], "tasks": ["facts"], "methods": {"lora": {"rank": 2}},
                                  "budgets": [4, 64, 256, 1024], "seeds": [0, 1]}))  # fmt: skip
    cells = expand(spec)

    def seconds(cell) -> float:
        return 1.0 + 0.001 * (work_units(cell.config) + eval_units(cell.config))

    first = [c for c in cells if c.config.seed == 0 and c.config.budget in (4, 64)]
    stored = {c.cell_id: StoredCell(c.cell_id, "ok", c.config.model.id, "lora", seconds(c)) for c in first}
    line = _compute_to_go(cells, StoreScan(cells=stored))
    amount, unit = re.search(r"≈ ([\d.]+) (s|min) over 6 cells", line).groups()
    expected = sum(seconds(c) for c in cells if c.cell_id not in stored)
    assert float(amount) * (60 if unit == "min" else 1) == pytest.approx(expected, rel=0.05), (line, expected)


def test_plan_prices_cells_whose_config_changed_by_the_stored_cells_of_the_earlier_one(write_sweep):
    """After `eval.test_size=60`, no cell of the grid is stored, but every model and method's cells of the earlier config
    are: the estimate said "unknown" (helper-169). It now prices each at its model and method's mean, and says so."""
    from orchestrator.cli import _compute_to_go
    from orchestrator.store import StoredCell, StoreScan

    sweep = {"sweep": "cost", "models": [{"id": "ladder:test/xs"}], "tasks": ["facts"], "methods": {"lora": {"rank": 2}, "steer_mean": {}},
             "budgets": [4, 64]}  # fmt: skip
    earlier = expand(load_spec(write_sweep(sweep)))
    cells = expand(load_spec(write_sweep({**sweep, "eval": {"test_size": 60}}, name="changed.yaml")))
    assert not {c.cell_id for c in cells} & {c.cell_id for c in earlier}
    stored = {c.cell_id: StoredCell(c.cell_id, "ok", c.config.model.id, c.config.method, {"lora": 10.0, "steer_mean": 2.0}[c.config.method] * (1 + c.config.budget / 64))
              for c in earlier if c.config.method == "lora"}  # fmt: skip
    line = _compute_to_go(cells, StoreScan(cells=stored))
    assert line == ("cell compute to go: ≈ 31 s over 2 cells from the mean of their model and method's stored cells of another config, not "
                    "scaled to their budgets (a rough guide) (divide by the workers for wall time); 2 cells have no stored cell of their "
                    "model and method to go by"), line  # fmt: skip
    mixed = {**stored, cells[-1].cell_id: StoredCell(cells[-1].cell_id, "ok", cells[-1].config.model.id, cells[-1].config.method, 3.0)}
    assert re.search(r"≈ \d+ s: \d+ s over 1 cells from the stored cells of each one's model and method, scaled to its budget; \d+ s over \d cells from the mean",
                     _compute_to_go(cells, StoreScan(cells=mixed))), cells[-1].config.method  # fmt: skip


def test_a_sweep_that_lowers_max_steps_alone_plans_and_prices_its_cells(write_sweep):
    """`lora.train: {max_steps: 10}` under the default min_steps (20): the spec passed, but each cell's stored config
    spells min_steps 20 out, and reading it back (pricing, the worker) refused it as 'min_steps above max_steps'."""
    from orchestrator.cellcost import longest_first
    from workers.methods import resolve_config

    spec = load_spec(write_sweep({"sweep": "capped", "models": [{"id": "ladder:test/xs"}], "tasks": ["facts"],
                                  "methods": {"lora": {"train": {"max_steps": 10}}}, "budgets": [4, 64]}))  # fmt: skip
    cells = longest_first(expand(spec))
    stored = CellConfig.model_validate_json(cells[0].config.model_dump_json())
    assert resolve_config(stored.method, stored.method_config).train.max_steps == 10


@pytest.mark.parametrize("method, budget, stored, new", [
    ("lora", 20, "6718377fd7148f8116b1", True), ("full_ft", 20, "1f35b1e854e1e3f1654c", True),
    ("steer_mean", 20, "9a5cae43f22b3ff0b940", False), ("lora", 32, "f3d8e6ef0855ffd4ef4c", False),
])  # fmt: skip
def test_only_cells_whose_batches_span_two_shuffles_get_new_ids(method, budget, stored, new):
    """A batch spanning two shuffles no longer holds an example twice (`training.batch_order`, session 41): cells whose
    batches span them (20 examples in batches of 16) compute something new and get new ids; the rest keep the ids they
    were stored under (computed with the code of a159171), the quickstart's (budgets of whole batches or fewer) among them."""
    from workers.methods import resolve_config

    config = resolve_config(method, {}).model_dump(mode="json")
    cell = CellConfig(sweep="s", model=ModelSpec(id="ladder:test/xs", revision="543562a088b9"), task="facts",
                      method=method, method_config=config, budget=budget, seed=1)  # fmt: skip
    assert (cell.cell_id != stored) == new
