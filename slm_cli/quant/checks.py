"""Checks on a saved quantized checkpoint, read from its files the way vLLM will read them.

vLLM loads a compressed-tensors checkpoint by name: for every quantized Linear it expects
``<module>.weight`` in float8_e4m3fn (FP8 schemes) or int8 (``w8a8_int8``), or for 4-bit
groups ``<module>.weight_packed`` (int32, eight values each) with ``<module>.weight_shape``;
then ``<module>.weight_scale`` with the shape the scheme implies, plus
``<module>.input_scale`` for static activations. Its usual load
failures are a missing scale, a wrong tensor name or shape, and block shapes that do not
divide. These checks read only the safetensors headers and config.json, and build the
model's module tree on the meta device (no weights loaded) to know which modules are
Linear layers.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.quantization import QuantizationScheme, QuantizationStrategy
from compressed_tensors.quantization.utils import is_module_quantized
from compressed_tensors.utils.match import match_named_modules
from safetensors import safe_open

from slm_cli.errors import SlmError
from slm_cli.quant.schemes import get_scheme

__all__ = [
    "CheckpointError",
    "expected_scale_shape",
    "quantization_table",
    "read_tensor_index",
    "validate_checkpoint",
]

FP8_DTYPE = "F8_E4M3"
QUANTIZED_DTYPES = (FP8_DTYPE, "I8", "I32")
"""Safetensors dtypes of quantized weights: float8_e4m3fn, int8, int4 packed into int32."""
_TORCH_TO_SAFETENSORS = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


class CheckpointError(SlmError, ValueError):
    """A saved quantized checkpoint that vLLM or transformers would refuse or misread."""


def stored_weight(scheme: QuantizationScheme, out_features: int, in_features: int) -> tuple[str, str, tuple[int, ...]]:
    """(tensor suffix, safetensors dtype, shape) of a quantized Linear's weight on disk:
    ``weight`` in F8_E4M3 or I8 at (out, in), or ``weight_packed`` in I32 at (out, in*bits/32)."""
    args = scheme.weights
    if args.type == "float":
        return "weight", FP8_DTYPE, (out_features, in_features)
    if args.num_bits == 8:
        return "weight", "I8", (out_features, in_features)
    return "weight_packed", "I32", (out_features, math.ceil(in_features * args.num_bits / 32))


def read_tensor_index(out_dir: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    """Name -> (safetensors dtype, shape, file) for every tensor, from headers only."""
    files = sorted(Path(out_dir).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{out_dir} holds no *.safetensors files")
    index = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                index[name] = (sl.get_dtype(), tuple(sl.get_shape()), path)
    return index


def _read_config(out_dir: Path) -> dict:
    path = out_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the folder is not a Hugging Face checkpoint")
    with open(path) as f:
        return json.load(f)


def _meta_model(out_dir: Path) -> torch.nn.Module:
    """The model's module tree on the meta device, built from config.json alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = copy.deepcopy(AutoConfig.from_pretrained(out_dir))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def expected_scale_shape(scheme: QuantizationScheme, out_features: int, in_features: int):
    """The ``weight_scale`` shape vLLM expects: (out, 1) per channel, (1,) per tensor
    (a 0-d scalar also loads), (ceil(out/b_out), ceil(in/b_in)) per block, (out, in/g) per group."""
    args = scheme.weights
    if args.strategy == QuantizationStrategy.CHANNEL:
        return (out_features, 1)
    if args.strategy == QuantizationStrategy.TENSOR:
        return (1,)
    if args.strategy == QuantizationStrategy.BLOCK:
        bh, bw = args.block_structure
        return (math.ceil(out_features / bh), math.ceil(in_features / bw))
    if args.strategy == QuantizationStrategy.GROUP:
        return (out_features, math.ceil(in_features / args.group_size))
    raise CheckpointError(f"no scale layout is defined for strategy {args.strategy!r}")


def _shape_ok(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    if expected == (1,):
        return shape in ((), (1,))
    return shape == expected


def _check_config(qc: dict, scheme_name: str, scheme: QuantizationScheme) -> list[str]:
    """The config.json ``quantization_config`` fields vLLM dispatches on."""
    problems = []
    if not qc:
        return ["config.json has no quantization_config block"]
    if qc.get("quant_method") != "compressed-tensors":
        problems.append(f"quantization_config.quant_method is {qc.get('quant_method')!r}, expected 'compressed-tensors'")
    want_format = infer_module_format(torch.nn.Linear, scheme).value
    if qc.get("format") != want_format:
        problems.append(f"quantization_config.format is {qc.get('format')!r}, expected {want_format!r} for {scheme_name}")
    if not isinstance(qc.get("ignore"), list):
        problems.append("quantization_config.ignore is missing (it must list the unquantized Linear layers)")
    groups = qc.get("config_groups") or {}
    if not groups:
        problems.append("quantization_config.config_groups is empty")
    for gname, group in groups.items():
        where = f"config_groups.{gname}"
        if not group.get("targets"):
            problems.append(f"{where}.targets is empty")
        w = group.get("weights") or {}
        want_w = scheme.weights
        if w.get("num_bits") != want_w.num_bits or w.get("type") != want_w.type:
            problems.append(f"{where}.weights is not {want_w.num_bits}-bit {want_w.type} as {scheme_name} makes: {w}")
        if w.get("strategy") != scheme.weights.strategy:
            problems.append(f"{where}.weights.strategy is {w.get('strategy')!r}, expected {scheme.weights.strategy!r} for {scheme_name}")
        acts = group.get("input_activations")
        want = scheme.input_activations
        if want is None and acts is not None:
            problems.append(f"{where}.input_activations is set but {scheme_name} leaves activations unquantized")
        elif want is not None and acts is None:
            problems.append(f"{where}.input_activations is missing; {scheme_name} quantizes activations")
        elif want is not None:
            if bool(acts.get("dynamic")) != bool(want.dynamic):
                problems.append(f"{where}.input_activations.dynamic is {acts.get('dynamic')!r}, expected {want.dynamic!r}")
            if acts.get("strategy") != want.strategy:
                problems.append(f"{where}.input_activations.strategy is {acts.get('strategy')!r}, expected {want.strategy!r}")
    return problems


def validate_checkpoint(
    out_dir: str | os.PathLike, scheme: str, source_dtype: torch.dtype | None = None
) -> dict:
    """Check a saved quantized checkpoint against what vLLM expects; raise listing every problem.

    Per targeted Linear (the config's targets minus its ``ignore`` list): the weight is stored
    as the scheme stores it (see ``stored_weight``; packed 4-bit weights also need their
    ``weight_shape``), ``weight_scale`` has the scheme's shape (see ``expected_scale_shape``,
    with the group size config.json declares), ``input_scale`` exists exactly when activations
    are static, and no symmetric zero point is stored. Per ignored Linear: the weight stays a float dtype without scales. With
    ``source_dtype``, every other floating tensor must be in it (an fp32 leftover doubles
    the size of embeddings and norms). Returns {"quantized": [...], "ignored": [...]}.
    """
    out_dir = Path(out_dir)
    qscheme = get_scheme(scheme)
    config = _read_config(out_dir)
    qc = config.get("quantization_config") or {}
    problems = _check_config(qc, scheme, qscheme)
    if qscheme.weights.strategy == QuantizationStrategy.GROUP:
        sizes = {(g.get("weights") or {}).get("group_size") for g in (qc.get("config_groups") or {}).values()}
        if len(sizes) != 1 or not isinstance(next(iter(sizes)), int):
            problems.append(f"config_groups declare group sizes {sorted(map(str, sizes))}; {scheme} needs one int")
        else:
            qscheme.weights.group_size = sizes.pop()
    tensors = read_tensor_index(out_dir)
    model = _meta_model(out_dir)
    targets = sorted({t for g in (qc.get("config_groups") or {}).values() for t in g.get("targets", [])}) or ["Linear"]
    ignore = qc.get("ignore") or []
    targeted = {name: m for name, m in match_named_modules(model, targets, ignore)}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    static_inputs = qscheme.input_activations is not None and not qscheme.input_activations.dynamic
    expected_names = set()

    for name, m in linears.items():
        weight = tensors.get(f"{name}.weight")
        if name not in targeted:
            if weight is None and not (tied and name == "lm_head"):
                problems.append(f"{name}.weight is missing")
            elif weight is not None and weight[0] in QUANTIZED_DTYPES:
                problems.append(f"{name} is ignored but its weight is {weight[0]}")
            if f"{name}.weight_scale" in tensors:
                problems.append(f"{name} is ignored but has a weight_scale")
            continue
        suffix, want_dtype, want_shape = stored_weight(qscheme, m.out_features, m.in_features)
        expected_names.update({f"{name}.{suffix}", f"{name}.weight_scale", f"{name}.input_scale", f"{name}.weight_shape"})
        weight = tensors.get(f"{name}.{suffix}")
        if weight is None:
            problems.append(f"{name}.{suffix} is missing")
            continue
        if weight[0] != want_dtype:
            problems.append(f"{name}.{suffix} is {weight[0]}, expected {want_dtype} for {scheme}")
        if weight[1] != want_shape:
            problems.append(f"{name}.{suffix} has shape {weight[1]}, expected {want_shape} for (out, in) = {(m.out_features, m.in_features)}")
        if suffix == "weight_packed":
            shape = tensors.get(f"{name}.weight_shape")
            if shape is None or shape[1] != (2,):
                problems.append(f"{name}.weight_shape is missing or not 2 values; vLLM needs it to unpack the weight")
        scale = tensors.get(f"{name}.weight_scale")
        want = expected_scale_shape(qscheme, m.out_features, m.in_features)
        if scale is None:
            problems.append(f"{name}.weight_scale is missing")
        elif not _shape_ok(scale[1], want):
            problems.append(f"{name}.weight_scale has shape {scale[1]}, {scheme} expects {want}")
        has_input_scale = f"{name}.input_scale" in tensors
        if static_inputs and not has_input_scale:
            problems.append(f"{name}.input_scale is missing; {scheme} needs a calibrated static activation scale")
        elif static_inputs and not _shape_ok(tensors[f"{name}.input_scale"][1], (1,)):
            problems.append(f"{name}.input_scale has shape {tensors[f'{name}.input_scale'][1]}, expected (1,)")
        elif not static_inputs and has_input_scale:
            problems.append(f"{name}.input_scale is present but {scheme} has no static activation scale")
        for zp in ("weight_zero_point", "input_zero_point"):
            if f"{name}.{zp}" in tensors:
                problems.append(f"{name}.{zp} is stored; vLLM does not load zero points for symmetric schemes")

    if source_dtype is not None:
        source_st = _TORCH_TO_SAFETENSORS[source_dtype]
        for tname, (dtype, _, _) in sorted(tensors.items()):
            if tname in expected_names or dtype in (*QUANTIZED_DTYPES, source_st) or not dtype.startswith(("F", "BF")):
                continue
            problems.append(f"{tname} is {dtype}, expected the source dtype {source_st}")

    if problems:
        listing = "\n  - ".join(problems)
        raise CheckpointError(
            f"quantized checkpoint {out_dir} ({scheme}) has {len(problems)} problem(s):\n  - {listing}"
        )
    return {"quantized": sorted(targeted), "ignored": sorted(set(linears) - set(targeted))}


def _rows_from_model(model: torch.nn.Module) -> list[dict]:
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        quantized = is_module_quantized(m) and m.quantization_scheme.weights is not None
        scale = getattr(m, "weight_scale", None) if quantized else None
        rows.append(
            {
                "name": name,
                "shape": (m.out_features, m.in_features),
                "quantized": quantized,
                "strategy": str(m.quantization_scheme.weights.strategy) if quantized else None,
                "weight_dtype": str(m.weight.dtype).removeprefix("torch."),
                "scale_shape": tuple(scale.shape) if scale is not None else None,
            }
        )
    return rows


def _rows_from_dir(out_dir: Path) -> list[dict]:
    tensors = read_tensor_index(out_dir)
    qc = _read_config(out_dir).get("quantization_config") or {}
    strategies = {
        t: (g.get("weights") or {}).get("strategy")
        for g in (qc.get("config_groups") or {}).values()
        for t in g.get("targets", [])
    }
    strategy = next(iter(strategies.values()), None)
    rows = []
    for name, m in _meta_model(out_dir).named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        weight = tensors.get(f"{name}.weight") or tensors.get(f"{name}.weight_packed")
        scale = tensors.get(f"{name}.weight_scale")
        quantized = weight is not None and weight[0] in QUANTIZED_DTYPES
        rows.append(
            {
                "name": name,
                "shape": (m.out_features, m.in_features),
                "quantized": quantized,
                "strategy": strategy if quantized else None,
                "weight_dtype": ("I4 (packed in I32)" if weight[0] == "I32" else weight[0]) if weight is not None else "tied",
                "scale_shape": scale[1] if scale is not None else None,
            }
        )
    return rows


def quantization_table(model_or_dir: torch.nn.Module | str | os.PathLike) -> list[dict]:
    """One row per Linear layer: name, (out, in), quantized or ignored, weight dtype,
    scale strategy and shape. Accepts a model from ``quantize_model`` / a reloaded FP8
    model, or a saved checkpoint folder (read from headers, no weights loaded)."""
    if isinstance(model_or_dir, torch.nn.Module):
        return _rows_from_model(model_or_dir)
    return _rows_from_dir(Path(model_or_dir))
