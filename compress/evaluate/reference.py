"""Reference stage: the teacher's log-probs on fixed token ids, which every artifact is scored against.

    compress run profile=phone stages=[reference]     # redo the references and every evaluation

`reference/` holds the held-out texts (the data stage's split) tokenised once with the teacher's
tokenizer, cut into eval.seqs rows of eval.seq_len tokens (ids.npy [n, L] int64), and the teacher's
log-probs on them (logprobs.npy [n, L, V] float16), computed in torch from the teacher HF artifact.
`reference-ood/` is the same for the out-of-domain text (eval.ood). Every evaluation reads them, so
every artifact is scored on the same token ids.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np

from .. import artifacts
from ..config import host_cores
from ..data import load_user_data, read_texts, token_stream
from ..errors import UserError
from ..stage import stage

REFERENCE = "reference"
OOD_REFERENCE = "reference-ood"


@stage("reference", inputs=("data",), reads=("eval.seqs", "eval.seq_len"), format="logprobs")
def run(cfg, src, out: Path, *, data) -> artifacts.Artifact:
    """src: the teacher HF artifact; data: the data artifact (its held-out split)."""
    return _write(src, out, lambda tok: read_texts(data, "heldout"), cfg.eval.seqs, cfg.eval.seq_len)


def has_ood(spec) -> bool:
    """eval.ood names a text to score on (builtin needs the Python stdlib sources)."""
    return spec not in (None, "none") and (spec != "builtin" or bool(builtin_ood_texts()))


def _ood_digest(cfg) -> dict:
    """The out-of-domain text's content hash: an edited file is a new reference."""
    spec = cfg.eval.ood
    text = "\0".join(builtin_ood_texts()).encode() if spec == "builtin" else Path(spec).expanduser().read_bytes()
    return {"sha256": hashlib.sha256(text).hexdigest()}


@stage("reference", reads=("eval.ood", "eval.ood_seqs", "eval.seq_len"), format="logprobs", extra=_ood_digest)
def run_ood(cfg, src, out: Path) -> artifacts.Artifact:
    """src: the teacher HF artifact; the text is eval.ood (builtin, or a .txt/.jsonl)."""
    spec = cfg.eval.ood
    texts = (lambda tok: list(builtin_ood_texts())) if spec == "builtin" else (lambda tok: load_user_data(spec, tok))
    return _write(src, out, texts, cfg.eval.ood_seqs, cfg.eval.seq_len)


def _write(teacher, out: Path, texts_of, seqs: int, seq_len: int) -> artifacts.Artifact:
    if teacher.meta.get("format") != "hf":
        raise UserError(f"the teacher artifact {teacher.path} must be an HF model (format hf) to compute "
                        f"reference log-probs; re-run the teacher stage")
    from ..models import load_tokenizer
    from .runtimes import TorchRuntime
    tok = load_tokenizer(str(teacher.path))
    ids = heldout_ids(tok, texts_of(tok), seqs, seq_len)
    with artifacts.writing(out) as (tmp, meta):
        np.save(tmp / "ids.npy", ids)
        # this host's cores: log-probs are the same whatever the device profile says
        rt = TorchRuntime(teacher.path, host_cores(), vocab=len(tok))
        try:
            lp = np.lib.format.open_memmap(tmp / "logprobs.npy", mode="w+", dtype=np.float16,
                                           shape=(ids.shape[0], ids.shape[1], rt.vocab))
            for i, row in enumerate(ids):   # one sequence at a time: memory O(L * V)
                lp[i] = rt.logprobs([int(t) for t in row])
            lp.flush()
            del lp
        finally:
            rt.close()
        meta["metrics"] = {"n_seqs": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                           "vocab": int(rt.vocab), "tokens": int(ids.size)}
    return artifacts.load(out)


def load(ref: artifacts.Artifact) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n, L] int64, teacher log-probs [n, L, V] float16 memmap)."""
    return np.load(ref.path / "ids.npy"), np.load(ref.path / "logprobs.npy", mmap_mode="r")


def heldout_ids(tokenizer, texts: list[str], seqs: int, seq_len: int) -> np.ndarray:
    """Texts -> [n, L] int64: documents joined with EOS and cut into n <= seqs rows of L tokens.

    L is seq_len, or the whole stream when it is shorter than one sequence.
    """
    stream = token_stream(tokenizer, texts, limit=seqs * seq_len)
    length = min(seq_len, len(stream))
    if length < 2:
        raise UserError("held-out data is empty (no text to score the artifacts on); give data= "
                        "with more text or a larger gen.heldout fraction, then re-run the data stage")
    n = min(seqs, len(stream) // length)
    return np.asarray(stream[:n * length], dtype=np.int64).reshape(n, length)


# Out-of-domain default: source code, a domain far from chat answers, that every Python install
# carries. A slice from the middle of each module (past licence headers and docstrings).
OOD_MODULES = ("textwrap", "heapq", "fractions", "shlex", "bisect", "difflib", "calendar", "statistics")
OOD_CHARS = 2000


@functools.lru_cache(maxsize=1)   # has_ood, the identity's digest and the stage all read it
def builtin_ood_texts() -> tuple[str, ...]:
    import sysconfig
    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for mod in OOD_MODULES:
        try:
            src = (lib / f"{mod}.py").read_text()
        except OSError:
            continue
        start = src.find("\n", len(src) // 2) + 1
        texts.append(src[start:start + OOD_CHARS])
    return tuple(texts)
