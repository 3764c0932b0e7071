"""The world's tokenizer: a Hugging Face fast word-level tokenizer over the fixed vocabulary.

A real `PreTrainedTokenizerFast` (saved as tokenizer.json), so ladder models load with
`AutoTokenizer.from_pretrained` and go through exactly the code path of hub models. Encoding with
special tokens prepends `<bos>` (as Llama tokenizers do) and never appends `<eos>`, so a prompt
encoded with specials followed by a continuation encoded without them is one well-formed sequence.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from workers.world.vocab import BOS, EOS, PAD, UNK, WORDS


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(WORDS)}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = WhitespaceSplit()
    core.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=1024
    )
