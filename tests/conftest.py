"""Shared fixtures: the real built-in teacher's tokenizer and tiny random models that use it.

Tiny models keep stage tests on CPU in seconds while going through the real code paths
(transformers, gguf, llama.cpp). The tokenizer is the built-in teacher's, so its GGUF metadata,
chat template and special tokens are the ones users ship.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from compress import artifacts
from compress.config import BUILTIN_TEACHER

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def teacher_gguf() -> Path:
    from compress.models import builtin_gguf
    return builtin_gguf(BUILTIN_TEACHER.split(":", 1)[1])


@pytest.fixture(scope="session")
def tokenizer(teacher_gguf):
    from compress.models import load_tokenizer
    return load_tokenizer(str(teacher_gguf.parent), teacher_gguf.name)


def make_tiny(tokenizer, arch: str = "llama", layers: int = 2, hidden: int = 64, heads: int = 4,
              kv_heads: int = 2, intermediate: int = 128, tie: bool = True, seed: int = 0, **extra):
    """A tiny random causal LM of the given family over the teacher's vocabulary (`extra`: more
    config values of that family)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        arch, vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
        max_position_embeddings=512, tie_word_embeddings=tie, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    # Random init at std 0.02 gives near-uniform logits; a wider init makes top-1 meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def save_hf_artifact(model, tokenizer, out: Path, stage: str = "student") -> artifacts.Artifact:
    from compress.models import count_params, save_hf
    with artifacts.writing(out, stage=stage, config={"test": True}, parents=[], format="hf",
                           quant="fp32") as (tmp, meta):
        save_hf(model, tokenizer, tmp)
        meta["params"] = count_params(model)
    return artifacts.load(out)


@pytest.fixture()
def tiny_llama(tokenizer, tmp_path) -> artifacts.Artifact:
    """An HF artifact directory holding a tiny random Llama (2 layers, width 64)."""
    return save_hf_artifact(make_tiny(tokenizer), tokenizer, tmp_path / "tiny-llama")


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def save_data_artifact(texts_train, texts_heldout, out: Path) -> artifacts.Artifact:
    """A data artifact as the data stage writes it: train.jsonl / heldout.jsonl of {"text": ...}."""
    import json
    with artifacts.writing(out, stage="data", config={"test": True}, parents=[], format="data") as (tmp, meta):
        for fname, texts in (("train.jsonl", texts_train), ("heldout.jsonl", texts_heldout)):
            with open(tmp / fname, "w") as f:
                for t in texts:
                    f.write(json.dumps({"text": t}) + "\n")
        meta["metrics"] = {"n_train": len(texts_train), "n_heldout": len(texts_heldout)}
    return artifacts.load(out)


@pytest.fixture()
def tiny_data(tmp_path) -> artifacts.Artifact:
    """Public-domain Shakespeare paragraphs split into train and held-out texts."""
    text = (SHARED / "tiny_shakespeare" / "input.txt").read_text() if (SHARED / "tiny_shakespeare" / "input.txt").exists() else ""
    paras = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200][:80]
    if not paras:   # without ../shared, any fixed English text works for the tiny tests
        paras = [("The quick brown fox jumps over the lazy dog. " * 12 + f"Sample {i}.") for i in range(40)]
    return save_data_artifact(paras[:60], paras[60:], tmp_path / "data")
