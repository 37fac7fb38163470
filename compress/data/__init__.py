"""Data stage: the distillation set and its held-out split.

    compress run profile=phone                     # the teacher writes the data itself
    compress run profile=phone data=chats.jsonl    # .txt | .jsonl | an HF dataset name

With no data=, the DeepSeek-R1 recipe in small: built-in prompts, responses sampled from the
teacher (llama.cpp on its GGUF when there is one), a rejection filter (empty, truncated,
repetitive, duplicate) and a held-out split that is never trained on. Generated sets are cached
in the user cache dir and reused by later runs with the same teacher and settings.

Output: train.jsonl / heldout.jsonl, one {"text": ...} per line, chat template already applied; a
held-out chat row also keeps its "prompt" (the turns before its last answer) for the report's samples.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .. import artifacts
from ..errors import UserError
from ..config import host_cores
from ..models import cache_dir, load_tokenizer
from ..stage import stage
from .prompts import builtin_prompts

PROMPTS_VERSION = 1   # bump when the built-in prompts change so caches are not reused
LAYOUT = 2            # the data artifact's files: 2 = held-out rows carry their prompt


def _reads(cfg) -> tuple:
    # gen.* shapes the data only when the teacher writes it; the held-out split applies to both.
    return ("data", "gen") if not cfg.data else ("data", "gen.heldout")


@stage("data", reads=_reads, format="data",
       extra=lambda cfg: {"layout": LAYOUT} if cfg.data else {"prompts_version": PROMPTS_VERSION, "layout": LAYOUT})
def run(cfg, src: artifacts.Artifact, out: Path) -> artifacts.Artifact:
    """src: the teacher artifact (its tokenizer renders chat text; its GGUF generates)."""
    tok = load_tokenizer(str(src.path))
    if cfg.data:
        rows, source, rejected = load_user_rows(cfg.data), cfg.data, {}
    else:
        rows, rejected = generated_rows(cfg, src, tok)
        source = "teacher-generated"
    examples = {}   # text -> the conversation before its last answer (None for plain text); dedups
    for r in rows:
        text = render(r, tok, cfg.data or "generated data")
        if text.strip():
            examples.setdefault(text, prompt_of(r))
    if cfg.data and not examples:
        raise UserError(f"data {cfg.data} holds no text; it needs non-empty paragraphs (.txt) or rows with "
                        f"'text', 'prompt'/'response' or 'messages' (.jsonl)")
    texts = list(examples)
    train, heldout = split_heldout(texts, cfg.gen.heldout)
    if not train or not heldout:
        raise UserError(f"data has {len(texts)} usable examples after filtering; need at least 2 "
                        f"(one to train on, one held out): give more data or raise gen.prompts")
    with artifacts.writing(out) as (tmp, meta):
        write_jsonl(tmp / "train.jsonl", [{"text": t} for t in train])
        # held-out rows keep their prompt: the report's sample answers are generated from it
        write_jsonl(tmp / "heldout.jsonl", [{"text": t} | ({"prompt": examples[t]} if examples[t] else {})
                                            for t in heldout])
        meta["metrics"] = {
            "source": source, "n_train": len(train), "n_heldout": len(heldout),
            "train_tokens": sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in train),
            "rejected": rejected,
        }
    return artifacts.load(out)


# ---------------------------------------------------------------- user data

def load_user_data(spec: str, tok) -> list[str]:
    """The non-empty texts of a data file or dataset, chat rows rendered with the template."""
    texts = [t for t in (render(r, tok, spec) for r in load_user_rows(spec)) if t.strip()]
    if not texts:
        raise UserError(f"data {spec} holds no text; it needs non-empty paragraphs (.txt) or rows with "
                        f"'text', 'prompt'/'response' or 'messages' (.jsonl)")
    return texts


def load_user_rows(spec: str) -> list[dict]:
    path = Path(spec).expanduser()
    if path.suffix in (".txt", ".jsonl", ".json") or path.exists():
        if not path.is_file():
            raise UserError(f"data file {spec} does not exist; give a .txt, a .jsonl or an HF dataset name")
        rows = read_txt(path) if path.suffix == ".txt" else read_jsonl(path)
    else:
        rows = read_hf_dataset(spec)
    return rows


def read_txt(path: Path) -> list[dict]:
    """Paragraphs (blank-line separated), merged up to ~2000 characters each."""
    paras = [p.strip() for p in read_utf8(path).split("\n\n") if p.strip()]
    out, cur = [], ""
    for p in paras:
        if cur and len(cur) + len(p) > 2000:
            out.append({"text": cur})
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
    return out + ([{"text": cur}] if cur else [])


def read_utf8(path: Path) -> str:
    """A data file's text; a file that is not UTF-8 is refused rather than read with replacement
    characters, which would reach training as noise and surface later as a vaguer error."""
    data = Path(path).read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0   # a leading byte-order mark is not text
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = data.count(b"\n", 0, at) + 1
        raise UserError(f"{path} is not UTF-8: byte 0x{data[at]:02x} at offset {at} (line {line}) "
                        f"is invalid; convert it, e.g. "
                        f"iconv -f latin1 -t utf-8 {path} > {path.with_name(path.stem + '.utf8' + path.suffix)}") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    # split on newlines only: JSON strings may hold U+2028, which str.splitlines() would cut at
    for i, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{i} is not valid JSON; each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i} must be a JSON object with 'text', 'prompt'/'response' or 'messages'")
        rows.append(row)
    return rows


def read_hf_dataset(name: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"data={name} is not a file; to use an HF dataset install `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # the datasets library raises many types for unreachable/unknown names
        raise UserError(f"cannot load HF dataset '{name}': {str(e).splitlines()[0]}") from None
    return [dict(r) for r in ds]


def prompt_of(row: dict) -> list[dict] | None:
    """The chat turns before a row's last answer (what a model is asked), None for plain text."""
    if "messages" in row:
        msgs = list(row["messages"])
        if len(msgs) > 1 and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            return msgs[:-1]
        return None
    if "prompt" in row and ("response" in row or "completion" in row):
        return [{"role": "user", "content": str(row["prompt"])}]
    return None


def render(row: dict, tok, where: str) -> str:
    """One example as training text: chat rows go through the tokenizer's chat template."""
    if "messages" in row:
        return tok.apply_chat_template(row["messages"], tokenize=False)
    if "prompt" in row and ("response" in row or "completion" in row):
        msgs = [{"role": "user", "content": str(row["prompt"])},
                {"role": "assistant", "content": str(row.get("response", row.get("completion")))}]
        return tok.apply_chat_template(msgs, tokenize=False)
    if "text" in row:
        return str(row["text"])
    raise UserError(f"a row in {where} has keys {sorted(row)[:5]}; expected 'text', 'prompt'/'response' or 'messages'")


# ---------------------------------------------------------------- teacher-generated data

def generated_rows(cfg, teacher: artifacts.Artifact, tok) -> tuple[list[dict], dict]:
    """Teacher answers to built-in prompts ({"prompt", "response"} rows), filtered; cached across runs."""
    cache = generated_cache(teacher, cfg)
    if cache.is_file():
        rows = read_jsonl(cache)
    else:
        prompts = builtin_prompts(cfg.gen.prompts, cfg.gen.seed)
        rows = generate(cfg, teacher, tok, prompts)
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(cache, rows)
    return rejection_filter(rows)


def generated_cache(teacher: artifacts.Artifact, cfg) -> Path:
    """Where generated answers are cached: one file per teacher and generation settings."""
    gen = {k: v for k, v in cfg.section("gen").items() if k != "heldout"}   # the split is not generation
    blob = json.dumps([teacher.meta["config"], gen, PROMPTS_VERSION], sort_keys=True)
    return cache_dir() / "data" / f"generated-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.jsonl"


def generate(cfg, teacher: artifacts.Artifact, tok, prompts: list[str]) -> list[dict]:
    """Sample one response per prompt; records finish reason so truncation can be rejected."""
    from rich.progress import Progress
    gguf = teacher.meta.get("metrics", {}).get("source_gguf")
    gen = cfg.gen
    rows = []
    with Progress(transient=True) as bar:
        task = bar.add_task("teacher writes data", total=len(prompts))
        sampler = _llama_cpp_sampler(gguf, cfg) if gguf else _torch_sampler(teacher, tok, cfg)
        for i, p in enumerate(prompts):
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
            text, finished = sampler(list(ids), gen.max_new_tokens, gen.seed + i)
            rows.append({"prompt": p, "response": text.strip(), "finished": finished})
            bar.advance(task)
    return rows


def _llama_cpp_sampler(gguf_path: str, cfg):
    """Fast path: llama.cpp on the teacher's own GGUF."""
    from llama_cpp import Llama
    threads = host_cores()   # this host's cores: the data must not depend on the device profile
    llm = Llama(model_path=gguf_path, n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                verbose=False, seed=cfg.gen.seed)

    def sample(ids, max_new, seed):
        llm.set_seed(seed)
        res = llm.create_completion(prompt=ids, max_tokens=max_new, temperature=cfg.gen.temperature,
                                    top_p=cfg.gen.top_p, stop=["<|im_end|>", "<|endoftext|>"])
        choice = res["choices"][0]
        return choice["text"], choice["finish_reason"] == "stop"
    return sample


def _torch_sampler(teacher: artifacts.Artifact, tok, cfg):
    """Slow path for teachers without a GGUF: transformers generate."""
    import torch
    from ..models import load_model
    model = load_model(str(teacher.path))

    def sample(ids, max_new, seed):
        torch.manual_seed(seed)
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, max_new_tokens=max_new, do_sample=True, temperature=cfg.gen.temperature,
                               top_p=cfg.gen.top_p, pad_token_id=tok.pad_token_id)
        new = y[0, len(ids):].tolist()
        finished = tok.eos_token_id in new or len(new) < max_new
        return tok.decode(new, skip_special_tokens=True), finished
    return sample


def is_repetitive(text: str, n: int = 4, min_unique: float = 0.5) -> bool:
    """True when fewer than half of the word n-grams are distinct (loops like 'the the the')."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(max(0, len(words) - n + 1))]
    return bool(grams) and len(set(grams)) / len(grams) < min_unique


def rejection_filter(rows: list[dict]) -> tuple[list[dict], dict]:
    """Drop empty, truncated, repetitive and duplicate responses; count each reason."""
    kept, seen = [], set()
    counts = {"empty": 0, "truncated": 0, "repetitive": 0, "duplicate": 0}
    for r in rows:
        resp = r["response"].strip()
        norm = " ".join(resp.lower().split())
        if len(resp.split()) < 3:
            counts["empty"] += 1
        elif not r.get("finished", True):
            counts["truncated"] += 1
        elif is_repetitive(resp):
            counts["repetitive"] += 1
        elif norm in seen:
            counts["duplicate"] += 1
        else:
            seen.add(norm)
            kept.append(r)
    return kept, counts


def split_heldout(texts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split by content hash: an example stays on its side across runs."""
    def bucket(t):
        return int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    heldout = [t for t in texts if bucket(t) < fraction]
    train = [t for t in texts if bucket(t) >= fraction]
    if not heldout and len(train) > 1:    # tiny sets: still hold one out
        heldout, train = train[-1:], train[:-1]
    return train, heldout


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def token_stream(tok, texts: list[str], limit: int | None = None, eos: bool = True) -> list[int]:
    """Texts tokenised and concatenated in order, EOS between documents when `eos`.

    No special tokens are added: the texts are fully rendered (chat template already applied).
    Tokenising stops once `limit` tokens are collected; the result may run past it.
    """
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"]
        if eos and tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
        if limit is not None and len(ids) >= limit:
            break
    return ids


def read_texts(art: artifacts.Artifact, split: str) -> list[str]:
    """The non-empty texts of a data artifact's split ('train' or 'heldout')."""
    path = art.path / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing; re-run the data stage (stages=[data])")
    texts = []
    for row in read_jsonl(path):
        if not isinstance(row.get("text"), str):
            raise UserError(f"{path} has a row without a 'text' string; re-run the data stage (stages=[data])")
        texts.append(row["text"])
    return [t for t in texts if t.strip()]
