"""Every TRL dataset type, read from .jsonl, .json, .csv, .parquet, datasets folders and hub ids."""

import json

import datasets
import huggingface_hub
import pandas as pd
import pytest

from slm_cli.data import load_splits
from slm_cli.data.errors import DataError
from slm_cli.data.formats import PROMPT_TURNS, read_user_data
from slm_cli.data.tokenize import IGNORE_INDEX, encode_example, prompt_ids
from slm_cli.data.tokenizer import train_bpe_tokenizer

USER = {"role": "user", "content": "What color is the sky?"}
ASSISTANT = {"role": "assistant", "content": "It is blue."}
SYSTEM = {"role": "system", "content": "Be brief."}

# One row of each type TRL's docs list ("Dataset formats and types"), standard and conversational.
TRAINABLE = {
    "language modeling": {"text": "The sky is blue."},
    "conversational language modeling": {"messages": [USER, ASSISTANT]},
    "prompt-completion": {"prompt": "The sky is", "completion": " blue."},
    "conversational prompt-completion": {"prompt": [SYSTEM, USER], "completion": [ASSISTANT]},
}
REFUSED = {
    "prompt-only": ({"prompt": "The sky is"}, "TRL's prompt-only type"),
    "conversational prompt-only": ({"prompt": [USER]}, "TRL's conversational prompt-only type"),
    "preference": ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, "TRL's preference type"),
    "implicit-prompt preference": ({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "preference type"),
    "stepwise supervision": (
        {"prompt": "Which is larger, 9.8 or 9.11?", "completions": ["11 > 8.", "So 9.11 is larger."], "labels": [True, False]},
        "stepwise-supervision type",
    ),
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    corpus = ["What color is the sky? It is blue. The sky is blue.", "Be brief. Which is larger?"] * 4
    return train_bpe_tokenizer(corpus, vocab_size=300)


@pytest.mark.parametrize("kind", list(TRAINABLE))
def test_every_trainable_type_reads_from_every_file_type(tmp_path, kind):
    """The same rows come back from .jsonl, .json (array and JSON Lines), .parquet and a datasets folder."""
    rows = [TRAINABLE[kind]] * 3
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    write_jsonl(tmp_path / "lines.json", rows)
    pd.DataFrame(rows).to_parquet(tmp_path / "rows.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    expected = read_user_data(write_jsonl(tmp_path / "rows.jsonl", rows))["train"]
    assert len(expected) == 3
    for name in ("rows.json", "lines.json", "rows.parquet", "ds"):
        assert read_user_data(tmp_path / name)["train"] == expected, name


def test_csv_reads_standard_types(tmp_path):
    (tmp_path / "pc.csv").write_text('prompt,completion,label\n"Is 2 > 1?", Yes,1\n"Is 1 > 2?", No,0\n')
    assert read_user_data(tmp_path / "pc.csv")["train"] == [
        {"prompt": "Is 2 > 1?", "completion": " Yes", "label": 1},
        {"prompt": "Is 1 > 2?", "completion": " No", "label": 0},
    ]
    (tmp_path / "lm.csv").write_text("text\nThe sky is blue.\n")
    assert read_user_data(tmp_path / "lm.csv")["train"] == [{"text": "The sky is blue."}]
    # cells stay text: a completion " 42" is not the number 42, a prompt "NA" is not missing
    (tmp_path / "num.csv").write_text('prompt,completion\n6 * 7 =, 42\nNA,0042\n')
    assert read_user_data(tmp_path / "num.csv")["train"] == [
        {"prompt": "6 * 7 =", "completion": " 42"}, {"prompt": "NA", "completion": "0042"},
    ]


def test_chat_in_a_csv_cell_is_refused_with_the_file_types_that_hold_it(tmp_path):
    pd.DataFrame({"messages": [json.dumps([USER, ASSISTANT])]}).to_csv(tmp_path / "chat.csv", index=False)
    with pytest.raises(DataError, match=r"chat\.csv row 1: field 'messages' is text that looks like JSON.*\.jsonl, \.json or \.parquet"):
        read_user_data(tmp_path / "chat.csv")


def test_conversational_prompt_completion_is_read_as_messages_with_its_prompt_turns(tmp_path):
    row = {**TRAINABLE["conversational prompt-completion"], "id": 7}
    [read] = read_user_data(write_jsonl(tmp_path / "c.jsonl", [row]))["train"]
    assert read == {"id": 7, "messages": [SYSTEM, USER, ASSISTANT], PROMPT_TURNS: 2}


def test_conversational_prompt_completion_trains_only_the_completion(tok):
    """An assistant turn inside the prompt (a few-shot history) is context, as in TRL's completion-only loss."""
    history = [USER, {"role": "assistant", "content": "The sky is blue."}, {"role": "user", "content": "Be brief."}]
    row = {"messages": [*history, ASSISTANT], PROMPT_TURNS: 3}
    encoded = encode_example(row, tok, max_seq_len=256)
    targets = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert tok.decode(targets).startswith("It is blue.")
    as_chat = encode_example({"messages": row["messages"]}, tok, max_seq_len=256)  # conversational LM: every assistant turn
    assert encoded.input_ids == as_chat.input_ids
    chat_targets = [t for t, label in zip(as_chat.input_ids, as_chat.labels) if label != IGNORE_INDEX]
    assert len(chat_targets) > len(targets) and "The sky is blue." in tok.decode(chat_targets)
    # the prompt a model generates from is the prompt turns, with the generation header
    rendered = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert prompt_ids(row, tok) == tok(rendered, add_special_tokens=False)["input_ids"]
    assert encoded.input_ids[: len(prompt_ids(row, tok))] == prompt_ids(row, tok)


@pytest.mark.parametrize("kind", list(REFUSED))
def test_types_slm_cannot_train_on_are_refused_naming_the_type(tmp_path, kind):
    row, message = REFUSED[kind]
    with pytest.raises(DataError, match=rf"r\.jsonl line 1: .*{message}"):
        read_user_data(write_jsonl(tmp_path / "r.jsonl", [row]))


def test_conversational_prompt_needs_a_conversational_completion_with_an_assistant_turn(tmp_path):
    with pytest.raises(DataError, match=r"line 1: 'prompt' is a list of messages, so 'completion' must be one too \(got str\)"):
        read_user_data(write_jsonl(tmp_path / "a.jsonl", [{"prompt": [USER], "completion": "blue"}]))
    with pytest.raises(DataError, match=r"line 1: the completion has no assistant turn"):
        read_user_data(write_jsonl(tmp_path / "b.jsonl", [{"prompt": [USER], "completion": [USER]}]))
    with pytest.raises(DataError, match=r"line 1: prompt\[0\] has role 'human'"):
        read_user_data(write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "human", "content": "x"}], "completion": [ASSISTANT]}]))


def test_standard_and_conversational_rows_do_not_mix(tmp_path):
    rows = [TRAINABLE["prompt-completion"], TRAINABLE["conversational prompt-completion"]]
    with pytest.raises(DataError, match="line 2: this row is conversational prompt-completion data but earlier rows are prompt-completion"):
        read_user_data(write_jsonl(tmp_path / "m.jsonl", rows))


def test_parquet_and_json_errors_name_the_row_and_line(tmp_path):
    pd.DataFrame([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet row 2: missing fields \(has prompt\); 'prompt' without 'completion'"):
        read_user_data(tmp_path / "p.parquet")
    (tmp_path / "bad.json").write_text('[{"prompt": "a", "completion": "b"},\n {"prompt": 3')
    with pytest.raises(DataError, match=r"bad\.json line 2 column 14: malformed JSON"):
        read_user_data(tmp_path / "bad.json")
    write_jsonl(tmp_path / "lines.json", [{"text": "a"}, {"text": 5}])
    with pytest.raises(DataError, match=r"lines\.json line 2: field 'text' must be a string, got int"):
        read_user_data(tmp_path / "lines.json")
    (tmp_path / "obj.json").write_text(json.dumps({"data": [{"text": "a"}]}))
    with pytest.raises(DataError, match=r"obj\.json: holds one JSON object, not a list of rows \(the rows may be the list under 'data'"):
        read_user_data(tmp_path / "obj.json")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken\.parquet: datasets\.load_dataset\('parquet'\) could not read it \(ArrowInvalid"):
        read_user_data(tmp_path / "broken.parquet")


def test_a_folder_of_parquet_split_files(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(6)]
    pd.DataFrame(rows[:4]).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame(rows[4:5]).to_parquet(tmp_path / "validation.parquet")
    pd.DataFrame(rows[5:]).to_parquet(tmp_path / "test.parquet")
    splits = load_splits(str(tmp_path), train_size=None, val_size=None, test_size=None, val_fraction=0.5, seed=0)
    assert splits == {"train": rows[:4], "validation": rows[4:5], "test": rows[5:]}


@pytest.fixture
def offline(monkeypatch):
    """No test reaches the network: the hub libraries' offline switches, read at import, are set directly."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_source_loads_through_datasets_load_dataset(tmp_path, offline):
    """hub:<id> goes to datasets.load_dataset(id, subset); given a local folder laid out like a hub repo
    (data/<split>-*.parquet) the same call reads it without a network."""
    rows = [TRAINABLE["conversational prompt-completion"]] * 5
    (tmp_path / "repo" / "data").mkdir(parents=True)
    pd.DataFrame(rows[:4]).to_parquet(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
    pd.DataFrame(rows[4:]).to_parquet(tmp_path / "repo" / "data" / "test-00000-of-00001.parquet")
    splits = load_splits(f"hub:{tmp_path / 'repo'}", train_size=None, val_size=None, test_size=None, val_fraction=0.25, seed=0)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [3, 1, 1]
    assert splits["test"][0]["messages"] == [SYSTEM, USER, ASSISTANT]


def test_hub_id_offline_is_a_data_error_naming_the_source_and_the_fix(offline):
    with pytest.raises(DataError) as info:
        load_splits("hub:slm-tests/no-such-dataset", subset="main", train_size=None, val_size=None, test_size=None)
    message = str(info.value)
    assert message.startswith("data.source=hub:slm-tests/no-such-dataset (data.subset=main): datasets.load_dataset could not load it")
    assert "HF_DATASETS_OFFLINE=1" in message
    with pytest.raises(DataError, match="data.source=hub: names no dataset"):
        load_splits("hub:")
