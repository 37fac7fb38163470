"""Run configuration: one small dataclass per stage, merged from defaults <- profile <- key=value.

    cfg = load_config(["profile=phone", "student.layers=12", "quantize.gguf=[Q8_0,Q4_K_M]"])

Unknown keys and profiles are errors that name the closest valid one. Every key is a field made by
keys.key(default, help, choices=..., ge=..., lt=...): validate() checks the choices and ranges from
it, and `compress ls keys` and README's key table (keys_markdown) print it.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .errors import UserError, closest
from .formats import LAYOUTS, export_types, quant_types, size_target
from .keys import check_key, key, markdown, walk

BUILTIN_TEACHER = "builtin:smollm2-135m-instruct"


ONNX_PRECISIONS, ONNX_QUANTS, BNB_QUANTS = export_types("onnx"), quant_types("onnx"), quant_types("bnb")
DEPTH_METRICS = ("block_influence", "loss")   # how prune scores layers (student/importance.py)
# Pipeline order; each is a declared stage (compress/stage.py) that `stages=[...]` can redo.
STAGES = ["teacher", "data", "student", "prune", "distill", "export", "imatrix", "sensitivity", "quantize",
          "qad", "layout", "reference", "evaluate", "samples"]
# `student=path` is shorthand for `student.model=path`.
SHORTHANDS = {"student": "student.model"}


@dataclass
class Device:
    """Facts about the target device, used for budgets and labelled estimates."""
    name: str = key("this host", "the device's name in the report")
    threads: int = key(4, "CPU threads the model runs with on the device")
    ram_mb: int = key(8192, "the device's memory, MB")
    bandwidth_gbs: float = key(25.0, "sustained memory bandwidth, GB/s: bounds decode speed")
    compute_gflops: float = key(200.0, "sustained fp16/int8 matmul throughput, GFLOP/s: bounds prefill speed")


@dataclass
class Budgets:
    """What an artifact must meet to be shippable on the device; None means no limit."""
    max_size_mb: float | None = key(None, "largest shippable file size, MB; null: no limit")
    max_peak_rss_mb: float | None = key(None, "largest peak memory (RSS) while running, MB; null: no limit")
    min_decode_tps: float | None = key(None, "slowest acceptable decode speed, tokens/s; null: no limit")
    max_kld: float | None = key(None, "largest mean KL(teacher || artifact), nats/token; null: no limit")


@dataclass
class Student:
    """The student: a given model, or a subset of the teacher's layers."""
    model: str | None = key(None, "an HF id/dir sharing the teacher's tokenizer (or student=...); "
                                  "null: derived from the teacher")
    layers: int | None = key(None, "keep this many of the teacher's layers; null: all", ge=1)
    select: str = key("importance", "which layers to keep: by importance (block influence) or evenly spaced",
                      choices=("importance", "even"))


@dataclass
class Prune:
    """Structured pruning targets; any set target replaces the layer-subset student."""
    layers: int | None = key(None, "decoder layers to keep (depth)")
    mlp: int | None = key(None, "MLP intermediate width to keep")
    heads: int | None = key(None, "attention (query) heads to keep; KV groups stay consistent")
    hidden: int | None = key(None, "hidden/embedding width to keep")
    params: str | None = key(None, "overall target: a fraction of the teacher's non-embedding parameters like 0.5, "
                                   "or a total like 60M")
    depth_metric: str = key("block_influence", "how the layers to drop are scored", choices=DEPTH_METRICS)
    multiple: int = key(32, "round pruned widths down to a multiple of this (256 lets GGUF k-quants apply)", ge=1)
    calib_tokens: int = key(2048, "calibration tokens the importance scores are measured on")


@dataclass
class Gen:
    """Built-in data: the teacher answers built-in prompts (used when data= is not given)."""
    prompts: int = key(120, "built-in prompts the teacher answers")
    max_new_tokens: int = key(256, "longest answer, tokens")
    temperature: float = key(0.7, "the teacher's sampling temperature")
    top_p: float = key(0.9, "the teacher's nucleus sampling p")
    heldout: float = key(0.15, "fraction of examples never trained on (the evaluation text)", gt=0, lt=1)
    seed: int = key(0, "sampling and split seed")


@dataclass
class Distill:
    """Training the student on the teacher (see Distillation)."""
    tokens: int = key(20_000, "training tokens seen (sum over steps); 0 skips training", ge=0)
    seq_len: int = key(256, "tokens per training sequence", ge=8)
    batch: int = key(4, "sequences per optimizer step (after accumulation)", ge=1)
    grad_accum: int = key(1, "micro-batches accumulated into one optimizer step", ge=1)
    lr: float = key(2e-4, "peak learning rate (AdamW)", gt=0, lt=1)
    warmup: float = key(0.1, "fraction of steps that warm the learning rate up", ge=0, lt=1)
    loss: str | None = key(None, "weighted loss terms, e.g. fkl:0.9,ce:0.1 (distill/spec.py); null: the alpha mix")
    alpha: float | None = key(None, "default loss: alpha * T^2 * fkl + (1 - alpha) * CE; null means 0.9", ge=0, le=1)
    alpha_end: float | None = key(None, "where distill.schedule moves alpha; null keeps alpha constant", ge=0, le=1)
    temperature: float = key(2.0, "softmax temperature T of the tempered KD terms", gt=0)
    temperature_end: float | None = key(None, "where distill.schedule moves the temperature; null keeps it constant",
                                        gt=0)
    schedule: str = key("linear", "how alpha and temperature move to their *_end values",
                        choices=("constant", "linear", "cosine"))
    beta: float = key(0.5, "generalized JSD's beta (0: forward KL, 1: reverse KL)", ge=0, le=1)
    top_k: int = key(64, "K of the topk term when it reads the live teacher", ge=1, le=1024)
    chunk: int = key(256, "tokens per chunk of the memory-efficient loss (lm_head + loss)", ge=1)
    activation_checkpointing: bool = key(False, "recompute the student's layer activations in backward: "
                                                "less memory, about 1/3 more compute")
    teacher_cache: str | None = key(None, "topk:K: the teacher's top-K computed once, memory-mapped; "
                                          "no resident teacher")
    teachers: list | None = key(None, "more teachers (HF ids/dirs) averaged with teacher= over a shared vocabulary")
    teacher_weights: list | None = key(None, "weights of teacher= then distill.teachers; null: equal")
    mode: str = key("logits", "logits (the teacher's distributions), seqkd (train on verified teacher samples) "
                              "or onpolicy (GKD: the student samples, see lmbda)",
                    choices=("logits", "seqkd", "onpolicy"))
    lmbda: float = key(0.5, "onpolicy: share of micro-batches whose second half the student samples", ge=0, le=1)
    prompts: str | None = key(None, "seqkd: .jsonl of prompt/question (+ answer); null: built-in prompts")
    samples: int = key(4, "seqkd: teacher candidates per prompt", ge=1)
    verifier: str = key("format", "seqkd: exact (final answer, e.g. gsm8k '#### 42', plus format), "
                                  "format (finished, not repetitive) or none", choices=("exact", "format", "none"))
    max_words: int = key(400, "seqkd: longer candidates are rejected", ge=1)
    checkpoint_every: int = key(20, "optimizer steps between atomic checkpoints", ge=1)
    parallel: str = key("ddp", "under torchrun: ddp (every rank holds the student) or fsdp (layers sharded "
                               "across ranks)", choices=("ddp", "fsdp"))
    seed: int = key(0, "training seed")


@dataclass
class Export:
    """Unquantized files every quantized artifact starts from."""
    gguf: str | None = key("F16", "F16, BF16 or F32: the unquantized GGUF every GGUF quant starts from; null: none")
    onnx: str | None = key(None, "an ONNX decoder with KV cache (onnxruntime, browser; int8/int4 go in "
                                 "quantize.onnx); null: none", choices=ONNX_PRECISIONS)
    layout: str | None = key(None, "also lay the ONNX artifacts out as one browser model dir (needs export.onnx)",
                             choices=LAYOUTS)


@dataclass
class Quantize:
    """Quantized artifacts of the student, and of the teacher as the baseline."""
    gguf: list = key(["Q8_0", "Q4_K_M", "Q4_0"], "llama.cpp types to build (compress ls formats), and size "
                                                 "targets: auto (budgets.max_size_mb), auto:80MB, auto:30% "
                                                 "(a type per tensor, see Auto mix); [] builds no GGUF")
    imatrix: bool = key(True, "GGUF quants use an importance matrix from the calibration (training) data")
    imatrix_tokens: int = key(4096, "tokens the importance matrix is computed on", ge=1)
    mix_tokens: int = key(512, "train tokens the auto mix's sensitivity (a forward and backward pass) is "
                                "measured on", ge=1)
    teacher: bool = key(True, "also quantize the teacher itself (teacher-gguf-*, teacher-onnx-*, "
                              "teacher-bnb-*): the baseline to beat")
    onnx: list = key([], "ONNX weight-only types (MatMulNBits) built from the fp32 ONNX (needs export.onnx)",
                     choices=ONNX_QUANTS)
    onnx_block: int | None = key(None, "MatMulNBits block size; null: the largest of 128/64/32/16 that fits",
                                 choices=(16, 32, 64, 128, 256))
    bnb: list = key([], "bitsandbytes HF artifacts (GPU servers)", choices=BNB_QUANTS)


# A GGUF type's tensors of a tunable block type are tuned (quantize/blocks.py: Q4_0, Q4_1, Q5_0,
# Q5_1, Q8_0 and the K-quants Q2_K to Q6_K), others kept; int4 is ONNX MatMulNBits (qad_onnx.py).
QAD_TYPES = quant_types("gguf") + ("int4",)
QAD_MODELS = ("teacher", "student")


@dataclass
class Qad:
    """Quantization-aware distillation: a low-bit file's block scales trained against the teacher."""
    types: list = key([], "quantized types whose plain file gets a tuned sibling <artifact>-qad: GGUF types, "
                          "int4 for ONNX (built for it when quantize.* does not list it)", choices=QAD_TYPES)
    of: list = key(["teacher", "student"], "whose files are tuned: the teacher's quants, the distilled "
                                           "student's, or both", choices=QAD_MODELS)
    tokens: int = key(16384, "training tokens (steps x batch x seq_len) from the train split, cycled when "
                             "it is shorter", ge=1)
    seq_len: int = key(256, "tokens per training sequence", ge=8)
    batch: int = key(1, "sequences per step", ge=1)
    lr: float = key(1e-3, "Adam learning rate of the relative scale changes", gt=0, lt=1)
    checkpoint_every: int = key(10, "steps between atomic checkpoints", ge=1)
    sampled: float = key(0.5, "fraction of the training sequences the teacher writes itself from a random "
                              "first token instead of the train split (reaches beyond the data's domain)",
                         ge=0, lt=1)
    hidden: float = key(200.0, "weight of the term pulling each layer's hidden states towards the teacher's, "
                               "added to the KL when the tuned file is the teacher's own quantized copy (a "
                               "student's trains on the KL alone); 0: KL alone", ge=0)


@dataclass
class Eval:
    """Measuring every artifact in the runtime it ships in, against the teacher."""
    threads: int | None = key(None, "threads for speed measurements; null: the profile's device threads, "
                                    "capped by host cores", ge=1)
    seqs: int = key(16, "held-out sequences for ppl / KLD / top-1", ge=1)
    seq_len: int = key(128, "tokens per evaluation sequence", ge=2)
    prefill_tokens: int = key(128, "prompt tokens of the speed measurement", ge=1)
    decode_tokens: int = key(32, "generated tokens of the speed measurement", ge=1)
    memory: bool = key(True, "measure peak RSS in a separate process")
    tasks: list = key([], "lm-eval task names, e.g. [arc_easy,copa] (see Benchmark tasks)")
    limit: int | None = key(None, "documents per task; the first N, same for every artifact; null: all", ge=1)
    num_fewshot: int | None = key(None, "few-shot examples per prompt; null: the task's default, usually 0", ge=0)
    include_path: str | None = key(None, "a folder of your own lm-eval task YAMLs (they override same-named ones)")
    task_data: str | None = key(None, "a folder of local benchmark files for the shipped task YAMLs (offline)")
    ood: str | None = key("builtin", "out-of-domain text: builtin (Python stdlib source), a .txt/.jsonl, or none")
    ood_seqs: int = key(8, "out-of-domain sequences of eval.seq_len tokens (a robustness check, not the headline)",
                        ge=1)


@dataclass
class Samples:
    """A few held-out prompts answered by every artifact, shown side by side in the report."""
    prompts: int = key(5, "held-out prompts every artifact answers (greedy, in its own runtime, the teacher's "
                          "chat template); 0: none", ge=0)
    tokens: int = key(48, "most tokens per sample answer", ge=1)


@dataclass
class RunConfig:
    """One run: what to compress, where to write it, and every stage's section."""
    name: str | None = key(None, "run directory name under out; null: profile + time")
    profile: str | None = key(None, "a shipped profile (compress ls profiles) or a YAML file, which may say "
                                    "inherits: phone")
    teacher: str = key(BUILTIN_TEACHER, "the built-in teacher, an HF hub id, a local HF dir, or a .gguf")
    data: str | None = key(None, ".txt, .jsonl or HF dataset name; null: teacher-generated (gen.*)")
    out: str = key("runs", "folder that holds the run directories")
    stages: list | None = key(None, "redo only these stages (others are reused when finished)", choices=STAGES)
    force: bool = key(False, "redo every stage")
    trust_remote_code: bool = key(False, "allow models that ship their own code (refused without it)")
    preflight: bool = key(True, "refuse runs whose RAM/disk estimate exceeds this host")
    device: Device = field(default_factory=Device)
    budgets: Budgets = field(default_factory=Budgets)
    student: Student = field(default_factory=Student)
    prune: Prune = field(default_factory=Prune)
    gen: Gen = field(default_factory=Gen)
    distill: Distill = field(default_factory=Distill)
    export: Export = field(default_factory=Export)
    quantize: Quantize = field(default_factory=Quantize)
    qad: Qad = field(default_factory=Qad)
    eval: Eval = field(default_factory=Eval)
    samples: Samples = field(default_factory=Samples)

    def section(self, name: str) -> dict:
        return dataclasses.asdict(getattr(self, name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name


def keys_markdown() -> str:
    """README's key table: every key with its default, values and help (tests keep README in sync)."""
    return markdown(RunConfig)


# ---------------------------------------------------------------- profiles

def profiles_dir() -> Path:
    """Shipped profiles: package data after `pip install .`, the top-level folder in a checkout."""
    installed = Path(str(resources.files("compress"))) / "profiles"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "profiles"


def list_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def read_profile(spec: str) -> dict:
    path = Path(spec)
    if spec.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise UserError(f"profile file {spec} does not exist; give a path to a YAML file or one of: {', '.join(list_profiles())}")
    else:
        path = profiles_dir() / f"{spec}.yaml"
        if not path.is_file():
            raise UserError(f"unknown profile '{spec}'{closest(spec, list_profiles())}; "
                            f"choose one of: {', '.join(list_profiles())} or give profile=path/to/my.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"profile {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"profile {path} must be a mapping of keys, got {type(data).__name__}")
    base = data.pop("inherits", None)   # a profile may start from another and change a few keys
    return _deep_merge(read_profile(base), data) if base else data


# ---------------------------------------------------------------- key=value parsing

def parse_overrides(args: list[str]) -> dict:
    """['a.b=1', 'q=[x,y]'] -> {'a': {'b': 1}, 'q': ['x', 'y']} with YAML scalars."""
    out: dict = {}
    for arg in args:
        if "=" not in arg:
            raise UserError(f"expected key=value, got '{arg}'; e.g. profile=phone or student.layers=12")
        key, raw = arg.split("=", 1)
        key = SHORTHANDS.get(key.strip(), key.strip())
        value = _parse_value(raw)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"key '{key}' conflicts with an earlier value for '{p}'")
        node[parts[-1]] = value
    return out


def _parse_value(raw: str):
    raw = raw.strip()
    if raw.startswith("[") and raw.endswith("]"):
        return [_parse_value(x) for x in raw[1:-1].split(",") if x.strip()]
    try:
        v = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(v, str):
        try:
            return float(v)   # YAML 1.1 reads 1e-3 as a string; users mean a number
        except ValueError:
            return v
    return v if isinstance(v, (int, float, bool)) or v is None else raw


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------- building the dataclasses

def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise UserError(f"'{prefix.rstrip('.')}' is a section; set its keys, e.g. {prefix}"
                        f"{dataclasses.fields(cls)[0].name}=...")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            valid = [prefix + n for n in fields]
            raise UserError(f"unknown key '{prefix}{key}'{closest(prefix + key, valid)}; "
                            f"valid keys here: {', '.join(valid)}")
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else fields[key].default
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, default if default is not None else _example(fields[key].type))
    return cls(**kwargs)


def _example(annotation) -> object:
    """A typed stand-in for an Optional field's default ('int | None' -> 0) so values get checked."""
    for name, example in (("float", 0.0), ("int", 0), ("list", []), ("str", "")):
        if name in str(annotation):
            return example
    return None


def _coerce(key: str, value, default):
    """Check a value against its default's type; lists accept a single scalar."""
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if float(value) == int(value):
            return int(value)
    elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, str):
        return str(value)
    elif isinstance(default, list):
        return value if isinstance(value, list) else [value]
    raise UserError(f"{key}={value!r} has the wrong type; expected {type(default).__name__} like {default!r}")


def load_config(args: list[str]) -> RunConfig:
    """Merge defaults <- profile <- overrides, validate, and fill the derived name."""
    over = parse_overrides(args)
    profile = over.get("profile")
    merged = _deep_merge(read_profile(str(profile)), over) if profile else over
    if profile:
        merged["profile"] = str(profile)
    cfg = _build(RunConfig, merged)
    validate(cfg)
    if not cfg.name:
        stem = Path(cfg.profile).stem if cfg.profile else "run"
        cfg.name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


# Keys whose message says more than the generic one (e.g. what the value means); the limits
# still come from the field: {key}, {value}, {range} and {choices} are filled in.
WORDING = {
    "distill.alpha_end": "{key}={value} is out of range: distill.alpha must be {range}, "
                         "and so must its schedule target",
    "distill.temperature_end": "{key}={value} is out of range: the temperature must be {range}, "
                               "and so must its schedule target",
    "distill.seq_len": "{key}={value} is out of range; use {key} {range}",
    "distill.lmbda": "{key}={value} is out of range; use {key} {range}",
    "distill.beta": "{key}={value} must be {range} (0: forward KL, 1: reverse KL)",
    "student.layers": "{key}={value} is out of range; student.layers must be at least 1",
    "eval.limit": "{key}={value} is out of range; eval.limit and eval.ood_seqs must be >= 1 (unset: every document)",
    "quantize.onnx_block": "{key}={value} must be {choices} (or unset to pick one)",
}


def check_qad(cfg: RunConfig) -> None:
    """qad.types tunes files the run builds (a type quantize.* does not list is built for it): the
    unquantized file each starts from must be exported."""
    for t in cfg.qad.types:
        if t == "int4" and cfg.export.onnx is None:
            raise UserError("qad.types=[int4] tunes the ONNX INT4 file, which starts from the fp32 ONNX; "
                            "add export.onnx=fp32 or drop int4 from qad.types")
        if t != "int4" and cfg.export.gguf is None:
            raise UserError(f"qad.types=[{t}] tunes a GGUF file, which starts from the unquantized GGUF; "
                            f"set export.gguf=F16 or drop {t} from qad.types")
    if len(set(cfg.qad.types)) < len(cfg.qad.types):
        raise UserError(f"qad.types={list(cfg.qad.types)} lists a type twice; list each once")
    q = cfg.qad
    if q.types:
        check_qad_budget(q)
    if q.types and not cfg.quantize.teacher and list(q.of) == ["teacher"]:
        raise UserError("qad.of=[teacher] tunes the teacher's quantized files, which quantize.teacher=false "
                        "does not build; set quantize.teacher=true or qad.of=[student]")


def check_qad_budget(q: Qad) -> None:
    if q.tokens < q.seq_len * q.batch:
        raise UserError(f"qad.tokens={q.tokens} is less than one step of qad.seq_len x qad.batch = "
                        f"{q.seq_len * q.batch} tokens; give qad.tokens>={q.seq_len * q.batch}")


def plain_types(cfg: RunConfig, fmt: str, model: str) -> list:
    """The plain types a model's `fmt` branch quantizes: quantize.<fmt>, then those qad.types adds."""
    listed = [str(q) for q in getattr(cfg.quantize, fmt)]
    extra = [t for t in cfg.qad.types if model in cfg.qad.of and (t == "int4") == (fmt == "onnx")]
    return listed + [t for t in extra if t not in listed]


def validate(cfg: RunConfig) -> None:
    """Every key against its field's choices and range, then the checks that span keys."""
    for name, f in walk(RunConfig):
        check_key(name, f, functools.reduce(getattr, name.split("."), cfg), WORDING.get(name))
    if cfg.name and (("/" in cfg.name) or ("\\" in cfg.name) or cfg.name in (".", "..") or cfg.name.startswith(".")):
        raise UserError(f"name='{cfg.name}' must be a plain directory name (no path separators, not hidden)")
    from .distill.spec import check as check_distill   # torch-free: loss terms, cache, teachers
    check_distill(cfg.distill)
    e = cfg.eval
    if e.ood not in (None, "builtin", "none") and not Path(e.ood).expanduser().is_file():
        raise UserError(f"eval.ood={e.ood} is not a file; give a .txt or .jsonl of out-of-domain text, "
                        f"builtin (Python's own source code) or none")
    if cfg.quantize.onnx and cfg.export.onnx is None:
        raise UserError("quantize.onnx needs the fp32 ONNX it starts from; add export.onnx=fp32")
    if cfg.export.layout is not None and cfg.export.onnx is None:
        raise UserError("export.layout=transformers.js lays out ONNX files; add export.onnx=fp32")
    check_qad(cfg)
    if cfg.export.gguf is None:
        if cfg.quantize.gguf:
            raise UserError("quantize.gguf needs the unquantized GGUF it starts from; set export.gguf=F16 "
                            "or quantize.gguf=[]")
        return
    UNQUANTIZED, QUANTIZED = export_types("gguf"), quant_types("gguf")
    autos = [str(q) for q in cfg.quantize.gguf if size_target(q) is not None]   # bad sizes fail here
    for which, names in (("export.gguf", [cfg.export.gguf]), ("quantize.gguf", cfg.quantize.gguf)):
        for n in map(str, names):
            if n not in UNQUANTIZED + QUANTIZED + tuple(autos):
                hint = " (a size target is auto, auto:80MB or auto:30%)" if n.startswith("auto") else ""
                raise UserError(f"unknown GGUF type {which}={n}{closest(n, UNQUANTIZED + QUANTIZED)}{hint}; "
                                f"supported: {', '.join(UNQUANTIZED + QUANTIZED)} and auto")
    if str(cfg.export.gguf) not in UNQUANTIZED:
        raise UserError(f"export.gguf={cfg.export.gguf} is a quantized type; export writes one of "
                        f"{', '.join(UNQUANTIZED)} and quantize.gguf=[...] lists the quantized types")
    for q in cfg.quantize.gguf:
        if str(q) not in QUANTIZED + tuple(autos):
            raise UserError(f"quantize.gguf lists {q}, which is not a quantized type; it is made by "
                            f"export.gguf={q}: drop it from quantize.gguf")
    if len(set(map(str, cfg.quantize.gguf))) < len(cfg.quantize.gguf):
        raise UserError(f"quantize.gguf={list(cfg.quantize.gguf)} lists a type twice; list each once")
    if "auto" in autos and cfg.budgets.max_size_mb is None:
        raise UserError("quantize.gguf=auto sizes the mix to budgets.max_size_mb, which is not set; "
                        "set budgets.max_size_mb=120 or write auto:120MB")


def resolved_threads(cfg: RunConfig) -> int:
    """Threads for measurements: eval.threads or the device's, never more than this host's cores."""
    return max(1, min(int(cfg.eval.threads or cfg.device.threads), host_cores()))


def host_cores() -> int:
    """Cores this process may run on (CPU affinity and container limits included where the OS says)."""
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
