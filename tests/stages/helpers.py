"""Helpers for stage tests: read artifacts back and recompute their numbers independently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from slm_cli.data import load_splits
from slm_cli.data.tokenize import collate, encode_dataset
from slm_cli.engine.launcher import RENDEZVOUS_VARS

# Small, quick settings shared by the stage tests (2-layer models, a few steps).
FAST = [
    "data.train_size=256",
    "data.val_size=32",
    "data.test_size=8",
    "train.max_steps=16",
    "train.micro_batch_size=16",
    "train.eval_every=0",
    "train.eval_batches=2",
    "train.warmup_steps=2",
]


def meta(folder) -> dict:
    return json.loads((Path(folder) / "slm.json").read_text())


def metrics_rows(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines() if line]


def loss_fell(folder, k: int = 3) -> tuple[float, float]:
    """Mean loss of the first k and last k logged steps."""
    losses = [r["loss"] for r in metrics_rows(folder)]
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


@torch.no_grad()
def reloaded_val_loss(folder, model=None) -> float:
    """Validation loss of the saved artifact, loaded with plain transformers (or `model`, loaded from it some
    other way), on the run's own validation batches."""
    m = meta(folder)
    cfg = m["config"]
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = model.eval()
    tok = AutoTokenizer.from_pretrained(folder)
    d = cfg["data"]
    splits = load_splits(
        d["source"], train_size=d["train_size"], val_size=d["val_size"], test_size=d["test_size"],
        val_fraction=d["val_fraction"], seed=cfg["seed"],
    )
    val, _ = encode_dataset(splits["validation"], tok, d["max_seq_len"])
    mb, n_batches = cfg["train"]["micro_batch_size"], cfg["train"]["eval_batches"]
    batch_fn = partial(collate, pad_token_id=tok.pad_token_id)
    total, count = 0.0, 0
    for b in range(n_batches):
        items = val[b * mb : (b + 1) * mb]
        if not items:
            break
        batch = batch_fn(items)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return total / count


def run_slm(*args: str) -> int:
    """`slm <args>` in this process (for module fixtures, where the function-scoped `slm` fixture is unavailable)."""
    from slm_cli.__main__ import main

    argv = list(sys.argv)
    try:
        return main(list(args))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv


def run_cli(args, *, env=None, cwd=None, timeout=600, preexec_fn=None) -> subprocess.CompletedProcess:
    """`slm <args>` in a fresh process, without the rendezvous variables an in-process run left behind."""
    env = {k: v for k, v in (env or os.environ).items() if k not in RENDEZVOUS_VARS}
    return subprocess.run(
        [sys.executable, "-m", "slm_cli", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
        preexec_fn=preexec_fn,
    )


# A process that takes slm's output lock on argv[1], prints "got" or "refused", then holds it until stdin closes.
_LOCK_HOLDER = (
    "import sys\n"
    "from slm_cli.artifacts import acquire_lock\n"
    "from slm_cli.errors import SlmError\n"
    "sys.stdin.readline()\n"
    "try:\n"
    "    lock = acquire_lock(sys.argv[1])\n"
    "except SlmError as exc:\n"
    "    print('refused', exc, flush=True)\n"
    "    sys.exit(0)\n"
    "print('got', flush=True)\n"
    "sys.stdin.read()\n"
    "lock.release()\n"
)


def lock_holder(output_dir) -> subprocess.Popen:
    """Start a process that will try slm's lock on `output_dir` once a line is written to its stdin."""
    return subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(output_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def hold_lock(output_dir) -> subprocess.Popen:
    """A live process holding slm's lock on `output_dir` (close its stdin, or kill it, to let go)."""
    proc = lock_holder(output_dir)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().startswith("got")
    return proc
