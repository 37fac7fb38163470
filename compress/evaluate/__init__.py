"""Evaluate stage: every artifact in the runtime it ships in, scored against the teacher.

    from compress.evaluate import run
    ev = run(cfg, artifact, run_dir / f"eval-{artifact.name}", teacher=teacher, data=data)

Kept import-light (torch, transformers, llama_cpp load inside functions) so that
`python -m compress.evaluate.memory` measures only the artifact's own runtime.
"""
from __future__ import annotations


def run(cfg, src, out, *, teacher, data):
    """Quality (ppl, KLD, top-1 vs the teacher), speed and peak memory of `src` -> eval artifact."""
    from ..config import resolved_threads
    from .stage import run as run_stage
    return run_stage(cfg, src, out, teacher=teacher, data=data, threads=resolved_threads(cfg))
