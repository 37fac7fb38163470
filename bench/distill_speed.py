"""Distillation throughput and peak memory: compress's chunked loop vs a naive seeds-style loop and TRL GKD.

    python bench/distill_speed.py                          # CPU: phone and 152k-vocab shapes
    python bench/distill_speed.py --shapes=smollm2-360m,qwen-1.5b --steps=10   # CUDA: the issue's H100 shapes

The naive and chunked loops do the same work per step on the same models and tokens: teacher
forward (inference mode), student forward and backward, T^2 * forward KL at T=2 weighted 0.9
plus 0.1 CE, AdamW step. The naive loop materialises teacher and student logits [B, S, V] in
full and computes the loss in fp32 on them (losses.kd_loss); compress stops both models at the
last hidden state and runs lm_head + loss chunk by chunk (distill/kd.py). Each (shape, loop) runs in its own process so its peak memory
is its own: CPU peak RSS while training and its rise over the RSS before the first step (the
training working set: AdamW state, activations, logits); CUDA
max_memory_allocated. MFU (CUDA only) counts 6 * student params + 2 * teacher params FLOPs per
token against the GPU's dense bf16 peak (`--peak-tflops`, H100 SXM: 989).

The third loop, `trl`, is TRL's GKD trainer (`trl.experimental.gkd.GKDTrainer`, trl 1.16.0) with
beta=0, lmbda=0 (off-policy: every step trains on the dataset's tokens, never on student samples)
on the same models, B and S: a dataset of random token ids of length S, labels = input ids,
AdamW at lr 1e-4, fp32 on CPU / bf16 autocast on CUDA, no gradient checkpointing, no gradient
clipping (the other loops clip nothing either), no eval, logging or saving. Each Trainer step runs
the teacher forward (no_grad), the student forward with full logits [B, S, V] and backward, and
the optimizer step; tokens/s is timed from the end of the warm-up step to the end of the last one
(Trainer overhead included). The loss is not the same as the other loops': TRL's
`generalized_jsd_loss` at beta=0 is KL(teacher || student) summed over the vocabulary and
averaged over the B x (S - 1) shifted positions, with no CE term (the other loops add 0.1 CE and
weight the KL 0.9), no T^2 factor, and at T = 1: GKDConfig(temperature=2) is set, but trl 1.16.0's
`compute_loss` does not pass it to the loss, it only sets the sampling temperature, which
lmbda=0 never uses. The forward/backward work is the same shape; the divergence differs.
Requires trl (`pip install -c constraints.txt -e ".[bench]"`); without it the loop is skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (teacher config, student config or a layer count to keep from the teacher, batch, seq_len)
LLAMA = dict(model_type="llama", rms_norm_eps=1e-5, max_position_embeddings=4096)
SHAPES = {
    # the built-in teacher with real weights and the phone profile's 20-layer student and batch
    "phone": ("builtin", 20, 4, 256),
    # a Qwen2.5-sized vocabulary on small random models: the logits dominate memory
    "vocab152k": (dict(LLAMA, vocab_size=151936, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=1024, tie_word_embeddings=True),
                  2, 2, 512),
    # the GPU baselines (random init, bf16): SmolLM2-360M -> 135M shapes, 8 x 2048
    "smollm2-360m": (dict(LLAMA, vocab_size=49152, hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
                          num_key_value_heads=5, intermediate_size=2560, tie_word_embeddings=True),
                     dict(LLAMA, vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True), 8, 2048),
    # Qwen2.5-1.5B -> 0.5B shapes, 4 x 2048 (the naive loop OOMs at 8 x 2048 on an H100)
    "qwen-1.5b": (dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
                       tie_word_embeddings=True, max_position_embeddings=4096),
                  dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                       tie_word_embeddings=True, max_position_embeddings=4096), 4, 2048),
}


def build(shape: str, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    t_cfg, s_cfg, batch, seq = SHAPES[shape]
    torch.manual_seed(0)
    if t_cfg == "builtin":
        from compress.models import builtin_gguf, load_model
        gguf = builtin_gguf("smollm2-135m-instruct")
        teacher = load_model(str(gguf.parent), gguf.name)
    else:
        teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model(**t_cfg))
    if isinstance(s_cfg, int):
        from compress.student.subset import even_layers, keep_layers
        student = keep_layers(teacher, even_layers(teacher.config.num_hidden_layers, s_cfg))
    else:
        student = AutoModelForCausalLM.from_config(AutoConfig.for_model(**s_cfg))
    cuda = device == "cuda"
    teacher = teacher.to(device, torch.bfloat16 if cuda else torch.float32).eval().requires_grad_(False)
    student = student.to(device, torch.float32).train()
    return teacher, student, batch, seq


def worker(shape: str, loop: str, steps: int, device: str, chunk: int, ckpt: bool = False) -> dict:
    """One loop on one shape: tokens/s over `steps` steps after one warm-up step, and peak memory."""
    import torch
    if loop == "trl":
        return trl_worker(shape, steps, device)
    from compress.distill import kd, losses
    teacher, student, B, S = build(shape, device)
    cuda = device == "cuda"
    if ckpt and loop == "chunked":   # distill.activation_checkpointing=true
        from compress.distill.step import activation_checkpointing
        activation_checkpointing(student, True)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    V = student.config.vocab_size
    body_s, head_s = kd.body_and_head(student)
    body_t, head_t = kd.body_and_head(teacher)
    gen = torch.Generator().manual_seed(0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def step():
        x = torch.randint(0, V, (B, S), generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        with autocast:
            if loop == "naive":   # seeds-style: full logits of both models, fp32 loss on them
                with torch.inference_mode():
                    t_logits = teacher(x).logits
                loss, _ = losses.kd_loss(student(x).logits, t_logits.clone(), x, 2.0, 0.9)
                loss.backward()
            else:
                with torch.inference_mode():
                    h_t = body_t(input_ids=x).last_hidden_state
                tb = kd.Teachers(hidden=[h_t], heads=[head_t], weights=[1.0])
                kd.chunked_loss_backward(body_s(input_ids=x).last_hidden_state, head_s, tb, x,
                                         {"fkl": 0.9, "ce": 0.1}, 2.0, V, chunk=chunk)
        opt.step()

    with PeakRSS() as rss:
        step()   # warm-up: allocator, AdamW state, kernels
        if cuda:
            torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.time() - t0
    tokens = steps * B * S
    out = {"shape": shape, "loop": loop, "device": device, "batch": B, "seq_len": S, "vocab": V,
           "tok_s": round(tokens / dt, 1), "peak_rss_mb": round(rss.peak / 2**20),
           "rss_rise_mb": round((rss.peak - rss.start) / 2**20)}
    return out | gpu_stats(teacher, student) if cuda else out


def gpu_stats(teacher, student) -> dict:
    import torch
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    return {"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "flops_per_token": 6 * n_s + 2 * n_t, "gpu": torch.cuda.get_device_name()}


def trl_worker(shape: str, steps: int, device: str) -> dict:
    """TRL's GKD trainer (beta=0, lmbda=0) on the same models, B and S: see the module docstring."""
    import tempfile
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    teacher, student, B, S = build(shape, device)
    cuda = device == "cuda"
    V = student.config.vocab_size
    # GKDTrainer needs a processing_class only for its pad id (generation config); the data is
    # already token ids, so a two-token tokenizer built in-process is enough and works offline
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1}, unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="</s>")
    gen = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(0, V, ((steps + 1) * B, S), generator=gen).tolist()})

    def collate(rows):   # [B, S] ids, no padding: every position is a loss position
        x = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    seen = {"teacher": 0, "student": 0}   # tokens each model's forward saw: proves the work per step
    for name, m in (("teacher", teacher), ("student", student)):
        m.register_forward_pre_hook(lambda _m, _a, kw, name=name: seen.__setitem__(name, seen[name] + kw["input_ids"].numel()),
                                    with_kwargs=True)
    ends = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.time())

    with tempfile.TemporaryDirectory() as tmp:
        args = GKDConfig(output_dir=tmp, beta=0.0, lmbda=0.0, temperature=2.0, max_length=S,
                         per_device_train_batch_size=B, gradient_accumulation_steps=1, max_steps=steps + 1,
                         learning_rate=1e-4, weight_decay=0.01, lr_scheduler_type="constant", optim="adamw_torch",
                         max_grad_norm=0.0, activation_checkpointing=False, gradient_checkpointing=None, bf16=cuda, fp16=False,
                         eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
                         disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False, seed=0)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, data_collator=collate,
                             train_dataset=data, processing_class=tok, callbacks=[StepTimes()])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            trainer.train()
    assert len(ends) == steps + 1 and seen["teacher"] == seen["student"] == (steps + 1) * B * S, (len(ends), seen)
    assert not student.is_gradient_checkpointing
    out = {"shape": shape, "loop": "trl", "device": device, "batch": B, "seq_len": S, "vocab": V,
           "tok_s": round(steps * B * S / (ends[-1] - ends[0]), 1), "peak_rss_mb": round(rss.peak / 2**20),
           "rss_rise_mb": round((rss.peak - rss.start) / 2**20)}
    return out | gpu_stats(teacher, student) if cuda else out


class PeakRSS:
    """The highest RSS seen while training, sampled every 5 ms (ru_maxrss would also count the
    model-loading peak, which is larger than training's on the de-quantized GGUF teacher)."""

    def __init__(self):
        import threading
        import psutil
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None, help="comma-separated names from SHAPES")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each loop; the fastest is kept")
    ap.add_argument("--chunk", type=int, default=256, help="tokens per loss chunk (distill.chunk)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="for the chunked loop")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--worker", nargs=2, metavar=("SHAPE", "LOOP"))
    a = ap.parse_args()
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.worker:
        torch.set_num_threads(a.threads)
        try:
            res = worker(*a.worker, a.steps, device, a.chunk, a.activation_checkpointing)
        except torch.OutOfMemoryError:
            res = {"shape": a.worker[0], "loop": a.worker[1], "oom": True}
        print("RESULT " + json.dumps(res))
        return
    shapes = a.shapes.split(",") if a.shapes else (["smollm2-360m", "qwen-1.5b"] if device == "cuda" else ["phone", "vocab152k"])
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(ROOT)}
    print(f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else os.cpu_count()} "
          f"{'' if device == 'cuda' else 'cores'}), threads {a.threads}, {a.steps} timed steps after 1 warm-up, best of {a.rounds}, "
          f"chunk {a.chunk} tokens, load average {os.getloadavg()[0]:.1f}")
    loops = ("naive", "chunked", "trl")
    try:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        import trl.experimental.gkd  # noqa: F401
    except ImportError:
        loops = loops[:2]
        print('trl is not installed, skipping the trl loop: pip install -c constraints.txt -e ".[bench]"')
    print("| shape | B x S | V | loop | tok/s | peak RSS MB | RSS rise MB | peak GPU GiB | MFU |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for shape in shapes:
        res = {}
        # alternate the loops `rounds` times and keep each one's fastest round: on a shared host a
        # load spike then hits both loops instead of whichever ran during it
        for loop in loops * a.rounds:
            cmd = [sys.executable, __file__, "--worker", shape, loop, f"--steps={a.steps}", f"--threads={a.threads}",
                   f"--chunk={a.chunk}"] + (["--activation-checkpointing"] if a.activation_checkpointing else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                print(f"{shape} {loop} failed: {proc.stderr[-1500:]}")
                continue
            r = json.loads(line[0][7:])
            if loop not in res or r.get("tok_s", 0) > res[loop].get("tok_s", 0):
                res[loop] = r
        for loop, r in res.items():
            if r.get("oom"):
                print(f"| {shape} | | | {loop} | OOM | | | | |")
                continue
            mfu = (f"{100 * r['tok_s'] * r['flops_per_token'] / (a.peak_tflops * 1e12):.0f} %"
                   if "flops_per_token" in r else "–")
            print(f"| {shape} | {r['batch']}x{r['seq_len']} | {r['vocab']} | {loop} | {r['tok_s']} | {r['peak_rss_mb']} "
                  f"| {r['rss_rise_mb']} | {r.get('peak_gpu_gib', '–')} | {mfu} |")
        mem = "peak_gpu_gib" if device == "cuda" else "rss_rise_mb"
        for base, label in (("naive", "chunked/naive"), ("trl", "compress chunked / trl")):
            if all(k in res and not res[k].get("oom") for k in ("chunked", base)):
                b, c = res[base], res["chunked"]
                print(f"  {shape}: {label} tokens/s x{c['tok_s'] / b['tok_s']:.2f}, "
                      f"{mem} x{c[mem] / max(1e-9, b[mem]):.2f}")

if __name__ == "__main__":
    main()
