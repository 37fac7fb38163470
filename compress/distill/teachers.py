"""The teacher side of distillation: loading one or several teachers and aligning vocabularies.

    compress run teacher=Qwen/Qwen2.5-1.5B-Instruct distill.teachers=[Qwen/Qwen2.5-3B-Instruct] \
        distill.teacher_weights=[0.5,0.5]

Several teachers are averaged as distributions (losses.mix_teachers) over the shared vocabulary,
so they must share the student's tokenizer. Models of one family often pad their embedding
matrices differently (Qwen2.5: 151,936 rows in 0.5B-3B, 152,064 in 7B+, for 151,665 tokens);
those padding rows are dropped, which aligns the distributions without any user setting. A real
tokenizer mismatch stops with a line that points to sequence-level KD, which trains on text and
so works across tokenizers.

During training the step reads the teacher side through one small interface, `Signal.batch`, with
three implementations: live teachers, the top-k cache (cache.py), and none (seqkd: CE only).
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..errors import UserError
from ..models import load_model, load_tokenizer, resolve_teacher
from . import cache, kd
from .spec import TERMS


def specs(teacher_path: str, d) -> list[str]:
    """The teacher artifact's directory first, then distill.teachers as given."""
    return [teacher_path, *(d.teachers or [])]


def weights(d) -> list[float]:
    n = 1 + len(d.teachers or [])
    return [float(w) for w in d.teacher_weights] if d.teacher_weights else [1.0] * n


def load(spec_list: list[str], student_tok, device: str, trust_remote_code: bool = False) -> list:
    """Each teacher as an eval-mode model on `device` (bf16 on CUDA: inference only), after checking
    that it shares the student's tokenizer."""
    models = []
    for spec in spec_list:
        path, gguf_file = resolve_teacher(spec)
        check_tokenizer(load_tokenizer(path, gguf_file, trust_remote_code), student_tok, spec)
        dtype = torch.bfloat16 if device.startswith("cuda") else None
        model = load_model(path, gguf_file, trust_remote_code, dtype=dtype).to(device)
        model.requires_grad_(False)
        models.append(model)
    return models


def check_tokenizer(tok, ref_tok, name: str, who: str = "teacher", ref: str = "student", hint: str = "") -> None:
    """Logit distillation compares distributions token by token: `who` `name` must use `ref`'s tokenizer."""
    if tok.get_vocab() != ref_tok.get_vocab():
        raise UserError(f"{who} {name} does not share the {ref}'s tokenizer (different tokenizers), so their logits "
                        f"cannot be compared token by token; use sequence-level KD (distill.mode=seqkd), which "
                        f"trains the student on the teacher's text and works across tokenizers{hint}")


def shared_vocab(student_tok, vocab_sizes: list[int]) -> int:
    """The number of logit rows every model has; rows past it are embedding padding and are dropped.
    A model with fewer rows than the tokenizer has tokens cannot be aligned."""
    v = min(vocab_sizes)
    if v < len(student_tok):
        raise UserError(f"a model has {v} output rows but the tokenizer has {len(student_tok)} tokens; "
                        f"its vocabulary does not cover the tokenizer: pick models saved with their full vocabulary")
    return v


# ---------------------------------------------------------------- what the step reads per micro-batch

class Signal(Protocol):
    def batch(self, x, rows: list[int], terms: dict) -> kd.Teachers:
        """The teacher side of one micro-batch: x [b, S] token ids, `rows` their training rows,
        `terms` the loss terms of this step ({name: weight}, spec.TERMS)."""


class Live:
    """Teachers in memory: their bodies run on each micro-batch (inference mode) to last hidden
    states; the chunked loss applies their lm_heads a chunk of tokens at a time."""

    def __init__(self, models: list, weights: list[float]):
        self.parts = [kd.body_and_head(m) for m in models]
        self.weights = weights

    def batch(self, x, rows, terms) -> kd.Teachers:
        tb = kd.Teachers(weights=self.weights, heads=[head for _, head in self.parts])
        # a step whose terms read nothing from the teacher (CE alone, e.g. alpha scheduled to 0) skips it
        if any(TERMS[n].teacher is not None for n in terms):
            with torch.inference_mode():
                tb.hidden = [body(input_ids=x).last_hidden_state for body, _ in self.parts]   # [b, S, H_t]
        return tb


class TopK:
    """The teachers' top-k from the disk cache: rows are read memory-mapped, no teacher is loaded."""

    def __init__(self, store, weights: list[float], device: str):
        self.store, self.weights, self.device = store, weights, device

    def batch(self, x, rows, terms) -> kd.Teachers:
        cached = tuple(c.to(self.device) for c in cache.rows_of(self.store, rows))   # ids, log-probs [b, S, K]
        return kd.Teachers(weights=self.weights, cached=cached)


class Nothing:
    """No teacher signal: seqkd trains on the teacher's text with CE alone."""

    def batch(self, x, rows, terms) -> kd.Teachers:
        return kd.Teachers()


def signal(models: list, weights: list[float], store, device: str) -> Signal:
    """The cache when there is one, else the live teachers, else nothing."""
    if store is not None:
        return TopK(store, weights, device)
    return Live(models, weights) if models else Nothing()
