"""Every artifact in the runtime it ships in, behind one narrow interface.

    rt = open_runtime(artifact, threads=2, vocab=49152)   # picks by artifact.meta["format"]
    lp = rt.logprobs(ids)          # [len(ids), vocab] float32 log-softmax of next-token logits
    tok = rt.prefill(prompt_ids)   # evaluate a prompt from an empty cache -> greedy next token
    tok = rt.decode_step(tok)      # append one token -> greedy next token
    rt.close()

HF artifacts run in torch (fp32, CPU; bitsandbytes artifacts on CUDA when present); GGUF artifacts
run in llama.cpp (llama-cpp-python) and ONNX artifacts in onnxruntime, never as de-quantized torch
weights, so the numbers are the ones a user ships. Token ids always come
from the teacher's tokenizer: the runtimes take ids, not text. `vocab` trims the logits to the
teacher tokenizer's length before the softmax, so a model whose embedding matrix is padded
(Qwen2.5: 151936 rows for 151665 tokens) compares entry for entry with one that is not.

torch, transformers and llama_cpp are imported inside the runtimes so that the memory child
process (compress.evaluate.memory) loads only what the artifact's own runtime needs.
"""
from __future__ import annotations

import os
from pathlib import Path

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
    if artifact.meta["format"] == "onnx":
        return OnnxRuntime(artifact.file, threads, vocab=vocab, n_ctx=n_ctx)
    return LlamaCppRuntime(artifact.file, threads, vocab=vocab, n_ctx=n_ctx, all_logits=all_logits)


def check_format(artifact) -> str:
    """The runtime name for an artifact's format; UserError for formats nothing can run."""
    from ..formats import RUNTIMES
    fmt = artifact.meta.get("format")
    if fmt not in RUNTIMES:
        raise UserError(f"artifact {artifact.path} has format '{fmt}', which has no runtime; "
                        f"evaluate takes {' or '.join(RUNTIMES)} artifacts")
    return RUNTIMES[fmt]


def _check_vocab(vocab: int | None, n_vocab: int, where) -> int:
    if vocab is None:
        return n_vocab
    if vocab > n_vocab:
        raise UserError(f"{where} has {n_vocab} output tokens but the teacher tokenizer has {vocab}; "
                        f"evaluate artifacts that share the teacher's tokenizer")
    return vocab


class TorchRuntime:
    """An HF directory in torch with a KV cache for decoding: fp32 on CPU, or a bitsandbytes
    artifact on CUDA when present (CPU otherwise; `device` says which)."""
    name = "torch"

    def __init__(self, path, threads: int, *, vocab: int | None = None):
        import torch
        self._torch = torch
        self._old_threads = torch.get_num_threads()
        torch.set_num_threads(threads)   # process-wide; restored by close()
        self.device = "cpu"
        if _bnb_quantized(path):
            self.model, self.device = _load_bnb(path)
            self.name = f"torch+bitsandbytes ({self.device})"
        else:
            from ..models import load_model
            self.model = load_model(str(path), dtype=torch.float32)
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self.vocab = _check_vocab(vocab, self.n_vocab, path)
        self._past = None

    def _ids(self, ids: list[int]):
        return self._torch.tensor([ids], device=self.device)

    def logprobs(self, ids: list[int]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            logits = self.model(self._ids(ids), use_cache=False).logits[0, :, :self.vocab]  # [T, V]
        return log_softmax(logits.float().cpu().numpy())

    def _step(self, ids: list[int]) -> int:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(self._ids(ids), past_key_values=self._past, use_cache=True,
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


def _bnb_quantized(path) -> bool:
    import json
    try:
        q = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return q.get("quant_method") == "bitsandbytes"


def _load_bnb(path):
    """A bitsandbytes artifact where a server would run it: CUDA when present, else CPU."""
    from ..quantize.bnb import device, require
    from ..models import check_safetensors, quiet_transformers
    from transformers import AutoModelForCausalLM
    require()
    quiet_transformers()
    check_safetensors(Path(path))
    where = device()
    model = AutoModelForCausalLM.from_pretrained(str(path), device_map=where, use_safetensors=True)
    return model.eval(), where


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


class OnnxRuntime:
    """An ONNX decoder (compress.export.onnx layout) in onnxruntime's CPU provider.

    The KV cache is the graph's own present -> past outputs, fed back each step as an app does.
    """
    name = "onnxruntime"

    def __init__(self, path, threads: int, *, vocab: int | None = None, n_ctx: int = 512):
        from ..export.onnx import genai_config, require
        require("evaluating an ONNX artifact", builder=False)
        import onnxruntime as ort
        path = Path(path)
        facts = genai_config(path.parent)["decoder"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3     # warnings about unused initializers are not the user's
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:   # onnxruntime raises its own Fail/InvalidProtobuf types
            raise UserError(f"onnxruntime cannot load {path} ({str(e).splitlines()[0][:200]}); the file may be "
                            f"truncated or corrupt: delete its artifact directory and re-run its stage") from None
        self.outputs = [o.name for o in self.session.get_outputs()]
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.past_names = [i.name for i in past]
        self.kv_shape = (1, int(facts["num_key_value_heads"]), 0, int(facts["head_size"]))
        self.kv_dtype = np.float16 if past and "float16" in past[0].type else np.float32
        self.n_ctx = n_ctx
        self.n_vocab = int(self.session.get_outputs()[0].shape[-1])
        self.vocab = _check_vocab(vocab, self.n_vocab, path)
        self._past: dict | None = None

    def extend(self, past: dict | None, ids: list[int]) -> tuple[np.ndarray, dict]:
        """Logits [len(ids), V] (fp32) of `ids` after the KV cache `past` (None: empty), and the
        cache that includes them. The caller owns both: a cache cropped along its sequence axis
        (v[:, :, :p]) continues from position p, which is how shared prompts are reused."""
        if past is None:
            past = {n: np.zeros(self.kv_shape, self.kv_dtype) for n in self.past_names}
        total = (next(iter(past.values())).shape[2] if past else 0) + len(ids)
        if total > self.n_ctx:
            raise ValueError(f"{total} tokens exceed the context of {self.n_ctx} this runtime was opened with")
        feed = {"input_ids": np.asarray([ids], dtype=np.int64),
                "attention_mask": np.ones((1, total), dtype=np.int64), **past}
        out = dict(zip(self.outputs, self.session.run(None, feed)))
        present = {k.replace("present.", "past_key_values.", 1): v for k, v in out.items() if k.startswith("present.")}
        return out["logits"][0].astype(np.float32), present

    def _run(self, ids: list[int]) -> np.ndarray:
        """Append `ids` to the runtime's own cache; logits [len(ids), V] (fp32)."""
        logits, self._past = self.extend(self._past, ids)
        return logits

    def logprobs(self, ids: list[int]) -> np.ndarray:
        self._past = None
        return log_softmax(self._run(ids)[:, :self.vocab])

    def prefill(self, ids: list[int]) -> int:
        self._past = None
        return int(np.argmax(self._run(ids)[-1, :self.vocab]))

    def decode_step(self, token: int) -> int:
        return int(np.argmax(self._run([token])[-1, :self.vocab]))

    def close(self) -> None:
        self.session = self._past = None
