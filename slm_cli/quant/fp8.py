"""FP8 quantization of a causal LM into the compressed-tensors format that vLLM serves.

How FP8 weight quantization works
---------------------------------
FP8 E4M3 has 1 sign bit, 4 exponent bits and 3 mantissa bits. Its largest finite value
is 448 and, like any float, its spacing grows with magnitude: for normal numbers the
round-to-nearest relative error is at most 2^-4 = 6.25%. A weight matrix W is stored as

    W ≈ Q · s,   Q = round_fp8(W / s),   s = absmax(W over a group) / 448

so the largest entry of every group lands on ±448 and nothing overflows. The group is
what the scheme chooses:

* ``fp8_dynamic``      one scale per output channel, s has shape (out, 1); activations are
                       quantized at run time with one scale per token (absmax of the row),
                       so no calibration data is needed.
* ``fp8_static``       one scale for the whole weight, shape (1,); one scale for the whole
                       input activation, fixed ahead of time from the absmax seen over
                       calibration batches (``input_scale``).
* ``fp8_weight_only``  per-channel weights as in ``fp8_dynamic``; activations stay in the
                       model's float dtype (W8A16).
* ``fp8_block``        one scale per 128×128 tile of W, shape (out/128, in/128); activations
                       are quantized at run time per token in groups of 128 (DeepSeek-V3 style).

The library (compressed-tensors) owns the format: ``apply_quantization_config`` attaches
the scheme and empty scale parameters to every targeted ``Linear``; we fill the scales;
``ModelCompressor`` turns the float weights into float8_e4m3fn tensors and writes the
``quantization_config`` block of config.json that vLLM and transformers read.
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
    "check_fp8_request",
    "DEFAULT_IGNORE",
    "FP8QuantError",
    "SCHEMES",
    "get_scheme",
    "quantize_fp8",
    "read_quantization_config",
    "save_fp8",
    "targeted_linears",
    "weight_qparams",
]

TARGETS = ["Linear"]
DEFAULT_IGNORE = ["lm_head"]
BLOCK_SIZE = 128


class FP8QuantError(SlmError, ValueError):
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
}


def get_scheme(name: str) -> QuantizationScheme:
    """The compressed-tensors scheme for a short name in ``SCHEMES``."""
    if name not in SCHEMES:
        raise FP8QuantError(
            f"quant.scheme={name!r} is not a known FP8 scheme; "
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
            raise FP8QuantError(
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
        raise FP8QuantError(
            f"quant.scheme=fp8_block needs every quantized Linear's (out, in) shape "
            f"divisible by {block} (vLLM refuses other block layouts in fused qkv / "
            f"gate_up layers), but these are not: {', '.join(bad)}. Ignore them with "
            f"quant.ignore=['lm_head', '{pattern}'], or use quant.scheme=fp8_dynamic"
        )


def weight_qparams(
    weight: torch.Tensor, args: QuantizationArgs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of a weight for its strategy: s = absmax(group) / 448.

    Min and max are reduced over the group the strategy defines (whole tensor, each
    output row, or each block×block tile) and handed to compressed-tensors'
    ``calculate_qparams``, which applies the symmetric FP8 formula above (and keeps a
    zero scale from dividing by zero). Shapes: tensor (1,), channel (out, 1),
    block (out/b, in/b).
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
    else:
        raise FP8QuantError(f"weight strategy {args.strategy!r} is not used by slm's FP8 schemes")
    return calculate_qparams(lo, hi, args)


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
        raise FP8QuantError("quant calibration got 0 batches; fp8_static needs at least one")

    for name, m in modules:
        if not torch.isfinite(lo[name]):
            raise FP8QuantError(
                f"calibration never reached {name}; its static input scale is unknown. "
                f"Check the calibration batches run the whole model, or ignore {name!r}"
            )
        args = m.quantization_scheme.input_activations
        scale, zero_point = calculate_qparams(lo[name], hi[name], args)
        m.input_scale.data.copy_(scale.to(m.input_scale.dtype).reshape(m.input_scale.shape))
        if hasattr(m, "input_zero_point"):
            m.input_zero_point.data.copy_(zero_point.reshape(m.input_zero_point.shape))
    return seen


def check_fp8_request(
    model: torch.nn.Module,
    scheme: str = "fp8_dynamic",
    ignore: Iterable[str] | None = None,
    calibrated: bool = False,
) -> tuple[QuantizationScheme, list[str]]:
    """Every reason ``quantize_fp8`` would refuse, checked without touching the model.

    A bad scheme name, an ignore entry that matches nothing, nothing left to quantize, a
    tied lm_head that would be quantized, block shapes that do not divide by 128, or a
    static scheme without calibration (``calibrated=False``) raise ``FP8QuantError``.
    Stages call it before slow work (loading data, measuring the source) so a request that
    cannot succeed fails in seconds. Returns the scheme and the resolved ignore list.
    """
    qscheme = get_scheme(scheme)
    ignore = list(DEFAULT_IGNORE if ignore is None else ignore)
    _check_ignore_matches(model, ignore)
    modules = targeted_linears(model, ignore)
    if not modules:
        raise FP8QuantError(
            f"quant.ignore={ignore} leaves no Linear layer to quantize in {type(model).__name__}"
        )
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and any(
        name == "lm_head" for name, _ in modules
    ):
        raise FP8QuantError(
            "lm_head shares its weight with the input embeddings (tie_word_embeddings=true); "
            "quantizing it would break the tie. Keep 'lm_head' in quant.ignore"
        )
    if qscheme.weights.strategy == QuantizationStrategy.BLOCK:
        _check_block_shapes(modules, qscheme.weights.block_structure[0])
    if _needs_calibration(qscheme) and not calibrated:
        raise FP8QuantError(
            f"quant.scheme={scheme} has static activation scales and needs calibration "
            "batches; pass calib_batches, or use quant.scheme=fp8_dynamic"
        )
    return qscheme, ignore


def quantize_fp8(
    model: torch.nn.Module,
    scheme: str = "fp8_dynamic",
    ignore: Iterable[str] | None = None,
    calib_batches: Iterable | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.nn.Module:
    """Attach an FP8 scheme to every targeted Linear and compute its scales, in place.

    Every check of ``check_fp8_request`` runs before the model is touched and raises
    ``FP8QuantError`` (a ``ValueError``). The returned model runs in fake-quantized mode
    (weights and activations quantize→dequantize on the fly) until ``save_fp8`` compresses it.
    ``progress(done, total)`` follows the calibration batches of a static scheme.
    """
    qscheme, ignore = check_fp8_request(model, scheme, ignore, calibrated=calib_batches is not None)
    needs_calib = _needs_calibration(qscheme)
    config = QuantizationConfig(config_groups={"group_0": qscheme}, ignore=ignore)
    apply_quantization_config(model, config, show_progress=False)
    quantized = [(name, m) for name, m in model.named_modules() if is_module_quantized(m)]
    _fill_weight_scales(quantized)
    if needs_calib:
        _calibrate_input_scales(model, quantized, calib_batches, progress)
    for _, m in quantized:
        m.quantization_status = QuantizationStatus.FROZEN
    return model


def _cast_unquantized(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter that will not become FP8 to the source dtype.

    Embeddings, norms, biases and ignored Linears are stored as they are; left in fp32
    they make the checkpoint ~1.4x larger than needed and vLLM warns on load. Weights of
    quantized Linears are left alone: compression turns them into float8 with their
    scales, which keep the dtype they were computed in.
    """
    for module in model.modules():
        quantized = is_module_quantized(module)
        for pname, param in module.named_parameters(recurse=False):
            if not param.is_floating_point() or param.dtype == dtype:
                continue
            if quantized and (pname == "weight" or pname.endswith(("_scale", "_zero_point"))):
                continue
            param.data = param.data.to(dtype)


def save_fp8(
    model: torch.nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    source_dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Compress a model from ``quantize_fp8`` and write an FP8 checkpoint to ``out_dir``.

    Steps: cast what stays unquantized to ``source_dtype``; ``ModelCompressor`` packs the
    weights into float8_e4m3fn; ``save_pretrained`` writes safetensors + config.json;
    ``update_config`` adds the ``quantization_config`` block (quant_method
    compressed-tensors, format, config_groups, ignore). The model stays usable: its
    first forward pass decompresses it back to dense weights.
    """
    if not any(is_module_quantized(m) for m in model.modules()):
        raise FP8QuantError("save_fp8 got a model without FP8 layers; call quantize_fp8 first")
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
