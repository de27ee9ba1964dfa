"""LoRA artifacts saved unmerged (`train.lora.merge=false`): a clean base checkpoint plus a standard
PEFT adapter, which peft loads on its own and every slm stage merges on load.

One teacher is trained twice with the same seed and steps, once merged and once not, so the merged
artifact is the reference for what the unmerged one must load as.
"""

import json
import shutil

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from slm_cli import models
from slm_cli.errors import SlmError
from tests.stages.helpers import FAST, meta, metrics_rows, reloaded_val_loss, run_slm

SMALL = ["model=tiny-llama", "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128"]
LORA = ["train.lora.enabled=true", "train.lora.r=4", "train.lora.alpha=8", "train.lr=1e-2", "train.max_steps=8"]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # train.lora.target_modules' default
PPL = ["data.source=shakespeare", "eval.window=64", "eval.stride=48", "eval.max_tokens=300"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(merged, unmerged): the same LoRA teacher run saved both ways."""
    root = tmp_path_factory.mktemp("lora")
    for name, merge in (("merged", "true"), ("unmerged", "false")):
        assert run_slm("teacher", *SMALL, *FAST, *LORA, f"train.lora.merge={merge}", f"output_dir={root / name}",
                       f"hydra.run.dir={root}/logs/{name}") == 0
    return root / "merged", root / "unmerged"


def ids(folder) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(folder)
    return torch.tensor([tok("12 + 34 = 46. 7 * 8 = 56")["input_ids"]])


@torch.no_grad()
def logits(model, folder) -> torch.Tensor:
    return model.eval()(input_ids=ids(folder)).logits


def test_the_folder_is_a_clean_base_plus_a_peft_adapter(trained, tmp_path):
    merged, unmerged = trained
    names = {p.name for p in unmerged.iterdir()}
    assert {"model.safetensors", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "adapter" not in names  # no nested folder: peft finds the adapter at the artifact itself
    assert "README.md" not in names  # peft's blank model-card template is not kept
    config = json.loads((unmerged / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(unmerged)  # the base beside it, by absolute path
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    record = meta(unmerged)["adapter"]
    assert record["kind"] == "lora" and record["merged"] is False
    assert record["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert "adapter" not in meta(merged)

    # the base has standard names only, and plain transformers loads all of it, the same every time
    base_keys = load_file(unmerged / "model.safetensors").keys()
    assert not [k for k in base_keys if "lora_" in k or "base_layer" in k]
    base_only = tmp_path / "base"
    shutil.copytree(unmerged, base_only, ignore=shutil.ignore_patterns("adapter_*"))
    base, info = AutoModelForCausalLM.from_pretrained(base_only, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    again = AutoModelForCausalLM.from_pretrained(base_only)
    assert torch.equal(logits(base, unmerged), logits(again, unmerged))

    # it is the untouched base: merged = base + (alpha / r) * B @ A on the adapted layers, equal elsewhere
    adapter = load_file(unmerged / "adapter_model.safetensors")
    base_sd, merged_sd = base.state_dict(), AutoModelForCausalLM.from_pretrained(merged).state_dict()
    assert base_sd.keys() == merged_sd.keys()
    adapted = 0
    for key, weight in base_sd.items():
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            a = adapter[f"base_model.model.{module}.lora_A.weight"]
            b = adapter[f"base_model.model.{module}.lora_B.weight"]
            assert b.abs().max() > 0  # trained (peft starts B at zero)
            torch.testing.assert_close(weight + (8 / 4) * b @ a, merged_sd[key], rtol=0, atol=1e-6)
            adapted += 1
        else:
            assert torch.equal(weight, merged_sd[key]), key
    assert adapted == 2 * len(TARGETS)


def test_peft_and_transformers_load_the_trained_model_offline(trained, tmp_path, monkeypatch):
    merged, unmerged = trained
    from peft import AutoPeftModelForCausalLM

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no hub: the base must resolve locally
    reference = logits(AutoModelForCausalLM.from_pretrained(merged), merged)
    with_adapter = AutoPeftModelForCausalLM.from_pretrained(unmerged)
    # the logits the merged artifact gives, and the validation loss the trained model scored in the run
    torch.testing.assert_close(logits(with_adapter, unmerged), reference, rtol=0, atol=1e-5)
    val_loss = meta(unmerged)["metrics"]["val_loss"]
    assert reloaded_val_loss(unmerged, model=with_adapter) == pytest.approx(val_loss, rel=1e-5)
    # plain transformers (5.x, with peft installed) attaches an adapter it finds beside the weights itself
    plain = AutoModelForCausalLM.from_pretrained(unmerged)
    torch.testing.assert_close(logits(plain, unmerged), reference, rtol=0, atol=1e-5)
    assert reloaded_val_loss(unmerged) == pytest.approx(val_loss, rel=1e-5)
    # a moved artifact still loads (the base is the folder itself), in transformers and in slm
    moved = tmp_path / "moved"
    shutil.copytree(unmerged, moved)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(moved), moved), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(models.load_model(str(moved)), moved), reference, rtol=0, atol=1e-5)
    # without the adapter it is another model: the checks above would catch an adapter not applied
    base_only = tmp_path / "base"
    shutil.copytree(unmerged, base_only, ignore=shutil.ignore_patterns("adapter_*"))
    assert (logits(AutoModelForCausalLM.from_pretrained(base_only), unmerged) - reference).abs().max() > 1e-2


def test_slm_loads_it_merged_and_trainable(trained):
    merged, unmerged = trained
    model = models.load_model(str(unmerged))
    reference = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    state = model.state_dict()
    assert state.keys() == reference.keys()  # a plain model again, no peft wrappers
    for key, value in state.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # teacher/student stages train what they load


def test_slm_eval_scores_the_adapter_model(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    merged, unmerged = trained
    scores = {}
    for folder in trained:
        assert run_slm("eval", f"model.name_or_path={folder}", *PPL, f"output_dir={tmp_path / folder.name}") == 0
        scores[folder.name] = json.loads((tmp_path / folder.name / "eval.json").read_text())["metrics"]["perplexity"]
    assert scores["unmerged"] == pytest.approx(scores["merged"], rel=1e-5)


def test_prune_and_quantize_read_the_merged_model(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    merged, unmerged = trained
    prune = ["prune.keep_ffn=0.5", "calibration.samples=4", "calibration.seq_len=64", "calibration.batch_size=2",
             "eval.max_tokens=256", "eval.window=128", "eval.stride=64", "threads=1"]
    quant = ["eval.max_tokens=256", "eval.window=128", "eval.stride=64", "calibration.samples=4", "calibration.seq_len=64"]
    for stage, args in (("prune", prune), ("quantize", quant)):
        for folder in trained:
            out = tmp_path / f"{stage}-{folder.name}"
            assert run_slm(stage, f"model.name_or_path={folder}", *args, f"output_dir={out}") == 0, stage
        a, b = (meta(tmp_path / f"{stage}-{name}")["metrics"] for name in ("merged", "unmerged"))
        assert b["perplexity_source"] == pytest.approx(a["perplexity_source"], rel=1e-5), stage
        pa, pb = (load_file(tmp_path / f"{stage}-{name}" / "model.safetensors") for name in ("merged", "unmerged"))
        assert pa.keys() == pb.keys()
        for key in pa:  # what they wrote is the same model, adapter merged in
            torch.testing.assert_close(pb[key].float(), pa[key].float(), rtol=0, atol=1e-5, msg=f"{stage} {key}")
        assert not (tmp_path / f"{stage}-unmerged" / "adapter_config.json").exists()


def test_distill_reads_both_teacher_and_student_merged(trained, tmp_path, monkeypatch):
    """Teacher and student are the same trained model, one given merged and one as base + adapter: the
    first step's KD loss is ~0 only if the adapter was applied to the one read unmerged."""
    monkeypatch.chdir(tmp_path)
    merged, unmerged = trained
    for name, teacher, student in (("t", unmerged, merged), ("s", merged, unmerged)):
        out = tmp_path / name
        assert run_slm("distill", f"teacher.name_or_path={teacher}", f"model.name_or_path={student}", *FAST,
                       "train.max_steps=1", f"output_dir={out}") == 0
        assert metrics_rows(out)[0]["kd_loss"] == pytest.approx(0.0, abs=1e-6), name
    # the same pair with the adapter left out of one side is far apart
    base_only = tmp_path / "base-only"
    shutil.copytree(unmerged, base_only, ignore=shutil.ignore_patterns("adapter_*", "slm.json"))
    out = tmp_path / "b"
    assert run_slm("distill", f"teacher.name_or_path={base_only}", f"model.name_or_path={merged}", *FAST,
                   "train.max_steps=1", f"output_dir={out}") == 0
    assert metrics_rows(out)[0]["kd_loss"] > 1e-3


def test_training_stages_start_from_the_merged_model(trained, tmp_path, monkeypatch):
    """`slm teacher` from it (model.name_or_path) and `slm student` taking its layers (teacher_layers) train
    exactly what they would from the merged artifact."""
    monkeypatch.chdir(tmp_path)
    runs = {
        "teacher": lambda folder: ["teacher", f"model.name_or_path={folder}"],
        "student": lambda folder: ["student", f"teacher.name_or_path={folder}", "student.init=teacher_layers",
                                   "student.layers=[1]"],
    }
    for stage, args in runs.items():
        for folder in trained:
            out = tmp_path / f"{stage}-{folder.name}"
            assert run_slm(*args(folder), *FAST, "train.max_steps=2", f"output_dir={out}") == 0, stage
        a, b = (load_file(tmp_path / f"{stage}-{name}" / "model.safetensors") for name in ("merged", "unmerged"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=f"{stage} {key}")


def test_bench_times_the_merged_model(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    merged, unmerged = trained
    quick = ["bench.warmup=0", "bench.repeats=1", "bench.threads=1", "bench.prefill_seq_lens=[16]", "bench.decode_batch_sizes=[1]",
             "bench.decode_prompt_len=8", "bench.decode_new_tokens=2", "bench.scoring.enabled=false", "bench.isolate=false"]
    assert run_slm("bench", str(merged), str(unmerged), *quick, f"output_dir={tmp_path / 'b'}") == 0
    rows = json.loads((tmp_path / "b" / "bench.json").read_text())["artifacts"]
    assert rows[1]["params"] == rows[0]["params"]  # the adapter's own tensors are not counted twice


def wrapped_checkpoint(source, folder):
    """What `train.lora.merge=false` wrote before: the base saved with PEFT's wrapped names inside."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(source), LoraConfig(r=4, target_modules=list(TARGETS)))
    model.get_base_model().save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def test_a_half_loaded_checkpoint_is_an_error(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    merged, unmerged = trained
    old = wrapped_checkpoint(merged, tmp_path / "old")
    with pytest.raises(SlmError, match=r"model.name_or_path=.*old: its weights do not match its config.json .*PEFT-wrapped"):
        models.load_model(str(old))
    assert run_slm("eval", f"model.name_or_path={old}", *PPL, f"output_dir={tmp_path / 'e'}") == 2
    err = capsys.readouterr().err
    assert str(old) in err and "missing" in err and "base_layer" in err
    assert not (tmp_path / "e").exists()
    # a plain checkpoint that lacks one weight is refused just the same
    short = tmp_path / "short"
    shutil.copytree(merged, short, ignore=shutil.ignore_patterns("slm.json"))
    weights = load_file(short / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, short / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SlmError, match=r"short: its weights do not match its config.json \(1 missing, e.g. "
                                       r"model.layers.1.mlp.up_proj.weight\): .*Save the model again"):
        models.load_model(str(short))


def test_broken_adapters_are_refused_before_loading(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    merged, unmerged = trained

    def broken(name, edit):
        folder = tmp_path / name
        shutil.copytree(unmerged, folder, ignore=shutil.ignore_patterns("slm.json"))
        edit(folder)
        return folder

    def adapter_config(folder, **changes):
        file = folder / "adapter_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))

    cases = {
        "damaged": (lambda f: (f / "adapter_config.json").write_text("{"), "adapter_config.json is damaged"),
        "pickle": (lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"),
                   "only as adapter_model.bin, a Python pickle"),
        "cut": (lambda f: (f / "adapter_model.safetensors").write_bytes((f / "adapter_model.safetensors").read_bytes()[:-8]),
                "adapter_model.safetensors is cut short"),
        "prefix": (lambda f: adapter_config(f, peft_type="PREFIX_TUNING"), "slm merges LoRA adapters only"),
        # the config adapts a layer the weights do not cover: peft would leave it at its fresh init
        "missing": (lambda f: adapter_config(f, target_modules=[*TARGETS, "up_proj"]), "does not fit the base model beside it"),
    }
    for name, (edit, message) in cases.items():
        folder = broken(name, edit)
        assert run_slm("eval", f"model.name_or_path={folder}", *PPL, f"output_dir={tmp_path / 'e'}") == 2, name
        err = capsys.readouterr().err
        assert message in err and str(folder) in err, (name, err[-600:])
    assert not (tmp_path / "e").exists()
