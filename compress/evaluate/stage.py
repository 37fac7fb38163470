"""The evaluate stage: quality, speed and memory of one artifact, each in the artifact's runtime.

    from compress.evaluate import run
    ev = run(cfg, artifacts.load("runs/phone/gguf-Q4_K_M"), Path("runs/phone/eval-gguf-Q4_K_M"),
             teacher=artifacts.load("runs/phone/teacher"), data=artifacts.load("runs/phone/data"))
    ev.meta["metrics"]["quality"]["kld"]

Every artifact is scored on the same token ids: the reference stage (reference.py) stores the
held-out token ids with the teacher's log-probs in `<run_dir>/reference/` (and the out-of-domain
text's in `<run_dir>/reference-ood/`); the runner passes them in as inputs. Benchmark tasks
(eval.tasks, compress.evaluate.tasks) run on the same runtime with the teacher's tokenizer.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from .. import artifacts
from ..stage import stage
from . import reference as references

MAX_TASK_CONTEXT = 2048   # longest sequence a benchmark request is given (lm-eval left-truncates)


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

# eval.seqs, seq_len and ood shape the references, which are parents: declaring the whole section
# redoes nothing more, and lets a direct call make the references itself. `threads` is the thread
# count measured with (config.resolved_threads: eval.threads or the device's, capped by this host).
@stage("evaluate", inputs=("teacher", "data", "reference", "ood"), reads=("eval",), params=("threads",),
       format="eval")
def run(cfg, src, out, *, teacher, data, threads: int, reference=None, ood=None) -> artifacts.Artifact:
    """The runner passes the references; called on its own, the stage makes (or reuses) them."""
    from . import tasks
    from .memory import peak_rss_mb
    from .quality import score
    from .runtimes import check_format, open_runtime
    from .speed import measure
    out = Path(out)
    runtime = check_format(src)   # fail before the (slow) reference when nothing can run src
    if cfg.eval.tasks:
        tasks.check(cfg)          # and before it when a task name or path is wrong
    e = cfg.eval
    if reference is None:
        reference = made(references.run, cfg, out.parent / references.REFERENCE, teacher, data=data)
        ood = made(references.run_ood, cfg, out.parent / references.OOD_REFERENCE, teacher) \
            if references.has_ood(cfg.eval.ood) else None
    ids, ref_lp = references.load(reference)
    n, length, vocab = ref_lp.shape
    with artifacts.writing(out) as (tmp, meta):
        rt = open_runtime(src, threads, vocab=vocab, n_ctx=length)
        runtime, device = rt.name, getattr(rt, "device", "cpu")   # bitsandbytes: CUDA when present
        try:
            quality = score(ref_lp, rt.logprobs, ids)
            if ood is not None:   # same runtime, a second text domain: robustness next to in-domain
                ood_ids, ood_lp = references.load(ood)
                rt = _fit(rt, src, threads, vocab, ood_ids.shape[1], open_runtime)
                quality["ood"] = score(ood_lp, rt.logprobs, ood_ids) | {
                    "source": ood.meta["config"]["eval.ood"], "tokens": int(ood_ids.size)}
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


def made(fn, cfg, out: Path, src, **inputs) -> artifacts.Artifact:
    """The finished artifact of stage `fn` at `out` when it is current, else made now."""
    ident = fn.stage.identity(cfg, src, **inputs)
    return artifacts.find_done(out, ident.hash) or fn(cfg, src, out, **inputs)


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
    from ..models import positions
    return positions(teacher.path, MAX_TASK_CONTEXT)
