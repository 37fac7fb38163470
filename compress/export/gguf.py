"""Export an HF artifact to one unquantized GGUF (F16 | BF16 | F32) that llama.cpp and Ollama load.

    from compress.export import gguf as export_gguf
    art = export_gguf.run(cfg, distilled, run_dir / "gguf-F16", teacher=teacher)
    # -> gguf-F16/model.gguf + gguf-F16/Modelfile + meta.json (quant "F16")

Tensor names come from gguf-py's own maps (`gguf.get_tensor_name_map`); what differs between
architectures is data in compress/archs.py. The tokenizer is copied verbatim from the teacher's original
GGUF when there is one, so the student tokenizes exactly like the teacher inside llama.cpp;
otherwise it is built from the HF tokenizer files.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from .. import artifacts
from ..archs import Arch, arch_of, model_type_of, rope_pattern
from ..stage import stage
from ..errors import UserError
from ..formats import GGUF_EXPORT as UNQUANTIZED
from .modelfile import chat_info, write_modelfile


# llama.cpp's `tokenizer.ggml.pre` names, keyed by the HF tokenizer.json pre-tokenizer signature
# (see _pre_signature). llama.cpp picks its splitting regex from this name.
_SPLIT_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    # GPT-2; also what transformers rebuilds from a GGUF "gpt2" vocab (SmolLM2 loaded from its GGUF).
    "bytelevel": "gpt-2",
    # SmolLM / SmolLM2 (HuggingFaceTB) tokenizer.json: single digits, then GPT-2 byte-level regex.
    "digits:individual|bytelevel": "smollm",
    # Qwen2 / Qwen2.5 tokenizer.json: one digit per piece.
    "split:" + _SPLIT_RE % "" + "|bytelevel:noregex": "qwen2",
    # Llama 3 / 3.1 / 3.2 tokenizer.json: up to three digits per piece.
    "split:" + _SPLIT_RE % "{1,3}" + "|bytelevel:noregex": "llama-bpe",
}
OUT_FILE = "model.gguf"


@stage("export", inputs=("teacher",), reads=("export.gguf",), format="gguf")
def run(cfg, src, out, *, teacher=None) -> artifacts.Artifact:
    """HF artifact `src` -> GGUF artifact at `out` of type cfg.export.gguf."""
    from ..models import count_params, load_model, load_tokenizer
    qtype = str(cfg.export.gguf)
    if qtype not in UNQUANTIZED:
        raise UserError(f"export.gguf={qtype} is not an unquantized type; use one of {', '.join(UNQUANTIZED)} "
                        f"(quantized types go in quantize.gguf)")
    config = _read_config(src.path)
    spec = arch_spec(config)
    check_rope_layers(spec, config)
    model = load_model(str(src.path))
    tok = load_tokenizer(str(src.path))
    source_gguf = (teacher.meta.get("metrics") or {}).get("source_gguf") if teacher is not None else None
    with artifacts.writing(out, quant=qtype, file=OUT_FILE) as (tmp, meta):
        writer = gguf.GGUFWriter(str(tmp / OUT_FILE), spec.gguf)
        _add_hparams(writer, model.config, qtype, Path(src.path).name)
        warnings = []
        if source_gguf:
            _copy_tokenizer(writer, Path(source_gguf), model.config.vocab_size)
        else:
            warnings += _add_hf_tokenizer(writer, tok, Path(src.path), model.config.vocab_size)
        types = _add_tensors(writer, model, spec, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        write_modelfile(tmp, *chat_info(tmp / OUT_FILE))
        meta["params"] = count_params(model)
        meta["metrics"] = {"tensor_types": types, "tokenizer": "teacher gguf" if source_gguf else "hf"}
        if warnings:
            meta["metrics"]["warnings"] = warnings
    return artifacts.load(out)


# ---------------------------------------------------------------- architecture and names

def _read_config(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} has no readable config.json ({e}); export needs an HF model directory") from None


def arch_spec(config) -> Arch:
    """The architecture row (compress/archs.py) of an HF config (object or dict); UserError for others."""
    return arch_of(model_type_of(config), "GGUF export")


def check_rope_layers(spec: Arch, config: dict) -> None:
    """A family whose rope-less layers llama.cpp derives from the index (SmolLM3: every 4th) must
    have them there, or the file would run but compute something else."""
    layers = config.get("no_rope_layers")
    want = rope_pattern(spec, int(config.get("num_hidden_layers") or 0))
    if spec.rope_every and layers is not None and [int(x) for x in layers] != want:
        raise UserError(f"llama.cpp applies rope by layer index in {config.get('model_type')} (none on every "
                        f"{spec.rope_every}th layer: {want}), but this model's no_rope_layers is {list(layers)}; "
                        f"derive the student with the student stage, which keeps the pattern")


def tensor_name_map(config) -> gguf.TensorNameMap:
    """gguf-py's HF -> GGUF name map for this model (shared by export and the imatrix stage)."""
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_spec(config).gguf)
    return gguf.get_tensor_name_map(enum, config.num_hidden_layers)


def gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'blk.0.attn_q.weight'."""
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"tensor {hf_name} has no GGUF name for this architecture; "
                        f"the checkpoint has layers compress cannot export")
    return name


# ---------------------------------------------------------------- hyper-parameters

def _rope_theta(config, layer_type: str = "full_attention") -> float:
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get(layer_type, params) if isinstance(params.get(layer_type), dict) else params
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_params(config) -> dict:
    """The rope parameters (of the full-attention layers where they differ per layer type)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("full_attention", params) if isinstance(params.get("full_attention"), dict) else params


def rope_dims(config) -> int:
    """Dimensions of each head that rope rotates (Phi-4-mini: 0.75 of them; usually all)."""
    factor = _rope_params(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return int(head_dim(config) * (factor or 1.0))


def _add_hparams(w: gguf.GGUFWriter, config, qtype: str, name: str) -> None:
    spec = arch_spec(config)
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or "silu"
    if act != spec.act:
        raise UserError(f"hidden_act={act} is not what llama.cpp runs for {config.model_type} ({spec.act}); "
                        f"GGUF export cannot carry it")
    if getattr(config, "use_sliding_window", False):
        raise UserError("sliding-window attention is not supported for GGUF export; set use_sliding_window=false")
    if spec.sliding:
        _add_sliding(w, config)
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_rope_dimension_count(rope_dims(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        w.add_key_length(head_dim(config))
        w.add_value_length(head_dim(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(UNQUANTIZED[qtype].code)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------- tensors

def _add_sliding(w: gguf.GGUFWriter, config) -> None:
    """Gemma 3: which layers slide (written per layer, so a layer subset keeps each layer's kind),
    the window, the sliding layers' own rope base, and llama.cpp's fixed attention scale check."""
    types = list(getattr(config, "layer_types", None) or [])
    if getattr(config, "sliding_window", None) and types:
        w.add_sliding_window(int(config.sliding_window))
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        w.add_rope_freq_base_swa(_rope_theta(config, "sliding_attention"))
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and int(scalar) != head_dim(config):
        raise UserError(f"query_pre_attn_scalar={scalar} differs from head_dim={head_dim(config)}; llama.cpp scales "
                        f"{config.model_type} attention by 1/sqrt(head_dim), so GGUF export cannot carry it")
    for key, add in (("final_logit_softcapping", w.add_final_logit_softcapping),
                     ("attn_logit_softcapping", w.add_attn_logit_softcapping)):
        if getattr(config, key, None):
            add(float(getattr(config, key)))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a Q or K projection from HF's rope layout to llama.cpp's.

    HF rotates dimension j with j + d/2 of each head (rotate_half); llama.cpp's LLAMA rope rotates
    adjacent pairs (2j, 2j+1). Both compute the same attention if each head's rows are interleaved:
    new row 2j = old row j, new row 2j+1 = old row j + d/2. Without this the file still loads and
    runs, but attention sees the wrong positions (SmolLM2-135M, Shakespeare: ppl 261 instead of 73).
    w: [n_head * d, hidden] weight or [n_head * d] bias; n_head is the KV head count for K.
    """
    d = w.shape[0] // n_head
    return (w.reshape(n_head, 2, d // 2, *w.shape[1:])    # [head, half, j, ...]
             .swapaxes(1, 2)                               # [head, j, half, ...]
             .reshape(w.shape))


def _rope_freq_factors(model, config) -> np.ndarray | None:
    """Per-frequency divisors for scaled rope (Llama 3.1 style, linear), or None for plain rope.

    HF bakes the scaling into rotary_emb.inv_freq [d/2]; llama.cpp divides its own base
    frequencies by a `rope_freqs` tensor [d/2], so the ratio reproduces HF exactly.
    """
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None or _rope_params(config).get("rope_type") == "longrope":
        return None
    d = rope_dims(config)
    base = 1.0 / (_rope_theta(config) ** (np.arange(0, d, 2, dtype=np.float64) / d))
    # one rope per layer type (Gemma 3): the full-attention layers' is the one rope_freqs would scale
    prefix = "" if hasattr(rotary, "inv_freq") else "full_attention_"
    actual = getattr(rotary, f"{prefix}inv_freq").detach().double().cpu().numpy()
    if np.allclose(actual, base, rtol=1e-6):
        return None
    if float(getattr(rotary, f"{prefix}attention_scaling", 1.0)) != 1.0 or not arch_spec(config).rope_freqs:
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type")
        raise UserError(f"rope scaling '{rope_type}' is not supported for GGUF export of {config.model_type}")
    return (base / actual).astype(np.float32)


def _add_longrope(w: gguf.GGUFWriter, config) -> int:
    """LongRoPE (Phi-3.5/4): both factor lists as llama.cpp's rope_factors_long/short tensors, the
    original context (llama.cpp switches to the long factors beyond it, as HF does) and the
    attention factor HF applies to cos/sin; returns the tensors added."""
    rp = _rope_params(config)
    if rp.get("rope_type") != "longrope":
        return 0
    orig = int(rp.get("original_max_position_embeddings") or config.original_max_position_embeddings)
    factor = rp.get("factor") or config.max_position_embeddings / orig
    attn = rp.get("attention_factor")
    if attn is None:   # HF's default (modeling_rope_utils, longrope)
        attn = 1.0 if factor <= 1.0 else float(np.sqrt(1 + np.log(factor) / np.log(orig)))
    for kind in ("LONG", "SHORT"):
        values = np.asarray(rp[f"{kind.lower()}_factor"], dtype=np.float32)   # [rope_dims / 2]
        w.add_tensor(gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, f"ROPE_FACTORS_{kind}")] + ".weight", values)
    w.add_rope_scaling_orig_ctx_len(orig)
    w.add_rope_scaling_attn_factors(float(attn))
    return 2


def _tensor_bytes(x: np.ndarray, qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """Array to store and its raw type. Norms, biases (1-D) stay F32: llama.cpp expects them so."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1 or qtype == "F32":
        return x, None
    if qtype == "F16":
        return x.astype(np.float16), None
    # numpy has no bfloat16; gguf-py packs it into raw bytes.
    return gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def _add_tensors(w: gguf.GGUFWriter, model, spec: Arch, qtype: str) -> dict:
    config = model.config
    names = tensor_name_map(config)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    types: dict[str, int] = {}
    if (factors := _rope_freq_factors(model, config)) is not None:
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)
        types["F32"] = 1
    types["F32"] = types.get("F32", 0) + _add_longrope(w, config)
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue    # llama.cpp uses token_embd.weight as the output layer when output.weight is absent
        if "rotary_emb" in hf_name:
            continue
        name = gguf_name(names, hf_name)
        x = t.detach().float().cpu().numpy()
        if spec.permute_qk and name.startswith("blk.") and ".attn_q." in name:
            x = permute_qk(x, n_head)       # [n_head * d, hidden]
        elif spec.permute_qk and name.startswith("blk.") and ".attn_k." in name:
            x = permute_qk(x, n_kv)         # [n_kv * d, hidden]
        if spec.norm_plus_one and x.ndim == 1 and name.endswith("norm.weight"):
            x = x + 1.0                     # llama.cpp's RMSNorm multiplies by w; Gemma's by 1 + w
        data, raw = _tensor_bytes(x, qtype)
        w.add_tensor(name, data, raw_dtype=raw)
        tname = "F32" if data.dtype == np.float32 else "F16" if data.dtype == np.float16 else qtype
        types[tname] = types.get(tname, 0) + 1
    return types


# ---------------------------------------------------------------- tokenizer

def _copy_tokenizer(w: gguf.GGUFWriter, path: Path, n_vocab: int) -> None:
    """Copy every tokenizer.* key from the teacher's GGUF, byte for byte."""
    if not path.is_file():
        raise UserError(f"the teacher's source GGUF {path} is missing; restore it or re-run the teacher stage")
    reader = gguf.GGUFReader(str(path))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) != n_vocab:
        raise UserError(f"the model has {n_vocab} embeddings but the teacher GGUF {path.name} has "
                        f"{len(tokens.data)} tokens; export a model that keeps the teacher's vocabulary")
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype, sub = field.types[0], field.types[-1] if len(field.types) > 1 else None
            w.add_key_value(key, _field_value(field), vtype, sub_type=sub)


def _field_value(field):
    """A reader field's value, strings as raw bytes so no token is re-encoded."""
    t = field.types
    if t[0] == gguf.GGUFValueType.ARRAY and t[-1] == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]) for i in field.data]
    if t[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1])
    return field.contents()


def _pre_signature(pre: dict | None) -> str:
    """A tokenizer.json pre_tokenizer as a short string, e.g. 'digits:individual|bytelevel'."""
    if not pre:
        return ""
    if pre.get("type") == "Sequence":
        return "|".join(_pre_signature(p) for p in pre.get("pretokenizers", []))
    kind = pre.get("type", "")
    if kind == "ByteLevel":
        return "bytelevel" if pre.get("use_regex", True) else "bytelevel:noregex"
    if kind == "Digits":
        return "digits:individual" if pre.get("individual_digits") else "digits"
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return "split:" + str(pattern.get("Regex", pattern.get("String", "")))
    return kind.lower()


def _add_hf_tokenizer(w: gguf.GGUFWriter, tok, path: Path, n_vocab: int) -> list[str]:
    """Vocabulary, merges, special ids and chat template from HF tokenizer files; returns warnings."""
    tj_path = path / "tokenizer.json"
    if not tj_path.is_file():
        raise UserError(f"{path} has no tokenizer.json; save the tokenizer with a fast (tokenizers) backend")
    tj = json.loads(tj_path.read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"tokenizer type {model.get('type')} is not supported for GGUF export; "
                        f"supported: byte-level BPE (GPT-2 style) and byte-fallback BPE (Llama 2 style)")
    warnings = []
    if model.get("byte_fallback"):
        tokens, scores, types = _spm_tokens(path, n_vocab)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")      # llama.cpp's SPM tokenizer has no pre-tokenizer regex
        # llama.cpp's SPM tokenizer puts "▁" before the text unless told not to (Gemma does not)
        w.add_add_space_prefix(_prepends_space(tj.get("normalizer")) or _prepends_space(tj.get("pre_tokenizer")))
    else:
        tokens, types = _bpe_tokens(tok, n_vocab)
        scores = None
        w.add_tokenizer_model("gpt2")
        sig = _pre_signature(tj.get("pre_tokenizer"))
        pre = PRE_TOKENIZERS.get(sig)
        if pre is None:
            pre = "default"
            warnings.append(f"unknown pre-tokenizer ({sig[:80]}); wrote tokenizer.ggml.pre=default, "
                            f"so llama.cpp may split text differently from HF")
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    special = gguf.SpecialVocab(path, load_merges=not model.get("byte_fallback"), n_vocab=n_vocab)
    # Whether BOS/EOS are added is what the HF tokenizer actually does, not what its files claim.
    probe = tok("a")["input_ids"]
    special.add_special_token["bos"] = bool(probe) and probe[0] == tok.bos_token_id
    special.add_special_token["eos"] = bool(probe) and probe[-1] == tok.eos_token_id
    special.add_to_gguf(w, quiet=True)
    if special.chat_template is None and getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)
    return warnings


def _prepends_space(part: dict | None) -> bool:
    """Whether a tokenizer.json normalizer / pre-tokenizer puts '▁' before the text (SentencePiece's
    add_dummy_prefix): a Prepend('▁'), or a Metaspace that prepends."""
    if not part:
        return False
    if part.get("type") == "Sequence":
        return any(_prepends_space(p) for p in part.get("normalizers", part.get("pretokenizers", [])))
    if part.get("type") == "Prepend":
        return part.get("prepend") == "▁"
    if part.get("type") == "Metaspace":
        return part.get("prepend_scheme", "always" if part.get("add_prefix_space", True) else "never") != "never"
    return False


def _bpe_tokens(tok, n_vocab: int) -> tuple[list[str], list[int]]:
    """Byte-level BPE vocabulary by id; added special tokens are CONTROL so llama.cpp parses them."""
    tokens: list[str | None] = [None] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in tok.get_vocab().items():
        if i >= n_vocab:
            raise UserError(f"token id {i} ({text!r}) is outside the model's {n_vocab} embeddings")
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, added in tok.added_tokens_decoder.items():
        if i < n_vocab:
            tokens[i] = added.content
            types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    # Ids without a token (embedding rows beyond the tokenizer) are padding llama.cpp never emits.
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], types


def _spm_tokens(path: Path, n_vocab: int) -> tuple[list, list, list]:
    """SentencePiece-style (byte-fallback BPE) tokens, scores and types.

    Tokens and types come from gguf-py's LlamaHfVocab. Its scores are all equal, but llama.cpp's
    SPM tokenizer merges the highest-scoring piece first; converted SentencePiece vocabularies are
    ordered by score and HF merges follow that order, so score = -id reproduces HF's merges.
    """
    tokens, _, types = (list(x) for x in zip(*gguf.LlamaHfVocab(path).all_tokens()))
    if len(tokens) > n_vocab:
        raise UserError(f"the tokenizer has {len(tokens)} tokens but the model only {n_vocab} embeddings")
    extra = n_vocab - len(tokens)     # embedding rows beyond the tokenizer: padding never emitted
    tokens += [f"[PAD{i}]".encode() for i in range(len(tokens), n_vocab)]
    return tokens, [-float(i) for i in range(n_vocab)], types + [gguf.TokenType.UNUSED] * extra
