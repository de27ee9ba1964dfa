"""Distillation losses against direct probability formulas, and the chunked loss against the naive one."""

from __future__ import annotations

import math

import pytest
import torch

from slm_cli.distill.losses import (
    DIVERGENCES,
    check_vocab,
    distillation_loss,
    forward_kl,
    fused_linear_distillation_loss,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    trim_vocab,
    tvd,
)

# ---------------------------------------------------------------------------
# Direct formulas: plain probabilities, float64, one token per row
# ---------------------------------------------------------------------------


def _probs(logits, temperature):
    return torch.softmax(logits.double() / temperature, dim=-1)


def _direct_kl(a, b):
    return (a * (a / b).log()).sum(-1)


def _direct(name, student, teacher, mix, temperature):
    q, p = _probs(student, temperature), _probs(teacher, temperature)
    if name == "forward_kl":
        value = _direct_kl(p, q)
    elif name == "reverse_kl":
        value = _direct_kl(q, p)
    elif name == "generalized_jsd":
        m = mix * p + (1 - mix) * q
        unscaled = mix * _direct_kl(p, m) + (1 - mix) * _direct_kl(q, m)
        value = unscaled / (mix * (1 - mix))
    elif name == "tvd":
        value = 0.5 * (p - q).abs().sum(-1)
    elif name == "skew_forward_kl":
        value = _direct_kl(p, mix * p + (1 - mix) * q)
    elif name == "skew_reverse_kl":
        value = _direct_kl(q, mix * q + (1 - mix) * p)
    return temperature**2 * value


def _call(name, student, teacher, mix, temperature):
    keyword = {"generalized_jsd": "beta", "skew_forward_kl": "alpha", "skew_reverse_kl": "alpha"}.get(name)
    kwargs = {keyword: mix} if keyword else {}
    return DIVERGENCES[name](student, teacher, kd_temperature=temperature, **kwargs)


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    student = 2.0 * torch.randn(6, 11, generator=generator)
    teacher = 2.0 * torch.randn(6, 11, generator=generator)
    return student, teacher


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("mix", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_divergence_matches_direct_formula(logits, name, mix, temperature):
    student, teacher = logits
    got = _call(name, student, teacher, mix, temperature)
    expected = _direct(name, student, teacher, mix, temperature)
    assert got.shape == (6,)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_divergences_are_zero_for_identical_distributions(logits):
    student, _ = logits
    for name in DIVERGENCES:
        value = _call(name, student, student.clone(), 0.5, 1.3)
        torch.testing.assert_close(value, torch.zeros(6), atol=1e-6, rtol=0)


def test_generalized_jsd_ends_are_forward_and_reverse_kl(logits):
    student, teacher = logits
    for temperature in (1.0, 2.0):
        fkl = forward_kl(student, teacher, kd_temperature=temperature)
        rkl = reverse_kl(student, teacher, kd_temperature=temperature)
        # Forward and reverse KL differ on these logits, so the check can tell the ends apart.
        assert (fkl - rkl).abs().max() > 0.05
        torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.0, kd_temperature=temperature), fkl)
        torch.testing.assert_close(generalized_jsd(student, teacher, beta=1.0, kd_temperature=temperature), rkl)
        # The scaled form is continuous: close to the ends it approaches the same values.
        near_zero = generalized_jsd(student.double(), teacher.double(), beta=1e-4, kd_temperature=temperature)
        near_one = generalized_jsd(student.double(), teacher.double(), beta=1 - 1e-4, kd_temperature=temperature)
        torch.testing.assert_close(near_zero, fkl, rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(near_one, rkl, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_relation_to_unscaled_gkd_value(logits, beta):
    """TRL's generalized_jsd_loss per token (m = beta*teacher + (1-beta)*student, beta*KL(p||m) + (1-beta)*KL(q||m))
    is slm's value times beta*(1-beta): the README's "4x TRL's at beta 0.5"."""
    student, teacher = logits
    q, p = _probs(student, 1.0), _probs(teacher, 1.0)
    m = beta * p + (1 - beta) * q
    unscaled = beta * _direct_kl(p, m) + (1 - beta) * _direct_kl(q, m)
    ours = generalized_jsd(student, teacher, beta=beta)
    torch.testing.assert_close(ours.double() * beta * (1 - beta), unscaled, rtol=1e-5, atol=1e-7)
    if beta == 0.5:
        torch.testing.assert_close(ours.double(), 4 * unscaled, rtol=1e-5, atol=1e-7)


def test_skew_kl_with_alpha_zero_is_plain_kl(logits):
    student, teacher = logits
    torch.testing.assert_close(skew_forward_kl(student, teacher, alpha=0.0), forward_kl(student, teacher))
    torch.testing.assert_close(skew_reverse_kl(student, teacher, alpha=0.0), reverse_kl(student, teacher))


def test_tvd_is_bounded_by_t_squared(logits):
    student, teacher = logits
    value = tvd(100 * student, -100 * teacher, kd_temperature=2.0)
    assert (value >= 0).all() and (value <= 4.0 + 1e-5).all()


def test_minus_inf_logits_shared_by_both_models_give_finite_values_and_grads(logits):
    student, teacher = logits
    student = student.clone().requires_grad_()
    masked_teacher = teacher.masked_fill(torch.arange(11) >= 9, float("-inf"))
    for name in DIVERGENCES:
        masked_student = student.masked_fill(torch.arange(11) >= 9, float("-inf"))
        value = _call(name, masked_student, masked_teacher, 0.5, 1.0)
        (grad,) = torch.autograd.grad(value.sum(), student)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all(), name
        expected = _direct(name, student[:, :9].detach(), teacher[:, :9], 0.5, 1.0)
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise_clear_errors(logits):
    student, teacher = logits
    labels = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd(student, teacher, beta=1.5)
    with pytest.raises(ValueError, match="kd_temperature"):
        forward_kl(student, teacher, kd_temperature=0.0)
    with pytest.raises(ValueError, match="unknown divergence 'jsd'.*generalized_jsd"):
        distillation_loss(student, teacher, labels, divergence="jsd")
    with pytest.raises(ValueError, match="reduction"):
        distillation_loss(student, teacher, labels, reduction="none")
    with pytest.raises(ValueError, match="kd_weight"):
        distillation_loss(student, teacher, labels, kd_weight=1.2)


# ---------------------------------------------------------------------------
# distillation_loss: the objective, masking, reductions
# ---------------------------------------------------------------------------


def _batch(n=20, vocab=13, seed=1, masked=(0, 1, 7)):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(n, vocab, generator=generator)
    teacher = torch.randn(n, vocab, generator=generator)
    labels = torch.randint(0, vocab, (n,), generator=generator)
    labels[list(masked)] = -100
    return student, teacher, labels


def test_distillation_loss_is_weighted_ce_plus_kd_over_unmasked_tokens():
    student, teacher, labels = _batch()
    keep = labels != -100
    loss, parts = distillation_loss(
        student, teacher, labels, divergence="generalized_jsd", beta=0.3, kd_temperature=2.0, kd_weight=0.7
    )
    kd = _direct("generalized_jsd", student[keep], teacher[keep], 0.3, 2.0).mean()
    log_q = torch.log_softmax(student[keep].double(), -1)
    ce = -log_q.gather(1, labels[keep].unsqueeze(1)).mean()
    assert parts["num_tokens"] == int(keep.sum()) == 17
    torch.testing.assert_close(parts["kd"].double(), kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["ce"].double(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), 0.3 * ce + 0.7 * kd, rtol=1e-5, atol=1e-6)


def test_kd_weight_one_has_no_hidden_ce_term():
    student, teacher, labels = _batch()
    student.requires_grad_()
    other_labels = torch.where(labels == -100, labels, (labels + 5) % 13)
    for loss_fn in ("naive", "fused"):
        results = []
        for batch_labels in (labels, other_labels):
            if loss_fn == "naive":
                loss, parts = distillation_loss(student, teacher, batch_labels, divergence="reverse_kl", kd_weight=1.0)
                (grad,) = torch.autograd.grad(loss, student)
            else:
                hidden = torch.eye(20, 20, requires_grad=True)  # logits = hidden @ W.T = W.T rows
                loss, parts = fused_linear_distillation_loss(
                    hidden, student.detach().t().contiguous(), torch.eye(20), teacher.t().contiguous(),
                    batch_labels, divergence="reverse_kl", kd_weight=1.0, chunk_size=6,
                )  # fmt: skip
                (grad,) = torch.autograd.grad(loss, hidden)
            results.append((loss, parts, grad))
        (loss_a, parts_a, grad_a), (loss_b, parts_b, grad_b) = results
        # The CE differs between the two label sets, the loss and its gradient do not.
        assert abs(float(parts_a["ce"]) - float(parts_b["ce"])) > 0.1
        torch.testing.assert_close(loss_a, loss_b)
        torch.testing.assert_close(grad_a, grad_b)
        torch.testing.assert_close(loss_a, parts_a["kd"])


def test_sum_reduction_over_micro_batches_equals_one_batch_mean():
    student, teacher, labels = _batch(n=24, masked=(0, 1, 2, 3, 4, 5, 9, 20))
    student.requires_grad_()
    kwargs = {"divergence": "generalized_jsd", "beta": 0.5, "kd_temperature": 1.5, "kd_weight": 0.8}
    full_loss, _ = distillation_loss(student, teacher, labels, **kwargs)
    (full_grad,) = torch.autograd.grad(full_loss, student)

    # Micro-batches of unequal size and unequal masked counts (2, 7 and 7 tokens).
    bounds = [(0, 8), (8, 15), (15, 24)]
    total_tokens = sum(int((labels[a:b] != -100).sum()) for a, b in bounds)
    accumulated = 0.0
    for a, b in bounds:
        loss, parts = distillation_loss(student[a:b], teacher[a:b], labels[a:b], reduction="sum", **kwargs)
        assert parts["num_tokens"] == int((labels[a:b] != -100).sum())
        accumulated = accumulated + loss / total_tokens
    (accumulated_grad,) = torch.autograd.grad(accumulated, student)
    torch.testing.assert_close(accumulated, full_loss)
    torch.testing.assert_close(accumulated_grad, full_grad)
    # Averaging per-micro-batch means (the classic bug) gives a different loss here.
    naive_mean = sum(distillation_loss(student[a:b], teacher[a:b], labels[a:b], **kwargs)[0] for a, b in bounds) / 3
    assert abs(naive_mean.item() - full_loss.item()) > 1e-3


def test_fully_masked_batch_gives_zero_loss_with_a_gradient():
    student, teacher, labels = _batch(n=5, masked=())
    labels[:] = -100
    student.requires_grad_()
    loss, parts = distillation_loss(student, teacher, labels, divergence="forward_kl", kd_weight=0.5)
    loss.backward()
    assert loss.item() == 0.0 and parts["num_tokens"] == 0
    assert student.grad is not None and torch.equal(student.grad, torch.zeros_like(student))

    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    loss, parts = fused_linear_distillation_loss(hidden, weight, torch.randn(5, 4), torch.randn(13, 4), labels)
    loss.backward()
    assert loss.item() == 0.0 and int(parts["num_tokens"]) == 0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


# ---------------------------------------------------------------------------
# The chunked fused-linear loss against the naive one
# ---------------------------------------------------------------------------


def _hidden_batch(n=37, student_dim=16, teacher_dim=24, student_vocab=50, teacher_vocab=50, seed=2):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(n, student_dim, generator=generator)
    student_weight = torch.randn(student_vocab, student_dim, generator=generator) / 2
    student_bias = torch.randn(student_vocab, generator=generator) / 4
    teacher_hidden = torch.randn(n, teacher_dim, generator=generator)
    teacher_weight = torch.randn(teacher_vocab, teacher_dim, generator=generator) / 2
    labels = torch.randint(0, min(student_vocab, teacher_vocab), (n,), generator=generator)
    labels[::6] = -100
    return student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, labels


def _naive_and_fused(batch, *, use_bias=False, vocab_size=None, chunk_size=8, compile=False, **kwargs):
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, labels = batch
    results = []
    for variant in ("naive", "fused"):
        hidden = student_hidden.clone().requires_grad_()
        weight = student_weight.clone().requires_grad_()
        bias = student_bias.clone().requires_grad_() if use_bias else None
        if variant == "naive":
            student_logits = hidden @ weight.t() + (bias if use_bias else 0)
            teacher_logits = teacher_hidden @ teacher_weight.t()
            loss, parts = distillation_loss(student_logits, teacher_logits, labels, vocab_size=vocab_size, **kwargs)
        else:
            loss, parts = fused_linear_distillation_loss(
                hidden, weight, teacher_hidden, teacher_weight, labels,
                student_bias=bias, vocab_size=vocab_size, chunk_size=chunk_size, compile=compile, **kwargs,
            )  # fmt: skip
        loss.backward()
        results.append((loss, parts, hidden.grad, weight.grad, bias.grad if use_bias else None))
    return results


CASES = [
    ("forward_kl", None, 1.0, 0.9),
    ("forward_kl", None, 2.0, 0.0),
    ("reverse_kl", None, 0.8, 1.0),
    ("generalized_jsd", 0.5, 1.0, 0.9),
    ("generalized_jsd", 0.1, 2.0, 1.0),
    ("generalized_jsd", 0.0, 1.5, 0.5),
    ("generalized_jsd", 1.0, 1.0, 0.7),
    ("tvd", None, 1.0, 0.9),
    ("skew_forward_kl", 0.1, 1.0, 0.9),
    ("skew_reverse_kl", 0.3, 2.0, 0.6),
]


@pytest.mark.parametrize(("divergence", "beta", "temperature", "kd_weight"), CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_matches_naive_loss_and_gradients(divergence, beta, temperature, kd_weight, reduction):
    (naive, fused) = _naive_and_fused(
        _hidden_batch(),
        use_bias=True,
        divergence=divergence,
        beta=beta,
        kd_temperature=temperature,
        kd_weight=kd_weight,
        reduction=reduction,
    )
    (loss_n, parts_n, *grads_n), (loss_f, parts_f, *grads_f) = naive, fused
    torch.testing.assert_close(loss_f, loss_n, rtol=1e-5, atol=1e-5)
    for key in ("kd", "ce", "num_tokens"):
        torch.testing.assert_close(parts_f[key], parts_n[key], rtol=1e-5, atol=1e-5)
    for grad_f, grad_n in zip(grads_f, grads_n):
        assert grad_n.abs().max() > 1e-4  # the gradient is not trivially zero
        torch.testing.assert_close(grad_f, grad_n, rtol=1e-5, atol=1e-5)


def test_fused_accepts_batch_by_sequence_shapes_and_leaves_teacher_without_grad():
    student_hidden, student_weight, _, teacher_hidden, teacher_weight, labels = _hidden_batch(n=36)
    hidden = student_hidden.view(4, 9, -1).clone().requires_grad_()
    teacher_weight = teacher_weight.clone().requires_grad_()
    loss, _ = fused_linear_distillation_loss(
        hidden, student_weight, teacher_hidden.view(4, 9, -1), teacher_weight, labels.view(4, 9), chunk_size=5
    )
    loss.backward()
    assert hidden.grad.shape == (4, 9, 16)
    assert teacher_weight.grad is None
    expected, _ = distillation_loss(student_hidden @ student_weight.t(), teacher_hidden @ teacher_weight.t(), labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_fused_grad_output_scales_gradients():
    batch = _hidden_batch()
    hidden = batch[0].clone().requires_grad_()
    loss, _ = fused_linear_distillation_loss(hidden, batch[1], batch[3], batch[4], batch[5], chunk_size=8)
    (grad,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    (grad_3x,) = torch.autograd.grad(3.0 * loss, hidden)
    torch.testing.assert_close(grad_3x, 3.0 * grad)


def test_fused_skips_weight_gradient_for_a_frozen_lm_head():
    batch = _hidden_batch()
    hidden = batch[0].clone().requires_grad_()
    weight = batch[1].clone()  # frozen: requires_grad False
    loss, _ = fused_linear_distillation_loss(hidden, weight, batch[3], batch[4], batch[5])
    loss.backward()
    assert weight.grad is None and hidden.grad.abs().max() > 0


# ---------------------------------------------------------------------------
# Vocabulary: padded lm_heads of different sizes
# ---------------------------------------------------------------------------


def test_check_vocab_trims_padded_vocabularies_to_the_tokenizer():
    assert check_vocab(151936, 152064, 151665, 151665) == 151665
    assert check_vocab(256, 256, 256, 256) == 256


def test_check_vocab_rejects_real_mismatches():
    with pytest.raises(ValueError, match=r"student tokenizer has 32000 tokens but teacher tokenizer has 151665"):
        check_vocab(32000, 152064, 32000, 151665)
    with pytest.raises(ValueError, match=r"student lm_head has 151000 rows but the tokenizer has 151665.*152064"):
        check_vocab(151000, 152064, 151665, 151665)


def test_trim_vocab_keeps_the_first_entries():
    logits = torch.arange(12.0).view(2, 6)
    assert torch.equal(trim_vocab(logits, 4), logits[:, :4])
    assert trim_vocab(logits, None) is logits
    with pytest.raises(ValueError, match="vocab_size=7"):
        trim_vocab(logits, 7)


def test_different_vocab_sizes_need_vocab_size_and_then_match_the_trimmed_naive_loss():
    batch = _hidden_batch(student_vocab=56, teacher_vocab=64)
    labels = batch[5]
    labels[labels >= 50] -= 10  # targets inside the shared vocabulary
    with pytest.raises(ValueError, match="student vocab 56 != teacher vocab 64.*vocab_size="):
        fused_linear_distillation_loss(batch[0], batch[1], batch[3], batch[4], batch[5])
    with pytest.raises(ValueError, match="student vocab 56 != teacher vocab 64"):
        distillation_loss(batch[0] @ batch[1].t(), batch[3] @ batch[4].t(), batch[5])

    naive, fused = _naive_and_fused(batch, vocab_size=50, use_bias=True, divergence="generalized_jsd", beta=0.5)
    torch.testing.assert_close(fused[0], naive[0], rtol=1e-5, atol=1e-6)
    for grad_f, grad_n in zip(fused[2:], naive[2:]):
        torch.testing.assert_close(grad_f, grad_n, rtol=1e-5, atol=1e-6)
    # Rows beyond the shared vocabulary get no gradient.
    assert torch.equal(fused[3][50:], torch.zeros(6, 16))
    # Trimming changed the loss: the padded rows do carry probability before the trim.
    untrimmed, _ = distillation_loss(
        batch[0] @ batch[1].t(), batch[3] @ batch[4][:56].t(), batch[5], divergence="generalized_jsd", beta=0.5
    )
    assert abs(untrimmed.item() - naive[0].item()) > 1e-3


# ---------------------------------------------------------------------------
# A real (tiny) transformers model: fused loss on its hidden states
# ---------------------------------------------------------------------------


def test_fused_loss_on_a_tiny_llama_matches_the_logits_loss_through_the_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96,
    )  # fmt: skip
    student = LlamaForCausalLM(config)
    teacher = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "hidden_size": 48, "vocab_size": 128})).eval()
    input_ids = torch.randint(0, 90, (2, 10))
    labels = input_ids[:, 1:].clone()
    labels[0, :3] = -100  # a prompt that is not supervised
    with torch.no_grad():
        teacher_hidden = teacher.model(input_ids=input_ids).last_hidden_state[:, :-1]
    kwargs = {"divergence": "generalized_jsd", "beta": 0.5, "kd_temperature": 2.0, "kd_weight": 0.9, "vocab_size": 90}

    student_hidden = student.model(input_ids=input_ids).last_hidden_state[:, :-1]
    fused, _ = fused_linear_distillation_loss(
        student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels, chunk_size=4, **kwargs
    )
    fused.backward()
    fused_grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()

    student_logits = student(input_ids=input_ids).logits[:, :-1]
    naive, _ = distillation_loss(student_logits, teacher.lm_head(teacher_hidden), labels, **kwargs)
    naive.backward()
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-6)
    for name, p in student.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compiled_chunk_math_matches_eager():
    naive, fused = _naive_and_fused(_hidden_batch(), divergence="generalized_jsd", beta=0.5, compile=False)
    _, compiled = _naive_and_fused(_hidden_batch(), divergence="generalized_jsd", beta=0.5, compile=True)
    torch.testing.assert_close(compiled[0], fused[0], rtol=1e-5, atol=1e-6)
    for grad_c, grad_f in zip(compiled[2:4], fused[2:4]):
        torch.testing.assert_close(grad_c, grad_f, rtol=1e-5, atol=1e-6)
    assert math.isfinite(naive[0].item())


def test_fused_head_keeps_the_plain_call_and_computes_the_loss_with_its_own_weight():
    """objective.fused_head: head(x) is still x @ W.T; the loss call equals the direct fused loss, gradients included."""
    import copy

    from slm_cli.distill.objective import fused_head

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(5, 8, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(5, 8), torch.randn(11, 8)
    labels = torch.tensor([1, 2, -100, 4, 5])
    kwargs = dict(divergence="generalized_jsd", beta=0.3, kd_weight=0.7, chunk_size=2)
    direct, parts = fused_linear_distillation_loss(hidden, head.weight, teacher_hidden, teacher_weight, labels, **kwargs)
    grads = torch.autograd.grad(direct, [hidden, head.weight])

    assert fused_head(head) is head and fused_head(head).forward.__func__ is head.forward.__func__
    assert torch.equal(head(hidden), hidden @ head.weight.t())
    loss, kd, ce, num_tokens = head(hidden, teacher_hidden, teacher_weight, None, labels, kwargs)
    assert torch.equal(loss, direct) and torch.equal(kd, parts["kd"]) and int(num_tokens) == 4
    for got, want in zip(torch.autograd.grad(loss, [hidden, head.weight]), grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    twin = copy.deepcopy(head)  # the bound forward follows the copy, not the original's weight
    twin.weight.data.zero_()
    assert twin(hidden).abs().sum() == 0 and head(hidden).abs().sum() > 0


def test_the_fused_loss_and_the_config_agree_on_the_chunk_size():
    """One default: the function's chunk_size is distill.chunk_size's (they once said 1024 and 256)."""
    import inspect

    from slm_cli.config.schema import DistillSettings

    default = inspect.signature(fused_linear_distillation_loss).parameters["chunk_size"].default
    assert default == DistillSettings().chunk_size == 256
