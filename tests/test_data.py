"""Data stage: user data formats, the rejection filter and the held-out split."""
import json

import pytest

from compress.data import is_repetitive, load_user_data, rejection_filter, split_heldout
from compress.errors import UserError


def test_rejection_filter_drops_each_bad_kind():
    rows = [
        {"prompt": "a", "response": "A fine and complete answer.", "finished": True},
        {"prompt": "b", "response": "", "finished": True},
        {"prompt": "c", "response": "This one was cut off in the", "finished": False},
        {"prompt": "d", "response": "loop " * 40, "finished": True},
        {"prompt": "e", "response": "a  FINE and complete answer.", "finished": True},
    ]
    kept, counts = rejection_filter(rows)
    assert [r["prompt"] for r in kept] == ["a"]
    assert counts == {"empty": 1, "truncated": 1, "repetitive": 1, "duplicate": 1}


def test_repetition_detector():
    assert is_repetitive("the cat sat on the mat " * 10)
    assert not is_repetitive("Paris is the capital of France and a large city on the Seine river.")


def test_heldout_split_is_disjoint_deterministic_and_nonempty():
    texts = [f"example number {i}" for i in range(200)]
    train, held = split_heldout(texts, 0.15)
    assert set(train).isdisjoint(held) and len(train) + len(held) == 200
    assert 10 < len(held) < 60
    assert split_heldout(texts, 0.15) == (train, held)
    train2, held2 = split_heldout(texts[:2], 0.01)
    assert len(held2) == 1 and len(train2) == 1


def test_user_jsonl_formats_render_with_chat_template(tmp_path, tokenizer):
    p = tmp_path / "d.jsonl"
    rows = [{"text": "plain text"},
            {"prompt": "Hi?", "response": "Hello."},
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    texts = load_user_data(str(p), tokenizer)
    assert texts[0] == "plain text"
    assert "<|im_start|>user\nHi?<|im_end|>" in texts[1] and "Hello." in texts[1]
    assert "<|im_start|>assistant\nA<|im_end|>" in texts[2]


def test_user_txt_paragraphs(tmp_path, tokenizer):
    p = tmp_path / "d.txt"
    p.write_text("First paragraph.\n\nSecond paragraph.\n")
    assert load_user_data(str(p), tokenizer) == ["First paragraph.\n\nSecond paragraph."]


@pytest.mark.parametrize("content,needle", [
    ("", "holds no text"),
    ("not json\n", "not valid JSON"),
    ('{"foo": 1}\n', "expected 'text'"),
    ("[1, 2]\n", "must be a JSON object"),
])
def test_bad_user_data(tmp_path, tokenizer, content, needle):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(UserError, match=needle):
        load_user_data(str(p), tokenizer)


def test_missing_data_file(tokenizer):
    with pytest.raises(UserError, match="does not exist"):
        load_user_data("nope/missing.jsonl", tokenizer)


def test_prompt_of_each_row_kind():
    from compress.data import prompt_of
    assert prompt_of({"prompt": "Hi?", "response": "Hello."}) == [{"role": "user", "content": "Hi?"}]
    turns = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    assert prompt_of({"messages": turns}) == turns[:3]
    assert prompt_of({"messages": turns[:1]}) is None      # nothing answered: no prompt to ask again
    assert prompt_of({"text": "plain"}) is None


def test_utf8_with_bom_and_line_separators_inside_json_strings(tmp_path, tokenizer):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "a\u2028b"}, ensure_ascii=False).encode() + b"\n")
    assert load_user_data(str(p), tokenizer) == ["a\u2028b"]
    p.write_bytes(b"\xef\xbb\xbf" + b'{"text": "ab\xe9"}\n')      # the offset counts the BOM's bytes
    with pytest.raises(UserError, match=r"byte 0xe9 at offset 15 \(line 1\)"):
        load_user_data(str(p), tokenizer)


def test_non_utf8_file_is_refused_not_replaced(tmp_path, tokenizer):
    p = tmp_path / "d.txt"
    p.write_bytes("Première ligne.\n\nDeuxième.".encode("cp1252"))
    with pytest.raises(UserError, match=r"d.txt is not UTF-8: byte 0xe8 at offset 5 \(line 1\)"):
        load_user_data(str(p), tokenizer)


def test_data_stage_keeps_the_prompt_of_held_out_rows(tmp_path, tokenizer, tiny_llama):
    from compress import artifacts
    from compress.config import load_config
    from compress.data import run
    p = tmp_path / "chats.jsonl"
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(30)] + [{"text": "plain " * 5}] * 3
    p.write_text("\n".join(json.dumps(r) for r in rows))
    art = run(load_config([f"data={p}", "gen.heldout=0.5"]), tiny_llama, tmp_path / "data")
    held = [json.loads(l) for l in (art.path / "heldout.jsonl").read_text().splitlines()]
    train = [json.loads(l) for l in (art.path / "train.jsonl").read_text().splitlines()]
    assert all(set(r) == {"text"} for r in train)
    chats = [r for r in held if "prompt" in r]
    assert chats and all(r["prompt"][0]["content"] in r["text"] for r in chats)
    assert len(held) + len(train) == 31                    # the repeated plain row is one example
