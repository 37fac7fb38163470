"""Checks before anything is written or loaded: bad paths and files, wrong architectures, no room.

    preflight(cfg)                                  # pipeline.run calls it before making runs/<name>/
    need = estimate(teacher_facts, knobs_of(cfg))   # pure: {"ram_mb", "vram_mb", "disk_mb"}

Each failure is one UserError line that says what to fix; a run that fails here leaves no run
directory behind. Model files are checked from their headers (safetensors, GGUF) without loading
weights or running any of the model's own code. The memory and disk numbers are estimates of the
largest stage's working set and of every file the run writes, compared with what the host has;
when they do not fit, the error names settings that would.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .config import RunConfig
from .errors import UserError
from .formats import bits as fbits

MB = 2**20
# Resident before any weights: Python + torch + transformers + llama.cpp imported measure ~255 MB;
# the rest covers tokenizers, llama.cpp contexts and allocator slack.
OVERHEAD_MB = 500
# fp32 [tokens, V] tensors alive at the peak of one distill step (teacher and student logits,
# tempered log-softmaxes, the CE copy, gradients): measured 7.9-8.1 on a tiny Llama with V=49152.
# The loss runs over at most distill.chunk tokens at a time (distill/kd.py).
LOGIT_COPIES = 8


def preflight(cfg: RunConfig) -> None:
    """Refuse early, before anything is written: missing packages, bad model files and data, no room,
    no write access."""
    check_packages(cfg)
    teacher = model_facts(cfg.teacher, cfg.trust_remote_code, "teacher")
    student = model_facts(cfg.student.model, cfg.trust_remote_code, "student") if cfg.student.model else None
    for facts, what in ((teacher, "teacher"), (student, "student")):
        check_positions(facts, cfg, what)
    layers = (teacher or {}).get("layers")
    if layers and not cfg.student.model and cfg.student.layers and cfg.student.layers > layers:
        raise UserError(f"student.layers={cfg.student.layers} is more than the teacher's {layers} layers; "
                        f"pick 1..{layers}")
    check_data(cfg.data)
    check_text_files(cfg)
    probe = writable_dir(cfg.run_dir)
    if teacher:
        check_room(teacher, student, cfg, probe)


# ---------------------------------------------------------------- optional packages

def check_packages(cfg: RunConfig) -> None:
    """Every optional package a later stage of this config imports, imported now: a missing one
    stops the run with its install line before hours of distillation, not when its stage starts."""
    if cfg.export.onnx:
        from .export.onnx import require
        require(f"export.onnx={cfg.export.onnx}")
    if cfg.quantize.bnb:
        from .quantize.bnb import require
        require()
    if cfg.data and not Path(cfg.data).expanduser().exists() and not cfg.data.endswith((".txt", ".jsonl", ".json")):
        try:   # not a file: an HF dataset name, which the data stage loads with `datasets`
            import datasets  # noqa: F401
        except ImportError:
            raise UserError(f"data={cfg.data} is not a file; to use an HF dataset install it with: "
                            f"pip install datasets") from None


# ---------------------------------------------------------------- model files

def model_facts(spec: str, trust_remote_code: bool, what: str) -> dict | None:
    """{"params", "embed", "layers", "vocab", "positions", "gguf"} of a teacher/student spec, after
    checking its files; None for a hub id (nothing local to check)."""
    from .archs import GGUF_ARCHS
    from .models import BUILTINS, check_gguf, check_local_arch, check_safetensors, resolve_teacher
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTINS:
            raise UserError(f"unknown built-in {what} '{spec}'; available: "
                            + ", ".join(f"builtin:{n}" for n in BUILTINS))
        return dict(BUILTINS[name]["facts"])   # known sizes: no download before the run starts
    path, gguf_file = resolve_teacher(spec, what)
    if gguf_file:
        facts = check_gguf(Path(path) / gguf_file)
        if facts["arch"] not in GGUF_ARCHS:
            raise UserError(f"unsupported architecture '{facts['arch']}' in {spec}; "
                            f"compress supports GGUF files of: {', '.join(GGUF_ARCHS)}")
        return facts
    if not Path(path).is_dir():
        return None
    config = check_local_arch(Path(path), trust_remote_code)
    return {**check_safetensors(Path(path)), "layers": config.get("num_hidden_layers"),
            "vocab": config.get("vocab_size"), "positions": config.get("max_position_embeddings"), "gguf": False}


def check_positions(facts: dict | None, cfg: RunConfig, what: str) -> None:
    limit = (facts or {}).get("positions")
    for key, value in (("distill.seq_len", cfg.distill.seq_len if cfg.distill.tokens else 0),
                       ("eval.seq_len", cfg.eval.seq_len)):
        if limit and value > limit:
            raise UserError(f"{key}={value} is above the {what}'s {limit} positions; use {key}<={limit}")


# ---------------------------------------------------------------- data and output

def check_data(spec: str | None) -> None:
    """A local data file exists, parses and holds some text (HF dataset names are checked later)."""
    if not spec:
        return
    path = Path(spec).expanduser()
    if not path.is_file():
        if spec.endswith((".txt", ".jsonl", ".json")) or path.exists():
            raise UserError(f"data file {spec} does not exist; give a .txt, a .jsonl or an HF dataset name")
        return
    from .data import read_jsonl, read_utf8   # bad bytes and bad JSON lines are errors with their place
    if path.suffix == ".txt":
        if not read_utf8(path).strip():
            raise UserError(f"data {spec} holds no text; give a file with paragraphs (.txt) or rows (.jsonl)")
        return
    has_text = False
    for i, row in enumerate(read_jsonl(path), 1):
        pair = "prompt" in row and ("response" in row or "completion" in row)
        if not (pair or "messages" in row or "text" in row):
            raise UserError(f"row {i} of {spec} has keys {sorted(row)[:5]}; each row needs 'text', "
                            f"'prompt' and 'response', or 'messages'")
        has_text = has_text or bool(row.get("messages") or pair or str(row.get("text", "")).strip())
    if not has_text:
        raise UserError(f"data {spec} holds no text; give a file with paragraphs (.txt) or rows (.jsonl)")


def check_text_files(cfg: RunConfig) -> None:
    """The other files a run reads text from (eval.ood, distill.prompts) are UTF-8 and parse now,
    not when their stage starts after distillation."""
    from .data import read_jsonl, read_utf8
    ood = cfg.eval.ood
    if ood not in (None, "none", "builtin") and Path(ood).expanduser().is_file():
        (read_jsonl if ood.endswith(".jsonl") else read_utf8)(Path(ood).expanduser())
    prompts = cfg.distill.prompts
    if cfg.distill.mode == "seqkd" and prompts and Path(prompts).expanduser().is_file():
        read_jsonl(Path(prompts).expanduser())


def writable_dir(run_dir: Path) -> Path:
    """The nearest existing directory the run will be written under, after a real write test
    (permission bits alone miss read-only mounts and lie for root)."""
    probe = Path(run_dir).expanduser().absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create {run_dir}: {probe} is a file, not a directory; set out=<a directory>")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".compress-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"cannot write to {probe} ({e.strerror}); set out=<a writable directory>") from None
    return probe


# ---------------------------------------------------------------- memory and disk

def knobs_of(cfg: RunConfig, device: str = "cpu") -> dict:
    """The settings the estimate depends on, as plain values (suggestions change these)."""
    d = cfg.distill
    return {"device": device, "tokens": d.tokens, "batch": d.batch, "grad_accum": d.grad_accum,
            "seq_len": d.seq_len, "chunk": d.chunk, "student_layers": cfg.student.layers, "export": cfg.export.gguf,
            "quants": list(cfg.quantize.gguf), "onnx": cfg.export.onnx, "onnx_quants": list(cfg.quantize.onnx),
            "bnb_quants": list(cfg.quantize.bnb), "teacher_quants": bool(cfg.quantize.teacher),
            "eval_seqs": cfg.eval.seqs, "eval_seq_len": cfg.eval.seq_len,
            # under torchrun: processes on this host, and how many ways FSDP splits the student
            "ranks": int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            "shards": int(os.environ.get("WORLD_SIZE", "1")) if d.parallel == "fsdp" else 1}


def student_params(teacher: dict, knobs: dict, student: dict | None = None) -> float:
    """A given student's size, else the teacher's embeddings plus the kept share of its layers."""
    if student:
        return student["params"]
    n, k = teacher.get("layers"), knobs["student_layers"]
    if not n or not k or k >= n:
        return teacher["params"]
    return teacher["embed"] + (teacher["params"] - teacher["embed"]) * k / n


def estimate(teacher: dict, knobs: dict, student: dict | None = None) -> dict:
    """Peak RAM, peak training-device memory (CUDA only) and disk of a whole run, in MB.

    Weights are fp32 (4 bytes) in every torch stage. RAM is the largest stage: loading the teacher
    (a GGUF teacher is de-quantized, then copied: 2x), distillation (teacher weights + student
    weights, gradients and AdamW's two moments = 16 bytes per student weight, plus the logits), or
    evaluation. Disk: three fp32 safetensors (teacher, student, distilled), the training checkpoint
    (student + optimizer), every GGUF, and the teacher's float16 reference log-probs [seqs, L, V].
    Under torchrun every rank on the host loads teacher and student and holds its own training
    state; FSDP splits the student's 16 bytes per weight across all ranks.
    """
    P, S = teacher["params"], student_params(teacher, knobs, student)
    V = teacher.get("vocab") or 32000
    train = knobs["tokens"] > 0
    micro = max(1, knobs["batch"] // knobs["grad_accum"])
    logits = LOGIT_COPIES * min(micro * knobs["seq_len"], knobs["chunk"]) * V * 4
    ranks, shards = knobs.get("ranks", 1), knobs.get("shards", 1)
    distill = (4 * P + 16 * S / shards + logits) if train else 0    # per rank
    held = ranks * (4 * P + 4 * S) if train else 0                   # every rank's loaded models
    load = (8 if teacher.get("gguf") else 4) * P
    evaluate = 4 * P + 3 * knobs["eval_seq_len"] * V * 4
    on_gpu = knobs["device"] == "cuda"
    ram = OVERHEAD_MB * MB + max(load, evaluate, held, 0 if on_gpu else ranks * distill)

    def shipped_bytes(n):   # every shipped format of one model: GGUF, ONNX (fp32 + quants), bitsandbytes
        bits = (fbits("gguf", knobs["export"]) + sum(fbits("gguf", q, 8) for q in knobs["quants"])) if knobs["export"] else 0
        bits += (fbits("onnx", knobs["onnx"]) + sum(fbits("onnx", q) for q in knobs.get("onnx_quants", []))) \
            if knobs.get("onnx") else 0
        bits += sum(fbits("bnb", q) for q in knobs.get("bnb_quants", []))
        return n * bits / 8
    disk = (4 * P + 8 * S + (12 * S if train else 0) + shipped_bytes(S)
            + (shipped_bytes(P) if knobs["teacher_quants"] else 0)
            + knobs["eval_seqs"] * knobs["eval_seq_len"] * V * 2)
    return {"ram_mb": ram / MB, "vram_mb": distill / MB if on_gpu else 0.0, "disk_mb": disk / MB}


def shortfalls(need: dict, have: dict) -> list[str]:
    """'RAM needs ~X MB, Y MB free' for each resource the estimate exceeds."""
    out = []
    for key, label in (("ram_mb", "RAM"), ("vram_mb", "GPU memory"), ("disk_mb", "disk")):
        if have.get(key) is not None and need[key] > have[key]:
            out.append(f"{label} needs ~{need[key]:.0f} MB, {have[key]:.0f} MB free")
    return out


# (config key, knob, new value, resources it lowers), tried in order and cumulatively.
TRIES = [
    ("distill.grad_accum", "grad_accum", lambda k: k["batch"], ("ram_mb", "vram_mb")),   # micro-batch 1
    ("distill.seq_len", "seq_len", lambda k: max(64, k["seq_len"] // 2), ("ram_mb", "vram_mb")),
    ("quantize.teacher", "teacher_quants", lambda k: False, ("disk_mb",)),
    ("quantize.gguf", "quants", lambda k: k["quants"][:1], ("disk_mb",)),
    ("eval.seqs", "eval_seqs", lambda k: min(k["eval_seqs"], 4), ("disk_mb",)),
    # no distillation: teacher and student optimizer are never held together, no checkpoint
    ("distill.tokens", "tokens", lambda k: 0, ("ram_mb", "vram_mb", "disk_mb")),
]


def suggest(teacher: dict, knobs: dict, have: dict, student: dict | None = None) -> list[str] | None:
    """key=value settings that make the estimate fit `have`, or None when none of TRIES does."""
    k, changes = dict(knobs), []
    for key, knob, new_value, lowers in TRIES:
        short = [r for r in ("ram_mb", "vram_mb", "disk_mb")
                 if have.get(r) is not None and estimate(teacher, k, student)[r] > have[r]]
        if not short:
            break
        new = new_value(k)
        if new != k[knob] and set(short) & set(lowers):
            k[knob] = new
            shown = f"[{','.join(new)}]" if isinstance(new, list) else str(new).lower()
            changes.append(f"{key}={shown}")
    return changes if not shortfalls(estimate(teacher, k, student), have) else None


def host_room(probe: Path, run_dir: Path) -> dict:
    """Available RAM, free GPU memory (None without CUDA) and disk, in MB. Artifacts already in the
    run directory count as free: a re-run reuses or replaces them."""
    import psutil
    from .artifacts import dir_size
    existing = dir_size(run_dir) if Path(run_dir).is_dir() else 0
    have = {"ram_mb": psutil.virtual_memory().available / MB,
            "disk_mb": (shutil.disk_usage(probe).free + existing) / MB, "vram_mb": None}
    import torch
    if torch.cuda.is_available():
        have["vram_mb"] = torch.cuda.mem_get_info()[0] / MB
    return have


def check_room(teacher: dict, student: dict | None, cfg: RunConfig, probe: Path) -> None:
    if not cfg.preflight:
        return
    have = host_room(probe, cfg.run_dir)
    knobs = knobs_of(cfg, "cuda" if have["vram_mb"] is not None else "cpu")
    short = shortfalls(estimate(teacher, knobs, student), have)
    if not short:
        return
    fix = suggest(teacher, knobs, have, student)
    hint = (f"try {' '.join(fix)}" if fix else
            "free memory or disk space, set out=<a larger disk>, or use a smaller teacher")
    hint += " (preflight=false skips this check)"
    raise UserError(f"this run does not fit this machine ({'; '.join(short)}, teacher "
                    f"{teacher['params'] / 1e6:.0f}M parameters): {hint}")
