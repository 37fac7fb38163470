"""The report's sample answers: each artifact's answer to a held-out prompt beside the teacher's.

    section = sample_section(arts, metas, warnings)   # report.json "samples", or None
    md_lines = samples_markdown(section, md_cell); html = samples_html(section)

Answers come from samples-<artifact>/meta.json (compress/evaluate/samples.py). Where an answer
first departs from the teacher's is the first token that differs; `same_chars` is how much of
its text those shared tokens make, so renderers can mark the point without a tokenizer.
"""
from __future__ import annotations

import html
import re

MARK = "▸"          # inserted where an answer departs from the teacher's (markdown)
ENDS = "(ends here)"  # an answer that stops where the teacher's goes on


def shared_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def answer_entry(name: str, m: dict, ans: dict, ref: dict | None, reference: bool = False) -> dict:
    """One artifact's answer; with `ref` (the teacher's answer), how much of it is shared."""
    entry = {"artifact": name, "runtime": m.get("runtime"), "reference": reference, "text": ans["text"],
             "tokens": len(ans["ids"]), "finished": ans["finished"], "same_tokens": None, "same_chars": None,
             "identical": None}
    if ref is not None:
        k = shared_prefix(ans["ids"], ref["ids"])
        offsets = ans.get("offsets") or []
        entry["same_tokens"] = k
        entry["identical"] = ans["ids"] == ref["ids"]
        entry["same_chars"] = len(ans["text"]) if entry["identical"] else (offsets[k - 1] if k and offsets else 0)
    return entry


def sample_section(arts: list[dict], metas: dict, warnings: list) -> dict | None:
    """Per prompt, every artifact's answer (report order, teacher first) with its shared prefix."""
    from .build import index_made_from
    samples = index_made_from(metas, warnings, "samples", "samples")
    names = [a["name"] for a in arts if a["name"] in samples]
    if not names:
        return None
    teacher = next((a["name"] for a in arts if a.get("teacher") and a["name"] in samples
                    and a.get("format") == "hf"), None)
    if teacher is None:
        warnings.append("the teacher has no sample answers, so no answer is compared with it; "
                        "re-run with stages=[samples]")
    base = samples[teacher or names[0]]
    same = ("source", "max_tokens")
    for name in list(names):   # answers made under other samples.* settings do not belong side by side
        if any(samples[name].get(k) != base.get(k) for k in same):
            warnings.append(f"samples-{name} was made with other samples settings and was left out; "
                            f"re-run with stages=[samples]")
            names.remove(name)
    prompts = []
    for i, ref in enumerate(base["answers"]):
        answers = []
        for name in names:
            got = samples[name]["answers"]
            if i < len(got) and got[i]["prompt"] == ref["prompt"]:
                answers.append(answer_entry(name, samples[name], got[i], ref if teacher and name != teacher else None,
                                            reference=name == teacher))
        prompts.append({"prompt": ref["prompt"], "answers": answers})
    return {"teacher": teacher, "source": base.get("source"), "max_tokens": base.get("max_tokens"),
            "prompts": prompts}


def prompt_text(turns: list[dict]) -> str:
    """The last user turn, with how many conversation turns came before it (a system prompt aside)."""
    users = [t for t in turns if t.get("role") == "user"] or turns
    last = str(users[-1].get("content", "")) if users else ""
    before = len([t for t in turns if t.get("role") != "system"]) - 1
    return last + (f" (after {before} earlier turn{'s' * (before > 1)})" if before > 0 else "")


def _same(a: dict) -> str:
    if a.get("reference"):
        return "reference"
    if a["same_tokens"] is None:
        return "n/a"
    return "identical" if a["identical"] else f"{a['same_tokens']} tokens"


def split(a: dict) -> tuple[str, str | None]:
    """(shared part, departing part) of an answer's text; None when nothing departs or no teacher."""
    if a["same_chars"] is None or a["identical"]:
        return a["text"], None
    cut = a["same_chars"]
    return a["text"][:cut], a["text"][cut:] or ENDS


def note(section: dict) -> str:
    src = ("held-out prompts (never trained on)" if section["source"] == "held-out" else
           "built-in prompts (the data has none; never trained on)")
    return (f"Greedy answers to {len(section['prompts'])} {src}, each generated in the artifact's own runtime "
            f"with the teacher's chat template, at most {section['max_tokens']} tokens. {MARK} marks where an "
            f"answer first departs from the teacher's; 'Same' counts the tokens before it. Runtimes break "
            f"near-ties differently, so an early departure can be harmless: KLD above is the measure.")


def _oneline(text: str) -> str:
    # every line ending markdown knows, so an answer cannot end its table row early
    return re.sub(r"\s*[\r\n\u2028\u2029\x85]+\s*", " ⏎ ", text.strip())


def samples_markdown(section: dict, md_cell) -> list[str]:
    out = ["## Sample answers", "", md_cell(note(section)), ""]
    for i, p in enumerate(section["prompts"], 1):
        out += [f"### {i}. {md_cell(_oneline(prompt_text(p['prompt'])))}", "",
                "| Artifact | Same | Answer |", "|---|---:|---|"]
        for a in p["answers"]:
            head, rest = split(a)
            shown = md_cell(_oneline(head)) + (f" {MARK} " + md_cell(_oneline(rest)) if rest is not None else "")
            shown = shown.strip() or "(empty)"
            shown += "" if a["finished"] else " …"
            out.append(f"| {md_cell(a['artifact'])} | {_same(a)} | {shown} |")
        out.append("")
    return out


def samples_html(section: dict) -> str:
    e = html.escape
    body = ["<h2>Sample answers</h2>", f'<p class="est">{e(note(section))}</p>']
    for i, p in enumerate(section["prompts"], 1):
        rows = []
        for a in p["answers"]:
            head, rest = split(a)
            shown = e(head) + (f"<mark>{e(rest)}</mark>" if rest is not None else "")
            shown = shown if shown.strip() else "(empty)"
            shown += "" if a["finished"] else " …"
            rows.append(f"<tr><td>{e(a['artifact'])}</td><td class=\"num\">{e(_same(a))}</td>"
                        f'<td class="answer">{shown}</td></tr>')
        body.append(f"<h3>{i}. {e(prompt_text(p['prompt']))}</h3><table><thead><tr><th>Artifact</th><th>Same</th>"
                    f"<th>Answer</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return "\n".join(body)
