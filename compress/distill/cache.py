"""Offline teacher signal: the teacher's top-k log-probs for every training token, computed once.

    compress run profile=phone distill.teacher_cache=topk:32 distill.loss=topk:0.9,ce:0.1

The cache lives in runs/<name>/teacher-cache/topk<K>-<key>/ as two .npy files opened memory-mapped:
ids.npy int32 [rows, seq_len, K] and logp.npy float16 [rows, seq_len, K] (6*K bytes per token,
against 4*V for fp32 logits: 192 B vs 196 KB at K=32, V=49,152). The key hashes the teachers,
their weights, the packed token ids and K, so a re-run with other training settings (lr, tokens,
loss weights, a later epoch) reads the same cache and never loads a teacher. It is written to a
temporary sibling and renamed into place when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import kd, losses


def key(teacher_ids: list[str], weights: list[float], seqs: torch.Tensor, k: int) -> str:
    h = hashlib.sha256(json.dumps([teacher_ids, weights, k]).encode())
    h.update(seqs.numpy().astype(np.int32).tobytes())
    return h.hexdigest()[:16]


def open_cache(path: Path):
    """(ids, logp, meta) memory-mapped, or None when no complete cache is there."""
    if not (path / "meta.json").is_file():
        return None
    ids = np.load(path / "ids.npy", mmap_mode="r")
    logp = np.load(path / "logp.npy", mmap_mode="r")
    return ids, logp, json.loads((path / "meta.json").read_text())


@torch.no_grad()
def build(path: Path, teachers: list, weights: list[float], seqs: torch.Tensor, k: int, vocab: int,
          device: str, micro: int, chunk: int = 256) -> dict:
    """Run the teachers once over `seqs` [rows, seq_len] and store their mixture's top-k at T=1."""
    rows, seq_len = seqs.shape
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ids = np.lib.format.open_memmap(tmp / "ids.npy", mode="w+", dtype=np.int32, shape=(rows, seq_len, k))
    logp = np.lib.format.open_memmap(tmp / "logp.npy", mode="w+", dtype=np.float16, shape=(rows, seq_len, k))
    parts = [kd.body_and_head(t) for t in teachers]
    t0 = time.time()
    for lo in range(0, rows, micro):
        x = seqs[lo:lo + micro].to(device)                                     # [b, S]
        flat = [body(input_ids=x).last_hidden_state.reshape(x.numel(), -1) for body, _ in parts]   # [b*S, H]
        out_v, out_i = [], []
        for c in range(0, x.numel(), chunk):
            lp = losses.mix_teachers([torch.log_softmax(head(h[c:c + chunk])[:, :vocab].float(), -1)
                                      for (_, head), h in zip(parts, flat)], weights)   # [c, V]
            v, i = lp.topk(k, dim=-1)
            out_v.append(v)
            out_i.append(i)
        b = x.size(0)
        logp[lo:lo + b] = torch.cat(out_v).view(b, seq_len, k).cpu().numpy().astype(np.float16)
        ids[lo:lo + b] = torch.cat(out_i).view(b, seq_len, k).cpu().numpy().astype(np.int32)
    ids.flush()
    logp.flush()
    del ids, logp
    meta = {"k": k, "rows": rows, "seq_len": seq_len, "vocab": vocab, "bytes_per_token": k * (4 + 2),
            "bytes": rows * seq_len * k * 6, "build_s": round(time.time() - t0, 2)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return meta


def rows_of(cache, rows: list[int]) -> tuple:
    """The cached (ids [b, S, K] int64, log-probs [b, S, K] fp32) of some training rows."""
    ids, logp, _ = cache
    return torch.from_numpy(np.asarray(ids[rows])).long(), torch.from_numpy(np.asarray(logp[rows])).float()
