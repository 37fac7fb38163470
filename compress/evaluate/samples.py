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

BUILTIN_SEED = 1      # built-in prompts for prompt-less data: a fixed pick, the same for every artifact
MAX_CONTEXT = 1024    # prompt + answer tokens; longer held-out prompts are passed over


def conversations(data: artifacts.Artifact) -> tuple[list[list[dict]], str]:
    """Every held-out conversation (turns before the answer), and where they came from."""
    prompts = []
    with open(data.path / "heldout.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line) if line.strip() else {}
            if row.get("prompt"):
                prompts.append(row["prompt"])
    if prompts:
        return prompts, "held-out"
    from ..data.prompts import builtin_prompts
    return [[{"role": "user", "content": p}] for p in builtin_prompts(10**6, BUILTIN_SEED)], "built-in"


def pick(tok, convs: list, n: int, limit: int) -> tuple[list, list[list[int]], int]:
    """The first n conversations whose prompt ids fit `limit`, their ids, and how many were passed over."""
    from .generate import chat_ids
    kept, ids, skipped = [], [], 0
    for c in convs:
        if len(kept) == n:
            break
        p = chat_ids(tok, c)
        if len(p) > limit:
            skipped += 1
            continue
        kept.append(c)
        ids.append(p)
    return kept, ids, skipped


@stage("samples", inputs=("teacher", "data"), reads=("samples",), format="samples")
def run(cfg, src, out, *, teacher, data) -> artifacts.Artifact:
    from ..models import load_tokenizer, positions
    from .generate import greedy, offsets, stop_ids
    from .runtimes import check_format, open_runtime
    out = Path(out)
    runtime = check_format(src)
    tok = load_tokenizer(str(teacher.path))
    stops, max_new = stop_ids(tok), cfg.samples.tokens
    all_convs, source = conversations(data)
    convs, prompts, skipped = pick(tok, all_convs, cfg.samples.prompts, positions(teacher.path, MAX_CONTEXT) - max_new)
    with artifacts.writing(out) as (tmp, meta):
        answers = []
        if prompts:
            rt = open_runtime(src, host_cores(), vocab=len(tok), all_logits=False,
                              n_ctx=max(map(len, prompts)) + max_new + 8)
            runtime = rt.name
            try:
                for conv, ids in zip(convs, prompts):
                    a = greedy(rt, ids, max_new, stops)
                    answers.append({"prompt": conv, "text": tok.decode(a.ids, skip_special_tokens=True),
                                    "ids": a.ids, "offsets": offsets(tok, a.ids), "finished": a.finished,
                                    "seconds": round(a.seconds, 3)})
            finally:
                rt.close()
        meta["metrics"] = {"artifact": src.name, "runtime": runtime, "source": source, "max_tokens": max_new,
                           "skipped_long_prompts": skipped, "answers": answers}
    return artifacts.load(out)
