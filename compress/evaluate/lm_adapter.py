"""lm-eval's narrow model interface over compress's runtimes: one adapter, any runtime.

    lm = RuntimeLM(lambda n_ctx: open_runtime(artifact, 2, vocab=len(tok), n_ctx=n_ctx), tok)
    lm_eval.simple_evaluate(model=lm, tasks=[...])
    lm.close()

The same class scores HF artifacts in torch, GGUF in llama.cpp (in-process through
llama-cpp-python: no HTTP server, prompt log-probs available) and ONNX in onnxruntime, because
all it needs from a runtime is `logprobs(ids) -> [T, V]` and greedy `prefill`/`decode_step`.
Token ids always come from the teacher's tokenizer, never from the artifact (a GGUF's own
tokenizer gives near-chance scores when it differs: lm-eval issue #2887).

Text is split into tokens exactly as lm-eval's HFLM does (TemplateLM._encode_pair: trailing
context spaces move to the continuation, the whole string is encoded and then split), so an HF
artifact scores the same here as under HFLM (tests/test_tasks.py checks it), and any difference
between two artifacts comes from their runtimes and weights, not from tokenization.
"""
from __future__ import annotations

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .quality import log_softmax

CTX_STEP = 128       # runtimes are opened with a context rounded up to this, so few reopens


def continuation_score(lp: np.ndarray, ids: list[int], n_cont: int) -> tuple[float, bool]:
    """(sum of log P(continuation), is every continuation token the argmax).

    lp: [T - 1, V] log-probs of the model run on ids[:-1] (row t predicts ids[t + 1]), or only
    its last rows (at least n_cont); ids: the matching token ids (T or fewer, same tail) whose
    last n_cont are the continuation.
    """
    rows = lp[len(lp) - n_cont:]                        # [n_cont, V]: the rows predicting them
    target = np.asarray(ids[-n_cont:], dtype=np.int64)
    picked = rows[np.arange(n_cont), target]
    return float(picked.astype(np.float64).sum()), bool((rows.argmax(-1) == target).all())


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class PrefixCache:
    """Next-token log-probs rows [first, len(ids)) of ids, reusing the KV cache of the prefix shared
    with the previous sequence (what llama.cpp's own prompt cache does).

    Multiple-choice questions score each choice after the same context, so most tokens are
    shared. llama.cpp keeps every evaluated position's logits (logits_all) and rewinds by
    n_tokens; torch crops its DynamicCache and onnxruntime its present -> past arrays, and both
    keep the rows they computed. Other runtimes take the plain logprobs() path. Rows equal the
    full pass up to float rounding.
    """

    def __init__(self):
        self.ids, self.past, self.lp = [], None, None

    def rows(self, rt, ids: list[int], first: int) -> np.ndarray:
        if getattr(rt, "name", "") == "llama.cpp" and getattr(rt, "all_logits", False):
            return self._llama(rt, ids, first)
        if getattr(rt, "name", "") == "torch" and hasattr(rt, "model"):
            return self._torch(rt, ids, first)
        if getattr(rt, "name", "") == "onnxruntime" and hasattr(rt, "extend"):
            return self._onnx(rt, ids, first)
        return rt.logprobs(ids)[first:]

    def _llama(self, rt, ids, first):
        llm = rt.llm
        if len(ids) > rt.n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed the context of {rt.n_ctx}")
        p = common_prefix(llm.input_ids[:llm.n_tokens].tolist(), ids)
        if p < len(ids):
            llm.n_tokens = p          # Llama.eval drops the KV cells from n_tokens on
            llm.eval(ids[p:])
        return log_softmax(llm.scores[first:len(ids), :rt.vocab])

    def _torch(self, rt, ids, first):
        import torch
        p = min(common_prefix(self.ids, ids), len(ids) - 1) if self.past is not None else 0
        with torch.inference_mode():
            if p:
                self._crop(p)
            out = rt.model(torch.tensor([ids[p:]]), past_key_values=self.past if p else None, use_cache=True)
        new = log_softmax(out.logits[0, :, :rt.vocab].float().numpy())   # [len(ids) - p, V]
        self.lp = np.concatenate([self.lp[:p], new]) if p else new
        self.ids, self.past = list(ids), out.past_key_values
        return self.lp[first:len(ids)]

    def _onnx(self, rt, ids, first):
        p = min(common_prefix(self.ids, ids), len(ids) - 1) if self.past is not None else 0
        past = {k: np.ascontiguousarray(v[:, :, :p]) for k, v in self.past.items()} if p else None   # [1, kv, p, d]
        logits, self.past = rt.extend(past, ids[p:])
        new = log_softmax(logits[:, :rt.vocab])                            # [len(ids) - p, V]
        self.lp = np.concatenate([self.lp[:p], new]) if p else new
        self.ids = list(ids)
        return self.lp[first:len(ids)]

    def _crop(self, keep: int) -> None:
        # transformers 5.x takes the number of tokens to remove (negative); earlier, the length to keep.
        remove = self.past.get_seq_length() - keep
        if remove > 0:
            try:
                self.past.crop(-remove)
            except ValueError:
                self.past.crop(keep)


class RuntimeLM(TemplateLM):
    """lm-eval LM over `opener(n_ctx) -> runtime`; the runtime is (re)opened as large as needed.

    max_length is the longest sequence ever fed (lm-eval left-truncates longer requests, as HFLM
    does with the model's positions).
    """

    def __init__(self, opener, tokenizer, max_length: int = 2048, max_gen_toks: int = 256):
        super().__init__()
        self.opener, self.tokenizer = opener, tokenizer
        self.max_length, self.max_gen_toks = int(max_length), int(max_gen_toks)
        self.rt, self.n_ctx = None, 0
        self.prefix = PrefixCache()
        self.forward_calls = 0

    # ------------------------------------------------------------ runtime and tokens

    def runtime(self, n_tokens: int):
        """The open runtime, reopened with a larger context when n_tokens does not fit.

        Only runtimes with a fixed context (llama.cpp's n_ctx) are reopened; torch takes any length.
        """
        fixed = self.rt is not None and getattr(self.rt, "n_ctx", None) is not None
        if self.rt is None or (fixed and n_tokens > self.n_ctx):
            self.close()
            want = max(n_tokens, self.n_ctx)
            self.n_ctx = min(self.max_length, -(-want // CTX_STEP) * CTX_STEP)
            self.rt = self.opener(self.n_ctx)
        return self.rt

    def close(self) -> None:
        if self.rt is not None:
            self.rt.close()
            self.rt = None
        self.prefix = PrefixCache()

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # As HFLM: BOS when the tokenizer has one, else EOS, stands in for an empty context.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "teacher").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # As HFLM with add_bos_token unset: the tokenizer's own default, unless the text already
        # starts with the prefix token.
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        prefix = self.tokenizer.decode([self.prefix_token_id])
        if add_special_tokens is None and prefix and string.startswith(prefix):
            kw = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **kw)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------ scoring

    def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        ids = (ctx + cont)[-(self.max_length + 1):]    # left-truncate like HFLM
        inp = ids[:-1]
        n = min(len(cont), len(inp))                    # a continuation longer than the window is cut too
        if n == 0:
            return 0.0, True
        first = len(inp) - n                            # the first row that predicts the continuation
        rt = self.runtime(len(inp))
        self.forward_calls += 1
        rows = self.prefix.rows(rt, inp, first)          # [n, V]
        return continuation_score(rows, ids, n)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        # Scored in token order so the choices of one question, which share its context, follow
        # each other and reuse the runtime's KV cache; identical pairs are scored once.
        keyed = [(tuple(ctx) + tuple(cont), len(cont)) for _, ctx, cont in requests]
        done: dict = {}
        for key in sorted(set(keyed)):
            whole, n = key
            done[key] = self._score(list(whole[:len(whole) - n]), list(whole[len(whole) - n:]))
        return [done[k] for k in keyed]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of max_length tokens (as HFLM)."""
        out = []
        for (string,) in (r.args for r in requests):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            out.append(sum(self._score(list(c), list(t))[0] for c, t in windows))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding with the runtime's prefill/decode_step; stops at EOS or a stop string."""
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ctx = self.tok_encode(context)[-max(1, self.max_length - max_new):]
            rt = self.runtime(len(ctx) + max_new)
            tok, new = rt.prefill(ctx), []
            text = ""
            while True:
                if tok == self.eot_token_id:
                    break
                new.append(tok)
                text = self.tokenizer.decode(new)
                if any(s in text for s in until) or len(new) >= max_new:
                    break
                tok = rt.decode_step(tok)
            for s in until:   # lm-eval expects the text before the first stop string
                text = text.split(s)[0]
            out.append(text)
        return out
