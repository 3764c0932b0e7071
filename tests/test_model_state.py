"""The after-cell check that a method left the model as it found it (workers/model_state.py) has no false alarms on
the methods and architectures steerscale supports, and sees what a leak changes (tests/test_run_cell.py: the cell)."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest_methods import _DECODER, _IDS, ARCHITECTURES, VARIANTS, ToyTask, fit_context, language_model, tokenizer
from workers.lm import LanguageModel
from workers.methods import get_method, resolve_config
from workers.model_state import changes, model_state

FAST = {"min_steps": 4, "max_steps": 4, "batch_size": 8, "checkpoints": 0}
CONFIGS = {
    "prompt": {"separator": " ; "},
    "steer_mean": {"layers": [0.5], "scales": [0.0, 2.0]},
    "lora": {"rank": 2, "train": {**FAST, "lr": 0.01}},
    "full_ft": {"train": {**FAST, "lr": 0.01}},
    "task_vector+lora": {"first": {"finetune": "lora", "lora": {"rank": 2, "train": {**FAST, "lr": 0.01}}, "lambdas": [1.0]},
                         "second": {"rank": 2, "train": {**FAST, "lr": 0.01}}},  # fmt: skip
}


@pytest.mark.parametrize("arch", [*ARCHITECTURES, *VARIANTS])
def test_scoring_generating_and_every_kind_of_method_leave_no_change_the_check_would_see(arch):
    lm = language_model(arch)
    task, test = ToyTask(), ToyTask().examples("test", 8, 0)
    as_loaded = model_state(lm)
    task.evaluate(lm, test)
    lm.generate(["q: a1 b2 ="] * 3, 4)
    assert changes(as_loaded, model_state(lm)) == []
    for method, config in CONFIGS.items():
        adapter = get_method(method).fit(fit_context(lm), resolve_config(method, config))
        with adapter.applied():
            task.evaluate(lm, test)
        assert changes(as_loaded, model_state(lm)) == [], method


def test_a_buffer_the_model_changes_itself_is_no_change():
    """Phi-3's long-context RoPE swaps its (non-persistent) inv_freq whenever a text crosses its original context: every
    cell after a long prompt failed the check, blamed on its method (helper-173)."""
    if not hasattr(transformers, "Phi3Config"):
        pytest.skip("this transformers has no Phi-3")
    half = _DECODER["hidden_size"] // _DECODER["num_attention_heads"] // 2
    config = transformers.Phi3Config(**_IDS, **_DECODER, num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=16,
                                     rope_scaling={"type": "longrope", "short_factor": [1.0] * half, "long_factor": [4.0] * half})  # fmt: skip
    torch.manual_seed(0)
    lm = LanguageModel(model=transformers.Phi3ForCausalLM(config).eval(), tokenizer=tokenizer(), batch_size=8)
    rotary = [b for name, b in lm.model.named_buffers() if name.endswith("inv_freq")][0]
    lm.target_nll(["q: a1 b2 ="], [" 3"])
    before, short_freq = model_state(lm), rotary.clone()
    lm.target_nll([" ".join(["a1 b2"] * 20)], [" 3"])  # 40 tokens: past original_max_position_embeddings
    rotary = [b for name, b in lm.model.named_buffers() if name.endswith("inv_freq")][0]
    assert not torch.equal(rotary, short_freq)  # the model did change it: the case is real
    assert changes(before, model_state(lm)) == []


def test_a_change_anywhere_in_a_tensor_longer_than_a_chunk_is_seen(monkeypatch):
    import workers.model_state as state

    monkeypatch.setattr(state, "CHUNK", 7)  # every weight spans chunks, and its last one is short
    lm = language_model("llama")
    before = model_state(lm)
    weight = lm.model.get_input_embeddings().weight
    kept = weight[-1, -1].item()
    with torch.no_grad():
        weight[-1, -1] += 1.0  # the very last element: in the last, partial chunk
    (found,) = changes(before, model_state(lm))
    assert found.startswith("parameter model.embed_tokens.weight's values changed")
    with torch.no_grad():
        weight[-1, -1] = kept
        weight.data = weight.data.clone()  # the same values in other memory: no change
    assert changes(before, model_state(lm)) == []


def test_the_model_wide_changes_are_named_before_the_tensors_a_leaked_adapter_adds():
    lm = language_model("llama")
    before = model_state(lm)
    for i in range(5):
        lm.model.register_buffer(f"leaked_{i}", torch.ones(2))
    lm.model.train()
    lm.model.get_output_embeddings().register_forward_hook(lambda *_: None)
    assert changes(before, model_state(lm)) == ["+1 hooks on its modules", "it was left in train mode", "buffer leaked_0 was added", "and 4 more"]
