"""Exact match: greedy generation for prompt/completion examples, scored by the task.

Zero-shot vs few-shot. Zero-shot (`few_shot=0`) gives the model each prompt as it is: right for
a model fine-tuned on the task's format. Few-shot (`few_shot=k`) puts k solved examples from the
task's *train* split, each ``prompt + completion``, before every prompt, separated by a blank line:

    <prompt_1><completion_1>\\n\\n ... <prompt_k><completion_k>\\n\\n<prompt>

The same k shots (the first k train examples for the seed) serve every question, so results are
repeatable; test questions never appear among them (the task splits are disjoint). This is how a
pretrained model that never saw the format (SmolLM2 on gsm_symbolic) learns from the prompt to
answer "... #### 42". Because the shots are separated by a blank line, generation stops at the
first blank line (`stop=("\\n\\n",)`) as well as at EOS: a few-shot model would otherwise go on to
invent the next question, whose numbers a scorer that reads the last number would pick up.

Chat prompting (`chat=True`) is for instruct models scored on raw-text tasks: the prompt (with its
shots) becomes one user turn of the tokenizer's chat template, and the model answers as the
assistant, in its own words; the task's extractor then reads the answer out of that reply.

Generation is greedy (argmax, deterministic), batched, with the KV cache: prompts are left-padded
(collate_prompts) so every row's next token is predicted at the same column.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from slm_cli.data.errors import DataError
from slm_cli.data.formats import record_shape
from slm_cli.data.tokenize import collate_prompts, prompt_ids

FEW_SHOT_SEPARATOR = "\n\n"
DEFAULT_STOP = ("\n\n",)


class CompletionMatch:
    """Scoring for user data without a task: the generation, trimmed, must equal the reference
    completion (or the final assistant turn), trimmed."""

    name = "completion_match"
    kind = "generative"

    def extract_answer(self, generation: str) -> str:
        return generation.strip()

    def score(self, generation: str, example: dict) -> float:
        return 1.0 if self.extract_answer(generation) == reference_text(example).strip() else 0.0


def reference_text(example: dict) -> str:
    """The text a model should produce: `completion`, or the content of the last assistant turn."""
    if record_shape(example) == "messages":
        turns = [m for m in example["messages"] if m["role"] == "assistant"]
        return turns[-1]["content"] if turns else ""
    return example.get("completion", "")


def as_chat_turn(example: dict) -> dict:
    """A prompt/completion record re-posed as a chat: its prompt is the user turn."""
    if record_shape(example) != "prompt_completion":
        return example
    return {**example, "messages": [{"role": "user", "content": example["prompt"].strip()}]}


def few_shot_prompt(example: dict, shots: Sequence[dict]) -> dict:
    """`example` with the solved `shots` prepended to its prompt (prompt/completion records only)."""
    if not shots:
        return example
    if record_shape(example) != "prompt_completion":
        raise DataError("few-shot prompts need prompt/completion records; set eval.few_shot=0 for chat data.")
    prefix = "".join(shot["prompt"] + shot["completion"] + FEW_SHOT_SEPARATOR for shot in shots)
    return {**example, "prompt": prefix + example["prompt"]}


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


class StopOnText(StoppingCriteria):
    """Per-row stop once the generated text (after the prompt) contains a stop string."""

    def __init__(self, tokenizer, prompt_len: int, stop: Sequence[str]):
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, tuple(stop)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
    stop: Sequence[str] = DEFAULT_STOP,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy continuations of token-id `prompts`, `batch_size` at a time, cut at EOS and at `stop`.

    `progress(done, total)` is called after each batch with prompts done so far."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        batch = {k: v.to(device) for k, v in collate_prompts(prompts[i : i + batch_size], pad_token_id=pad).items()}
        width = batch["input_ids"].shape[1]
        criteria = StoppingCriteriaList([StopOnText(tokenizer, width, stop)]) if stop else None
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=criteria,
        )
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        out += [cut_at_stop(t, stop) for t in texts]
        if progress is not None:
            progress(len(out), len(prompts))
    model.train(was_training)
    return out


def exact_match(
    model,
    tokenizer,
    task,
    examples: list[dict],
    batch_size: int,
    max_new_tokens: int,
    few_shot: int = 0,
    shots: list[dict] | None = None,
    stop: Sequence[str] = DEFAULT_STOP,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    chat: bool = False,
) -> dict:
    """Share of `examples` whose greedy generation the task scores as right.

    `task` provides `score(generation, example)` and `extract_answer(generation)` (a built-in
    task, or CompletionMatch for user data; None means CompletionMatch). With `few_shot=k`, the
    first k train examples of `task` for `seed` (or the given `shots`) are prepended to each prompt.
    With `chat=True` each (few-shot) prompt is sent as one user turn of the chat template.
    Returns exact_match, correct, n, few_shot and `predictions` (one dict per example).
    """
    task = task if task is not None else CompletionMatch()
    if few_shot and shots is None:
        if not hasattr(task, "examples"):
            raise DataError(
                "few-shot needs a built-in task to draw solved train examples from (data.source=arithmetic, ...); "
                "set eval.few_shot=0 for your own data."
            )
        shots = task.examples("train", few_shot, seed)
    shots = list(shots or [])[:few_shot] if few_shot else []
    posed = [few_shot_prompt(ex, shots) for ex in examples]
    if chat:
        posed = [as_chat_turn(ex) for ex in posed]
    prompts = [prompt_ids(ex, tokenizer) for ex in posed]
    generations = greedy_generate(model, tokenizer, prompts, batch_size, max_new_tokens, stop, progress)
    predictions = []
    for ex, gen in zip(examples, generations):
        predictions.append(
            {
                "prompt": ex.get("prompt", ""),
                "generation": gen,
                "extracted": task.extract_answer(gen),
                "reference": ex.get("answer", reference_text(ex)),
                "correct": task.score(gen, ex),
            }
        )
    correct = sum(p["correct"] for p in predictions)
    return {
        "exact_match": correct / len(predictions) if predictions else float("nan"),
        "correct": int(correct),
        "n": len(predictions),
        "few_shot": len(shots),
        "predictions": predictions,
    }
