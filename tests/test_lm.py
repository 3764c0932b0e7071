"""The LM wrapper: batched == unbatched, the single-token fast path, prefixes, half precision."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version

from conftest_methods import ARCHITECTURES, fit_context, language_model, out_of_memory_past
import workers.lm
from workers.kv_cache import shareable_cache
from workers.methods import get_method, resolve_config
from workers.lm import _logit_selection, token_ids
from workers.models.loading import count_parameters
from workers.metrics import neutral_context, neutral_reference, neutral_shift
from workers.steering import POSITION_WISE_MLP_TYPES, decoder_layers, steer

PROMPTS = ["q: a1 b2 =", "persona: honest q: a4 b0 = 2 ; q: a5 b5 =", "q: a3 ="]
DIGITS = [tuple(f" {d}" for d in range(5))] * 3


def slow_choice_logprobs(lm, prompts, choices):
    """One forward per (prompt, choice), summed continuation log-probability: the general path."""
    out = []
    for prompt, cs in zip(prompts, choices):
        row = []
        for c in cs:
            b = next(lm.batches([prompt], [c]))
            row.append(float(-lm.token_nll(b, lm.forward(b)[b.target_mask]).sum()))  # every position's logits, then the scored
        out.append(row)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_single_token_fast_path_matches_the_slow_path_with_fewer_tokens(arch):
    lm = language_model(arch, batch_size=2)
    with torch.no_grad():
        slow = slow_choice_logprobs(lm, PROMPTS, DIGITS)
    tokens = lm.forward_tokens
    fast = lm.choice_logprobs(PROMPTS, DIGITS)
    used = lm.forward_tokens - tokens
    for a, b in zip(fast, slow):
        assert a == pytest.approx(b, abs=1e-5)
    prompt_tokens = sum(len(lm.tokenizer(p)["input_ids"]) for p in PROMPTS)
    # one forward per prompt, with its first choice appended (which the longest rows of a batch do not
    # run: the last column is a label only)
    assert prompt_tokens <= used <= prompt_tokens + len(PROMPTS)


def test_mixed_length_choices_take_the_general_path():
    lm = language_model()
    choices = [(" 0", " 1 2"), (" 3", " 4"), (" 0 ;", " 1")]
    with torch.no_grad():
        fast, slow = lm.choice_logprobs(PROMPTS, choices), slow_choice_logprobs(lm, PROMPTS, choices)
    for a, b in zip(fast, slow):
        assert a == pytest.approx(b, abs=1e-5)


def test_choices_the_tokenizer_cannot_tell_apart_are_refused():
    """Words a tokenizer lacks all become <unk>: an SST-2 cell on a ladder model scored " negative" and " positive"
    alike, so the argmax always took the first label and the score was the share of negatives."""
    lm = language_model()
    with pytest.raises(ValueError, match=r"the choices ' negative' and ' positive' encode to the same tokens \[3\]"):
        lm.choice_logprobs(PROMPTS[:1], [(" negative", " positive")])
    assert len(lm.choice_logprobs(PROMPTS[:1], [(" 1", " 1", " 2")])[0]) == 3  # a choice listed twice is the same choice


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2", "gemma2", "gemma3", "opt"])
def test_batched_equals_one_at_a_time(arch):
    lm = language_model(arch, batch_size=3)
    targets = [" 1 2", " 3", " 0 ; q:"]
    assert lm.target_nll(PROMPTS, targets) == pytest.approx(
        sum(lm.target_nll([p], [t]) * len(t.split()) for p, t in zip(PROMPTS, targets)) / 6, abs=1e-5
    )
    assert lm.generate(PROMPTS, 4) == [lm.generate([p], 4)[0] for p in PROMPTS]


def greedy_by_hand(lm, prompt: str, new_tokens: int) -> str:
    """The reference: argmax of the next-token logits, one full forward per token."""
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    for _ in range(new_tokens):
        ids = torch.cat([ids, lm.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return lm.tokenizer.decode(ids[0, start:], skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_is_greedy_whatever_decoding_settings_the_checkpoint_ships(arch):
    lm = language_model(arch, batch_size=3)
    expected = [greedy_by_hand(lm, p, 6) for p in PROMPTS]
    assert lm.generate(PROMPTS, 6) == expected
    shipped = lm.model.generation_config
    shipped.repetition_penalty, shipped.no_repeat_ngram_size = 5.0, 1  # as an instruct checkpoint's json may set
    assert lm.generate(PROMPTS, 6) == expected
    assert lm.model.generation_config is shipped and shipped.repetition_penalty == 5.0  # handed back as it was


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2", "opt"])
def test_non_embedding_parameters_leave_out_every_lookup_table_and_the_head(arch):
    """Kaplan et al.'s N: token and learned-position tables and the output head are not counted (OPT's
    positions live at model.decoder.embed_positions, GPT-2's at transformer.wpe); OPT's projections
    between its narrower embeddings and the residual stream are matmuls, and are."""
    model = language_model(arch).model
    tables = ("embed_tokens", "embed_positions", "wte", "wpe", "embed_in", "embed_out", "lm_head")
    by_name = sum(p.numel() for name, p in model.named_parameters() if not any(t in name.split(".") for t in tables))
    assert count_parameters(model) == (sum(p.numel() for p in model.parameters()), by_name)


def test_prefix_applies_to_every_entry_point_and_is_restored_on_error():
    lm = language_model()
    plain = lm.target_nll(PROMPTS, [" 1"] * 3)
    with pytest.raises(KeyError):
        with lm.prefixed("q: a0 b0 = 3 ; "):
            assert lm.token_count("q:", prompt=True) == 8  # <bos> + 6 prefix tokens + q:
            assert lm.target_nll(PROMPTS, [" 1"] * 3) != plain
            raise KeyError("cell failed")
    assert lm.prefix == "" and lm.target_nll(PROMPTS, [" 1"] * 3) == plain


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_token_nll_and_training_loss_match_log_softmax_gather_mask(arch):
    """`token_nll` on the scored positions' logits equals the textbook log-softmax → gather → mask
    over every position's, per token and summed per row, and `loss` (what training minimises) is its
    mean over target tokens, value and gradient, on a batch with padding and targets of different
    lengths. Where transformers can (5.x), the output head runs on the scored positions alone."""
    lm = language_model(arch)
    batch = next(lm.batches(PROMPTS, [" 1 2", " 3", " 0 ; q:"]))
    logits = lm.forward(batch)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    per_token = -logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1) * batch.target_mask[:, :-1]
    head_rows = []
    hook = lm.model.get_output_embeddings().register_forward_hook(lambda module, args, out: head_rows.append(args[0].shape[:-1].numel()))
    try:
        scored = lm.scored_logits(batch)
    finally:
        hook.remove()
    torch.testing.assert_close(lm.token_nll(batch, scored), per_token[batch.target_mask[:, :-1]], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lm.row_sums(batch, lm.token_nll(batch, lm.scoring_logits(batch))), per_token.sum(-1), rtol=1e-6, atol=1e-6)
    assert int((per_token != 0).sum()) == batch.target_tokens == 6  # " 1 2", " 3", " 0 ; q:" minus padding
    if _logit_selection(type(lm.model)) == "mask":
        assert head_rows == [batch.target_tokens], f"the output head ran on {head_rows} positions, not the {batch.target_tokens} scored"
    widths = []
    hook = lm.model.get_input_embeddings().register_forward_hook(lambda module, args, out: widths.append(args[0].shape[1]))
    try:
        lm.scored_logits(batch)
    finally:
        hook.remove()
    assert widths == [batch.input_ids.shape[1] - 1], "the last column is a label only: it must not run"
    reference = per_token.sum() / batch.target_tokens
    grads = torch.autograd.grad(reference, list(lm.model.parameters()), allow_unused=True)
    loss = lm.loss(batch)
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    for ours, theirs in zip(torch.autograd.grad(loss, list(lm.model.parameters()), allow_unused=True), grads):
        if theirs is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_a_model_split_over_gpus_gets_its_logits_mask_on_the_cpu():
    """accelerate's hook on a model split over GPUs moves every keyword tensor to the first GPU; the
    `logits_to_keep` mask, handed over on the CPU, must reach the head's hidden states (on the last GPU)
    as it is. Checked on the hook itself, with "meta" standing for the first GPU (no GPUs here)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from workers.models.loading import leave_on_cpu

    model = language_model().model
    add_hook_to_module(model, AlignDevicesHook(execution_device="meta", io_same_device=True, skip_keys="past_key_values"))
    leave_on_cpu(model, "logits_to_keep")
    leave_on_cpu(model, "logits_to_keep")  # a second call adds nothing
    mask = torch.ones(1, 3, dtype=torch.bool)
    _, moved = model._hf_hook.pre_forward(model, input_ids=torch.ones(1, 3, dtype=torch.long), logits_to_keep=mask)
    assert moved["input_ids"].device.type == "meta"  # the rest still goes to the first GPU
    assert moved["logits_to_keep"] is mask
    assert model._hf_hook.skip_keys == ["past_key_values", "logits_to_keep"]


def test_the_loss_of_half_precision_logits_is_computed_in_fp32():
    """A bf16 model's logits: the cross-entropy (log-sum-exp over the vocabulary) in bf16 keeps ~3 digits."""
    lm = language_model()
    batch = next(lm.batches(PROMPTS, [" 1", " 2", " 3"]))
    logits = lm.scored_logits(batch).bfloat16()
    per_token = lm.token_nll(batch, logits)
    assert per_token.dtype == torch.float32
    assert torch.equal(per_token, lm.token_nll(batch, logits.float()))


def test_a_half_precision_models_scores_come_from_fp32_logits():
    """bf16 logits keep 8 bits, so near choices tie and an argmax takes the first: scoring takes the head's product
    in fp32. Reference: the same model with its head swapped for an fp32 copy fed the bf16 hidden states."""
    lm = language_model()
    lm.model.to(torch.bfloat16)
    ours = lm.choice_logprobs(PROMPTS, DIGITS)
    nll = lm.target_nll(PROMPTS, [" 1 2", " 3", " 0 ;"])
    head = lm.model.get_output_embeddings()
    fp32 = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    fp32.load_state_dict({name: value.float() for name, value in head.state_dict().items()})
    fp32.register_forward_pre_hook(lambda module, args: (args[0].float(),))
    lm.model.set_output_embeddings(fp32)
    try:
        reference = lm.choice_logprobs(PROMPTS, DIGITS)
        assert lm.target_nll(PROMPTS, [" 1 2", " 3", " 0 ;"]) == pytest.approx(nll, abs=1e-5)
    finally:
        lm.model.set_output_embeddings(head)
    for a, b in zip(ours, reference):
        assert a == pytest.approx(b, abs=1e-5)
    assert not head._forward_hooks  # taken out again


def test_pairs_encoded_once_collate_to_the_same_batches():
    """The training loop encodes its examples once and collates each step from the ids."""
    lm = language_model()
    targets = [" 1 2", " 3", " 0 ; q:"]
    with lm.prefixed("q: a0 b0 = 3 ; "):
        lm.max_length = 9  # truncation happens at encoding, so it must carry over too
        direct = next(lm.batches(PROMPTS, targets))
        collated = lm.collate(lm.encode_pairs(PROMPTS, targets))
    for name in ("input_ids", "attention_mask", "position_ids", "target_mask", "prompt_last"):
        assert torch.equal(getattr(direct, name), getattr(collated, name)), name
    assert collated.input_ids.shape[1] == 9 and collated.target_tokens == 6  # truncated, every continuation kept


def test_truncation_keeps_the_continuation_and_the_bos():
    lm = language_model()
    lm.max_length = 4
    b = next(lm.batches(["persona: honest q: a1 b2 ="], [" 3"]))
    assert b.input_ids.shape[1] == 4 and b.target_tokens == 1 and int(b.prompt_last[0]) == 2
    assert b.input_ids[0].tolist() == [lm.tokenizer.bos_token_id, *lm.encode(["b2 = 3"], prompt=False)[0]]


@pytest.mark.parametrize("template", ["$A", "<bos> $A", "<bos> <bos> $A", "<bos> $A <eos>"])
@pytest.mark.parametrize("limit", [3, 5, 40])
def test_a_long_prompt_is_clipped_as_the_tokenizer_truncates_it(template, limit):
    """`clipped` (scoring, training, extraction) drops a long prompt's oldest text and keeps what the tokenizer
    puts first, as the tokenizer's own left truncation (`generate`'s) does: the BOS stayed there only. Tokenizers
    with no BOS (GPT-2's), two, or one and an EOS after the text."""
    from tokenizers.processors import TemplateProcessing

    lm = language_model()
    lm.max_length = limit
    text = "persona: honest q: a1 b2 = 3 ; q: a4 b0 ="
    tok = lm.tokenizer
    specials = [(name, tok.convert_tokens_to_ids(name)) for name in ("<bos>", "<eos>")]
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=template, special_tokens=specials)
    tok.truncation_side, side = "left", tok.truncation_side
    appended = template.endswith("<eos>")  # a prompt goes without the EOS a tokenizer appends (the next test)
    try:
        theirs = tok(text, truncation=True, max_length=limit + appended)["input_ids"]
    finally:
        tok.truncation_side = side
    assert lm.clipped(lm.encode([text], prompt=True)[0]) == theirs[: len(theirs) - appended]


def test_a_tokenizer_that_appends_an_eos_puts_none_between_a_prompt_and_its_answer():
    """With `add_eos_token=True` (or a "$A </s>" template) every prompt was encoded with an EOS after it: each answer
    was scored, trained on and generated after the end of the document. Scores, training pairs and generations are
    now what the same tokenizer without the appended EOS gives; a neutral text still follows the BOS alone."""
    from tokenizers.processors import TemplateProcessing

    lm = language_model()
    tok = lm.tokenizer
    specials = [(name, tok.convert_tokens_to_ids(name)) for name in ("<bos>", "<eos>")]

    def outputs() -> tuple:
        for cached in ("_marked_probe", "_leading_specials", "_trailing_specials"):  # the template changes under them here
            lm.__dict__.pop(cached, None)
        pairs = [p.ids for p in lm.encode_pairs(PROMPTS, [" 3"] * 3)]
        lm.max_length, length = 9, lm.max_length  # 5 prompt tokens beside 4 new ones: the long prompt loses its oldest
        try:
            clipped = lm.generate(PROMPTS, 4)
        finally:
            lm.max_length = length
        return pairs, lm.choice_logprobs(PROMPTS, DIGITS), lm.generate(PROMPTS, 4), neutral_context(lm), clipped

    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=specials)
    plain = outputs()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A <eos>", special_tokens=specials)
    assert tok("x")["input_ids"][-1] == tok.eos_token_id  # the tokenizer does append it
    appending = outputs()
    assert appending[0] == plain[0] and appending[2] == plain[2] and appending[3] == plain[3] == "" and appending[4] == plain[4]
    assert torch.allclose(torch.tensor(appending[1]), torch.tensor(plain[1]), atol=1e-6)
    # the tokenizer changed under a measured count: only the specials themselves are cut, never a text's last token
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=specials)
    assert lm.encode(PROMPTS, prompt=True) == [tok(p)["input_ids"] for p in PROMPTS]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_paths_run(dtype):
    """bf16/fp16 scoring, steering and LoRA training, wherever this torch build supports them on CPU."""
    lm = language_model()
    lm.model.to(dtype)
    try:
        scores = lm.choice_logprobs(PROMPTS, DIGITS)
    except RuntimeError as err:  # e.g. an op without a CPU half kernel in this torch build
        pytest.skip(f"{dtype} not supported on this device: {err}")
    assert all(torch.isfinite(torch.tensor(s)).all() for s in scores)
    with steer(lm.model, {1: torch.ones(lm.model.config.hidden_size)}, "after_prompt"):
        assert lm.choice_logprobs(PROMPTS, DIGITS) != scores
    ctx = fit_context(lm, n_train=8)
    config = resolve_config("lora", {"rank": 2, "train": {"min_steps": 2, "max_steps": 2, "checkpoints": 1}})
    adapter = get_method("lora").fit(ctx, config)
    assert all(torch.isfinite(torch.tensor(adapter.report.hparams["losses"])))
    assert next(lm.model.parameters()).dtype == dtype


DEMOS = "q: a0 b0 = 3 ; q: a1 b1 = 4 ; q: a2 b2 = 0 ; q: a3 b3 = 1 ; q: a4 b4 = 2 ; q: a5 b5 = 3 ; "  # 42 shared tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2", "gemma2", "gemma3", "opt"])
@pytest.mark.parametrize("steering", [None, "after_prompt", "all"])
def test_shared_demonstrations_run_once_with_the_same_scores(arch, steering, monkeypatch):
    """Rows that begin with the same demonstrations (a `prompt` method's) run them once, as a
    batch of one, and continue from its key/value cache: the scores of every scoring path equal
    those of the plain forward, steered or not, with fewer tokens through the model."""
    lm = language_model(arch, batch_size=3)
    targets = [" 1 2", " 3", " 0 ; q:"]
    vector = {1: 0.5 * torch.ones(lm.model.config.hidden_size)}

    def scores() -> tuple[list, int]:
        tokens = lm.forward_tokens
        with lm.prefixed(DEMOS), (steer(lm.model, vector, steering) if steering else contextlib.nullcontext()):
            values = [lm.target_nll(PROMPTS, targets), lm.choice_logprobs(PROMPTS, DIGITS), lm.choice_logprobs(PROMPTS, [(" 0 ;", " 1")] * 3),
                      neutral_reference(lm, ["a1 b2 = 3", "q: a4"]).nll]  # fmt: skip
        return values, lm.forward_tokens - tokens

    shared, shared_tokens = scores()
    monkeypatch.setattr("workers.lm.SHARED_PREFIX_MIN_TOKENS", 10**9)  # every forward over the whole batch
    plain, plain_tokens = scores()
    assert shared[0] == pytest.approx(plain[0], abs=1e-5) and shared[3] == pytest.approx(plain[3], abs=1e-5)
    for ours, theirs in zip(shared[1] + shared[2], plain[1] + plain[2]):
        assert ours == pytest.approx(theirs, abs=1e-5)
    if not _cache_rows_repeat(lm):  # scores above still equal: every batch took the plain forward
        assert arch == "gemma2" and Version(transformers.__version__) < Version("4.56"), f"{arch}'s cache cannot share rows"
        return
    demo_tokens = lm.token_count(DEMOS, prompt=True) - 1  # <bos> + demonstrations, less a seam token the prompt may merge into
    # four forwards of 3 rows and the neutral texts' one of 2 ran the demonstrations once, not once per row
    assert plain_tokens - shared_tokens >= (4 * 2 + 1) * (demo_tokens - 1)


def _cache_rows_repeat(lm) -> bool:
    """Whether this model's key/value cache can be repeated across rows on this transformers: every
    architecture's can on 4.56+; Gemma 2's fixed-size HybridCache could not before."""
    out = lm.model(input_ids=torch.tensor([[1, 4]]), use_cache=True)
    return shareable_cache(out.cache if "cache" in out else out.past_key_values) is not None


def test_rows_that_share_too_little_take_the_plain_forward():
    lm = language_model(batch_size=3)
    batch = next(lm.batches(PROMPTS, [" 1"] * 3))
    assert lm._shared_columns(batch) == 0
    with lm.prefixed(DEMOS):
        batch = next(lm.batches(PROMPTS, [" 1"] * 3))
        single = next(lm.batches(PROMPTS[:1], [" 1"]))
    assert lm._shared_columns(batch) >= 32 and lm._shared_columns(single) == 0


def test_texts_past_the_models_positions_lose_their_oldest_tokens():
    """GPT-2's learned position table ends at n_positions; a longer few-shot prompt or transcript
    must be cut from the left, not index past the table (which is what happens without the limit)."""
    lm = language_model("gpt2")
    assert lm.max_length == lm.model.config.n_positions == 256
    long_prompt = "persona: honest " * 200 + "q: a1 b2 ="
    assert lm.token_count(long_prompt, prompt=True) > 256
    batch = next(lm.batches([long_prompt], [" 3"]))
    assert batch.input_ids.shape[1] == 256 and batch.target_tokens == 1
    assert torch.isfinite(torch.tensor(lm.target_nll([long_prompt], [" 3"])))
    (text,) = lm.generate([long_prompt], max_new_tokens=4)
    assert lm.token_count(text, prompt=False) >= 1
    lm.max_length = None  # the model's own behaviour past its table
    with pytest.raises(IndexError):
        lm.target_nll([long_prompt], [" 3"])


def _byte_level_bpe() -> transformers.PreTrainedTokenizerFast:
    """A GPT-2-style tokenizer (byte-level BPE, no BOS), trained here on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["the quick brown fox jumps over the lazy dog", "q: a1 b2 = 3 ; persona: liar"] * 20, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.mark.parametrize("kind", ["world", "byte_level_bpe", "reloaded", "left_padding_by_an_earlier_call", "specials_split_by_an_earlier_call"])
def test_token_ids_are_the_tokenizers_own(kind, tmp_path):
    """The Rust backend called directly gives what transformers' call gives, special tokens or not."""
    tokenizer = language_model().tokenizer if kind == "world" else _byte_level_bpe()
    if kind == "reloaded":  # through AutoTokenizer, as a hub checkpoint's tokenizer is loaded
        tokenizer.save_pretrained(tmp_path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = ["q: a1 b2 =", "", "  two  spaces ", "héllo wörld\nnew line", "<|endoftext|> persona: liar", "the fox " * 30]
    if kind == "left_padding_by_an_earlier_call":
        tokenizer.padding_side = "left"
        tokenizer(texts, padding=True, truncation=True, max_length=4)  # leaves the backend set to pad and truncate
    if kind == "specials_split_by_an_earlier_call":
        tokenizer(texts, split_special_tokens=True)  # may leave the backend encoding special tokens as text
    for specials in (True, False):
        expected = [list(ids) for ids in tokenizer(texts, add_special_tokens=specials)["input_ids"]]
        assert token_ids(tokenizer, texts, add_special_tokens=specials) == expected


def _legacy_sentencepiece() -> transformers.PreTrainedTokenizerFast:
    """Llama 2's tokenizer.json as transformers 4.x loads it: a normalizer that prepends "▁" to every text it encodes."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    core.train_from_iterator(["Sentiment: negative", "Sentiment: positive", "the movie was a bad one"] * 50,
                             trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))  # fmt: skip
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["legacy_sentencepiece", "byte_level_bpe", "world"])
def test_a_continuation_gets_the_ids_it_has_after_a_prompt(kind):
    """Encoded alone, " negative" is ['▁', '▁negative'] under a legacy SentencePiece normalizer: every choice was scored
    after a stray token, and fine-tuning learned to write it. A continuation's ids are those the pair encoded whole
    gives after the prompt's; a tokenizer that needs no help is left to encode continuations alone."""
    lm = language_model()
    if kind != "world":
        lm.tokenizer = _legacy_sentencepiece() if kind == "legacy_sentencepiece" else _byte_level_bpe()
    tok = lm.tokenizer
    for prompt, continuation in [("Sentiment:", " negative"), ("the movie was", " a bad one"), ("q: a1 b2 =", " 3")]:
        whole = tok(prompt + continuation, add_special_tokens=False)["input_ids"]
        head = tok(prompt, add_special_tokens=False)["input_ids"]
        assert whole[: len(head)] == head
        assert lm.encode([continuation], prompt=False) == [whole[len(head) :]], tok.convert_ids_to_tokens(lm.encode([continuation], prompt=False)[0])
    assert (lm._continuation_lead is None) == (kind != "legacy_sentencepiece")
    # no space before it: the probe does not merge into it; after an empty prompt (a neutral text after a BOS) a text
    # starts the document, and is encoded as one
    assert tok.convert_ids_to_tokens(lm.encode(["negative"], prompt=False)[0])[0] != "▁"
    (pair,) = lm.encode_pairs([""], ["Sentiment: negative"])
    assert pair.ids[pair.continuation_start :] == tok("Sentiment: negative", add_special_tokens=False)["input_ids"]
    with lm.prefixed("the movie was a bad one "):  # a `prompt` method's demonstrations: the same tokens scored after them
        (after_demonstrations,) = lm.encode_pairs([""], ["Sentiment: negative"])
    assert after_demonstrations.ids[after_demonstrations.continuation_start :] == pair.ids[pair.continuation_start :]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_the_last_blocks_mlp_runs_at_the_scored_positions_alone_with_the_same_loss_and_gradients(arch, monkeypatch):
    """A training step's loss reads the logits at the answer's tokens: the last block's MLP runs there
    alone (`workers.last_block`), and the loss and every gradient are those of the whole MLP."""
    lm = language_model(arch)
    for p in lm.model.parameters():
        p.requires_grad_(True)
    b = next(lm.batches(PROMPTS, [" 1 2", " 3", " 4 4 4"]))
    mlp = getattr(decoder_layers(lm.model)[-1], "mlp", lm.model)  # OPT's block has no MLP module: count the model's forwards
    rows: list[int] = []
    handle = mlp.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[:-1].numel() if args else -1))

    def loss_and_grads():
        lm.model.zero_grad(set_to_none=True)
        loss = lm.loss(b)
        loss.backward()
        return loss.detach(), [None if p.grad is None else p.grad.clone() for p in lm.model.parameters()]

    try:
        ours = loss_and_grads()
        monkeypatch.setattr(workers.lm, "read_positions_mlp", lambda _model: None)
        whole = loss_and_grads()
    finally:
        handle.remove()
    scored = int(b.target_mask.sum())
    assert rows == ([scored, b.input_ids[:, :-1].numel()] if arch in POSITION_WISE_MLP_TYPES else [rows[1]] * 2)
    torch.testing.assert_close(ours[0], whole[0], rtol=1e-5, atol=1e-6)
    for got, expected in zip(ours[1], whole[1]):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_a_last_mlp_with_dropout_runs_whole_while_training(monkeypatch):
    """GPT-2's MLP drops out inside: run at fewer positions, its mask and every later draw would move."""
    lm = language_model("gpt2")
    lm.model.config.resid_pdrop = 0.1
    for module in lm.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    lm.model.train()
    b = next(lm.batches(PROMPTS, [" 1 2", " 3", " 4 4 4"]))

    def seeded_loss():
        torch.manual_seed(0)
        return lm.loss(b).detach()

    ours = seeded_loss()
    monkeypatch.setattr(workers.lm, "read_positions_mlp", lambda _model: None)
    assert torch.equal(ours, seeded_loss())
    lm.model.eval()
    monkeypatch.undo()
    assert workers.lm.read_positions_mlp(lm.model) is not None  # in eval, dropout off: the MLP runs at the scored positions


def test_a_batch_that_runs_out_of_memory_runs_again_halved_with_the_same_numbers_and_flops(capfd):
    prompts = PROMPTS * 3
    mixed = [(" 0", " 1 2"), (" 3", " 4"), (" 0 ;", " 1")] * 3
    targets = [" 1 2", " 3", " 0 ; q:"] * 3
    texts = ["a1 b2 = 3 ; q: a4", "q: a1 b2 = 3", "persona: liar q: a7 b7 = 0 ;", "q: a3"] * 2
    calls = {"target_nll": lambda lm: lm.target_nll(prompts, targets), "single": lambda lm: lm.choice_logprobs(prompts, DIGITS * 3),
             "general": lambda lm: lm.choice_logprobs(prompts, mixed), "generate": lambda lm: lm.generate(prompts, 3),
             "neutral": lambda lm: neutral_reference(lm, texts).logprobs}  # fmt: skip

    def run(lm, batch_size):
        out = {}
        for name, call in calls.items():
            lm.batch_size, before = batch_size, (lm.flops_run, lm.forward_tokens)
            with torch.no_grad():
                out[name] = call(lm), lm.flops_run - before[0], lm.forward_tokens - before[1]
        return out

    # what every call below ends up running: each batch 2 rows (FLOPs depend on the batching: a batch drops its last
    # column, only a label, so its longest rows' last tokens do not run)
    clean = run(language_model(), 2)
    lm = language_model()
    with out_of_memory_past(lm, 3):
        halved = run(lm, 8)
    assert lm.halved_to == 2
    said = capfd.readouterr().err
    assert said.count("out of accelerator memory on a batch of 8; 4 at a time") == len(calls)  # every call, from 8
    assert said.count("out of accelerator memory on a batch of 4; 2 at a time") == len(calls)
    assert (lm.tokenizer.padding_side, lm.tokenizer.truncation_side) == ("right", "right")  # generate's left, undone
    for name in calls:
        (ours, flops, tokens), (theirs, clean_flops, clean_tokens) = halved[name], clean[name]
        assert (flops, tokens) == (clean_flops, clean_tokens), name  # the failed tries' passes are not billed
        if name == "generate":
            assert ours == theirs
        elif name == "neutral":
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs, strict=True))
        else:
            assert np.allclose(np.array(ours, dtype=object).astype(float), np.array(theirs, dtype=object).astype(float), atol=1e-5), name
    lm.batch_size = 8
    with out_of_memory_past(lm, 0), pytest.raises(torch.OutOfMemoryError, match="a batch of 1"):
        lm.target_nll(prompts, targets)  # one row that does not fit fails the cell


def test_a_neutral_reference_serves_a_shift_at_another_batch_size():
    """The reference is kept per text: a shift whose batches were halved (out of memory) or set
    otherwise compares the same tokens, not misaligned batches."""
    lm = language_model(batch_size=3)
    texts = ["a1 b2 = 3 ; q: a4", "q: a1 b2 = 3", "persona: liar q: a7 b7 = 0 ;", "q: a3"]
    reference = neutral_reference(lm, texts)
    lm.batch_size = 2
    kl, ratio = neutral_shift(lm, reference)
    assert kl == pytest.approx(0.0, abs=1e-6) and ratio == pytest.approx(1.0, abs=1e-6)
    lm.batch_size = 4
    with out_of_memory_past(lm, 1):
        assert neutral_shift(lm, reference) == pytest.approx((kl, ratio), abs=1e-6)
