"""Every artifact in the runtime it ships in, behind one narrow interface.

    rt = open_runtime(artifact, threads=2, vocab=49152)   # picks by artifact.meta["format"]
    lp = rt.logprobs(ids)          # [len(ids), vocab] float32 log-softmax of next-token logits
    tok = rt.prefill(prompt_ids)   # evaluate a prompt from an empty cache -> greedy next token
    tok = rt.decode_step(tok)      # append one token -> greedy next token
    rt.close()

HF artifacts run in torch (fp32, CPU); GGUF artifacts run in llama.cpp (llama-cpp-python), never
as de-quantized torch weights, so the numbers are the ones a user ships. Token ids always come
from the teacher's tokenizer: the runtimes take ids, not text. `vocab` trims the logits to the
teacher tokenizer's length before the softmax, so a model whose embedding matrix is padded
(Qwen2.5: 151936 rows for 151665 tokens) compares entry for entry with one that is not.

torch, transformers and llama_cpp are imported inside the runtimes so that the memory child
process (compress.evaluate.memory) loads only what the artifact's own runtime needs.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import UserError
from .quality import log_softmax


def open_runtime(artifact, threads: int, *, vocab: int | None = None, n_ctx: int = 512,
                 all_logits: bool = True):
    """The runtime for `artifact` (an artifacts.Artifact).

    all_logits=False is the deployment setting for speed and memory: llama.cpp then computes the
    output layer only for the last position of a batch (logprobs() needs True).
    """
    check_format(artifact)
    if artifact.meta["format"] == "hf":
        return TorchRuntime(artifact.path, threads, vocab=vocab)
    return LlamaCppRuntime(artifact.file, threads, vocab=vocab, n_ctx=n_ctx, all_logits=all_logits)


RUNTIME_OF_FORMAT = {"hf": "torch", "gguf": "llama.cpp"}


def check_format(artifact) -> str:
    """The runtime name for an artifact's format; UserError for formats nothing can run."""
    fmt = artifact.meta.get("format")
    if fmt not in RUNTIME_OF_FORMAT:
        raise UserError(f"artifact {artifact.path} has format '{fmt}', which has no runtime; "
                        f"evaluate takes {' or '.join(RUNTIME_OF_FORMAT)} artifacts")
    return RUNTIME_OF_FORMAT[fmt]


def _check_vocab(vocab: int | None, n_vocab: int, where) -> int:
    if vocab is None:
        return n_vocab
    if vocab > n_vocab:
        raise UserError(f"{where} has {n_vocab} output tokens but the teacher tokenizer has {vocab}; "
                        f"evaluate artifacts that share the teacher's tokenizer")
    return vocab


class TorchRuntime:
    """An HF directory in torch, fp32 on CPU, with a KV cache for decoding."""
    name = "torch"

    def __init__(self, path, threads: int, *, vocab: int | None = None):
        import torch
        from ..models import load_model
        self._torch = torch
        self._old_threads = torch.get_num_threads()
        torch.set_num_threads(threads)   # process-wide; restored by close()
        self.model = load_model(str(path), dtype=torch.float32)
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self.vocab = _check_vocab(vocab, self.n_vocab, path)
        self._past = None

    def logprobs(self, ids: list[int]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            logits = self.model(torch.tensor([ids]), use_cache=False).logits[0, :, :self.vocab]  # [T, V]
        return log_softmax(logits.float().numpy())

    def _step(self, ids: list[int]) -> int:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.tensor([ids]), past_key_values=self._past, use_cache=True,
                             logits_to_keep=1)   # only the last position's logits, as a server would
        self._past = out.past_key_values
        return int(out.logits[0, -1, :self.vocab].argmax())

    def prefill(self, ids: list[int]) -> int:
        self._past = None
        return self._step(ids)

    def decode_step(self, token: int) -> int:
        return self._step([token])

    def close(self) -> None:
        self.model = self._past = None
        self._torch.set_num_threads(self._old_threads)


class LlamaCppRuntime:
    """A GGUF file in llama.cpp, through llama-cpp-python's Llama.eval (no text in, no sampler)."""
    name = "llama.cpp"

    def __init__(self, path, threads: int, *, vocab: int | None = None, n_ctx: int = 512,
                 all_logits: bool = True):
        import llama_cpp
        self._llama_cpp = llama_cpp
        if not str(path).endswith(".gguf") or not os.path.isfile(path):
            raise UserError(f"{path} is not a .gguf file; re-run the export/quantize stage that makes it")
        # One batch holds a whole sequence, so logprobs() is a single llama_decode call.
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                       n_threads_batch=threads, logits_all=all_logits, verbose=False)
        except ValueError as e:   # llama.cpp refuses truncated/corrupt files ("Failed to load model")
            raise UserError(f"llama.cpp cannot load {path} ({e}); the file may be truncated or corrupt: "
                            f"delete its artifact directory and re-run the export/quantize stage") from None
        self.all_logits = all_logits
        self.n_ctx = n_ctx
        self.n_vocab = int(self.llm.n_vocab())
        self.vocab = _check_vocab(vocab, self.n_vocab, path)

    def _fits(self, n: int) -> None:
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens exceed the context of {self.n_ctx} this runtime was opened with")

    def logprobs(self, ids: list[int]) -> np.ndarray:
        if not self.all_logits:
            raise ValueError("logprobs() needs a runtime opened with all_logits=True")
        self._fits(len(ids))
        self.llm.reset()
        self.llm.eval(ids)
        return log_softmax(self.llm.scores[:len(ids), :self.vocab])   # [T, V]

    def _next(self) -> int:
        if self.all_logits:
            row = self.llm.scores[self.llm.n_tokens - 1]
        else:   # only the batch's last position has logits; read it straight from the context
            ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
            row = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return int(np.argmax(row[:self.vocab]))

    def prefill(self, ids: list[int]) -> int:
        self._fits(len(ids))
        self.llm.reset()
        self.llm.eval(ids)
        return self._next()

    def decode_step(self, token: int) -> int:
        self._fits(self.llm.n_tokens + 1)
        self.llm.eval([token])
        return self._next()

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None
