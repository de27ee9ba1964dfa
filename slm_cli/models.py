"""Load, build and save Hugging Face causal LMs and their tokenizers; LoRA through PEFT.

Everything here produces or consumes standard transformers objects: whatever slm writes
loads again with plain `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from slm_cli.errors import SlmError
from slm_cli.pretrained import ADAPTER_WEIGHTS, check_model_folder, has_adapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


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
    """A pretrained causal LM from a local folder, hub id, .gguf file or built-in name, in `dtype` ("auto" = as saved).

    A folder holding a LoRA adapter beside its base weights (`train.lora.merge=false`) comes back
    with the adapter merged in: every stage sees the model that was trained, never the base alone.
    """
    path = check_model_folder(path, field, tokenizer=False)
    return load_checked(path, field, dtype="auto" if dtype == "auto" else torch_dtype(dtype), trust_remote_code=trust_remote_code)


def load_checked(path: str, field: str, **kwargs) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)` that refuses a half-loaded model and merges an adapter.

    transformers fills a weight the checkpoint lacks with fresh random values and only logs it (and
    ignores a tensor that finds no place), so a checkpoint whose names do not match the architecture
    (e.g. PEFT-wrapped `base_layer` / `lora_A` keys) would be scored or trained as a random model.
    Here any missing or unexpected key is an error naming the folder.

    A LoRA adapter beside the weights is merged in (`merge_adapter`). transformers 5 would attach it
    by itself, as unmerged peft layers, and then report on the adapter's keys only; so the base is
    loaded from a view of the folder without the adapter files, checked, and the adapter merged after.
    """
    if not (local_folder(path) and has_adapter(path)):
        return _load_whole(path, path, field, **kwargs)
    with tempfile.TemporaryDirectory(prefix="slm-base-") as view:
        for file in Path(path).iterdir():
            if not file.name.startswith("adapter_"):
                (Path(view) / file.name).symlink_to(file.resolve())
        model = _load_whole(view, path, field, **kwargs)
    model.name_or_path = model.config.name_or_path = path
    return merge_adapter(model, path, field)


def _load_whole(source: str, path: str, field: str, **kwargs) -> PreTrainedModel:
    """The model in `source` (the folder `path`, or a view of it), every weight found in the checkpoint."""
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise SlmError(f"{field}={path} could not be loaded as a causal LM: {exc}") from exc
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if missing or unexpected:
        wrapped = any(".base_layer." in k or ".lora_" in k for k in unexpected)
        raise SlmError(
            f"{field}={path}: its weights do not match its config.json ({_some('missing', missing)}"
            f"{'; ' if missing and unexpected else ''}{_some('unexpected', unexpected)}): transformers would give "
            "missing weights random values and drop unexpected ones. "
            + ("The names are PEFT-wrapped (base_layer, lora_A): the model was saved with its LoRA layers inside, as "
               "train.lora.merge=false did in earlier slm versions. Run the stage that wrote it again (it now writes "
               "a clean base plus a PEFT adapter), or with train.lora.merge=true."
               if wrapped else "Save the model again with save_pretrained, or copy the folder again from its source.")
        )
    return model


def _some(what: str, keys: list[str]) -> str:
    return f"{len(keys)} {what}, e.g. {', '.join(keys[:3])}" if keys else ""


def local_folder(path: str) -> bool:
    return Path(path).expanduser().is_dir()


def merge_adapter(model: PreTrainedModel, folder: str, field: str) -> PreTrainedModel:
    """`model` with the LoRA adapter saved in `folder` merged into its weights (W + (alpha/r)·B·A).

    The adapter is read from `folder` whatever its adapter_config.json's base_model_name_or_path
    says: the base is the checkpoint beside it, already in `model`. Every adapter tensor must find
    its layer and every layer its tensors, as for the base weights.
    """
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(folder)
    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    peft_model = PeftModel(model, config)
    misfit = (f"{field}={folder}: its LoRA adapter ({ADAPTER_WEIGHTS}) does not fit the base model beside it "
              "({}). It was trained on another model: put it beside the base it was trained on.")
    try:
        result = peft_model.load_adapter(folder, adapter_name="default")
    except RuntimeError as exc:  # torch's load_state_dict: tensors of the wrong shape
        raise SlmError(misfit.format(str(exc).strip().splitlines()[-1].strip())) from None
    missing, unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    if missing or unexpected:
        raise SlmError(misfit.format(f"{_some('missing', missing)}{'; ' if missing and unexpected else ''}{_some('unexpected', unexpected)}"))
    merged = peft_model.merge_and_unload()
    # wrapping froze the base weights; a stage that trains this model expects them as loaded
    for name, param in merged.named_parameters():
        param.requires_grad_(trainable.get(name, True))
    return merged


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


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def stored_dtype(config, folder: str | Path | None = None) -> str | None:
    """The floating dtype a checkpoint was saved in: its config's `dtype` (`torch_dtype` in older files),
    else the dtype most of its safetensors weights are stored in (read from the file headers, no
    tensors loaded). None when neither says (e.g. a hub id whose config names no dtype).
    """
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if named is not None:
        name = str(named).removeprefix("torch.")
        if name in DTYPES:
            return name
    counts: dict[str, int] = {}
    if folder is not None and Path(folder).is_dir():
        for file in sorted(Path(folder).glob("*.safetensors")):
            with open(file, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            for name, entry in header.items():
                if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
                    dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
                    elements = 1
                    for size in entry.get("shape", ()):
                        elements *= size
                    counts[dtype] = counts.get(dtype, 0) + elements
    return max(counts, key=counts.get) if counts else None


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
        field = "model.tokenizer" if mcfg.tokenizer else "model.name_or_path" if mcfg.name_or_path else "teacher.name_or_path"
        return load_tokenizer(path, mcfg.trust_remote_code, field=field)
    from slm_cli.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(example_texts(train_examples), vocab_size=mcfg.tokenizer_vocab_size)
