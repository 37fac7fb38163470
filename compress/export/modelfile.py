"""Ollama `Modelfile` written beside every model.gguf, so `ollama create NAME -f Modelfile` works.

    from compress.export.modelfile import write_modelfile, chat_info
    template, stops = chat_info(path / "model.gguf")
    write_modelfile(path, template, stops)

Ollama's TEMPLATE is a Go template, not the Jinja chat template stored in the GGUF. We translate the
one format we can render exactly (ChatML: `<|im_start|>role ... <|im_end|>`, used by SmolLM2 and
Qwen2); for any other template the TEMPLATE line is left out and Ollama falls back to the template
it finds in the GGUF's metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"

# ChatML in Ollama's Go-template syntax: one block per message (system ones included), then the
# open assistant turn the model completes.
CHATML_TEMPLATE = (
    "{{- range .Messages }}" + CHATML_START + "{{ .Role }}\n"
    "{{ .Content }}" + CHATML_END + "\n"
    "{{ end }}" + CHATML_START + "assistant\n"
)


def is_chatml(chat_template: str | None) -> bool:
    return bool(chat_template) and CHATML_START in chat_template and CHATML_END in chat_template


def write_modelfile(dir, chat_template: str | None, stop_tokens) -> Path:
    """Write `dir/Modelfile` for `dir/model.gguf`; returns its path."""
    stops = [s for s in stop_tokens if s]
    lines = ["FROM ./model.gguf", ""]
    if is_chatml(chat_template):
        stops = [CHATML_START, CHATML_END] + stops
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', ""]
    else:
        lines += ["# No TEMPLATE: this chat format has no exact Go-template translation here, so",
                  "# Ollama uses the chat template stored in model.gguf (tokenizer.chat_template).", ""]
    # json.dumps gives a double-quoted string with escapes, which Ollama's parser accepts.
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in dict.fromkeys(stops)]
    path = Path(dir) / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path


def chat_info(gguf_path) -> tuple[str | None, list[str]]:
    """(chat template, stop token strings) as stored in a GGUF's tokenizer metadata."""
    import gguf
    reader = gguf.GGUFReader(str(gguf_path))

    def field(key):
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    stops = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        tid = field(key)
        if tid is not None and tokens is not None and 0 <= tid < len(tokens.data):
            stops.append(tokens.contents(tid))
    return field("tokenizer.chat_template"), list(dict.fromkeys(stops))
