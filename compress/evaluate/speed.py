"""Prefill and decode speed of an open runtime, at a fixed thread count, guarded against load.

    from compress.evaluate.speed import measure
    measure(rt, prompt_ids, decode_tokens=32, threads=2)
    -> {"threads": 2, "prefill_tps": ..., "decode_tps": ..., "ttft_ms": ..., "load_warning": None}

Each figure is the best of a few repetitions after one warm-up: background work only ever slows a
run down, so the fastest repetition is the closest to what the device can do. llama.cpp at 2
threads slows several-fold when another process holds a core, so CPU use by other processes is
sampled just before and after measuring and reported as `load_warning` instead of silently skewing numbers.
"""
from __future__ import annotations

import os
import time

REPEATS = 3
LOAD_SAMPLE_S = 0.5


def busy_cores_elsewhere(seconds: float = LOAD_SAMPLE_S) -> float:
    """Cores kept busy by other processes over a short window (this process excluded)."""
    import psutil
    me = psutil.Process()

    def busy():
        t = psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        mine = me.cpu_times()
        return sum(t) - idle, mine.user + mine.system

    (sys0, me0), w0 = busy(), time.perf_counter()
    time.sleep(seconds)
    (sys1, me1), w1 = busy(), time.perf_counter()
    return max(0.0, ((sys1 - sys0) - (me1 - me0)) / (w1 - w0))


def load_warning(threads: int, busy: float | None = None, cores: int | None = None) -> str | None:
    """A one-line warning when other processes leave fewer free cores than `threads` needs."""
    cores = cores or os.cpu_count() or 1
    busy = busy_cores_elsewhere() if busy is None else busy
    if busy <= cores - threads + 0.5:
        return None
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"other processes kept {busy:.1f} of {cores} cores busy (load average {load1:.2f}) while "
            f"measuring at {threads} threads; speeds may be several-fold low, re-measure on an idle machine")


def _time(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(rt, prompt_ids: list[int], decode_tokens: int, threads: int, repeats: int = REPEATS) -> dict:
    """Prefill `prompt_ids` then decode `decode_tokens` greedy tokens, `repeats` times.

    prefill_tps = prompt tokens / prefill seconds; ttft_ms = prefill plus picking the first token
    (prefill returns it); decode_tps = decode steps / seconds, each step feeding one token.
    """
    warning = load_warning(threads)
    prefill_s, decode_s = [], []
    for rep in range(repeats + 1):       # rep 0 warms caches and allocators; not counted
        tp, tok = _time(lambda: rt.prefill(prompt_ids))
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            tok = rt.decode_step(tok)
        td = time.perf_counter() - t0
        if rep:
            prefill_s.append(tp)
            decode_s.append(td)
    best_p, best_d = min(prefill_s), min(decode_s)
    warning = warning or load_warning(threads)   # load that started mid-measurement shows here
    return {"threads": threads,
            "prefill_tps": len(prompt_ids) / best_p,
            "decode_tps": decode_tokens / best_d if decode_tokens else None,
            "ttft_ms": 1000.0 * best_p,
            "load_warning": warning}
