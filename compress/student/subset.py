"""Student stage: derive the student from the teacher by keeping some of its layers, with weights.

    compress run student.layers=16                      # keep 16 layers, chosen by importance
    compress run student.layers=16 student.select=even  # evenly spaced instead
    compress run student=path/to/hf_model               # any HF model sharing the teacher's tokenizer

Importance is ShortGPT's block influence, 1 - cos(layer input, layer output), averaged over
calibration tokens: a layer that barely changes its input is the cheapest to drop.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from .. import artifacts
from ..errors import UserError
from ..models import count_params, load_model, load_tokenizer, resolve_teacher, save_hf
from ..distill.teachers import check_tokenizer
from ..stage import stage


def _reads(cfg) -> tuple:
    # A given student keeps its own tokenizer only for sequence-level KD, which trains on text.
    return ("student",) + (("distill.mode", "trust_remote_code") if cfg.student.model else ())


@stage("student", inputs=("data",), reads=_reads, format="hf")
def run(cfg, src: artifacts.Artifact, out: Path, *, data: artifacts.Artifact) -> artifacts.Artifact:
    """src: the teacher artifact; data: calibration texts for the importance score."""
    tok = load_tokenizer(str(src.path))
    s = cfg.student
    if s.model:
        path, gguf_file = resolve_teacher(s.model)
        student = load_model(path, gguf_file, cfg.trust_remote_code)
        own = load_tokenizer(path, gguf_file, cfg.trust_remote_code)
        if cfg.distill.mode == "seqkd":   # trains on text: any tokenizer works, the student keeps its own
            tok = own
        else:                             # the student learns (and ships) the teacher's chat format
            check_tokenizer(own, tok, s.model, who="student", ref="teacher",
                            hint="; or pick a student from the teacher's family, or derive one with student.layers=N")
        kept, scores = None, None
    else:
        teacher = load_model(str(src.path))
        n = teacher.config.num_hidden_layers
        want = s.layers or n
        if want > n:
            raise UserError(f"student.layers={want} is more than the teacher's {n} layers; pick 1..{n}")
        scores = None
        if s.select == "importance" and want < n:
            from ..data import read_texts
            scores = block_influence(teacher, calibration_ids(tok, read_texts(data, "train")))
            kept = sorted(sorted(range(n), key=lambda i: -scores[i])[:want])
        else:
            kept = even_layers(n, want)
        kept = keep_rope_pattern(teacher.config, kept, scores)
        student = keep_layers(teacher, kept)
    with artifacts.writing(out, quant="fp32") as (tmp, meta):
        save_hf(student, tok, tmp)
        meta["params"] = count_params(student)
        meta["metrics"] = {"kept_layers": kept, "block_influence": scores,
                           "layers": student.config.num_hidden_layers}
    return artifacts.load(out)


def keep_rope_pattern(config, kept: list[int], scores: list[float] | None) -> list[int]:
    """`kept`, or the closest subset of the same size whose layers keep the rope pattern llama.cpp
    derives from the index (SmolLM3: none on every 4th layer), when the family has one.

    Exact dynamic program over (teacher layer, student position): a teacher layer may fill student
    position j only if it has rope exactly when position j does; among those subsets it keeps the
    most block influence (importance) or the most of `kept` (even spacing).
    """
    from ..archs import ARCHS, rope_pattern
    arch = ARCHS.get(config.model_type)
    n, k = config.num_hidden_layers, len(kept)
    if arch is None or not arch.rope_every:
        return kept
    has = rope_pattern(arch, n)                        # the teacher follows the pattern itself
    need = rope_pattern(arch, k)
    if [has[i] for i in kept] == need:
        return kept
    value = scores if scores is not None else [float(i in kept) for i in range(n)]
    NEG = float("-inf")
    best = [[NEG] * (k + 1) for _ in range(n + 1)]     # best[i][j]: layers < i fill positions < j
    best[0][0] = 0.0
    for i in range(n):
        for j in range(k + 1):
            if best[i][j] == NEG:
                continue
            best[i + 1][j] = max(best[i + 1][j], best[i][j])                      # skip layer i
            if j < k and has[i] == need[j]:
                best[i + 1][j + 1] = max(best[i + 1][j + 1], best[i][j] + value[i])  # take it
    if best[n][k] == NEG:
        raise UserError(f"no {k} of the teacher's {n} layers keep its rope pattern; pick another student.layers")
    out, j = [], k
    for i in range(n, 0, -1):                          # walk back: where taking layer i-1 was optimal
        if j and has[i - 1] == need[j - 1] and best[i - 1][j - 1] != NEG \
                and best[i][j] == best[i - 1][j - 1] + value[i - 1]:
            out.append(i - 1)
            j -= 1
    return sorted(out)


def even_layers(n: int, k: int) -> list[int]:
    """k of n layer indices spread evenly, always including the first and the last."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def calibration_ids(tok, texts: list[str], n_seqs: int = 8, seq_len: int = 256) -> torch.Tensor:
    """[n, seq_len] token ids from the start of the calibration texts (fewer rows if short)."""
    from ..data import token_stream
    ids = token_stream(tok, texts, limit=n_seqs * seq_len)
    rows = len(ids) // seq_len
    if rows == 0:
        raise UserError(f"calibration data has only {len(ids)} tokens; need at least {seq_len}: give more data")
    return torch.tensor(ids[:min(rows, n_seqs) * seq_len]).view(-1, seq_len)


@torch.no_grad()
def block_influence(model, ids: torch.Tensor) -> list[float]:
    """Per layer: mean over tokens of 1 - cos(hidden_in, hidden_out) (ShortGPT).

    hidden_states from the model: [n_layers + 1] tensors of [B, T, H]; entry i is layer i's input.
    The last entry has the final norm applied in HF, so the last layer's output is taken by a hook.
    """
    outs = {}
    last = model.model.layers[-1]
    hook = last.register_forward_hook(lambda m, a, o: outs.__setitem__("last", o[0] if isinstance(o, tuple) else o))
    try:
        hs = model(ids, output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    inputs = hs[:-1]
    outputs = list(hs[1:-1]) + [outs["last"]]
    return [float((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean())
            for a, b in zip(inputs, outputs)]


PER_LAYER = ("layer_types", "no_rope_layers")


def keep_layers(model, kept: list[int]):
    """A copy of `model` with only the decoder layers in `kept` (weights shared by copy)."""
    student = copy.deepcopy(model)
    layers = student.model.layers
    student.model.layers = torch.nn.ModuleList([layers[i] for i in kept])
    for new_idx, layer in enumerate(student.model.layers):
        # the KV cache is indexed by layer_idx; it must follow the new numbering
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx
    cfg = student.config
    n = cfg.num_hidden_layers
    cfg.num_hidden_layers = len(kept)
    # Per-layer lists (layer_types: sliding vs full attention; no_rope_layers: SmolLM3's layers
    # without rope) describe layers by position: each kept layer keeps its own entry.
    for name in PER_LAYER:
        value = getattr(cfg, name, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(cfg, name, [value[i] for i in kept])
    return student
