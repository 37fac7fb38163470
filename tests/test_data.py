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
