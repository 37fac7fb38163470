"""The evaluate stage: quality, speed and memory of one artifact, each in the artifact's runtime.

    from compress.evaluate import run
    ev = run(cfg, artifacts.load("runs/phone/gguf-Q4_K_M"), Path("runs/phone/eval-gguf-Q4_K_M"),
             teacher=artifacts.load("runs/phone/teacher"), data=artifacts.load("runs/phone/data"))
    ev.meta["metrics"]["quality"]["kld"]

Every artifact is scored on the same token ids: the held-out texts tokenised once with the
teacher's tokenizer and stored, with the teacher's log-probs, in `<run_dir>/reference/`. That
reference is itself an artifact (parents teacher and data), so later evaluations reuse it.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from .. import artifacts
from ..config import resolved_threads
from ..data import read_texts, token_stream
from ..errors import UserError

REFERENCE = "reference"


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
    out = Path(run_dir) / REFERENCE
    done = artifacts.find_done(out, REFERENCE, config, [teacher, data])
    if done is not None:
        return done
    if teacher.meta.get("format") != "hf":
        raise UserError(f"the teacher artifact {teacher.path} must be an HF model (format hf) to compute "
                        f"reference log-probs; re-run the teacher stage")
    from ..models import load_tokenizer
    from .runtimes import TorchRuntime
    tok = load_tokenizer(str(teacher.path))
    ids = heldout_ids(tok, read_texts(data, "heldout"), cfg.eval.seqs, cfg.eval.seq_len)
    with artifacts.writing(out, stage=REFERENCE, config=config, parents=[teacher, data],
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
    from .memory import peak_rss_mb
    from .quality import score
    from .runtimes import check_format, open_runtime
    from .speed import measure
    out = Path(out)
    runtime = check_format(src)   # fail before the (slow) reference when nothing can run src
    threads = resolved_threads(cfg)
    e = cfg.eval
    config = config_of(cfg)
    ids, ref_lp = load_reference(reference(cfg, out.parent, teacher, data))
    n, length, vocab = ref_lp.shape
    with artifacts.writing(out, stage="evaluate", config=config, parents=[src, teacher, data],
                           format="eval") as (tmp, meta):
        rt = open_runtime(src, threads, vocab=vocab, n_ctx=length)
        runtime, device = rt.name, getattr(rt, "device", "cpu")   # bitsandbytes: CUDA when present
        try:
            quality = score(ref_lp, rt.logprobs, ids)
        finally:
            rt.close()
        quality["tasks"] = {}
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
