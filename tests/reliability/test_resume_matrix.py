"""Exact resume under every DeepSpeed layout: a run killed with SIGKILL, right after a checkpoint or in
the middle of writing one, then started again with the same command, ends with the very weights
(bit for bit) and the very per-step losses of a run that was never interrupted.

The whole cross product (ZeRO 0-3, optimizer / parameter offload, fp32 / bf16, two kill points) is
marked slow and not reliability, since `pytest -m reliability` replaces the default `-m 'not slow'`
(run it with `pytest -m slow tests/reliability/test_resume_matrix.py`). The battery keeps the cases
that guard known defects. Seconds per case on this 2-core machine, idle / loaded by other jobs
(each case: the uninterrupted run in-process, the killed run in a fresh process, the rerun in-process):
  zero2-offload-fp32-after-save  21 / 58  ZeRO-2 + CPU Adam resumed where DeepSpeed's CPU Adam used to
                                          recompute beta^t differently (see engine/cpu_adam.py)
  zero3-offload-bf16-mid-save    21 / 33  parameters and optimizer offloaded, killed inside a save
  zero1-bf16-mid-save            18 / 68  bf16 master weights, killed inside a save
The 29 slow cases took 11-28 s each (about 9 minutes in all, idle).
"""

from __future__ import annotations

import signal

import pytest
import torch

from tests.reliability.common import TEACHER, cli, cli_env, run_slm, weights
from tests.stages.helpers import metrics_rows

STEPS = 8
# beta2=0.95: the first resumed step (7) is one whose pow(beta2, t) and repeated product differ.
KILL_AT = 6
LAYOUTS = {
    "zero0": ["deepspeed=zero0"],
    "zero1": ["deepspeed=zero1"],
    "zero1-offload": ["deepspeed=zero1", "deepspeed.offload_optimizer=cpu"],
    "zero2": ["deepspeed=zero2"],
    "zero2-offload": ["deepspeed=zero2-offload"],
    "zero3": ["deepspeed=zero3"],
    "zero3-offload-optimizer": ["deepspeed=zero3", "deepspeed.offload_optimizer=cpu"],
    "zero3-offload": ["deepspeed=zero3-offload"],  # parameters and optimizer state
}
PRECISIONS = {"fp32": [], "bf16": ["train.precision=bf16"]}
# after-save: killed right after the checkpoint of step KILL_AT is complete, so the rerun resumes there.
# mid-save: killed once DeepSpeed has written the first file of that checkpoint (model states), before
# the optimizer states, `latest` and slm's marker: the rerun falls back to the checkpoint of the step before.
FAULTS = {  # fault -> (the point slm_cli.faults kills at, the step the rerun resumes from)
    "after-save": (f"after-checkpoint:{KILL_AT}", KILL_AT),
    "mid-save": (f"in-checkpoint:{KILL_AT}", KILL_AT - 1),
}
DEFAULT = {("zero2-offload", "fp32", "after-save"), ("zero3-offload", "bf16", "mid-save"), ("zero1", "bf16", "mid-save")}


def _cases():
    for layout in LAYOUTS:
        for precision in PRECISIONS:
            for fault in FAULTS:
                marks = pytest.mark.reliability if (layout, precision, fault) in DEFAULT else pytest.mark.slow
                yield pytest.param(layout, precision, fault, id=f"{layout}-{precision}-{fault}", marks=marks)


_straight_runs: dict = {}


def straight_run(tmp_path_factory, args: list[str]):
    """The uninterrupted run of `args` (in this process), once per layout and precision."""
    key = tuple(args)
    if key not in _straight_runs:
        root = tmp_path_factory.mktemp("straight")
        assert run_slm("teacher", *args, f"output_dir={root}/artifact", f"hydra.run.dir={root}/logs") == 0
        _straight_runs[key] = root / "artifact"
    return _straight_runs[key]


@pytest.mark.parametrize("layout,precision,fault", list(_cases()))
def test_kill_then_rerun_gives_the_uninterrupted_weights_bit_for_bit(
    slm, tmp_path, tmp_path_factory, capsys, layout, precision, fault
):
    args = [*TEACHER, f"train.max_steps={STEPS}", *LAYOUTS[layout], *PRECISIONS[precision]]
    straight = straight_run(tmp_path_factory, args)
    kill_point, resume_step = FAULTS[fault]
    out = tmp_path / "killed"
    command = ["teacher", *args, "train.save_every=1", f"output_dir={out}"]

    proc = cli([*command, f"hydra.run.dir={tmp_path}/logs"], cwd=tmp_path, env=cli_env(SLM_TEST_KILL_AT=kill_point))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not out.exists()
    capsys.readouterr()

    assert slm(*command) == 0  # the same command again
    assert f"at step {resume_step}" in capsys.readouterr().out
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys()
    differ = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"resumed weights differ from the uninterrupted run's: {differ}"
    rows_a, rows_b = metrics_rows(straight), metrics_rows(out)
    assert [r["step"] for r in rows_b] == list(range(1, STEPS + 1)), "each step logged exactly once"
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows_a]
