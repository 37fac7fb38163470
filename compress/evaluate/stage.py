"""The evaluate stage: quality, speed and memory of one artifact, each in the artifact's runtime.

    from compress.evaluate import run
    ev = run(cfg, artifacts.load("runs/phone/gguf-Q4_K_M"), Path("runs/phone/eval-gguf-Q4_K_M"),
             teacher=artifacts.load("runs/phone/teacher"), data=artifacts.load("runs/phone/data"))
    ev.meta["metrics"]["quality"]["kld"]

Every artifact is scored on the same token ids: the held-out texts tokenised once with the
teacher's tokenizer and stored, with the teacher's log-probs, in `<run_dir>/reference/`. That
reference is itself an artifact (parents teacher and data), so later evaluations reuse it; the
out-of-domain text (eval.ood) gets its own, `<run_dir>/reference-ood/`. Benchmark tasks
(eval.tasks, compress.evaluate.tasks) run on the same runtime with the teacher's tokenizer.
"""
from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import numpy as np

from .. import artifacts
from ..config import resolved_threads
from ..data import load_user_data, read_texts, token_stream
from ..errors import UserError

REFERENCE = "reference"
OOD_REFERENCE = "reference-ood"
MAX_TASK_CONTEXT = 2048   # longest sequence a benchmark request is given (lm-eval left-truncates)


# ---------------------------------------------------------------- held-out token ids

def heldout_ids(tokenizer, texts: list[str], seqs: int, seq_len: int) -> np.ndarray:
    """Texts -> [n, L] int64: documents joined with EOS and cut into n <= seqs rows of L tokens.

    L is seq_len, or the whole stream when it is shorter than one sequence.
    """
    stream = token_stream(tokenizer, texts, limit=seqs * seq_len)
    length = min(seq_len, len(stream))
    if length < 2:
        raise UserError("held-out data is empty (no text to score the artifacts on); give data= "
                        "with more text or a larger gen.heldout fraction, then re-run the data stage")
    n = min(seqs, len(stream) // length)
    return np.asarray(stream[:n * length], dtype=np.int64).reshape(n, length)


# ---------------------------------------------------------------- teacher reference

def reference(cfg, run_dir: Path, teacher, data) -> artifacts.Artifact:
    """`<run_dir>/reference/`: ids.npy [n, L] and the teacher's logprobs.npy [n, L, V] float16.

    Computed in torch from the teacher HF artifact, once per (teacher, data, seqs, seq_len).
    """
    config = {"seqs": cfg.eval.seqs, "seq_len": cfg.eval.seq_len}
    return _reference(cfg, Path(run_dir) / REFERENCE, config, [teacher, data], teacher,
                      lambda tok: read_texts(data, "heldout"))


def ood_reference(cfg, run_dir: Path, teacher) -> artifacts.Artifact | None:
    """`<run_dir>/reference-ood/`: the same for the out-of-domain text (eval.ood); None when off."""
    spec = cfg.eval.ood
    if spec in (None, "none"):
        return None
    if spec == "builtin":
        texts = builtin_ood_texts()
        if not texts:
            return None
        digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
        load = lambda tok: texts   # noqa: E731
    else:
        digest = hashlib.sha256(Path(spec).expanduser().read_bytes()).hexdigest()
        load = lambda tok: load_user_data(spec, tok)   # noqa: E731
    config = {"seqs": cfg.eval.ood_seqs, "seq_len": cfg.eval.seq_len, "ood": spec, "sha256": digest}
    return _reference(cfg, Path(run_dir) / OOD_REFERENCE, config, [teacher], teacher, load)


# Out-of-domain default: source code, a domain far from chat answers, that every Python install
# carries. A slice from the middle of each module (past licence headers and docstrings).
OOD_MODULES = ("textwrap", "heapq", "fractions", "shlex", "bisect", "difflib", "calendar", "statistics")
OOD_CHARS = 2000


def builtin_ood_texts() -> list[str]:
    import sysconfig
    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for mod in OOD_MODULES:
        try:
            src = (lib / f"{mod}.py").read_text()
        except OSError:
            continue
        start = src.find("\n", len(src) // 2) + 1
        texts.append(src[start:start + OOD_CHARS])
    return texts


def _reference(cfg, out: Path, config: dict, parents: list, teacher, texts_of) -> artifacts.Artifact:
    done = artifacts.find_done(out, out.name, config, parents)
    if done is not None:
        return done
    if teacher.meta.get("format") != "hf":
        raise UserError(f"the teacher artifact {teacher.path} must be an HF model (format hf) to compute "
                        f"reference log-probs; re-run the teacher stage")
    from ..models import load_tokenizer
    from .runtimes import TorchRuntime
    tok = load_tokenizer(str(teacher.path))
    ids = heldout_ids(tok, texts_of(tok), config["seqs"], config["seq_len"])
    with artifacts.writing(out, stage=out.name, config=config, parents=parents,
                           format="logprobs") as (tmp, meta):
        np.save(tmp / "ids.npy", ids)
        rt = TorchRuntime(teacher.path, resolved_threads(cfg), vocab=len(tok))
        try:
            lp = np.lib.format.open_memmap(tmp / "logprobs.npy", mode="w+", dtype=np.float16,
                                           shape=(ids.shape[0], ids.shape[1], rt.vocab))
            for i, row in enumerate(ids):   # one sequence at a time: memory O(L * V)
                lp[i] = rt.logprobs([int(t) for t in row])
            lp.flush()
            del lp
        finally:
            rt.close()
        meta["metrics"] = {"n_seqs": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                           "vocab": int(rt.vocab), "tokens": int(ids.size)}
    return artifacts.load(out)


def load_reference(ref: artifacts.Artifact) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n, L] int64, teacher log-probs [n, L, V] float16 memmap)."""
    return np.load(ref.path / "ids.npy"), np.load(ref.path / "logprobs.npy", mmap_mode="r")


def prompt_ids(ids: np.ndarray, n: int) -> list[int]:
    """The first n held-out tokens (repeated when there are fewer): the speed prompt."""
    flat = ids.reshape(-1)
    return [int(t) for t in np.resize(flat, n)]


# ---------------------------------------------------------------- host facts

def host() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count()}


# ---------------------------------------------------------------- the stage

def config_of(cfg) -> dict:
    """What an evaluation depends on: the eval settings and the thread count actually used."""
    return {**cfg.section("eval"), "threads": resolved_threads(cfg)}


def run(cfg, src, out, *, teacher, data) -> artifacts.Artifact:
    from . import tasks
    from .memory import peak_rss_mb
    from .quality import score
    from .runtimes import check_format, open_runtime
    from .speed import measure
    out = Path(out)
    runtime = check_format(src)   # fail before the (slow) reference when nothing can run src
    if cfg.eval.tasks:
        tasks.check(cfg)          # and before it when a task name or path is wrong
    threads = resolved_threads(cfg)
    e = cfg.eval
    config = config_of(cfg)
    ids, ref_lp = load_reference(reference(cfg, out.parent, teacher, data))
    ood = ood_reference(cfg, out.parent, teacher)
    n, length, vocab = ref_lp.shape
    with artifacts.writing(out, stage="evaluate", config=config, parents=[src, teacher, data],
                           format="eval") as (tmp, meta):
        rt = open_runtime(src, threads, vocab=vocab, n_ctx=length)
        runtime, device = rt.name, getattr(rt, "device", "cpu")   # bitsandbytes: CUDA when present
        try:
            quality = score(ref_lp, rt.logprobs, ids)
            if ood is not None:   # same runtime, a second text domain: robustness next to in-domain
                ood_ids, ood_lp = load_reference(ood)
                rt = _fit(rt, src, threads, vocab, ood_ids.shape[1], open_runtime)
                quality["ood"] = score(ood_lp, rt.logprobs, ood_ids) | {
                    "source": ood.meta["config"]["ood"], "tokens": int(ood_ids.size)}
        finally:
            rt.close()
        quality["tasks"] = tasks.run(cfg, lambda n_ctx: open_runtime(src, threads, vocab=vocab, n_ctx=n_ctx),
                                     _tokenizer(teacher), task_context(teacher)) if e.tasks else {}
        prompt = prompt_ids(ids, e.prefill_tokens)
        rt = open_runtime(src, threads, vocab=vocab, n_ctx=len(prompt) + e.decode_tokens + 16,
                          all_logits=False)
        try:
            speed = measure(rt, prompt, e.decode_tokens, threads)
        finally:
            rt.close()
        rss = peak_rss_mb(src, threads, e.prefill_tokens, e.decode_tokens) if e.memory else None
        meta["metrics"] = {
            "artifact": src.name, "format": src.meta["format"], "runtime": runtime, "device": device,
            "quality": quality, "speed": speed, "memory": {"peak_rss_mb": rss},
            "eval_tokens": int(n * length), "host": host(),
        }
    return artifacts.load(out)


def _fit(rt, src, threads, vocab, length, open_runtime):
    """The open runtime when `length` tokens fit its context, else one reopened that large."""
    if getattr(rt, "n_ctx", None) is None or length <= rt.n_ctx:
        return rt
    rt.close()
    return open_runtime(src, threads, vocab=vocab, n_ctx=length)


_tokenizers: dict = {}


def _tokenizer(teacher):
    """The teacher's tokenizer (every artifact is scored on its token ids), loaded once per process."""
    key = str(teacher.path)
    if key not in _tokenizers:
        from ..models import load_tokenizer
        _tokenizers[key] = load_tokenizer(key)
    return _tokenizers[key]


def task_context(teacher) -> int:
    """Longest benchmark sequence: the teacher's positions, at most MAX_TASK_CONTEXT."""
    import json
    try:
        conf = json.loads((Path(teacher.path) / "config.json").read_text())
        positions = int(conf.get("max_position_embeddings") or MAX_TASK_CONTEXT)
    except (OSError, ValueError):
        positions = MAX_TASK_CONTEXT
    return min(positions, MAX_TASK_CONTEXT)
