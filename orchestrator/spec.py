"""The sweep YAML as a validated, frozen spec; `key.sub=value` command-line overrides.

Validation happens twice on purpose: the spec's own shape here, and each method's settings by that
method's config class (`workers.methods.resolve_config`), so a typo in `methods.lora.rnak` is
reported with its full path and the nearest valid key before anything runs.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from urllib.parse import quote
from pathlib import Path
from typing import Any, ClassVar, Sequence

import yaml
from pydantic import Field, field_validator, model_validator

from workers.cell import LADDER_PREFIX, EvalConfig, ModelSpec
from workers.config import ConfigError, StrictConfig, validate_config
from workers.methods import get_method, reads_examples, resolve_config
from workers.registry import UnknownNameError, did_you_mean
from workers.tasks import get_task, reads_hub_data


# Where GPUs and CPUs are set, for the keys written where the other is (`resources.gpus_per_cell` is
# one letter from cpus_per_cell, but no "did you mean" should send a GPU setting there).
GPUS_PER_MODEL = "GPUs are reserved per model: set models.N.gpus_per_cell"
CPUS_FOR_EVERY_CELL = "CPUs are set for every cell at once: resources.cpus_per_cell"


class ModelEntry(ModelSpec):
    """A model of the sweep: what to load, plus how many GPUs each of its cells reserves."""

    misplaced_keys: ClassVar[dict[str, str]] = {
        "gpus": "a model's cells reserve GPUs with gpus_per_cell", "cpus_per_cell": CPUS_FOR_EVERY_CELL
    }  # fmt: skip

    gpus_per_cell: float = Field(
        0.0, ge=0, description="0 runs on CPU (GPUs hidden from the cell); fractional packs small models on one GPU; >1 shards"
    )

    @model_validator(mode="before")
    @classmethod
    def from_bare_id(cls, data: Any) -> Any:
        """`models: [ladder:xs, ladder:s]` is shorthand for `[{id: ladder:xs}, {id: ladder:s}]`: the same entries."""
        return {"id": data} if isinstance(data, str) else data

    @field_validator("gpus_per_cell")
    @classmethod
    def _whole_gpus_above_one(cls, gpus: float) -> float:
        if gpus > 1 and gpus != int(gpus):  # Ray refuses it when the first worker is asked for, mid-run
            raise ValueError(f"{gpus:g} GPUs: above 1, a cell reserves whole GPUs (its model is sharded over them); use {math.ceil(gpus)}")
        return gpus

    @model_validator(mode="after")
    def _gpus_match_the_device(self) -> "ModelEntry":
        if self.device == "cuda" and self.gpus_per_cell == 0:
            raise ValueError("device: cuda needs a GPU reserved for each cell: set gpus_per_cell (1, or 0.25 to pack four "
                             "cells on a GPU), or device: cpu")  # fmt: skip
        if self.device == "cpu" and self.gpus_per_cell > 0:  # the GPUs would sit idle (or, above 1, take the sharded model)
            raise ValueError(f"device: cpu runs on CPUs, but gpus_per_cell {self.gpus_per_cell:g} reserves GPUs for each cell: "
                             "set gpus_per_cell: 0, or device: cuda (or auto)")  # fmt: skip
        return self


class Resources(StrictConfig):
    misplaced_keys: ClassVar[dict[str, str]] = {"gpus_per_cell": GPUS_PER_MODEL, "gpus": GPUS_PER_MODEL}

    cpus_per_cell: float = Field(1.0, gt=0, description="also the torch thread count inside the cell")
    max_retries: int = Field(1, ge=0, description="re-runs of a cell whose worker process died")
    model_cache_bytes: int | None = Field(
        None,
        ge=0,
        description="base models a worker keeps loaded between cells (least recently used evicted); "
        "default: half of the worker's share of its GPUs' memory, or of RAM on CPU-only workers (a GPU worker's "
        "host memory — neutral references, CPU-placed models — has a budget apart: half its RAM share, at least this one)",
    )
    max_workers: int | None = Field(
        None,
        ge=1,
        description="workers to ask for, whether or not the nodes up now can hold them: on an autoscaling "
        "cluster the ones waiting are what makes it add nodes; default: as many as the live nodes hold",
    )
    cell_timeout_s: float | None = Field(
        None,
        gt=0,
        description="a cell still running after this long (a hang: a collective that never returns, an "
        "environment that never ends) has its worker stopped and is stored failed with a TimeoutError; "
        "default: no limit; counted from the cell's hand-out to its worker, a model load included. Not retried: "
        "`run --retry-failed` runs it again",
    )
    start_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="how long cells wait for a first worker of their shape to start (an autoscaler adding "
        "a node) before the run stops; what finished is stored and a rerun resumes",
    )


class SweepSpec(StrictConfig):
    misplaced_keys: ClassVar[dict[str, str]] = {
        "gpus_per_cell": GPUS_PER_MODEL, "gpus": GPUS_PER_MODEL, "cpus_per_cell": CPUS_FOR_EVERY_CELL
    }  # fmt: skip

    sweep: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="the sweep's name: letters, digits, '_', '.', '-' (no spaces), starting with a letter or digit; "
        "the default results_dir is results/<sweep>",
    )
    results_dir: str = Field(min_length=1, description="local directory or URI (file://, s3://, gs://); default results/<sweep>")
    models: list[ModelEntry] = Field(min_length=1)
    tasks: list[str] = Field(min_length=1)
    methods: dict[str, dict[str, Any]] = Field(min_length=1, description="method name -> that method's settings")

    @field_validator("methods", mode="before")
    @classmethod
    def _no_settings_is_defaults(cls, methods: Any) -> Any:
        """`base:` with nothing under it (YAML's null) is `base: {}`: the method at its defaults."""
        return {name: {} if settings is None else settings for name, settings in methods.items()} if isinstance(methods, dict) else methods
    budgets: list[int] = Field(min_length=1, description="post-training examples per cell")
    method_budgets: dict[str, list[int]] = Field(
        default_factory=dict, description="per-method budgets, in place of `budgets`; a method that reads no examples (base) has [0] unless given"
    )
    seeds: list[int] = Field([0], min_length=1)
    eval: EvalConfig = EvalConfig()
    resources: Resources = Resources()

    @field_validator("results_dir")
    @classmethod
    def _a_path_or_a_uri(cls, results_dir: str) -> str:
        """`~` is the home directory (YAML does not expand it); `file:/x` is a URI missing its `//`,
        which pyarrow would take for a directory named `file:` under the current one."""
        scheme, colon, rest = results_dir.partition(":")
        if colon and len(scheme) > 1 and scheme.replace("+", "").isalnum() and not rest.startswith("//"):
            raise ValueError(f"{results_dir} looks like a URI without '//' after '{scheme}:'; write {scheme}://...")
        if "://" in results_dir and quote(results_dir, safe=URI_SAFE) != results_dir:
            raise ValueError(f"{results_dir} is a URI with characters a URI cannot hold (spaces, non-ASCII); "
                             f"percent-encode them: {quote(results_dir, safe=URI_SAFE)}")  # fmt: skip
        return os.path.expanduser(results_dir)

    @field_validator("seeds")
    @classmethod
    def _seedable(cls, seeds: list[int]) -> list[int]:
        # numpy's generators take 0 ≤ seed < 2^32: outside it, every cell of the seed failed at run time
        if any(not 0 <= s < 2**32 for s in seeds):
            raise ValueError("seeds must be between 0 and 2**32 - 1")
        return seeds

    @field_validator("budgets")
    @classmethod
    def _non_negative(cls, budgets: list[int]) -> list[int]:
        if any(b < 0 for b in budgets):
            raise ValueError("budgets must be >= 0")
        return budgets

    @field_validator("method_budgets")
    @classmethod
    def _non_negative_per_method(cls, budgets: dict[str, list[int]]) -> dict[str, list[int]]:
        for method, values in budgets.items():
            if not values or any(b < 0 for b in values):
                raise ValueError(f"method_budgets.{method} must list budgets >= 0")
        return budgets

    def budgets_for(self, method: str) -> list[int]:
        """The method's own budgets where given; else the sweep's, or [0] for a method that reads no examples
        (`base`: its cells at 4 and at 1,024 examples would compute the same thing twice)."""
        if method in self.method_budgets:
            return self.method_budgets[method]
        return self.budgets if reads_examples(method) else [0]


def check_names(spec: SweepSpec, *, models: bool = True) -> None:
    """Every task and method name known and every method's settings valid, all reported at once; with
    `models`, also no hub task and no natural neutral text (real text) in a sweep with ladder rungs, whose tokenizer
    reads it as <unk>.

    `models`: also that every model can be found from here (ladder names, local directories); off
    for commands that only read a sweep's results, which may be read away from the cluster's disks.
    """
    problems = []
    rungs = [m.id for m in spec.models if m.id.startswith(LADDER_PREFIX)]
    for i, task in enumerate(spec.tasks):
        try:
            found = get_task(task)
        except UnknownNameError as err:
            problems.append(f"tasks.{i}: {err}")
            continue
        if models and rungs and reads_hub_data(found):  # reading stored results needs no refusal
            problems.append(f"tasks.{i}: {task} is real text, and the ladder's tokenizer knows the synthetic world's words only "
                            f"({', '.join(rungs)} would read it as <unk> and tie on every choice); run it on hub or local models, "
                            "in a sweep of their own")  # fmt: skip
    if models and rungs and spec.eval.neutral_source and spec.eval.neutral_size:
        problems.append(f"eval.neutral_source: {spec.eval.neutral_source.dataset} is real text, and the ladder's tokenizer knows the "
                        f"synthetic world's words only ({', '.join(rungs)} would read it as <unk>); leave it unset for the ladder")  # fmt: skip
    for name, settings in spec.methods.items():
        try:
            resolve_config(name, settings, f"methods.{name}")
            problems += [f"methods.{name}: {wrong}" for wrong in sides_misread(name)]
        except UnknownNameError as err:
            problems.append(f"methods.{name}: {err}")
        except ConfigError as err:
            problems.append(str(err))
    problems += [
        f"method_budgets.{name}: not one of the sweep's methods{did_you_mean(name, list(spec.methods))} ({', '.join(spec.methods)})"
        for name in spec.method_budgets
        if name not in spec.methods
    ]
    if models:
        found = list(map(model_problem, spec.models))
        problems += [f"models.{i}.id: {err}" for i, err in enumerate(found) if err]
        problems += [f"models.{i}.revision: {err}" for i, (entry, problem) in enumerate(zip(spec.models, found))
                     if not problem and (err := ladder_revision_problem(entry))]  # fmt: skip
    lists = {"tasks": spec.tasks, "budgets": spec.budgets, "seeds": spec.seeds,
             **{f"method_budgets.{name}": values for name, values in spec.method_budgets.items()}}  # fmt: skip
    problems += [f"{name}.{i}: {values[i]} is listed twice (also {name}.{j})" for name, values in lists.items() for i, j in repeated(values)]
    model_keys = [m.model_dump_json(exclude={"gpus_per_cell"}) for m in spec.models]  # a scheduling field: not the cell's
    problems += [f"models.{i}: {spec.models[i].id} is listed twice with the same settings (also models.{j})" for i, j in repeated(model_keys)]
    # Entries of one id that differ in what they compute (revision, dtype; placement alone is grid.py's to refuse):
    # rows name a model by its id, so their fits would pool the two as one model's seeds.
    # Where models are checked, a ladder rung's revision can only be its recipe's hash (any other is refused above), so
    # it is not a setting here: the same rung with and without it is one model listed twice, grid.check_unique's to
    # refuse with the right advice. (Unchecked, two revisions of one id are two settings.)
    computed = [(m.id, m.model_dump_json(exclude={"gpus_per_cell", "device", *(["revision"] if models and m.id.startswith(LADDER_PREFIX) else [])}))
                for m in spec.models]  # fmt: skip
    problems += [
        f"models.{i}: {model_id} is listed again (also models.{[m for m, _ in computed].index(model_id)}) with other settings: rows "
        "name a model by its id, so a fit would pool the two as one model's seeds; give each its own sweep (results_dir)"
        for i, (model_id, key) in enumerate(computed)
        if any(m == model_id and k != key for m, k in computed[:i]) and key not in [k for _, k in computed[:i]]
    ]  # fmt: skip
    if problems:
        raise ConfigError("\n".join(problems))


def sides_misread(name: str) -> list[str]:
    """Where a method (a composition: a part) declares another side of the study than the analysis reads off its name
    (`analysis.methods.method_kind`, which imports no workers): a steering method named `caa_fixed` would pair with
    fine-tuning in every crossover, and none would be drawn between it and the steering side (helper-172)."""
    from analysis.methods import REFERENCE_METHODS, method_kind  # imported here: analysis' package loads pandas

    parts = [get_method(part) for part in name.split("+")]
    return [
        f"{part.name} declares itself {part.kind}, but the analysis reads a method's side from its name alone ('steer' in it: "
        f"steering; {', '.join(REFERENCE_METHODS)}: reference; any other: fine-tuning) and would put it with {method_kind(part.name)}; "
        "rename it so that its name says its side"
        for part in parts
        if part.kind != method_kind(part.name)
    ]


def lone_families(spec: SweepSpec) -> list[str]:
    """Where every model of the sweep is alone in its family: laws over parameters are fitted within a family (sizes
    of two families do not compare), so none forms, and `fit` had nothing to say why. A family is read off a model's
    id less its size words: local `models/tiny-s` and `models/tiny-m` were families `s` and `m` (helper-174)."""
    models = {model.id: model for model in spec.models}
    families = {model.family_name for model in models.values()}
    if len(models) < 2 or len(families) < len(models):
        return []
    named = "; ".join(f"{model_id}: {model.family_name}" for model_id, model in models.items())
    return [f"each model is alone in its family ({named}), and laws over parameters (fit's default --x params) are "
            "fitted within a family: no law over model size will form. If they are one family trained alike at different "
            "sizes, give each the same `family:` (models.N.family)"]  # fmt: skip


def own_code_unrun(spec: SweepSpec) -> list[str]:
    """Local model directories whose config.json names code of their own (`auto_map`) while their entry does not ask to
    run it: transformers loads the weights into its own class for the `model_type` (where it has one), not theirs,
    and said nothing (helper-174). A checkpoint whose code transformers since took in (Phi-3's) means that; a model
    whose code differs does not, so it is said, not refused."""
    notes = []
    for model in {m.id: m for m in spec.models if not m.trust_remote_code}.values():
        config = Path(model.id) / "config.json"
        if not config.is_file():
            continue
        try:
            read = json.loads(config.read_text())
        except (OSError, ValueError):
            continue  # the load says what is wrong with the file
        if isinstance(read, dict) and read.get("auto_map"):
            model_type = read.get("model_type")
            instead = (f"its weights load into transformers' own {model_type!r} class instead" if _known_model_type(model_type)
                       else f"its model_type {model_type!r} is none transformers knows, so without that code it does not load at all"
                       if model_type else "it names no model_type, so without that code it does not load at all")  # fmt: skip
            notes.append(f"{model.id}'s config.json names code of its own (auto_map), which runs only with `trust_remote_code: "
                         f"true` on its entry: {instead}")  # fmt: skip
    return notes


def _known_model_type(model_type: object) -> bool:
    """Whether transformers has a class of its own for `model_type` (imported here, and only for a config naming code)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES


def unlike_parts(spec: SweepSpec) -> list[str]:
    """Where a composition's part is set otherwise than the sweep's standalone method of that name: its gain over
    that method (the report's composition table) is then not like for like. An override of the standalone
    (`methods.lora.rank=8`) does not reach the part (`_unshared`), and nothing said so (helper-169). `A+B+C` is
    `A+(B+C)`: its parts sit at `first`, `second.first` and `second.second`."""
    notes = []
    for name, raw in spec.methods.items():
        parts = name.split("+")
        if len(parts) < 2:
            continue
        config = resolve_config(name, raw).model_dump(mode="json")
        for i, part in enumerate(parts):
            if part not in spec.methods:
                continue
            slots = ["second"] * i + (["first"] if i < len(parts) - 1 else [])
            inside = config
            for slot in slots:
                inside = inside[slot]
            alone = resolve_config(part, spec.methods[part]).model_dump(mode="json")
            differ = _differences(_flat(inside), _flat(alone), part)
            if differ:
                notes.append(f"methods.{name}.{'.'.join(slots)} differs from methods.{part} ({'; '.join(differ)}), so the "
                             f"composition's gain over {part} compares unlike settings; give both the same settings, unless that is meant")  # fmt: skip
    return notes


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}; a block left unset (None) stays one key."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _differences(inside: dict[str, Any], alone: dict[str, Any], part: str) -> list[str]:
    """The keys where a part's flat settings differ from its standalone method's; a block set on one side and unset on
    the other (task_vector's `lora` once `finetune: lora`) is named once, not key by key."""
    shown = lambda value: f"{value:g}" if isinstance(value, float) else repr(value)  # noqa: E731 - 3e-4, not 0.0003 beside 1e-05
    found: dict[str, str] = {}
    for key in [*alone, *(k for k in inside if k not in alone)]:
        here, there = inside.get(key, _UNSET), alone.get(key, _UNSET)
        if here == there:
            continue
        if here is _UNSET or there is _UNSET:
            prefixes = [".".join(key.split(".")[:n]) for n in range(1, key.count(".") + 2)]
            block = next(p for p in prefixes if p in inside or p in alone)
            found.setdefault(block, f"{block}: {_set_or_not(inside, block)} vs {_set_or_not(alone, block)} in {part}")
        else:
            found[key] = f"{key}: {shown(here)} vs {shown(there)} in {part}"
    return list(found.values())


_UNSET = object()


def _set_or_not(flat: dict[str, Any], block: str) -> str:
    return "set" if flat.get(block) is not None or any(key.startswith(f"{block}.") for key in flat) else "unset"


def model_problem(entry: ModelEntry) -> str | None:
    """Why the sweep cannot load `entry`, when that is knowable before any worker tries (ladder names, local paths)."""
    if entry.id.startswith(LADDER_PREFIX):
        import workers.models.ladder as ladder  # imported here: a hub-only sweep needs no ladder code

        try:
            ladder.check_model_id(entry.id)
        except UnknownNameError as err:
            return str(err)
    elif entry.id.startswith("~"):
        return f"{entry.id}: '~' is not expanded when a model loads; write the directory's absolute path"
    elif entry.id.startswith((".", "/")) or Path(entry.id).exists():  # a local directory (loading prefers one to a hub id)
        path = Path(entry.id)
        if not path.is_dir():
            return f"no model directory at {entry.id}{sibling_hint(path)}"
        return local_model_problem(path)
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def local_model_problem(path: Path) -> str | None:
    """What keeps a saved model directory from loading, said before any cell (each cell failed with its own
    traceback: a missing tokenizer as 'install sentencepiece or tiktoken'; helper-174)."""
    if not (path / "config.json").is_file():
        return f"{path} holds no config.json, so it is not a saved model (`save_pretrained` writes one)"
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if re.fullmatch(r"(pytorch_model|model|consolidated)[^/]*\.(bin|pt|pth|ckpt)", p.name))
        if pickled:
            return (f"{path} holds its weights as {', '.join(pickled)} only: pickle files, which can run code as they load, so "
                    "steerscale loads safetensors alone; convert them once, where you trust them: "
                    "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)` writes model.safetensors")  # fmt: skip
        return f"{path} holds no weights (*.safetensors)"
    if not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.model")) and not any(path.glob("*.tiktoken")):
        return f"{path} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): save it beside the model, `tokenizer.save_pretrained(dir)`"
    return None


def sibling_hint(path: Path, *, directories: bool = True) -> str:
    """' (did you mean <sibling>?)' where the directory above `path` exists and holds a directory (or, without
    `directories`, a file) of a close name; else ''."""
    parent = path.parent
    if str(parent) in ("", ".") or not parent.is_dir():
        return ""
    if directories:
        close = did_you_mean(path.name, [p.name for p in parent.iterdir() if p.is_dir()])
    else:  # files by their stems, of the same kind: `.yaml` alone made `full.yaml` "close" to `quickstart.yaml`
        stems = {p.stem: p.name for p in parent.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml")}
        found = difflib.get_close_matches(path.stem, sorted(stems), n=1, cutoff=0.5)  # did_you_mean's rule, on the stems
        close = f" (did you mean '{stems[found[0]]}'?)" if found else ""
    return close.replace("'", "'" + str(parent) + "/", 1) if close else ""


def no_such_config(path: str | Path) -> ConfigError:
    """A sweep YAML that is not there, with the file of a close name beside it (`configs/quickstrat.yaml`)."""
    return ConfigError(f"{path}: no such sweep config{sibling_hint(Path(path), directories=False)}")


def ladder_revision_problem(entry: ModelEntry) -> str | None:
    """A ladder rung's revision is the hash of the recipe it pins (`plan` fills it in): any other value
    could never load, and re-planning would not change it."""
    if not entry.id.startswith(LADDER_PREFIX) or entry.revision is None:
        return None
    import workers.models.ladder as ladder

    current = ladder.recipe_hash(ladder.parse_ladder_id(entry.id)[0])
    if entry.revision == current:
        return None
    return (f"{entry.revision} is not the hash of {entry.id}'s recipe ({current}); a ladder rung's revision pins "
            "its recipe's hash: leave it out to use the recipe as it is")  # fmt: skip


def repeated(values: list) -> list[tuple[int, int]]:
    """(index, index of its first listing) of each value that equals an earlier one (such a sweep would plan the same
    cell twice)."""
    return [(i, values.index(value)) for i, value in enumerate(values) if value in values[:i]]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` paths in a nested dict (values parsed as YAML: 3, 1e-3, [1, 2], true)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{override}' is not of the form key.sub=value")
        if not raw.strip():  # `lr=$LR` with LR unset: a default in its place would run a sweep nobody asked for
            raise ConfigError(f"override '{override}': no value after '='")
        parts = key.split(".")
        if "" in parts:
            raise ConfigError(f"override '{override}': {key} has an empty key between its dots; write key.sub=value")
        try:
            value = _plain(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{override}': the value is not valid YAML ({getattr(err, 'problem', None) or err})") from None
        node: Any = data
        for depth, part in enumerate(parts):
            path = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override '{override}': {path} is not an index of a list of {len(node)}")
                index: int | str = int(part)
            elif isinstance(node, dict):
                index = part
            else:
                raise ConfigError(f"override '{override}': {'.'.join(parts[:depth])} is a value, not a mapping or list")
            if depth == len(parts) - 1:
                node[index] = value
            else:
                if isinstance(node, dict) and node.get(index) is None:  # absent, or written with nothing under it
                    if depth == 1 and parts[0] == "methods" and node and index not in node:  # a sweep with none: overrides choose them
                        raise ConfigError(_adds_a_method(override, path, node))
                    node[index] = {}
                node = node[index]
    return data


def _adds_a_method(override: str, path: str, methods: dict[str, Any]) -> str:
    """`methods.full_ft.train.lr=0.1` on a sweep without full_ft would add the method, cells and all, unsaid:
    more likely a slip (the wrong method named) than a wish, which `methods.full_ft={...}` states."""
    name = path.split(".", 1)[1]
    try:
        get_method(name)
    except UnknownNameError:  # no method by that name at all: "to add it" led to "unknown method" (helper-169)
        addable = ""
    else:
        addable = f"; to add it, give it whole: {path}={{}} for its defaults, or {path}={{key: value}}"
    return f"override '{override}': {path} is not a method of this sweep{did_you_mean(name, set(methods))} (its methods: {', '.join(methods)}){addable}"


def _unshared(node: object) -> object:
    """`node` with every mapping and list its own: YAML's anchors and merge keys (`second: {<<: *lora, rank: 8}`) give
    two places one object, and an override of one (`methods.lora.train.lr=0.01`) changed the other's cells too.
    (`copy.deepcopy` keeps the sharing.)"""
    if isinstance(node, dict):
        return {key: _unshared(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_unshared(value) for value in node]
    return node


def _plain(text: str) -> Any:
    """YAML text as plain data: read by `UniqueKeyLoader`, every mapping and list its own (`_unshared`). An alias
    inside the node it names (`seeds: &s [0, *s]`) would be endless: a RecursionError's traceback, now a YAML error."""
    try:
        return _unshared(yaml.load(text, Loader=UniqueKeyLoader))
    except RecursionError:
        raise yaml.YAMLError("an alias (*name) is used inside the node its anchor (&name) marks, which would never end") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, refusing a key given twice in one mapping, and reading numbers as YAML 1.2 does.

    PyYAML keeps the last of two equal keys without a word, so a second `lora:` under `methods`
    (or a second `budgets:`) would silently replace the first. And it follows YAML 1.1, whose floats
    need a dot: `1e3` and `8e9` were text, which an integer field refused ("unable to parse string
    as an integer"); whose `032` is octal (26) and `1:30` base 60 (90), so `budgets: [004, 032]` ran
    budgets 4 and 26 unsaid. Here `1e3` is a number, `032` is 32, and `1:30` is text (which a number field refuses).
    """

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int | str:
        text = self.construct_scalar(node).replace("_", "")
        if ":" in text:
            return self.construct_scalar(node)
        digits = text.lstrip("+-")
        if len(digits) > 1 and digits[0] == "0" and digits.isdigit():  # YAML 1.2: decimal, leading zeros and all
            return int(text, 10)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float | str:
        return self.construct_scalar(node) if ":" in self.construct_scalar(node) else super().construct_yaml_float(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str) and key in lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice in one mapping (lines {lines[key]} and {line}); keep one",
                    key_node.start_mark,
                )  # fmt: skip
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", UniqueKeyLoader.construct_yaml_int)
UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", UniqueKeyLoader.construct_yaml_float)
UniqueKeyLoader.add_implicit_resolver(  # after the int and 1.1 float resolvers: `10` stays an int, `1.5` as it was
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]{1,3}$"), list("-+.0123456789")
)


def _bare_ids_as_entries(data: dict[str, Any]) -> None:
    """`models: [ladder:xs]` as `[{id: ladder:xs}]`, so that an override `models.0.gpus_per_cell=1` has a mapping to set."""
    if isinstance(data.get("models"), list):
        data["models"] = [ModelEntry.from_bare_id(entry) for entry in data["models"]]


def load_spec(path: str | Path, overrides: list[str] = (), *, check_models: bool = True) -> SweepSpec:
    """Read a sweep YAML (safe_load only), apply overrides, validate (models too unless `check_models` is off)."""
    path = Path(path)
    if not path.exists():
        raise no_such_config(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a directory; give a sweep config (a YAML file)")
    try:
        text = path.read_text(encoding="utf-8")  # YAML's own encoding, whatever the locale's
    except UnicodeDecodeError as err:  # e.g. saved as UTF-16 (bytes ff fe) by an editor or a shell's `>`
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    except OSError as err:  # permission denied, an unreadable network mount
        raise ConfigError(f"{path}: cannot read it ({err.strerror or err})") from None
    try:
        data = _plain(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for override in overrides:  # one at a time: an override may itself list bare ids (`models=[ladder:xs]`)
        _bare_ids_as_entries(data)
        apply_overrides(data, [override])
    _bare_ids_as_entries(data)
    if data.get("results_dir") is None:  # left out, or written with nothing after it
        data["results_dir"] = f"results/{data.get('sweep', '<sweep>')}"  # without a sweep, that one error says it
    try:
        try:
            spec = validate_config(SweepSpec, data)
        except ConfigError as err:  # the methods' own keys are checked after the sweep's: said in the same message
            said = str(err).splitlines()
            keys = {line.split(":")[0] for line in said}  # a method the sweep's own check named already is not named twice
            more = [line for line in _method_problems(data.get("methods"))
                    if not any(key == said_key or key.startswith(said_key + ".") for said_key in keys for key in [line.split(":")[0]])]  # fmt: skip
            raise ConfigError("\n".join([*said, *more])) from None
        check_names(spec, models=check_models)
        check_results_dir(spec.results_dir, os.getcwd())
    except ConfigError as err:
        raise in_config(err, path, overrides) from None
    return spec


def _method_problems(methods: object) -> list[str]:
    """Each method config's problems where the sweep's own fields failed validation, so that a typo in `eval` and one in
    `methods.lora` come in one message, not one after the other's fix (helper-179)."""
    problems = []
    for name, settings in methods.items() if isinstance(methods, dict) else ():
        try:
            resolve_config(name, {} if settings is None else settings, f"methods.{name}")
        except UnknownNameError as err:
            problems.append(f"methods.{name}: {err}")
        except (ConfigError, TypeError, ValueError) as err:
            problems.extend(str(err).splitlines())
    return problems


def in_config(err: ConfigError, path: str | Path, overrides: Sequence[str]) -> ConfigError:
    """`err` placed: the config file, the overrides given, and on each line the override that set its key."""
    given = f" with {' '.join(overrides)}" if overrides else ""
    lines = [_with_override(line, list(overrides)) for line in str(err).splitlines()]
    return ConfigError(f"{path}{given}:\n" + "\n".join(lines))


def _with_override(line: str, overrides: list[str]) -> str:
    """An error line naming the override that set its key: the YAML file does not hold that value.

    A line about a value listed twice names both places (`models.1: ... (also models.0)`): either may be the override's.

    An override at or above the line's key set it. One below it (a line about a whole entry or section)
    is blamed only when the line names the key it set: `models.0: device: cuda needs ... gpus_per_cell`
    is the file's, not `models.0.dtype=...`'s; `methods.lora.train: ... max_steps is 1` is `...max_steps=1`'s.
    """
    where = line.partition(":")[0].split(" ")[0]  # "methods.lora on ladder:xs: ..." is about methods.lora
    also = re.findall(r"\(also ([\w.]+)\)", line)
    for override in overrides:
        key = override.partition("=")[0]
        named = next((part for part in reversed(key.split(".")) if not part.isdigit()), key)
        below = key.startswith(where + ".") and re.search(rf"\b{re.escape(named)}\b", line[len(where):]) is not None
        # a repeat is of a whole entry: an override inside either listing (`models.0.id=...`) set it too
        inside = bool(also) and any(key.startswith(place + ".") for place in [where, *also])
        if below or inside or any(place == key or place.startswith(key + ".") for place in [where, *also]):
            return f"{line} [set by the override {override}]"
    return line


URI_SAFE = "/:?&=%@+,;~!$'()*[]#"  # characters a URI may hold as they are (RFC 3986, with '%' for escapes)
RAY_JOB_COPY = "/runtime_resources/working_dir_files/"  # where `ray job submit --working-dir` unpacks the job's files


def check_results_dir(results_dir: str, cwd: str) -> None:
    """Refuse a local results_dir that is a file (nothing could be stored in it; `plan` would show an
    empty sweep), and a relative one in a Ray job: it would resolve inside Ray's temporary copy of
    the working dir, which Ray deletes, and which a resubmission after any edit gets afresh (the
    sweep would start over, its earlier rows out of sight)."""
    local = os.path.join(cwd, results_dir) if "://" not in results_dir else None
    if local is not None and os.path.exists(local) and not os.path.isdir(local):
        raise ConfigError(f"results_dir: {results_dir} exists and is not a directory; give the sweep's own folder "
                          "(default results/<sweep>)")  # fmt: skip
    if RAY_JOB_COPY in cwd and "://" not in results_dir and not os.path.isabs(results_dir):
        raise ConfigError(
            f"results_dir: {results_dir} is relative, and this runs as a Ray job in Ray's temporary copy of the "
            f"working dir ({cwd}), where rows would be lost; give a URI (results_dir=s3://bucket/...) or an absolute "
            "path on storage every node and you can reach"
        )


__all__ = ["ConfigError", "ModelEntry", "Resources", "SweepSpec", "apply_overrides", "check_names", "check_results_dir", "load_spec"]
