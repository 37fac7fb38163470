"""The pipeline: the ordered list of stage calls, readable top to bottom.

    compress run profile=phone

Each stage writes one artifact directory under runs/<name>/. A stage is skipped when its artifact
exists with the same stage, config and parents (resume); it is redone when `force=true`, when it is
named in `stages=[...]`, or when one of its parents was redone in this invocation.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from . import artifacts
from .config import RunConfig, plain_types, resolved_threads

console = Console(stderr=True)


@dataclass
class Step:
    """One artifact of a run as the runner decided it: reused, or (re)made."""
    name: str
    stage: str
    keys: tuple        # the config keys the stage declares
    parents: list      # parent artifact names
    redo: bool


class Runner:
    """Runs declared stages (compress/stage.py) with resume/skip logic and a one-line log per stage.

    A stage is reused when its artifact's hash (its declared config keys, params and parents)
    matches; `dry=True` decides the same way without running anything: `plan(cfg)`.
    """

    def __init__(self, cfg: RunConfig, dry: bool = False):
        self.cfg, self.dry = cfg, dry
        self.redone: set[str] = set()   # artifacts (re)made in this invocation
        self.steps: list[Step] = []

    def step(self, fn, out_name: str, src=None, **inputs):
        from .distill import dist
        if not self.dry and dist.world()[1] > 1 and fn.stage.name != "distill":
            # torchrun: rank 0 makes it, the others read it
            art = self._step(fn, out_name, src, **inputs) if dist.is_main() else None
            dist.barrier()
            return art if dist.is_main() else artifacts.load(self.cfg.run_dir / out_name)
        # distill runs on every rank: rank 0's reuse decision holds for all
        return self._step(fn, out_name, src, agree=dist.broadcast, **inputs)

    def _step(self, fn, out_name: str, src=None, agree=lambda reuse: reuse, **inputs):
        spec, out = fn.stage, self.cfg.run_dir / out_name
        ident = spec.identity(self.cfg, src, **inputs)
        done = artifacts.find_done(out, ident.hash)
        forced = self.cfg.force or (self.cfg.stages and spec.name in self.cfg.stages)
        stale_parent = any(p.name in self.redone for p in ident.parents)
        reuse = agree(bool(done and not forced and not stale_parent))
        self.steps.append(Step(out_name, spec.name, ident.keys, [p.name for p in ident.parents], not reuse))
        if reuse:
            done = done or artifacts.load(out)
            if not self.dry:
                console.print(f"[dim]✓ {spec.name:9s} {out_name} (done, reused)[/dim]")
            return done
        self.redone.add(out_name)
        if self.dry:   # what the artifact would be, for the steps that depend on it
            return artifacts.Artifact(out, {"name": out_name, "hash": ident.hash, "stage": spec.name,
                                            "format": spec.format})
        t0 = time.time()
        console.print(f"[bold]▶ {spec.name:9s}[/bold] {out_name}")
        art = fn(self.cfg, src, out, **inputs)
        console.print(f"[green]✓ {spec.name:9s}[/green] {out_name} ({time.time() - t0:.1f} s)")
        return art


def write_run_meta(cfg: RunConfig) -> None:
    """runs/<name>/meta.json: the resolved config, so the report needs nothing but meta files."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    artifacts.write_json_atomic(cfg.run_dir / artifacts.META, {
        "name": cfg.name, "stage": "run", "config": cfg.to_dict(),
        "versions": artifacts.library_versions(),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def run(cfg: RunConfig) -> dict:
    """Check, run every stage (reusing finished ones), write and print the report."""
    from .distill import dist
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
    if not stages(Runner(cfg)):
        return {}   # a data-parallel rank other than 0: its part ended with distillation
    paths = write_report(cfg.run_dir)
    report = json.loads(Path(paths["json"]).read_text())
    print_table(report, full=str(paths["md"]))
    for key in ("md", "html"):
        console.print(f"report: {paths[key]}")
    return report


def plan(cfg: RunConfig) -> list[Step]:
    """Every step a run of `cfg` would take, each marked reused or redone; nothing runs."""
    r = Runner(cfg, dry=True)
    stages(r)
    return r.steps


def stages(r: Runner) -> bool:
    """The pipeline, in order. False on a data-parallel rank that stops after distillation."""
    from . import data, teacher as teacher_stage
    from .distill import dist, train
    from .evaluate import reference
    from .evaluate import samples
    from .evaluate.stage import run as evaluate
    from .student import prune, subset
    cfg = r.cfg

    teacher = r.step(teacher_stage.run, "teacher")
    data_art = r.step(data.run, "data", src=teacher)
    if prune.has_targets(cfg):   # structured pruning derives the student instead of a layer subset
        stud = r.step(prune.run, "pruned", src=teacher, data=data_art)
    else:
        stud = r.step(subset.run, "student", src=teacher, data=data_art)
    distilled = r.step(train.run, "distilled", src=stud, teacher=teacher, data=data_art)
    if not r.dry and not dist.leave():   # data-parallel distillation is done; rank 0 goes on
        return False
    shipped = ship(r, "", distilled, teacher, data_art)
    # The teacher itself, quantized: the baseline every distilled artifact has to beat.
    baseline = ship(r, "teacher-", teacher, teacher, data_art) if cfg.quantize.teacher else []
    if cfg.export.layout:   # one directory a browser app loads, from the evaluated ONNX artifacts
        from .export import browser
        onnx = [a for a in shipped if a.meta["format"] == "onnx"]
        tuned_names = {a.name for a in onnx}
        # a QAD-tuned file takes its plain sibling's place (the same transformers.js dtype)
        r.step(browser.run, "browser", src=[a for a in onnx if f"{a.name}-qad" not in tuned_names])

    ref = r.step(reference.run, reference.REFERENCE, src=teacher, data=data_art)
    ood = r.step(reference.run_ood, reference.OOD_REFERENCE, src=teacher) if reference.has_ood(cfg.eval.ood) else None
    for art in [teacher, stud, distilled, *shipped, *baseline]:
        r.step(evaluate, f"eval-{art.name}", src=art, teacher=teacher, data=data_art, reference=ref, ood=ood,
               threads=resolved_threads(cfg))
    if cfg.samples.prompts:   # a few answers per artifact, for the report's side-by-side section
        for art in [teacher, stud, distilled, *shipped, *baseline]:
            r.step(samples.run, f"samples-{art.name}", src=art, teacher=teacher, data=data_art)
    return True


def ship(r: Runner, prefix: str, hf, teacher, data_art) -> list:
    """Every deployable artifact made from one HF artifact, in the formats the config asks for.

    One branch per row of formats.FORMATS; the stage functions are the ones the row names.
    """
    cfg = r.cfg
    arts = gguf_branch(r, prefix, hf, teacher, data_art) if cfg.export.gguf else []
    if cfg.export.onnx:
        arts += onnx_branch(r, prefix, hf, teacher, data_art)
    arts += [r.step(stage_of("bnb", "quantize"), f"{prefix}bnb-{q}", src=hf, qtype=q) for q in cfg.quantize.bnb]
    return arts


def stage_of(fmt: str, kind: str):
    """The export or quantize stage function of a format (formats.FORMATS), imported when first used."""
    from importlib import import_module
    from .formats import FORMATS
    return import_module(getattr(FORMATS[fmt], f"{kind}_module")).run


def onnx_branch(r: Runner, prefix: str, hf, teacher, data_art) -> list:
    """HF artifact -> fp32 ONNX with KV cache, and one MatMulNBits artifact per type beside it."""
    cfg = r.cfg
    fp32 = r.step(stage_of("onnx", "export"), f"{prefix}onnx-{cfg.export.onnx}", src=hf, teacher=teacher)
    types = plain_types(cfg, "onnx", "teacher" if prefix else "student")
    quants = [r.step(stage_of("onnx", "quantize"), f"{prefix}onnx-{q}", src=hf, qtype=q, fp32=fp32) for q in types]
    return [fp32, *quants, *tuned(r, prefix, quants, types, hf, teacher, data_art)]


def tuned(r: Runner, prefix: str, plain: list, types: list, hf, teacher, data_art) -> list:
    """The quantization-aware distilled sibling `<plain>-qad` of each plain file qad.types names."""
    from .quantize import qad, qad_onnx
    cfg = r.cfg
    if ("teacher" if prefix else "student") not in cfg.qad.of:
        return []
    return [r.step(qad_onnx.run if art.meta["format"] == "onnx" else qad.run, f"{art.name}-qad", src=art,
                   hf=hf, teacher=teacher, data=data_art)
            for art, t in zip(plain, map(str, types)) if t in cfg.qad.types]


def gguf_branch(r: Runner, prefix: str, hf, teacher, data_art) -> list:
    """HF artifact -> GGUF export -> importance matrix -> one artifact per quantized type or size target."""
    from .quantize import imatrix, mix, sensitivity
    cfg = r.cfg
    f16 = r.step(stage_of("gguf", "export"), f"{prefix}gguf-{cfg.export.gguf}", src=hf, teacher=teacher)
    imat = sens = None
    types = plain_types(cfg, "gguf", "teacher" if prefix else "student")
    if types and cfg.quantize.imatrix:
        imat = r.step(imatrix.run, f"{prefix}imatrix", src=hf, data=data_art)
    if any(mix.is_auto(q) for q in types):
        sens = r.step(sensitivity.run, f"{prefix}sensitivity", src=hf, data=data_art)
    quants = [r.step(mix.run, prefix + mix.artifact_name(q), src=f16, qtype=str(q), imatrix=imat, sensitivity=sens)
              if mix.is_auto(q) else
              r.step(stage_of("gguf", "quantize"), f"{prefix}gguf-{q}", src=f16, qtype=q, imatrix=imat)
              for q in types]
    return [f16, *quants, *tuned(r, prefix, quants, types, hf, teacher, data_art)]
