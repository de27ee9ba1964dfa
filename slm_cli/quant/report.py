"""What quantization costs and saves: per-layer weight error, bytes on disk, a fake-quantized model.

Weight error is measured from the saved checkpoint itself, dequantizing Ŵ = Q · s with
the scale broadcast over its group (row, whole tensor, 128×128 tile, or run of g inputs;
4-bit weights are unpacked from their int32 words first), against the source weights W:

* ``mean_rel_error`` = Σ|Ŵ − W| / Σ|W|, the relative L1 error of the layer.
* ``max_rel_error``  = max |Ŵ − W| / |W| over the entries the format represents with a
  bounded relative error: for FP8, E4M3's normal range (|W| / s ≥ 2^-6), where 3 mantissa
  bits keep round-to-nearest below 2^-4 = 6.25%; for integers, |W| ≥ s (one step), where
  round-to-nearest stays below 50%. Smaller entries (FP8 subnormals, integer zero) have an
  unbounded relative error while tiny in absolute terms, so they are left out of the maximum.
  GPTQ rounds away from the nearest level on purpose, so its maximum can pass that bound.
* ``rel_l2_error``   = ‖Ŵ − W‖_F / ‖W‖_F.

On CPUs FP8 is a storage format only (no FP8 matmul kernels; emulation is far slower
than bf16). ``fake_quant_model`` gives a float model with the same numbers: weights
replaced by their quantize→dequantize values and activations fake-quantized as the
scheme says, for judging quality where FP8 cannot run. Reloading a saved checkpoint with
``AutoModelForCausalLM.from_pretrained`` on CPU gives the same thing: transformers'
compressed-tensors integration loads the float8 weights, then decompresses them to the
model's dense dtype on the first forward pass and keeps the activation fake-quantization.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationStatus, fake_quantize
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization.utils import is_module_quantized
from safetensors import safe_open

from slm_cli.quant.checks import FP8_DTYPE, QUANTIZED_DTYPES, read_tensor_index
from slm_cli.quant.schemes import BLOCK_SIZE, quantize_model, read_quantization_config

__all__ = [
    "FP8_MIN_NORMAL",
    "checkpoint_size_report",
    "compare_reload",
    "dequantize_weight",
    "fake_quant_model",
    "weight_error_report",
]

FP8_MIN_NORMAL = 2.0**-6
_ITEMSIZE = {"F8_E4M3": 1, "F8_E5M2": 1, "BF16": 2, "F16": 2, "F32": 4, "F64": 8,
             "I8": 1, "U8": 1, "BOOL": 1, "I16": 2, "I32": 4, "I64": 8}


def _block_structure(out_dir: Path) -> tuple[int, int]:
    """The tile one scale covers: a block (bh, bw), or (1, g) for groups of g inputs."""
    for group in (read_quantization_config(out_dir).get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if weights.get("block_structure"):
            return tuple(weights["block_structure"])
        if weights.get("strategy") == "group" and weights.get("group_size"):
            return (1, int(weights["group_size"]))
    return (BLOCK_SIZE, BLOCK_SIZE)


def _num_bits(out_dir: Path) -> int:
    for group in (read_quantization_config(out_dir).get("config_groups") or {}).values():
        return int((group.get("weights") or {}).get("num_bits", 8))
    return 8


def _stored_weights(index: dict) -> dict[str, str]:
    """Module -> the tensor holding its quantized weight (``weight`` or ``weight_packed``)."""
    found = {}
    for name, (dtype, _, _) in index.items():
        module, _, leaf = name.rpartition(".")
        if (leaf == "weight" and dtype in QUANTIZED_DTYPES) or leaf == "weight_packed":
            found[module] = name
    return found


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Broadcast a stored scale to the weight's shape: scalar, per row (out, 1), or per
    block / group (each entry repeated over its bh×bw tile, cropped at the edges)."""
    rows, cols = shape
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(rows, cols)
    if tuple(scale.shape) == (rows, 1):
        return scale.expand(rows, cols)
    bh, bw = block
    tiled = scale.repeat_interleave(bh, dim=0).repeat_interleave(bw, dim=1)
    return tiled[:rows, :cols]


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, block=(BLOCK_SIZE, BLOCK_SIZE)) -> torch.Tensor:
    """Ŵ = Q · s in float32, with s broadcast per ``expand_scale``."""
    s = expand_scale(scale.float(), tuple(q.shape), tuple(block))
    return q.float() * s


def _source_weights(source) -> dict[str, torch.Tensor]:
    """Name -> tensor for a model (its state_dict), a mapping of tensors, or a checkpoint folder."""
    if isinstance(source, torch.nn.Module):
        return {k: v.detach() for k, v in source.state_dict().items()}
    if isinstance(source, dict):
        return source
    out = {}
    for name, (_, _, path) in read_tensor_index(source).items():
        with safe_open(path, framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


@torch.no_grad()
def weight_error_report(source, quant_dir: str | os.PathLike) -> list[dict]:
    """Per quantized layer of ``quant_dir``: max, mean and L2 relative error of its
    dequantized weight against the source (a float model, a name -> tensor dict, or a checkpoint folder)."""
    quant_dir = Path(quant_dir)
    index = read_tensor_index(quant_dir)
    block = _block_structure(quant_dir)
    bits = _num_bits(quant_dir)
    src = _source_weights(source)
    rows = []
    for module, stored in _stored_weights(index).items():
        name = f"{module}.weight"
        if name not in src:
            raise KeyError(f"source has no tensor {name!r}; is it the model {quant_dir} was made from?")
        w = src[name].float()
        with safe_open(index[stored][2], framework="pt") as f:
            q = f.get_tensor(stored)
            scale = f.get_tensor(f"{module}.weight_scale")
        if stored.endswith("weight_packed"):
            q = unpack_from_int32(q, bits, w.shape)
        w_hat = dequantize_weight(q, scale, block)
        err = (w_hat - w).abs()
        s = expand_scale(scale.float(), tuple(w.shape), block)
        fp8 = index[stored][0] == FP8_DTYPE
        normal = w.abs() >= s * (FP8_MIN_NORMAL if fp8 else 1.0)
        rel = err[normal] / w.abs()[normal]
        rows.append(
            {
                "name": module,
                "shape": tuple(w.shape),
                "max_rel_error": rel.max().item() if rel.numel() else 0.0,
                "mean_rel_error": (err.sum() / w.abs().sum().clamp_min(1e-30)).item(),
                "rel_l2_error": (torch.linalg.norm(w_hat - w) / torch.linalg.norm(w).clamp_min(1e-30)).item(),
                "normal_fraction": normal.float().mean().item(),
            }
        )
    return rows


def _tensor_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * _ITEMSIZE[dtype]


def checkpoint_size_report(quant_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None) -> dict:
    """Bytes of the quantized checkpoint against a bf16 copy of the same model.

    ``quantized_*`` counts only the quantized Linear layers: their float8 / int8 / packed
    int4 weights plus scales, against the same weights at 2 bytes each (expect ≈ 0.5 + scale
    overhead for 8 bits, e.g. 0.5 + 1/in for bf16 per-channel scales; ≈ 0.25 + 1/g for
    4-bit groups of g with bf16 scales). ``total_*`` counts every tensor; the bf16 total is
    the actual size of ``source_dir`` when given, else every weight at 2 bytes. File bytes
    include the safetensors headers.
    """
    quant_dir = Path(quant_dir)
    index = read_tensor_index(quant_dir)
    bits = _num_bits(quant_dir)
    stored = _stored_weights(index)
    quantized = quantized_bf16 = tensors_bf16 = 0
    for name, (dtype, shape, _) in index.items():
        module, _, leaf = name.rpartition(".")
        is_meta = leaf in ("weight_scale", "input_scale", "weight_zero_point", "input_zero_point", "weight_shape")
        dense = _tensor_bytes(dtype, shape)
        if stored.get(module) == name:
            rows, cols = shape
            dense = _tensor_bytes("BF16", (rows, cols * 32 // bits if leaf == "weight_packed" else cols))
            quantized_bf16 += dense
        if module in stored:
            quantized += _tensor_bytes(dtype, shape)
        if not is_meta:
            tensors_bf16 += _tensor_bytes("BF16", shape) if dtype.startswith(("F", "BF")) else dense
    total = sum(p.stat().st_size for p in quant_dir.glob("*.safetensors"))
    if source_dir is not None:
        total_bf16 = sum(p.stat().st_size for p in Path(source_dir).glob("*.safetensors"))
    else:
        total_bf16 = tensors_bf16
    return {
        "total_bytes": total,
        "total_bf16_bytes": total_bf16,
        "total_ratio": total / total_bf16,
        "quantized_bytes": quantized,
        "quantized_bf16_bytes": quantized_bf16,
        "quantized_ratio": quantized / quantized_bf16 if quantized_bf16 else float("nan"),
        "quantized_layers": len(stored),
    }


@torch.no_grad()
def fake_quant_model(
    model: torch.nn.Module,
    scheme: str = "fp8_dynamic",
    ignore: Iterable[str] | None = None,
    calib_batches: Iterable | None = None,
    inplace: bool = False,
    storage_dtype: torch.dtype | None = None,
    group_size: int | str = "auto",
    weight_scales=None,
) -> torch.nn.Module:
    """A float model that computes what the quantized checkpoint computes.

    Each targeted Linear weight is replaced once by Q·s (quantize→dequantize with the
    scheme's scales) and marked decompressed, the same state a reloaded checkpoint is in;
    its forward still fake-quantizes input activations (per token for fp8_dynamic, per
    128-group for fp8_block and per token for w8a8_int8, with the calibrated per-tensor scale
    for fp8_static; not at all for fp8_weight_only and w4a16). Works on a copy unless ``inplace``.

    With ``storage_dtype`` (what ``save_quantized``'s ``source_dtype`` stores: bf16 by default),
    every floating tensor that stays unquantized (embeddings, norms, ignored layers) is
    rounded through that dtype and back, as saving and reloading the checkpoint rounds it;
    without it they keep the source's full precision. ``group_size`` and ``weight_scales`` are
    passed to ``quantize_model`` (GPTQ's scales for weights it already rounded).
    """
    fq = model if inplace else copy.deepcopy(model)
    quantize_model(fq, scheme, ignore, calib_batches, group_size=group_size, weight_scales=weight_scales)
    for module in fq.modules():
        if not is_module_quantized(module):
            continue
        module.weight.data = fake_quantize(
            module.weight.data,
            module.weight_scale,
            getattr(module, "weight_zero_point", None),
            module.quantization_scheme.weights,
        ).to(module.weight.dtype)
        module.quantization_status = QuantizationStatus.DECOMPRESSED
    if storage_dtype is not None:
        for module in fq.modules():
            quantized = is_module_quantized(module)
            for pname, param in module.named_parameters(recurse=False):
                if param.is_floating_point() and not (quantized and (pname == "weight" or pname.endswith("_scale"))):
                    param.data = param.data.to(storage_dtype).to(param.dtype)
    return fq


@torch.no_grad()
def compare_reload(
    fp8_dir: str | os.PathLike,
    reference: torch.nn.Module,
    input_ids: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> dict:
    """Reload ``fp8_dir`` through transformers and compare its logits with ``reference``
    (usually ``fake_quant_model`` of the source). Returns the max absolute logit gap,
    the gap relative to the reference's largest logit, and the reloaded weight dtype."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(fp8_dir, dtype=dtype or reference.dtype)
    reloaded.eval()
    reference.eval()
    got = reloaded(input_ids=input_ids).logits.float()
    want = reference(input_ids=input_ids).logits.float()
    gap = (got - want).abs().max().item()
    first = next(m for m in reloaded.modules() if is_module_quantized(m))
    return {
        "max_abs_logit_gap": gap,
        "rel_logit_gap": gap / want.abs().max().clamp_min(1e-30).item(),
        "reloaded_weight_dtype": str(first.weight.dtype).removeprefix("torch."),
        "same_argmax_fraction": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
    }
