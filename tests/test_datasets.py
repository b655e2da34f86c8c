import json

import pytest

from service.datasets import parse_rows, read_dataset
from service.errors import DatasetError


def test_reads_all_shapes(tmp_path):
    rows = [
        {"instruction": "Do X", "input": "ctx", "output": "done"},
        {"question": "1+1?", "answer": "2\n#### 2"},
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        },
        {"prompt": "p", "response": "r"},
    ]
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = read_dataset(p)
    assert [r.response for r in got] == ["done", "2\n#### 2", "hello", "r"]
    assert got[0].prompt == "Do X\n\nctx"
    assert got[1].kind == "math" and got[0].kind == "general"
    assert got[2].system == "be brief" and got[2].instruction == "hi"
    assert got[3].source == {"prompt": "p", "response": "r"}


def test_json_array(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    assert read_dataset(p)[0].response == "b"


def test_errors_name_file_line_and_field(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\nnot json\n[1]\n{"question": 3, "answer": "x"}\n'
    )
    with pytest.raises(DatasetError) as ei:
        read_dataset(p)
    errs = ei.value.details
    assert [(e["line"], e["field"]) for e in errs] == [
        (2, "output"),
        (3, None),
        (4, None),
        (5, "question"),
    ]
    assert all(e["file"] == str(p) for e in errs)
    assert "bad.jsonl:2" in str(ei.value)


def test_non_utf8_and_empty():
    with pytest.raises(DatasetError) as ei:
        parse_rows(b'{"prompt": "\xff", "response": "x"}\n')
    assert "UTF-8" in ei.value.details[0]["message"]
    with pytest.raises(DatasetError, match="no rows"):
        parse_rows(b"\n\n")
