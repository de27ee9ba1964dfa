"""Shared pieces of the reliability battery: tiny settings, model folders built without training,
and `slm` in a fresh process (for kills, signals and resource limits)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from slm_cli.data import load_splits
from slm_cli.data.tokenizer import train_bpe_tokenizer
from slm_cli.engine.launcher import RENDEZVOUS_VARS
from tests.stages.helpers import FAST, run_cli, run_slm  # noqa: F401  (run_slm is re-exported for the battery)

TINY = ["model=tiny-llama", "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128"]
TEACHER = [*TINY, *FAST]


def bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on the arithmetic task (the data the battery trains on)."""
    records = load_splits("arithmetic", train_size=64, val_size=1, test_size=1)["train"]
    return train_bpe_tokenizer([r["prompt"] + r["completion"] for r in records], vocab_size=vocab_size)


def model_folder(folder: Path, tokenizer, *, vocab_size: int | None = None, hidden: int = 64, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama saved as a standard HF folder with `tokenizer` beside it."""
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size or len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def cli_env(**extra: str) -> dict:
    """The environment for `slm` in a fresh process, without the rendezvous variables an in-process run left."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env.update(extra)
    return env


def cli(args, cwd, env=None, timeout=300, preexec_fn=None) -> subprocess.CompletedProcess:
    return run_cli(args, env=env, cwd=cwd, timeout=timeout, preexec_fn=preexec_fn)


@contextmanager
def running(args, cwd, env=None) -> Iterator[subprocess.Popen]:
    """`slm <args>` started in a fresh process, for a test to signal; killed on the way out if still alive.

    The child gets SIGINT's default disposition back: a test suite started as a background job of a
    non-interactive shell (`make test &`, nohup) inherits SIGINT *ignored*, and a Python started
    with it ignored never turns Ctrl-C into KeyboardInterrupt (a CI run here hung 600 s that way).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "slm_cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env or cli_env(), cwd=cwd, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_rows(metrics: Path, proc: subprocess.Popen, rows: int = 1, timeout: float = 240) -> int:
    """Block until the live metrics.jsonl of a training run holds `rows` rows; return how many it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {rows}: {proc.stderr.read()[-3000:]}")
        n = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        if n >= rows:
            return n
        time.sleep(0.05)
    raise AssertionError(f"no {rows} step(s) logged in {metrics} within {timeout}s")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def slm_json(folder: Path) -> dict:
    return json.loads((Path(folder) / "slm.json").read_text())


def nothing_written(out: Path) -> bool:
    """No artifact, no work folder and no lock at `out`: a refused run leaves no trace."""
    out = Path(out)
    return not any(p.exists() for p in (out, out.with_name(out.name + ".work"), out.with_name(out.name + ".lock")))

