"""Merging captions files: utils/merge_captions.py and the original's merge functions."""

from __future__ import annotations

import json

from tests.helpers import ROOT, read_json as read, run_script
from utils import merge_captions
from utils.core.cli import run_cli


def merge_cli(*argv: str) -> int:
    """utils/merge_captions.py in-process, through the runner every command uses."""
    return run_cli(lambda: merge_captions.main([str(a) for a in argv]))


def test_merge_reports_duplicates_and_later_file_wins(tmp_path, capsys):
    a, b, c = (tmp_path / name for name in ("a.json", "b.json", "c.json"))
    a.write_text(json.dumps({"1.png": "one", "2.png": "two", "3.png": "three"}))
    b.write_text(json.dumps({"2.png": "TWO", "4.png": "four"}))
    c.write_text(json.dumps({"2.png": "deux", "3.png": "three"}))
    output = tmp_path / "merged.json"

    assert merge_cli("--files", str(a), str(b), str(c), "--output", str(output)) == 0

    assert read(output) == {"1.png": "one", "2.png": "deux", "3.png": "three", "4.png": "four"}
    out = capsys.readouterr().out
    assert f"duplicate '2.png' in {a}, {b}, {c} (different captions); kept the value from {c}" in out
    assert f"duplicate '3.png' in {a}, {c} (same caption); kept the value from {c}" in out
    assert "merged 4 captions from 3 files" in out and "2 duplicates" in out

    assert merge_cli("--file1", str(b), "--file2", str(a), "--output", str(output)) == 0
    assert read(output)["2.png"] == "two"  # the original's flags, and order decides

    c.write_text("[1, 2]")
    assert merge_cli("--file1", str(a), "--file2", str(c), "--output", str(output)) == 2
    assert capsys.readouterr().err.strip() == f'error: {c}: expected a {{"file name": "caption"}} object, got list'


def test_original_merge_functions_second_file_wins(tmp_path, caplog):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps({"a.png": "old a", "b.png": "only in the first"}))
    second.write_text(json.dumps({"a.png": "new a", "c.png": "only in the second"}, ensure_ascii=False))
    output = tmp_path / "merged.json"

    merged = merge_captions.merge_captions(str(first), str(second), str(output))

    assert merged == read(output) == {"a.png": "new a", "b.png": "only in the first", "c.png": "only in the second"}
    assert list(read(output)) == ["a.png", "b.png", "c.png"]  # the first file's order, then the new names
    assert "duplicate 'a.png'" in caplog.text
    assert merge_captions.load_json_file(first) == {"a.png": "old a", "b.png": "only in the first"}
    assert merge_captions.load_json_file(tmp_path / "missing.json") is None
    assert merge_captions.merge_captions(first, tmp_path / "missing.json", tmp_path / "none.json") is None
    assert not (tmp_path / "none.json").exists()
    assert "missing.json: file not found" in caplog.text


def test_merge_with_no_flags_uses_the_original_files(tmp_path):
    (tmp_path / "ghibli").mkdir()
    (tmp_path / "ghibli" / "ghibli_captions_simplified.json").write_text(json.dumps({"1.png": "one", "2.png": "two"}))
    (tmp_path / "ghibli_2_captions.json").write_text(json.dumps({"2.png": "TWO", "3.png": "three"}))

    result = run_script(str(ROOT / "utils" / "merge_captions.py"), cwd=tmp_path, timeout=60)

    assert read(tmp_path / "ghibli" / "merged_captions.json") == {"1.png": "one", "2.png": "TWO", "3.png": "three"}
    assert "duplicate '2.png'" in result.stdout and "merged 3 captions from 2 files" in result.stdout

    (tmp_path / "ghibli_2_captions.json").unlink()  # a missing input: one line and a non-zero exit
    missing = run_script(str(ROOT / "utils" / "merge_captions.py"), cwd=tmp_path, check=False, timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.strip() == "error: ghibli_2_captions.json: file not found"
