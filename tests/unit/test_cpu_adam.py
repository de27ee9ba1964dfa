"""DeepSpeed's CPU Adam resumed from its state dict: slm_cli.engine.cpu_adam makes it continue bit for bit."""

import copy
from types import SimpleNamespace

import pytest
import torch

from slm_cli.engine.cpu_adam import restore_bias_correction
from slm_cli.engine.ops import use_private_extensions_dir

STEPS, RESUME_AT = 12, 6  # beta2=0.95: pow(beta2, 7) and the product of seven beta2 differ in the last bit


def _adam(param):
    use_private_extensions_dir()  # the op the stages use, built once by `make ops`
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam([param], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


def _steps(param, opt, grads):
    for g in grads:
        param.grad = g.clone()
        opt.step()


@pytest.fixture(scope="module")
def runs():
    torch.manual_seed(0)
    w0, grads = torch.randn(4096), [torch.randn(4096) for _ in range(STEPS)]
    straight = torch.nn.Parameter(w0.clone())
    _steps(straight, _adam(straight), grads)

    first = torch.nn.Parameter(w0.clone())
    opt = _adam(first)
    _steps(first, opt, grads[:RESUME_AT])

    def resumed(restore: bool) -> torch.Tensor:  # a new optimizer, as a new process builds it, from the saved state
        p = torch.nn.Parameter(first.detach().clone())
        again = _adam(p)
        again.load_state_dict(copy.deepcopy(opt.state_dict()))  # as read from disk: moments not shared
        if restore:
            assert restore_bias_correction(SimpleNamespace(optimizer=again)) == RESUME_AT
        _steps(p, again, grads[RESUME_AT:])
        return p.detach()

    return straight.detach(), resumed(False), resumed(True)


def test_cpu_adam_drifts_after_a_plain_state_dict_resume(runs):
    """The cause, measured: without the replay the resumed run is off in the last bits (drop the
    workaround in cpu_adam.py when a DeepSpeed release makes this test fail)."""
    straight, plain, _ = runs
    assert not torch.equal(plain, straight)
    assert float((plain - straight).abs().max()) < 1e-5


def test_restored_cpu_adam_continues_bit_for_bit(runs):
    straight, _, restored = runs
    assert torch.equal(restored, straight)


def test_restore_is_a_no_op_for_other_optimizers():
    p = torch.nn.Parameter(torch.zeros(3))
    assert restore_bias_correction(SimpleNamespace(optimizer=torch.optim.AdamW([p]))) == 0
