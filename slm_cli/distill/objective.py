"""The distillation objective the training loop calls: student and teacher forward, then the loss.

By default (`distill.fused_loss=true`) only the two models' last hidden states are computed;
`fused_linear_distillation_loss` applies each lm_head chunk by chunk, so the tokens x vocab
logits of neither model exist at once. The loss runs *inside* a call of the student's lm_head
module (see ``fused_head``): under ZeRO-3 a sharded weight is whole only during its own
module's forward and backward, which DeepSpeed's module hooks arrange, so the same code path
serves every ZeRO stage. The frozen teacher's lm_head is gathered around the call.
"""

from __future__ import annotations

import contextlib
import random
import types
from typing import Callable

import torch

from slm_cli.distill.logit_cache import target_mask, topk_distillation_loss
from slm_cli.distill.losses import distillation_loss, fused_linear_distillation_loss
from slm_cli.distill.sampler import completion_batch, sample_completions, split_prompts


def causal_lm_parts(module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone returning hidden states, lm_head) of an HF causal LM, PEFT-wrapped or not."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return base.model, base.lm_head


def _fused_head_forward(self, hidden, teacher_hidden=None, teacher_weight=None, teacher_bias=None, labels=None,
                        loss_kwargs=None):
    if teacher_hidden is None:
        return type(self).forward(self, hidden)  # the plain lm_head
    loss, parts = fused_linear_distillation_loss(
        hidden, self.weight, teacher_hidden, teacher_weight, labels, student_bias=self.bias, **loss_kwargs
    )
    return loss, parts["kd"], parts["ce"], parts["num_tokens"]


def fused_head(head: torch.nn.Module) -> torch.nn.Module:
    """Let `head` (an lm_head Linear) also compute the fused distillation loss when called for it.

    ``head(hidden)`` is unchanged. ``head(hidden, teacher_hidden, teacher_weight, teacher_bias,
    labels, loss_kwargs)`` returns fused_linear_distillation_loss(...) of the head's own weight
    and bias as (loss, kd, ce, num_tokens). Calling through the module, rather than reading
    ``head.weight`` outside it, is what lets ZeRO-3 gather the sharded weight for the forward and
    again for the backward (where the weight's gradient lands), then re-partition it. Only this
    instance's forward is replaced (a bound method, so a deepcopy binds to the copy); its class,
    parameters and state_dict stay as they were.
    """
    if getattr(head.__dict__.get("forward"), "__func__", None) is not _fused_head_forward:
        head.forward = types.MethodType(_fused_head_forward, head)
    return head


def _gathered(module: torch.nn.Module):
    """The module's own (ZeRO-3 sharded) parameters gathered for reading; a no-op if not sharded."""
    params = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


class KDObjective:
    """loss_fn(engine, batch) -> (summed loss, parts) for slm_cli.engine.loop.train.

    `teacher` is the frozen model, or its ZeRO-3 engine (slm_cli.engine.loop.partition_frozen).
    """

    def __init__(self, teacher, settings, vocab_size: int, fused: bool):
        self.teacher, self.s, self.vocab_size, self.fused = teacher, settings, vocab_size, fused
        self.teacher_model = getattr(teacher, "module", teacher)  # the model inside a DeepSpeed engine

    def _loss_kwargs(self, batch: dict) -> dict:
        # Text the student wrote itself has no "right answer" to imitate: pure KD there.
        kd_weight = 1.0 if batch.get("on_policy") else self.s.kd_weight
        return dict(
            divergence=self.s.divergence, beta=self.s.beta, kd_temperature=self.s.kd_temperature, kd_weight=kd_weight,
            reduction="sum", vocab_size=self.vocab_size,
        )

    def __call__(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = batch["labels"][:, 1:]
        if self.fused:
            backbone, head = causal_lm_parts(engine.module)
            h = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            t_backbone, t_head = causal_lm_parts(self.teacher_model)
            with torch.no_grad():
                ht = t_backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            loss_kwargs = dict(chunk_size=self.s.chunk_size, compile=self.s.compile, **self._loss_kwargs(batch))
            with _gathered(t_head):
                loss, kd, ce, _ = fused_head(head)(
                    h.reshape(-1, h.size(-1)), ht.reshape(-1, ht.size(-1)), t_head.weight, t_head.bias,
                    labels.reshape(-1), loss_kwargs,
                )  # fmt: skip
            parts = {"kd": kd, "ce": ce}
        else:
            s_logits = engine(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            with torch.no_grad():
                t_logits = self.teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            loss, parts = distillation_loss(s_logits, t_logits, labels, **self._loss_kwargs(batch))
        return loss, {"kd": parts["kd"], "ce": parts["ce"]}


class CachedKDObjective:
    """loss_fn(engine, batch) for teacher.logits=precompute: the teacher's rows come from a top-k cache.

    Only the student runs (plain logits path, not fused: the loss needs its full log-softmax to
    gather the teacher's ids and its rest mass). The KD term is ``topk_distillation_loss``:
    the divergence between the two distributions folded onto the teacher's k ids plus one rest
    bucket, exact when k equals the vocabulary (see slm_cli.distill.logit_cache).
    """

    def __init__(self, cache, settings, vocab_size: int):
        if abs(cache.kd_temperature - settings.kd_temperature) > 1e-12:
            raise ValueError(
                f"the teacher-logit cache was written at kd_temperature={cache.kd_temperature}, "
                f"but distill.kd_temperature={settings.kd_temperature}; rebuild the cache at this temperature"
            )
        self.cache, self.s, self.vocab_size = cache, settings, vocab_size

    def __call__(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        targets = target_mask(batch["labels"])
        s_logits = engine(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][targets]
        t_ids, t_lp, t_rest = (t.to(s_logits.device) for t in self.cache.rows(batch))
        loss, parts = topk_distillation_loss(
            s_logits, t_ids, t_lp, t_rest, batch["labels"][:, 1:][targets],
            divergence=self.s.divergence, beta=self.s.beta, kd_temperature=self.s.kd_temperature,
            kd_weight=self.s.kd_weight, vocab_size=self.vocab_size,
        )
        return loss, {"kd": parts["kd"], "ce": parts["ce"]}


def make_prepare(
    mode: str, settings, *, student_engine, teacher, pad_id: int, eos_id: int, seed: int, student_copy=None,
    teacher_synced: bool = False,
) -> Callable | None:
    """The loop's `prepare` hook for a distillation mode: swaps dataset completions for sampled ones.

    supervised: None (train on the dataset). on_policy: the student writes. sequence_level: the
    teacher writes. mixed: micro-batch k is on-policy with probability `lambda_on_policy`, drawn
    from a generator seeded by (seed, k) so a resumed run makes the same choices (and every
    rank the same choice, which the ZeRO-3 refresh below relies on). `student_copy` (a
    sampler.GenerationCopy, ZeRO-3 only) writes instead of the sharded student;
    `teacher_synced` (a ZeRO-3 teacher on several ranks) keeps the ranks decoding in step.
    """
    if mode == "supervised":
        return None

    def write(batch: dict, writer, on_policy: bool, synced: bool = False) -> dict:
        prompts = split_prompts(batch)
        completions = sample_completions(
            writer, prompts, pad_id=pad_id, eos_id=eos_id, max_new_tokens=settings.gen_max_new_tokens,
            temperature=settings.gen_temperature, top_p=settings.gen_top_p, top_k=settings.gen_top_k, synced=synced,
            cache=settings.gen_cache,
        )
        out = completion_batch(prompts, completions, pad_id, batch["input_ids"].device)
        out["on_policy"] = on_policy
        return out

    def prepare(batch: dict, k: int) -> dict:
        if mode == "sequence_level":
            return write(batch, teacher, on_policy=False, synced=teacher_synced)
        if mode == "mixed" and random.Random(seed * 1_000_003 + k).random() >= settings.lambda_on_policy:
            return batch
        writer = student_copy.refresh(student_engine) if student_copy is not None else student_engine.module
        return write(batch, writer, on_policy=True)

    return prepare
