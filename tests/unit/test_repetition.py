"""The repeated n-gram figure (loops in greedy decoding) against hand counts, and its prompts."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from slm_cli.evaluate.repetition import (
    CHAT_QUESTIONS, chat_prompts, greedy_repetition, repeated_ngram_fraction, repeated_ngrams, text_prompts,
)


def test_repeated_ngrams_by_hand():
    assert repeated_ngrams([1, 2, 3, 4, 5, 6], n=4) == (0, 3)
    # a 2-token loop: 4-grams (1,2,1,2) and (2,1,2,1) alternate; of 7, 5 repeat an earlier one
    assert repeated_ngrams([1, 2] * 5, n=4) == (5, 7)
    assert repeated_ngrams([7, 7, 7], n=4) == (0, 0)
    # pooled over sequences, never across them
    assert repeated_ngram_fraction([[1, 2, 3, 4], [1, 2, 3, 4]], n=4) == 0.0
    assert repeated_ngram_fraction([[1, 2] * 5, [1, 2, 3, 4, 5, 6]], n=4) == pytest.approx(5 / 10)
    assert repeated_ngram_fraction([[1]], n=4) == 0.0
    with pytest.raises(ValueError, match="n >= 1"):
        repeated_ngrams([1, 2], n=0)


class _Chars:
    """A tokenizer stand-in: one id per character."""

    def __call__(self, text, verbose=False):
        return {"input_ids": [ord(c) for c in text]}


def test_text_prompts_are_evenly_spaced_and_cover_the_text():
    text = "".join(chr(65 + i % 26) for i in range(100))
    prompts = text_prompts(text, _Chars(), count=3, prompt_tokens=10)
    starts = [[ord(c) for c in text].index(p[0]) for p in prompts]
    assert [len(p) for p in prompts] == [10, 10, 10]
    assert prompts[0] == [ord(c) for c in text[:10]] and prompts[-1] == [ord(c) for c in text[-10:]]
    assert prompts[1] == [ord(c) for c in text[45:55]] and starts[0] == 0
    with pytest.raises(ValueError, match="fewer than one prompt"):
        text_prompts("short", _Chars(), prompt_tokens=10)


class _Tok:
    pad_token_id, eos_token_id = 0, 1


def test_greedy_repetition_counts_the_generated_tokens_only():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=40, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8], [9, 10, 11]]
    got = greedy_repetition(model, _Tok(), prompts, max_new_tokens=12)
    rows = []
    for p in prompts:  # the same greedy decode, one prompt at a time, without padding
        out = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=1)
        row = out[0, len(p):].tolist()
        rows.append(row[: row.index(1)] if 1 in row else row)
    assert got["new_tokens"] == sum(len(r) for r in rows)
    assert got["repeated_ngrams"] == pytest.approx(repeated_ngram_fraction(rows, 4))
    assert got["prompts"] == 2 and got["n"] == 4


def test_chat_prompts_put_each_question_in_the_template_and_refuse_a_base_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(set("".join(CHAT_QUESTIONS) + "<>asirtnu \n")))}
    raw = Tokenizer(models.WordLevel(vocab, unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompts(tok)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    prompts = chat_prompts(tok, questions=CHAT_QUESTIONS[:2])
    assert [tok.decode(p).replace(" ", "") for p in prompts] == [
        ("<user>" + q + "<assistant>").replace(" ", "") for q in CHAT_QUESTIONS[:2]
    ]
    assert len(chat_prompts(tok)) == len(CHAT_QUESTIONS) == 8
