"""One held-out measurement for every artifact of a lineage: what `slm report` compares.

The data is the lineage's task data, read from slm.json: the `data` block (source, test_size,
val_fraction, max_seq_len) and `seed` of the resolved config of the run that trained the root
(the teacher). Its **test** split is scored, never the validation split: training stages watch
validation and the quickstart prunes and quantizes on it (calibration), so only test is held out
from every stage of the lineage.

Every artifact, pruned and FP8 included, gets the same numbers from the same code:

  * `ce`: completion cross-entropy, nats per target token, with the examples encoded exactly as
    training encodes them (slm_cli/data/tokenize.py: prompt tokens masked, completion + EOS
    scored, chat assistant turns scored, plain text all scored, cut to data.max_seq_len), so it is
    the quantity training's `val_ce` reports, on test records instead of validation ones;
  * the task's own metric when it has one: exact match for a generative task, AUC (and accuracy)
    for a predictive one, by the functions `slm eval` runs, with `slm eval`'s default settings.

Models are loaded as a user would serve them: `AutoModelForCausalLM.from_pretrained` in float32,
which reads an FP8 (compressed-tensors) checkpoint through compressed-tensors, decompressing the
stored FP8 weights (the quality vLLM serves; `slm quantize` measures itself the same way).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from slm_cli.data.tokenize import IGNORE_INDEX, collate, encode_dataset

# The task metric's settings: slm eval's defaults (config/schema.py EvalSettings), so a report's
# exact match equals `slm eval model.name_or_path=<artifact> data.source=<source>` on the same split;
# only the batch is larger (32, not 8: 2.5x faster on the quickstart's models), which changes
# nothing but float rounding in padded rows.
TASK_SETTINGS = {"batch_size": 32, "max_new_tokens": 64, "few_shot": 0, "stop": ["\n\n"], "chat": False}
BATCH_SIZE = 32  # sequences per forward pass for the cross-entropy
METHOD_VERSION = 1  # bump when what is measured changes, so cached results are not reused


@torch.no_grad()
def completion_cross_entropy(
    model, tokenizer, examples: list[dict], max_seq_len: int, batch_size: int = BATCH_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Mean cross-entropy (nats) over the target tokens of `examples`, encoded as training encodes them.

        CE = -(1/T) * sum over target tokens t of log p(x_t | x_<t),

    T counting every token whose label is not -100 (the completion and its EOS, assistant turns,
    or all of a text record) after cutting to `max_seq_len`; examples left with no target are
    dropped, as in training. Returns ce, perplexity (exp ce), tokens (T), examples, truncated, dropped.
    """
    encoded, stats = encode_dataset(examples, tokenizer, max_seq_len, split="test")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[i : i + batch_size], pad_token_id=pad).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
        if progress is not None:
            progress(min(i + batch_size, len(encoded)), len(encoded))
    model.train(was_training)
    ce = total / count
    return {"ce": ce, "perplexity": math.exp(ce), "tokens": count, "examples": stats.kept,
            "truncated": stats.truncated, "dropped": stats.dropped}


@dataclass
class HeldoutData:
    """The held-out split every artifact is scored on, what it was read from, and its fingerprint."""

    spec: dict  # source, split, size, seed, val_fraction, max_seq_len: where the records came from
    examples: list[dict]  # the records, for the cross-entropy
    metric: str | None  # the task metric (exact_match | auc) or None for text
    eval_data: Any = None  # slm_cli.evaluate.sources.EvalData for the task metric
    key: str = ""  # sha256 of the records and every setting that changes a number: the cache key
    settings: dict = field(default_factory=dict)


def lineage_data_config(config: dict | None) -> dict | None:
    """The data settings of a run's resolved config (slm.json `config`), or None when it trained on no data."""
    data = (config or {}).get("data")
    if not isinstance(data, dict) or not data.get("source"):
        return None
    return {
        "source": str(data["source"]),
        "size": data.get("test_size"),
        "seed": int((config or {}).get("seed", 0) or 0),
        "val_fraction": float(data.get("val_fraction", 0.05)),
        "max_seq_len": int(data.get("max_seq_len", 128)),
    }


def load_heldout(data_config: dict) -> HeldoutData:
    """The test split named by `data_config` (from lineage_data_config), ready to score."""
    from slm_cli.data import load_splits
    from slm_cli.evaluate.sources import AUTO_METRIC, load_eval_data

    c = data_config
    examples = load_splits(c["source"], train_size=1, val_size=1, test_size=c["size"],
                           val_fraction=c["val_fraction"], seed=c["seed"])["test"]
    metric, eval_data = None, None
    if examples and all("text" not in ex for ex in examples):  # prompt/completion or chat: the task metric too
        eval_data = load_eval_data(c["source"], "test", c["size"], c["seed"], c["val_fraction"])
        metric = AUTO_METRIC[eval_data.kind]
    spec = {**c, "split": "test"}
    settings = {"ce_batch_size": BATCH_SIZE, **(TASK_SETTINGS if metric else {}), "method_version": METHOD_VERSION}
    digest = hashlib.sha256(json.dumps([spec, settings, metric, examples], sort_keys=True, default=str).encode())
    return HeldoutData(spec=spec, examples=examples, metric=metric, eval_data=eval_data, key=digest.hexdigest(), settings=settings)


def evaluate_artifact(path: str, data: HeldoutData, progress: Callable[[int, int], None] | None = None) -> dict:
    """The held-out numbers of the model in folder `path`: ce (+ perplexity, tokens), and exact_match or auc/accuracy.

    The folder's own tokenizer is used; its code is never run (trust_remote_code=False).
    """
    from slm_cli import models
    from slm_cli.engine.logging import quiet_libraries
    from slm_cli.evaluate import exact_match, yes_no_auc

    quiet_libraries()  # transformers' per-tensor loading bars would bury the report's own progress
    model = models.load_model(str(path), "float32", False, field="artifact").eval()
    tokenizer = models.load_tokenizer(str(path), False, field="artifact")
    out = completion_cross_entropy(model, tokenizer, data.examples, data.spec["max_seq_len"], progress=progress)
    s = TASK_SETTINGS
    if data.metric == "exact_match":
        result = exact_match(
            model, tokenizer, data.eval_data.task, data.eval_data.examples, batch_size=s["batch_size"],
            max_new_tokens=s["max_new_tokens"], few_shot=s["few_shot"], stop=tuple(s["stop"]),
            seed=data.spec["seed"], chat=s["chat"],
        )
        out.update({"exact_match": result["exact_match"], "n": result["n"]})
    elif data.metric == "auc":
        result = yes_no_auc(model, tokenizer, data.eval_data.examples, batch_size=s["batch_size"],
                            choices=data.eval_data.choices)
        out.update({"auc": result["auc"], "accuracy": result["accuracy"], "n": result["n"]})
    del model
    return out
