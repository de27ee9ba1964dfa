"""Exact resume for DeepSpeed's CPU Adam (ZeRO-Offload of the optimizer).

Why a resumed ZeRO + `offload_optimizer=cpu` run drifted from the uninterrupted one: Adam's bias
corrections need beta1^t and beta2^t. DeepSpeedCPUAdam (deepspeed 0.19.8) keeps them as float32
in its C++ object (`Adam_Optimizer::IncrementStep`, csrc/includes/cpu_adam.h), not in the
optimizer state that checkpoints save. When the step it is given is the previous one + 1 it
multiplies by beta once more; for any other step it recomputes beta^t with `std::pow`. An
uninterrupted run therefore carries products built by repeated float32 multiplication, while a
freshly created process resuming at step s is handed step s+1 first and gets pow(beta, s+1) instead.
The two roundings differ in the last bit for many t (beta2=0.95: t=6, 7, 8, 10, ...; beta1=0.9:
t=9, 12, ...), so the first resumed step uses a bias correction one ulp away, and the run then
keeps multiplying from that value. Measured here (tiny Llama, ZeRO-2 + CPU offload, kill after
step 7 of 16): the published weights differed by 1.2e-7 from the uninterrupted run; replaying the
steps below made them bit-identical. The step counter itself is restored correctly (`state['step']`
of every parameter group comes back from the checkpoint).

The fix replays the multiplication chain: one update per past step on empty tensors walks the C++
object through exactly the products the uninterrupted run built, and changes nothing else.
"""

from __future__ import annotations

import torch


def _base_optimizer(engine):
    """The torch optimizer doing the update (ZeRO and the bf16 wrappers keep it as `.optimizer`)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def completed_steps(optimizer) -> int:
    """The optimizer's own count of updates taken (0 when none, or the state is not Adam's)."""
    steps = {int(s["step"]) for s in optimizer.state.values() if isinstance(s, dict) and "step" in s}
    return max(steps, default=0)


def restore_bias_correction(engine) -> int:
    """Bring DeepSpeedCPUAdam's beta^t products to the values an uninterrupted run would hold.

    Call it after a checkpoint is loaded, before the next step; a no-op for any other optimizer
    and for an optimizer that has taken no step. Returns the number of steps replayed.
    """
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    opt = _base_optimizer(engine)
    if not isinstance(opt, DeepSpeedCPUAdam):
        return 0
    steps = completed_steps(opt)
    if steps == 0:
        return 0
    # Every parameter group shares one C++ object (opt_id) and one step count; its betas and
    # bias_correction flag are what each real update passes.
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    empty = torch.empty(0, dtype=torch.float32)
    for t in range(1, steps + 1):
        opt.ds_opt_adam.adam_update(
            opt.opt_id, t, group["lr"], beta1, beta2, group["eps"], group["weight_decay"], group["bias_correction"],
            empty, empty, empty, empty,
        )
    return steps
