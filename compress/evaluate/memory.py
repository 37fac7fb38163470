"""Peak resident memory of an artifact in its own runtime, measured in a fresh process.

    python -m compress.evaluate.memory runs/phone/gguf-Q4_K_M 2        # prints {"peak_rss_mb": ...}
    peak_rss_mb(artifact, threads=2)                                    # the same, from Python

The child loads the artifact, prefills a prompt and decodes a few tokens, then reports its own
peak RSS (VmHWM on Linux, getrusage elsewhere). A separate process is the only honest figure: the
evaluating process already holds torch, transformers and the teacher. For a GGUF the child imports
llama_cpp and nothing heavier, so the number is what a llama.cpp process serving the model costs
(mapped weights that were touched count, as they do on the device).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..stage import peak_rss_mb as process_peak_mb

PREFILL_TOKENS = 128
DECODE_TOKENS = 8


def measure_here(artifact_dir: str, threads: int, prefill: int = PREFILL_TOKENS,
                 decode: int = DECODE_TOKENS) -> float:
    """Load, prefill, decode in this process; return its peak RSS in MiB (run it in a fresh one)."""
    from .. import artifacts
    from .runtimes import open_runtime
    art = artifacts.load(artifact_dir)
    rt = open_runtime(art, threads, n_ctx=prefill + decode + 16, all_logits=False)
    # Any in-vocabulary ids do: memory depends on how many tokens, not which.
    ids = [(i * 7919 + 13) % rt.n_vocab for i in range(prefill)]
    tok = rt.prefill(ids)
    for _ in range(decode):
        tok = rt.decode_step(tok)
    peak = process_peak_mb()
    rt.close()
    return peak


def peak_rss_mb(artifact, threads: int, prefill: int = PREFILL_TOKENS, decode: int = DECODE_TOKENS,
                timeout: float = 600) -> float:
    """Run the child on `artifact` (an Artifact or its directory); its peak RSS in MiB."""
    path = Path(getattr(artifact, "path", artifact))
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])   # so the child imports this same checkout
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "compress.evaluate.memory", str(path), str(threads),
           str(prefill), str(decode)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory measurement of {path} failed (exit {proc.returncode}): {tail}")
    return float(json.loads(lines[-1])["peak_rss_mb"])


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 4):
        print("usage: python -m compress.evaluate.memory <artifact_dir> <threads> [prefill decode]",
              file=sys.stderr)
        return 2
    extra = [int(a) for a in argv[2:]]
    print(json.dumps({"peak_rss_mb": measure_here(argv[0], int(argv[1]), *extra)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
