"""Distillation losses: divergences between teacher and student next-token distributions.

How token-level knowledge distillation works
--------------------------------------------
At every position the teacher and the student each predict a distribution over the
vocabulary, p = softmax(t / T) (teacher) and q = softmax(s / T) (student), where t, s are
the logits and T is the *KD temperature* (``kd_temperature``; it softens both
distributions so the student also learns from the teacher's small probabilities). The
student is trained to bring q close to p under a divergence D(p, q). Every divergence here
is multiplied by T² (Hinton et al., 2015): the gradient of KL at temperature T shrinks like
1/T², so the factor keeps its size comparable to the cross-entropy term whatever T is.
``kd_temperature`` is never the sampling temperature of on-policy generation
(``gen_temperature``); the two are independent knobs.

The divergences, all returned per token (shape = the logits' shape without the vocab axis)
so callers can mask and normalise:

- ``forward_kl``:  KL(p‖q) = Σ p·(log p − log q). Mean-seeking: the student spreads mass
  over every mode of the teacher.
- ``reverse_kl``:  KL(q‖p) = Σ q·(log q − log p). Mode-seeking: the student may drop modes
  but avoids putting mass where the teacher has none (preferred for on-policy KD).
- ``generalized_jsd(beta)``: with the mixture m = β·p + (1 − β)·q,
  JSD_β = β·KL(p‖m) + (1 − β)·KL(q‖m) (GKD, Agarwal et al. 2024). Taken literally it
  vanishes at both ends (m = q at β = 0, m = p at β = 1), but JSD_β / β → KL(p‖q) as β → 0
  and JSD_β / (1 − β) → KL(q‖p) as β → 1. **Convention used here**: we return the
  *scaled* form JSD_β / (β·(1 − β)) = KL(p‖m) / (1 − β) + KL(q‖m) / β, so that β = 0 is
  exactly ``forward_kl`` (teacher‖student) and β = 1 exactly ``reverse_kl``
  (student‖teacher), and the value is continuous in β. For close distributions every β
  then has the curvature of KL (JSD_β ≈ β(1 − β)/2 · Σ (p − q)²/m), so learning rate and
  ``kd_weight`` carry over when β changes. Libraries that return the unscaled JSD_β
  (e.g. the usual β = 0.5 "JSD") give ours times β(1 − β): 1/4 of ours at β = 0.5.
- ``tvd``: total variation ½·Σ |p − q|.
- ``skew_forward_kl(alpha)``: KL(p ‖ α·p + (1 − α)·q); ``skew_reverse_kl(alpha)``:
  KL(q ‖ α·q + (1 − α)·p) (DistiLLM, Ko et al. 2024). α = 0 gives plain forward / reverse
  KL; a small α (0.1) bounds the loss where the second distribution has ~0 mass.

All arithmetic is done in float32 in log space (log-softmax, then log-probabilities);
-inf logits (masked vocabulary entries) are clamped to the most negative finite float, so
a token both models rule out contributes 0, not NaN.

The training objective (``distillation_loss``) is
    loss = (1 − kd_weight)·CE(student, labels) + kd_weight·KD,
each term averaged over the non-masked tokens (``labels != ignore_index``). CE uses the
student's raw logits (temperature 1). ``fused_linear_distillation_loss`` computes the same
objective from hidden states and lm_head weights, chunk by chunk, so the full N×V logits of
neither model ever exist.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ---------------------------------------------------------------------------
# Divergences on logits (readable formulas, differentiated by autograd)
# ---------------------------------------------------------------------------


def _check_temperature(kd_temperature: float) -> None:
    if not kd_temperature > 0:
        raise ValueError(f"kd_temperature must be > 0, got {kd_temperature}; use 1.0 for no softening")


def _check_mix(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _log_probs(logits: Tensor, kd_temperature: float) -> Tensor:
    """float32 log-softmax of logits / T, with -inf clamped to the most negative finite float."""
    log_probs = torch.log_softmax(logits.float() / kd_temperature, dim=-1)
    return log_probs.clamp(min=torch.finfo(log_probs.dtype).min)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a‖b) = Σ a·(log a − log b) over the last axis, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1 − w)·b) for 0 < w < 1, computed as a logaddexp (no underflow)."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """T²·KL(p_teacher ‖ q_student) per token; logits [..., V] -> [...] (float32)."""
    _check_temperature(kd_temperature)
    log_q = _log_probs(student_logits, kd_temperature)
    log_p = _log_probs(teacher_logits, kd_temperature)
    return kd_temperature**2 * _kl(log_p, log_q)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """T²·KL(q_student ‖ p_teacher) per token; logits [..., V] -> [...] (float32)."""
    _check_temperature(kd_temperature)
    log_q = _log_probs(student_logits, kd_temperature)
    log_p = _log_probs(teacher_logits, kd_temperature)
    return kd_temperature**2 * _kl(log_q, log_p)


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5, kd_temperature: float = 1.0
) -> Tensor:
    """T²·JSD_β(p‖q) / (β(1 − β)) per token, m = β·p_teacher + (1 − β)·q_student.

    Equals KL(p‖m)/(1 − β) + KL(q‖m)/β for 0 < β < 1; β = 0 is exactly ``forward_kl``
    (KL(teacher‖student)) and β = 1 exactly ``reverse_kl`` (KL(student‖teacher)), the limits
    of the scaled form. Multiply by β(1 − β) to get the unscaled GKD value (see module doc).
    """
    _check_mix("generalized_jsd beta", beta)
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, kd_temperature=kd_temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, kd_temperature=kd_temperature)
    _check_temperature(kd_temperature)
    log_q = _log_probs(student_logits, kd_temperature)
    log_p = _log_probs(teacher_logits, kd_temperature)
    log_m = _log_mixture(log_p, log_q, beta)
    scaled = _kl(log_p, log_m) / (1.0 - beta) + _kl(log_q, log_m) / beta
    return kd_temperature**2 * scaled


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """T²·½·Σ|p_teacher − q_student| per token (total variation distance, in [0, T²])."""
    _check_temperature(kd_temperature)
    q = _log_probs(student_logits, kd_temperature).exp()
    p = _log_probs(teacher_logits, kd_temperature).exp()
    return kd_temperature**2 * 0.5 * (p - q).abs().sum(-1)


def skew_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.1, kd_temperature: float = 1.0
) -> Tensor:
    """T²·KL(p_teacher ‖ α·p_teacher + (1 − α)·q_student) per token; α = 0 is ``forward_kl``."""
    _check_mix("skew_forward_kl alpha", alpha)
    _check_temperature(kd_temperature)
    log_q = _log_probs(student_logits, kd_temperature)
    log_p = _log_probs(teacher_logits, kd_temperature)
    if alpha == 0.0:
        return kd_temperature**2 * _kl(log_p, log_q)
    if alpha == 1.0:
        return torch.zeros_like(log_p[..., 0])
    return kd_temperature**2 * _kl(log_p, _log_mixture(log_p, log_q, alpha))


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.1, kd_temperature: float = 1.0
) -> Tensor:
    """T²·KL(q_student ‖ α·q_student + (1 − α)·p_teacher) per token; α = 0 is ``reverse_kl``."""
    _check_mix("skew_reverse_kl alpha", alpha)
    _check_temperature(kd_temperature)
    log_q = _log_probs(student_logits, kd_temperature)
    log_p = _log_probs(teacher_logits, kd_temperature)
    if alpha == 0.0:
        return kd_temperature**2 * _kl(log_q, log_p)
    if alpha == 1.0:
        return torch.zeros_like(log_q[..., 0])
    return kd_temperature**2 * _kl(log_q, _log_mixture(log_q, log_p, alpha))


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "tvd": tvd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
}
"""Short config name -> divergence(student_logits, teacher_logits, *, [mix], kd_temperature)."""

# The keyword through which ``distillation_loss(beta=...)`` reaches each divergence: the
# mixing weight is β for generalized_jsd and α for the skew KLs; the others have none.
_MIX_KEYWORD = {"generalized_jsd": "beta", "skew_forward_kl": "alpha", "skew_reverse_kl": "alpha"}


def _mix_kwargs(divergence: str, beta: float | None) -> dict[str, float]:
    """Validate the divergence name and map the loss's ``beta`` to its mixing keyword."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {sorted(DIVERGENCES)}")
    keyword = _MIX_KEYWORD.get(divergence)
    if keyword is None or beta is None:
        return {}
    return {keyword: float(beta)}


# ---------------------------------------------------------------------------
# Vocabulary: padded lm_heads of different sizes
# ---------------------------------------------------------------------------


def check_vocab(student_vocab: int, teacher_vocab: int, student_tokenizer_len: int, teacher_tokenizer_len: int) -> int:
    """Return the shared real vocabulary size that logit distillation should compare over.

    Models often pad their lm_head beyond the tokenizer (Qwen2.5: 151936 rows for 0.5B,
    152064 for 7B, while ``len(tokenizer)`` is 151665); the padding rows are never real
    tokens. Logit KD is meaningful only when both models share one tokenizer; it then
    compares the first ``len(tokenizer)`` logits of each model, which this returns. Pass it as
    ``vocab_size=`` to the losses. Raises ValueError on a real mismatch (different
    tokenizers, or an lm_head smaller than its tokenizer).
    """
    if student_tokenizer_len != teacher_tokenizer_len:
        raise ValueError(
            f"student tokenizer has {student_tokenizer_len} tokens but teacher tokenizer has "
            f"{teacher_tokenizer_len}: logit distillation needs one shared tokenizer; build the "
            "student from the teacher's tokenizer (or distill from generated text instead)"
        )
    for role, vocab in (("student", student_vocab), ("teacher", teacher_vocab)):
        if vocab < student_tokenizer_len:
            raise ValueError(
                f"{role} lm_head has {vocab} rows but the tokenizer has {student_tokenizer_len} tokens "
                f"(student vocab {student_vocab}, teacher vocab {teacher_vocab}): resize the model's "
                "token embeddings to at least the tokenizer length"
            )
    return student_tokenizer_len


def trim_vocab(logits: Tensor, vocab_size: int | None) -> Tensor:
    """The first ``vocab_size`` entries of the last (vocabulary) axis, a view; None keeps all."""
    if vocab_size is None:
        return logits
    if not 0 < vocab_size <= logits.shape[-1]:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {logits.shape[-1]}] (the logits' vocab axis)")
    return logits[..., :vocab_size]


def _shared_vocab(student_vocab: int, teacher_vocab: int, vocab_size: int | None) -> int:
    """The number of vocabulary rows both models are compared over."""
    if vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"student vocab {student_vocab} != teacher vocab {teacher_vocab}: pass vocab_size= "
                "(the shared real vocabulary, see check_vocab) to compare the first vocab_size logits"
            )
        return student_vocab
    if not 0 < vocab_size <= min(student_vocab, teacher_vocab):
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {min(student_vocab, teacher_vocab)}] "
            f"(student vocab {student_vocab}, teacher vocab {teacher_vocab})"
        )
    return vocab_size


# ---------------------------------------------------------------------------
# The training objective on full logits
# ---------------------------------------------------------------------------


def _check_loss_args(kd_weight: float, reduction: str, kd_temperature: float) -> None:
    _check_mix("kd_weight", kd_weight)
    _check_temperature(kd_temperature)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float | None = None,
    kd_temperature: float = 1.0,
    kd_weight: float = 0.9,
    ignore_index: int = -100,
    reduction: str = "mean",
    vocab_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(1 − kd_weight)·CE + kd_weight·KD over the tokens whose label is not ``ignore_index``.

    Shapes: logits [..., V], labels [...] already aligned with the logits (labels[i] is the
    token position i should predict). ``beta`` is the divergence's mixing weight (β of
    generalized_jsd, α of the skew KLs; None = that function's default; ignored by the
    others). KD = divergence(student, teacher) at ``kd_temperature`` (times T², see module
    doc); CE uses the raw student logits. With ``kd_weight=1`` the CE term is not part of
    the loss at all (it is still reported); the labels then only select the tokens
    (on-policy KD, where the student wrote the completion).

    ``reduction="mean"`` divides each term by the number of non-masked tokens of this call.
    ``reduction="sum"`` returns sums: a caller that accumulates gradients over several
    micro-batches must divide the summed losses by the token count of the whole global
    batch (the sum of the returned ``num_tokens``), otherwise micro-batches with few tokens
    weigh as much as full ones. With no token left the loss is 0 (with a zero gradient).

    Returns (loss, {"kd", "ce": detached terms with the same reduction, "num_tokens"}).
    """
    _check_loss_args(kd_weight, reduction, kd_temperature)
    mix = _mix_kwargs(divergence, beta)
    shared = _shared_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    student_logits = trim_vocab(student_logits, shared).reshape(-1, shared)
    teacher_logits = trim_vocab(teacher_logits, shared).reshape(-1, shared)
    labels = labels.reshape(-1)
    if labels.shape[0] != student_logits.shape[0] or teacher_logits.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"labels ({labels.shape[0]} tokens), student logits ({student_logits.shape[0]}) and "
            f"teacher logits ({teacher_logits.shape[0]}) must cover the same tokens"
        )
    mask = labels != ignore_index
    num_tokens = mask.sum()

    per_token_kd = DIVERGENCES[divergence](student_logits, teacher_logits, kd_temperature=kd_temperature, **mix)
    kd = torch.where(mask, per_token_kd, 0.0).sum()
    ce = F.cross_entropy(student_logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        # Clamp so a batch with no supervised token gives 0 (and a zero gradient), not 0/0.
        denominator = num_tokens.clamp(min=1)
        kd, ce = kd / denominator, ce / denominator
    loss = kd_weight * kd
    if kd_weight < 1.0:
        loss = loss + (1.0 - kd_weight) * ce
    return loss, {"kd": kd.detach(), "ce": ce.detach(), "num_tokens": num_tokens}


# ---------------------------------------------------------------------------
# Fused linear + loss, chunked: the same objective without the N×V logits
# ---------------------------------------------------------------------------
#
# Each kernel takes one chunk's float32 student log-probabilities log_q and probabilities
# q, the teacher's log-probabilities log_p (all at temperature T), the mixing weight and a
# gradient scale, and returns (D per token, scale·∂D/∂s), s = z/T being the student's
# scaled logits. The gradient goes through the softmax as
#     ∂D/∂s_j = q_j·(g_j − Σ_k q_k·g_k),   g = ∂D/∂q,
# which for each divergence simplifies to the closed forms below. The [c, V] buffers set
# the peak memory and every pass over them costs time, so the kernels work in place: they
# may overwrite log_p (the chunk owns it) but never log_q or q (the CE term reuses q).
# Linear-layer logits are finite, so log_q and log_p are too; only a log of a mixture of
# probabilities can meet log 0 and is clamped.


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a[i, v]·b[i, v] for each row, as a batched matmul (no [c, V] temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _safe_log(x: Tensor) -> Tensor:
    """In-place log with log 0 clamped to the most negative finite float (0·log 0 -> 0)."""
    return x.log_().clamp_(min=torch.finfo(x.dtype).min)


def _softmax_backward_(g: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """scale·q·(g − Σ q·g), in place in g: the gradient w.r.t. logits from g = ∂D/∂q."""
    return g.sub_(_rowdot(q, g).unsqueeze(1)).mul_(q).mul_(scale)


def _grad_forward_kl(log_q: Tensor, q: Tensor, log_p: Tensor, mix: float, scale: Tensor) -> tuple[Tensor, Tensor]:
    # D = Σ p(log p − log q);  ∂D/∂s = q − p.
    p = log_p.exp()
    value = _rowdot(p, log_p.sub_(log_q))
    return value, p.sub_(q).mul_(-scale)


def _grad_reverse_kl(log_q: Tensor, q: Tensor, log_p: Tensor, mix: float, scale: Tensor) -> tuple[Tensor, Tensor]:
    # D = Σ q(log q − log p);  g = log q − log p + 1  ->  ∂D/∂s = q·(log q − log p − D).
    log_ratio = log_p.neg_().add_(log_q)
    value = _rowdot(q, log_ratio)
    return value, log_ratio.sub_(value.unsqueeze(1)).mul_(q).mul_(scale)


def _grad_generalized_jsd(
    log_q: Tensor, q: Tensor, log_p: Tensor, beta: float, scale: Tensor
) -> tuple[Tensor, Tensor]:
    # Scaled JSD: D = KL(p‖m)/(1−β) + KL(q‖m)/β, m = βp + (1−β)q. In ∂D/∂q_j the terms
    # that come from m cancel (they sum to (βp_j + (1−β)q_j)/m_j = 1, a constant), leaving
    # g = log(q/m)/β + const, so ∂D/∂s = q·(log q − log m − KL(q‖m))/β.
    # β = 0 and 1 are the forward / reverse KL limits.
    if beta == 0.0:
        return _grad_forward_kl(log_q, q, log_p, beta, scale)
    if beta == 1.0:
        return _grad_reverse_kl(log_q, q, log_p, beta, scale)
    # Four [c, V] buffers in all (log_q, q, and two scratch: log_p -> log m, p -> diff).
    p = log_p.exp()
    p_log_p = _rowdot(p, log_p)
    log_m = _safe_log(torch.add(q, p, alpha=beta / (1.0 - beta), out=log_p).mul_(1.0 - beta))
    kl_pm = p_log_p - _rowdot(p, log_m)
    diff = torch.sub(log_q, log_m, out=p)
    kl_qm = _rowdot(q, diff)
    value = kl_pm / (1.0 - beta) + kl_qm / beta
    return value, diff.sub_(kl_qm.unsqueeze(1)).mul_(q).mul_(scale / beta)


def _grad_tvd(log_q: Tensor, q: Tensor, log_p: Tensor, mix: float, scale: Tensor) -> tuple[Tensor, Tensor]:
    # D = ½Σ|q − p|;  g = ½·sign(q − p)  ->  ∂D/∂s = q·(g − Σ q·g).
    diff = torch.sub(q, log_p.exp_(), out=log_p)
    value = 0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1)
    return value, _softmax_backward_(diff.sign_().mul_(0.5), q, scale)


def _grad_skew_forward_kl(
    log_q: Tensor, q: Tensor, log_p: Tensor, alpha: float, scale: Tensor
) -> tuple[Tensor, Tensor]:
    # D = KL(p‖r), r = αp + (1−α)q;  g = −(1−α)·p/r  ->  ∂D/∂s = q·(g − Σ q·g).
    if alpha == 1.0:
        return log_q.new_zeros(log_q.shape[0]), torch.zeros_like(log_q)
    p = log_p.exp()
    r = (p * alpha).add_(q, alpha=1.0 - alpha)
    value = _rowdot(p, log_p.sub_(torch.log(r)))
    # p = r = 0 (both models rule the token out) gives 0/0: that entry has no gradient.
    g = p.div_(r).mul_(-(1.0 - alpha)).nan_to_num_(nan=0.0)
    return value, _softmax_backward_(g, q, scale)


def _grad_skew_reverse_kl(
    log_q: Tensor, q: Tensor, log_p: Tensor, alpha: float, scale: Tensor
) -> tuple[Tensor, Tensor]:
    # D = KL(q‖r), r = αq + (1−α)p;  g = log(q/r) + 1 − α·q/r  ->  ∂D/∂s = q·(g − Σ q·g).
    if alpha == 1.0:
        return log_q.new_zeros(log_q.shape[0]), torch.zeros_like(log_q)
    r = log_p.exp_().mul_(1.0 - alpha).add_(q, alpha=alpha)
    g = torch.sub(log_q, _safe_log(r.clone()))
    value = _rowdot(q, g)
    g.sub_(r.reciprocal_().mul_(q).mul_(alpha).nan_to_num_(nan=0.0))
    return value, _softmax_backward_(g, q, scale)


_VALUE_AND_GRAD: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "forward_kl": _grad_forward_kl,
    "reverse_kl": _grad_reverse_kl,
    "generalized_jsd": _grad_generalized_jsd,
    "tvd": _grad_tvd,
    "skew_forward_kl": _grad_skew_forward_kl,
    "skew_reverse_kl": _grad_skew_reverse_kl,
}
_DEFAULT_MIX = {"generalized_jsd": 0.5, "skew_forward_kl": 0.1, "skew_reverse_kl": 0.1}
assert _VALUE_AND_GRAD.keys() == DIVERGENCES.keys()


def _chunk_loss_and_grad(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    labels: Tensor,
    ce_scale: Tensor,
    kd_scale: Tensor,
    divergence: str,
    mix: float,
    kd_temperature: float,
    with_ce_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk of valid tokens: (Σ T²·D, Σ CE, ∂loss/∂student_logits).

    loss = ce_scale·Σ CE + kd_scale·Σ T²·D; the scales carry kd_weight and the token
    normalisation (0-dim tensors, so a compiled version does not recompile per batch). The
    logits are formed here, so each [c, V] buffer dies as soon as it is used.
    """
    student_logits = F.linear(student_hidden, student_weight, student_bias).float()
    log_z = torch.log_softmax(student_logits, dim=-1)
    ce = -log_z.gather(1, labels.unsqueeze(1)).sum()
    if kd_temperature == 1.0:
        log_q = log_z
    else:
        log_q = torch.log_softmax(student_logits.div_(kd_temperature), dim=-1)
    del student_logits
    if kd_temperature == 1.0 or not with_ce_grad:
        del log_z  # the CE gradient will use q (T = 1) or is not needed
    q = log_q.exp()
    teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias).float()
    if kd_temperature != 1.0:
        teacher_logits.div_(kd_temperature)
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    del teacher_logits
    # T²·D of z/T: ∂/∂z = T²·(1/T)·∂D/∂s = T·∂D/∂s.
    value, grad = _VALUE_AND_GRAD[divergence](log_q, q, log_p, mix, kd_scale * kd_temperature)
    del log_p, log_q
    if with_ce_grad:
        # CE gradient w.r.t. the raw logits: softmax(z) − onehot(label); softmax(z) is q at T = 1.
        probs = q if kd_temperature == 1.0 else log_z.exp_()
        grad.addcmul_(probs, ce_scale)
        grad.scatter_add_(1, labels.unsqueeze(1), (-ce_scale).expand(labels.shape[0], 1))
    return value.sum() * kd_temperature**2, ce, grad


_COMPILED: dict[str, Callable] = {}


def _chunk_fn(compile: bool) -> Callable:
    if not compile:
        return _chunk_loss_and_grad
    if "chunk" not in _COMPILED:
        _COMPILED["chunk"] = torch.compile(_chunk_loss_and_grad, dynamic=True)
    return _COMPILED["chunk"]


class _FusedLinearDistillation(torch.autograd.Function):
    """Loss and gradients of the student's lm_head + distillation loss, chunk by chunk.

    The forward pass already computes the gradients w.r.t. the student's hidden states,
    lm_head weight and bias (the fused-linear-cross-entropy trick): per chunk of tokens it
    forms both models' logits, the loss and ∂loss/∂logits, and folds the latter straight
    into the hidden-state and weight gradients, so no [N, V] tensor is ever kept. The
    backward pass only scales the stored gradients by the incoming grad_output.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        teacher_bias: Tensor | None,
        labels: Tensor,
        options: dict,
    ):
        vocab = options["vocab_size"]
        kd_weight = options["kd_weight"]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and student_bias is not None

        # Only supervised tokens are computed: masked ones (prompts, padding) cost nothing.
        valid = (labels != options["ignore_index"]).nonzero().view(-1)
        num_tokens = valid.numel()
        if options["reduction"] == "mean":
            denominator = max(num_tokens, 1)
            ce_scale = (1.0 - kd_weight) / denominator
            kd_scale = kd_weight / denominator
        else:
            ce_scale, kd_scale = 1.0 - kd_weight, kd_weight
        device = student_hidden.device
        ce_scale_t = torch.tensor(ce_scale, dtype=torch.float32, device=device)
        kd_scale_t = torch.tensor(kd_scale, dtype=torch.float32, device=device)

        w_s = student_weight[:vocab]
        b_s = None if student_bias is None else student_bias[:vocab]
        w_t = teacher_weight[:vocab]
        b_t = None if teacher_bias is None else teacher_bias[:vocab]
        grad_hidden = torch.zeros_like(student_hidden) if need_hidden else None
        grad_weight = torch.zeros_like(student_weight) if need_weight else None
        grad_bias = torch.zeros_like(student_bias) if need_bias else None
        kd_total = torch.zeros((), dtype=torch.float32, device=device)
        ce_total = torch.zeros((), dtype=torch.float32, device=device)
        chunk_fn = _chunk_fn(options["compile"])

        with_ce_grad = kd_weight < 1.0
        for start in range(0, num_tokens, options["chunk_size"]):
            rows = valid[start : start + options["chunk_size"]]
            h_s = student_hidden.index_select(0, rows)
            kd, ce, grad_logits = chunk_fn(
                h_s, w_s, b_s, teacher_hidden.index_select(0, rows), w_t, b_t,
                labels.index_select(0, rows), ce_scale_t, kd_scale_t,
                options["divergence"], options["mix"], options["kd_temperature"], with_ce_grad,
            )  # fmt: skip
            kd_total += kd
            ce_total += ce
            grad_logits = grad_logits.to(student_hidden.dtype)
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, rows, grad_logits @ w_s)
            if grad_weight is not None:
                grad_weight[:vocab].addmm_(grad_logits.t(), h_s)
            if grad_bias is not None:
                grad_bias[:vocab] += grad_logits.sum(0)

        # The CE term enters the loss only when it has weight: at kd_weight = 1 it is
        # reported but contributes neither value nor gradient.
        loss = kd_scale_t * kd_total
        if with_ce_grad:
            loss = loss + ce_scale_t * ce_total
        if options["reduction"] == "mean":
            kd_total = kd_total / max(num_tokens, 1)
            ce_total = ce_total / max(num_tokens, 1)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        num_tokens_t = torch.tensor(num_tokens, device=device)
        ctx.mark_non_differentiable(kd_total, ce_total, num_tokens_t)
        return loss, kd_total, ce_total, num_tokens_t

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce, _grad_num):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in (grad_hidden, grad_weight, grad_bias)]
        return (*scaled, None, None, None, None, None)


def fused_linear_distillation_loss(
    student_hidden: Tensor,
    student_lm_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_lm_head_weight: Tensor,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float | None = None,
    kd_temperature: float = 1.0,
    kd_weight: float = 0.9,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int = 256,  # distill.chunk_size's default: fastest measured at 4096 x 32k (BENCHMARKS.md), 0.41 GB extra
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    vocab_size: int | None = None,
    compile: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``distillation_loss`` of the logits hidden @ W.T (+ b), without materialising them.

    Shapes: student_hidden [..., Hs], student_lm_head_weight [Vs, Hs], teacher_hidden
    [..., Ht], teacher_lm_head_weight [Vt, Ht], labels [...] (aligned, see
    ``distillation_loss``). Tokens are processed ``chunk_size`` at a time, so the extra
    memory is a few [chunk_size, V] float32 buffers plus the gradient of the student's
    weight; only tokens with a label are computed. Gradients flow to student_hidden,
    student_lm_head_weight and student_bias; the teacher gets none (pass it detached or
    frozen). If Vs != Vt, ``vocab_size`` (see ``check_vocab``) selects the first rows of
    both lm_heads; the student's other rows get a zero gradient.

    ``compile=True`` runs the per-chunk math through torch.compile (first call compiles,
    which takes a while on CPU). Returns (loss, {"kd", "ce", "num_tokens"}) like
    ``distillation_loss``, same reductions and the same no-hidden-CE rule at kd_weight=1.
    """
    _check_loss_args(kd_weight, reduction, kd_temperature)
    mix_kwargs = _mix_kwargs(divergence, beta)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mix = next(iter(mix_kwargs.values()), _DEFAULT_MIX.get(divergence, 0.0))
    _check_mix(f"{divergence} {_MIX_KEYWORD.get(divergence, 'beta')}", mix)
    shared = _shared_vocab(student_lm_head_weight.shape[0], teacher_lm_head_weight.shape[0], vocab_size)

    student_flat = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_flat = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    labels_flat = labels.reshape(-1)
    if not student_flat.shape[0] == teacher_flat.shape[0] == labels_flat.shape[0]:
        raise ValueError(
            f"student hidden ({student_flat.shape[0]} tokens), teacher hidden ({teacher_flat.shape[0]}) "
            f"and labels ({labels_flat.shape[0]}) must cover the same tokens"
        )
    options = {
        "vocab_size": shared,
        "divergence": divergence,
        "mix": mix,
        "kd_temperature": float(kd_temperature),
        "kd_weight": float(kd_weight),
        "ignore_index": ignore_index,
        "reduction": reduction,
        "chunk_size": int(chunk_size),
        "compile": compile,
    }
    loss, kd, ce, num_tokens = _FusedLinearDistillation.apply(
        student_flat,
        student_lm_head_weight,
        student_bias,
        teacher_flat,
        teacher_lm_head_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        labels_flat,
        options,
    )
    return loss, {"kd": kd, "ce": ce, "num_tokens": num_tokens}
