"""Every method runs as a cell on tiny GPT-NeoX and Qwen2 checkpoints loaded like hub models.

The checkpoints are saved to a local directory and loaded by `from_pretrained` through the same
code path as a hub id, with the synthetic world's tokenizer so the registered `facts` task applies.
The tokenizer is re-attached after loading: in transformers 5, AutoTokenizer on a directory whose
config says qwen2 / gpt_neox builds that architecture's BPE tokenizer around the saved vocabulary,
which splits the world's words into characters (a loading issue reported to the lead).
"""

from __future__ import annotations

import pytest
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config, Qwen2ForCausalLM

from workers.cell import CellConfig, EvalConfig, ModelSpec
from workers.models.tokenizer import build_tokenizer
import workers.cache
from workers.cache import WorkerCache
from workers.run_cell import CellRun, run_cell

FAST = {"min_steps": 3, "max_steps": 3, "checkpoints": 1, "batch_size": 8}
METHODS = {
    "base": {},
    "prompt": {"separator": " ; ", "choose_shots": False},  # all that fit: this test needs the prompt to change the model
    "steer_mean": {"layers": [0.5], "scales": [0.0, 1.0]},
    "steer_trained": {"train": FAST},
    "lora": {"rank": 2, "train": FAST},
    "full_ft": {"train": FAST},
    "task_vector": {"full_ft": {"train": FAST}, "lambdas": [0.0, 1.0]},
    "steer_mean+lora": {"first": {"layers": [0.5], "scales": [1.0]}, "second": {"rank": 2, "train": FAST}},
    "lora+steer_mean": {"first": {"rank": 2, "train": FAST}, "second": {"layers": [0.5], "scales": [1.0]}},
    "steer_trained+lora": {"first": {"train": FAST}, "second": {"rank": 2, "train": FAST}},
}


def save_checkpoint(arch: str, path) -> None:
    tok = build_tokenizer()
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if arch == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**ids, **shape))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**ids, **shape, num_key_value_heads=2))
    model.save_pretrained(path)
    tok.save_pretrained(path)


def with_world_tokenizer(load):
    def loader(*args, **kwargs):  # passes through whatever the worker cache's loader is given
        lm = load(*args, **kwargs)
        lm.tokenizer = build_tokenizer()
        return lm

    return loader


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2"])
def test_every_method_runs_as_a_cell_on_a_local_checkpoint(arch, tmp_path, monkeypatch):
    save_checkpoint(arch, tmp_path)
    monkeypatch.setattr(workers.cache, "load_language_model", with_world_tokenizer(workers.cache.load_language_model))
    rows = {}
    run = CellRun(cache=WorkerCache())  # one loaded model serves every cell, as in a worker
    for method, config in METHODS.items():
        cell = CellConfig(
            sweep="local", model=ModelSpec(id=str(tmp_path)), task="facts", method=method, method_config=config,
            budget=8, seed=0, eval=EvalConfig(test_size=10, validation_size=4, neutral_size=2, offtask_size=0, batch_size=16),
        )
        row = run_cell(cell, run)
        assert row["status"] == "ok", row["error"]
        rows[method] = row
    assert rows["base"]["neutral_kl"] == pytest.approx(0.0, abs=1e-7)
    assert rows["prompt"]["neutral_kl"] > 0 and rows["steer_mean+lora"]["neutral_kl"] > 0
    assert rows["steer_trained+lora"]["trainable_params"] == rows["lora"]["trainable_params"] + 32
    assert rows["full_ft"]["trainable_params"] == rows["full_ft"]["params_total"]
