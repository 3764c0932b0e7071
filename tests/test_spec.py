"""Sweep spec validation: bad input fails early, naming the key's path and what was meant."""

from __future__ import annotations

import pytest

from orchestrator.grid import expand
from orchestrator.spec import apply_overrides, check_results_dir, load_spec
from workers.config import ConfigError

BASE = {
    "sweep": "unit",
    "models": [{"id": "ladder:test/xs"}],
    "tasks": ["facts"],
    "methods": {"base": {}, "lora": {"rank": 2}},
    "budgets": [4, 16],
}


def test_valid_spec_loads_with_defaults(write_sweep):
    spec = load_spec(write_sweep(BASE))
    assert spec.seeds == [0]
    assert spec.methods["lora"] == {"rank": 2}
    assert spec.results_dir.endswith("results/unit")


def test_unknown_top_level_key_names_path_and_suggestion(write_sweep):
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep({**BASE, "budgetz": [1]}))
    assert "budgetz: unknown key (did you mean 'budgets'?)" in str(err.value)


def test_unknown_nested_key_names_full_path(write_sweep):
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep({**BASE, "models": [{"id": "x", "gpus_per_cel": 1}]}))
    assert "models.0.gpus_per_cel: unknown key (did you mean 'gpus_per_cell'?)" in str(err.value)


def test_unknown_method_setting_is_reported_by_the_methods_own_config(write_sweep):
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep({**BASE, "methods": {"lora": {"rnak": 2}}}))
    assert "methods.lora.rnak: unknown key (did you mean 'rank'?)" in str(err.value)


def test_unknown_method_and_task_get_did_you_mean(write_sweep):
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep({**BASE, "methods": {"lorra": {}}, "tasks": ["fact"]}))
    message = str(err.value)
    assert "did you mean 'lora'?" in message
    assert "tasks.0" in message and "did you mean 'facts'?" in message


def test_a_mistyped_method_under_method_budgets_gets_did_you_mean(write_sweep):
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep({**BASE, "method_budgets": {"lroa": [4]}}))
    assert "method_budgets.lroa: not one of the sweep's methods (did you mean 'lora'?) (base, lora)" in str(err.value)


def test_overrides_parse_yaml_values_and_are_validated(write_sweep):
    spec = load_spec(write_sweep(BASE), ["methods.lora.rank=8", "budgets=[1, 2]", "eval.test_size=5"])
    assert spec.methods["lora"]["rank"] == 8 and spec.budgets == [1, 2] and spec.eval.test_size == 5
    with pytest.raises(ConfigError, match=r"eval.test_sise: unknown key \(did you mean 'test_size'\?\)"):
        load_spec(write_sweep(BASE), ["eval.test_sise=5"])


def test_an_override_changes_only_its_own_key_where_yaml_anchors_share_a_part(tmp_path):
    """`second: {<<: *lora, rank: 8}` made the composition's training lora's own dict, so `methods.lora.train.lr=0.01`
    changed steer_mean+lora's cells too (new ids: their rows left unplanned and run again)."""
    path = tmp_path / "sweep.yaml"
    path.write_text(f"""
sweep: anchors
results_dir: {tmp_path / "results"}
models: [{{id: ladder:test/xs}}]
tasks: [facts]
budgets: [4, 16]
methods:
  lora: &lora {{rank: 2, train: {{lr: 0.003}}}}
  steer_mean+lora: {{second: {{<<: *lora, rank: 8}}}}
""")
    spec = load_spec(path, ["methods.lora.train.lr=0.01"])
    assert spec.methods["lora"]["train"]["lr"] == 0.01 and spec.methods["steer_mean+lora"]["second"]["train"]["lr"] == 0.003


def test_an_invalid_value_from_an_override_is_blamed_on_the_override_not_the_file(write_sweep):
    """The YAML holds budgets [4, 16]; an error saying only "sweep.yaml: budgets must be >= 0" sent users to the file."""
    path = write_sweep(BASE)
    with pytest.raises(ConfigError) as err:
        load_spec(path, ["seeds=[0]", "budgets=[-1]"])
    header, line = str(err.value).splitlines()
    assert header == f"{path} with seeds=[0] budgets=[-1]:"
    assert line.startswith("budgets:") and line.endswith("[set by the override budgets=[-1]]")
    with pytest.raises(ConfigError) as err:  # an error in the file itself is not blamed on an unrelated override
        load_spec(write_sweep({**BASE, "budgets": [-1]}), ["seeds=[1]"])
    assert "[set by" not in str(err.value)


def test_a_value_an_override_makes_a_repeat_of_a_later_entry_is_blamed_on_the_override(write_sweep):
    """`budgets.0=16` on budgets [4, 16] repeats the file's budgets.1, where the repeat is reported: the line named
    neither the earlier entry nor the override that set it."""
    path = write_sweep(BASE)
    with pytest.raises(ConfigError) as err:
        load_spec(path, ["budgets.0=16"])
    assert str(err.value).splitlines()[1] == "budgets.1: 16 is listed twice (also budgets.0) [set by the override budgets.0=16]"
    with pytest.raises(ConfigError) as err:  # an override inside an entry: models.0.id set the repeat as models.0= would
        load_spec(write_sweep({**BASE, "models": [{"id": "ladder:test/xs"}, {"id": "ladder:test/s"}]}), ["models.0.id=ladder:test/s"])
    assert str(err.value).splitlines()[1].endswith("(also models.0) [set by the override models.0.id=ladder:test/s]"), str(err.value)
    with pytest.raises(ConfigError) as err:  # a repeat in the file itself is not blamed on an override elsewhere
        load_spec(write_sweep({**BASE, "budgets": [4, 4, 8]}), ["budgets.2=16"])
    assert "budgets.1: 4 is listed twice (also budgets.0)" in str(err.value)
    assert "[set by" not in str(err.value)


def test_override_into_list_and_malformed_override():
    data = apply_overrides({"models": [{"id": "a"}]}, ["models.0.id=b"])
    assert data["models"][0]["id"] == "b"
    added = apply_overrides({"methods": {"lora": None}}, ["methods.full_ft={train: {lr: 0.1}}", "methods.lora.rank=2", "eval.test_size=5"])
    assert added == {"methods": {"lora": {"rank": 2}, "full_ft": {"train": {"lr": 0.1}}}, "eval": {"test_size": 5}}
    chosen = apply_overrides({"methods": None}, ["methods.lora.rank=2"])  # a template whose methods the overrides choose
    assert chosen == {"methods": {"lora": {"rank": 2}}}
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["novalue"])


def test_wrong_type_is_reported_with_path(write_sweep):
    with pytest.raises(ConfigError, match="budgets.0"):
        load_spec(write_sweep({**BASE, "budgets": ["many"]}))


@pytest.mark.parametrize(
    "override, message",
    [
        ("budgets.0.x=1", "override 'budgets.0.x=1': budgets.0 is a value, not a mapping or list"),
        ("budgets.x=5", "budgets.x is not an index of a list of 2"),
        ("models.7.id=x", "models.7 is not an index of a list of 1"),
        ("seeds=[0", "override 'seeds=[0': the value is not valid YAML"),
        # a real method the sweep does not run: set inside, it added the method and its cells without a word
        ("methods.full_ft.train.lr=0.1", "methods.full_ft is not a method of this sweep (its methods: base, lora); "
                                         "to add it, give it whole: methods.full_ft={} for its defaults"),
        ("methods.lorra.rank=4", "methods.lorra is not a method of this sweep (did you mean 'lora'?) (its methods: base, lora)"),
    ],
)
def test_an_override_that_cannot_apply_names_itself(override, message, write_sweep):
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep(BASE), [override])
    assert message in str(err.value)
    # "to add it" only for a real method: for `lorra` it led to "unknown method 'lorra'" (helper-169)
    assert ("to add it" in str(err.value)) == override.startswith("methods.full_ft.")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seeds": [0, 1, 0]}, "seeds.2: 0 is listed twice"),
        ({"tasks": ["facts", "facts"]}, "tasks.1: facts is listed twice"),
        ({"models": [{"id": "ladder:test/xs"}, {"id": "ladder:test/xs"}]}, "models.1: ladder:test/xs is listed twice"),
        ({"models": [{"id": "ladder:test/xs"}, {"id": "ladder:test/xs", "gpus_per_cell": 0.5}]}, "models.1: ladder:test/xs is listed twice"),
        ({"tasks": ["facts", "sst2"]}, "tasks.1: sst2 is real text, and the ladder's tokenizer knows the synthetic world's words only"),
        ({"eval": {"neutral_source": {"dataset": "Salesforce/wikitext"}}},
         "eval.neutral_source: Salesforce/wikitext is real text, and the ladder's tokenizer knows the synthetic world's words only"),
        ({"models": [{"id": "ladder:test/xs"}, {"id": "ladder:test/xs", "dtype": "bfloat16"}]},
         "models.1: ladder:test/xs is listed again (also models.0) with other settings: rows name a model by its id"),
        ({"method_budgets": {"lora": [-5]}}, "method_budgets.lora must list budgets >= 0"),
        ({"budgets": [-1]}, "budgets must be >= 0"),
        ({"models": [{"id": "ladder:test/xxs"}]}, "models.0.id: unknown size 'xxs' in ladder 'test' (did you mean 'xs'?)"),
        ({"models": [{"id": "ladder:bogus/s"}]}, "models.0.id: unknown ladder recipe 'bogus'"),
        ({"models": [{"id": "./no/such/dir"}]}, "models.0.id: no model directory at ./no/such/dir"),
        ({"models": [{"id": "."}]}, "models.0.id: . holds no config.json, so it is not a saved model"),
        ({"models": [{"id": "~/models/x"}]}, "models.0.id: ~/models/x: '~' is not expanded when a model loads"),
        ({"models": [{"id": "ladder:test/xs", "device": "cuda"}]}, "models.0: device: cuda needs a GPU reserved"),
        ({"models": [{"id": "ladder:test/xs", "gpus_per_cell": 1.5}]}, "models.0.gpus_per_cell: 1.5 GPUs: above 1, a cell reserves whole GPUs"),
        ({"models": [{"id": "ladder:test/xs", "device": "cpu", "gpus_per_cell": 2}]}, "models.0: device: cpu runs on CPUs, but gpus_per_cell 2"),
    ],
)
def test_a_grid_that_cannot_run_fails_at_load_naming_the_entry(change, message, write_sweep):
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep({**BASE, **change}))
    assert message in str(err.value)


def test_a_ladder_rung_listed_with_and_without_its_pinned_revision_is_one_model_listed_twice(write_sweep):
    """Its only valid revision is its recipe's hash, which planning fills in anyway: not "other settings" to give their own
    sweep (what load said), but the same cells planned twice."""
    import workers.models.ladder as ladder

    pinned = {"id": "ladder:test/xs", "revision": ladder.recipe_hash("test")}
    spec = load_spec(write_sweep({**BASE, "models": [{"id": "ladder:test/xs"}, pinned]}))
    with pytest.raises(ConfigError, match="ladder:test/xs listed twice .* list each model once"):
        expand(spec)
    # where models are not checked (fit, report), a revision may be anything: two of them are two settings
    other = write_sweep({**BASE, "models": [{"id": "ladder:test/xs"}, {"id": "ladder:test/xs", "revision": "000000000000"}]})
    with pytest.raises(ConfigError, match="models.1: ladder:test/xs is listed again .* with other settings"):
        load_spec(other, check_models=False)


def test_a_value_out_of_range_says_what_the_setting_means(write_sweep):
    """Layer indices where fractions of depth are meant used to be clamped to the last layer in silence."""
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep({**BASE, "methods": {"steer_mean": {"layers": [4, 8]}}}))
    message = str(err.value)
    assert "methods.steer_mean.layers.0: Input should be less than or equal to 1 (layers: candidate layers, as fractions of depth" in message
    assert "at least 1 item" not in message  # the emptied tuple is a consequence, not a second mistake


def test_reading_a_sweeps_results_through_its_yaml_does_not_need_its_models(write_sweep):
    """`status` / `fit` / `report` given the YAML run where the cluster's model paths may not exist."""
    path = write_sweep({**BASE, "models": [{"id": "/mnt/cluster/models/m1"}]})
    with pytest.raises(ConfigError, match="no model directory at /mnt/cluster/models/m1"):
        load_spec(path)
    assert load_spec(path, check_models=False).results_dir.endswith("results/unit")
    mixed = write_sweep({**BASE, "tasks": ["facts", "sst2"]})  # refused to run on ladder rungs, still readable
    assert load_spec(mixed, check_models=False).tasks == ["facts", "sst2"]


@pytest.mark.parametrize("results_dir", ["results/x", "./out", "s3://bucket/x", "/shared/x"])
def test_a_ray_job_refuses_a_relative_results_dir(results_dir):
    """`ray job submit --working-dir .` runs the driver in Ray's temporary copy of the directory: rows would land there."""
    job = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_abc"
    if "://" in results_dir or results_dir.startswith("/"):
        check_results_dir(results_dir, job)
    else:
        with pytest.raises(ConfigError, match="relative, and this runs as a Ray job"):
            check_results_dir(results_dir, job)
    check_results_dir(results_dir, "/home/me/project")  # not a job: relative is relative to where you are


def test_a_key_given_twice_is_refused_not_silently_replaced(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(f"sweep: unit\nresults_dir: {tmp_path / 'r'}\nmodels: [{{id: 'ladder:test/xs'}}]\ntasks: [facts]\n"
                    "methods:\n  lora: {rank: 4}\n  base: {}\n  lora: {rank: 16}\nbudgets: [4]\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"key 'lora' is given twice in one mapping \(lines 6 and 8\)"):
        load_spec(path)
    merged = tmp_path / "merged.yaml"  # YAML merge keys still load, and a key may override a merged one
    merged.write_text(f"sweep: unit\nresults_dir: {tmp_path / 'r'}\nmodels: [{{id: 'ladder:test/xs'}}]\ntasks: [facts]\n"
                      "methods:\n  lora: {train: &t {lr: 0.003, max_steps: 50}}\n  full_ft: {train: {<<: *t, max_steps: 60}}\n"
                      "budgets: [4]\n")  # fmt: skip
    assert load_spec(merged).methods["full_ft"] == {"train": {"lr": 0.003, "max_steps": 60}}


def test_results_dir_expands_home_and_refuses_a_uri_without_slashes(write_sweep, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_spec(write_sweep({**BASE, "results_dir": "~/ss"})).results_dir == str(tmp_path / "ss")
    with pytest.raises(ConfigError, match="file:/data/x looks like a URI without '//'"):
        load_spec(write_sweep({**BASE, "results_dir": "file:/data/x"}))
    with pytest.raises(ConfigError, match="percent-encode them: file:///data/r%C3%A9sultats%20v2"):
        load_spec(write_sweep({**BASE, "results_dir": "file:///data/résultats v2"}))


def test_a_model_listed_twice_differing_only_in_placement_is_a_config_error(write_sweep):
    from orchestrator.grid import expand

    twice = {**BASE, "models": [{"id": "ladder:test/xs"}, {"id": "ladder:test/xs", "device": "cpu", "gpus_per_cell": 0}]}
    with pytest.raises(ConfigError, match="ladder:test/xs listed twice"):
        expand(load_spec(write_sweep(twice)))


def test_the_default_ladder_has_one_spelling():
    from workers.cell import ModelSpec

    assert ModelSpec(id="ladder:default/xs").id == "ladder:xs" and ModelSpec(id="ladder:test/xs").id == "ladder:test/xs"


def test_a_relative_model_directory_is_checked_like_a_local_one(write_sweep, tmp_path, monkeypatch):
    """`models/x` exists here, so loading would take the directory, not a hub id of that name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "x").mkdir(parents=True)
    with pytest.raises(ConfigError, match="models.0.id: models/x holds no config.json"):
        load_spec(write_sweep({**BASE, "models": [{"id": "models/x"}]}))


@pytest.mark.parametrize("override, message", [
    ("resources.gpus_per_cell=1", "resources.gpus_per_cell: unknown key (GPUs are reserved per model: set models.N.gpus_per_cell)"),
    ("resources.gpus=1", "resources.gpus: unknown key (GPUs are reserved per model: set models.N.gpus_per_cell)"),
    ("models.0.gpus=1", "models.0.gpus: unknown key (a model's cells reserve GPUs with gpus_per_cell)"),
    ("models.0.cpus_per_cell=2", "models.0.cpus_per_cell: unknown key (CPUs are set for every cell at once: resources.cpus_per_cell)"),
])  # fmt: skip
def test_a_gpu_or_cpu_setting_in_the_wrong_place_says_where_it_goes(override, message, write_sweep):
    """`resources.gpus_per_cell` got "did you mean 'cpus_per_cell'?", the nearest spelling but another setting."""
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep(BASE), [override])
    assert message in str(err.value) and "did you mean" not in str(err.value)


def test_models_may_be_given_as_bare_ids(write_sweep):
    """`models=[ladder:test/xs]` is `[{id: ladder:test/xs}]`, the same entries and so the same cells."""
    from orchestrator.grid import expand

    bare, full = load_spec(write_sweep({**BASE, "models": ["ladder:test/xs"]})), load_spec(write_sweep(BASE))
    assert bare.models == full.models and [c.cell_id for c in expand(bare)] == [c.cell_id for c in expand(full)]
    assert load_spec(write_sweep(BASE), ["models=[ladder:test/xs]"]).models == full.models
    # an override sets a key of a bare entry (it said "models.0 is a value, not a mapping or list")
    assert load_spec(write_sweep({**BASE, "models": ["ladder:test/xs"]}), ["models.0.dtype=bfloat16"]).models[0].dtype == "bfloat16"


def test_a_config_that_cannot_be_read_is_a_clean_error(tmp_path, monkeypatch):
    """Not UTF-8 (an editor's or a shell's UTF-16: bytes ff fe) or not readable (mode 000) was a traceback."""
    from pathlib import Path

    utf16 = tmp_path / "utf16.yaml"
    utf16.write_bytes("sweep: unit\n".encode("utf-16"))
    with pytest.raises(ConfigError, match=r"utf16.yaml: not UTF-8 text \(invalid start byte at byte 0\); save it as UTF-8"):
        load_spec(utf16)
    locked = tmp_path / "locked.yaml"
    locked.write_text("sweep: unit\n")

    def denied(self: Path, *args: object, **kwargs: object) -> str:  # chmod 000 is no bar to root, who runs CI
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match="locked.yaml: cannot read it \\(Permission denied\\)"):
        load_spec(locked)


def test_a_union_fields_error_names_its_key_not_pydantics_type_names(write_sweep):
    """`target_modules=5` gave `methods.lora.target_modules.str: ...` and `....tuple[str, ...]: ...`."""
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep(BASE), ["methods.lora.target_modules=5"])
    message = str(err.value)
    assert "methods.lora.target_modules: Input should be a valid string, or input should be a valid tuple (target_modules:" in message
    assert ".str:" not in message and "tuple[" not in message and len(message.splitlines()) == 2  # the header, one line
    with pytest.raises(ConfigError) as err:  # a list with a bad item: that item's line alone, not "a valid string" too
        load_spec(write_sweep(BASE), ["methods.lora.target_modules=[q_proj, 5]"])
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and lines[1].startswith("methods.lora.target_modules.1: Input should be a valid string (")


@pytest.mark.parametrize("override, message", [
    ("sweep=2025-01-15", "sweep: Input should be a valid string (YAML read it as a date, 2025-01-15: quote it as written to keep it text)"),
    ("sweep=0755", "sweep: Input should be a valid string (YAML read it as a number, 755: quote it as written"),
    ("budgets=[true, 4]", "budgets: [true, 4] holds a boolean where a number is expected"),
    ("seeds=[no]", "seeds: [false] holds a boolean where a number is expected"),
    ("methods.lora.rank=true", "methods.lora.rank: true is a boolean where a number is expected"),
    ("methods.lora.train.lr=on", "methods.lora.train.lr: true is a boolean where a number is expected"),
    ("budgets=32", "budgets: Input should be a valid list (a list of one is written [32])"),
    ("tasks=facts", "tasks: Input should be a valid list (a list of one is written [facts])"),
    ("methods.steer_mean={layers: 0.5}", "methods.steer_mean.layers: Input should be a valid tuple (a list of one is written [0.5])"),
])  # fmt: skip
def test_what_yaml_read_as_another_type_is_refused_with_why(override, message, write_sweep):
    """A date or number where text belongs got no hint to quote it; a boolean where a number belongs passed as 1
    (a budget of 1, a LoRA rank of 1)."""
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep(BASE), [override])
    assert message in str(err.value)


def test_an_error_in_the_file_is_not_blamed_on_an_override_beneath_its_key(write_sweep):
    """`device: cuda` without gpus_per_cell is the file's: `models.0.dtype=bfloat16` changed another key of the entry."""
    cuda = write_sweep({**BASE, "models": [{"id": "ladder:test/xs", "device": "cuda"}]})
    with pytest.raises(ConfigError) as err:
        load_spec(cuda, ["models.0.dtype=bfloat16"])
    assert "device: cuda needs a GPU reserved" in str(err.value) and "[set by" not in str(err.value)
    with pytest.raises(ConfigError) as err:  # an override the error names is still blamed
        load_spec(write_sweep(BASE), ["models.0.device=cuda"])
    assert str(err.value).endswith("[set by the override models.0.device=cuda]")


def test_a_results_dir_that_is_a_file_is_refused(write_sweep, tmp_path):
    """`results_dir=quickstart.yaml` planned an empty sweep there, exit 0."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="results_dir: .*a-file exists and is not a directory"):
        load_spec(write_sweep({**BASE, "results_dir": str(tmp_path / "a-file")}))


@pytest.mark.parametrize("override, message", [
    ("methods.lora.train.lr=.nan", "methods.lora.train.lr: Input should be a finite number"),
    ("models.0.gpus_per_cell=.inf", "models.0.gpus_per_cell: Input should be a finite number"),  # was an OverflowError traceback
    (".eval.test_size=3", "override '.eval.test_size=3': .eval.test_size has an empty key between its dots"),
    ("eval.=3", "override 'eval.=3': eval. has an empty key between its dots"),
    ("methods={base: {}, lora: {rank: 2}, lora: {rank: 8}}", "key 'lora' is given twice in one mapping"),  # kept rank 8 in silence
    ("results_dir=''", "results_dir: String should have at least 1 character"),  # stored into the working directory
    ("methods.lora.train.lr=", "override 'methods.lora.train.lr=': no value after '='"),  # `lr=$LR` with LR unset
    ("seeds=~", "seeds: Input should be a valid list"),  # a null where a value goes is not its default
    ("seeds=&s [0, *s]", "the value is not valid YAML (an alias (*name) is used inside the node its anchor"),  # a RecursionError
    # a minimum the maximum caps: new cell ids, the same work
    ("methods.lora.train={min_steps: 500, max_steps: 150}", "methods.lora.train: min_steps 500 is above max_steps 150, which caps it"),
])  # fmt: skip
def test_values_and_overrides_that_mean_nothing_are_refused(override, message, write_sweep):
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep(BASE), [override])
    assert message in str(err.value)


def test_numbers_with_an_exponent_read_as_numbers(write_sweep, tmp_path):
    """YAML 1.1 reads 1e3 as text (its floats need a dot): an integer field refused it as 'unable to parse string'."""
    spec = load_spec(write_sweep(BASE), ["budgets=[1e1, 16]", "resources.model_cache_bytes=8e9", "methods.lora.train.lr=2E-3"])
    assert spec.budgets == [10, 16] and spec.resources.model_cache_bytes == 8 * 10**9
    assert spec.methods["lora"]["train"]["lr"] == 0.002
    path = tmp_path / "exponents.yaml"
    path.write_text("sweep: unit\nmodels: [ladder:test/xs]\ntasks: [facts]\nmethods: {base: {}}\nbudgets: [1e2, 16]\n"
                    "resources: {model_cache_bytes: 1.5e9}\n")  # fmt: skip
    assert load_spec(path).budgets == [100, 16] and load_spec(path).resources.model_cache_bytes == 1_500_000_000
    assert load_spec(path, ["seeds=[10]"]).seeds == [10]  # an integer stays one


def test_an_alias_inside_its_own_anchor_is_refused_as_yaml(tmp_path):
    """`methods: &m {base: {}, lora: *m}` would be endless: a RecursionError traceback, exit 1."""
    path = tmp_path / "endless.yaml"
    path.write_text("sweep: unit\nmodels: [ladder:test/xs]\ntasks: [facts]\nmethods: &m {base: {}, lora: *m}\nbudgets: [4]\n")
    with pytest.raises(ConfigError, match=r"endless.yaml: not valid YAML: an alias \(\*name\) is used inside the node"):
        load_spec(path)


def test_numbers_with_leading_zeros_are_decimal_and_base_60_is_text(write_sweep):
    """YAML 1.1 reads `032` as octal and `1:30` as base 60: `budgets=[004, 032]` planned budgets 4 and 26, `1:30` a
    budget of 90, `eval.test_size=0100` 64 test questions, all unsaid. YAML 1.2 reads them as 32 and as text."""
    spec = load_spec(write_sweep(BASE), ["budgets=[004, 032, 256]", "eval.test_size=0100", "methods.lora.train.lr=01.5e-3"])
    assert spec.budgets == [4, 32, 256] and spec.eval.test_size == 100 and spec.methods["lora"]["train"]["lr"] == 0.0015
    with pytest.raises(ConfigError, match=r"budgets\.1: Input should be a valid integer"):
        load_spec(write_sweep(BASE), ["budgets=[4, 1:30]"])
    assert load_spec(write_sweep(BASE), ["budgets=[0x10, 1_024]"]).budgets == [16, 1024]  # still numbers, as written


def test_sections_written_with_nothing_under_them_take_their_defaults(tmp_path):
    """`base:` (YAML's null) was 'Input should be a valid dictionary'; an override under a null `eval:` said
    'eval is a value'; an override listing bare ids left the next override no mapping to set."""
    from workers.cell import EvalConfig

    path = tmp_path / "nulls.yaml"
    path.write_text("sweep: unit\nmodels: [ladder:test/xs]\ntasks: [facts]\nmethods:\n  base:\n  lora:\n    train:\n"
                    "budgets: [4, 16]\neval:\nresults_dir:\n")  # fmt: skip
    spec = load_spec(path)
    assert spec.methods == {"base": {}, "lora": {"train": None}} and spec.eval == EvalConfig()
    assert spec.results_dir == "results/unit"
    spec = load_spec(path, ["eval.test_size=5", "models=[ladder:test/s]", "models.0.dtype=bfloat16"])
    assert spec.eval.test_size == 5 and [(m.id, m.dtype) for m in spec.models] == [("ladder:test/s", "bfloat16")]


@pytest.mark.parametrize("override, message", [
    ("test_size=5", "test_size: unknown key (it goes at eval.test_size)"),  # was "did you mean 'results_dir'?"
    ("methods.lora.lr=0.1", "methods.lora.lr: unknown key (it goes at methods.lora.train.lr)"),
    ("models.0.dtype=float32", None),  # a key where it belongs is no error
    ("methods.lora.train={max_steps:40}", "YAML read 'max_steps:40' as one key: write 'max_steps: 40', a space after the colon"),
    ("methods.lora.train=max_steps:40", "YAML read 'max_steps:40' as text: write 'max_steps: 40', a space after the colon"),  # block style
])  # fmt: skip
def test_a_key_of_the_config_written_in_the_wrong_section_says_where_it_goes(override, message, write_sweep):
    if message is None:
        load_spec(write_sweep(BASE), [override])
        return
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep(BASE), [override])
    assert message in str(err.value)


def test_a_composition_part_set_otherwise_than_its_standalone_method_is_named(write_sweep):
    """`methods.lora.rank=8` does not reach steer_mean+lora's LoRA (each method's settings are its own), so the report's
    gain of the composition over lora compared unlike settings, unsaid (helper-169). `plan` and `run` name the keys."""
    from orchestrator.spec import unlike_parts

    like = {**BASE, "methods": {"steer_mean": {}, "lora": {"rank": 2}, "steer_mean+lora": {"second": {"rank": 2}}}}
    assert unlike_parts(load_spec(write_sweep(like))) == []
    (note,) = unlike_parts(load_spec(write_sweep(like), ["methods.lora.rank=8", "methods.lora.train.lr=0.01"]))
    assert note.startswith("methods.steer_mean+lora.second differs from methods.lora (rank: 2 vs 8 in lora; train.lr: ")
    assert "vs 0.01 in lora)" in note
    # the first part too, and a part the sweep does not run alone has nothing to differ from
    (note,) = unlike_parts(load_spec(write_sweep(like), ["methods.steer_mean.layers=[0.5]"]))
    assert note.startswith("methods.steer_mean+lora.first differs from methods.steer_mean (layers: ")
    alone = {**BASE, "methods": {"steer_mean+lora": {"second": {"rank": 8}}}}
    assert unlike_parts(load_spec(write_sweep(alone))) == []
    # A+B+C is A+(B+C): the last part sits at second.second, and is compared with the sweep's own C (helper-170)
    (note,) = unlike_parts(load_spec(write_sweep({**BASE, "methods": {"lora": {"rank": 8}, "steer_mean+prompt+lora": {}}})))
    assert note.startswith("methods.steer_mean+prompt+lora.second.second differs from methods.lora (rank: 4 vs 8 in lora)")
    # a settings block set on one side only is named once, not key by key
    (note,) = unlike_parts(load_spec(write_sweep({**BASE, "methods": {"task_vector": {}, "task_vector+lora": {"first": {"finetune": "lora"}}}})))
    assert "(finetune: 'lora' vs 'full_ft' in task_vector; full_ft: unset vs set in task_vector; lora: set vs unset in task_vector)" in note
