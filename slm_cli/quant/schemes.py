"""Weight (and activation) quantization of a causal LM into the compressed-tensors format vLLM serves.

How the weight formats work
---------------------------
A weight matrix W is stored as low-precision values Q times a scale s per group of weights:

    W ≈ Q · s,   Q = round(W / s),   s = absmax(W over a group) / q_max

so the largest entry of every group lands on the edge of the format and nothing overflows.

* FP8 E4M3 (q_max 448) is a float: 1 sign, 4 exponent, 3 mantissa bits, so its spacing grows
  with magnitude and the round-to-nearest relative error is at most 2^-4 = 6.25% at any size.
* INT8 (q_max 127.5 in compressed-tensors' symmetric convention, values in [-128, 127]) is a
  uniform grid: a step of s everywhere, so small weights of a group lose more, relatively, than
  large ones; per output channel that is still finer than FP8 for most rows.
* INT4 (q_max 7.5, values in [-8, 7]) has 16 levels: only groups of 128 inputs sharing a
  scale keep the error tolerable, and the rounding is best chosen with calibration data (GPTQ,
  ``slm_cli/quant/gptq.py``) rather than to the nearest level.

The scheme chooses the format, the group and what happens to activations:

* ``fp8_dynamic``      FP8 weights, one scale per output channel, s has shape (out, 1); activations
                       quantized at run time with one scale per token (absmax of the row), so no
                       calibration data is needed.
* ``fp8_static``       FP8, one scale for the whole weight, shape (1,); one scale for the whole
                       input activation, fixed ahead of time from the absmax seen over
                       calibration batches (``input_scale``).
* ``fp8_weight_only``  per-channel FP8 weights as in ``fp8_dynamic``; activations stay in the
                       model's float dtype (W8A16).
* ``fp8_block``        FP8, one scale per 128×128 tile of W, shape (out/128, in/128); activations
                       are quantized at run time per token in groups of 128 (DeepSeek-V3 style).
* ``w8a8_int8``        INT8 weights per output channel, INT8 activations per token at run time:
                       integer GEMMs, which CPUs (VNNI / AMX) and pre-FP8 GPUs run fast.
* ``w4a16``            INT4 weights in groups of 128 inputs, scale shape (out, in/128), packed
                       eight to an int32; activations stay 16-bit. A quarter of bf16's bytes.

The library (compressed-tensors) owns the format: ``apply_quantization_config`` attaches
the scheme and empty scale parameters to every targeted ``Linear``; we fill the scales;
``ModelCompressor`` turns the float weights into float8 / int8 / packed int4 tensors and writes
the ``quantization_config`` block of config.json that vLLM and transformers read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
    QuantizationType,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams, is_module_quantized
from compressed_tensors.utils.match import is_match, match_named_modules

from slm_cli.errors import SlmError

__all__ = [
    "BLOCK_SIZE",
    "check_request",
    "DEFAULT_IGNORE",
    "QuantError",
    "SCHEMES",
    "get_scheme",
    "GROUP_SIZES",
    "is_fp8",
    "resolve_group_size",
    "SCALE_DTYPE",
    "storage_args",
    "quantize_model",
    "read_quantization_config",
    "save_quantized",
    "targeted_linears",
    "weight_qparams",
]

TARGETS = ["Linear"]
DEFAULT_IGNORE = ["lm_head"]
BLOCK_SIZE = 128


class QuantError(SlmError, ValueError):
    """A quantization request that cannot work; the message names the field and the fix."""


def _fp8_weight_args(strategy: QuantizationStrategy, **extra) -> QuantizationArgs:
    """Symmetric FP8 E4M3 weight arguments with the given scale granularity."""
    return QuantizationArgs(
        num_bits=8,
        type=QuantizationType.FLOAT,
        strategy=strategy,
        symmetric=True,
        dynamic=False,
        **extra,
    )


def _fp8_weight_only() -> QuantizationScheme:
    """Per-channel FP8 weights, activations untouched (no preset exists for this one)."""
    return QuantizationScheme(
        targets=list(TARGETS), weights=_fp8_weight_args(QuantizationStrategy.CHANNEL)
    )


SCHEMES: dict[str, Callable[[], QuantizationScheme]] = {
    "fp8_dynamic": lambda: preset_name_to_scheme("FP8_DYNAMIC", list(TARGETS)),
    "fp8_static": lambda: preset_name_to_scheme("FP8", list(TARGETS)),
    "fp8_weight_only": _fp8_weight_only,
    "fp8_block": lambda: preset_name_to_scheme("FP8_BLOCK", list(TARGETS)),
    "w8a8_int8": lambda: preset_name_to_scheme("W8A8", list(TARGETS)),
    "w4a16": lambda: preset_name_to_scheme("W4A16", list(TARGETS)),
}


def is_fp8(scheme: QuantizationScheme) -> bool:
    """FP8 weights (float8_e4m3fn on disk) as opposed to integer ones."""
    return scheme.weights.type == QuantizationType.FLOAT


def get_scheme(name: str) -> QuantizationScheme:
    """The compressed-tensors scheme for a short name in ``SCHEMES``."""
    if name not in SCHEMES:
        raise QuantError(
            f"quant.scheme={name!r} is not a known scheme; "
            f"choose one of {sorted(SCHEMES)}"
        )
    return SCHEMES[name]()


def _needs_calibration(scheme: QuantizationScheme) -> bool:
    """Static activation scales must be measured on data before saving."""
    acts = scheme.input_activations
    return acts is not None and acts.dynamic is False


def _check_ignore_matches(model: torch.nn.Module, ignore: list[str]) -> None:
    """Every ignore entry must name at least one module: a typo would quantize silently."""
    names = [name for name, _ in model.named_modules()]
    for entry in ignore:
        if not any(is_match(name, module, entry) for name, module in model.named_modules()):
            hint = "prefix regexes with 're:' (e.g. 're:.*mlp.down_proj$')"
            raise QuantError(
                f"quant.ignore entry {entry!r} matches no module of "
                f"{type(model).__name__} ({len(names)} modules); {hint}, or give an "
                f"exact module name such as {names[-1]!r}"
            )


def targeted_linears(
    model: torch.nn.Module, ignore: Iterable[str] = DEFAULT_IGNORE
) -> list[tuple[str, torch.nn.Linear]]:
    """The ``Linear`` modules a scheme would quantize: every Linear not matched by ``ignore``.

    ``ignore`` follows compressed-tensors' convention: an exact module name, or a regex
    prefixed with ``re:`` that must match the module name from its start (``re.match``).
    """
    return list(match_named_modules(model, TARGETS, list(ignore)))


GROUP_SIZES = (128, 64, 32)
"""Input-group sizes ``group_size=auto`` tries, largest first (vLLM's 4-bit kernels take these)."""


def resolve_group_size(modules: list[tuple[str, torch.nn.Linear]], requested: int | str) -> int:
    """The input-group size of a group scheme: ``auto`` is the largest of ``GROUP_SIZES`` dividing
    every quantized Linear's in_features (SmolLM2's 576-wide inputs take 64, not 128); an int
    must divide them all."""
    widths = sorted({m.in_features for _, m in modules})
    if requested == "auto":
        for g in GROUP_SIZES:
            if all(w % g == 0 for w in widths):
                return g
        raise QuantError(
            f"quant.group_size=auto: no group size of {list(GROUP_SIZES)} divides every quantized Linear's input "
            f"width {widths}; set quant.group_size to a divisor of them, or ignore the odd layers in quant.ignore"
        )
    if isinstance(requested, bool) or not isinstance(requested, int) or requested <= 0:
        raise QuantError(f"quant.group_size={requested!r}: give a positive int (e.g. 128) or auto")
    bad = [f"{name} (in={m.in_features})" for name, m in modules if m.in_features % requested]
    if bad:
        raise QuantError(
            f"quant.group_size={requested} does not divide the input width of {len(bad)} quantized Linear(s), e.g. "
            f"{', '.join(bad[:3])}; use quant.group_size=auto (picks from {list(GROUP_SIZES)}) or a common divisor"
        )
    return requested


def _check_block_shapes(modules: list[tuple[str, torch.nn.Linear]], block: int) -> None:
    """Block scales tile W in block×block squares; vLLM needs both dims to divide."""
    bad = [
        f"{name} (out={m.out_features}, in={m.in_features})"
        for name, m in modules
        if m.out_features % block or m.in_features % block
    ]
    if bad:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name, m in modules
                           if m.out_features % block or m.in_features % block})
        pattern = "re:.*\\.(" + "|".join(suffixes) + ")$"
        raise QuantError(
            f"quant.scheme=fp8_block needs every quantized Linear's (out, in) shape "
            f"divisible by {block} (vLLM refuses other block layouts in fused qkv / "
            f"gate_up layers), but these are not: {', '.join(bad)}. Ignore them with "
            f"quant.ignore=['lm_head', '{pattern}'], or use quant.scheme=fp8_dynamic"
        )


SCALE_DTYPE = torch.bfloat16
"""Group scales are rounded to bf16 before any weight is rounded with them, then stored in bf16:
a group of 64 int4 weights carries one scale, so fp32 scales would add 12% to the bytes."""


def storage_args(args: QuantizationArgs) -> QuantizationArgs:
    """``args`` with the scale dtype the checkpoint stores (bf16 for group scales, else unchanged).

    The scale written to disk must be the one the weights were rounded with, or the integers
    the packer recomputes drift from the chosen ones; ``calculate_qparams`` rounds to
    ``scale_dtype``. Used on a copy: the config.json written for vLLM keeps the preset's args.
    """
    if args.strategy == QuantizationStrategy.GROUP and args.scale_dtype is None:
        return args.model_copy(update={"scale_dtype": SCALE_DTYPE})
    return args


def weight_qparams(
    weight: torch.Tensor, args: QuantizationArgs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of a weight for its strategy: s = absmax(group) / q_max.

    Min and max are reduced over the group the strategy defines (whole tensor, each
    output row, each block×block tile, or each run of ``group_size`` inputs of a row) and
    handed to compressed-tensors' ``calculate_qparams``, which applies the symmetric formula
    above for the format (and keeps a zero scale from dividing by zero). Shapes: tensor (1,),
    channel (out, 1), block (out/b, in/b), group (out, in/g).
    """
    w = weight.detach()
    if args.strategy == QuantizationStrategy.TENSOR:
        lo, hi = torch.aminmax(w)
    elif args.strategy == QuantizationStrategy.CHANNEL:
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    elif args.strategy == QuantizationStrategy.BLOCK:
        bh, bw = args.block_structure
        rows, cols = w.shape
        tiles = w.reshape(rows // bh, bh, cols // bw, bw)
        lo, hi = tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
    elif args.strategy == QuantizationStrategy.GROUP:
        rows, cols = w.shape
        groups = w.reshape(rows, cols // args.group_size, args.group_size)
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    else:
        raise QuantError(f"weight strategy {args.strategy!r} is not used by slm's schemes")
    scale, zero_point = calculate_qparams(lo, hi, storage_args(args))
    return scale.to(w.dtype if w.is_floating_point() else torch.float32), zero_point


def _fill_weight_scales(modules: list[tuple[str, torch.nn.Module]]) -> None:
    """Write each module's weight scale (and its all-zero symmetric zero point) in place."""
    for _, module in modules:
        args = module.quantization_scheme.weights
        scale, zero_point = weight_qparams(module.weight, args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))


def _run_batch(model: torch.nn.Module, batch) -> None:
    """Feed one calibration batch: a dict of model inputs or a tensor of input ids."""
    if isinstance(batch, Mapping):
        model(**{k: v for k, v in batch.items() if k != "labels"})
    else:
        model(input_ids=batch)


@torch.no_grad()
def _calibrate_input_scales(
    model: torch.nn.Module, modules: list[tuple[str, torch.nn.Module]], calib_batches,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Static per-tensor input scales from the running min/max over all calibration batches.

    Quantization is switched off while observing, so every layer sees the float model's
    activations (the same ranges the "static_minmax" observer of the preset records).
    Returns the number of batches seen; ``progress(done, total)`` is called after each.
    """
    total = len(calib_batches) if hasattr(calib_batches, "__len__") else 0
    lo = {name: torch.tensor(float("inf")) for name, _ in modules}
    hi = {name: torch.tensor(float("-inf")) for name, _ in modules}

    def observer(name):
        def hook(_module, args):
            x = args[0].detach().float()
            lo[name] = torch.minimum(lo[name], x.min().cpu())
            hi[name] = torch.maximum(hi[name], x.max().cpu())

        return hook

    handles = [m.register_forward_pre_hook(observer(name)) for name, m in modules]
    for _, m in modules:
        m.quantization_enabled = False
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in calib_batches:
            _run_batch(model, batch)
            seen += 1
            if progress is not None:
                progress(seen, total)
    finally:
        for h in handles:
            h.remove()
        for _, m in modules:
            m.quantization_enabled = True
        model.train(was_training)
    if seen == 0:
        raise QuantError("quant calibration got 0 batches; fp8_static needs at least one")

    for name, m in modules:
        if not torch.isfinite(lo[name]):
            raise QuantError(
                f"calibration never reached {name}; its static input scale is unknown. "
                f"Check the calibration batches run the whole model, or ignore {name!r}"
            )
        args = m.quantization_scheme.input_activations
        scale, zero_point = calculate_qparams(lo[name], hi[name], args)
        m.input_scale.data.copy_(scale.to(m.input_scale.dtype).reshape(m.input_scale.shape))
        if hasattr(m, "input_zero_point"):
            m.input_zero_point.data.copy_(zero_point.reshape(m.input_zero_point.shape))
    return seen


def check_request(
    model: torch.nn.Module,
    scheme: str = "fp8_dynamic",
    ignore: Iterable[str] | None = None,
    calibrated: bool = False,
    group_size: int | str = "auto",
) -> tuple[QuantizationScheme, list[str]]:
    """Every reason ``quantize_model`` would refuse, checked without touching the model.

    A bad scheme name, an ignore entry that matches nothing, nothing left to quantize, a
    tied lm_head that would be quantized, block shapes that do not divide by 128, a group
    size that does not divide the input widths, or a static scheme without calibration
    (``calibrated=False``) raise ``QuantError``. Stages call it before slow work (loading
    data, measuring the source) so a request that cannot succeed fails in seconds. Returns
    the scheme (group size resolved, see ``resolve_group_size``) and the resolved ignore list.
    """
    qscheme = get_scheme(scheme)
    ignore = list(DEFAULT_IGNORE if ignore is None else ignore)
    _check_ignore_matches(model, ignore)
    modules = targeted_linears(model, ignore)
    if not modules:
        raise QuantError(
            f"quant.ignore={ignore} leaves no Linear layer to quantize in {type(model).__name__}"
        )
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and any(
        name == "lm_head" for name, _ in modules
    ):
        raise QuantError(
            "lm_head shares its weight with the input embeddings (tie_word_embeddings=true); "
            "quantizing it would break the tie. Keep 'lm_head' in quant.ignore"
        )
    if qscheme.weights.strategy == QuantizationStrategy.BLOCK:
        _check_block_shapes(modules, qscheme.weights.block_structure[0])
    if qscheme.weights.strategy == QuantizationStrategy.GROUP:
        qscheme.weights.group_size = resolve_group_size(modules, group_size)
    if _needs_calibration(qscheme) and not calibrated:
        raise QuantError(
            f"quant.scheme={scheme} has static activation scales and needs calibration "
            "batches; pass calib_batches, or use quant.scheme=fp8_dynamic"
        )
    return qscheme, ignore


def quantize_model(
    model: torch.nn.Module,
    scheme: str = "fp8_dynamic",
    ignore: Iterable[str] | None = None,
    calib_batches: Iterable | None = None,
    progress: Callable[[int, int], None] | None = None,
    group_size: int | str = "auto",
    weight_scales: Mapping[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """Attach a scheme to every targeted Linear and compute its scales, in place.

    Every check of ``check_request`` runs before the model is touched and raises
    ``QuantError`` (a ``ValueError``). The returned model runs in fake-quantized mode
    (weights and activations quantize→dequantize on the fly) until ``save_quantized`` compresses it.
    ``progress(done, total)`` follows the calibration batches of a static scheme.
    ``weight_scales`` (module name -> scale) replaces the absmax scales of those modules: GPTQ
    chooses its scales while it rounds, and its weights already sit on that grid.
    """
    qscheme, ignore = check_request(model, scheme, ignore, calibrated=calib_batches is not None, group_size=group_size)
    needs_calib = _needs_calibration(qscheme)
    config = QuantizationConfig(config_groups={"group_0": qscheme}, ignore=ignore)
    apply_quantization_config(model, config, show_progress=False)
    quantized = [(name, m) for name, m in model.named_modules() if is_module_quantized(m)]
    _fill_weight_scales(quantized)
    for name, scale in (weight_scales or {}).items():
        module = dict(quantized).get(name)
        if module is None:
            raise QuantError(f"weight_scales names {name!r}, which the scheme does not quantize")
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
    if needs_calib:
        _calibrate_input_scales(model, quantized, calib_batches, progress)
    for _, m in quantized:
        m.quantization_status = QuantizationStatus.FROZEN
    return model


def _cast_unquantized(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter that will not be quantized to the source dtype.

    Embeddings, norms, biases and ignored Linears are stored as they are; left in fp32
    they make the checkpoint ~1.4x larger than needed and vLLM warns on load. Weights of
    quantized Linears are left alone: compression turns them into float8 / int8 / packed
    int4 with their scales, which keep the dtype they were computed in, except group scales,
    already rounded to ``SCALE_DTYPE`` (see ``storage_args``), which are stored in it.
    """
    for module in model.modules():
        quantized = is_module_quantized(module)
        for pname, param in module.named_parameters(recurse=False):
            if not param.is_floating_point() or param.dtype == dtype:
                continue
            group_scale = pname == "weight_scale" and getattr(
                module.quantization_scheme.weights, "strategy", None) == QuantizationStrategy.GROUP
            if quantized and (pname == "weight" or pname.endswith(("_scale", "_zero_point"))) and not group_scale:
                continue
            param.data = param.data.to(dtype)


def save_quantized(
    model: torch.nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    source_dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Compress a model from ``quantize_model`` and write a quantized checkpoint to ``out_dir``.

    Steps: cast what stays unquantized to ``source_dtype``; ``ModelCompressor`` packs the
    weights (float8_e4m3fn, int8, or int4 eight to an int32); ``save_pretrained`` writes safetensors + config.json;
    ``update_config`` adds the ``quantization_config`` block (quant_method
    compressed-tensors, format, config_groups, ignore). The model stays usable: its
    first forward pass decompresses it back to dense weights.
    """
    if not any(is_module_quantized(m) for m in model.modules()):
        raise QuantError("save_quantized got a model without quantized layers; call quantize_model first")
    out_dir = Path(out_dir)
    _cast_unquantized(model, source_dtype)
    if hasattr(model, "config"):
        model.config.dtype = source_dtype
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def read_quantization_config(out_dir: str | os.PathLike) -> dict:
    """The ``quantization_config`` block of a saved checkpoint's config.json ({} if absent)."""
    with open(Path(out_dir) / "config.json") as f:
        return json.load(f).get("quantization_config", {})
