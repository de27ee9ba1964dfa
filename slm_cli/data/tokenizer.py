"""Train a small byte-level BPE tokenizer for models built from scratch.

Byte-level BPE (GPT-2 style) starts from the 256 byte values, so any UTF-8 text encodes with
no unknown token, then learns `vocab_size - 256 - len(SPECIAL_TOKENS)` merges of the most
frequent adjacent pairs. Special tokens:

* ``<|pad|>`` pads batches (its positions are masked out of attention and loss);
* ``<|endoftext|>`` separates documents;
* ``<|im_start|>`` / ``<|im_end|>`` delimit ChatML turns.

``<|im_end|>`` is the end-of-sequence token, as in ChatML instruct models: a prompt/completion
example ends with eos and an assistant turn ends with ``<|im_end|>``, so both teach the model
the one token generation stops on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from slm_cli.data.errors import DataError

PAD, ENDOFTEXT, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, ENDOFTEXT, IM_START, IM_END]
BYTE_ALPHABET = 256

# ChatML: every turn is "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt opens
# an assistant turn. Rendering a conversation prefix is a string prefix of the whole, which is
# what tokenize.py relies on to find assistant spans.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, save_dir: str | Path | None = None):
    """A `PreTrainedTokenizerFast` with byte-level BPE learned on `texts` (same texts -> same ids).

    Saved with `save_pretrained` when `save_dir` is given, so `AutoTokenizer.from_pretrained`
    reloads it unchanged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise DataError(f"vocab_size={vocab_size} is too small for byte-level BPE; use at least {minimum}.")
    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise DataError("train_bpe_tokenizer: no text to learn merges from; pass a non-empty corpus.")

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer, length=len(texts))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=IM_END,
        unk_token=None,
        additional_special_tokens=[ENDOFTEXT, IM_START],
        model_max_length=1_000_000,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer
