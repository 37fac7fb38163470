"""The pipeline: the ordered list of stage calls, readable top to bottom.

    compress run profile=phone

Each stage writes one artifact directory under runs/<name>/. A stage is skipped when its artifact
exists with the same stage, config and parents (resume); it is redone when `force=true`, when it is
named in `stages=[...]`, or when one of its parents was redone in this invocation.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from . import artifacts
from .config import RunConfig

console = Console(stderr=True)


class Runner:
    """Runs stage functions with resume/skip logic and a one-line log per stage."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.redone: set[str] = set()   # artifacts (re)made in this invocation

    def step(self, stage: str, out_name: str, fn, config: dict, parents: list, src=None, **inputs):
        from .distill import dist
        if dist.world()[1] > 1 and stage != "distill":   # torchrun: rank 0 makes it, the others read it
            if dist.is_main():
                art = self._step(stage, out_name, fn, config, parents, src, **inputs)
            dist.barrier()
            return art if dist.is_main() else artifacts.load(self.cfg.run_dir / out_name)
        # distill runs on every rank: rank 0's reuse decision holds for all
        return self._step(stage, out_name, fn, config, parents, src, agree=dist.broadcast, **inputs)

    def _step(self, stage: str, out_name: str, fn, config: dict, parents: list, src=None,
              agree=lambda reuse: reuse, **inputs):
        out = self.cfg.run_dir / out_name
        parents = [p for p in parents if p is not None]
        done = artifacts.find_done(out, stage, config, parents)
        forced = self.cfg.force or (self.cfg.stages and stage in self.cfg.stages)
        stale_parent = any(p.name in self.redone for p in parents)
        if agree(bool(done and not forced and not stale_parent)):
            done = done or artifacts.load(out)
            console.print(f"[dim]✓ {stage:9s} {out_name} (done, reused)[/dim]")
            return done
        t0 = time.time()
        console.print(f"[bold]▶ {stage:9s}[/bold] {out_name}")
        art = fn(self.cfg, src, out, **inputs)
        self.redone.add(art.name)
        console.print(f"[green]✓ {stage:9s}[/green] {out_name} ({time.time() - t0:.1f} s)")
        return art


def write_run_meta(cfg: RunConfig) -> None:
    """runs/<name>/meta.json: the resolved config, so the report needs nothing but meta files."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    artifacts.write_json_atomic(cfg.run_dir / artifacts.META, {
        "name": cfg.name, "stage": "run", "config": cfg.to_dict(),
        "versions": artifacts.library_versions(),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def run(cfg: RunConfig) -> dict:
    from . import data, models, prune
    from .distill import dist, student, train
    from .evaluate import run as evaluate
    from .evaluate.stage import config_of as evaluate_config
    from .evaluate.tasks import check as check_tasks
    from .preflight import preflight
    from .report import print_table, write as write_report

    cfg.name = dist.broadcast(cfg.name)   # under torchrun every rank must use rank 0's run name
    console.quiet = not dist.is_main()
    check_tasks(cfg)   # a task typo or a wrong task folder fails here, before any stage runs
    preflight(cfg)
    if dist.is_main():
        write_run_meta(cfg)
        artifacts.clean_stale(cfg.run_dir)
    dist.barrier()
    r = Runner(cfg)

    teacher = r.step("teacher", "teacher", models.run, {"teacher": cfg.teacher}, [])
    data_art = r.step("data", "data", data.run, data.config_of(cfg), [teacher], src=teacher)
    if prune.has_targets(cfg):   # structured pruning derives the student instead of a layer subset
        stud = r.step("prune", "pruned", prune.run, prune.config_of(cfg), [teacher, data_art],
                      src=teacher, data=data_art)
    else:
        stud = r.step("student", "student", student.run, student.config_of(cfg), [teacher, data_art],
                      src=teacher, data=data_art)
    distilled = r.step("distill", "distilled", train.run, train.config_of(cfg), [stud, teacher, data_art],
                       src=stud, teacher=teacher, data=data_art)
    if not dist.leave():   # data-parallel distillation is done; rank 0 exports and evaluates
        return {}
    shipped = ship(r, "", distilled, teacher, data_art)
    # The teacher itself, quantized: the baseline every distilled artifact has to beat.
    baseline = ship(r, "teacher-", teacher, teacher, data_art) if cfg.quantize.teacher else []
    if cfg.export.layout:   # one directory a browser app loads, from the evaluated ONNX artifacts
        from .export import browser
        onnx_arts = [a for a in shipped if a.meta["format"] == "onnx"]
        r.step("layout", "browser", browser.run, browser.config_of(cfg), onnx_arts, src=onnx_arts)

    for art in [teacher, stud, distilled, *shipped, *baseline]:
        r.step("evaluate", f"eval-{art.name}", evaluate, evaluate_config(cfg), [art, teacher, data_art],
               src=art, teacher=teacher, data=data_art)

    paths = write_report(cfg.run_dir)
    report = json.loads(Path(paths["json"]).read_text())
    print_table(report)
    for key in ("md", "html"):
        console.print(f"report: {paths[key]}")
    return report


def ship(r: Runner, prefix: str, hf, teacher, data_art) -> list:
    """Every deployable artifact made from one HF artifact, in the formats the config asks for."""
    cfg = r.cfg
    arts = gguf_branch(r, prefix, hf, teacher, data_art) if cfg.export.gguf else []
    if cfg.export.onnx:
        arts += onnx_branch(r, prefix, hf, teacher)
    if cfg.quantize.bnb:
        from .quantize import bnb
        arts += [r.step("quantize", f"{prefix}bnb-{q}", bnb.run, bnb.config_of(q), [hf], src=hf, qtype=q)
                 for q in cfg.quantize.bnb]
    return arts


def onnx_branch(r: Runner, prefix: str, hf, teacher) -> list:
    """HF artifact -> fp32 ONNX with KV cache, and one MatMulNBits artifact per type beside it."""
    from .export import onnx as export_onnx
    from .quantize import onnx as quantize_onnx
    cfg = r.cfg
    fp32 = r.step("export", f"{prefix}onnx-{cfg.export.onnx}", export_onnx.run, export_onnx.config_of(cfg),
                  [hf, teacher], src=hf, teacher=teacher)
    quants = [r.step("quantize", f"{prefix}onnx-{q}", quantize_onnx.run, quantize_onnx.config_of(cfg, q),
                     [hf, fp32], src=hf, qtype=q, fp32=fp32)
              for q in cfg.quantize.onnx]
    return [fp32, *quants]


def gguf_branch(r: Runner, prefix: str, hf, teacher, data_art) -> list:
    """HF artifact -> GGUF export -> importance matrix -> one artifact per quantized type."""
    from .export import gguf as export_gguf
    from .quantize import gguf as quantize_gguf, imatrix
    cfg = r.cfg
    f16 = r.step("export", f"{prefix}gguf-{cfg.export.gguf}", export_gguf.run, export_gguf.config_of(cfg),
                 [hf, teacher], src=hf, teacher=teacher)
    imat = None
    if cfg.quantize.gguf and cfg.quantize.imatrix:
        imat = r.step("imatrix", f"{prefix}imatrix", imatrix.run, imatrix.config_of(cfg),
                      [hf, data_art], src=hf, data=data_art)
    quants = [r.step("quantize", f"{prefix}gguf-{q}", quantize_gguf.run, quantize_gguf.config_of(q, imat),
                     [f16, imat], src=f16, qtype=q, imatrix=imat)
              for q in cfg.quantize.gguf]
    return [f16, *quants]
