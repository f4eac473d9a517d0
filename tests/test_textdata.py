"""The one text reader (upcycle.textdata) behind --calibration, train --data and verify --prompts."""

import json

import pytest

from upcycle.errors import DataError, RecipeError
from upcycle.textdata import SUFFIXES, data_files, read_documents, read_lines


def _tree(root):
    """A folder with every accepted suffix (in any case), files to skip, and a nested folder."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("alpha text\n")
    (root / "b.TXT").write_text("upper-case suffix\n")
    (root / "c.text").write_text("dot text\n")
    (root / "d.md").write_text("# markdown\n")
    (root / "e.jsonl").write_text(json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two"}) + "\n")
    (root / "sub" / "f.ndjson").write_text(json.dumps({"text": "nd json"}) + "\n")
    (root / "sub" / "deeper" / "g.Md").write_text("deep markdown\n")
    (root / "skip.bin").write_text("not text")
    (root / "skip.csv").write_text("a,b\n")
    (root / "blank.txt").write_text("  \n\n")
    return root


def test_folder_is_read_recursively_in_sorted_order_with_every_suffix(tmp_path):
    root = _tree(tmp_path / "data")
    names = [p.relative_to(root).as_posix() for p in data_files(root)]
    assert names == ["a.txt", "b.TXT", "blank.txt", "c.text", "d.md", "e.jsonl", "sub/deeper/g.Md", "sub/f.ndjson"]
    assert set(SUFFIXES) == {".txt", ".text", ".md", ".jsonl", ".ndjson"}


def test_documents_one_per_text_file_and_per_jsonl_record(tmp_path):
    root = _tree(tmp_path / "data")
    assert list(read_documents(root)) == ["alpha text\n", "upper-case suffix\n", "dot text\n", "# markdown\n",
                                          "json one", "json two", "deep markdown\n", "nd json"]


def test_lines_one_per_text_line_and_per_jsonl_record(tmp_path):
    root = _tree(tmp_path / "data")
    (root / "a.txt").write_text("first line\n\nsecond line\n")
    assert read_lines(root)[:4] == ["first line", "second line", "upper-case suffix", "dot text"]
    assert read_lines(root / "e.jsonl") == ["json one", "json two"]


def test_a_file_named_directly_is_read_whatever_its_suffix(tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("one\ntwo\n")
    assert read_lines(prompts) == ["one", "two"]
    records = tmp_path / "records.NDJSON"
    records.write_text(json.dumps({"text": "x"}) + "\n")
    assert list(read_documents(records)) == ["x"]


def test_token_ids_only_when_asked(tmp_path):
    file = tmp_path / "ids.jsonl"
    file.write_text(json.dumps({"input_ids": [3, 4], "text": "also text"}) + "\n" + json.dumps({"text": "t"}) + "\n")
    assert list(read_documents(file, token_ids=True)) == [[3, 4], "t"]
    assert list(read_documents(file)) == ["also text", "t"]
    only_ids = tmp_path / "only.jsonl"
    only_ids.write_text(json.dumps({"input_ids": [1]}) + "\n")
    with pytest.raises(DataError, match=r"only.jsonl:1: each JSONL record needs a 'text' string$"):
        list(read_documents(only_ids))


def test_undecodable_bytes_are_replaced(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok\n")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    assert list(read_documents(tmp_path)) == ["caf\N{REPLACEMENT CHARACTER}", "caf\N{REPLACEMENT CHARACTER} ok\n"]


@pytest.mark.parametrize("content,fragment", [
    ("{not json\n", "bad.jsonl:1: not valid JSON"),
    ('\n{"prompt": "x"}\n', "bad.jsonl:2: each JSONL record needs a 'text' string"),
    ('{"text": 5}\n', "bad.jsonl:1: each JSONL record needs a 'text' string"),
    ('["text"]\n', "bad.jsonl:1: each JSONL record needs a 'text' string"),
])
def test_bad_jsonl_is_one_clear_error(tmp_path, content, fragment):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError) as info:
        list(read_documents(tmp_path / "bad.jsonl"))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(DataError, match=r"^--calibration not found: .*missing.txt \(no such file or folder\)"):
        data_files(tmp_path / "missing.txt", "--calibration")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.pdf").write_text("x")
    with pytest.raises(DataError, match=r"the folder holds no \.txt, \.text, \.md, \.jsonl, \.ndjson files"):
        data_files(tmp_path / "empty")


def test_data_errors_are_recipe_errors():
    """Calibration text and prompts files raised RecipeError before the one reader: callers that catch it still do."""
    assert issubclass(DataError, RecipeError) and DataError("x").exit_code == 2
