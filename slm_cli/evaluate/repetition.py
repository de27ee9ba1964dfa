"""Degenerate loops in greedy decoding: the fraction of repeated n-grams in a model's continuations.

A model pruned without retraining often falls into loops when decoding greedily ("the the the",
or a sentence over and over) even where its perplexity looks fine. The figure used here is, over
each continuation's generated tokens t_1..t_m, the share of its n-grams (t_i..t_{i+n-1}) that
already occurred earlier in the same continuation:

    repeated(n) = 1 - distinct n-grams / n-grams        (pooled over continuations)

0 means no n-gram ever repeats; a continuation that loops on a k-token cycle tends to
1 - (k / m). The figure depends on the prompts as much as on the model: continuing raw Python-docs
text (8 prompts of 64 tokens, 128 new tokens, n=4), dense SmolLM2-135M-Instruct already scores 70%
(it loops on reST markup and on its own sentences), so compare models on the same prompts only.
For a chat model, `chat_prompts` gives prompts on which a healthy model answers without looping:
eight short general questions, each in the tokenizer's own chat template.
"""

from __future__ import annotations

from typing import Sequence

import torch


def repeated_ngrams(tokens: Sequence[int], n: int = 4) -> tuple[int, int]:
    """(n-grams that repeat an earlier one, n-grams) of one token sequence."""
    if n < 1:
        raise ValueError(f"n={n}: an n-gram needs n >= 1")
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def repeated_ngram_fraction(sequences: Sequence[Sequence[int]], n: int = 4) -> float:
    """Pooled ``repeated(n)`` of several sequences (see the module doc); 0.0 when none has n tokens."""
    repeated = total = 0
    for seq in sequences:
        r, t = repeated_ngrams(seq, n)
        repeated, total = repeated + r, total + t
    return repeated / total if total else 0.0


def text_prompts(text: str, tokenizer, count: int = 8, prompt_tokens: int = 64) -> list[list[int]]:
    """``count`` prompts of ``prompt_tokens`` token ids, evenly spaced over ``text``'s tokens."""
    ids = list(tokenizer(text, verbose=False)["input_ids"])
    if len(ids) < prompt_tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one prompt of {prompt_tokens}")
    last = len(ids) - prompt_tokens
    starts = [round(i * last / max(count - 1, 1)) for i in range(count)] if count > 1 else [0]
    return [ids[s : s + prompt_tokens] for s in starts]


# Eight general questions with short factual or explanatory answers (the project's own wording).
CHAT_QUESTIONS = (
    "What is the capital of France, and what river runs through it?",
    "Explain in two sentences why the sky looks blue.",
    "Give three tips for writing a clear email to a colleague.",
    "What is the difference between a list and a tuple in Python?",
    "Describe how a bicycle converts pedalling into motion.",
    "Name three planets of the solar system and one fact about each.",
    "How do I boil an egg so that the yolk stays soft?",
    "Why do leaves change colour in autumn?",
)


def chat_prompts(tokenizer, questions: Sequence[str] = CHAT_QUESTIONS) -> list[list[int]]:
    """Each question as one user turn in the tokenizer's chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: use text_prompts for a base model")
    return [
        list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"])
        for q in questions
    ]


@torch.no_grad()
def greedy_repetition(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 128, n: int = 4,
                      batch_size: int = 8) -> dict:
    """Greedy-decode ``max_new_tokens`` after every prompt (no stop strings; EOS ends a row) and
    measure the repeated n-gram fraction of the generated tokens.

    Returns {"repeated_ngrams": fraction, "n", "prompts", "new_tokens" (generated, pooled)}.
    """
    from slm_cli.data.tokenize import collate_prompts

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    continuations: list[list[int]] = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = {k: v.to(device) for k, v in collate_prompts(prompts[i : i + batch_size], pad_token_id=pad).items()}
            width = batch["input_ids"].shape[1]
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for row in out[:, width:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                continuations.append(row)
    finally:
        model.train(was_training)
    return {
        "repeated_ngrams": repeated_ngram_fraction(continuations, n),
        "n": n,
        "prompts": len(prompts),
        "new_tokens": sum(len(c) for c in continuations),
    }
