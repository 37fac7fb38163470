"""Sequence-level KD (teacher samples, verifier keeps, student learns the text) and on-policy
distillation (the student samples, the teacher scores), on tiny models."""
import json

import pytest
import torch

from compress import artifacts
from compress.config import load_config
from compress.distill import seqkd, step, train
from compress.errors import UserError
from conftest import make_tiny


def test_final_answer_reads_gsm8k_and_plain_numbers():
    assert seqkd.final_answer("so 3 + 4 = 7.\n#### 1,234") == "1234"
    assert seqkd.final_answer("She makes $18.00 a day, so 18.0") == "18"
    assert seqkd.final_answer("The answer is 42.") == "42"
    assert seqkd.final_answer("no numbers here") is None


def test_verifier_rules():
    ok = "Janet sells 9 eggs and makes 9 * 2 = 18 dollars.\n#### 18"
    ref = "... #### 18"
    assert seqkd.verdict(ok, True, ref, "exact", 400) is None
    assert seqkd.verdict(ok.replace("18", "19"), True, ref, "exact", 400) == "wrong_answer"
    assert seqkd.verdict(ok, False, ref, "exact", 400) == "truncated"
    assert seqkd.verdict(ok, True, None, "format", 5) == "too_long"
    assert seqkd.verdict("the the the the the the the the the", True, None, "format", 400) == "repetitive"
    assert seqkd.verdict("", False, None, "none", 400) is None
    with pytest.raises(UserError, match="needs an 'answer'"):
        seqkd.verdict(ok, True, None, "exact", 400)


def test_seqkd_stage_trains_on_kept_teacher_samples(tmp_path, tokenizer, tiny_data):
    from test_distill import prepare_run
    run_dir = prepare_run(tmp_path, tokenizer, tiny_data, "seq")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n"
                               for i in range(3)))
    cfg = load_config([f"out={tmp_path}", "name=seq", "distill.mode=seqkd", f"distill.prompts={prompts}",
                       "distill.samples=2", "distill.verifier=none", "gen.max_new_tokens=24",
                       "distill.tokens=128", "distill.seq_len=32", "distill.batch=2"])
    src, teacher, data = (artifacts.load(run_dir / n) for n in ("student", "teacher", "data"))
    art = train.run(cfg, src, run_dir / "distilled", teacher=teacher, data=data)
    m = art.meta["metrics"]
    assert m["seqkd"]["candidates"] == 6 and m["seqkd"]["kept"] == 6
    rows = [json.loads(l) for l in (art.path / "seqkd.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["prompt"] == "What is 0 + 0?"
    assert m["final_loss"] > 0
    strict = load_config([f"out={tmp_path}", "name=seq", "distill.mode=seqkd", f"distill.prompts={prompts}",
                          "distill.samples=1", "distill.verifier=exact", "gen.max_new_tokens=8",
                          "distill.tokens=128", "distill.seq_len=32", "distill.batch=2", "distill.seed=1"])
    with pytest.raises(UserError, match="kept none of the teacher's 3 candidates"):
        train.run(strict, src, run_dir / "distilled-strict", teacher=teacher, data=data)


def test_student_continues_keeps_the_prompt_half(tokenizer):
    student = make_tiny(tokenizer, seed=2)
    x = torch.randint(0, len(tokenizer), (2, 16))
    y = step.student_continues(student, x, seed=0)
    assert y.shape == x.shape and torch.equal(y[:, :8], x[:, :8]) and not torch.equal(y, x)
    assert torch.equal(y, step.student_continues(student, x, seed=0))     # seeded: resumable


def test_on_policy_distillation_runs_and_records_the_loss(tmp_path, tokenizer, tiny_data):
    from test_distill import prepare_run
    run_dir = prepare_run(tmp_path, tokenizer, tiny_data, "onp")
    cfg = load_config([f"out={tmp_path}", "name=onp", "distill.mode=onpolicy", "distill.lmbda=1",
                       "distill.loss=jsd:1", "distill.beta=0.5", "distill.tokens=128", "distill.seq_len=32",
                       "distill.batch=2"])
    src, teacher, data = (artifacts.load(run_dir / n) for n in ("student", "teacher", "data"))
    art = train.run(cfg, src, run_dir / "distilled", teacher=teacher, data=data)
    assert len(art.meta["metrics"]["loss_curve"]) == 2 and art.meta["metrics"]["final_loss"] > 0
