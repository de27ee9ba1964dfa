"""User data readers and the load_splits entry point on user files."""

import json

import datasets
import pytest

from slm_cli.data import load_splits
from slm_cli.data.errors import DataError
from slm_cli.data.formats import read_jsonl, read_user_data
from slm_cli.errors import SlmError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pc(i):
    return {"prompt": f"q{i}", "completion": f" a{i}"}


def test_reads_prompt_completion_and_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(pc(0)) + "\n\n" + json.dumps({**pc(1), "label": 1}) + "\n")
    assert read_jsonl(path) == [pc(0), {**pc(1), "label": 1}]


def test_reads_messages(tmp_path):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert read_jsonl(write_jsonl(tmp_path / "c.jsonl", [record])) == [record]


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(pc(0)) + "\n" + json.dumps(pc(1)) + "\n" + '{"prompt": "x", \n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: malformed JSON") as info:
        read_jsonl(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, SlmError)


def test_missing_fields_name_the_line(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [pc(0), {"prompt": "only a prompt"}])
    with pytest.raises(DataError, match=r"m\.jsonl line 2: missing fields .*'prompt' without 'completion'"):
        read_jsonl(path)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "x", "completion": 3}, "'completion' must be a string, got int"),
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "role 'bot'"),
        ({"prompt": "x", "completion": "y", "label": 2}, "'label' must be 0 or 1"),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_wrong_types_name_the_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "t.jsonl", [pc(0), pc(1), record])
    with pytest.raises(DataError, match=r"t\.jsonl line 3: ") as info:
        read_jsonl(path)
    assert message in str(info.value)


def test_mixed_shapes_are_rejected(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [pc(0), {"text": "plain"}])
    with pytest.raises(DataError, match="line 2: this row is language modeling data but earlier rows are prompt-completion"):
        read_jsonl(path)


def test_empty_file_is_an_error_naming_the_path(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the dataset is empty"):
        read_jsonl(path)


def test_datasets_folder_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list([pc(i) for i in range(4)]).save_to_disk(str(tmp_path / "ds"))
    assert read_user_data(tmp_path / "ds") == {"train": [pc(i) for i in range(4)]}
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list([pc(i) for i in range(5)]),
        test=datasets.Dataset.from_list([pc(9)]),
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    splits = load_splits(str(tmp_path / "dd"), train_size=None, val_size=None, test_size=None, val_fraction=0.2, seed=0)
    assert splits["test"] == [pc(9)]
    assert len(splits["train"]) == 4 and len(splits["validation"]) == 1


def test_datasets_folder_bad_row_names_the_row(tmp_path):
    datasets.Dataset.from_list([{"question": "a"}, {"question": "b"}]).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"\[train\] row 1: missing fields"):
        read_user_data(tmp_path / "ds")


def test_user_split_is_seeded_disjoint_and_complete(tmp_path):
    records = [pc(i) for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    kwargs = dict(train_size=None, val_size=None, test_size=None, val_fraction=0.2)
    a = load_splits(str(path), seed=1, **kwargs)
    assert a == load_splits(str(path), seed=1, **kwargs)
    assert len(a["validation"]) == 10 and len(a["train"]) == 40
    train_prompts = {r["prompt"] for r in a["train"]}
    val_prompts = {r["prompt"] for r in a["validation"]}
    assert not train_prompts & val_prompts
    assert train_prompts | val_prompts == {r["prompt"] for r in records}
    assert a["test"] == a["validation"]  # no test file: test is validation
    b = load_splits(str(path), seed=2, **kwargs)
    assert {r["prompt"] for r in b["validation"]} != val_prompts
    capped = load_splits(str(path), seed=1, train_size=5, val_size=3, test_size=None, val_fraction=0.2)
    assert len(capped["train"]) == 5 and len(capped["validation"]) == 3
    assert all(r in a["train"] for r in capped["train"])


def test_folder_of_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [pc(i) for i in range(3)])
    write_jsonl(tmp_path / "validation.jsonl", [pc(7)])
    write_jsonl(tmp_path / "test.jsonl", [pc(8)])
    splits = load_splits(str(tmp_path), train_size=None, val_size=None, test_size=None, val_fraction=0.5, seed=0)
    assert splits == {"train": [pc(i) for i in range(3)], "validation": [pc(7)], "test": [pc(8)]}


def test_too_few_records_to_split_and_unknown_source(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [pc(0)])
    with pytest.raises(DataError, match="val_fraction"):
        load_splits(str(path), train_size=None, val_size=None, test_size=None, val_fraction=0.1, seed=0)
    with pytest.raises(DataError, match="neither a built-in source"):
        load_splits(str(tmp_path / "nope.jsonl"), train_size=None, val_size=None, test_size=None, val_fraction=0.1, seed=0)
    (tmp_path / "x.xml").write_text("<rows/>")
    with pytest.raises(DataError, match=r"unsupported file type '\.xml'; give a \.jsonl, \.json, \.csv or \.parquet file"):
        read_user_data(tmp_path / "x.xml")


def test_utf8_bom_is_accepted(tmp_path):
    """Windows editors (Notepad, Excel's "CSV UTF-8") start files with a BOM; it is not part of the data."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(pc(0)) + "\n" + json.dumps(pc(1)) + "\n").encode())
    assert read_jsonl(path) == [pc(0), pc(1)]


def test_non_utf8_bytes_name_the_line_and_the_fix(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(pc(0)) + "\n").encode() + '{"prompt": "café", "completion": " x"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert f"{path} line 2: byte 0xe9 (byte 16 of the line) is not UTF-8" in message
    assert "iconv -f WINDOWS-1252 -t UTF-8" in message


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-16-le", "UTF-16"), ("utf-32", "UTF-32")])
def test_utf16_and_utf32_files_are_refused_with_the_conversion(tmp_path, encoding, name):
    """JSON Lines is UTF-8 by definition (jsonlines.org, RFC 8259), and the tools users share files with
    (datasets, TRL, jq) read it so; slm refuses other encodings and says how to convert."""
    path = tmp_path / "wide.jsonl"
    path.write_bytes((json.dumps(pc(0)) + "\n").encode(encoding))
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert f"{path} is {name} text" in message and f"iconv -f {name} -t UTF-8 {path}" in message


def test_a_folder_named_like_a_jsonl_file_and_a_txt_file(tmp_path):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    with pytest.raises(DataError, match=r"data\.jsonl is a folder, not a \.jsonl file"):
        read_user_data(folder)
    txt = tmp_path / "notes.txt"
    txt.write_text("plain text")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'.*\{\"text\": str\}"):
        read_user_data(txt)


def test_a_folder_without_train_jsonl_names_the_jsonl_files_it_holds(tmp_path):
    write_jsonl(tmp_path / "mydata.jsonl", [pc(0)])
    with pytest.raises(DataError, match=r"holds mydata\.jsonl but no train\.jsonl.*data\.source=.*mydata\.jsonl"):
        read_user_data(tmp_path)
