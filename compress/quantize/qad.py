"""Quantization-aware distillation into a GGUF file: the blocks llama.cpp's quantizer wrote, with
their scales (and mins) trained against the teacher, written back into the same file.

    compress run profile=phone qad.types=[Q4_0]          # -> teacher-gguf-Q4_0-qad, gguf-Q4_0-qad
    from compress.quantize import qad
    art = qad.run(cfg, plain_q4_0, run_dir / "gguf-Q4_0-qad", hf=distilled, teacher=teacher, data=data)

It starts from the plain file (llama.cpp's quantizer with the importance matrix), loads every matrix
of it into the HF model as the values llama.cpp computes (so the torch model is the file's model),
trains the block scales of each matrix whose type has a tuner (blocks.TUNABLE) on train-split
tokens against the teacher's distributions (tune.py), and writes the trained float16 scales and
mins into a copy of the plain file's bytes: the integer codes, every other tensor and the metadata
are untouched, the file size is identical, and no F16 is quantized again (a fresh quantization
would undo what was learned). K-quants (Q2_K to Q6_K) keep their codes too: their sub-block
scales and mins train continuously and are then put on the file's grid of float16 super-scales
times small integers (tune.Gridded). Tensors of other types stay as llama.cpp wrote them and
meta.json lists them. Before shipping, the tuned and the plain file are
both scored in llama.cpp on train tokens set aside from tuning; the plain blocks ship if tuning
lost (metrics.shipped).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from .. import artifacts
from ..errors import UserError
from ..formats import GGUF_QUANT
from ..stage import current, stage
from .blocks import TUNABLE, Blocks, pack, unpack
from .kquants import KBlocks
from .header import tensors_of

OUT_FILE = "model.gguf"
CHECK = 512     # train tokens set aside to decide tuned vs plain in llama.cpp


# What a tuned file is made of; qad.types and qad.of only decide which files the pipeline tunes.
READS = ("qad.tokens", "qad.seq_len", "qad.batch", "qad.lr", "qad.checkpoint_every", "qad.sampled",
         "qad.hidden")


@stage("qad", inputs=("hf", "teacher", "data"), reads=READS, format="gguf")
def run(cfg, src, out, *, hf, teacher, data) -> artifacts.Artifact:
    """Plain quantized GGUF artifact `src` (made from HF artifact `hf`) -> tuned GGUF at `out`."""
    from ..models import load_tokenizer
    from . import gguf as quantize_gguf
    from .mix import logprobs
    qtype = src.meta.get("quant")
    if qtype not in GGUF_QUANT or src.meta.get("stage") != "quantize":
        raise UserError(f"quantization-aware distillation starts from a file of llama.cpp's quantizer; "
                        f"{src.name} is {qtype or 'not quantized'}")
    check_budget(cfg.qad)
    check_source(hf)
    target, model = models_of(hf, teacher)
    stored = tensors_of(src.file)
    plan, tunable, perms, blocks, layers = file_model(model, stored)
    if not tunable:
        raise UserError(f"{src.name} holds no tensor of a type qad can tune ({', '.join(TUNABLE)}); "
                        f"tune a file of those types or a k-quant mix of them (Q4_K_M, Q3_K_M, Q2_K …)")
    seqs, check = train_tokens(load_tokenizer(str(hf.path)), data, cfg.qad.tokens, cfg.qad.seq_len)
    with artifacts.writing(out, quant=qtype, file=OUT_FILE) as (tmp, meta):
        history = train(cfg, model, target, seqs, out, own_copy=hf.path == teacher.path)
        trained = {g: gguf_blocks(blocks[g], layers[n], perms.get(n)) for n, g in tunable.items()}
        write(Path(src.file), tmp / OUT_FILE, trained)
        checked = check_files(target, check, Path(src.file), tmp / OUT_FILE, logprobs)
        shipped = "plain" if checked and checked["tuned_kld"] > checked["plain_kld"] else "tuned"
        if shipped == "plain":
            shutil.copyfile(src.file, tmp / OUT_FILE)
        quantize_gguf.modelfile(src, tmp)
        kept = {g: stored[g].type for g in plan.values() if g not in blocks}
        meta["params"] = src.meta.get("params")
        meta["metrics"] = {
            "plain": src.name, "qtype": qtype, **budget_of(cfg.qad, history, seqs),
            "tuned_tensors": len(tunable), "tuned_types": sorted({stored[g].type for g in tunable.values()}),
            "kept_tensors": kept, "kept_types": sorted(set(kept.values())), "check": checked,
            "shipped": shipped, "device": history["device"], "tensor_types": src.meta.get("metrics", {}).get("tensor_types")}
    drop_checkpoints(out)
    return artifacts.load(out)


def models_of(hf, teacher):
    """(the teacher, the model the file was made from), each loaded once: a copy when they are one."""
    import copy
    from ..models import load_model
    target = load_model(str(teacher.path))
    return target, copy.deepcopy(target) if hf.path == teacher.path else load_model(str(hf.path))


def file_model(model, stored: dict):
    """Make `model` the file's model: every matrix the values the file holds, and each one of a type
    with a tuner (that multiplies: the embedding table is looked up) a Blockwise layer of its
    blocks. Returns (plan, tunable, perms, blocks, layers): {HF name: GGUF name} of every matrix
    and of the tuned ones, row orders, {GGUF name: Blocks}, {HF name: Blockwise}."""
    from .tune import attach
    plan = match(model, stored)
    tunable = {n: g for n, g in plan.items() if stored[g].type in TUNABLE and is_linear(model, n)}
    perms = row_orders(model.config, plan)
    blocks = {g: unpack(np.asarray(stored[g].data), stored[g].type, stored[g].cols) for g in tunable.values()}
    load_fixed(model, stored, plan, perms, skip=set(tunable))
    layers = attach(model, {n: hf_rows(blocks[g], perms.get(n)) for n, g in tunable.items()})
    return plan, tunable, perms, blocks, layers


def drop_checkpoints(out: Path) -> None:
    """The artifact now holds the result: its checkpoints go, and the folder when it is empty."""
    ckpt = checkpoint_dir(out)
    shutil.rmtree(ckpt, ignore_errors=True)
    if ckpt.parent.is_dir() and not any(ckpt.parent.iterdir()):
        ckpt.parent.rmdir()


def check_source(hf) -> None:
    """The weights a quantized file was made from: an unquantized HF model."""
    if hf.meta.get("format") != "hf":
        raise UserError(f"quantization-aware distillation tunes a file against the HF model it was made from; "
                        f"{hf.name} is a {hf.meta.get('format')} file, not an HF model")
    if hf.meta.get("stage") == "quantize":
        raise UserError(f"quantization-aware distillation tunes a file against the unquantized model it was made "
                        f"from; {hf.name} is already quantized ({hf.meta.get('quant')}): give the HF model")


def check_budget(q) -> None:
    """config.check_qad's rule, for a stage called directly."""
    from ..config import check_qad_budget
    check_qad_budget(q)


def checkpoint_dir(out: Path) -> Path:
    ident = current()
    return out.parent / "checkpoints" / f"{out.name}-{ident.hash if ident else 'direct'}"


def train(cfg, model, target, seqs, out: Path, own_copy: bool = False) -> dict:
    """Tune `model`'s Blockwise layers against the teacher model `target` (tune.py), on CUDA when
    there is one, and put K-quant scales on their grid (tune.Gridded.snap); both models are back
    on the CPU afterwards."""
    import torch
    from .tune import Gridded, tune
    q = cfg.qad
    # the hidden-state term only where each layer has a twin in the teacher: its own quantized copy
    # (a student of the teacher's shape still computes other hidden states)
    hidden = q.hidden if own_copy else 0.0
    steps = max(1, q.tokens // (q.seq_len * q.batch))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()

    def log(step, total, loss):
        if step == 1 or step % 10 == 0 or step == total:
            print(f"  qad step {step}/{total}  KL {loss:.4f}  {time.time() - t0:.0f} s", flush=True)
    try:
        model.to(device), target.to(device)
        seqs, sampled = with_sampled(target, seqs, q.sampled, checkpoint_dir(out))
        history = tune(model, target, seqs, steps, q.lr, checkpoint_dir(out),
                       q.checkpoint_every, batch=q.batch, log=log, hidden=hidden)
        for layer in model.modules():      # a resumed run snaps the same checkpointed scales
            if isinstance(layer, Gridded):
                layer.snap()
    finally:
        model.cpu(), target.cpu()
    return history | sampled | {"device": device, "hidden": hidden}


def with_sampled(target, seqs, fraction: float, ckpt: Path):
    """(`seqs` with round(fraction * N) of its N rows replaced by text the teacher writes itself from
    a random first token, {"sampled_seqs", "sample_seconds"}). The run's data is one domain; the teacher's own samples
    (LLM-QAT's data-free recipe) reach what it says elsewhere, so the scales are not fitted to one
    domain alone. The samples are saved beside the checkpoints: a resumed run trains on the same text."""
    import torch
    n = round(fraction * len(seqs))
    if n == 0:
        return seqs, {"sampled_seqs": 0, "sample_seconds": 0.0}
    t0 = time.time()
    path = ckpt / "sampled.pt"
    if path.is_file():
        sampled = torch.load(path, weights_only=True)
    else:
        sampled = sample_text(target, n, seqs.shape[1])
        ckpt.mkdir(parents=True, exist_ok=True)
        torch.save(sampled, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    rows = seqs.clone()
    at = ((torch.arange(n) + 0.5) * len(seqs) / n).long()   # spread through the cycle, not bunched
    rows[at] = sampled
    return rows, {"sampled_seqs": n, "sample_seconds": round(time.time() - t0, 1)}


def sample_text(target, n: int, length: int, batch: int = 16, seed: int = 0):
    """[n, length] token ids the teacher samples at temperature 1 from the whole vocabulary, each
    row after a uniformly random first token; no end of text within a row."""
    import torch
    device = next(target.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        first = torch.randint(target.config.vocab_size, (n, 1), device=device)
        out = []
        for i in range(0, n, batch):
            x = first[i:i + batch]
            with torch.inference_mode():
                out.append(target.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0,
                                           top_k=0, top_p=1.0, max_new_tokens=length - 1,
                                           min_new_tokens=length - 1, pad_token_id=0).cpu())
    return torch.cat(out)


def budget_of(q, history: dict, seqs) -> dict:
    seconds = history.get("seconds", 0.0)
    tokens = history["steps"] * q.batch * q.seq_len
    return {"tokens": tokens, "steps": history["steps"], "unique_tokens": int(seqs.numel()),
            "seconds": round(seconds, 1), "ms_per_token": round(1000 * seconds / max(tokens, 1), 2),
            "sampled_seqs": history["sampled_seqs"], "sample_seconds": history["sample_seconds"],
            "hidden": history["hidden"],
            "loss_first": history["loss"][0] if history["loss"] else None,
            "loss_last": history["loss"][-1] if history["loss"] else None}


# ---------------------------------------------------------------- the file <-> the HF model

def match(model, stored: dict) -> dict[str, str]:
    """{HF module name: GGUF tensor name} of every matrix of the model the file holds.

    A tied output layer is the embedding table (token_embd.weight) and appears once, as the embedding."""
    from ..export.gguf import gguf_name, tensor_name_map
    names = tensor_name_map(model.config)
    plan = {}
    seen = set()
    for mod_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or id(weight) in seen:
            continue
        seen.add(id(weight))
        g = gguf_name(names, mod_name + ".weight")
        if g not in stored:
            raise UserError(f"the quantized file has no tensor {g} for {mod_name}; it was made from another model")
        plan[mod_name] = g
    return plan


def is_linear(model, name: str) -> bool:
    import torch
    return isinstance(model.get_submodule(name), torch.nn.Linear)


def row_orders(config, plan: dict[str, str]) -> dict[str, np.ndarray]:
    """{HF module name: p} for the matrices whose rows the GGUF export reorders (Q and K under
    llama.cpp's rope layout): GGUF row i is HF row p[i]."""
    from ..export.gguf import arch_spec, head_dim, permute_qk
    if not arch_spec(config).permute_qk:
        return {}
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    out = {}
    for name, g in plan.items():
        heads = n_head if ".attn_q." in g else n_kv if ".attn_k." in g else None
        if heads:
            out[name] = permute_qk(np.arange(head_dim(config) * heads)[:, None], heads)[:, 0]
    return out


def load_fixed(model, stored: dict, plan: dict, perms: dict, skip: set) -> None:
    """Give every matrix not tuned the values the file holds (llama.cpp's dequantization), so the
    torch model computes what llama.cpp will."""
    import torch
    from gguf import GGMLQuantizationType, dequantize
    for name, g in plan.items():
        if name in skip:
            continue
        t = stored[g]
        w = dequantize(np.asarray(t.data), GGMLQuantizationType[t.type]).reshape(t.rows, t.cols)
        if name in perms:
            w = w[np.argsort(perms[name])]
        weight = model.get_submodule(name).weight
        weight.data.copy_(torch.from_numpy(np.ascontiguousarray(w)).to(weight.dtype))


def hf_rows(b: Blocks | KBlocks, perm) -> tuple:
    """(q, d, m) in the HF module's row order, and for a K-quant its grid (D, Dmin, sc range)."""
    inv = slice(None) if perm is None else np.argsort(perm)
    rows = (b.q[inv].astype(np.int8), b.d[inv], None if b.m is None else b.m[inv])
    if isinstance(b, KBlocks):
        rows += ((b.D[inv], None if b.Dmin is None else b.Dmin[inv], b.scale_range()),)
    return rows


def gguf_blocks(b: Blocks | KBlocks, layer, perm) -> Blocks | KBlocks:
    """The trained scales (and mins) with the file's codes, in GGUF row order."""
    order = slice(None) if perm is None else perm
    if isinstance(b, KBlocks):
        D, sc, Dmin, mn = (None if x is None else x.detach().numpy()[order] for x in layer.ints())
        return KBlocks(b.qtype, b.q, D, sc.astype(np.int16), Dmin, None if mn is None else mn.astype(np.int16))
    d, m = (x.detach().numpy() if x is not None else None for x in layer.stored())
    return Blocks(b.qtype, b.q, d[order], None if m is None else m[order])


def write(src: Path, dst: Path, trained: dict[str, Blocks]) -> None:
    """A copy of `src` with the trained tensors' blocks written over their bytes."""
    shutil.copyfile(src, dst)
    stored = tensors_of(dst, mode="r+")
    for g, b in trained.items():
        stored[g].data[:] = pack(b)
    if stored:
        next(iter(stored.values())).data.base.flush()   # every tensor is a view of one memory map


# ---------------------------------------------------------------- data and the check

def train_tokens(tok, data, tokens: int, seq_len: int):
    """([N, seq_len] training sequences, CHECK further train tokens) from the train split only: the
    held-out and out-of-domain sets stay unseen. The sequences are cycled when N * seq_len < tokens."""
    import torch
    from ..data import read_texts, token_stream
    ids = token_stream(tok, read_texts(data, "train"), limit=tokens + CHECK)
    check = ids[-CHECK:] if len(ids) >= 4 * CHECK else []
    ids = ids[:len(ids) - len(check)]
    n = min(len(ids), tokens) // seq_len
    if n == 0:
        raise UserError(f"the train split has {len(ids)} tokens, fewer than one qad.seq_len={seq_len} sequence; "
                        f"give more data or lower qad.seq_len")
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len), check


def reference(target, ids: list[int]):
    import torch
    with torch.inference_mode():
        return torch.log_softmax(target(torch.tensor([ids])).logits[0].float(), -1).numpy()


def check_files(target, ids: list[int], plain: Path, tuned: Path, logprobs) -> dict | None:
    """KL(teacher || file) on the set-aside train tokens for the plain and tuned files, each in its
    runtime (`logprobs(path, ids)`: mix.logprobs for llama.cpp, qad_onnx.logprobs for onnxruntime)."""
    if not ids:
        return None
    from ..evaluate.quality import kld
    ref = reference(target, ids)
    return {"tokens": len(ids), "plain_kld": kld(ref, logprobs(plain, ids)), "tuned_kld": kld(ref, logprobs(tuned, ids))}
