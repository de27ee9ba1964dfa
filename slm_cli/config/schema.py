"""Typed schemas for every stage's config.

Each field carries one docstring-style comment (shown by `slm <stage> --help`
through the YAML files, and by `describe()` here). The schemas are plain
dataclasses so that validating a config imports nothing heavier than the
standard library: `slm teacher --cfg job` and config errors stay instant.

Why we validate ourselves instead of composing against the structured config:
OmegaConf stops at the *first* type error it meets while merging. Users who
edit a 40-line override want every problem at once, so Hydra composes the
plain YAML and `validate()` (see validate.py) walks these dataclasses,
collecting unknown keys (with a did-you-mean), wrong types and impossible
values into one error before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Optional, Union

from slm_cli.config.validate import Range

PRECISIONS = ("fp32", "bf16")
OFFLOAD = ("none", "cpu")
LR_SCHEDULES = ("cosine", "linear", "constant", "deepspeed")
NONFINITE = ("stop", "skip_step")
ARCHS = ("llama", "qwen3", "qwen2", "mistral")
STUDENT_INITS = ("config", "pretrained", "teacher_layers")
DTYPES = ("float32", "bfloat16", "float16")


def _output_problems(cfg, out: list[str]) -> None:
    """The checks every stage that writes an output folder shares."""
    _problems_if(not cfg.output_dir, "output_dir is empty", out)
    _problems_if(
        cfg.overwrite not in (True, False, "force"),
        f"overwrite={cfg.overwrite!r}: choose false, true (replace an output slm wrote) or force (replace any folder)",
        out,
    )


# Every int and float field declares the values it accepts (see validate.Range); these are the common ones.
PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
OptionalPositiveInt = Annotated[Optional[int], Range(ge=1)]
Seed = Annotated[int, Range(ge=0, le=2**32 - 1)]  # numpy's seed range


def _problems_if(cond: bool, msg: str, out: list[str]) -> None:
    if cond:
        out.append(msg)


@dataclass
class ModelConfig:
    """Which model to train: a local Hugging Face folder / hub id, or a tiny model built from these fields."""

    name_or_path: Optional[str] = None  # local HF folder or hub id; null = build from `arch` and the sizes below
    arch: Optional[str] = None  # architecture for a model built from config: llama | qwen3 | qwen2 | mistral
    hidden_size: PositiveInt = 64  # width of the residual stream (built models)
    intermediate_size: PositiveInt = 128  # MLP width (built models)
    num_hidden_layers: PositiveInt = 2  # decoder layers (built models)
    num_attention_heads: PositiveInt = 4  # query heads (built models)
    num_key_value_heads: PositiveInt = 2  # KV heads, GQA when < num_attention_heads (built models)
    head_dim: OptionalPositiveInt = None  # per-head width; null = hidden_size / num_attention_heads
    max_position_embeddings: PositiveInt = 1024  # longest sequence the built model supports
    tie_word_embeddings: bool = True  # share input embedding and lm_head (built models)
    tokenizer: Optional[str] = None  # tokenizer folder; null = the model's own, or one trained on the run's data
    tokenizer_vocab_size: Annotated[int, Range(ge=64)] = 512  # vocabulary size when a BPE tokenizer is trained on the data
    dtype: str = "float32"  # dtype the weights are loaded in: float32 | bfloat16 | float16
    trust_remote_code: bool = False  # run model code shipped with the checkpoint (only if you trust its source)

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        _problems_if(
            self.name_or_path is None and self.arch is None,
            f"{where}: set either name_or_path (a model folder or hub id) or arch (one of {', '.join(ARCHS)}) "
            "to build a model from config, e.g. model=tiny-llama",
            out,
        )
        _problems_if(
            self.arch is not None and self.arch not in ARCHS,
            f"{where}.arch={self.arch!r} is not supported; choose one of {', '.join(ARCHS)}",
            out,
        )
        _problems_if(self.dtype not in DTYPES, f"{where}.dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}", out)
        if self.num_key_value_heads >= 1:
            _problems_if(
                self.num_attention_heads % self.num_key_value_heads != 0,
                f"{where}: num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}",
                out,
            )
        if self.head_dim is None and self.num_attention_heads >= 1:
            _problems_if(
                self.hidden_size % self.num_attention_heads != 0,
                f"{where}: hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; set {where}.head_dim explicitly",
                out,
            )
        return out


@dataclass
class DataConfig:
    """Training data: a built-in task or corpus name, a data file or folder, or a hub dataset."""

    source: str = "arithmetic"  # built-in name (see `slm`), a .jsonl/.json/.csv/.parquet file, a folder of split files, a datasets.save_to_disk folder, or hub:<org>/<name>
    subset: Optional[str] = None  # a hub dataset's configuration (datasets.load_dataset's `name`); null = its default
    train_size: OptionalPositiveInt = 2000  # examples generated for built-in tasks (null = all of a user file)
    val_size: OptionalPositiveInt = 200  # validation examples for built-in tasks
    test_size: OptionalPositiveInt = 200  # held-out test examples for built-in tasks
    val_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.05  # share of a user file kept for validation
    max_seq_len: Annotated[int, Range(ge=8)] = 128  # longer examples are truncated (and counted); ones left with no target are dropped
    packing: bool = False  # teacher/student: pack examples into rows of max_seq_len tokens (attention kept within each example)

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        _problems_if(not self.source, f"{where}.source is empty: name a built-in task or a data file", out)
        _problems_if(
            self.subset is not None and not self.source.startswith("hub:"),
            f"{where}.subset={self.subset!r} applies only to a hub dataset (data.source=hub:<org>/<name>)", out,
        )
        return out


@dataclass
class LoraConfig:
    """Low-rank adapters through PEFT instead of full fine-tuning."""

    enabled: bool = False  # train LoRA adapters instead of all weights
    r: PositiveInt = 8  # adapter rank
    alpha: PositiveInt = 16  # scaling numerator (scale = alpha / r)
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0  # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # module names
    merge: bool = True  # merge adapters into the saved weights (false: the base + a PEFT adapter, merged on load by slm)

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        _problems_if(self.enabled and not self.target_modules, f"{where}.target_modules is empty", out)
        return out


@dataclass
class TrainConfig:
    """The optimisation loop shared by teacher, student and distill."""

    max_steps: PositiveInt = 100  # optimizer steps
    micro_batch_size: Annotated[Union[int, str], Range(ge=1)] = 8  # sequences per forward pass per process, or auto: the largest that fits train.memory_budget_gb (measured)
    memory_budget_gb: Annotated[Optional[float], Range(gt=0)] = None  # peak resident memory a training process may use, in GB (1e9 bytes); measured and enforced by slm (null = no budget)
    grad_accum: PositiveInt = 1  # micro-batches accumulated per optimizer step
    lr: Annotated[float, Range(gt=0)] = 1e-3  # peak learning rate
    weight_decay: Annotated[float, Range(ge=0)] = 0.0  # AdamW weight decay
    warmup_steps: NonNegativeInt = 5  # linear warm-up steps
    lr_schedule: str = "cosine"  # after warm-up: cosine | linear | constant | deepspeed (the scheduler block of deepspeed.config_file)
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1  # final lr as a fraction of the peak (cosine, linear)
    max_grad_norm: Annotated[float, Range(ge=0, note="0 = no clipping")] = 1.0  # gradient clipping (0 = off)
    precision: str = "fp32"  # fp32 | bf16 (bf16 autocast through DeepSpeed)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    eval_every: Annotated[int, Range(ge=0, note="0 = only at the end")] = 50  # validation loss every N steps (0 = only at the end)
    eval_batches: PositiveInt = 8  # micro-batches of validation data per evaluation
    save_every: Annotated[int, Range(ge=0, note="0 = no checkpoints")] = 0  # DeepSpeed checkpoint every N steps for resume (0 = none)
    log_every: PositiveInt = 1  # metrics.jsonl row every N steps
    nonfinite: str = "stop"  # a step whose loss or gradient norm is NaN/inf: stop (error, last good checkpoint kept) | skip_step (no update)
    report_to: Union[list[str], str] = field(default_factory=list)  # trackers for loss, lr, grad norm, tokens/s, eval loss: [tensorboard], [wandb] (offline), or none / [] (files in the run folder)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        _problems_if(
            self.lr_schedule not in LR_SCHEDULES,
            f"{where}.lr_schedule={self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}",
            out,
        )
        _problems_if(
            self.precision not in PRECISIONS, f"{where}.precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}", out
        )
        _problems_if(
            self.nonfinite not in NONFINITE, f"{where}.nonfinite={self.nonfinite!r}: choose one of {', '.join(NONFINITE)}", out
        )
        from slm_cli.engine.trackers import problems as tracker_problems  # standard library only

        out += tracker_problems(self.report_to, where)
        _problems_if(
            isinstance(self.micro_batch_size, str) and self.micro_batch_size != "auto",
            f"{where}.micro_batch_size={self.micro_batch_size!r}: give a number >= 1, or auto (with {where}.memory_budget_gb)",
            out,
        )
        _problems_if(
            self.micro_batch_size == "auto" and self.memory_budget_gb is None,
            f"{where}.micro_batch_size=auto picks the largest micro-batch that fits a memory budget, and none is set: "
            f"add {where}.memory_budget_gb=<GB>, or give {where}.micro_batch_size a number",
            out,
        )
        out += self.lora.problems(f"{where}.lora")
        return out


@dataclass
class DeepSpeedConfig:
    """How DeepSpeed shards and offloads training state."""

    zero_stage: Annotated[int, Range(ge=0, le=3)] = 0  # ZeRO stage 0-3 (0 = plain data parallel)
    offload_optimizer: str = "none"  # none | cpu: keep optimizer state in CPU memory (ZeRO >= 1, DeepSpeedCPUAdam)
    offload_param: str = "none"  # none | cpu: keep parameters in CPU memory (ZeRO-3 only)
    config_file: Optional[str] = None  # your own DeepSpeed JSON: its settings stand where you set none for slm; "auto" is filled

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        for name in ("offload_optimizer", "offload_param"):
            v = getattr(self, name)
            _problems_if(v not in OFFLOAD, f"{where}.{name}={v!r}: choose none or cpu", out)
        _problems_if(
            self.offload_optimizer == "cpu" and self.zero_stage == 0,
            f"{where}.offload_optimizer=cpu needs zero_stage >= 1 (got 0); set {where}.zero_stage=2",
            out,
        )
        _problems_if(
            self.offload_param == "cpu" and self.zero_stage != 3,
            f"{where}.offload_param=cpu needs zero_stage=3 (got {self.zero_stage})",
            out,
        )
        return out


@dataclass
class LauncherConfig:
    """How many processes run the stage."""

    nproc_per_node: PositiveInt = 1  # processes on this machine; > 1 re-executes the command under the `deepspeed` launcher
    hostfile: Optional[str] = None  # DeepSpeed hostfile for multi-node runs
    master_port: Annotated[Optional[int], Range(ge=1, le=65535)] = None  # rendezvous port (null = a free one)

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        return out


@dataclass
class TeacherRef:
    """The teacher artifact a student or distill stage reads."""

    name_or_path: Optional[str] = None  # folder written by `slm teacher` (or any HF causal-LM folder or hub id)
    dtype: str = "auto"  # dtype the frozen teacher runs in: auto (as saved) | float32 | bfloat16 | float16

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        _problems_if(
            self.dtype not in ("auto", *DTYPES), f"{where}.dtype={self.dtype!r}: choose auto or one of {', '.join(DTYPES)}", out
        )
        return out


@dataclass
class StudentInit:
    """How the student's weights start."""

    init: str = "config"  # config: fresh model from `model=` | pretrained: model.name_or_path | teacher_layers: copy layers
    layers: Optional[list[Annotated[int, Range(ge=0)]]] = None  # teacher layer indices kept for init=teacher_layers, e.g. [0, 2]

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        _problems_if(
            self.init not in STUDENT_INITS, f"{where}.init={self.init!r}: choose one of {', '.join(STUDENT_INITS)}", out
        )
        _problems_if(
            self.init == "teacher_layers" and not self.layers,
            f"{where}.layers must list the teacher layers to keep when init=teacher_layers, e.g. {where}.layers=[0,2]",
            out,
        )
        return out


@dataclass
class TrainStageConfig:
    """Fields every training stage has."""

    stage: str = "teacher"  # which stage this config drives (set by the stage's YAML)
    seed: Seed = 0  # makes data order, init and sampling repeatable
    output_dir: str = "outputs/artifact"  # artifact folder written on success (refused if it exists, unless overwrite)
    overwrite: Union[bool, str] = False  # true: replace an existing output_dir that slm wrote | force: replace whatever is there
    resume: Union[bool, str] = "auto"  # auto: continue an unfinished run of this config if one exists | true: must | false: start afresh
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)

    def problems(self, where: str = "") -> list[str]:
        out: list[str] = []
        _output_problems(self, out)
        _problems_if(
            self.resume not in (True, False, "auto"), f"resume={self.resume!r}: choose auto, true or false", out
        )
        for name in ("model", "data", "train", "deepspeed", "launcher"):
            out += getattr(self, name).problems(name)
        _problems_if(
            self.train.lora.enabled and self.deepspeed.zero_stage == 3,
            "train.lora.enabled=true with deepspeed.zero_stage=3 is not supported (adapters are merged on one rank); "
            "use deepspeed.zero_stage<=2",
            out,
        )
        return out


@dataclass
class TeacherStageConfig(TrainStageConfig):
    """`slm teacher`: supervised fine-tuning of the teacher on the task."""


@dataclass
class StudentStageConfig(TrainStageConfig):
    """`slm student`: initialise a small student (fresh, pretrained or teacher layers) and fine-tune it."""

    teacher: TeacherRef = field(default_factory=TeacherRef)
    student: StudentInit = field(default_factory=StudentInit)

    def problems(self, where: str = "") -> list[str]:
        out = super().problems(where)
        out += self.student.problems("student")
        _problems_if(
            self.student.init == "teacher_layers" and not self.teacher.name_or_path,
            "student.init=teacher_layers needs teacher.name_or_path=<teacher artifact folder>",
            out,
        )
        _problems_if(
            self.student.init == "pretrained" and not self.model.name_or_path,
            "student.init=pretrained needs model.name_or_path=<smaller model folder or hub id>",
            out,
        )
        return out

DIVERGENCE_NAMES = ("forward_kl", "reverse_kl", "generalized_jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
DISTILL_MODES = ("supervised", "on_policy", "sequence_level", "mixed")
TEACHER_LOGITS = ("online", "precompute")
GEN_CACHES = ("dynamic", "static", "compiled")  # = slm_cli.distill.sampler.CACHES


@dataclass
class DistillSettings:
    """What the student learns from the teacher, and on whose text."""

    mode: str = "supervised"  # supervised: dataset completions | on_policy: student samples | sequence_level: teacher samples | mixed
    lambda_on_policy: Annotated[float, Range(ge=0, le=1)] = 0.5  # mode=mixed: probability a micro-batch is on-policy, else supervised (GKD's lambda)
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | generalized_jsd | tvd | skew_forward_kl | skew_reverse_kl
    beta: Annotated[Optional[float], Range(ge=0, le=1)] = None  # generalized_jsd beta (0 = forward KL, 1 = reverse KL) or skew alpha; null = default
    kd_temperature: Annotated[float, Range(gt=0)] = 1.0  # softens both distributions in the KD term (loss scaled by T^2); never used for sampling
    kd_weight: Annotated[float, Range(ge=0, le=1)] = 0.9  # loss = (1 - kd_weight) * CE(labels) + kd_weight * KD on dataset / teacher text; on-policy text is pure KD
    gen_temperature: Annotated[float, Range(ge=0, note="0 = greedy")] = 0.9  # sampling temperature when the student (on_policy) or teacher (sequence_level) writes
    gen_max_new_tokens: PositiveInt = 32  # longest sampled completion
    gen_top_p: Annotated[float, Range(gt=0, le=1, note="1 = off")] = 1.0  # nucleus sampling threshold (1 = off)
    gen_top_k: Annotated[int, Range(ge=0, note="0 = off")] = 0  # top-k sampling (0 = off)
    gen_cache: str = "dynamic"  # KV cache while sampling: dynamic | static | compiled (static + torch.compile: sampling alone 1.14x on the SmolLM2 pair, a whole on-policy step no faster; bench/sampling.py)
    fused_loss: bool = True  # chunked fused-linear loss: the tokens x vocab logits never exist at once
    chunk_size: PositiveInt = 256  # tokens per chunk of the fused loss (peak extra memory ~4 x chunk x vocab floats)
    compile: bool = False  # torch.compile the fused loss's per-chunk math

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        _problems_if(self.mode not in DISTILL_MODES, f"{where}.mode={self.mode!r}: choose one of {', '.join(DISTILL_MODES)}", out)
        _problems_if(self.gen_cache not in GEN_CACHES,
                     f"{where}.gen_cache={self.gen_cache!r}: choose one of {', '.join(GEN_CACHES)}", out)
        _problems_if(
            self.divergence not in DIVERGENCE_NAMES,
            f"{where}.divergence={self.divergence!r}: choose one of {', '.join(DIVERGENCE_NAMES)}",
            out,
        )
        return out


@dataclass
class DistillTeacher(TeacherRef):
    """The teacher of `slm distill`, and whether its logits are computed online or read from a cache."""

    logits: str = "online"  # online: run the teacher each step | precompute: read a top-k cache written once
    logits_top_k: PositiveInt = 64  # precompute: teacher log-probs kept per position (the rest of the mass kept as one bucket)

    def problems(self, where: str) -> list[str]:
        out = super().problems(where)
        _problems_if(
            self.logits not in TEACHER_LOGITS, f"{where}.logits={self.logits!r}: choose online or precompute", out
        )
        return out


@dataclass
class DistillStageConfig(TrainStageConfig):
    """`slm distill`: the student learns the teacher's next-token distributions."""

    teacher: DistillTeacher = field(default_factory=DistillTeacher)
    distill: DistillSettings = field(default_factory=DistillSettings)

    def problems(self, where: str = "") -> list[str]:
        out = super().problems(where)
        out += self.distill.problems("distill") + self.teacher.problems("teacher")
        _problems_if(
            not self.teacher.name_or_path,
            "teacher.name_or_path is required: the teacher artifact folder to distill from",
            out,
        )
        _problems_if(
            self.data.packing,
            "data.packing=true is for supervised fine-tuning (slm teacher, slm student); distillation compares "
            "teacher and student on unpacked rows: set data.packing=false",
            out,
        )
        _problems_if(
            self.teacher.logits == "precompute" and self.distill.mode != "supervised",
            f"teacher.logits=precompute needs distill.mode=supervised (got {self.distill.mode}): text the models "
            "write during training does not exist when the cache is written",
            out,
        )
        return out


QUANT_SCHEMES = ("fp8_dynamic", "fp8_static", "fp8_weight_only", "fp8_block", "w8a8_int8", "w4a16")  # = slm_cli.quant.schemes.SCHEMES
WEIGHT_ROUNDING = ("gptq", "rtn")


@dataclass
class QuantConfig:
    """Which scheme, which Linear layers stay in float, and how the quantized model is judged."""

    scheme: str = "fp8_dynamic"  # fp8_dynamic | fp8_static | fp8_weight_only | fp8_block | w8a8_int8 | w4a16 (see slm_cli/quant/schemes.py)
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])  # Linear layers kept in float: names or 're:' regexes
    save_dtype: str = "bfloat16"  # dtype of every tensor that stays unquantized (embeddings, norms, ignored layers)
    fake_quant_eval: bool = False  # judge quality through an in-memory fake-quantized model instead of reloading the checkpoint
    error_rows: NonNegativeInt = 10  # layers with the largest weight error shown in the terminal (all go to quantization.json)
    keep_sensitive: Annotated[Union[int, str], Range(ge=0)] = "auto"  # Linear tensors kept in bf16 besides `ignore`: auto (fewest meeting max_ppl_increase on calibration text) | N (the N most sensitive per byte) | none
    max_ppl_increase: Annotated[float, Range(gt=0)] = 0.01  # keep_sensitive=auto: allowed perplexity increase on the calibration rows, a fraction (0.01 = +1%)
    max_keep_fraction: Annotated[float, Range(ge=0, le=1)] = 0.03  # byte cap: at most this fraction of the quantizable Linear weights stays bf16
    sensitivity_tokens: Annotated[int, Range(ge=2)] = 2048  # calibration tokens of the per-tensor sensitivity pass (the joint check uses every calibration row)
    sensitivity: str = "fisher"  # how each tensor's sensitivity is measured: fisher (one forward+backward for all tensors) | kl (one forward per tensor, exact; slow on CPU)
    group_size: Annotated[Union[int, str], Range(ge=1)] = "auto"  # w4a16: inputs sharing one scale: auto (largest of 128/64/32 dividing every input width) | N
    rounding: str = "gptq"  # w4a16: how weights are rounded: gptq (calibrated, slm_cli/quant/gptq.py) | rtn (round to nearest)
    gptq_damp: Annotated[float, Range(gt=0, le=1)] = 0.01  # GPTQ's damping, a fraction of mean(diag H)
    gptq_act_order: bool = False  # GPTQ: round the inputs with the most energy (largest diag H) first; groups stay contiguous, scales from the original weights
    smoothing_strength: Annotated[float, Range(ge=0, le=1)] = 0.0  # w8a8_int8: SmoothQuant alpha, activation outliers moved into the weights (0 = off)

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        keep = str(self.keep_sensitive).strip().lower()
        _problems_if(
            not (keep in ("auto", "none") or keep.isdigit() or isinstance(self.keep_sensitive, int)),
            f"{where}.keep_sensitive={self.keep_sensitive!r}: use auto, a number of tensors N >= 0, or none",
            out,
        )
        _problems_if(
            self.sensitivity not in ("fisher", "kl"),
            f"{where}.sensitivity={self.sensitivity!r}: choose fisher or kl",
            out,
        )
        _problems_if(
            self.scheme not in QUANT_SCHEMES, f"{where}.scheme={self.scheme!r}: choose one of {', '.join(QUANT_SCHEMES)}", out
        )
        _problems_if(
            self.rounding not in WEIGHT_ROUNDING,
            f"{where}.rounding={self.rounding!r}: choose one of {', '.join(WEIGHT_ROUNDING)}", out,
        )
        group = str(self.group_size).strip().lower()
        _problems_if(
            not (group == "auto" or group.isdigit() and int(group) > 0),
            f"{where}.group_size={self.group_size!r}: use auto or a positive number of inputs (e.g. 128)", out,
        )
        _problems_if(
            self.smoothing_strength > 0 and self.scheme != "w8a8_int8",
            f"{where}.smoothing_strength={self.smoothing_strength} smooths INT8 activations; it needs "
            f"quant.scheme=w8a8_int8 (got {self.scheme}), or set it to 0", out,
        )
        _problems_if(
            self.save_dtype not in ("bfloat16", "float16"),
            f"{where}.save_dtype={self.save_dtype!r}: choose bfloat16 or float16 (fp32 leftovers bloat the checkpoint)",
            out,
        )
        return out


@dataclass
class QuantCalibrationConfig:
    """Calibration text for static activation scales (fp8_static only): N sequences of L tokens."""

    source: str = "auto"  # auto: the task data in the source artifact's slm.json (else the kjv corpus, with a warning) | a task, corpus, .txt/.jsonl/... file or folder: a task's validation split, a corpus' calibration split, all of a file
    samples: PositiveInt = 32  # N: sequences fed through the model
    seq_len: PositiveInt = 512  # L: tokens per sequence (the first N*L tokens of the split, cut into N rows)
    batch_size: PositiveInt = 4  # sequences per forward pass

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        _problems_if(not self.source, f"{where}.source is empty: name a corpus, task or data file", out)
        return out


@dataclass
class QuantEvalConfig:
    """Perplexity of the source and of the FP8 checkpoint on the same held-out text."""

    source: Optional[str] = "auto"  # data source whose test split is scored; auto: the task data in the source artifact's slm.json (else kjv, with a warning); null = skip the perplexity check
    max_tokens: Annotated[int, Range(ge=2)] = 4096  # score the first N tokens of the test split
    window: Annotated[int, Range(ge=2)] = 512  # tokens the model sees at once (sliding window)
    stride: PositiveInt = 256  # tokens the window advances; each token is scored once with >= window - stride of context
    batch_size: PositiveInt = 4  # windows per forward pass

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        _problems_if(
            self.stride >= self.window,
            f"{where}.stride={self.stride} must be in [1, window - 1] (window={self.window})",
            out,
        )
        return out


@dataclass
class QuantizeStageConfig:
    """`slm quantize`: a quantized checkpoint (compressed-tensors) of an artifact, checked and measured."""

    stage: str = "quantize"  # which stage this config drives (set by the stage's YAML)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="???"))  # the artifact to quantize: model.name_or_path=<folder> (dtype: the source is loaded and evaluated in it; scales come from these weights)
    seed: Seed = 0  # fixes the records drawn from built-in tasks for calibration and evaluation
    output_dir: str = "outputs/artifact"  # artifact folder written on success (refused if it exists, unless overwrite)
    overwrite: Union[bool, str] = False  # true: replace an existing output_dir that slm wrote | force: replace whatever is there
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: QuantCalibrationConfig = field(default_factory=QuantCalibrationConfig)
    eval: QuantEvalConfig = field(default_factory=QuantEvalConfig)

    def problems(self, where: str = "") -> list[str]:
        out: list[str] = []
        _output_problems(self, out)
        out += _weights_problems(self.model, "quantize")
        out += self.quant.problems("quant") + self.calibration.problems("calibration") + self.eval.problems("eval")
        return out


@dataclass
class RunStageConfig:
    """`slm run`: run a pipeline recipe's stages in order, each from the artifacts of earlier ones."""

    stage: str = "run"  # which stage this config drives
    recipe: str = "quickstart"  # a pipeline in recipes/ (e.g. quickstart, distill/sft_then_on_policy) or a YAML path
    output_root: Optional[str] = None  # folder for every stage's artifact; null = the recipe's own output_root
    force: bool = False  # re-run every stage, even those already done with the same config and inputs
    inputs: dict[str, Optional[str]] = field(default_factory=dict)  # artifacts the recipe takes from you, by name
    report: bool = True  # print the compression report of the lineage at the end (when the report stage exists)

    def problems(self, where: str = "") -> list[str]:
        out: list[str] = []
        _problems_if(not self.recipe, "recipe is empty: name a pipeline in recipes/, e.g. recipe=quickstart", out)
        return out


@dataclass
class BenchScoring:
    """Scoring mode of `slm bench`: many arithmetic_yesno items after one shared prefix, without and with its KV cache."""

    enabled: bool = True  # measure items/s without and with prefix KV-cache reuse (needs the artifact's tokenizer)
    prefix_examples: PositiveInt = 32  # solved train examples forming the shared prefix (its length in tokens is reported)
    items: PositiveInt = 32  # candidate items scored after the prefix, each by log P(" Yes")
    batch_size: PositiveInt = 8  # items per forward pass

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        return out


@dataclass
class BenchSettings:
    """What `slm bench` times: prefill latency and decode throughput at these sizes, with repeats."""

    warmup: NonNegativeInt = 1  # untimed runs before each measurement (allocations, kernel choice)
    repeats: PositiveInt = 5  # timed runs per measurement; the median and spread (IQR, min/max) are reported
    prefill_batch_sizes: list[PositiveInt] = field(default_factory=lambda: [1])  # prompts per prefill pass
    prefill_seq_lens: list[PositiveInt] = field(default_factory=lambda: [128, 512])  # prompt lengths (tokens) for prefill latency
    decode_batch_sizes: list[PositiveInt] = field(default_factory=lambda: [1, 4, 16])  # sequences decoded together
    decode_prompt_len: PositiveInt = 64  # prompt tokens before decoding
    decode_new_tokens: PositiveInt = 32  # greedy tokens decoded per sequence (timed without the prefill)
    threads: OptionalPositiveInt = None  # torch CPU threads; null = torch's default
    isolate: bool = True  # measure each artifact in its own process, so peak memory is that model's alone
    write_to_artifact: bool = False  # also merge the results into <artifact>/slm.json under metrics.bench
    scoring: BenchScoring = field(default_factory=BenchScoring)
    engine: str = "hf"  # hf: transformers in this process's environment | vllm: vLLM's offline engine (its own environment, see vllm_python)
    vllm_python: Optional[str] = None  # python of an environment with vLLM; null = $SLM_VLLM_PYTHON, else /tmp/slm-vllm/bin/python (what `make serve-check` creates)
    vllm_dtype: str = "auto"  # activations vLLM serves in: auto = bfloat16 on a GPU or a CPU with native bf16 (AVX512-BF16/AMX), float32 elsewhere | bfloat16 | float16 | float32

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        out += self.scoring.problems(f"{where}.scoring")
        _problems_if(self.engine not in ("hf", "vllm"), f"{where}.engine={self.engine!r}: choose hf or vllm", out)
        _problems_if(self.vllm_dtype not in ("auto", "bfloat16", "float16", "float32"),
                     f"{where}.vllm_dtype={self.vllm_dtype!r}: choose auto, bfloat16, float16 or float32", out)
        return out


@dataclass
class BenchStageConfig:
    """`slm bench`: size, memory, prefill latency, decode tokens/s and prefix reuse of each artifact."""

    stage: str = "bench"  # which stage this config drives
    artifacts: Union[list[str], str] = field(default_factory=list)  # model folders to measure: artifacts=[runs/a/teacher,runs/a/student]
    seed: Seed = 0  # fixes the random prompts and the scoring workload
    device: Optional[str] = None  # cpu | cuda; null = cuda when present, else cpu
    trust_remote_code: bool = False  # run model code shipped with a checkpoint (only if you trust its source)
    output_dir: str = "outputs/bench/results"  # bench.json is written here
    overwrite: Union[bool, str] = False  # true: replace an existing output_dir that slm wrote | force: replace whatever is there
    bench: BenchSettings = field(default_factory=BenchSettings)

    def problems(self, where: str = "") -> list[str]:
        out: list[str] = []
        _output_problems(self, out)
        _problems_if(
            not self.artifacts, "nothing to measure: give artifacts=[<folder>,...] or the folders after `slm bench`", out
        )
        _problems_if(self.device not in (None, "cpu", "cuda"), f"device={self.device!r}: choose cpu, cuda or null", out)
        out += self.bench.problems("bench")
        return out


@dataclass
class ReportStageConfig:
    """`slm report`: one table, report.md/.json and a plot for artifacts and their whole lineage."""

    stage: str = "report"  # which stage this config drives
    artifacts: Union[list[str], str] = field(default_factory=list)  # artifact folders (or a pipeline's output_root); parents are found via slm.json
    title: str = "slm report"  # heading of report.md and the plot
    evaluate: bool = True  # score every artifact on the test split of the lineage's task data (completion CE, exact match/AUC); false = recorded numbers only
    output_dir: str = "outputs/report/results"  # report.md, report.json and report.png are written here
    overwrite: Union[bool, str] = False  # true: replace an existing output_dir that slm wrote | force: replace whatever is there

    def problems(self, where: str = "") -> list[str]:
        out: list[str] = []
        _output_problems(self, out)
        _problems_if(
            not self.artifacts, "nothing to report: give artifacts=[<folder>,...] or the folders after `slm report`", out
        )
        return out


PRUNE_METHODS = ("osscar", "activation", "wanda_sp", "magnitude")  # slm_cli/prune/solver.py METHODS
PRUNE_DEPTH_METHODS = ("block_influence",)  # slm_cli/prune/calibrate.py DEPTH_METHODS
PRUNE_CORRECTIONS = ("residual", "sublayer", "none")  # slm_cli/prune/calibrate.py CORRECTIONS


@dataclass
class PruneSettings:
    """What `slm prune` removes (same widths in every layer) and how it chooses.

    The MLP width is set by exactly one of keep_ffn (a fraction), keep_ffn_count (a count) or
    target_params (a total size); two names instead of one number keep `keep_ffn=1` from meaning
    "everything" to one user and "one neuron" to another: an int keep_ffn is refused.
    """

    method: str = "osscar"  # osscar | activation | wanda_sp | magnitude: how kept neurons/heads are chosen (osscar also refits)
    keep_ffn: Annotated[Optional[Union[int, float]], Range(gt=0, le=1, note="a fraction: keep 0 would remove the MLP; for a number of neurons use prune.keep_ffn_count")] = None  # fraction of MLP neurons kept per layer, in (0, 1], e.g. 0.5; null = see keep_ffn_count / target_params, else all
    keep_ffn_count: OptionalPositiveInt = None  # MLP neurons kept per layer, a count (instead of keep_ffn)
    target_params: Annotated[Optional[Union[int, float]], Range(ge=1, note="a number of parameters, e.g. 1e8")] = None  # total parameters wanted (e.g. 1e8): picks the largest keep_ffn_count that fits, after heads and layers
    keep_kv_heads: Annotated[Optional[int], Range(ge=1, note="null = keep all")] = None  # KV heads kept per layer, with their query heads; null = all
    keep_q_per_kv: Annotated[Optional[int], Range(ge=1, note="null = keep all")] = None  # query heads kept per kept KV head (GQA group); null = all
    drop_layers: NonNegativeInt = 0  # whole decoder layers removed (the least useful by depth_method)
    depth_method: str = "block_influence"  # how layers are scored for drop_layers: block_influence (ShortGPT)
    round_to: PositiveInt = 1  # kept MLP width rounded to a multiple of this (e.g. 64 for GPU kernels)
    ridge: Annotated[float, Range(ge=0)] = 0.01  # osscar: damping of the calibration Gram matrix, H + ridge * mean(diag H) * I
    local_search_iters: Annotated[int, Range(ge=0, note="0 = greedy only")] = 16  # osscar: at most this many improving swaps per layer after the greedy (0 = greedy only)
    swap_candidates: PositiveInt = 32  # osscar: pruned groups tried per swap
    greedy_steps: PositiveInt = 64  # osscar: removal steps of the greedy phase (more = closer to one-at-a-time)
    correction: str = "residual"  # osscar: what each refit reconstructs on the pruned model's inputs: residual (the dense model's residual stream: corrects earlier layers' error) | sublayer (the dense model's o_proj/down_proj output) | none (the layer's own weights)

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        _problems_if(
            self.method not in PRUNE_METHODS, f"{where}.method={self.method!r}: choose one of {', '.join(PRUNE_METHODS)}", out
        )
        _problems_if(
            self.depth_method not in PRUNE_DEPTH_METHODS,
            f"{where}.depth_method={self.depth_method!r}: choose one of {', '.join(PRUNE_DEPTH_METHODS)}",
            out,
        )
        _problems_if(
            self.correction not in PRUNE_CORRECTIONS,
            f"{where}.correction={self.correction!r}: choose one of {', '.join(PRUNE_CORRECTIONS)}",
            out,
        )
        if isinstance(self.keep_ffn, int):
            out.append(
                f"{where}.keep_ffn={self.keep_ffn} is an integer, but keep_ffn is the fraction of MLP neurons kept: "
                f"write {where}.keep_ffn={float(self.keep_ffn)} for a fraction, or {where}.keep_ffn_count={self.keep_ffn} "
                "for a number of neurons"
            )
        if self.target_params is not None:
            _problems_if(
                float(self.target_params) != int(self.target_params),
                f"{where}.target_params={self.target_params} must be a whole number of parameters >= 1, e.g. 1e8",
                out,
            )
        given = [n for n in ("keep_ffn", "keep_ffn_count", "target_params") if getattr(self, n) is not None]
        _problems_if(
            len(given) > 1,
            f"{where}: set only one of {', '.join(given)} (each fixes the MLP width); null the others",
            out,
        )
        _problems_if(
            self.keep_ffn_count is not None and self.round_to > 1 and self.keep_ffn_count % self.round_to != 0,
            f"{where}.keep_ffn_count={self.keep_ffn_count} is not a multiple of {where}.round_to={self.round_to}",
            out,
        )
        return out


@dataclass
class PruneCalibrationConfig:
    """Calibration text for `slm prune`: the first samples*seq_len tokens of a source's calibration text."""

    source: str = "auto"  # auto: the task data in the source artifact's slm.json (else the kjv corpus, with a warning) | a task, corpus, .txt/.jsonl/... file or folder: a task's validation split, a corpus' calibration split, all of a file
    samples: PositiveInt = 128  # N: sequences (BENCHMARKS.md "OSSCAR at its best": SmolLM2 at keep_ffn 0.5 held-out ppl 17.5 / 15.7 / 14.7 / 14.1 at 32 / 64 / 128 / 256)
    seq_len: PositiveInt = 256  # L: tokens per sequence (the first N*L tokens of the split, cut into N rows)
    batch_size: PositiveInt = 8  # sequences per forward pass

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        _problems_if(not self.source, f"{where}.source is empty: name a corpus, task or data file", out)
        return out


@dataclass
class PruneEvalConfig(QuantEvalConfig):
    """Perplexity of the source and of the saved pruned checkpoint on the same held-out text (test split),
    and how often their greedy continuations of prompts from that text repeat themselves."""

    # prompts greedily answered by both models (0 = skip): a chat model (its tokenizer has a chat template) gets up to
    # 8 built-in general questions in its template; any other model, prompts of 64 test tokens, evenly spaced
    repetition_prompts: NonNegativeInt = 8
    repetition_tokens: PositiveInt = 128  # new tokens per prompt; the figure is the share of repeated 4-grams among them


@dataclass
class PruneStageConfig:
    """`slm prune`: structured pruning (OSSCAR or a baseline) of an artifact into a smaller standard checkpoint."""

    stage: str = "prune"  # which stage this config drives (set by the stage's YAML)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="???"))  # the artifact to prune: model.name_or_path=<folder> (dtype: the compute dtype of statistics, solver and perplexity; the checkpoint is saved in the source's own dtype)
    seed: Seed = 0  # fixes the records drawn from built-in tasks for calibration and evaluation
    output_dir: str = "outputs/artifact"  # artifact folder written on success (refused if it exists, unless overwrite)
    overwrite: Union[bool, str] = False  # true: replace an existing output_dir that slm wrote | force: replace whatever is there
    threads: OptionalPositiveInt = None  # torch CPU threads; null = torch's default
    prune: PruneSettings = field(default_factory=PruneSettings)
    calibration: PruneCalibrationConfig = field(default_factory=PruneCalibrationConfig)
    eval: PruneEvalConfig = field(default_factory=PruneEvalConfig)

    def problems(self, where: str = "") -> list[str]:
        out: list[str] = []
        _output_problems(self, out)
        out += _weights_problems(self.model, "prune")
        out += self.prune.problems("prune") + self.calibration.problems("calibration") + self.eval.problems("eval")
        return out


def _weights_problems(model: ModelConfig, stage: str) -> list[str]:
    """The checks for a stage that reads a trained model (prune, quantize, eval): weights, not an architecture."""
    out = model.problems("model")
    _problems_if(
        not model.name_or_path,
        f"slm {stage} reads a trained model: give model.name_or_path=<artifact folder or hub id> "
        "(or a model preset with weights, e.g. model=smollm2-135m-instruct)",
        out,
    )
    return out


STAGE_SCHEMAS = {
    "teacher": TeacherStageConfig,
    "student": StudentStageConfig,
    "distill": DistillStageConfig,
    "quantize": QuantizeStageConfig,
    "prune": PruneStageConfig,
    "run": RunStageConfig,
    "bench": BenchStageConfig,
    "report": ReportStageConfig,
}


EVAL_METRICS = ("auto", "perplexity", "exact_match", "auc", "completion_ce")
EVAL_SPLITS = ("test", "validation")


@dataclass
class EvalSettings:
    """What `slm eval` measures, on which split, and how."""

    metric: str = "auto"  # auto: perplexity for text, exact_match for a generative task, auc for a predictive one | perplexity | exact_match | auc | completion_ce (cross-entropy of the completions, as training and slm report measure it)
    split: str = "test"  # split scored: test | validation (a corpus' validation split is its calibration text)
    batch_size: PositiveInt = 8  # sequences per forward pass or generate call
    dtype: Optional[str] = None  # weights dtype for evaluation: float32 | bfloat16 | float16; null = model.dtype
    max_new_tokens: PositiveInt = 64  # exact_match: generation budget per example (greedy, KV cache)
    few_shot: NonNegativeInt = 0  # exact_match: solved train examples put before each prompt (built-in tasks; 0 = zero-shot)
    stop: list[str] = field(default_factory=lambda: ["\n\n"])  # exact_match: generation also stops at these strings
    chat: bool = False  # exact_match: send each prompt (with its shots) as a user turn of the chat template (instruct models)
    window: Annotated[int, Range(ge=2)] = 512  # perplexity: tokens per forward pass (the context limit)
    stride: PositiveInt = 256  # perplexity: new tokens scored per window (< window); each has >= window - stride tokens of context
    max_tokens: Annotated[Optional[int], Range(ge=2)] = None  # perplexity: score the first N tokens of the text only (null = all)
    write_to_artifact: bool = False  # also merge the metrics into <artifact>/slm.json under metrics.eval

    def problems(self, where: str) -> list[str]:
        out: list[str] = []
        _problems_if(self.metric not in EVAL_METRICS, f"{where}.metric={self.metric!r}: choose one of {', '.join(EVAL_METRICS)}", out)
        _problems_if(self.split not in EVAL_SPLITS, f"{where}.split={self.split!r}: choose test or validation", out)
        _problems_if(
            self.dtype is not None and self.dtype not in DTYPES,
            f"{where}.dtype={self.dtype!r}: choose one of {', '.join(DTYPES)} or null",
            out,
        )
        _problems_if(
            self.stride >= self.window,
            f"{where}.stride={self.stride} must be in [1, window - 1] (window={self.window}): each window keeps at least "
            f"one token of context before the tokens it scores; e.g. {where}.stride={max(1, self.window // 2)}",
            out,
        )
        _problems_if(any(not s for s in self.stop), f"{where}.stop has an empty string (it would stop at once)", out)
        return out


@dataclass
class EvalStageConfig:
    """`slm eval`: perplexity, exact match or AUC of a model on a task, corpus or file."""

    stage: str = "eval"  # which stage this config drives
    seed: Seed = 0  # fixes generated task examples and the few-shot examples
    output_dir: str = "outputs/eval/results"  # eval.json and predictions.jsonl are written here
    overwrite: Union[bool, str] = False  # true: replace an existing output_dir that slm wrote | force: replace whatever is there
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="???"))  # what to evaluate: model.name_or_path=<folder or hub id>, or model=NAME
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)

    @property
    def launcher(self) -> LauncherConfig:
        """Evaluation runs in one process; `run_stage` asks every stage for its launcher."""
        return LauncherConfig()

    def problems(self, where: str = "") -> list[str]:
        out: list[str] = []
        _output_problems(self, out)
        out += _weights_problems(self.model, "eval")
        out += self.data.problems("data") + self.eval.problems("eval")
        return out


STAGE_SCHEMAS["eval"] = EvalStageConfig
