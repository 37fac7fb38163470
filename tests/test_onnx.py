"""ONNX export, MatMulNBits quantization, the transformers.js layout and bitsandbytes artifacts,
each checked in its own runtime (onnxruntime; torch + bitsandbytes) against the HF model.

Tiny random models over the built-in teacher's tokenizer; head size 16, the smallest that
onnxruntime's GroupQueryAttention kernel takes.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compress import artifacts
from compress.config import load_config
from compress.errors import UserError
from compress.evaluate import quality
from compress.evaluate.runtimes import open_runtime
from compress.export import browser, onnx as export_onnx
from compress.quantize import bnb, onnx as quantize_onnx
from conftest import make_tiny, save_hf_artifact

TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
        "and by opposing end them. To die, to sleep; no more.")


def cfg_for(*overrides):
    return load_config(["export.onnx=fp32", "quantize.onnx=[int8,int4]", *overrides])


@pytest.fixture(scope="module")
def ids(tokenizer):
    return tokenizer(TEXT, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def built(tokenizer, tmp_path_factory):
    """(HF, fp32, int8, int4) artifacts of one tiny Llama."""
    root = tmp_path_factory.mktemp("onnx")
    src = save_hf_artifact(make_tiny(tokenizer), tokenizer, root / "distilled", stage="distill")
    cfg = cfg_for()
    fp32 = export_onnx.run(cfg, src, root / "onnx-fp32")
    quants = [quantize_onnx.run(cfg, src, root / f"onnx-{q}", qtype=q, fp32=fp32) for q in ("int8", "int4")]
    return (src, fp32, *quants)


def _logprobs(art, ids, vocab):
    rt = open_runtime(art, threads=1, vocab=vocab, n_ctx=len(ids) + 8)
    try:
        return rt.logprobs(ids), rt
    finally:
        rt.close()


def test_fp32_onnx_matches_hf_on_every_position(built, ids, tokenizer):
    src, fp32 = built[:2]
    hf, _ = _logprobs(src, ids, len(tokenizer))
    ox, rt = _logprobs(fp32, ids, len(tokenizer))
    assert rt.name == "onnxruntime" and ox.shape == hf.shape == (len(ids), len(tokenizer))
    assert quality.top1(hf, ox) == 1.0
    assert quality.kld(hf, ox) < 1e-5
    # The graph is the on-device one: fused attention with a KV cache, weights in <file>_data.
    assert fp32.meta["metrics"]["ops"]["GroupQueryAttention"] == 2
    assert (fp32.path / "model.onnx_data").is_file() and (fp32.path / "tokenizer.json").is_file()
    # The KV inputs state their head size: transformers.js sizes the empty first cache from it.
    import onnx
    graph = onnx.load(str(fp32.file), load_external_data=False).graph
    past = [i for i in graph.input if i.name.startswith("past_key_values.")]
    assert len(past) == 4 and all(i.type.tensor_type.shape.dim[3].dim_value == 16 for i in past)
    assert fp32.meta["size_bytes"] > (fp32.path / "model.onnx_data").stat().st_size


def test_kv_cache_decoding_equals_full_sequence(built, ids, tokenizer):
    """prefill + decode_step through the graph's present -> past outputs gives the same greedy
    tokens as re-running the whole prefix each step."""
    fp32 = built[1]
    rt = open_runtime(fp32, threads=1, vocab=len(tokenizer), n_ctx=64)
    seq = list(ids[:12])
    tok = rt.prefill(seq)
    for _ in range(6):
        seq.append(tok)
        tok = rt.decode_step(tok)
    cached = seq[12:] + [tok]
    greedy = list(ids[:12])
    for _ in range(7):
        greedy.append(int(rt.logprobs(greedy)[-1].argmax()))
    rt.close()
    assert cached == greedy[12:]


def test_quantized_artifacts_are_smaller_and_ordered_by_quality(built, ids, tokenizer):
    src, fp32, int8, int4 = built
    hf, _ = _logprobs(src, ids, len(tokenizer))
    k8 = quality.kld(hf, _logprobs(int8, ids, len(tokenizer))[0])
    k4 = quality.kld(hf, _logprobs(int4, ids, len(tokenizer))[0])
    assert 0 < k8 < 0.05 < k4          # int8 keeps the model; int4 visibly costs
    assert int4.meta["size_bytes"] < int8.meta["size_bytes"] < fp32.meta["size_bytes"]
    for art, bits in ((int8, 8), (int4, 4)):
        m = art.meta["metrics"]
        assert m["bits"] == bits and m["float_matmuls"] == 0 and m["ops"]["MatMulNBits"] == 11
        assert art.meta["parents"][1]["name"] == "onnx-fp32"
    # INT4 shares one 4-bit copy of the tied embedding between the lookup and the output layer.
    assert int4.meta["metrics"]["ops"].get("GatherBlockQuantized") == 1


def test_block_size_divides_every_width():
    widths = quantize_onnx.input_widths({"hidden_size": 576, "num_attention_heads": 9, "intermediate_size": 1536})
    assert widths == {576, 1536}
    assert quantize_onnx.pick_block(widths) == 64            # 128 does not divide 576
    assert quantize_onnx.pick_block({96, 160}) == 32
    with pytest.raises(UserError, match="multiples of 16"):
        quantize_onnx.pick_block({100})


def test_forced_block_that_does_not_divide_is_one_line(built, tmp_path):
    src = built[0]
    with pytest.raises(UserError, match="does not divide"):
        quantize_onnx.run(cfg_for("quantize.onnx_block=128"), src, tmp_path / "q", qtype="int4")
    assert not (tmp_path / "q").exists()


def test_browser_layout_is_what_transformers_js_loads(built, ids, tokenizer, tmp_path):
    fp32, int8, int4 = built[1:]
    art = browser.run(cfg_for("export.layout=transformers.js"), [fp32, int8, int4], tmp_path / "browser")
    files = {p.relative_to(art.path).as_posix() for p in art.path.rglob("*") if p.is_file()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "onnx/model.onnx", "onnx/model.onnx_data",
            "onnx/model_quantized.onnx", "onnx/model_quantized.onnx_data", "onnx/model_q4.onnx",
            "onnx/model_q4.onnx_data"} <= files
    config = json.loads((art.path / "config.json").read_text())
    assert config["transformers.js_config"]["use_external_data_format"] is True
    # Each graph names its own weights file, so it loads from the new name alone.
    import onnxruntime as ort
    for name, src in (("model_q4.onnx", int4), ("model.onnx", fp32)):
        sess = ort.InferenceSession(str(art.path / "onnx" / name), providers=["CPUExecutionProvider"])
        feed = {"input_ids": np.asarray([ids[:8]], np.int64), "attention_mask": np.ones((1, 8), np.int64)}
        for i in sess.get_inputs()[2:]:
            feed[i.name] = np.zeros((1, 2, 0, 16), np.float32)
        got = sess.run(["logits"], feed)[0][0]
        want, _ = _logprobs(src, ids[:8], len(tokenizer))
        assert np.array_equal(got[:, :len(tokenizer)].argmax(-1), want.argmax(-1))


def test_bitsandbytes_artifacts_load_quantized_and_track_the_model(tokenizer, tmp_path, ids):
    src = save_hf_artifact(make_tiny(tokenizer), tokenizer, tmp_path / "distilled", stage="distill")
    hf, _ = _logprobs(src, ids, len(tokenizer))
    kld = {}
    for qtype in ("int8", "nf4"):
        art = bnb.run(load_config([f"quantize.bnb=[{qtype}]"]), src, tmp_path / f"bnb-{qtype}", qtype=qtype)
        cfg = json.loads((art.path / "config.json").read_text())["quantization_config"]
        assert cfg["quant_method"] == "bitsandbytes" and art.meta["quant"] == f"bnb-{qtype}"
        assert art.meta["metrics"]["linear_layers"] == 14    # 2 layers x (q, k, v, o, gate, up, down)
        lp, rt = _logprobs(art, ids, len(tokenizer))
        assert rt.name.startswith("torch+bitsandbytes") and rt.device in ("cpu", "cuda")
        kld[qtype] = quality.kld(hf, lp)
        if qtype == "int8":
            assert quality.top1(hf, lp) > 0.8
    # 8 bits track the model closely, 4 bits less so; neither is the model unchanged.
    assert 0 < kld["int8"] < kld["nf4"] < 1.0, kld


def test_onnx_eval_in_a_pipeline_run_and_report(tokenizer, tiny_data, tmp_path):
    """A whole run with ONNX and transformers.js layout: every ONNX artifact evaluated in
    onnxruntime and listed in report.json with its runtime; the layout directory is not a model."""
    teacher = tmp_path / "teacher-src"
    model = make_tiny(tokenizer)
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    args = ["run", f"teacher={teacher}", f"data={tiny_data.path / 'train.jsonl'}", "name=r", f"out={tmp_path}",
            "student.layers=1", "distill.tokens=256", "distill.seq_len=32", "distill.batch=2",
            "export.gguf=null", "quantize.gguf=[]", "quantize.teacher=false", "export.onnx=fp32",
            "quantize.onnx=[int4]", "export.layout=transformers.js", "eval.seqs=2", "eval.seq_len=32",
            "eval.prefill_tokens=16", "eval.decode_tokens=4", "eval.threads=1", "preflight=false"]
    proc = subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    arts = {a["name"]: a for a in report["artifacts"]}
    assert {"onnx-fp32", "onnx-int4"} <= set(arts) and "browser" not in arts
    assert arts["onnx-fp32"]["runtime"] == "onnxruntime"
    assert arts["onnx-fp32"]["quality"]["kld"] == pytest.approx(arts["distilled"]["quality"]["kld"], abs=1e-3)
    assert arts["onnx-int4"]["memory"]["peak_rss_mb"] > 0
    assert (tmp_path / "r" / "browser" / "onnx" / "model_q4.onnx").is_file()
    # A re-run reuses every finished artifact (graph + external weights checked against meta) ...
    again = subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1])
    assert again.returncode == 0 and "▶" not in again.stderr, again.stderr[-2000:]
    # Every config key changed in turn redoes exactly its readers and what depends on them.
    from test_contracts import check_every_key
    assert check_every_key(args[1:], tmp_path / "r") > 40
    # ... and redoes one whose weights file was damaged after it was finished.
    with open(tmp_path / "r" / "onnx-int4" / "model.onnx_data", "ab") as f:
        f.write(b"\0")
    third = subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1])
    assert third.returncode == 0 and "▶ quantize  onnx-int4" in third.stderr, third.stderr[-2000:]


# ---------------------------------------------------------------- bad input: one line, exit 2

@pytest.mark.parametrize("args,expect", [
    (["export.onnx=fp16"], "use export.onnx=fp32"),
    (["export.onnx=fp32", "quantize.onnx=[int3]"], "it takes int8, int4"),
    (["quantize.onnx=[int8]"], "add export.onnx=fp32"),
    (["quantize.bnb=[nf5]"], "did you mean 'nf4'"),
    (["export.onnx=fp32", "export.layout=tfjs"], "it takes transformers.js"),
    (["export.layout=transformers.js"], "add export.onnx=fp32"),
    (["export.onnx=fp32", "quantize.onnx=[int4]", "quantize.onnx_block=48"], "must be 16, 32, 64, 128 or 256"),
    (["export.gguf=null"], "set export.gguf=F16 or quantize.gguf=[]"),
])
def test_bad_onnx_and_bnb_keys(args, expect, capsys, tmp_path):
    from compress.cli import main
    assert main(["run", "name=x", f"out={tmp_path}", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not any(tmp_path.iterdir())


def test_head_size_onnxruntime_cannot_run_is_refused_before_export(tokenizer, tmp_path):
    src = save_hf_artifact(make_tiny(tokenizer, hidden=96, heads=4, kv_heads=2), tokenizer, tmp_path / "s")
    with pytest.raises(UserError, match="multiple of 16, and .* has 24"):
        export_onnx.run(cfg_for(), src, tmp_path / "onnx-fp32")
    assert not (tmp_path / "onnx-fp32").exists()


@pytest.mark.parametrize("module,extra,stage", [
    ("onnxruntime_genai", "compress[onnx]", "export_onnx"),
    ("bitsandbytes", "compress[bnb]", "bnb"),
])
def test_missing_optional_package_names_the_install(module, extra, stage, tiny_llama, tmp_path):
    """With the package made unimportable, the stage stops with the pip line and writes nothing."""
    call = {"export_onnx": "export_onnx.run(load_config(['export.onnx=fp32']), src, out)",
            "bnb": "bnb.run(load_config(['quantize.bnb=[int8]']), src, out, qtype='int8')"}[stage]
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from compress import artifacts\nfrom compress.config import load_config\n"
            "from compress.errors import UserError\nfrom compress.export import onnx as export_onnx\n"
            "from compress.quantize import bnb\n"
            f"src = artifacts.load({str(tiny_llama.path)!r}); out = {str(tmp_path / 'out')!r}\n"
            f"try:\n    {call}\nexcept UserError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-1500:]
    line = proc.stdout.strip()
    assert f"pip install '{extra}'" in line and "\n" not in line
    assert not (tmp_path / "out").exists()
