"""On-policy and sequence-level text: a model writes the completions the student is trained on.

On-policy distillation (GKD, Agarwal et al. 2024; the paper's stage 2) closes the gap between
training on the dataset's completions and serving, where the student conditions on its own
earlier tokens: the student samples a completion for each prompt, the teacher scores every
token of it, and the student moves toward the teacher's distribution at exactly the prefixes
it produces itself. Sequence-level KD (Kim & Rush 2016) is the same with the teacher writing.

The prompt of a training row is everything before its first target token, so any dataset the
SFT stages read (prompt/completion or chat) feeds on-policy distillation unchanged.
"""

from __future__ import annotations

import copy

import torch

IGNORE_INDEX = -100


def split_prompts(batch: dict) -> list[list[int]]:
    """The prompt of each right-padded row: the tokens before its first target (label != -100)."""
    prompts = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        targets = (labels != IGNORE_INDEX).nonzero()
        # labels are aligned with input_ids, so the first target token itself is not prompt
        end = int(targets[0]) if len(targets) else int(batch["attention_mask"][len(prompts)].sum())
        prompts.append(ids[:end].tolist())
    return prompts


def _left_pad(prompts: list[list[int]], pad_id: int, device, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    width = -(-max(len(p) for p in prompts) // multiple) * multiple
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


CACHES = ("dynamic", "static", "compiled")


def _cache_kwargs(cache: str) -> dict:
    if cache == "dynamic":
        return {}
    if cache == "static":
        return {"cache_implementation": "static", "disable_compile": True}
    if cache == "compiled":
        from transformers import CompileConfig

        compile_config = CompileConfig(mode="default", dynamic=False)
        compile_config._compile_all_devices = True  # transformers' own switch for compiling off accelerators
        return {"cache_implementation": "static", "compile_config": compile_config}
    raise ValueError(f"cache must be one of {CACHES}, not {cache!r}")


@torch.no_grad()
def sample_completions(
    model,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    synced: bool = False,
    cache: str = "dynamic",
) -> list[list[int]]:
    """One completion per prompt from `model` (batched, KV cache), cut after its first EOS.

    `synced=True` is for a model sharded by ZeRO-3 over several ranks (the teacher in
    sequence_level mode): each decoding step gathers weights collectively, so every rank keeps
    stepping until all ranks are done (transformers' ``synced_gpus``).

    `temperature` is the sampling temperature (`gen_temperature`); 0 means greedy. A completion
    that ends without EOS is kept as written (it hit `max_new_tokens`); one that is empty gets
    the EOS token, so every row has at least one token to learn from.

    `cache` (`gen_cache`): ``dynamic`` grows the KV cache each step (transformers' default);
    ``static`` preallocates it for prompt + `max_new_tokens`; ``compiled`` is static plus
    torch.compile of the decoding forward, on every device (transformers compiles only on
    accelerators by default). bench/sampling.py measures the three side by side.
    """
    was_training = model.training
    model.eval()
    # a static cache is sized prompt width + max_new_tokens: widths rounded up to a multiple of 64 give a
    # compiled decoder a few shapes to compile for, instead of one per batch (each recompile costs seconds)
    ids, mask = _left_pad(prompts, pad_id, next(model.parameters()).device, multiple=1 if cache == "dynamic" else 64)
    kwargs = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
        use_cache=True, synced_gpus=synced, **kwargs, **_cache_kwargs(cache),
    )
    if was_training:
        model.train()
    completions = []
    for row in out[:, ids.shape[1]:].tolist():
        if eos_id in row:
            row = row[: row.index(eos_id) + 1]
        completions.append(row or [eos_id])
    return completions


class GenerationCopy:
    """A whole, unsharded copy of a ZeRO-3 student that writes its on-policy completions.

    Under ZeRO-3 each rank holds a slice of every weight, gathered collectively inside each
    layer's forward. Decoding through the sharded model would make every rank run the same
    number of decoding steps (a rank that stops early leaves the others waiting in a gather),
    so instead this copy is refreshed from the gathered weights -- one collective per
    optimizer step, on every rank -- and then samples locally with no collective at all.
    The cost is one whole student per rank (the model being distilled is the small one).
    Build it from the model *before* DeepSpeed partitions it; ``refresh`` every rank at once.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._step: int | None = None

    def refresh(self, engine) -> torch.nn.Module:
        """Copy `engine`'s current (sharded) weights into the copy and return it; a collective."""
        import deepspeed

        if self._step == engine.global_steps:  # gradient accumulation: weights unchanged since the last copy
            return self.model
        sharded = dict(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(sharded.values())):
            for name, param in self.model.named_parameters():
                param.data = sharded[name].data.detach().clone()  # takes the engine's dtype (bf16 runs)
        self.model.to(engine.device)
        self._step = engine.global_steps
        return self.model


def completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device) -> dict:
    """Right-padded training rows prompt + completion, with targets on the completion only."""
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
        labels[i, len(p):n] = torch.tensor(c, dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
