"""CUDA gives the CPU's numbers: a tiny Llama's forward and backward, the fused distillation loss, FP8 matmuls.

Marked gpu, so plain `pytest` (and `make test`) deselects them; `pytest -m gpu tests` runs them, and
`make gpu-check` does on the GPU machine. Without CUDA each skips itself, saying so. Everything runs
in float32 with TF32 off on both sides, so the two devices differ only by summation order.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 matmuls keep 10 mantissa bits: they would hide a real difference under their own."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class _Tokenizer:
    """What `build_model` reads from a tokenizer: its length and special ids."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
        return 512


def _tiny_llama():
    """configs/model/tiny-llama.yaml's shape (4 layers, hidden 128, GQA 4/2), seeded."""
    from slm_cli.config.schema import ModelConfig
    from slm_cli.models import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(arch="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512), _Tokenizer())


def _loss_and_grads(model, input_ids, attention_mask):
    model.zero_grad(set_to_none=True)
    labels = input_ids.masked_fill(attention_mask == 0, -100)  # padding is never a target, as in slm's batches
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    logits = out.logits.detach().cpu()[attention_mask.cpu() == 1]  # what a padded query sees is undefined: not compared
    return logits, out.loss.detach().cpu(), {n: p.grad.detach().cpu() for n, p in model.named_parameters()}


def test_tiny_llama_forward_backward_on_cuda_equals_cpu():
    """Logits, loss and every parameter's gradient; the CUDA side with gradient checkpointing, as slm trains."""
    model = _tiny_llama()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 512, (4, 48), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :10] = 0  # a left-padded row
    cpu_logits, cpu_loss, cpu_grads = _loss_and_grads(model.train(), input_ids, attention_mask)

    model = model.cuda().train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})  # as slm_cli/engine/loop.py
    logits, loss, grads = _loss_and_grads(model, input_ids.cuda(), attention_mask.cuda())

    torch.testing.assert_close(logits, cpu_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, cpu_loss, rtol=1e-5, atol=1e-6)
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_tiny_llama_bf16_on_cuda_stays_near_fp32():
    """bf16 autocast (what train.precision=bf16 runs) moves the loss by well under 1%."""
    model = _tiny_llama().cuda().eval()
    input_ids = torch.randint(3, 512, (4, 48), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        fp32 = model(input_ids=input_ids, labels=input_ids).loss
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(input_ids=input_ids, labels=input_ids).loss
    assert float(bf16) == pytest.approx(float(fp32), rel=1e-2)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", None), ("generalized_jsd", 0.5), ("reverse_kl", None)])
def test_fused_loss_on_cuda_equals_cpu(divergence, beta):
    """The chunked fused-linear loss and its gradients on CUDA are the CPU's (and the full-logit loss's)."""
    from slm_cli.distill.losses import distillation_loss, fused_linear_distillation_loss

    g = torch.Generator().manual_seed(0)
    n, h, v = 300, 64, 1000  # 300 tokens: two chunks of 256, the second partial
    inputs = [torch.randn(n, h, generator=g) / 8, torch.randn(v, h, generator=g), torch.randn(n, h, generator=g) / 8,
              torch.randn(v, h, generator=g)]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    kwargs = {"divergence": divergence, "beta": beta, "kd_temperature": 2.0, "kd_weight": 0.9}

    def run(device):
        sh, sw, th, tw = (x.to(device) for x in inputs)
        sh.requires_grad_(), sw.requires_grad_()
        loss, parts = fused_linear_distillation_loss(sh, sw, th, tw, labels.to(device), **kwargs)
        loss.backward()
        return float(loss.detach()), float(parts["kd"]), sh.grad.cpu(), sw.grad.cpu()

    cpu, cuda = run("cpu"), run("cuda")
    assert cuda[0] == pytest.approx(cpu[0], rel=1e-5)
    assert cuda[1] == pytest.approx(cpu[1], rel=1e-5)
    torch.testing.assert_close(cuda[2], cpu[2], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(cuda[3], cpu[3], rtol=1e-4, atol=1e-7)
    sh, sw, th, tw = (x.cuda() for x in inputs)
    full, _ = distillation_loss(sh @ sw.t(), th @ tw.t(), labels.cuda(), **kwargs)
    assert float(full) == pytest.approx(cpu[0], rel=1e-5)


def test_fp8_scaled_mm_on_cuda_equals_its_definition():
    """torch._scaled_mm on FP8 operands = (x_fp8·x_scale) @ (w_fp8·w_scale).T, computed in float32 on the CPU."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"{torch.cuda.get_device_name()} has no FP8 tensor cores (compute capability < 8.9)")
    from slm_cli.quant.schemes import get_scheme, weight_qparams

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 576, generator=g), torch.randn(1536, 576, generator=g) / 24
    w_scale = weight_qparams(w, get_scheme("fp8_dynamic").weights)[0].float().reshape(-1, 1)  # slm's weight_scale
    x_scale = x.abs().amax(dim=-1, keepdim=True) / 448  # fp8_dynamic: one scale per token, at run time
    x_fp8, w_fp8 = (x / x_scale).to(torch.float8_e4m3fn), (w / w_scale).to(torch.float8_e4m3fn)
    expected = (x_fp8.float() * x_scale) @ (w_fp8.float() * w_scale).t()
    a, sa, b, sb = (t.cuda() for t in (x_fp8, x_scale, w_fp8, w_scale))
    # row-wise scales (one per token, one per channel) need a bf16 output on CUDA: compare within its rounding
    got = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.bfloat16).float().cpu()
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    assert float((got - x @ w.t()).norm() / (x @ w.t()).norm()) < 0.08  # and FP8's own rounding costs a few %
