"""data.packing: best-fit-decreasing rows with per-example positions; the loss of a packed batch equals
the loss of the same examples unpacked (attention does not cross examples), with less padding."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from slm_cli.data.tokenize import IGNORE_INDEX, EncodedExample, EncodeStats, collate, encode_dataset, pack_examples
from slm_cli.data.tokenizer import train_bpe_tokenizer
from slm_cli.engine.loop import sft_loss, target_tokens

CORPUS = ["Calculate 5 - 3 - 6.\nAnswer: -4", "To be, or not to be, that is the question.", "It is blue."] * 4
ROWS = [{"prompt": "Calculate " + " + ".join(["7"] * (1 + i % 5)) + ".\nAnswer:", "completion": f" {7 * (1 + i % 5)}"} for i in range(20)]
TEXT = [{"text": "To be, or not to be, that is the question."[: 12 + 3 * i]} for i in range(8)]
PAD = 0


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=300)


def model(kind: str, attn: str):
    torch.manual_seed(0)
    sizes = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(**sizes, attn_implementation=attn))
    else:
        m = Qwen3ForCausalLM(Qwen3Config(**sizes, head_dim=8, attn_implementation=attn))
    return m.double().eval()


def test_rows_hold_every_example_once_within_max_seq_len(tok):
    examples, stats = encode_dataset(ROWS, tok, max_seq_len=40, cache=False)
    rows = pack_examples(examples, 40, stats)
    assert stats.packed_rows == len(rows) < len(examples)
    assert all(len(r.input_ids) <= 40 for r in rows)
    pieces = []
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        assert starts[0] == 0 and row.position_ids == [p for a, b in zip(starts, starts[1:]) for p in range(b - a)]
        for a, b in zip(starts, starts[1:]):
            assert row.labels[a] == IGNORE_INDEX  # nothing may predict an example's first token from the one before
            pieces.append((tuple(row.input_ids[a:b]), tuple(row.labels[a + 1 : b])))
    assert sorted(pieces) == sorted((tuple(e.input_ids), tuple(e.labels[1:])) for e in examples)
    # best fit: no two rows could have been merged
    lengths = sorted(len(r.input_ids) for r in rows)
    assert lengths[0] + lengths[1] > 40


def test_packing_reduces_padding(tok):
    examples, _ = encode_dataset(ROWS, tok, max_seq_len=40, cache=False)
    rows = pack_examples(examples, 40)

    def padding(items, mb=4):
        batches = [collate(items[i : i + mb], PAD) for i in range(0, len(items), mb)]
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches), sum(b["input_ids"].numel() for b in batches)

    pad_unpacked, cells_unpacked = padding(examples)
    pad_packed, cells_packed = padding(rows)
    assert pad_packed < pad_unpacked / 2 and cells_packed < cells_unpacked
    assert sum(int(collate([r], PAD)["attention_mask"].sum()) for r in rows) == sum(len(e.input_ids) for e in examples)


@pytest.mark.parametrize("kind, attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen3", "sdpa")])
@pytest.mark.parametrize("rows", ["prompt_completion", "text"])
def test_packed_loss_equals_unpacked_loss(tok, kind, attn, rows):
    """Summed CE and target count of one packed batch = those of every example on its own."""
    records = ROWS if rows == "prompt_completion" else TEXT
    examples, _ = encode_dataset(records, tok, max_seq_len=48, cache=False)
    packed = pack_examples(examples, 48)
    assert len(packed) < len(examples)
    m = model(kind, attn)
    with torch.no_grad():
        batch = collate(packed, PAD)
        assert "position_ids" in batch
        loss_packed, _ = sft_loss(m, batch)
        loss_alone = sum(sft_loss(m, collate([e], PAD))[0] for e in examples)
        assert target_tokens(batch) == sum(target_tokens(collate([e], PAD)) for e in examples)
        torch.testing.assert_close(loss_packed, loss_alone, rtol=1e-6, atol=0)  # sft_loss takes the CE in fp32
        # the same rows with one plain causal mask over each row (attention crossing examples) differ
        crossing = {k: v for k, v in batch.items() if k != "position_ids"}
        assert abs(float(sft_loss(m, crossing)[0]) - float(loss_alone)) > 1e-3


def test_a_row_with_one_example_and_padding_matches_the_unpacked_row(tok):
    """The padding tail gets positions of its own; a batch whose rows each hold one example needs no block mask."""
    example = encode_dataset(ROWS[:1], tok, max_seq_len=48, cache=False)[0][0]
    long = EncodedExample(list(range(1, 41)), list(range(1, 41)))
    rows = pack_examples([example, long], 40)
    assert len(rows) == 2 and rows[1].position_ids == list(range(len(example.input_ids)))
    batch = collate(rows, PAD)
    tail = batch["position_ids"][1, len(example.input_ids) :]
    assert tail.tolist() == list(range(40 - len(example.input_ids)))
    m = model("llama", "sdpa")
    with torch.no_grad():
        torch.testing.assert_close(
            sft_loss(m, collate([rows[1]], PAD))[0], sft_loss(m, collate([example], PAD))[0], rtol=1e-6, atol=0
        )


def test_stats_record_the_rows():
    stats = EncodeStats(total=3)
    rows = pack_examples([EncodedExample([1, 2], [1, 2]), EncodedExample([3], [3]), EncodedExample([4, 5, 6], [4, 5, 6])], 3, stats)
    assert stats.packed_rows == 2 == len(rows)
    # longest first: [4, 5, 6] fills a row; [1, 2] opens a second, where [3] fits best
    assert [r.input_ids for r in rows] == [[4, 5, 6], [1, 2, 3]]
    assert [r.position_ids for r in rows] == [[0, 1, 2], [0, 1, 0]]
    assert [r.labels for r in rows] == [[IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 2, IGNORE_INDEX]]
