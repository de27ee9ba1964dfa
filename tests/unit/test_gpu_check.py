"""bench/gpu_check.py cannot rot: its --dry-run runs every check on the CPU, and a failing check fails the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
EXPECTED = [
    *(f"train/{stage}/zero{zero}" for stage in ("teacher", "student", "distill_supervised", "distill_on_policy") for zero in (0, 2)),
    "fused_loss", "fp8_matmul", "pytest_gpu",
]


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    return _run(out), out


def test_dry_run_passes_every_check_or_says_why_it_skipped(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["environment"]["dry_run"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == EXPECTED
    for name, check in checks.items():
        assert check["status"] in ("ok", "skipped"), (name, check)
        if check["status"] == "skipped":
            assert check["reason"], f"{name} skipped without a reason"
    for stage in EXPECTED[:8]:  # every training stage ran and logged a finite loss
        assert checks[stage]["status"] == "ok"
        assert checks[stage]["metrics"]["steps"] == 2 and checks[stage]["metrics"]["final_loss"] < 1e3
    # ZeRO-2 changes how the optimizer is sharded, not the numbers (one process, fp32)
    for stage in ("teacher", "student", "distill_supervised", "distill_on_policy"):
        zero0, zero2 = (checks[f"train/{stage}/zero{z}"]["metrics"]["final_loss"] for z in (0, 2))
        assert zero2 == pytest.approx(zero0, rel=1e-4)
    assert checks["fused_loss"]["metrics"]["loss_rel_diff"] < 1e-4
    assert checks["fp8_matmul"]["status"] == "ok", "torch runs _scaled_mm on the CPU too"
    assert 0 < checks["fp8_matmul"]["metrics"]["up_proj_fp8_rel_err"] < 0.08
    # without CUDA the gpu tests exist and skip themselves
    assert checks["pytest_gpu"]["status"] == "skipped" and checks["pytest_gpu"]["metrics"]["skipped"] >= 1
    md = out.with_suffix(".md").read_text()
    assert all(f"| {name} | " in md for name in EXPECTED)


def test_a_failing_check_makes_the_exit_code_non_zero(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run(out, "--only", "fused_loss", "fp8_matmul", "--fail", "fp8_matmul")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    status = {c["name"]: (c["status"], c["reason"]) for c in report["checks"]}
    assert status["fused_loss"] == ("ok", None), "the other checks still run"
    assert status["fp8_matmul"][0] == "failed" and "injected failure" in status["fp8_matmul"][1]
    assert report["ok"] is False and "FAILED" in out.with_suffix(".md").read_text()


def test_without_cuda_the_real_check_refuses_to_run(tmp_path):
    """No silent CPU run passing as a GPU check: without --dry-run and without CUDA, exit 2 and say why."""
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "g.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "no CUDA device" in proc.stdout
    assert not (tmp_path / "g.json").exists()
