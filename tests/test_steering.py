"""Steering hooks on every supported architecture: exact, differentiable, positional, cache-safe."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import transformers
from packaging.version import Version
from torch.utils.flop_counter import FlopCounterMode

from conftest_methods import ARCHITECTURES, HIDDEN, language_model, out_of_memory_past
from workers.kv_cache import cache_among, layer_tensors
from workers.lm import SHARED_PREFIX_MIN_TOKENS
from workers.methods.steer_mean import contrast_texts, mean_difference
from workers import last_row_attention
from workers.steering import _add, decoder_layers, last_token_flops, last_token_states, needed_attention_mask, prompt_boundary, shared_prefix, steer

ARCHS = list(ARCHITECTURES)
TEXTS = ["q: a1 b2 = 3 ; q: a4 b0 =", "persona: liar q: a7 =", "q: a3 b3 ="]


def vector(seed: int = 1, norm: float = 8.0) -> torch.Tensor:
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


def batch(lm, texts=TEXTS, conts=None):
    return next(lm.batches(texts, conts or [" 1 2"] * len(texts)))


@pytest.mark.parametrize("arch", ARCHS)
def test_steering_adds_exactly_the_vector_at_the_layer(arch):
    lm = language_model(arch)
    b = batch(lm)
    v = vector()
    plain = last_token_states(lm.model, b.input_ids, b.attention_mask)
    with steer(lm.model, {1: v}):
        steered = last_token_states(lm.model, b.input_ids, b.attention_mask)
    assert torch.allclose(plain[0], steered[0])  # layers before are untouched
    assert torch.allclose(steered[1] - plain[1], v.expand_as(plain[1]), atol=1e-5)
    assert not torch.allclose(plain[2], steered[2])  # and later layers see it
    assert not any(layer._forward_hooks for layer in decoder_layers(lm.model))


def test_tuple_outputs_are_steered_and_rest_kept():
    hidden, extra = torch.zeros(2, 3, 4), object()
    out = _add((hidden, extra), torch.ones(4), None)
    assert isinstance(out, tuple) and out[1] is extra and torch.equal(out[0], torch.ones(2, 3, 4))
    assert torch.equal(hidden, torch.zeros(2, 3, 4)), "the layer's own output must not be edited in place"
    masked = _add(hidden, torch.ones(4), torch.tensor([[True, False, True]] * 2)[..., None])
    assert masked[:, 1].abs().sum() == 0 and masked[:, 0].sum() == 8
    assert _add(hidden.bfloat16(), torch.ones(4), None).dtype == torch.bfloat16  # the vector follows the model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_reading_some_layers_stops_the_forward_after_the_deepest(arch):
    lm = language_model(arch)
    b = batch(lm)
    full = last_token_states(lm.model, b.input_ids, b.attention_mask)
    ran = []
    handles = [layer.register_forward_hook(lambda _m, _i, _o, i=i: ran.append(i)) for i, layer in enumerate(decoder_layers(lm.model))]
    handles.append(lm.model.get_output_embeddings().register_forward_hook(lambda *_: ran.append("head")))
    mlp_input_shapes = []
    deepest_mlp = decoder_layers(lm.model)[1].mlp
    handles.append(deepest_mlp.register_forward_hook(lambda _m, args, _o: mlp_input_shapes.append(tuple(args[0].shape))))
    try:
        some = last_token_states(lm.model, b.input_ids, b.attention_mask, [1, 0])
    finally:
        for handle in handles:
            handle.remove()
    # `full` ran block 1 whole (block 2 was its deepest); here block 1 is the deepest and its MLP ran on the last tokens alone:
    # the same sums, though a matmul of one row per text may add them in another order (bit-equal on a Xeon, not on an EPYC)
    torch.testing.assert_close(some, full[[1, 0]], rtol=1e-5, atol=1e-5)
    assert mlp_input_shapes == [(b.input_ids.shape[0], 1, lm.model.config.hidden_size)]
    assert ran == [0, 1], "layer 2 and the vocabulary projection must not run"
    assert not deepest_mlp._forward_pre_hooks
    assert not any(layer._forward_hooks for layer in decoder_layers(lm.model))


def test_an_architecture_not_known_to_allow_it_runs_the_deepest_mlp_whole(monkeypatch):
    """Falcon adds the attention output into the MLP's output in place: a one-row MLP output would not take it."""
    lm = language_model("llama")
    b = batch(lm)
    expected = last_token_states(lm.model, b.input_ids, b.attention_mask, [1])
    monkeypatch.setattr(lm.model.config, "model_type", "falcon")
    shapes = []
    handle = decoder_layers(lm.model)[1].mlp.register_forward_hook(lambda _m, args, _o: shapes.append(tuple(args[0].shape)))
    try:
        got = last_token_states(lm.model, b.input_ids, b.attention_mask, [1])
    finally:
        handle.remove()
    assert shapes == [(*b.input_ids.shape, lm.model.config.hidden_size)]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # see above: equal but for the order of a sum


@pytest.mark.skipif(not last_row_attention._returns_two(), reason="transformers < 4.48: the attention's own forward runs")
def test_llama_deepest_attention_computes_queries_and_output_at_the_last_tokens_alone(monkeypatch):
    """Its keys and values at every position, its queries, scores and output projection at the read
    column only: the same states as the whole attention, on right-padded texts with grouped key heads."""
    lm = language_model("llama")
    b = batch(lm)  # texts of unequal length: right padding
    attention = decoder_layers(lm.model)[1].self_attn
    shapes: dict[str, list] = {"q": [], "k": [], "o": []}
    handles = [
        getattr(attention, f"{name}_proj").register_forward_hook(lambda _m, args, _o, name=name: shapes[name].append(tuple(args[0].shape)))
        for name in shapes
    ]
    rows, width = b.input_ids.shape
    left = torch.cat([b.attention_mask[:, 1:], b.attention_mask[:, :1]], dim=1)  # not right-padded: the model's own attention
    try:
        with FlopCounterMode(display=False) as counted:
            got = last_token_states(lm.model, b.input_ids, b.attention_mask, [1, 0])
        last_token_states(lm.model, b.input_ids, left, [1, 0])
    finally:
        for handle in handles:
            handle.remove()
    assert shapes["q"] == [(rows, 1, HIDDEN), (rows, width, HIDDEN)] and shapes["o"][0] == (rows, 1, HIDDEN)
    assert shapes["k"] == [(rows, width, HIDDEN)] * 2
    assert "forward" not in vars(attention), "the attention's own forward must be back"
    per_module = counted.get_flop_counts()  # the blocks' only: the rotary tables are a matmul too in transformers 4.5x
    matmul_flops = sum(n for i in (0, 1) for op, n in per_module[f"LlamaForCausalLM.model.layers.{i}"].items() if "attention" not in str(op))
    norm_weights = sum(p.numel() for block in decoder_layers(lm.model)[:2] for name, p in block.named_parameters() if "norm" in name)
    # the formula's N is every parameter of the blocks (Kaplan's): the norms' weights too, billed as a matmul at every token
    assert last_token_flops(lm.model, 1, rows * width, rows) - matmul_flops == 2 * norm_weights * rows * width
    monkeypatch.setattr(last_row_attention, "_LLAMA_ATTENTION_TYPES", frozenset())
    whole = last_token_states(lm.model, b.input_ids, b.attention_mask, [1, 0])
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)
    assert last_token_flops(lm.model, 1, rows * width, rows) > matmul_flops  # counted with q and o at every token


@pytest.mark.parametrize("arch", ARCHS)
def test_a_right_padded_read_masks_no_padding_and_reads_each_text_as_alone(arch):
    """Padding after a text's last token is never seen by a query that is read: the forward masks none."""
    lm = language_model(arch)
    ids, mask = lm.pad(lm.encode(TEXTS, prompt=True))
    assert not mask.all(), "the texts must be of unequal length"
    masks = []
    handle = lm.model.register_forward_pre_hook(lambda _m, _a, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    try:
        padded = last_token_states(lm.model, ids, mask)
    finally:
        handle.remove()
    alone = torch.cat([last_token_states(lm.model, *lm.pad(lm.encode([text], prompt=True))) for text in TEXTS], dim=1)
    assert len(masks) == 1 and masks[0].all()
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    left = torch.cat([mask[:, 1:], mask[:, :1]], dim=1)  # a row with padding first is not right-padded: its mask is kept
    assert needed_attention_mask(left) is left


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mean_difference_is_independent_of_batching_and_order(arch):
    """Sorted, deduplicated, mixed positive/negative batches give the plain per-side means of one text at a time."""
    lm = language_model(arch, batch_size=2)
    pairs = [(f"persona: honest q: a{i} b{i % 3} =", f"persona: liar q: a{i} =" + " 1 ;" * (i % 3)) for i in range(7)]
    pairs += pairs[:3] + [(pairs[4][1], pairs[5][0])]  # repeats, and a text on both sides

    def states(texts):  # (layers, texts, d), one forward per text
        return torch.cat([last_token_states(lm.model, *lm.pad(lm.encode([text], prompt=True))) for text in texts], dim=1)

    positive, negative = states([p for p, _ in pairs]), states([n for _, n in pairs])
    reference = positive.mean(1) - negative.mean(1)
    reference_norm = torch.cat([positive, negative], dim=1).norm(dim=-1).mean(1)
    tokens = lm.forward_tokens
    diff, norm = mean_difference(lm, pairs)
    assert torch.allclose(diff, reference, atol=1e-5) and torch.allclose(norm, reference_norm, atol=1e-5)
    distinct = {text for pair in pairs for text in pair}
    assert lm.forward_tokens - tokens == sum(map(len, lm.encode(sorted(distinct), prompt=True)))  # each text once
    some, some_norm = mean_difference(lm, pairs, [2, 0])
    assert torch.allclose(some, diff[[2, 0]], atol=1e-6) and torch.allclose(some_norm, norm[[2, 0]], atol=1e-6)


@pytest.mark.parametrize("arch", [*ARCHS, "gemma2-window4"])
@pytest.mark.parametrize("layers", [None, [1, 0]])
def test_texts_continue_from_a_shared_prefix_to_the_same_states(arch, layers):
    """Tokens every text begins with run once (`shared_prefix`) and each text's rest continues from their keys and
    values: the states read are those of each text run whole, with a vector steering every position or only the
    token read (the prefix is never a text's last token), Llama's last-row attention reading the cache too, and
    Gemma 2's sliding window (4 positions: the prefix's keys partly out of sight) kept."""
    lm = language_model(arch)
    header = "persona: honest q: a1 b2 = 3 ; q: a4 b0 = 1 ; "
    ids, mask = lm.pad(lm.encode([header + text for text in TEXTS], prompt=True))
    shared = len(lm.encode([header], prompt=True)[0]) - 1  # the header's last token may merge with what follows
    assert (ids[:, :shared] == ids[:1, :shared]).all() and shared > 8
    if arch == "gemma2-window4":  # the window is in force: the same weights read otherwise with Gemma 2's default one
        wide = language_model("gemma2")
        wide.model.load_state_dict(lm.model.state_dict())
        assert not torch.allclose(last_token_states(wide.model, ids, mask), last_token_states(lm.model, ids, mask), atol=1e-3)
    for positions in (None, "all", "after_prompt"):
        with steer(lm.model, {0: vector(seed=5)}, positions) if positions else nullcontext():
            whole = last_token_states(lm.model, ids, mask, layers)
            prefix = shared_prefix(lm.model, ids[:1, :shared], layers)
            if prefix is None:  # blocks handed legacy (key, value) tuples, not a Cache: older transformers only
                assert arch != "llama" and Version(transformers.__version__) < Version("4.56")
                pytest.skip(f"{arch} under transformers {transformers.__version__} hands its blocks no DynamicCache")
            assert prefix.length == shared
            rest = last_token_states(lm.model, ids[:, shared:], mask[:, shared:], layers, prefix)
            again = last_token_states(lm.model, ids[:, shared:], mask[:, shared:], layers, prefix)  # the kept cache is not grown
        torch.testing.assert_close(rest, whole, rtol=1e-4, atol=1e-4)
        assert torch.equal(again, rest)
    # by the deepest block read, the layers before it have let go of their keys and values (one layer's held at a time)
    deepest = 2 if layers is None else max(layers)
    held: list[list[bool]] = []
    blocks = decoder_layers(lm.model)
    handle = blocks[deepest].register_forward_pre_hook(
        lambda _m, args, kwargs: held.append([layer_tensors(cache_among([*args, *kwargs.values()]), i) is not None for i in range(deepest + 1)]),
        with_kwargs=True,
    )  # fmt: skip
    try:
        last_token_states(lm.model, ids[:, shared:], mask[:, shared:], layers, prefix)
    finally:
        handle.remove()
    assert held == [[False] * deepest + [True]]
    if layers is not None:  # a prefix run to layer 1 has no keys further down: a deeper read is refused, not run without it
        with pytest.raises(ValueError, match="the shared prefix was run to layer 1"):
            last_token_states(lm.model, ids[:, shared:], mask[:, shared:], [2], prefix)
    assert all(layer_tensors(prefix.cache, i) is not None for i in range(deepest + 1)), "the kept prefix is untouched"
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in blocks)


def test_a_cache_holding_more_than_keys_and_values_is_not_shared(monkeypatch):
    """LFM2's convolution layer keeps a state it updates in place (transformers 4.56+: one DynamicCache with layers of
    several kinds): its prefix is not shared, and the extraction runs every text whole to the same means."""
    lm = language_model("lfm2", batch_size=2)
    pairs = [(f"persona: honest q: a{i} b{i % 3} =", f"persona: liar q: a{i} =") for i in range(5)]
    with lm.prefixed(" ".join(f"q: a{i} b{i} = {i % 5} ;" for i in range(12)) + " "):
        planned = contrast_texts(lm, pairs)
        assert planned.shared >= SHARED_PREFIX_MIN_TOKENS
        assert shared_prefix(lm.model, torch.tensor([planned.ids[0][: planned.shared]])) is None
        diff, norm = mean_difference(lm, pairs)
        monkeypatch.setattr("workers.methods.steer_mean.SHARED_PREFIX_MIN_TOKENS", 10**9)
        expected, expected_norm = mean_difference(lm, pairs)
    assert torch.equal(diff, expected) and torch.equal(norm, expected_norm)


def test_contrast_texts_under_a_long_shared_prefix_run_it_once(monkeypatch):
    """A `prompt` part's demonstrations in front of every contrast text (`prompt+steer_mean`) run once per
    extraction, not once per text: the same means, a fraction of the forward tokens."""
    lm = language_model(batch_size=2)
    pairs = [(f"persona: honest q: a{i} b{i % 3} =", f"persona: liar q: a{i} =" + " 1 ;" * (i % 3)) for i in range(7)]
    demonstrations = " ".join(f"q: a{i} b{i} = {i % 5} ;" for i in range(12)) + " "
    with lm.prefixed(demonstrations):
        planned = contrast_texts(lm, pairs)
        assert planned.shared >= SHARED_PREFIX_MIN_TOKENS
        tokens = lm.forward_tokens
        diff, norm = mean_difference(lm, pairs)
        shared_run = lm.forward_tokens - tokens
        monkeypatch.setattr("workers.methods.steer_mean.SHARED_PREFIX_MIN_TOKENS", 10**9)  # every text whole
        tokens = lm.forward_tokens
        expected, expected_norm = mean_difference(lm, pairs)
        whole_run = lm.forward_tokens - tokens
    torch.testing.assert_close(diff, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm, expected_norm, rtol=1e-5, atol=1e-5)
    assert whole_run == sum(map(len, planned.ids))
    assert shared_run == whole_run - (len(planned.ids) - 1) * planned.shared


def test_contrast_forwards_that_run_out_of_memory_run_again_halved(capfd):
    """steer_mean's extraction forwards (2 × batch_size texts) went out with the cell on an out-of-memory: they
    now halve as scoring batches do, down to two texts, to the same means and the same forward tokens."""
    pairs = [(f"persona: honest q: a{i} b{i % 3} =", f"persona: liar q: a{i} =" + " 1 ;" * (i % 3)) for i in range(9)]
    clean = language_model(batch_size=1)  # one pair a forward: what the halving ends at
    expected, expected_norm = mean_difference(clean, pairs)
    lm = language_model(batch_size=4)  # eight texts a forward
    with out_of_memory_past(lm, 2):
        diff, norm = mean_difference(lm, pairs)
    assert torch.allclose(diff, expected, atol=1e-6) and torch.allclose(norm, expected_norm, atol=1e-6)
    assert (lm.forward_tokens, lm.batch_size, lm.halved_to) == (clean.forward_tokens, 1, 1)  # failed tries not counted
    said = capfd.readouterr().err
    assert "out of accelerator memory on a batch of 8" in said and "out of accelerator memory on a batch of 4" in said
    with out_of_memory_past(lm, 1), pytest.raises(torch.OutOfMemoryError):  # a pair that does not fit fails the cell
        mean_difference(lm, pairs)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradients_flow_through_a_steered_model(arch):
    lm = language_model(arch)
    v = torch.nn.Parameter(torch.zeros(HIDDEN))
    with steer(lm.model, {1: v}, "after_prompt"):
        lm.loss(batch(lm)).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gemma3"])
def test_after_prompt_leaves_prompt_positions_alone(arch):
    lm = language_model(arch)
    b = batch(lm)
    plain = lm.forward(b)
    with steer(lm.model, {0: vector()}, "after_prompt"):
        after = lm.forward(b)
    with steer(lm.model, {0: vector()}, "all"):
        everywhere = lm.forward(b)
    # the vector added by hand at each row's prompt_last and every position after it, and nowhere else: a hook
    # that steered prompt_last alone also changed every later logit (attention carries it forward)
    from_last = (torch.arange(b.input_ids.shape[1])[None, :] >= b.prompt_last[:, None].cpu()).float()[..., None]
    handle = decoder_layers(lm.model)[0].register_forward_hook(lambda _m, _i, out: _add(out, vector(), from_last))
    try:
        by_hand = lm.forward(b)
    finally:
        handle.remove()
    for row, last in enumerate(b.prompt_last.tolist()):
        n = int(b.attention_mask[row].sum())
        assert torch.allclose(after[row, :last], plain[row, :last], atol=1e-6)
        assert not torch.allclose(after[row, last:n], plain[row, last:n], atol=1e-4)
        assert torch.allclose(after[row, :n], by_hand[row, :n], atol=1e-5)
        assert not torch.allclose(everywhere[row, :last], plain[row, :last], atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gemma2"])
def test_batched_equals_one_at_a_time_under_steering(arch):
    lm = language_model(arch)
    choices = [(" 0", " 1 2", " 3"), (" 4", " 0 ;"), (" 1", " 2")]
    with steer(lm.model, {1: vector()}, "after_prompt"):
        batched = lm.choice_logprobs(TEXTS, choices)
        single = [lm.choice_logprobs([t], [c])[0] for t, c in zip(TEXTS, choices)]
    for a, b in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4)


def greedy_without_cache(lm, prompt: str, steps: int, vectors, positions) -> list[int]:
    """The reference: re-run the whole sequence each step, steering from the prompt's last token."""
    ids = lm.tokenizer(prompt)["input_ids"]
    last = torch.tensor([len(ids) - 1])
    with steer(lm.model, vectors, positions), prompt_boundary(last), torch.no_grad():
        for _ in range(steps):
            logits = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(lm.tokenizer(prompt)["input_ids"]) :]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2", "gemma2", "gemma3"])
def test_generation_with_cache_steers_only_after_the_prompt(arch):
    lm = language_model(arch)
    vectors = {1: vector(norm=20.0)}
    prompts = ["q: a1 b2 =", "persona: liar q: a7 b7 = 3 ; q: a2 b2 ="]
    with steer(lm.model, vectors, "after_prompt"):
        batched = lm.generate(prompts, max_new_tokens=5)  # left padding, KV cache
        single = [lm.generate([p], max_new_tokens=5)[0] for p in prompts]
    reference = [lm.tokenizer.decode(greedy_without_cache(lm, p, 5, vectors, "after_prompt")) for p in prompts]
    plain = lm.generate(prompts, max_new_tokens=5)
    assert batched == single == reference
    assert batched != plain, "the vector is large enough that steering must change the greedy output"


def test_hooks_are_removed_when_the_body_raises():
    lm = language_model()
    with pytest.raises(ValueError, match="boom"):
        with steer(lm.model, {0: vector(), 2: vector()}, "after_prompt"):
            raise ValueError("boom")
    assert not any(layer._forward_hooks for layer in decoder_layers(lm.model))
    assert not lm.model._forward_pre_hooks


def test_unknown_layout_fails_loudly():
    with pytest.raises(ValueError, match="cannot find decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_boundary_must_match_the_batch():
    lm = language_model()
    with steer(lm.model, {0: vector()}, "after_prompt"), prompt_boundary(torch.tensor([1])):
        with pytest.raises(ValueError, match="covers 1 rows"):
            lm.model(input_ids=torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma3"])
def test_cached_generation_logits_match_a_full_recompute(arch):
    """Step by step, generation's logits (KV cache, left padding) equal re-running the whole sequence."""
    lm = language_model(arch)
    tok = lm.tokenizer
    tok.padding_side = "left"
    prompts = ["q: a1 b2 =", "persona: liar q: a7 b7 = 3 ; q: a2 b2 ="]
    enc = tok(prompts, return_tensors="pt", padding=True)
    width = enc["input_ids"].shape[1]
    vectors = {1: vector(norm=3.0)}
    with steer(lm.model, vectors, "after_prompt"), prompt_boundary(torch.full((2,), width - 1)), torch.no_grad():
        out = lm.model.generate(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True
        )
    cached = torch.stack(out.scores, 1)  # (batch, steps, vocab)
    for row, prompt in enumerate(prompts):
        ids = tok(prompt)["input_ids"]
        generated = out.sequences[row, width:].tolist()
        full = torch.tensor([ids + generated])
        recomputed = {}
        for positions in ("after_prompt", "all"):
            with steer(lm.model, vectors, positions), prompt_boundary(torch.tensor([len(ids) - 1])), torch.no_grad():
                logits = lm.model(input_ids=full, use_cache=False).logits[0, len(ids) - 1 : -1]
            recomputed[positions] = logits
        assert torch.allclose(cached[row], recomputed["after_prompt"], atol=1e-4)
        assert not torch.allclose(cached[row], recomputed["all"], atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_extraction_under_an_after_prompt_vector_steers_only_the_token_read(arch):
    """A composition's second steering part is extracted on the model steered by its first: an
    `after_prompt` vector then acts where it acts on a prompt at evaluation, at the last token only,
    not at every position of the contrast texts."""
    lm = language_model(arch)
    ids, mask = lm.pad(lm.encode(TEXTS, prompt=True))
    v = vector(seed=3)
    with steer(lm.model, {0: v}, "after_prompt"):
        got = last_token_states(lm.model, ids, mask)
    last = mask.sum(-1) - 1
    only_last = torch.zeros(*ids.shape, 1)
    only_last[torch.arange(len(TEXTS)), last] = 1.0
    handle = decoder_layers(lm.model)[0].register_forward_hook(lambda _m, _i, out: _add(out, v, only_last))
    try:
        expected = last_token_states(lm.model, ids, mask)
    finally:
        handle.remove()
    with steer(lm.model, {0: v}, "all"):
        everywhere = last_token_states(lm.model, ids, mask)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got[1:], everywhere[1:], atol=1e-3), "steering every position must give other states"
