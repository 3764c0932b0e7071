"""Per-cell selectivity metrics on neutral text, under every kind of adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest_methods import HIDDEN, language_model
from workers.metrics import neutral_reference, neutral_shift, peak_memory_bytes, reset_peak_memory, reset_rss_peak
from workers.steering import steer

TEXTS = ["q: a1 b2 = 3 ; q: a4 b0 = 2 ;", "persona: liar q: a7 b7 = 0 ;", "q: a3 b3 = 1"]


def _by_hand(per_text: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """KL(base ‖ adapted) per token and the perplexity ratio adapted / base, from each text's base and
    adapted log-probs (tokens, vocab) at the positions both predict and the tokens predicted there."""
    kl = nll_base = nll_adapted = 0.0
    count = 0
    for p, q, targets in per_text:
        kl += float((p.exp() * (p - q)).sum())
        nll_base -= float(p.gather(-1, targets).sum())
        nll_adapted -= float(q.gather(-1, targets).sum())
        count += len(targets)
    return kl / count, float(torch.exp(torch.tensor((nll_adapted - nll_base) / count)))


def test_unchanged_model_has_zero_kl_and_unit_ratio():
    lm = language_model()
    reference = neutral_reference(lm, TEXTS)
    kl, ratio = neutral_shift(lm, reference)
    assert kl == pytest.approx(0.0, abs=1e-7) and ratio == pytest.approx(1.0, abs=1e-6)


def test_kl_and_ratio_match_a_direct_computation_under_steering():
    lm = language_model()
    reference = neutral_reference(lm, TEXTS)
    vector = torch.ones(HIDDEN)
    with steer(lm.model, {1: vector}, "after_prompt"):
        kl, ratio = neutral_shift(lm, reference)
    per_text = []
    for text in TEXTS:
        ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            p = F.log_softmax(lm.model(input_ids=ids).logits[0, :-1], -1)
            with steer(lm.model, {1: vector}):  # the empty prompt is <bos>: every position is after it
                q = F.log_softmax(lm.model(input_ids=ids).logits[0, :-1], -1)
        per_text.append((p, q, ids[0, 1:, None]))
    expected_kl, expected_ratio = _by_hand(per_text)
    assert kl > 1e-3
    assert kl == pytest.approx(expected_kl, rel=1e-4) and ratio == pytest.approx(expected_ratio, rel=1e-4)


def test_a_prompt_prefix_is_compared_on_the_text_tokens_only():
    lm = language_model()
    reference = neutral_reference(lm, TEXTS)
    with lm.prefixed("q: a0 b0 = 3 ; "):
        kl, ratio = neutral_shift(lm, reference)
    assert kl > 0 and ratio != 1.0


def test_without_a_bos_every_text_token_is_scored_after_the_end_of_text_token():
    """GPT-2, Pythia and Qwen add no BOS: a neutral text follows the tokenizer's end-of-text token (as in
    lm-eval), so the plain model predicts every text token, as after a BOS. Its first token, the hardest,
    used to be left out while its bytes still counted: nats per byte read low on BOS-less families. A
    prompt prefix goes before that token, and both sides score the same tokens (computed by hand here)."""
    from tokenizers import processors

    lm = language_model()
    lm.tokenizer._tokenizer.post_processor = processors.Sequence([])  # no BOS added, as GPT-2's tokenizer
    assert not lm.tokenizer("")["input_ids"]
    reference = neutral_reference(lm, TEXTS)
    prefix = "q: a0 b0 = 3 ; "
    with lm.prefixed(prefix):
        kl, ratio = neutral_shift(lm, reference)
    eos = torch.tensor([[lm.tokenizer.eos_token_id]])
    per_text = []
    for text in TEXTS:
        ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
        before = lm.tokenizer(prefix, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            p = F.log_softmax(lm.model(input_ids=torch.cat([eos, ids], 1)).logits[0, :-1], -1)  # predicting text tokens 0..n-1
            q = F.log_softmax(lm.model(input_ids=torch.cat([before, eos, ids], 1)).logits[0, -ids.shape[1] - 1 : -1], -1)
        per_text.append((p, q, ids[0, :, None]))
    expected_kl, expected_ratio = _by_hand(per_text)
    assert kl > 1e-3
    assert kl == pytest.approx(expected_kl, rel=1e-4) and ratio == pytest.approx(expected_ratio, rel=1e-4)
    nll = -sum(float(p.gather(-1, targets).sum()) for p, _, targets in per_text)
    assert reference.nll == pytest.approx(nll / sum(len(targets) for *_, targets in per_text), rel=1e-5)
    assert reference.nll_per_byte == pytest.approx(nll / sum(len(t.encode()) for t in TEXTS), rel=1e-5)


def test_a_tokenizer_with_neither_bos_nor_end_of_text_token_is_refused_with_the_way_out():
    from tokenizers import processors

    lm = language_model()
    lm.tokenizer._tokenizer.post_processor = processors.Sequence([])
    lm.tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no end-of-text token to start a neutral text with.*eval.neutral_size: 0"):
        neutral_reference(lm, TEXTS)


def test_without_a_bos_texts_filling_the_context_window_lose_the_prefix_on_both_sides():
    """A text as long as the window keeps its last tokens and loses the prefix, as on the plain side:
    the same tokens scored from the same context, so no shift (it used to drop a column there too)."""
    from tokenizers import processors

    lm = language_model()
    lm.tokenizer._tokenizer.post_processor = processors.Sequence([])
    lm.max_length = 4
    assert all(len(ids) > 4 for ids in lm.encode(TEXTS, prompt=True))
    reference = neutral_reference(lm, TEXTS)
    with lm.prefixed("q: a0 b0 = 3 ; "):
        kl, ratio = neutral_shift(lm, reference)
    assert kl == pytest.approx(0.0, abs=1e-7) and ratio == pytest.approx(1.0, abs=1e-6)


@pytest.mark.skipif(not reset_rss_peak(), reason="this system does not let a process reset its RSS peak")
def test_a_cells_cpu_peak_memory_does_not_inherit_an_earlier_cells():
    big = 400 * 2**20
    reset_peak_memory("cpu")
    resident = peak_memory_bytes("cpu")  # right after a reset the peak is what the process holds now
    block = np.ones(big // 8)  # an earlier cell's peak: touched, then freed back to the system
    del block
    assert peak_memory_bytes("cpu") > resident + 0.9 * big
    reset_peak_memory("cpu")
    assert 10 * 2**20 < peak_memory_bytes("cpu") < resident + big / 4
