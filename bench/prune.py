"""Structured pruning of a finished run's teacher to about half its non-embedding parameters.

    python bench/prune.py runs/<name> [--heal-tokens=4096] [--variants=width,depth,mix,hidden] [--loss-depth]
                          [--mc-n=200]      # arc_easy questions for accuracy (0: skip)
                          [--threads=2]     # CPU threads for evaluation and accuracy
                          [--work=DIR]      # reuse the artifacts a previous (interrupted) run left in DIR

Prunes the run's teacher/ with its data/ as calibration: by width (prune.params=0.5: the solver
shrinks the MLP first) and by depth (prune.layers = half the layers, ShortGPT block influence,
which is the spine's layer-drop student at the same size). Each is scored against the teacher on
the held-out split (torch, same token ids: KLD, ppl, top-1), then healed by distillation at equal
tokens twice: KD (distill.alpha=0.9) and CE only (distill.alpha=0). Every row also has arc_easy
multiple-choice accuracy ± stderr on the first --mc-n questions of ../shared/data (bench/mc_accuracy.py,
lm-eval `acc` scoring, in the artifact's own runtime). Prints one table.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

from compress import artifacts
from compress.student import prune
from compress.config import load_config, resolved_threads
from compress.distill import train
from compress.evaluate import run as evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mc_accuracy  # noqa: E402  (bench/mc_accuracy.py)


def arg(name: str, default: str) -> str:
    return next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(f"--{name}=")), default)


def main():
    run_dir = Path(next(a for a in sys.argv[1:] if not a.startswith("--")))
    heal_tokens = int(arg("heal-tokens", "4096"))
    variants = arg("variants", "width,depth").split(",")
    mc_n = int(arg("mc-n", "200"))
    teacher, data = artifacts.load(run_dir / "teacher"), artifacts.load(run_dir / "data")
    layers = teacher.meta["metrics"].get("layers") or 30
    targets = {"width": ["prune.params=0.5"], "depth": [f"prune.layers={layers // 2}"],
               "depth-loss": [f"prune.layers={layers // 2}", "prune.depth_metric=loss"],
               # SmolLM2-135M alternatives at ~50 %: two of three KV groups + MLP 672; hidden 576 -> 288
               "mix": ["prune.heads=6", "prune.mlp=672"], "hidden": ["prune.hidden=288"]}
    if "--loss-depth" in sys.argv:
        variants.append("depth-loss")
    work = Path(arg("work", "") or tempfile.mkdtemp(prefix="compress-prune-"))
    base = [f"out={work}", "name=b", "eval.memory=false", "eval.decode_tokens=1", "eval.prefill_tokens=16",
            f"eval.threads={arg('threads', '2')}",
            f"distill.tokens={heal_tokens}"]
    run_b = work / "b"
    c0 = load_config(base)
    print(f"teacher: {run_dir / 'teacher'}; held-out {c0.eval.seqs}x{c0.eval.seq_len} tokens, torch fp32 CPU; "
          f"calibration {c0.prune.calib_tokens} tokens; work dir {work}")
    if mc_n:
        chance = mc_accuracy.chance(mc_accuracy.load_questions(n=mc_n))
        print(f"acc: arc_easy first {mc_n} questions, lm-eval acc (sum log-prob of ' choice'), ± stderr; "
              f"chance {chance:.3f}")
    print(f"{'variant':11s} {'layers':>6s} {'hidden':>6s} {'heads':>5s} {'mlp':>5s} {'params':>7s} "
          f"{'non-emb':>7s} {'heal':>10s} {'KLD':>7s} {'ppl':>8s} {'top1':>6s} {'acc':>13s} {'sec':>6s}", flush=True)
    t0 = time.time()
    print(row("teacher", teacher, "-", score(c0, teacher, teacher, data, run_b, mc_n), time.time() - t0), flush=True)
    for v in variants:
        cfg = load_config(base + targets[v])
        t0 = time.time()
        art = cached(run_b / f"pruned-{v}", lambda out: prune.run(cfg, teacher, out, data=data))
        print(row(v, art, "none", score(cfg, art, teacher, data, run_b, mc_n), time.time() - t0), flush=True)
        for heal, alpha in (("KD", 0.9), ("CE", 0.0)) if heal_tokens else ():
            hcfg = load_config(base + targets[v] + [f"distill.alpha={alpha}"])
            t0 = time.time()
            healed = cached(run_b / f"healed-{v}-{heal}",
                            lambda out: train.run(hcfg, art, out, teacher=teacher, data=data))
            if healed.meta["config"]["distill"]["tokens"] != heal_tokens:
                done = healed.meta["config"]["distill"]["tokens"]
                sys.exit(f"{healed.path} was healed on {done} tokens, not {heal_tokens}: "
                         f"pass --heal-tokens={done} or a new --work")
            print(row(v, healed, f"{heal} {heal_tokens}", score(hcfg, healed, teacher, data, run_b, mc_n),
                      time.time() - t0), flush=True)


def cached(out: Path, make):
    """The finished artifact at `out` (from an earlier run with --work), else make(out)."""
    return artifacts.load(out) if (out / "meta.json").is_file() else make(out)


def score(cfg, art, teacher, data, run_b, mc_n: int) -> dict:
    """KLD/ppl/top1 from the evaluate stage, plus arc_easy accuracy (cached as JSON in run_b)."""
    ev = cached(run_b / f"eval-{art.name}", lambda out: evaluate(cfg, art, out, teacher=teacher, data=data))
    q = dict(ev.meta["metrics"]["quality"])
    mc_file = run_b / f"mc-arc_easy-{mc_n}-{art.name}.json"
    if mc_n and mc_file.is_file():
        q["mc"] = json.loads(mc_file.read_text())
    elif mc_n:
        q["mc"] = mc_accuracy.evaluate(art, teacher.path, mc_n, resolved_threads(cfg))
        mc_file.write_text(json.dumps(q["mc"]))
    return q


def row(variant: str, art, heal: str, q: dict, seconds: float) -> str:
    from transformers import AutoConfig
    from compress.student.solver import Dims
    d = Dims.of(AutoConfig.from_pretrained(str(art.path)))
    acc = f"{q['mc']['acc']:.3f}±{q['mc']['stderr']:.3f}" if "mc" in q else "-"
    return (f"{variant:11s} {d.layers:6d} {d.hidden:6d} {d.heads:5d} {d.mlp:5d} {d.total() / 1e6:6.1f}M "
            f"{d.non_embedding() / 1e6:6.1f}M {heal:>10s} {q['kld']:7.3f} {q['ppl']:8.2f} {q['top1']:6.3f} {acc:>13s} "
            f"{seconds:6.0f}")


if __name__ == "__main__":
    main()
