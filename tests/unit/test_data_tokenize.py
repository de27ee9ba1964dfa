"""Completion-only encoding, collation and the small BPE tokenizer, on a real tokenizer and tiny Llama."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from slm_cli.data.errors import DataError
from slm_cli.data.tokenize import (
    IGNORE_INDEX,
    EncodedExample,
    check_batch_fits,
    collate,
    collate_prompts,
    encode_dataset,
    encode_example,
    prompt_ids,
)
from slm_cli.data.tokenizer import IM_END, PAD, train_bpe_tokenizer

CORPUS = [
    "Calculate 5 - 3 - 6.\nAnswer: -4",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "hello there, general kenobi. The answer is yes or no.",
] * 4

PC = {"prompt": "Calculate 5 - 3 - 6.\nAnswer:", "completion": " -4"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "general kenobi"},
    ]
}


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=320)


def targets(encoded):
    return [i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]


def test_prompt_completion_labels_only_completion_and_eos(tok):
    encoded = encode_example(PC, tok, max_seq_len=64)
    prompt = tok(PC["prompt"])["input_ids"]
    completion = tok(PC["completion"], add_special_tokens=False)["input_ids"]
    assert encoded.input_ids == prompt + completion + [tok.eos_token_id]
    assert encoded.labels == [IGNORE_INDEX] * len(prompt) + completion + [tok.eos_token_id]
    assert not encoded.truncated
    assert tok.decode(targets(encoded)) == " -4" + IM_END
    assert prompt_ids(PC, tok) == prompt


def test_messages_label_only_assistant_content_and_end_token(tok):
    encoded = encode_example(CHAT, tok, max_seq_len=256)
    rendered = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert encoded.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    for ids, label in zip(encoded.input_ids, encoded.labels):
        assert label in (IGNORE_INDEX, ids)
    # the unmasked tokens form exactly the two assistant turns, each closed by its end token
    runs, current = [], []
    for ids, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            current.append(ids)
        elif current:
            runs.append(tok.decode(current))
            current = []
    assert runs == ["hello there" + IM_END, "general kenobi" + IM_END]


def test_messages_prompt_is_the_prefix_before_the_last_assistant_turn(tok):
    encoded = encode_example(CHAT, tok, max_seq_len=256)
    prompt = prompt_ids(CHAT, tok)
    assert encoded.input_ids[: len(prompt)] == prompt
    assert tok.decode(prompt).endswith("and?<|im_end|>\n<|im_start|>assistant\n")
    first_target = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    assert first_target < len(prompt)  # the earlier assistant turn is trained on, inside the prompt
    assert all(label != IGNORE_INDEX for label in encoded.labels[len(prompt) : len(prompt) + 3])


def test_text_records_label_every_token(tok):
    encoded = encode_example({"text": "To be, or not to be"}, tok, max_seq_len=64)
    assert encoded.labels == encoded.input_ids == tok("To be, or not to be")["input_ids"]
    with pytest.raises(DataError, match="no prompt"):
        prompt_ids({"text": "x"}, tok)


def test_truncation_counts_and_drops(tok):
    n_prompt = len(tok(PC["prompt"])["input_ids"])
    full = encode_example(PC, tok, max_seq_len=64)
    cut = encode_example(PC, tok, max_seq_len=n_prompt + 1)
    assert cut.truncated and cut.input_ids == full.input_ids[: n_prompt + 1] and len(targets(cut)) == 1
    assert encode_example(PC, tok, max_seq_len=n_prompt) is None  # nothing of the completion is left
    long_pc = {"prompt": PC["prompt"] * 5, "completion": PC["completion"]}
    encoded, stats = encode_dataset([PC, long_pc, PC], tok, max_seq_len=n_prompt + 1)
    assert (stats.total, stats.truncated, stats.dropped, stats.kept) == (3, 2, 1, 2)
    assert len(encoded) == 2
    with pytest.raises(DataError, match=r"all 2 examples were dropped.*data\.max_seq_len=3"):
        encode_dataset([PC, long_pc], tok, max_seq_len=3)


def test_collate_right_pads_and_masks(tok):
    a = encode_example(PC, tok, max_seq_len=64)
    b = EncodedExample(input_ids=[7, 8], labels=[IGNORE_INDEX, 8])
    batch = collate([a, b], pad_token_id=tok.pad_token_id)
    width = len(a.input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["input_ids"][1].tolist() == [7, 8] + [tok.pad_token_id] * (width - 2)
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (width - 2)
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 8] + [IGNORE_INDEX] * (width - 2)
    assert batch["labels"][0].tolist() == a.labels
    left = collate_prompts([[5, 6, 7], {"input_ids": [9]}], pad_token_id=0)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_model_loss_is_mean_nll_over_completion_tokens(tok):
    """The labels drive a real HF model's loss to the mean next-token NLL over target positions only."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    batch = collate([encode_example(PC, tok, 64), encode_example(CHAT, tok, 256)], tok.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    next_labels = batch["labels"][:, 1:]
    mask = next_labels != IGNORE_INDEX
    nll = -logp.gather(-1, next_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(out.loss, nll[mask].mean(), atol=1e-5)


def test_tokenizer_round_trip_and_determinism(tmp_path, tok):
    saved = train_bpe_tokenizer(CORPUS, vocab_size=320, save_dir=tmp_path / "tok")
    assert saved.get_vocab() == tok.get_vocab()  # same texts, same merges
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    samples = ["To be, or not to be <|im_end|> ünïcödé 12345", "<|im_start|>user\nhi<|im_end|>\n", PC["prompt"]]
    for text in samples:
        assert reloaded(text)["input_ids"] == tok(text)["input_ids"]
        assert reloaded.decode(tok(text)["input_ids"]) == text
    assert (reloaded.pad_token, reloaded.eos_token) == (PAD, IM_END)
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert reloaded.pad_token_id != reloaded.eos_token_id
    assert encode_example(CHAT, reloaded, 256) == encode_example(CHAT, tok, 256)
    assert tok.convert_ids_to_tokens(tok("<|im_start|>")["input_ids"]) == ["<|im_start|>"]
    with pytest.raises(DataError, match="vocab_size=100"):
        train_bpe_tokenizer(CORPUS, vocab_size=100)


def test_an_empty_split_is_named_with_the_setting_that_fills_it(tok):
    with pytest.raises(DataError, match=r"the validation split is empty.*data\.val_size >= 1"):
        encode_dataset([], tok, max_seq_len=64, split="validation")


def test_fewer_examples_than_one_batch_names_the_batch_size():
    check_batch_fits(16, 16, 1)
    with pytest.raises(DataError, match=r"has 5 example\(s\).*train\.micro_batch_size=4 x 2 process\(es\).*to 2 or less"):
        check_batch_fits(5, 4, 2)
