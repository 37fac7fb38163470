"""Quality of an artifact against the teacher, from log-probabilities on the same token ids.

All functions are pure numpy. Shapes: T positions, V vocabulary entries; `ref` is the teacher's
log-probs (may be a float16 memmap), `lp` the artifact's (float32). Row t is the distribution
over the token that follows position t, so ids[t + 1] is the target of row t.

    nll = token_nll(lp, ids)            # [T-1] nats
    kl  = kl_per_token(ref, lp)         # [T]   KL(teacher || artifact), nats
    hit = top1_match(ref, lp)           # [T]   argmax agreement
"""
from __future__ import annotations

import numpy as np

CHUNK = 64   # rows converted to float32 at a time: memory stays O(CHUNK * V), not O(T * V)


def _normalize(x: np.ndarray) -> np.ndarray:
    """Rows of log-probs [n, V] -> float32 rows that exactly log-sum-exp to 0.

    A float16 reference loses ~1e-3 per entry, so its exp no longer sums to 1; renormalizing
    keeps KL(p || p) at 0 and KL >= 0 for stored references.
    """
    x = np.asarray(x, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Logits [..., V] -> float32 log-probs [..., V] (row-wise, stable)."""
    return _normalize(logits)


def _chunks(n: int):
    for i in range(0, n, CHUNK):
        yield slice(i, min(n, i + CHUNK))


def token_nll(lp: np.ndarray, ids) -> np.ndarray:
    """lp [T, V], ids [T] -> [T-1] negative log-likelihood of ids[t + 1] under row t."""
    ids = np.asarray(ids, dtype=np.int64)
    if lp.shape[0] != len(ids):
        raise ValueError(f"log-probs have {lp.shape[0]} rows for {len(ids)} ids")
    rows = np.arange(len(ids) - 1)
    return -np.asarray(lp[rows, ids[1:]], dtype=np.float64)


def perplexity(lp: np.ndarray, ids) -> float:
    """exp(mean NLL) of predicting ids[t + 1] from position t; lp [T, V], ids [T]."""
    nll = token_nll(lp, ids)
    return float(np.exp(nll.mean())) if nll.size else float("nan")


def kl_per_token(ref: np.ndarray, lp: np.ndarray) -> np.ndarray:
    """ref, lp [T, V] log-probs -> [T] KL(ref || lp) = sum_v p_v (log p_v - log q_v), nats."""
    if ref.shape != lp.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs artifact {lp.shape}")
    out = np.empty(ref.shape[0], dtype=np.float64)
    for s in _chunks(ref.shape[0]):
        r, q = _normalize(ref[s]), _normalize(lp[s])
        out[s] = (np.exp(r) * (r - q)).sum(axis=-1, dtype=np.float64)
    return np.maximum(out, 0.0)   # tiny negative values are float rounding, not information


def kld(ref: np.ndarray, lp: np.ndarray) -> float:
    """Mean KL(teacher || artifact) per token, nats; ref, lp [T, V]."""
    return float(kl_per_token(ref, lp).mean())


def top1_match(ref: np.ndarray, lp: np.ndarray) -> np.ndarray:
    """ref, lp [T, V] -> [T] bool: does the artifact's most likely next token equal the teacher's."""
    if ref.shape != lp.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs artifact {lp.shape}")
    out = np.empty(ref.shape[0], dtype=bool)
    for s in _chunks(ref.shape[0]):
        out[s] = np.argmax(ref[s], axis=-1) == np.argmax(lp[s], axis=-1)
    return out


def top1(ref: np.ndarray, lp: np.ndarray) -> float:
    """Fraction of positions where teacher and artifact agree on the argmax; ref, lp [T, V]."""
    return float(top1_match(ref, lp).mean())


def score(ref_seqs, lp_fn, ids_seqs) -> dict:
    """Aggregate ppl / kld / top1 over sequences.

    ref_seqs [N, T, V] teacher log-probs, ids_seqs [N, T] ids, lp_fn(ids list) -> [T, V] artifact
    log-probs. PPL pools the NLL of every predicted token (not a mean of per-sequence PPLs).
    """
    nll, kl, hit = [], [], []
    for ref, ids in zip(ref_seqs, ids_seqs):
        lp = lp_fn([int(i) for i in ids])
        nll.append(token_nll(lp, ids))
        kl.append(kl_per_token(ref, lp))
        hit.append(top1_match(ref, lp))
    nll, kl, hit = np.concatenate(nll), np.concatenate(kl), np.concatenate(hit)
    return {"ppl": float(np.exp(nll.mean())), "kld": float(kl.mean()), "top1": float(hit.mean())}
