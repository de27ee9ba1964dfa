"""slm_cli.evaluate against direct computations on tiny real Llama models."""

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from slm_cli.data.tasks import TASKS
from slm_cli.data.tokenize import prompt_ids
from slm_cli.data.tokenizer import train_bpe_tokenizer
from slm_cli.evaluate import (
    accuracy,
    average_ranks,
    completion_logprobs,
    exact_match,
    few_shot_prompt,
    greedy_generate,
    perplexity,
    roc_auc,
    sliding_windows,
    yes_no_auc,
)

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
    "and by opposing end them. Calculate 2 + 2.\nAnswer: 4\n\nIs 3 - 1 = 2? Answer Yes or No.\nAnswer: Yes"
)


def make_tokenizer():
    texts = [TEXT] + [ex["prompt"] + ex["completion"] for ex in TASKS["arithmetic_yesno"].examples("train", 40, 0)]
    return train_bpe_tokenizer(texts, vocab_size=320)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def tiny_llama(vocab: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


# --- perplexity ------------------------------------------------------------------------------


def test_sliding_windows_score_every_token_once():
    for n, window, stride in itertools.product([2, 7, 30, 64], [2, 5, 16], [1, 3, 4, 15]):
        if stride >= window:
            continue
        scored = [t for _, end, first in sliding_windows(n, window, stride) for t in range(first, end)]
        assert scored == list(range(1, n)), (n, window, stride)
        for begin, end, first in sliding_windows(n, window, stride):
            assert end - begin <= window and begin < first  # every scored token keeps >= 1 context token


def test_sliding_windows_refuse_stride_without_context():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(100, 16, 16)


@torch.no_grad()
def _full_context_nll(model, ids: list[int]) -> float:
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return float(F.cross_entropy(logits, torch.tensor(ids[1:])))


def test_perplexity_equals_full_context_when_window_covers_text(tok):
    model = tiny_llama(len(tok))
    ids = tok(TEXT)["input_ids"]
    got = perplexity(model, tok, TEXT, window=len(ids) + 10, stride=4)
    assert got["tokens"] == len(ids) - 1 and got["windows"] == 1
    assert got["nll"] == pytest.approx(_full_context_nll(model, ids), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["nll"]), rel=1e-9)


@torch.no_grad()
def test_perplexity_stride_gives_each_token_its_window_context(tok):
    """Every token t is scored by the window that ends first past it, with context from that window's
    begin: window k ends at min(w + k*s, N) and begins w tokens earlier. Checked token by token."""
    model = tiny_llama(len(tok), seed=1)
    ids = tok(TEXT)["input_ids"][:40]
    n, w, s = len(ids), 12, 5
    total = 0.0
    for t in range(1, n):
        k = 0 if t < w else math.ceil((t + 1 - w) / s)
        begin = max(0, min(w + k * s, n) - w)
        logits = model(input_ids=torch.tensor([ids[begin:t]])).logits[0, -1]
        total += float(F.cross_entropy(logits[None], torch.tensor([ids[t]])))
    for batch_size in (1, 3):
        got = perplexity(model, tok, TEXT, window=w, stride=s, max_tokens=40, batch_size=batch_size)
        assert got["tokens"] == n - 1
        assert got["nll"] == pytest.approx(total / (n - 1), rel=1e-5)
    # less context per token than one full-context pass: the numbers differ
    assert got["nll"] != pytest.approx(_full_context_nll(model, ids), rel=1e-4)


# --- AUC and accuracy --------------------------------------------------------------------------


def pairwise_auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    assert average_ranks([3, 3, 3]) == [2, 2, 2]


def test_roc_auc_matches_pairwise_count():
    rng = random.Random(0)
    for trial in range(50):
        n = rng.randint(2, 40)
        labels = [rng.randint(0, 1) for _ in range(n)]
        labels[0], labels[1] = 0, 1
        scores = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]  # many ties
        assert roc_auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels), abs=1e-12)
    assert roc_auc([0.1, 0.9], [0, 1]) == 1.0
    assert roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert roc_auc([0.5, 0.5], [0, 1]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


# --- generation and exact match ---------------------------------------------------------------


def lookup_model(tok, next_token: dict[int, int]) -> LlamaForCausalLM:
    """A real Llama whose greedy next token depends only on the current token: `next_token[a]`,
    else EOS. Attention and MLP outputs are zeroed, so the last hidden state is the current token's
    embedding; embeddings are orthogonal rows, and lm_head row j is the sum of the embeddings of
    the tokens that should be followed by j, so logit j is 512 exactly for those and 0 otherwise."""
    vocab, hidden = len(tok), 512
    model = tiny_llama(vocab, hidden_size=hidden, num_hidden_layers=1, tie_word_embeddings=False)
    q, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(0)))
    emb = q[:vocab] * math.sqrt(hidden)  # RMS 1 per row: the final RMSNorm leaves it unchanged
    head = torch.zeros(vocab, hidden)
    for a in range(vocab):
        head[next_token.get(a, tok.eos_token_id)] += emb[a]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(emb)
        model.lm_head.weight.copy_(head)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def chain(tok, after: int, text: str) -> dict[int, int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    seq = [after, *ids]
    assert len(set(seq)) == len(seq), "the lookup chain needs distinct tokens"
    return dict(zip(seq, ids))


def test_exact_match_scores_generations_with_the_task(tok):
    task = TASKS["arithmetic"]
    examples = [
        {"prompt": "Calculate 2 + 2.\nAnswer:", "completion": " 4", "answer": "4"},
        {"prompt": "Calculate 2 + 3.\nAnswer:", "completion": " 5", "answer": "5"},
        {"prompt": "Calculate 1 + 3.\nAnswer:", "completion": " 4", "answer": "4"},
    ]
    last = prompt_ids(examples[0], tok)[-1]
    assert all(prompt_ids(ex, tok)[-1] == last for ex in examples)
    model = lookup_model(tok, chain(tok, last, " 4"))  # always answers " 4", then EOS
    got = exact_match(model, tok, task, examples, batch_size=2, max_new_tokens=6)
    assert [p["generation"] for p in got["predictions"]] == [" 4"] * 3
    assert [p["correct"] for p in got["predictions"]] == [1.0, 0.0, 1.0]
    assert got["exact_match"] == pytest.approx(2 / 3) and got["correct"] == 2 and got["n"] == 3


def test_generation_stops_at_blank_line():
    """A few-shot model goes on to write the next question; generation is cut at the blank line,
    so the next question's numbers never reach the scorer."""
    tok = make_tokenizer()
    tok.add_tokens(["\n\n"])  # one token, as in SmolLM2's vocabulary, so the lookup chain has distinct tokens
    task = TASKS["gsm_symbolic"]
    example = {"prompt": "Calculate 2 + 2.\nAnswer:", "completion": " 4", "answer": "4"}
    last = prompt_ids(example, tok)[-1]
    model = lookup_model(tok, chain(tok, last, " 4\n\nIs 9"))
    cut = exact_match(model, tok, task, [example], batch_size=1, max_new_tokens=12)
    assert cut["predictions"][0]["generation"] == " 4" and cut["exact_match"] == 1.0
    full = exact_match(model, tok, task, [example], batch_size=1, max_new_tokens=12, stop=())
    assert full["predictions"][0]["generation"] == " 4\n\nIs 9"
    assert full["predictions"][0]["extracted"] == "9" and full["exact_match"] == 0.0


def test_chat_prompting_sends_the_prompt_as_a_user_turn(tok):
    """With chat=True the model sees the chat template's generation prompt, which ends differently
    from the raw prompt; the lookup model answers only after the template's last token."""
    task = TASKS["arithmetic"]
    example = {"prompt": "Calculate 2 + 2.\nAnswer:", "completion": " 4", "answer": "4"}
    chat_ids = tok.apply_chat_template([{"role": "user", "content": example["prompt"]}], add_generation_prompt=True, tokenize=False)
    chat_ids = tok(chat_ids, add_special_tokens=False)["input_ids"]
    assert chat_ids[-1] != prompt_ids(example, tok)[-1]
    model = lookup_model(tok, chain(tok, chat_ids[-1], " 4"))
    raw = exact_match(model, tok, task, [example], batch_size=1, max_new_tokens=4)
    chat = exact_match(model, tok, task, [example], batch_size=1, max_new_tokens=4, chat=True)
    assert raw["predictions"][0]["generation"] == "" and chat["predictions"][0]["generation"] == " 4"
    assert chat["exact_match"] == 1.0


def test_few_shot_prompt_prepends_solved_train_examples(tok):
    task = TASKS["arithmetic"]
    shots = task.examples("train", 2, 0)
    ex = task.examples("test", 1, 0)[0]
    prompt = few_shot_prompt(ex, shots)["prompt"]
    assert prompt == f"{shots[0]['prompt']}{shots[0]['completion']}\n\n{shots[1]['prompt']}{shots[1]['completion']}\n\n{ex['prompt']}"
    model = tiny_llama(len(tok))
    got = exact_match(model, tok, task, [ex], batch_size=1, max_new_tokens=2, few_shot=2)
    assert got["few_shot"] == 2 and got["predictions"][0]["prompt"] == ex["prompt"]


@torch.no_grad()
def test_batched_cached_generation_matches_a_plain_greedy_loop(tok):
    """Left padding and the KV cache change nothing: each row equals argmax decoding without cache."""
    model = tiny_llama(len(tok), seed=3)
    prompts = [tok(t)["input_ids"] for t in ("Calculate 2 + 2.\nAnswer:", "To be", "Is 3 - 1 = 2? Answer Yes or No.\nAnswer:")]
    batched = greedy_generate(model, tok, prompts, batch_size=3, max_new_tokens=5, stop=())
    for ids, text in zip(prompts, batched):
        seq = list(ids)
        for _ in range(5):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            seq.append(nxt)
        assert text == tok.decode(seq[len(ids):], skip_special_tokens=True)


# --- yes/no AUC ---------------------------------------------------------------------------------


@torch.no_grad()
def test_yes_no_auc_matches_direct_log_odds(tok):
    model = tiny_llama(len(tok), seed=2)
    examples = TASKS["arithmetic_yesno"].examples("test", 12, 0)
    got = yes_no_auc(model, tok, examples, batch_size=5)

    def logp(ids, cont):
        logits = model(input_ids=torch.tensor([ids + cont])).logits[0].log_softmax(-1)
        return sum(float(logits[len(ids) - 1 + i, c]) for i, c in enumerate(cont))

    yes, no = (tok(c, add_special_tokens=False)["input_ids"] for c in (" Yes", " No"))
    direct = [logp(prompt_ids(ex, tok), yes) - logp(prompt_ids(ex, tok), no) for ex in examples]
    labels = [ex["label"] for ex in examples]
    assert got["scores"] == pytest.approx(direct, abs=1e-4)
    assert got["auc"] == pytest.approx(pairwise_auc(direct, labels))
    assert got["accuracy"] == pytest.approx(sum((d > 0) == y for d, y in zip(direct, labels)) / len(labels))
    assert got["n"] == 12 and got["positives"] == 6


def test_completion_logprobs_sum_over_tokens(tok):
    model = tiny_llama(len(tok), seed=4)
    p, c = tok("To be, or")["input_ids"], tok(" not to be", add_special_tokens=False)["input_ids"]
    (got,) = completion_logprobs(model, tok, [p], [c], batch_size=1)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
    assert got == pytest.approx(sum(float(logits[len(p) - 1 + i, t]) for i, t in enumerate(c)), abs=1e-5)


# --- sources -------------------------------------------------------------------------------------


def test_eval_sources_pick_the_metric_that_fits(tmp_path):
    from slm_cli.data.errors import DataError
    from slm_cli.evaluate.sources import choose_metric, load_eval_data

    yesno = load_eval_data("arithmetic_yesno", "test", 4, seed=0)
    assert yesno.kind == "predictive" and len(yesno.examples) == 4
    assert choose_metric(yesno, "auto") == "auc" and choose_metric(yesno, "exact_match") == "exact_match"
    assert choose_metric(load_eval_data("arithmetic", "validation", 3, seed=0), "auto") == "exact_match"

    text = tmp_path / "text.jsonl"
    text.write_text("".join(f'{{"text": "line {i}"}}\n' for i in range(10)))
    data = load_eval_data(str(text), "test", None, seed=0, val_fraction=0.2)
    assert data.kind == "text" and data.text.count("line") == 2 and choose_metric(data, "auto") == "perplexity"
    with pytest.raises(DataError, match="eval.metric=perplexity"):
        choose_metric(data, "auc")

    pc = tmp_path / "pc.jsonl"
    pc.write_text("".join(f'{{"prompt": "q{i}", "completion": " a{i}"}}\n' for i in range(10)))
    data = load_eval_data(str(pc), "validation", None, seed=0, val_fraction=0.3)
    assert data.kind == "generative" and len(data.examples) == 3 and data.task is None
