"""Sequence-level KD (the DeepSeek-R1 distillation recipe): the teacher writes, a verifier keeps the
good answers, the student learns the kept text with plain next-token CE.

    compress run distill.mode=seqkd distill.prompts=gsm8k_train.jsonl distill.samples=4 distill.verifier=exact
    compress run distill.mode=seqkd student=HuggingFaceTB/SmolLM2-135M teacher=Qwen/Qwen2.5-0.5B-Instruct

Because the student only sees text, teacher and student may use different tokenizers. Prompts come
from distill.prompts (.jsonl rows with "prompt" or "question", and "answer" for exact checking;
gsm8k's "... #### 42" format works as is) or, unset, the built-in prompts. Each prompt gets
distill.samples candidates (gen.temperature, gen.top_p, gen.max_new_tokens). Verifiers:
  exact   the candidate's final answer ("#### X", else its last number) equals the reference's
  format  finished (not truncated), at least 3 words, at most distill.max_words, not repetitive
  none    keep everything
exact applies the format rules too. The kept traces and the counts per rejection reason are
recorded in the distill artifact (seqkd.jsonl, metrics.seqkd).
"""
from __future__ import annotations

import re
from pathlib import Path

from .. import artifacts
from ..data import is_repetitive, read_jsonl
from ..errors import UserError

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """'... #### 1,234' -> '1234'; else the last number in the text; None when there is none."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    nums = NUMBER.findall(tail)
    if not nums:
        return None
    n = (nums[0] if "####" in text else nums[-1]).replace(",", "")
    return n[:-2] if n.endswith(".0") else n.rstrip(".")


def verdict(candidate: str, finished: bool, reference: str | None, verifier: str, max_words: int) -> str | None:
    """None when the candidate is kept, else the reason it is rejected."""
    if verifier == "none":
        return None
    words = len(candidate.split())
    if not finished:
        return "truncated"
    if words < 3:
        return "empty"
    if words > max_words:
        return "too_long"
    if is_repetitive(candidate):
        return "repetitive"
    if verifier == "exact":
        if reference is None:
            raise UserError("distill.verifier=exact needs an 'answer' in every distill.prompts row; "
                            "use distill.verifier=format for prompts without answers")
        got = final_answer(candidate)
        if got is None or got != final_answer(reference):
            return "wrong_answer"
    return None


def load_prompts(cfg) -> list[tuple[str, str | None]]:
    """[(prompt, reference answer or None)] from distill.prompts, else the built-in prompts."""
    d = cfg.distill
    if d.prompts is None:
        from ..data.prompts import builtin_prompts
        return [(p, None) for p in builtin_prompts(cfg.gen.prompts, cfg.gen.seed)]
    path = Path(d.prompts).expanduser()
    if not path.is_file():
        raise UserError(f"distill.prompts={d.prompts} does not exist; give a .jsonl with 'prompt' or 'question' per row")
    rows = []
    for i, r in enumerate(read_jsonl(path), 1):
        p = r.get("prompt", r.get("question"))
        if not isinstance(p, str) or not p.strip():
            raise UserError(f"{path}:{i} has no 'prompt' or 'question' string")
        rows.append((p, r.get("answer")))
    if not rows:
        raise UserError(f"distill.prompts={d.prompts} holds no rows")
    return rows[:cfg.gen.prompts]


def sample_and_verify(cfg, teacher: artifacts.Artifact) -> tuple[list[dict], dict]:
    """(kept {prompt, response} rows, counts per outcome) from the teacher's samples."""
    from rich.progress import Progress
    from ..data import _llama_cpp_sampler, _torch_sampler
    from ..models import load_tokenizer
    d = cfg.distill
    t_tok = load_tokenizer(str(teacher.path))
    gguf = teacher.meta.get("metrics", {}).get("source_gguf")
    sampler = _llama_cpp_sampler(gguf, cfg) if gguf else _torch_sampler(teacher, t_tok, cfg)
    prompts = load_prompts(cfg)
    kept, counts = [], {"candidates": 0, "kept": 0}
    with Progress(transient=True) as bar:
        task = bar.add_task("teacher samples", total=len(prompts) * d.samples)
        for i, (prompt, ref) in enumerate(prompts):
            ids = t_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
            for j in range(d.samples):
                text, finished = sampler(list(ids), cfg.gen.max_new_tokens, d.seed + i * d.samples + j)
                counts["candidates"] += 1
                why = verdict(text.strip(), finished, ref, d.verifier, d.max_words)
                if why:
                    counts[why] = counts.get(why, 0) + 1
                else:
                    counts["kept"] += 1
                    kept.append({"prompt": prompt, "response": text.strip()})
                bar.advance(task)
    if not kept:
        raise UserError(f"sequence-level KD kept none of the teacher's {counts['candidates']} candidates "
                        f"({counts}); raise distill.samples or gen.max_new_tokens, or use distill.verifier=format")
    return kept, counts


def as_text(tok, row: dict) -> str:
    """A kept trace in the student's chat format (plain prompt + answer for a base tokenizer)."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                        {"role": "assistant", "content": row["response"]}], tokenize=False)
    return f"{row['prompt']}\n{row['response']}"
