"""A user's own model directories and dataset files, offline: what is wrong with them is said at `plan`, in a line, and
weights saved over a directory are told apart in the rows (helper-174)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchestrator.grid import check_budgets
from orchestrator.spec import load_spec
from workers.config import ConfigError
from workers.models.loading import sampled_weights_sha256

FIXTURES = Path(__file__).parent / "fixtures"
BASE = {"sweep": "own", "tasks": ["facts"], "methods": {"base": {}}, "budgets": [4]}


def _model_dir(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"pytorch_model.bin": b"pickle", "tokenizer.json": b"{}"},
         "holds its weights as pytorch_model.bin only: pickle files, which can run code as they load, so steerscale loads safetensors alone"),
        ({"tokenizer.json": b"{}"}, r"holds no weights \(\*.safetensors\)"),
        ({"model.safetensors": b"weights"}, r"holds no tokenizer \(tokenizer.json, tokenizer_config.json"),
        ({"optimizer.pt": b"pickle", "training_args.bin": b"pickle", "tokenizer.json": b"{}"}, r"holds no weights \(\*.safetensors\)$"),
    ],
)  # fmt: skip
def test_a_model_directory_that_cannot_load_is_refused_at_plan(write_sweep, tmp_path, files, message):
    """Each of these passed plan and run, and failed every cell: the tokenizer's as 'install sentencepiece or tiktoken'."""
    model = _model_dir(tmp_path / "models" / "mine", files)
    with pytest.raises(ConfigError, match=f"models.0.id: {model} {message}"):
        load_spec(write_sweep({**BASE, "models": [{"id": str(model)}]}))


def test_a_model_directory_with_a_sentencepiece_tokenizer_alone_plans(write_sweep, tmp_path):
    model = _model_dir(tmp_path / "sp", {"model.safetensors": b"w", "sentencepiece.bpe.model": b"sp"})
    load_spec(write_sweep({**BASE, "models": [{"id": str(model)}]}))


def test_a_mistyped_model_directory_gets_the_close_name_beside_it(write_sweep, tmp_path, monkeypatch):
    """`models/tiny-mm` (beside `models/tiny-m`) failed as a hub id, with a connection error and no word of the typo. A
    relative id that is no directory is still a hub id (`EleutherAI/pythia-410m` beside a local `EleutherAI/pythia-160m`
    is one), so the hint comes once the hub had none; an absolute path is refused at plan."""
    import workers.run_cell
    from orchestrator.cli import _prepare_locally
    from workers.cell import ModelSpec

    monkeypatch.chdir(tmp_path)
    _model_dir(tmp_path / "models" / "tiny-m", {"model.safetensors": b"w", "tokenizer.json": b"{}"})
    with pytest.raises(ConfigError, match=rf"models.0.id: no model directory at {tmp_path}/models/tiny-mm \(did you mean '{tmp_path}/models/tiny-m'\?\)$"):
        load_spec(write_sweep({**BASE, "models": [{"id": str(tmp_path / "models" / "tiny-mm")}]}))
    load_spec(write_sweep({**BASE, "models": [{"id": "models/tiny-mm"}, {"id": "models/tiny-m"}]}))  # a relative one may be a hub id

    def offline(model, progress):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {model.id}.")

    monkeypatch.setattr(workers.run_cell, "prepare_model", offline)
    with pytest.raises(ConfigError, match=r"model models/tiny-mm cannot be loaded here: OSError: We couldn't connect .* \(no local directory models/tiny-mm either \(did you mean 'models/tiny-m'\?\)\)$"):
        _prepare_locally(ModelSpec(id="models/tiny-mm"), progress=False)
    with pytest.raises(ConfigError, match=r"cannot be loaded here: OSError: We couldn't connect [^(]*$"):
        _prepare_locally(ModelSpec(id="EleutherAI/pythia-70m"), progress=False)  # no directory of a close name: no hint


def test_models_each_alone_in_its_family_are_noted_at_plan(write_sweep, tmp_path):
    """`models/tiny-s` and `models/tiny-m` are families `s` and `m` (the id less its size words): no law over model size
    formed, and nothing said why (helper-174)."""
    from orchestrator.spec import lone_families

    small, medium = (str(_model_dir(tmp_path / "models" / name, {"model.safetensors": b"w", "tokenizer.json": b"{}"})) for name in ("tiny-s", "tiny-m"))
    (note,) = lone_families(load_spec(write_sweep({**BASE, "models": [{"id": small}, {"id": medium}]})))
    assert note.startswith(f"each model is alone in its family ({small}: s; {medium}: m)") and "give each the same `family:`" in note
    named = [{"id": small, "family": "tiny"}, {"id": medium, "family": "tiny"}]
    assert lone_families(load_spec(write_sweep({**BASE, "models": named}))) == []
    assert lone_families(load_spec(write_sweep({**BASE, "models": [{"id": small}]}))) == []  # one model: no law over size asked for
    assert lone_families(load_spec(write_sweep({**BASE, "models": [{"id": "EleutherAI/pythia-70m"}, {"id": "EleutherAI/pythia-160m"}]}))) == []


def test_a_local_model_naming_code_of_its_own_is_noted_unless_its_entry_runs_it(write_sweep, tmp_path):
    """transformers loads a known model_type's own class where the config names other code (auto_map) and remote code is
    off: another model than the directory's, in silence (helper-174)."""
    from orchestrator.spec import own_code_unrun

    model = _model_dir(tmp_path / "mine", {"model.safetensors": b"w", "tokenizer.json": b"{}"})
    assert own_code_unrun(load_spec(write_sweep({**BASE, "models": [{"id": str(model)}]}))) == []
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "modeling_mine.Mine"}}))
    (note,) = own_code_unrun(load_spec(write_sweep({**BASE, "models": [{"id": str(model)}]})))
    assert note == (f"{model}'s config.json names code of its own (auto_map), which runs only with `trust_remote_code: true` on its "
                    "entry: its weights load into transformers' own 'llama' class instead")  # fmt: skip
    assert own_code_unrun(load_spec(write_sweep({**BASE, "models": [{"id": str(model), "trust_remote_code": True}]}))) == []
    (model / "config.json").write_text(json.dumps({"auto_map": {"AutoModelForCausalLM": "modeling_mine.Mine"}}))
    (note,) = own_code_unrun(load_spec(write_sweep({**BASE, "models": [{"id": str(model)}]})))
    assert note.endswith("on its entry: it names no model_type, so without that code it does not load at all")
    (model / "config.json").write_text(json.dumps({"model_type": "mine_custom", "auto_map": {"AutoModelForCausalLM": "modeling_mine.Mine"}}))
    (note,) = own_code_unrun(load_spec(write_sweep({**BASE, "models": [{"id": str(model)}]})))
    assert note.endswith("its model_type 'mine_custom' is none transformers knows, so without that code it does not load at all")


def test_weights_saved_over_a_directory_change_its_digest_and_a_copy_keeps_it(tmp_path):
    header = b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"a": "tensor"} '
    model = _model_dir(tmp_path / "m", {"model.safetensors": header + bytes(range(256)) * 9000, "tokenizer.json": b"{}"})
    before = sampled_weights_sha256(str(model))
    copy = shutil.copytree(model, tmp_path / "copy")
    assert sampled_weights_sha256(str(copy)) == before  # from the contents: another node's copy is the same model
    (model / "model.safetensors").write_bytes(header + bytes(reversed(range(256))) * 9000)  # same size and header, new values
    assert sampled_weights_sha256(str(model)) != before


@pytest.mark.parametrize(
    ("train", "validation", "message"),
    [
        (None, "dev.jsonl", r"{data} holds no validation.jsonl \(found: dev.jsonl, train.jsonl\); a local copy of a hub dataset holds one"),
        (("sentence", "text"), "validation.jsonl", r"{data}/train.jsonl has no column 'sentence' \(its columns: idx, text, label\); the task reads sentence, label$"),
        (("label", "sentiment"), "validation.jsonl", r"{data}/train.jsonl has no column 'label' \(its columns: idx, sentence, sentiment\)"),
        ("{oops", "validation.jsonl", r"DatasetGenerationError: .* \(ArrowInvalid: JSON parse error"),
        (None, "validation.jsonl", None),
    ],
)  # fmt: skip
def test_a_local_dataset_that_cannot_be_read_is_refused_at_plan_in_a_line(tmp_path, monkeypatch, write_sweep, train, validation, message):
    """dev.jsonl for validation.jsonl: a 59-line traceback out of `plan`; a line not JSON another; a column missing, a
    bare `'sentence'` (the text's) or none at plan and `KeyError: 'label'` in every cell (any other's). (Rows are cached per process by path: each case its own folder.)"""
    from workers.tasks import TASKS
    from workers.tasks.hub import HubSource
    from workers.tasks.sst2 import SST2

    data = tmp_path / "sst2"
    data.mkdir()
    rows = (FIXTURES / "sst2" / "train.jsonl").read_text()
    (data / "train.jsonl").write_text(rows if train is None else train + "\n" if isinstance(train, str) else rows.replace(f'"{train[0]}"', f'"{train[1]}"'))
    shutil.copy(FIXTURES / "sst2" / "validation.jsonl", data / validation)
    monkeypatch.setitem(TASKS._items, "sst2", SST2(HubSource(str(data))))
    spec = load_spec(write_sweep({**BASE, "tasks": ["sst2"], "models": [{"id": "EleutherAI/pythia-70m"}]}))
    if message is None:
        check_budgets(spec)  # the files as they should be: planned
        return
    with pytest.raises(ConfigError, match="task sst2: its data cannot be read: " + message.replace("{data}", str(data))):
        check_budgets(spec)
