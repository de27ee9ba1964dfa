"""Built-in tasks, generated offline by reasoning-gym, each with its own answer scoring.

A task turns reasoning-gym entries into records ``{"prompt", "completion", "answer", ...}``
and knows how to read and score a model's generation. Tasks are looked up by short name
in ``TASKS``.

How splits stay apart. Two different seeds do not guarantee different problems (reasoning-gym
seeds item ``i`` with ``seed + i``, so nearby seeds share items, and small problem spaces repeat).
So each problem is assigned to one split by a hash of its question text:
buckets 0-79 of ``sha256(question) mod 100`` are train, 80-89 validation, 90-99 test.
Each split draws from its own seed stream (derived from task, split and seed) and keeps only
problems of its own bucket, without repeats. Train, validation and test therefore never share a
question, whatever the seeds, and tasks built on the same generator (``arithmetic`` and
``arithmetic_yesno``) agree on which questions are held out.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import operator
import random
import re
from dataclasses import dataclass, field
from typing import Any

from slm_cli.data.errors import DataError

SPLITS = ("train", "validation", "test")
SPLIT_BUCKETS = {"train": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}
CHUNK = 256  # reasoning-gym entries generated per call; item j of chunk k uses seed split_seed + k*CHUNK + j
MAX_DRAWS_PER_EXAMPLE = 200  # give up (problem space too small) after this many candidates per wanted example

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from the parts, identical across runs and machines (unlike Python's salted hash)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def split_of(question: str) -> str:
    """The one split a question belongs to: its sha256 bucket out of 100, read through SPLIT_BUCKETS."""
    bucket = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 100
    return next(split for split, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not a task split; use one of {', '.join(SPLITS)}.")


def draw_entries(rg_name: str, rg_config: dict, task_name: str, split: str, size: int, seed: int) -> list[dict]:
    """`size` distinct reasoning-gym entries of `split`, deterministic in (task_name, split, seed).

    Entries are drawn in order from the split's seed stream, so a smaller request is a prefix of a
    larger one with the same seed.
    """
    import reasoning_gym

    check_split(split)
    if size < 0:
        raise DataError(f"size={size} for split {split!r} must be >= 0.")
    split_seed = stable_seed(task_name, split, seed)
    kept, seen, drawn = [], set(), 0
    budget = max(MAX_DRAWS_PER_EXAMPLE * size, 10 * CHUNK)
    chunk_index = 0
    while len(kept) < size:
        if drawn >= budget:
            raise DataError(
                f"task {task_name!r}: found only {len(kept)} distinct {split} problems of the {size} asked for "
                f"after {drawn} draws; ask for fewer examples or widen the task's generator settings."
            )
        dataset = reasoning_gym.create_dataset(rg_name, size=CHUNK, seed=split_seed + chunk_index * CHUNK, **rg_config)
        for entry in dataset:
            drawn += 1
            question = entry["question"]
            if question in seen or split_of(question) != split:
                continue
            seen.add(question)
            kept.append(entry)
            if len(kept) == size:
                break
        chunk_index += 1
    return kept


def first_number(text: str) -> str | None:
    """The first number in `text` with thousands separators removed, or None."""
    match = NUMBER.search(text)
    return match.group(0).replace(",", "") if match else None


def last_number(text: str) -> str | None:
    """The last number in `text` with thousands separators removed, or None."""
    matches = NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


def canonical_number(text: str | None) -> str | None:
    """'-04' -> '-4', '288.0' -> '288', '1,200' -> '1200'; non-numbers unchanged (None stays None)."""
    if text is None:
        return None
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate_integer_expression(expression: str) -> int:
    """The value of an integer expression with + - * / (exact division), unary minus and parentheses,
    under the usual precedence (* and / before + and -).

    reasoning-gym's no-parentheses arithmetic generator folds left to right ("9 - 0 * 4" -> 36),
    so arithmetic answers are recomputed here rather than taken from it.
    """

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = value(node.operand)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            return _BINARY_OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            numerator, denominator = value(node.left), value(node.right)
            if denominator == 0 or numerator % denominator:
                raise ValueError(f"{expression!r}: division is not exact")
            return numerator // denominator
        raise ValueError(f"{expression!r}: unsupported syntax {type(node).__name__}")

    return value(ast.parse(expression, mode="eval").body)


@functools.lru_cache(maxsize=None)
def _scorer(rg_name: str, config_items: tuple) -> Any:
    """A reasoning-gym dataset object, kept only for its `score_answer` method."""
    import reasoning_gym

    return reasoning_gym.create_dataset(rg_name, size=1, seed=0, **dict(config_items))


@dataclass(frozen=True)
class ArithmeticTask:
    """Integer arithmetic with a short exact answer: "Calculate 5 - 3 - 6.\\nAnswer:" -> " -4".

    Generative, scored by exact match of the first number in the generation. The default
    generator settings (2-3 terms of 0-100, + - *, no parentheses) keep answers short
    enough for tiny models trained from scratch; answers follow the usual precedence.
    """

    name: str = "arithmetic"
    kind: str = "generative"
    rg_name: str = "basic_arithmetic"
    rg_config: dict = field(
        default_factory=lambda: dict(
            min_terms=2, max_terms=3, min_digits=1, max_digits=2,
            operators=("+", "-", "*"), allow_parentheses=False, allow_negation=False,
        )
    )

    def examples(self, split: str, size: int, seed: int) -> list[dict]:
        """`size` records of `split`: prompt, completion, answer (and the source question)."""
        records = []
        for entry in draw_entries(self.rg_name, self.rg_config, self.name, split, size, seed):
            answer = str(evaluate_integer_expression(entry["metadata"]["expression"]))
            records.append(
                {
                    "prompt": f"{entry['question']}\nAnswer:",
                    "completion": f" {answer}",
                    "answer": answer,
                    "question": entry["question"],
                }
            )
        return records

    def extract_answer(self, generation: str) -> str | None:
        """The first number the model wrote after "Answer:" (later text is ignored)."""
        return canonical_number(first_number(generation))

    def score(self, generation: str, example: dict) -> float:
        """1.0 when the extracted answer equals the reference exactly, else 0.0."""
        scorer = _scorer(self.rg_name, tuple(sorted(self.rg_config.items())))
        reward = scorer.score_answer(self.extract_answer(generation), {"answer": example["answer"]})
        return 1.0 if reward >= 1.0 else 0.0


@dataclass(frozen=True)
class GsmSymbolicTask:
    """GSM8K-style word problems; the completion is a worked solution ending in "#### <answer>".

    Generative. The answer is read from the last "#### n" in the generation, or else the last
    number anywhere in it, and compared numerically (reasoning-gym's `score_answer`).
    """

    name: str = "gsm_symbolic"
    kind: str = "generative"
    rg_name: str = "gsm_symbolic"
    rg_config: dict = field(default_factory=dict)

    def examples(self, split: str, size: int, seed: int) -> list[dict]:
        """`size` records of `split`: prompt, completion (the chain of thought), answer, question."""
        return [
            {
                "prompt": f"Question: {entry['question']}\nAnswer:",
                "completion": " " + entry["metadata"]["answer_cot"].strip(),
                "answer": entry["answer"],
                "question": entry["question"],
            }
            for entry in draw_entries(self.rg_name, self.rg_config, self.name, split, size, seed)
        ]

    def extract_answer(self, generation: str) -> str | None:
        """The number after the last '####', else the last number in the generation, else None."""
        marked = re.findall(r"####\s*(-?\d[\d,]*(?:\.\d+)?)", generation)
        return canonical_number(marked[-1].replace(",", "") if marked else last_number(generation))

    def score(self, generation: str, example: dict) -> float:
        """1.0 when the extracted number equals the reference numerically, else 0.0."""
        answer = self.extract_answer(generation)
        if answer is None:
            return 0.0
        scorer = _scorer(self.rg_name, tuple(sorted(self.rg_config.items())))
        return 1.0 if scorer.score_answer(answer, {"answer": example["answer"]}) >= 1.0 else 0.0


def perturb(answer: int, rng: random.Random) -> int:
    """A wrong but plausible answer: off by one or two, off by ten, or the sign flipped."""
    offsets = [-2, -1, 1, 2, -10, 10]
    if answer != 0:
        offsets.append(-2 * answer)  # answer + (-2*answer) = -answer: the sign flipped
    return answer + rng.choice(offsets)


@dataclass(frozen=True)
class ArithmeticYesNoTask:
    """Verify an equation: "Is 5 - 3 - 6 = -4? Answer Yes or No.\\nAnswer:" -> " Yes" / " No".

    Predictive: each record has `label` 1 (the shown result is right) or 0 (perturbed), and the
    labels of a split are balanced exactly (half and half, in a seeded order). A model's score
    for AUC is its probability of `choices[0]` against `choices[1]` after the prompt.
    Questions come from the same generator and split rule as `arithmetic`.
    """

    name: str = "arithmetic_yesno"
    kind: str = "predictive"
    choices: tuple = (" Yes", " No")
    rg_name: str = "basic_arithmetic"
    rg_config: dict = field(default_factory=lambda: dict(ArithmeticTask().rg_config))

    def examples(self, split: str, size: int, seed: int) -> list[dict]:
        """`size` records of `split`: prompt, completion, answer ("Yes"/"No"), label (1/0)."""
        entries = draw_entries(self.rg_name, self.rg_config, self.name, split, size, seed)
        labels = [1 - i % 2 for i in range(size)]
        random.Random(stable_seed(self.name, split, seed, "labels")).shuffle(labels)
        records = []
        for i, (entry, label) in enumerate(zip(entries, labels)):
            rng = random.Random(stable_seed(self.name, split, seed, i))
            correct = evaluate_integer_expression(entry["metadata"]["expression"])
            shown = correct if label else perturb(correct, rng)
            answer = "Yes" if label else "No"
            records.append(
                {
                    "prompt": f"Is {entry['metadata']['expression']} = {shown}? Answer Yes or No.\nAnswer:",
                    "completion": f" {answer}",
                    "answer": answer,
                    "label": label,
                    "question": entry["question"],
                }
            )
        return records

    def extract_answer(self, generation: str) -> str | None:
        """'Yes' or 'No' from the first such word in the generation (any case), else None."""
        match = re.search(r"\b(yes|no)\b", generation, flags=re.IGNORECASE)
        return match.group(1).capitalize() if match else None

    def score(self, generation: str, example: dict) -> float:
        """1.0 when the generation says the right word, else 0.0."""
        return 1.0 if self.extract_answer(generation) == example["answer"] else 0.0


TASKS = {task.name: task for task in (ArithmeticTask(), GsmSymbolicTask(), ArithmeticYesNoTask())}
