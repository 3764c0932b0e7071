"""Our CAA vector and steering hook against the `steering-vectors` library, on the same tiny models.

steering-vectors needs transformers < 5, so this runs in the separate `.venv-peers` environment
(see run_peer_tests.sh); in the main environment it is skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sv = pytest.importorskip(
    "steering_vectors",
    reason="steering-vectors is not installed here (it needs transformers<5): run tests/peers/run_peer_tests.sh",
)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared tiny-model helpers in tests/

from conftest_methods import fit_context, language_model  # noqa: E402
from workers.methods.steer_mean import mean_difference  # noqa: E402
from workers.steering import steer  # noqa: E402

ARCHS = ["llama", "gpt2", "gpt_neox", "qwen2", "gemma2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_mean_difference_matches_steering_vectors(arch):
    lm = language_model(arch)
    # steering-vectors passes everything the tokenizer returns to the model; transformers 4.x fast
    # tokenizers also return token_type_ids, which GPT-2 would add as embeddings. We never pass them.
    lm.tokenizer.model_input_names = ["input_ids", "attention_mask"]
    ctx = fit_context(lm, n_train=12)
    pairs = ctx.task.contrast_pairs(ctx.train)
    ours, _ = mean_difference(lm, pairs)
    layers = list(range(ours.shape[0]))
    theirs = sv.train_steering_vector(lm.model, lm.tokenizer, pairs, layers=layers, read_token_index=-1)
    for layer in layers:
        cosine = torch.nn.functional.cosine_similarity(ours[layer], theirs.layer_activations[layer].float(), dim=0)
        print(f"{arch} layer {layer}: cosine {cosine.item():.7f}")
        assert cosine >= 0.999
        assert torch.allclose(ours[layer], theirs.layer_activations[layer].float(), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_applying_the_vector_matches_steering_vectors(arch):
    lm = language_model(arch)
    vector = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = lm.tokenizer(["q: a1 b2 = 3 ; q: a4 b0 ="], return_tensors="pt")["input_ids"]
    with torch.no_grad(), steer(lm.model, {1: vector}, "all"):
        ours = lm.model(input_ids=ids).logits
    with torch.no_grad(), sv.SteeringVector({1: vector}, "decoder_block").apply(lm.model):
        theirs = lm.model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, lm.model(input_ids=ids).logits, atol=1e-3)
