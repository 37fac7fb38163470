"""Prune stage: derive the student from the teacher by structured pruning (Minitron width, ShortGPT depth).

    compress run prune.params=0.5                  # about half the non-embedding params (solver, by width)
    compress run prune.layers=15                   # depth: keep the 15 most important layers
    compress run prune.mlp=768 prune.heads=6 prune.hidden=512 prune.multiple=256

    from compress.student import prune
    if prune.has_targets(cfg):
        art = prune.run(cfg, teacher, run_dir / "pruned", data=data)

Importance comes from calibration activations (prune.calib_tokens of the data's train split):
layers are dropped first, then MLP channels, KV groups (with their query heads) and hidden
channels are ranked on the depth-pruned model and sliced out. The output is a plain HF model
directory whose config states the new sizes; it loads with AutoModelForCausalLM.from_pretrained
and goes through GGUF export like any student. Heal it with the distill stage.
"""
from __future__ import annotations

from pathlib import Path

from ..stage import stage

TARGETS = ("layers", "mlp", "heads", "hidden", "params")


def has_targets(cfg) -> bool:
    """True when any prune target is set: the pipeline then prunes instead of the layer-subset student."""
    return any(getattr(cfg.prune, k) is not None for k in TARGETS)


@stage("prune", inputs=("data",), reads=("prune",), format="hf")
def run(cfg, src, out: Path, *, data):
    """src: the teacher HF artifact; data: the data artifact (calibration texts) -> pruned HF artifact."""
    from transformers import AutoConfig

    from .. import artifacts
    from ..data import read_texts
    from ..errors import UserError
    from ..models import count_params, load_model, load_tokenizer, save_hf
    from .importance import calib_ids
    from .solver import Dims, resolve

    p = cfg.prune
    if not has_targets(cfg):
        raise UserError("the prune stage needs a target: set prune.params (e.g. 0.5) or prune.layers / "
                        "prune.mlp / prune.heads / prune.hidden")
    check_arch(src.path)
    teacher = Dims.of(AutoConfig.from_pretrained(str(src.path)))
    want, solved = resolve(p, teacher)          # bad targets fail before the weights load
    tok = load_tokenizer(str(src.path))
    model = load_model(str(src.path))
    ids = calib_ids(tok, read_texts(data, "train"), int(p.calib_tokens))
    before = count_params(model)
    pruned, report = prune_model(model, want, ids, p.depth_metric)
    with artifacts.writing(out, quant="fp32") as (tmp, meta):
        save_hf(pruned, tok, tmp)
        meta["params"] = count_params(pruned)
        meta["metrics"] = {"teacher": teacher.summary(), "pruned": Dims.of(pruned.config).summary(),
                           "params_before": before, "params_after": meta["params"],
                           "solver": solved, "calib_tokens": int(ids.numel()), **report}
    return artifacts.load(out)


def check_arch(path: Path) -> None:
    """Fail before loading weights when prune does not support the architecture."""
    import json
    from ..errors import UserError
    try:
        mt = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} has no readable config.json ({e}); prune needs an HF model directory") from None
    from ..archs import ARCHS
    if mt not in ARCHS or not ARCHS[mt].prune:
        raise UserError(f"prune supports {', '.join(k for k, a in ARCHS.items() if a.prune)} models, not '{mt}'; "
                        f"use a supported teacher or drop the prune.* settings")


def prune_model(model, want, ids, depth_metric: str = "block_influence"):
    """(pruned model, report) with the sizes in `want` (a solver.Dims); `model` may be modified.

    Depth goes first; the width importances are then measured on the shallower model.
    """
    import torch

    from .depth import drop_layers, select_layers
    from .subset import keep_rope_pattern
    from .importance import depth_scores, group_scores, kept_share, top_k, width_scores
    from .solver import Dims
    from .width import keep_hidden, keep_kv_groups, keep_mlp

    t = Dims.of(model.config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    report: dict = {"kept_layers": list(range(t.layers))}
    if want.layers < t.layers:
        scores = depth_scores(model, ids, depth_metric)
        # SmolLM3: only subsets that keep the rope pattern llama.cpp derives from the index
        report["kept_layers"] = keep_rope_pattern(model.config, select_layers(scores, want.layers), scores)
        report["depth"] = {"metric": depth_metric, "scores": [round(s, 6) for s in scores]}
        model = drop_layers(model, report["kept_layers"])
    if want.mlp < t.mlp or want.heads < t.heads or want.hidden < t.hidden:
        w = width_scores(model, ids)
        if want.mlp < t.mlp:
            kept = [top_k(row, want.mlp) for row in w["mlp"]]                      # per layer [mlp]
            keep_mlp(model, kept)
            report["mlp"] = _summary(t.mlp, want.mlp, [kept_share(r, k) for r, k in zip(w["mlp"], kept)])
        if want.heads < t.heads:
            groups = group_scores(w["heads"], t.kv_heads)                           # [layers, kv]
            kept = [top_k(row, want.kv_heads) for row in groups]
            keep_kv_groups(model, kept)
            report["heads"] = _summary(t.heads, want.heads, [kept_share(r, k) for r, k in zip(groups, kept)])
            report["heads"]["kept_kv_groups"] = [k.tolist() for k in kept]
        if want.hidden < t.hidden:
            kept = top_k(w["hidden"], want.hidden)
            keep_hidden(model, kept)
            report["hidden"] = _summary(t.hidden, want.hidden, [kept_share(w["hidden"], kept)])
    return model.cpu(), report


def _summary(before: int, after: int, shares: list[float]) -> dict:
    """Widths and the share of importance mass kept (mean and worst layer)."""
    return {"before": before, "after": after, "kept_importance": round(sum(shares) / len(shares), 4),
            "worst_layer_kept_importance": round(min(shares), 4)}
