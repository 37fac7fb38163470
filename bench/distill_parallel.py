"""Per-rank memory and throughput of the distill loop under torchrun: DDP vs FSDP.

    python bench/distill_parallel.py                      # 2 CPU ranks (gloo), a ~100M-parameter student
    python bench/distill_parallel.py --nproc=8 --layers=24 --hidden=2048   # on a multi-GPU host (NCCL)

Each mode launches `torchrun --nproc_per_node=N` on this file; every rank builds the same random
Llama-shaped teacher and student and runs compress's own training loop (`distill/train.py:train`,
the code `compress run` uses) for a few optimizer steps with `distill.parallel` set to the mode.
Reported per rank: peak RSS while training and its rise over the RSS before training, which held
the whole student and teacher (the rise is the training working set: gradients, AdamW state,
activations, gather buffers, minus what sharding freed; rank 0's includes gathering the whole
student at the end to write it), on CUDA peak max_memory_allocated, and tokens/s over the global
batch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(a) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from compress.config import Distill
    from compress.distill import dist
    from compress.distill.train import train
    from distill_speed import PeakRSS
    rank, world = dist.world()
    device = dist.device()
    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3,
                         num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                         num_key_value_heads=max(1, a.hidden // 192), max_position_embeddings=4096,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    student = LlamaForCausalLM(config)
    if a.mode == "ddp":   # as compress run does: under FSDP fully_shard moves each unit's shard to the device
        student.to(device)
    teacher = LlamaForCausalLM(config).to(device, torch.bfloat16 if device != "cpu" else torch.float32)
    teacher.eval().requires_grad_(False)
    seqs = torch.randint(0, a.vocab, (64, a.seq_len), generator=torch.Generator().manual_seed(1))
    d = Distill(batch=a.batch, seq_len=a.seq_len, lr=1e-4, warmup=0.0, checkpoint_every=10**6, parallel=a.mode)
    n_params = sum(p.numel() for p in student.parameters())
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as rss:
        if device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        stats, _ = train(student, [teacher], [1.0], seqs, d, a.steps, Path(tmp) / "ckpt", device, vocab=a.vocab)
    out = {"mode": a.mode, "rank": rank, "world": world, "device": device, "student_params": n_params,
           "params_on_rank": stats.get("params_on_rank0", n_params) if rank == 0 else None,
           "tok_s": stats["train_tokens_per_s"], "peak_rss_mb": round(rss.peak / 2**20),
           "rss_rise_mb": round((rss.peak - rss.start) / 2**20)}
    if device != "cpu":
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batch", type=int, default=4, help="global sequences per optimizer step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    ap.add_argument("--mode", default=None, help="worker: ddp or fsdp")
    a = ap.parse_args()
    if a.mode:
        import torch
        torch.set_num_threads(a.threads)
        worker(a)
        return
    # glibc keeps freed blocks below its mmap threshold (up to 32 MB) in the heap, so RSS would still
    # count FSDP's freed per-layer gather buffers; a 1 MB threshold returns them and RSS tracks live memory
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}",
           "MALLOC_MMAP_THRESHOLD_": "1048576"}
    print(f"{a.nproc} ranks, Llama student and teacher {a.layers} layers x {a.hidden}, vocab {a.vocab}, "
          f"global batch {a.batch} x {a.seq_len}, {a.steps} steps, {a.threads} thread(s) per rank, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| mode | rank | student params | held on rank 0 | tok/s | peak RSS MB | RSS rise MB | peak GPU GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rise = {}
    for mode in ("ddp", "fsdp"):
        args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("mode", "nproc")]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.nproc}", "--standalone",
               __file__, f"--mode={mode}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        rows = [json.loads(l[7:]) for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not rows:
            print(f"{mode} failed: {proc.stderr[-1500:]}")
            continue
        for r in sorted(rows, key=lambda r: r["rank"]):
            held = f"{r['params_on_rank']:,}" if r["params_on_rank"] else ""
            print(f"| {mode} | {r['rank']} | {r['student_params']:,} | {held} | {r['tok_s']} "
                  f"| {r['peak_rss_mb']} | {r['rss_rise_mb']} | {r.get('peak_gpu_gib', '–')} |")
        rise[mode] = max(r.get("peak_gpu_gib", r["rss_rise_mb"]) for r in rows)
    if len(rise) == 2:
        print(f"FSDP / DDP largest per-rank training working set x{rise['fsdp'] / rise['ddp']:.2f}")


if __name__ == "__main__":
    main()
