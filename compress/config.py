"""Run configuration: one small dataclass per stage, merged from defaults <- profile <- key=value.

    cfg = load_config(["profile=phone", "student.layers=12", "quantize.gguf=[Q8_0,Q4_K_M]"])

Unknown keys and profiles are errors that name the closest valid one.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .errors import UserError, closest

BUILTIN_TEACHER = "builtin:smollm2-135m-instruct"


@dataclass
class Device:
    """Facts about the target device, used for budgets and labelled estimates."""
    name: str = "this host"
    threads: int = 4
    ram_mb: int = 8192
    bandwidth_gbs: float = 25.0     # sustained memory bandwidth: bounds decode speed
    compute_gflops: float = 200.0   # sustained fp16/int8 matmul throughput: bounds prefill speed


@dataclass
class Budgets:
    """What an artifact must meet to be shippable on the device; None means no limit."""
    max_size_mb: float | None = None
    max_peak_rss_mb: float | None = None
    min_decode_tps: float | None = None
    max_kld: float | None = None        # mean KL(teacher || artifact), nats/token


@dataclass
class Student:
    model: str | None = None        # an HF id/dir sharing the teacher's tokenizer; else derived
    layers: int | None = None       # keep this many of the teacher's layers
    select: str = "importance"      # importance (block influence) | even


@dataclass
class Prune:
    """Structured pruning targets; any set target replaces the layer-subset student."""
    layers: int | None = None       # decoder layers to keep (depth)
    mlp: int | None = None          # MLP intermediate width to keep
    heads: int | None = None        # attention (query) heads to keep; KV groups stay consistent
    hidden: int | None = None       # hidden/embedding width to keep
    params: str | None = None       # overall target: a fraction like 0.5 or an absolute like 60M
    depth_metric: str = "block_influence"   # block_influence | loss
    multiple: int = 32              # round widths to this (256 lets GGUF k-quants apply)
    calib_tokens: int = 2048


@dataclass
class Gen:
    """Built-in data: the teacher answers built-in prompts (used when data= is not given)."""
    prompts: int = 120
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    heldout: float = 0.15           # fraction of examples never trained on
    seed: int = 0


@dataclass
class Distill:
    tokens: int = 20_000            # training tokens seen (sum over steps)
    seq_len: int = 256
    batch: int = 4                  # sequences per optimizer step (after accumulation)
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: float = 0.1             # fraction of steps
    loss: str | None = None         # weighted terms, e.g. "fkl:0.9,ce:0.1" (distill/spec.py); None: the alpha mix
    alpha: float | None = None      # default loss: alpha * T^2 * fkl + (1 - alpha) * CE; None means 0.9
    alpha_end: float | None = None  # schedule target; None keeps alpha constant
    temperature: float = 2.0
    temperature_end: float | None = None
    schedule: str = "linear"        # how alpha/temperature move to their *_end values: constant | linear | cosine
    beta: float = 0.5               # generalized JSD's beta (0: forward KL, 1: reverse KL)
    top_k: int = 64                 # K of the topk term when it reads the live teacher
    chunk: int = 256                # tokens per chunk of the memory-efficient loss (lm_head + loss)
    activation_checkpointing: bool = False   # recompute the student's layer activations in backward: less memory, ~1/3 more compute
    teacher_cache: str | None = None   # "topk:K": teacher top-k computed once, memory-mapped; no resident teacher
    teachers: list | None = None    # more teachers (HF ids/dirs) averaged with teacher= over a shared vocabulary
    teacher_weights: list | None = None   # weights of teacher= then distill.teachers; None: equal
    mode: str = "logits"            # logits | seqkd (train on verified teacher samples) | onpolicy (GKD lambda)
    lmbda: float = 0.5              # onpolicy: share of micro-batches whose second half the student samples
    prompts: str | None = None      # seqkd: .jsonl of prompt/question (+ answer); None: built-in prompts
    samples: int = 4                # seqkd: teacher candidates per prompt
    verifier: str = "format"        # seqkd: exact (final answer, e.g. gsm8k '#### 42') | format | none
    max_words: int = 400            # seqkd: longer candidates are rejected
    checkpoint_every: int = 20      # optimizer steps between atomic checkpoints
    parallel: str = "ddp"           # under torchrun: ddp (every rank holds the student) | fsdp (layers sharded across ranks)
    seed: int = 0


@dataclass
class Export:
    gguf: str | None = "F16"        # F16 | BF16 | F32: the unquantized GGUF every quant starts from; null: none
    onnx: str | None = None         # fp32: an ONNX decoder with KV cache (onnxruntime, browser); null: none
    layout: str | None = None       # transformers.js: also lay the ONNX artifacts out as one browser model dir


@dataclass
class Quantize:
    gguf: list = field(default_factory=lambda: ["Q8_0", "Q4_K_M", "Q4_0"])
    imatrix: bool = True            # importance matrix from the calibration (training) data
    imatrix_tokens: int = 4096
    teacher: bool = True            # also quantize the teacher itself: the baseline to beat
    onnx: list = field(default_factory=list)    # int8 | int4: MatMulNBits weight-only, from the fp32 ONNX
    onnx_block: int | None = None   # MatMulNBits block size; None: the largest of 128/64/32/16 that fits
    bnb: list = field(default_factory=list)     # int8 | nf4: bitsandbytes HF artifacts (GPU servers)


@dataclass
class Eval:
    threads: int | None = None      # None: the profile's device threads, capped by host cores
    seqs: int = 16                  # held-out sequences for ppl / KLD / top-1
    seq_len: int = 128
    prefill_tokens: int = 128
    decode_tokens: int = 32
    memory: bool = True             # peak RSS in a separate process
    tasks: list = field(default_factory=list)   # lm-eval task names, e.g. [arc_easy, copa]
    limit: int | None = None        # documents per task (None: all); the first N, same for every artifact
    num_fewshot: int | None = None  # few-shot examples per prompt (None: the task's default, usually 0)
    include_path: str | None = None # a folder of your own lm-eval task YAMLs
    task_data: str | None = None    # a folder of local benchmark files for the shipped task YAMLs
    ood: str | None = "builtin"     # out-of-domain text: builtin (Python stdlib source), a .txt/.jsonl, or none
    ood_seqs: int = 8               # out-of-domain sequences of eval.seq_len tokens (a robustness check, not the headline)


@dataclass
class RunConfig:
    name: str | None = None
    profile: str | None = None
    teacher: str = BUILTIN_TEACHER
    data: str | None = None         # .txt | .jsonl | HF dataset name; None: teacher-generated
    out: str = "runs"
    stages: list | None = None      # redo only these stages (others are reused when finished)
    force: bool = False             # redo every stage
    trust_remote_code: bool = False
    preflight: bool = True          # refuse runs whose RAM/disk estimate exceeds this host
    device: Device = field(default_factory=Device)
    budgets: Budgets = field(default_factory=Budgets)
    student: Student = field(default_factory=Student)
    prune: Prune = field(default_factory=Prune)
    gen: Gen = field(default_factory=Gen)
    distill: Distill = field(default_factory=Distill)
    export: Export = field(default_factory=Export)
    quantize: Quantize = field(default_factory=Quantize)
    eval: Eval = field(default_factory=Eval)

    def section(self, name: str) -> dict:
        return dataclasses.asdict(getattr(self, name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name


STAGES = ["teacher", "data", "student", "prune", "distill", "export", "quantize", "evaluate", "layout", "report"]
# `student=path` is shorthand for `student.model=path`.
SHORTHANDS = {"student": "student.model"}


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


def validate(cfg: RunConfig) -> None:
    """Range checks that would otherwise fail deep inside a stage."""
    if cfg.name and (("/" in cfg.name) or ("\\" in cfg.name) or cfg.name in (".", "..") or cfg.name.startswith(".")):
        raise UserError(f"name='{cfg.name}' must be a plain directory name (no path separators, not hidden)")
    d = cfg.distill
    if (d.alpha is not None and not 0.0 <= d.alpha <= 1.0) or (d.alpha_end is not None and not 0.0 <= d.alpha_end <= 1.0):
        raise UserError("distill.alpha must be in [0, 1] (weight of the KD term)")
    if d.temperature <= 0 or (d.temperature_end is not None and d.temperature_end <= 0):
        raise UserError("distill.temperature must be > 0, e.g. distill.temperature=2")
    if not 0 < d.lr < 1:
        raise UserError(f"distill.lr={d.lr} is out of range; use a small positive value like 2e-4")
    if d.schedule not in ("constant", "linear", "cosine"):
        raise UserError(f"distill.schedule='{d.schedule}'{closest(d.schedule, ['constant', 'linear', 'cosine'])}; "
                        f"use constant, linear or cosine")
    from .distill.spec import check as check_distill   # torch-free: loss terms, cache, teachers
    check_distill(d)
    if d.tokens < 0 or d.seq_len < 8 or d.batch < 1 or d.grad_accum < 1:
        raise UserError("distill.tokens must be >= 0, distill.seq_len >= 8, distill.batch and grad_accum >= 1")
    if cfg.student.layers is not None and cfg.student.layers < 1:
        raise UserError("student.layers must be at least 1")
    if cfg.student.select not in ("importance", "even"):
        raise UserError(f"student.select='{cfg.student.select}'{closest(cfg.student.select, ['importance', 'even'])}; use importance or even")
    if not 0 < cfg.gen.heldout < 1:
        raise UserError("gen.heldout must be a fraction in (0, 1), e.g. 0.15")
    if cfg.stages:
        for s in cfg.stages:
            if s not in STAGES:
                raise UserError(f"unknown stage '{s}'{closest(s, STAGES)}; stages are: {', '.join(STAGES)}")
    if not 0 <= d.warmup < 1 or d.checkpoint_every < 1:
        raise UserError("distill.warmup must be a fraction in [0, 1) and distill.checkpoint_every >= 1")
    e = cfg.eval
    if e.seqs < 1 or e.seq_len < 2 or e.prefill_tokens < 1 or e.decode_tokens < 1 or (e.threads is not None and e.threads < 1):
        raise UserError("eval.seqs, eval.prefill_tokens, eval.decode_tokens and eval.threads must be >= 1 "
                        "and eval.seq_len >= 2")
    if (e.limit is not None and e.limit < 1) or (e.num_fewshot is not None and e.num_fewshot < 0) or e.ood_seqs < 1:
        raise UserError("eval.limit and eval.ood_seqs must be >= 1 and eval.num_fewshot >= 0")
    if e.ood not in (None, "builtin", "none") and not Path(e.ood).expanduser().is_file():
        raise UserError(f"eval.ood={e.ood} is not a file; give a .txt or .jsonl of out-of-domain text, "
                        f"builtin (Python's own source code) or none")
    if cfg.quantize.imatrix and cfg.quantize.imatrix_tokens < 1:
        raise UserError("quantize.imatrix_tokens must be >= 1, e.g. 4096 (or quantize.imatrix=false)")
    _validate_onnx_bnb(cfg)
    if cfg.export.gguf is None:
        if cfg.quantize.gguf:
            raise UserError("quantize.gguf needs the unquantized GGUF it starts from; set export.gguf=F16 "
                            "or quantize.gguf=[]")
        return
    from .quantize.types import QUANTIZED, UNQUANTIZED, check_gguf_types   # the single table of formats
    check_gguf_types([cfg.export.gguf], "export.gguf")
    check_gguf_types(cfg.quantize.gguf, "quantize.gguf")
    if str(cfg.export.gguf) not in UNQUANTIZED:
        raise UserError(f"export.gguf={cfg.export.gguf} is a quantized type; export writes one of "
                        f"{', '.join(UNQUANTIZED)} and quantize.gguf=[...] lists the quantized types")
    for q in cfg.quantize.gguf:
        if str(q) not in QUANTIZED:
            raise UserError(f"quantize.gguf lists {q}, which is not a quantized type; it is made by "
                            f"export.gguf={q}: drop it from quantize.gguf")


ONNX_PRECISIONS, ONNX_QUANTS, BNB_QUANTS, LAYOUTS = ("fp32",), ("int8", "int4"), ("int8", "nf4"), ("transformers.js",)


def _validate_onnx_bnb(cfg: RunConfig) -> None:
    e, q = cfg.export, cfg.quantize
    if e.onnx is not None and str(e.onnx) not in ONNX_PRECISIONS:
        raise UserError(f"export.onnx={e.onnx} is not supported; use export.onnx=fp32 (int8/int4 go in quantize.onnx)")
    for key, values, valid in (("quantize.onnx", q.onnx, ONNX_QUANTS), ("quantize.bnb", q.bnb, BNB_QUANTS)):
        for v in values:
            if str(v) not in valid:
                raise UserError(f"{key} lists '{v}'{closest(str(v), list(valid))}; it takes {', '.join(valid)}")
    if q.onnx and e.onnx is None:
        raise UserError("quantize.onnx needs the fp32 ONNX it starts from; add export.onnx=fp32")
    if q.onnx_block is not None and q.onnx_block not in (16, 32, 64, 128, 256):
        raise UserError(f"quantize.onnx_block={q.onnx_block} must be 16, 32, 64, 128 or 256 (or unset to pick one)")
    if e.layout is not None and str(e.layout) not in LAYOUTS:
        raise UserError(f"export.layout={e.layout}{closest(str(e.layout), list(LAYOUTS))}; it takes {', '.join(LAYOUTS)}")
    if e.layout is not None and e.onnx is None:
        raise UserError("export.layout=transformers.js lays out ONNX files; add export.onnx=fp32")


def resolved_threads(cfg: RunConfig) -> int:
    """Threads for measurements: eval.threads or the device's, never more than this host's cores."""
    import os
    want = cfg.eval.threads or cfg.device.threads
    return max(1, min(int(want), os.cpu_count() or 1))
