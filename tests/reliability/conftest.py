"""Model folders the battery reuses, built once: tiny Llamas saved without training, and one real
`slm teacher` artifact (2 steps) for the tests that need slm.json written by a stage."""

from __future__ import annotations

import json
import os

import pytest

from tests.reliability.common import TEACHER, bpe_tokenizer, model_folder, run_slm


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """teacher: a model + tokenizer folder; other_tok: the same shape with another tokenizer;
    short_vocab: the teacher's tokenizer but an lm_head with fewer rows than it has tokens."""
    root = tmp_path_factory.mktemp("reliability-models")
    tok, other = bpe_tokenizer(300), bpe_tokenizer(270)
    return {
        "teacher": model_folder(root / "teacher", tok),
        "other_tok": model_folder(root / "other_tok", other, seed=1),
        "short_vocab": model_folder(root / "short_vocab", tok, vocab_size=len(tok) - 8, seed=2),
    }


@pytest.fixture(scope="session")
def teacher_artifact(tmp_path_factory):
    """A real artifact written by `slm teacher` (2 steps)."""
    root = tmp_path_factory.mktemp("reliability-teacher")
    assert run_slm("teacher", *TEACHER, "train.max_steps=2", f"output_dir={root}/artifact", f"hydra.run.dir={root}/logs") == 0
    return root / "artifact"


@pytest.fixture
def record_message(request):
    """Append (test id, message) to $SLM_RELIABILITY_MESSAGES, if set: the source of docs/reliability.md's table."""

    def record(text: str) -> str:
        path = os.environ.get("SLM_RELIABILITY_MESSAGES")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"case": request.node.name, "message": " ".join(text.split())}) + "\n")
        return text

    return record
