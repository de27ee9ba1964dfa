"""train.memory_budget_gb and train.micro_batch_size=auto: the engine measures the micro-batch that fits.

The probe forks a child per micro-batch size, which cannot start DeepSpeed once the process has a
torch.distributed process group (in-process stage tests make one), so these runs are subprocesses.
Budgets are set from a first run's own measurements, so the tests hold on any machine.
"""

import json

import pytest

from slm_cli.config.schema import TeacherStageConfig
from slm_cli.config.validate import ConfigError, validate
from tests.stages.helpers import meta, run_cli

# Packed 256-token rows of a 2-layer model: activations grow clearly with the micro-batch.
TINY = [
    "model=tiny-llama", "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
    "data.train_size=800", "data.val_size=16", "data.test_size=8", "data.packing=true", "data.max_seq_len=256",
    "train.max_steps=3", "train.eval_every=0", "train.eval_batches=1", "train.warmup_steps=1",
]


def _teacher(tmp_path, name, *args):
    out = tmp_path / name
    proc = run_cli(["teacher", *TINY, *args, f"output_dir={out}"], cwd=tmp_path)
    return out, proc


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """A run with room for every size: micro_batch_size=auto probes 1, 2, 4, ... up to the training set."""
    tmp = tmp_path_factory.mktemp("memory")
    out, proc = _teacher(tmp, "roomy", "train.micro_batch_size=auto", "train.memory_budget_gb=100")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, meta(out)


def test_auto_takes_the_largest_size_when_all_fit(calibration):
    _, m = calibration
    probes = m["memory"]["probes"]
    sizes = [p["micro_batch_size"] for p in probes]
    assert sizes[:4] == [1, 2, 4, 8] and all(p["fits"] for p in probes)
    assert m["memory"]["micro_batch_size"] == sizes[-1] and sizes[-1] > 8
    # bigger micro-batches need more memory (activations of 256-token rows), well above measurement noise
    assert probes[-1]["peak_gb"] > probes[0]["peak_gb"] + 0.05
    # the run itself stayed under the estimate its micro-batch was chosen by
    assert m["metrics"]["peak_memory_gb"] <= probes[-1]["peak_gb"]


def test_auto_picks_a_size_that_fits_the_budget(calibration):
    tmp, roomy = calibration
    probes = roomy["memory"]["probes"]
    budget = round((probes[0]["peak_gb"] + probes[-1]["peak_gb"]) / 2, 3)
    out, proc = _teacher(tmp, "auto", "train.micro_batch_size=auto", f"train.memory_budget_gb={budget}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = meta(out)
    mem = m["memory"]
    chosen = mem["micro_batch_size"]
    by_size = {p["micro_batch_size"]: p for p in mem["probes"]}
    assert 1 <= chosen < probes[-1]["micro_batch_size"]
    assert by_size[chosen]["fits"] and by_size[chosen]["peak_gb"] <= budget
    # it stopped at the first size over the budget, which is the next one it tried
    last = mem["probes"][-1]
    assert not last["fits"] and last["peak_gb"] > budget and last["micro_batch_size"] > chosen
    # the run trained with that size and stayed within the budget, which the engine checked every step
    assert m["metrics"]["peak_memory_gb"] <= budget
    assert m["config"]["train"]["micro_batch_size"] == "auto"
    assert json.loads((out / "deepspeed_config.json").read_text())["train_micro_batch_size_per_gpu"] == chosen
    assert "memory probe" in proc.stdout


def test_too_small_budget_is_a_clear_error(calibration):
    tmp, roomy = calibration
    budget = round(roomy["memory"]["probes"][0]["peak_gb"] / 2, 3)
    out, proc = _teacher(tmp, "small", "train.micro_batch_size=auto", f"train.memory_budget_gb={budget}")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert f"train.memory_budget_gb={budget:g} is too small: even micro-batch 1 needs" in text
    assert "train.gradient_checkpointing=true" in text and "Traceback" not in text
    assert not out.exists()


def test_fixed_size_over_budget_is_refused_naming_one_that_fits(calibration):
    tmp, roomy = calibration
    probes = roomy["memory"]["probes"]
    big = probes[-1]["micro_batch_size"]
    budget = round((probes[0]["peak_gb"] + probes[-1]["peak_gb"]) / 2, 3)
    out, proc = _teacher(tmp, "fixed", f"train.micro_batch_size={big}", f"train.memory_budget_gb={budget}")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert f"train.micro_batch_size={big} needs" in text and f"over train.memory_budget_gb={budget:g}" in text
    named = int(text.split("Set train.micro_batch_size=")[1].split()[0])
    assert 1 <= named < big
    assert not out.exists()


def test_auto_needs_a_budget():
    with pytest.raises(ConfigError, match="micro_batch_size=auto picks the largest micro-batch that fits a memory budget"):
        validate({"train": {"micro_batch_size": "auto"}}, TeacherStageConfig)
    with pytest.raises(ConfigError, match="micro_batch_size='big': give a number >= 1, or auto"):
        validate({"train": {"micro_batch_size": "big", "memory_budget_gb": 4}}, TeacherStageConfig)
    with pytest.raises(ConfigError, match="train.memory_budget_gb=0"):
        validate({"train": {"memory_budget_gb": 0}}, TeacherStageConfig)
    with pytest.raises(ConfigError, match="train.micro_batch_size=0 must be >= 1"):
        validate({"train": {"micro_batch_size": 0}}, TeacherStageConfig)


def test_more_than_one_process_is_refused():
    from slm_cli.config.schema import TrainConfig
    from slm_cli.engine import memory
    from slm_cli.errors import SlmError

    with pytest.raises(SlmError, match="measured in one process, and this run has 2: run it with launcher.nproc_per_node=1"):
        memory.fit_micro_batch(TrainConfig(micro_batch_size="auto", memory_budget_gb=4), lambda t: 0.0,
                               train_examples=64, world_size=2)


def test_the_loop_stops_a_run_over_its_budget(tmp_path):
    """The engine, not the OS, enforces the budget: a run whose peak goes over it stops with an error after the step."""
    from functools import partial

    from slm_cli.config.schema import DeepSpeedConfig, ModelConfig, TrainConfig
    from slm_cli.data.tokenize import EncodedExample, collate
    from slm_cli.engine import loop
    from slm_cli.errors import SlmError
    from slm_cli.models import build_model

    class _Tok:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return 64

    model = build_model(ModelConfig(arch="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64), _Tok())
    tcfg = TrainConfig(max_steps=3, micro_batch_size=2, memory_budget_gb=0.05, warmup_steps=0, eval_every=0)
    engine, _ = loop.initialize(model, tcfg, DeepSpeedConfig())
    data = [EncodedExample(input_ids=list(range(3, 19)), labels=list(range(3, 19))) for _ in range(4)]
    with pytest.raises(SlmError, match=r"training stopped at step 1: the process's peak memory reached [0-9.]+ GB, "
                                       r"over train.memory_budget_gb=0.05 \(train.micro_batch_size=2\)"):
        loop.train(engine, train_set=data, val_set=[], collate=partial(collate, pad_token_id=0), tcfg=tcfg, seed=0,
                   work_dir=tmp_path, resume=False)


def test_distill_measures_with_the_teacher_and_sampling(calibration):
    """On-policy distillation: each probe runs the student's engine, the teacher's forwards and the sampling."""
    tmp, _ = calibration
    teacher, proc = _teacher(tmp, "teacher-for-distill", "train.micro_batch_size=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp / "distilled"
    proc = run_cli([
        "distill", f"teacher.name_or_path={teacher}", "model=tiny-llama", "model.num_hidden_layers=1", "model.hidden_size=64",
        "model.intermediate_size=128", "data.train_size=24", "data.val_size=8", "data.test_size=8", "train.max_steps=2",
        "train.eval_every=0", "train.eval_batches=1", "train.warmup_steps=0", "distill=on_policy", "distill.gen_max_new_tokens=4",
        "train.micro_batch_size=auto", "train.memory_budget_gb=100", f"output_dir={out}",
    ], cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = meta(out)
    mem = m["memory"]
    assert [p["micro_batch_size"] for p in mem["probes"]] == [1, 2, 4, 8, 16, 24]
    assert mem["micro_batch_size"] == 24 and all(p["fits"] and p["tokens_per_s"] > 0 for p in mem["probes"])
    assert m["metrics"]["peak_memory_gb"] <= 100
    assert json.loads((out / "deepspeed_config.json").read_text())["train_micro_batch_size_per_gpu"] == 24
