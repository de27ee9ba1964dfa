"""Built-in reasoning-gym tasks: determinism, disjoint splits, answer extraction and scoring."""

import pytest

from slm_cli.data import get_task, list_sources, load_splits
from slm_cli.data.errors import DataError
from slm_cli.data.tasks import TASKS, split_of

SIZES = {"train": 300, "validation": 60, "test": 60}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_examples_are_deterministic_by_seed(name):
    task = TASKS[name]
    first = task.examples("train", 20, seed=3)
    assert first == task.examples("train", 20, seed=3)
    assert first != task.examples("train", 20, seed=4)
    assert task.examples("train", 8, seed=3) == first[:8] or name == "arithmetic_yesno"
    for record in first:
        assert isinstance(record["prompt"], str) and isinstance(record["completion"], str)
        assert isinstance(record["answer"], str)
    assert task.kind in ("generative", "predictive")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_never_share_a_question(name):
    task = TASKS[name]
    questions = {split: [r["question"] for r in task.examples(split, n, seed=0)] for split, n in SIZES.items()}
    for split, qs in questions.items():
        assert len(qs) == SIZES[split] == len(set(qs))  # no repeats inside a split either
        assert all(split_of(q) == split for q in qs)
    assert not set(questions["train"]) & set(questions["validation"])
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["validation"]) & set(questions["test"])


def test_same_seed_in_different_splits_still_disjoint_across_tasks():
    test_yesno = {r["question"] for r in TASKS["arithmetic_yesno"].examples("test", 100, seed=0)}
    train_arith = {r["question"] for r in TASKS["arithmetic"].examples("train", 500, seed=0)}
    assert not test_yesno & train_arith


def test_arithmetic_records_are_correct_and_scored_exactly():
    task = TASKS["arithmetic"]
    for record in task.examples("validation", 50, seed=0):
        expression = record["question"].removeprefix("Calculate ").removesuffix(".")
        assert int(record["answer"]) == eval(expression)  # generator uses only + - * on integers
        assert record["prompt"] == f"{record['question']}\nAnswer:"
        assert record["completion"] == f" {record['answer']}"
        assert task.score(record["completion"], record) == 1.0
    example = {"answer": "-4"}
    assert task.extract_answer(" -4\nCalculate 1 + 1.") == "-4"
    assert task.extract_answer(" -04") == "-4"
    assert task.extract_answer(" I do not know") is None
    assert task.score(" -4<|im_end|>", example) == 1.0
    assert task.score(" -40", example) == 0.0
    assert task.score(" 4", example) == 0.0
    assert task.score("", example) == 0.0


def test_gsm_symbolic_answer_extraction_and_scoring():
    task = TASKS["gsm_symbolic"]
    records = task.examples("test", 10, seed=0)
    for record in records:
        assert record["completion"].rstrip().endswith(f"#### {record['answer']}")
        assert record["prompt"].startswith("Question: ") and record["prompt"].endswith("\nAnswer:")
        assert task.score(record["completion"], record) == 1.0
    assert task.extract_answer("3 + 4 = 7 apples\n#### 1,288\nmore 5") == "1288"
    assert task.extract_answer("so 12 - 5 = 7. The answer is 42.") == "42"
    assert task.extract_answer("#### 3 then #### 9") == "9"
    assert task.extract_answer("no numbers here") is None
    assert task.score("He has 288 in total. #### 288.0", {"answer": "288"}) == 1.0
    assert task.score("He has 288 in total. #### 287", {"answer": "288"}) == 0.0
    assert task.score("nothing", {"answer": "288"}) == 0.0


def test_yesno_labels_are_balanced_and_true():
    task = TASKS["arithmetic_yesno"]
    assert task.kind == "predictive"
    records = task.examples("train", 200, seed=0)
    assert sum(r["label"] for r in records) == 100
    for record in records:
        equation = record["prompt"].removeprefix("Is ").split("? Answer Yes or No.")[0]
        left, shown = equation.rsplit(" = ", 1)
        assert (eval(left) == int(shown)) == bool(record["label"])
        assert record["completion"] == (" Yes" if record["label"] else " No")
        assert task.score(record["completion"], record) == 1.0
    yes, no = {"answer": "Yes", "label": 1}, {"answer": "No", "label": 0}
    assert task.extract_answer(" yes, it is") == "Yes"
    assert task.extract_answer(" NO.") == "No"
    assert task.extract_answer(" Nobody knows") is None
    assert task.score(" No", yes) == 0.0 and task.score(" No", no) == 1.0


def test_load_splits_for_a_task_and_registry_helpers():
    splits = load_splits("arithmetic", train_size=30, val_size=5, test_size=7, val_fraction=0.1, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "validation": 5, "test": 7}
    assert splits["validation"] == TASKS["arithmetic"].examples("validation", 5, seed=0)
    assert get_task("arithmetic") is TASKS["arithmetic"]
    assert get_task("shakespeare") is None and get_task("/tmp/x.jsonl") is None
    names = {row["name"]: row for row in list_sources()}
    assert set(names) == {"arithmetic", "gsm_symbolic", "arithmetic_yesno", "shakespeare", "kjv"}
    assert names["arithmetic_yesno"]["kind"] == "predictive"


def test_bad_split_name_is_a_data_error():
    with pytest.raises(DataError, match="split='dev'"):
        TASKS["arithmetic"].examples("dev", 3, seed=0)


def test_integer_expressions_follow_precedence():
    from slm_cli.data.tasks import evaluate_integer_expression

    assert evaluate_integer_expression("9 - 0 * 4") == 9  # reasoning-gym's simple generator says 36
    assert evaluate_integer_expression("( 2 + -3 ) * 4 - -( 6 / 3 )") == -2
    for bad in ("7 / 2", "2 ** 3", "x + 1", "1 / 0"):
        with pytest.raises(ValueError):
            evaluate_integer_expression(bad)
