"""Load, build and save Hugging Face causal LMs and their tokenizers; LoRA through PEFT.

Everything here produces or consumes standard transformers objects: whatever slm writes
loads again with plain `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from slm_cli.errors import SlmError
from slm_cli.pretrained import resolve_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


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
    is refused unless `quantized_ok`. Hub ids: see `check_hub_model`. Every error names the field,
    the path and the fix. Returns the folder to load (a built-in name or .gguf file converted once).
    """
    path = resolve_model_path(path)
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
    if tokenizer:
        _check_tokenizer_files(p, field, path)
    if not quantized_ok and config.get("quantization_config"):
        raise SlmError(_quantized_message(p, field, path, config["quantization_config"]))
    return path


def _read_model_config(folder: Path, field: str, path: str) -> dict:
    """config.json as a dict with a model_type transformers knows (or code of its own, auto_map)."""
    from transformers import CONFIG_MAPPING

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
    if model_type not in CONFIG_MAPPING and "auto_map" not in config:
        raise SlmError(
            f"{field}={path}: {file} has model_type={model_type!r}, which this transformers does not know. "
            "Fix the spelling (e.g. llama, qwen2, mistral), or upgrade transformers if the architecture is newer."
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
            f"beside its weights (tokenizer.save_pretrained('{path}')), copy its tokenizer files there{hint}."
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
        f"stage needs unquantized weights, which it can train, prune or quantize. {instead}. To score or time "
        "the quantized model itself, use slm eval artifact=... or slm bench."
    )


def check_hub_model(name: str, field: str) -> None:
    """A hub id is usable now: in the local cache when offline, else the hub answers within seconds.

    transformers retries an unreachable hub for about a minute before it fails with a traceback.
    So the hub is probed with one TCP connection (bounded at 3 s, DNS included); when it does
    not answer, a model already in the local cache is used offline (HF_HUB_OFFLINE is set for
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
    host = hub_reachable(constants.ENDPOINT)
    if host is None:
        return
    if cached:
        constants.HF_HUB_OFFLINE = True  # what transformers and huggingface_hub consult before any request
        os.environ["HF_HUB_OFFLINE"] = "1"  # and processes started from here (launcher ranks, bench)
        return
    raise SlmError(
        f"{not_here}, but {host} cannot be reached from this machine (no network?) and the model is not in the "
        f"local hub cache ({constants.HF_HUB_CACHE}). {local}, or download it where there is network "
        f"(`hf download {name}`) and copy that folder here."
    )


def hub_reachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to `endpoint` (or the HTTPS proxy in use) opens within `timeout` s,
    else the host:port that did not answer. The probe runs in a thread so a hanging DNS lookup,
    which socket timeouts do not cover, is bounded too."""
    import socket
    import threading
    import urllib.request
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    proxy = None if urllib.request.proxy_bypass(url.hostname or "") else urllib.request.getproxies().get(url.scheme)
    target = urlparse(proxy) if proxy else url
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return None if answered == [True] else f"{host}:{port}"


def load_tokenizer(path: str, trust_remote_code: bool = False, field: str = "model.tokenizer"):
    path = check_model_folder(path, field, weights=False)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # the tokenizers library raises bare Exceptions for files it cannot parse
        raise SlmError(
            f"{field}={path}: its tokenizer could not be loaded ({type(exc).__name__}: {exc}). Save the tokenizer "
            "again with tokenizer.save_pretrained, or copy its files from the model's source."
        ) from exc
    if tok.pad_token_id is None:  # many causal LMs ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, dtype: str = "float32", trust_remote_code: bool = False, field: str = "model.name_or_path"):
    """A pretrained causal LM from a local folder, hub id, .gguf file or built-in name, in `dtype` ("auto" = as saved)."""
    path = check_model_folder(path, field, tokenizer=False)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype="auto" if dtype == "auto" else torch_dtype(dtype), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise SlmError(f"{field}={path} could not be loaded as a causal LM: {exc}") from exc


def build_model(mcfg, tokenizer) -> PreTrainedModel:
    """A freshly initialised model of architecture `mcfg.arch` sized by the config, vocabulary from `tokenizer`."""
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=mcfg.hidden_size,
        intermediate_size=mcfg.intermediate_size,
        num_hidden_layers=mcfg.num_hidden_layers,
        num_attention_heads=mcfg.num_attention_heads,
        num_key_value_heads=mcfg.num_key_value_heads,
        max_position_embeddings=mcfg.max_position_embeddings,
        tie_word_embeddings=mcfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if mcfg.head_dim is not None:
        kwargs["head_dim"] = mcfg.head_dim
    config = AutoConfig.for_model(mcfg.arch, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(mcfg.dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The decoder blocks of a Llama-family model (model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise SlmError(f"{type(model).__name__} has no model.layers; slm supports Llama-family decoders here.")
    return layers


def keep_layers(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """Keep only the decoder layers `keep` (in that order), in place, with a config that still loads."""
    layers = decoder_layers(model)
    n = len(layers)
    bad = [i for i in keep if not 0 <= i < n]
    if bad or len(set(keep)) != len(keep):
        raise SlmError(f"student.layers={keep}: indices must be distinct and in [0, {n - 1}] for this {n}-layer teacher.")
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        # attention modules index the KV cache by layer_idx
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    return model


def apply_lora(model: PreTrainedModel, lora):
    """Wrap `model` with PEFT LoRA adapters; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        raise SlmError(
            f"train.lora.target_modules: {missing} not found in the model; "
            f"linear layers it has include {sorted(n for n in names if n.endswith('proj'))}."
        )
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def save_model(model: PreTrainedModel, tokenizer, out_dir: Path, state_dict: dict | None = None) -> None:
    """Write an HF folder: config, safetensors weights, tokenizer, generation config."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def tokenizers_match(a, b) -> bool:
    """Same vocabulary (token -> id) and the same special tokens."""
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def read_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def example_texts(examples: list[dict]) -> list[str]:
    """The raw text of prompt/completion, chat and plain-text examples (to train a tokenizer on)."""
    texts = []
    for ex in examples:
        if "messages" in ex:
            texts.extend(m["content"] for m in ex["messages"])
        elif "text" in ex:
            texts.append(ex["text"])
        else:
            texts.append(ex["prompt"] + ex["completion"])
    return texts


def resolve_tokenizer(mcfg, train_examples: list[dict], fallback: str | None = None):
    """`model.tokenizer` if set, else the model's own (or `fallback`'s), else a BPE tokenizer trained on the data."""
    path = mcfg.tokenizer or mcfg.name_or_path or fallback
    if path:
        # name the field the path came from, so an error points at what the user typed
        field = "model.tokenizer" if mcfg.tokenizer else "model.name_or_path" if mcfg.name_or_path else "teacher.path"
        return load_tokenizer(path, mcfg.trust_remote_code, field=field)
    from slm_cli.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(example_texts(train_examples), vocab_size=mcfg.tokenizer_vocab_size)
