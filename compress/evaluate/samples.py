"""The samples stage: a few held-out prompts answered by one artifact, greedy, in its own runtime.

    compress run profile=phone samples.prompts=5 samples.tokens=48

The report sets each artifact's answers beside the teacher's and marks where they first depart
(report/samples.py). Prompts are the held-out split's (never trained on); data without prompts
(plain text) uses built-in prompts instead, which such a run never trains on either. Greedy
decoding, so an answer is a fact of the artifact, not of a sampler's seed. Text differs between
runtimes on near-tied tokens, so the departure point is a reading aid; quality is measured by KLD.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import artifacts
from ..config import host_cores
from ..stage import stage

BUILTIN_SEED = 1   # built-in prompts for prompt-less data: a fixed pick, the same for every artifact


def prompts_of(data: artifacts.Artifact, n: int) -> tuple[list[list[dict]], str]:
    """The first n held-out conversations (turns before the answer), and where they came from."""
    prompts = []
    with open(data.path / "heldout.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line) if line.strip() else {}
            if row.get("prompt"):
                prompts.append(row["prompt"])
    if prompts:
        return prompts[:n], "held-out"
    from ..data.prompts import builtin_prompts
    return [[{"role": "user", "content": p}] for p in builtin_prompts(n, BUILTIN_SEED)], "built-in"


@stage("samples", inputs=("teacher", "data"), reads=("samples",), format="samples")
def run(cfg, src, out, *, teacher, data) -> artifacts.Artifact:
    from ..models import load_tokenizer
    from .generate import chat_ids, greedy, offsets, stop_ids
    from .runtimes import open_runtime
    out = Path(out)
    tok = load_tokenizer(str(teacher.path))
    convs, source = prompts_of(data, cfg.samples.prompts)
    prompts = [chat_ids(tok, c) for c in convs]
    stops, max_new = stop_ids(tok), cfg.samples.tokens
    with artifacts.writing(out) as (tmp, meta):
        rt = open_runtime(src, host_cores(), vocab=len(tok), all_logits=False,
                          n_ctx=max(map(len, prompts)) + max_new + 8)
        answers = []
        try:
            for conv, ids in zip(convs, prompts):
                a = greedy(rt, ids, max_new, stops)
                answers.append({"prompt": conv, "text": tok.decode(a.ids, skip_special_tokens=True),
                                "ids": a.ids, "offsets": offsets(tok, a.ids), "finished": a.finished,
                                "seconds": round(a.seconds, 3)})
        finally:
            rt.close()
        meta["metrics"] = {"artifact": src.name, "runtime": rt.name, "source": source,
                           "max_tokens": max_new, "answers": answers}
    return artifacts.load(out)
