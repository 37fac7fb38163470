"""The decoder families compress carries through every stage: one row per HF `model_type`.

    from compress.archs import arch_of
    a = arch_of("qwen3")            # UserError naming the supported families for anything else
    a.gguf, a.permute_qk, a.qk_norm, a.onnx

Every stage reads this table (loading, preflight, GGUF export, the importance matrix and the auto
mix's sensitivity, ONNX export, structured pruning) instead of its own list. Adding a family is a
row, plus a small function where it is truly new. Tensor names come from gguf-py's own maps for
the row's GGUF architecture, so a row only states what differs.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Arch:
    gguf: str             # llama.cpp's general.architecture for this family
    permute_qk: bool      # llama.cpp's rope rotates adjacent pairs here, HF rotates halves: reorder Q/K rows
    rope_freqs: bool      # llama.cpp reads an optional rope_freqs tensor (Llama 3.1-style scaled rope)
    qkv_bias: bool = False   # q/k/v projections always carry a bias (else: config.attention_bias)
    qk_norm: bool = False    # RMSNorm over each head's q and k (one [head_dim] weight shared by the heads)
    q_is_hidden: bool = False   # llama.cpp's graph takes attn_q as [hidden, hidden]: hidden = heads x head_dim
    rope_every: int = 0      # llama.cpp derives the layers without rope from the index: every Nth has none
    act: str = "silu"        # the MLP's activation (config.hidden_act / hidden_activation)
    norm_plus_one: bool = False   # RMSNorm computes x * (1 + w) (Gemma): GGUF stores 1 + w
    sliding: bool = False    # per-layer sliding-window attention (config.layer_types), stored per layer
    layer_norms: int = 2     # [hidden] RMSNorm weights per layer (Gemma 3: also after attention and MLP)
    onnx: bool = True        # onnxruntime-genai's model builder exports it (fidelity-tested)
    prune: bool = True       # structured pruning slices it (MLP channels, heads, hidden width)


ARCHS = {
    # LlamaForCausalLM: Llama 2/3, TinyLlama, SmolLM/SmolLM2 (the built-in teacher).
    "llama": Arch("llama", permute_qk=True, rope_freqs=True),
    # Qwen2ForCausalLM: Qwen2, Qwen2.5. llama.cpp runs qwen2 with NEOX rope (halves, as HF does).
    "qwen2": Arch("qwen2", permute_qk=False, rope_freqs=False, qkv_bias=True, q_is_hidden=True),
    # Qwen3ForCausalLM: Qwen3-0.6B/1.7B/4B. Qwen2 without biases, with per-head q/k RMSNorm.
    "qwen3": Arch("qwen3", permute_qk=False, rope_freqs=False, qk_norm=True),
    # MistralForCausalLM: Mistral-7B-v0.3, Ministral. llama.cpp runs it as llama, as its own converter
    # writes it; a sliding window (Mistral-7B-v0.1: 4096) is not applied there, nor by compress.
    "mistral": Arch("llama", permute_qk=True, rope_freqs=True),
    # Phi3ForCausalLM: Phi-3/3.5-mini, Phi-4-mini. q/k/v and gate/up are fused projections (qkv_proj,
    # gate_up_proj), stored fused in GGUF too; LongRoPE travels as rope_factors_long/short tensors,
    # partial rotary (Phi-4-mini: 0.75) as the rope dimension count. Pruning slices the fused rows.
    "phi3": Arch("phi3", permute_qk=False, rope_freqs=False, q_is_hidden=True),
    # SmolLM3ForCausalLM: SmolLM3-3B. Llama with no rope on every 4th layer (config.no_rope_layers);
    # llama.cpp derives that from the layer index, so a layer subset must keep the pattern. The
    # onnxruntime-genai 0.18 builder stops on its rope-less layers (KeyError 'position_ids').
    "smollm3": Arch("smollm3", permute_qk=True, rope_freqs=False, rope_every=4, onnx=False),
    # Gemma3ForCausalLM (model_type gemma3_text): Gemma 3 270M/1B. RMSNorm as x * (1 + w), norms
    # after attention and MLP too, per-head q/k norms, GELU (tanh), embeddings scaled by
    # sqrt(hidden) (llama.cpp does that itself), sliding-window layers with their own rope base.
    # The onnxruntime-genai 0.18 builder expects one flat
    # rope_parameters and stops on the per-layer-type ones transformers 5 writes (KeyError 'rope_type').
    "gemma3_text": Arch("gemma3", permute_qk=False, rope_freqs=False, qk_norm=True, act="gelu_pytorch_tanh",
                        norm_plus_one=True, sliding=True, layer_norms=4, onnx=False),
}


def rope_pattern(arch: Arch, n: int) -> list[int]:
    """1 where layer i of n applies rope, as llama.cpp derives it (all ones for most families)."""
    return [int(not arch.rope_every or (i + 1) % arch.rope_every != 0) for i in range(n)]
SUPPORTED = tuple(ARCHS)
GGUF_ARCHS = tuple(sorted({a.gguf for a in ARCHS.values()}))   # what a GGUF teacher may say it is


def arch_of(model_type: str | None, what: str = "compress") -> Arch:
    """The row of an HF model_type; one line naming the supported families for anything else."""
    if model_type not in ARCHS:
        raise UserError(f"unsupported architecture '{model_type}'; {what} supports: {', '.join(SUPPORTED)}")
    return ARCHS[model_type]


def model_type_of(config) -> str | None:
    """config.model_type of an HF config object or its config.json dict."""
    return config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
