"""Greedy answers from any runtime (runtimes.py), with the teacher's chat template and tokenizer.

    ids = chat_ids(tok, [{"role": "user", "content": "Hi"}])
    answer = greedy(rt, ids, max_new=48, stops=stop_ids(tok))    # Answer(ids, finished, seconds)
    stream = TextStream(tok); [print(stream.add(t), end="") for t in answer.ids]

Used by the samples stage (the report's side-by-side answers) and by `compress chat`. Runtimes
take token ids, so one loop serves torch, llama.cpp and onnxruntime alike.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


def chat_ids(tok, messages: list[dict]) -> list[int]:
    """The prompt ids of a conversation, ending where the assistant's answer starts. A base model
    without a chat template continues the turns' text, joined by blank lines."""
    if not getattr(tok, "chat_template", None):
        return [int(i) for i in tok("\n\n".join(str(m.get("content", "")) for m in messages))["input_ids"]]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return [int(i) for i in ids]


def stop_ids(tok) -> set[int]:
    """Tokens that end an answer: EOS and every special token (end of turn, start of a new one).
    A chat answer never contains a special token, so stopping at the first one is safe across
    templates (<|im_end|>, <|eot_id|>, <end_of_turn>, ...)."""
    ids = set(tok.all_special_ids)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids


@dataclass
class Answer:
    ids: list[int]       # generated tokens, without the stop token
    finished: bool       # ended on a stop token (else it ran out of max_new)
    seconds: float       # prefill and decode together


def greedy(rt, prompt: list[int], max_new: int, stops: set[int], on_token=None) -> Answer:
    """Generate up to max_new tokens greedily after `prompt`; on_token(id) sees each as it comes."""
    t0 = time.perf_counter()
    out: list[int] = []
    token = rt.prefill(prompt)
    while token not in stops:
        out.append(token)
        if on_token is not None:
            on_token(token)
        if len(out) >= max_new:
            break
        token = rt.decode_step(token)
    return Answer(out, token in stops, time.perf_counter() - t0)


class TextStream:
    """Token ids in, new text out: decodes the whole answer so far and returns what is new.

    Byte-level vocabularies split a character over several tokens; an incomplete one decodes to
    U+FFFD, so that tail is held back until the next token completes it.
    """

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.text()
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)


def offsets(tok, ids: list[int]) -> list[int]:
    """Characters of the decoded answer that tokens ids[:i+1] account for, for each i (monotone)."""
    out, stream = [], TextStream(tok)
    for t in ids:
        stream.add(t)
        out.append(stream.shown)
    return out
