"""Offline teacher logits: the teacher's top-k log-probabilities, written once, read every step.

`teacher.logits=precompute` runs the teacher over the training (and validation)
examples once and keeps, for every target position (a position whose next token has a label),
the k most likely token ids, their log-probabilities log p_i at the KD temperature T
(p = softmax(t / T)), and the log of the remaining mass r = 1 − Σ_top-k p_i. Training then reads
these rows instead of running the teacher.

Storage (under ``<output_dir>.work/teacher_logits/``): safetensors shards ``shard-00000.safetensors``
holding ``token_ids`` int32 [N_tokens, k], ``logprobs`` float16/float32 [N_tokens, k],
``rest_logprob`` float32 [N_tokens], ``offsets`` int64 [N_examples + 1] (example e owns rows
offsets[e]:offsets[e+1]) and ``example_keys`` int64 [N_examples]; plus ``index.json`` with k,
vocab, dtype, kd_temperature, bytes per token, the teacher's content hash and a hash of the data.
Examples are found by a key hashed from their (input_ids, labels), so the cache does not depend
on the order the training loop draws them in.

The KD term with a top-k teacher (``topk_distillation_loss``): both distributions are mapped
onto the same k + 1 buckets, the teacher's top-k ids plus one "rest" bucket:
    p̃ = (p_1, …, p_k, 1 − Σ p_i),   q̃ = (q_1, …, q_k, 1 − Σ q_i),
q being the student's distribution at the same temperature and q_i its probability of the
teacher's i-th id. The divergence is then taken between p̃ and q̃. This is an approximation:
it ignores how either model spreads the rest mass over the other V − k tokens (by the data
processing inequality, KL(p̃‖q̃) ≤ KL(p‖q)). At k = vocab there is no rest and the value is
exactly the online loss.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from slm_cli.distill.losses import DIVERGENCES, _mix_kwargs, trim_vocab

Tensor = torch.Tensor
IGNORE_INDEX = -100
INDEX_NAME = "index.json"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------
# Keys and the per-position top-k
# ---------------------------------------------------------------------------


def example_key(input_ids: Iterable[int], labels: Iterable[int]) -> int:
    """A signed 63-bit key for one example from its token ids and labels (blake2b, stable across runs)."""
    payload = json.dumps([list(map(int, input_ids)), list(map(int, labels))], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") >> 1


def batch_keys(batch: dict) -> list[int]:
    """The example_key of each row of a right-padded collated batch (padding dropped via attention_mask)."""
    keys = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        keys.append(example_key(ids[:n].tolist(), labels[:n].tolist()))
    return keys


def target_mask(labels: Tensor) -> Tensor:
    """[B, L-1] bool: position t predicts token t+1, and it is a target when labels[:, t+1] is set."""
    return labels[:, 1:] != IGNORE_INDEX


def teacher_topk(log_probs: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ids int32 [N, k], top-k log p [N, k], log of the rest mass [N]) from log-probabilities [N, V].

    The rest mass is computed as a logsumexp over the entries outside the top-k (not as 1 − Σ,
    which would cancel catastrophically when the top-k holds nearly all the mass); at k = V it
    is log 0, stored as the most negative finite float.
    """
    values, ids = log_probs.topk(k, dim=-1)
    rest = _rest_logprob(log_probs, ids)
    return ids.to(torch.int32), values, rest


def _rest_logprob(log_probs: Tensor, ids: Tensor) -> Tensor:
    """log Σ_{v ∉ ids} exp(log_probs[v]) per row; the most negative finite float when ids cover all of V."""
    tiny = torch.finfo(torch.float32).min
    if ids.shape[-1] >= log_probs.shape[-1]:
        return torch.full(log_probs.shape[:-1], tiny, dtype=torch.float32, device=log_probs.device)
    outside = log_probs.float().scatter(-1, ids.long(), float("-inf"))
    return torch.logsumexp(outside, dim=-1).clamp(min=tiny)


# ---------------------------------------------------------------------------
# Writing and reading the cache
# ---------------------------------------------------------------------------


def bytes_per_token(k: int, dtype: torch.dtype) -> int:
    """Stored bytes per target position: k int32 ids, k log-probs, one float32 rest log-prob."""
    return k * 4 + k * torch.finfo(dtype).bits // 8 + 4


def data_hash(examples: list) -> str:
    """sha256 over the examples' keys, in order: the cache is reused only for the same data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(example_key(ex.input_ids, ex.labels).to_bytes(8, "little"))
    return h.hexdigest()


def read_index(cache_dir: str | Path) -> dict | None:
    path = Path(cache_dir) / INDEX_NAME
    return json.loads(path.read_text()) if path.is_file() else None


@torch.no_grad()
def write_cache(
    teacher: torch.nn.Module,
    examples: list,
    cache_dir: str | Path,
    *,
    k: int,
    vocab_size: int,
    collate: Callable[[list], dict],
    kd_temperature: float = 1.0,
    dtype: torch.dtype = torch.float16,
    batch_size: int = 8,
    shard_tokens: int = 1 << 20,
    teacher_hash: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run the teacher over `examples` once and write the top-k cache; returns the index dict.

    Examples with identical (input_ids, labels) are stored once. `shard_tokens` bounds the rows
    per shard (a shard always holds whole examples). The index is written last, so a cache
    without index.json is incomplete and gets rewritten. `progress(done, total)` is called after
    each batch with the distinct examples done so far.
    """
    if not 1 <= k <= vocab_size:
        raise ValueError(f"teacher.logits_top_k={k} must be in [1, {vocab_size}] (the shared vocabulary)")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for old in list(cache_dir.glob("shard-*.safetensors")) + [cache_dir / INDEX_NAME]:
        old.unlink(missing_ok=True)
    device = next(teacher.parameters()).device
    seen: set[int] = set()
    unique = []
    for ex in examples:
        key = example_key(ex.input_ids, ex.labels)
        if key not in seen:
            seen.add(key)
            unique.append((key, ex))

    shards: list[dict] = []
    buf: dict[str, list] = {"ids": [], "lp": [], "rest": [], "counts": [], "keys": []}

    def flush() -> None:
        if not buf["keys"]:
            return
        counts = torch.tensor([0] + buf["counts"], dtype=torch.int64)
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(
            {
                "token_ids": torch.cat(buf["ids"]).contiguous(),
                "logprobs": torch.cat(buf["lp"]).to(dtype).contiguous(),
                "rest_logprob": torch.cat(buf["rest"]).float().contiguous(),
                "offsets": counts.cumsum(0),
                "example_keys": torch.tensor(buf["keys"], dtype=torch.int64),
            },
            str(cache_dir / name),
        )
        shards.append({"file": name, "examples": len(buf["keys"]), "tokens": int(counts.sum())})
        for v in buf.values():
            v.clear()

    n_tokens = 0
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        batch = collate([ex for _, ex in chunk])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        targets = target_mask(batch["labels"]).to(device)
        log_probs = torch.log_softmax(trim_vocab(logits, vocab_size)[targets].float() / kd_temperature, dim=-1)
        top_ids, top_lp, rest = teacher_topk(log_probs, k)
        counts = targets.sum(1).tolist()
        rows = torch.tensor([0] + counts).cumsum(0).tolist()
        for r, (key, _) in enumerate(chunk):
            a, b = rows[r], rows[r + 1]
            buf["ids"].append(top_ids[a:b].cpu())
            buf["lp"].append(top_lp[a:b].cpu())
            buf["rest"].append(rest[a:b].cpu())
            buf["counts"].append(b - a)
            buf["keys"].append(key)
            n_tokens += b - a
            if sum(buf["counts"]) >= shard_tokens:
                flush()
        if progress is not None:
            progress(start + len(chunk), len(unique))
    flush()
    index = {
        "format": FORMAT_VERSION,
        "k": k,
        "vocab": vocab_size,
        "dtype": str(dtype).removeprefix("torch."),
        "kd_temperature": float(kd_temperature),
        "bytes_per_token": bytes_per_token(k, dtype),
        "examples": len(unique),
        "tokens": n_tokens,
        "teacher_hash": teacher_hash,
        "data_hash": data_hash(examples),
        "shards": shards,
    }
    (cache_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return index


def cache_matches(index: dict | None, *, k: int, vocab_size: int, kd_temperature: float, dtype: torch.dtype,
                  teacher_hash: str, examples: list) -> bool:
    """Whether an existing index was written for this teacher, data, k, vocabulary, dtype and temperature."""
    if index is None:
        return False
    want = {"format": FORMAT_VERSION, "k": k, "vocab": vocab_size, "kd_temperature": float(kd_temperature),
            "dtype": str(dtype).removeprefix("torch."), "teacher_hash": teacher_hash}
    return all(index.get(name) == value for name, value in want.items()) and index.get("data_hash") == data_hash(examples)


class TeacherLogitCache:
    """The whole cache in memory, rows looked up by example key: `rows(batch)` feeds the loss."""

    def __init__(self, cache_dir: str | Path):
        cache_dir = Path(cache_dir)
        self.index = read_index(cache_dir)
        if self.index is None:
            raise FileNotFoundError(f"no {INDEX_NAME} in {cache_dir}: the teacher-logit cache is incomplete")
        self.k, self.vocab = self.index["k"], self.index["vocab"]
        self.kd_temperature = self.index["kd_temperature"]
        ids, lps, rests, self._where = [], [], [], {}
        base = 0
        for shard in self.index["shards"]:
            t = load_file(str(cache_dir / shard["file"]))
            offsets = (t["offsets"] + base).tolist()
            for e, key in enumerate(t["example_keys"].tolist()):
                self._where[key] = (offsets[e], offsets[e + 1])
            ids.append(t["token_ids"])
            lps.append(t["logprobs"])
            rests.append(t["rest_logprob"])
            base = offsets[-1]
        # Kept in their stored dtypes (int32, float16) and widened per batch, so memory stays at bytes_per_token.
        self.token_ids, self.logprobs, self.rest_logprob = torch.cat(ids), torch.cat(lps), torch.cat(rests)

    def rows(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """(ids [N, k], log p [N, k], log rest [N]) for the batch's target positions, row-major like `target_mask`."""
        spans = []
        for key in batch_keys(batch):
            if key not in self._where:
                raise KeyError(
                    "an example of this batch is not in the teacher-logit cache (data changed since it was written?); "
                    "delete the cache folder or rerun so it is rebuilt"
                )
            spans.append(self._where[key])
        select = torch.cat([torch.arange(a, b) for a, b in spans]) if spans else torch.zeros(0, dtype=torch.long)
        return self.token_ids[select].long(), self.logprobs[select].float(), self.rest_logprob[select]


# ---------------------------------------------------------------------------
# The loss on k + 1 buckets
# ---------------------------------------------------------------------------


def student_buckets(student_log_probs: Tensor, ids: Tensor, with_rest: bool) -> Tensor:
    """log q̃ [N, k(+1)]: the student's log-probabilities at the teacher's ids, then (optionally) its rest mass."""
    top = student_log_probs.gather(-1, ids.long())
    if not with_rest:
        return top
    return torch.cat([top, _rest_logprob(student_log_probs, ids).unsqueeze(-1)], dim=-1)


def topk_distillation_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    teacher_rest_logprob: Tensor,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float | None = None,
    kd_temperature: float = 1.0,
    kd_weight: float = 0.9,
    vocab_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed (1 − kd_weight)·CE + kd_weight·KD over target tokens, KD on the k + 1 buckets (module doc).

    student_logits [N, V] and labels [N] are the target positions only (the rows the cache
    holds, in the same order); the teacher's rows come at the KD temperature the cache was
    written at. The divergence runs on the bucket log-probabilities at temperature 1 (they are
    already tempered), times T² as in ``distillation_loss``. Any divergence of
    ``losses.DIVERGENCES`` works, since each is a function of the two bucket distributions.
    Returns (loss, {"kd", "ce", "num_tokens"}) with sums, like ``distillation_loss(reduction="sum")``.
    """
    mix = _mix_kwargs(divergence, beta)
    student_logits = trim_vocab(student_logits, vocab_size).float()
    ce = F.cross_entropy(student_logits, labels, reduction="sum")
    with_rest = teacher_ids.shape[-1] < student_logits.shape[-1]
    log_q = student_buckets(torch.log_softmax(student_logits / kd_temperature, dim=-1), teacher_ids, with_rest)
    log_p = torch.cat([teacher_logprobs, teacher_rest_logprob.unsqueeze(-1)], -1) if with_rest else teacher_logprobs
    kd = kd_temperature**2 * DIVERGENCES[divergence](log_q, log_p.float(), kd_temperature=1.0, **mix).sum()
    loss = kd_weight * kd
    if kd_weight < 1.0:
        loss = loss + (1.0 - kd_weight) * ce
    return loss, {"kd": kd.detach(), "ce": ce.detach(), "num_tokens": torch.tensor(labels.numel())}
