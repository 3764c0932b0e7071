"""Runs inside `.venv-peers` (steering-vectors needs transformers<5): both extractions, timed, as JSON.

Both sides run in this one process on the same model object, so the comparison is not skewed by
the two venvs' transformers versions. Reads its settings as JSON on stdin, writes JSON on stdout.
"""

from __future__ import annotations

import json
import sys
from unittest import mock

import steering_vectors as sv
import torch
from transformers import LlamaForCausalLM

from benchmarks.common import time_alternating
from workers.lm import LanguageModel
from workers.methods import steer_mean
from workers.methods.steer_mean import SteerMeanConfig, contrast_texts, layer_indices, mean_difference, run_contrast_texts
from workers.models.tokenizer import build_tokenizer


def main() -> None:
    args = json.load(sys.stdin)
    torch.set_num_threads(args["threads"])
    model = LlamaForCausalLM.from_pretrained(args["path"]).eval()
    lm = LanguageModel(model=model, tokenizer=build_tokenizer(), batch_size=args["batch_size"])
    pairs = [tuple(p) for p in args["pairs"]]
    every = list(range(model.config.num_hidden_layers))
    candidates = layer_indices(SteerMeanConfig().layers, len(every))  # what steer_mean reads by default

    def ours(layers: list[int]) -> torch.Tensor:
        return mean_difference(lm, pairs, layers)[0]

    def theirs(layers: list[int], batch_size: int, on: list[tuple[str, str]] = pairs) -> torch.Tensor:
        vector = sv.train_steering_vector(model, lm.tokenizer, on, layers=layers, read_token_index=-1, batch_size=batch_size)
        return torch.stack([vector.layer_activations[i].float() for i in layers])

    planned = contrast_texts(lm, pairs)  # ours with its texts already encoded, deduplicated and sorted

    def ours_forwards(layers: list[int]) -> torch.Tensor:
        return run_contrast_texts(lm, planned, layers)[0]

    texts = 2 * args["batch_size"]  # ours runs a batch's positives and negatives in one forward: the peer as many texts
    a, b = ours(every), theirs(every, texts)
    if not torch.equal(a, ours_forwards(every)):
        raise AssertionError("the forwards-only side computes another vector than mean_difference")
    cosines = torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
    sides = {
        "ours_every": lambda: ours(every),
        "theirs_every": lambda: theirs(every, texts),
        "ours_forwards_every": lambda: ours_forwards(every),
    }
    if candidates != every:  # on a rung as shallow as the ladder's, steer_mean reads every layer: the same work
        sides |= {"ours_candidates": lambda: ours(candidates), "theirs_candidates": lambda: theirs(candidates, texts)}
    times = time_alternating(sides, warmup=args["warmup"], repeats=args["repeats"])
    if args["peer_default_batch"]:  # one pair per step: ~10× slower, so a few repeats, and only in the full run
        times |= time_alternating({"theirs_every_default_batch": lambda: theirs(every, 1)}, warmup=0, repeats=3)
    # a `prompt` part's demonstrations in front of every text (prompt+steer_mean): ours runs them once
    prefixed = [tuple(p) for p in args["prefixed_pairs"]]
    a_prefixed, b_prefixed = mean_difference(lm, prefixed, every)[0], theirs(every, texts, prefixed)
    with mock.patch.object(steer_mean, "SHARED_PREFIX_MIN_TOKENS", 10**9):  # ours with every text run whole
        whole = mean_difference(lm, prefixed, every)[0]
    times |= time_alternating({
        "ours_prefixed": lambda: mean_difference(lm, prefixed, every)[0], "theirs_prefixed": lambda: theirs(every, texts, prefixed),
    }, warmup=1, repeats=args["prefixed_repeats"])  # fmt: skip
    json.dump({
        "cosines": cosines, "max_abs_diff": float((a - b).abs().max()), "max_abs": float(a.abs().max()), "candidates": candidates,
        "prefixed_cosines": torch.nn.functional.cosine_similarity(a_prefixed, b_prefixed, dim=-1).tolist(),
        "prefixed_max_abs_diff": float((a_prefixed - b_prefixed).abs().max()), "prefixed_max_abs": float(a_prefixed.abs().max()),
        "prefixed_shared": contrast_texts(lm, prefixed).shared, "prefixed_vs_whole": float((a_prefixed - whole).abs().max() / whole.abs().max()),
        "seconds": {k: [list(t.seconds), list(t.cpu_seconds)] for k, t in times.items()},
        "versions": {"transformers": __import__("transformers").__version__, "steering_vectors": _version("steering-vectors")},
    }, sys.stdout)  # fmt: skip


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
