"""Multiple-choice accuracy on local benchmark data, scored like lm-eval's `acc` (arc_easy).

    python bench/mc_accuracy.py ARTIFACT_DIR TEACHER_DIR [--n=200] [--threads=2]

For each question the log-likelihood of each answer continuation " {choice}" after the context
"Question: {q}\\nAnswer:" is the sum of its tokens' log-probs; the prediction is the argmax (no length
normalisation: that would be acc_norm). Log-probs come from compress.evaluate.runtimes.open_runtime,
so an HF artifact runs in torch and a GGUF one in llama.cpp; token ids always come from the
teacher's tokenizer. Data: ../shared/data/arc_easy/arc_easy.jsonl (rows {"query": "Question: <q>",
"choices": [...], "gold": i}); the first n rows are the fixed subset.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

ARC_EASY = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "arc_easy" / "arc_easy.jsonl"


def load_questions(path: Path = ARC_EASY, n: int = 200) -> list[dict]:
    """The first n rows: {"context": "Question: <q>\\nAnswer:", "choices": [" <text>", ...], "gold": i}."""
    rows = []
    with open(path) as f:
        for line in f:
            if len(rows) == n:
                break
            r = json.loads(line)
            rows.append({"context": r["query"] + "\nAnswer:", "choices": [" " + c for c in r["choices"]],
                         "gold": int(r["gold"])})
    return rows


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], int]:
    """(ids of context+continuation, index of the first continuation token), as lm-eval splits them:
    the whole string is tokenised once and the continuation is what follows the context's tokens."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    return whole, len(ctx)


def continuation_logprob(lp: np.ndarray, ids: list[int], start: int) -> float:
    """Sum of log P(ids[t] | ids[:t]) for t in [start, T).

    lp: [T, V] log-softmax of next-token logits (row t predicts token t+1), ids: T token ids,
    start: 1 <= start < T, the first continuation position.
    """
    t = np.arange(start, len(ids))
    return float(lp[t - 1, np.asarray(ids)[t]].sum())


def mc_accuracy(logprobs, tok, questions: list[dict]) -> dict:
    """Accuracy of argmax-loglikelihood answers. logprobs(ids) -> [len(ids), V] (a Runtime.logprobs).

    Returns {"acc", "stderr" = sqrt(acc (1 - acc) / n), "chance" = 1 / mean #choices, "n"}.
    """
    correct = []
    for q in questions:
        scores = []
        for choice in q["choices"]:
            ids, start = encode_pair(tok, q["context"], choice)
            scores.append(continuation_logprob(logprobs(ids), ids, start))
        correct.append(int(np.argmax(scores)) == q["gold"])
    n = len(correct)
    acc = sum(correct) / n
    return {"acc": acc, "stderr": math.sqrt(acc * (1 - acc) / n), "n": n, "chance": chance(questions)}


def chance(questions: list[dict]) -> float:
    """Accuracy of a uniform random guess: 1 / mean number of choices."""
    return len(questions) / sum(len(q["choices"]) for q in questions)


def evaluate(artifact, teacher_dir, n: int = 200, threads: int = 2, path: Path = ARC_EASY) -> dict:
    """mc_accuracy of an artifacts.Artifact (HF or GGUF) on the first n questions of `path`."""
    from compress.evaluate.runtimes import open_runtime
    from compress.models import load_tokenizer
    tok = load_tokenizer(str(teacher_dir))
    rt = open_runtime(artifact, threads, vocab=len(tok))
    try:
        return mc_accuracy(rt.logprobs, tok, load_questions(path, n))
    finally:
        rt.close()


if __name__ == "__main__":
    from compress import artifacts
    pos = [a for a in sys.argv[1:] if not a.startswith("--")]
    opt = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    r = evaluate(artifacts.load(pos[0]), pos[1], int(opt.get("n", 200)), int(opt.get("threads", 2)))
    print(f"arc_easy acc {r['acc']:.3f} ± {r['stderr']:.3f} (n={r['n']}, chance {r['chance']:.3f})")
