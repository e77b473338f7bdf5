"""Prompt files are read exactly as written: a quoted multi-line CSV field stays one prompt,
lines end only at \\n, \\r\\n or \\r, and unreadable JSON is one error naming its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ggufjac.errors import PromptError
from ggufjac.prompt_sets import read_prompt_set, read_words


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))  # bytes: no newline translation on the way out
    return path


def _read(path: Path) -> list[tuple[str, str, str | None, int]]:
    return [(i.id, i.prompt, i.target, i.line) for i in read_prompt_set(path)]


# -- CSV ----------------------------------------------------------------------------------------

def test_a_quoted_multi_line_csv_prompt_keeps_its_line_breaks(tmp_path) -> None:
    path = _write(tmp_path / "p.csv", 'id,prompt,target\n'
                                      'a,"first line\nsecond line", Paris\n'
                                      'b,plain,\n'
                                      ',"three\nlines\nhere",\n')
    assert _read(path) == [("a", "first line\nsecond line", " Paris", 1),
                           ("b", "plain", None, 2),
                           ("3", "three\nlines\nhere", None, 3)]  # no id: its row number


def test_a_csv_file_with_crlf_keeps_a_field_s_own_crlf(tmp_path) -> None:
    path = _write(tmp_path / "p.csv", 'prompt\r\n"one\r\ntwo"\r\nthree\r\n')
    assert _read(path) == [("1", "one\r\ntwo", None, 1), ("2", "three", None, 2)]


def test_a_bad_csv_row_is_named_by_its_row(tmp_path) -> None:
    path = _write(tmp_path / "p.csv", 'id,prompt\na,"two\nlines"\nb,\n')
    with pytest.raises(PromptError, match=r"p\.csv, row 2: the prompt is empty"):
        read_prompt_set(path)


def test_a_csv_file_without_a_prompt_column_is_refused(tmp_path) -> None:
    path = _write(tmp_path / "p.csv", "text\nHello\n")
    with pytest.raises(PromptError, match=r"p\.csv: a CSV file needs a \"prompt\" column "
                                          r"\(its header has text\)"):
        read_prompt_set(path)


def test_a_csv_row_the_csv_module_refuses_is_one_prompt_error(tmp_path) -> None:
    path = _write(tmp_path / "p.csv", 'prompt\nfine\n"a' + "x" * 140_000 + '"\n')
    with pytest.raises(PromptError, match=r"p\.csv, row 2: not valid CSV "
                                          r"\(field larger than field limit"):
        read_prompt_set(path)


# -- JSONL --------------------------------------------------------------------------------------

def test_a_5000_digit_number_is_one_error_naming_its_line(tmp_path) -> None:
    path = _write(tmp_path / "p.jsonl", '{"prompt": "a"}\n'
                                        '{"prompt": "b", "n": ' + "7" * 5000 + '}\n')
    with pytest.raises(PromptError, match=r"p\.jsonl, line 2: not readable JSON "
                                          r"\(Exceeds the limit \(4300 digits\)"):
        read_prompt_set(path)


def test_deeply_nested_json_is_one_error_naming_its_line(tmp_path) -> None:
    deep = "[" * 200_000 + "]" * 200_000
    path = _write(tmp_path / "p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b", "x": ' + deep
                  + '}\n')
    with pytest.raises(PromptError, match=r"p\.jsonl, line 3: JSON nested too deeply to read"):
        read_prompt_set(path)


def test_a_jsonl_line_with_a_raw_line_separator_is_one_prompt(tmp_path) -> None:
    # U+2028 and U+2029 are legal, unescaped, inside a JSON string
    text = json.dumps({"prompt": "before\u2028after\u2029end"}, ensure_ascii=False)
    assert "\u2028" in text
    path = _write(tmp_path / "p.jsonl", text + "\n" + '{"prompt": "next"}\n')
    assert _read(path) == [("1", "before\u2028after\u2029end", None, 1),
                           ("2", "next", None, 2)]


def test_jsonl_lines_end_at_crlf_and_cr(tmp_path) -> None:
    path = _write(tmp_path / "p.jsonl", '{"prompt": "a"}\r\n{"prompt": "b"}\r{"prompt": "c"}')
    assert _read(path) == [("1", "a", None, 1), ("2", "b", None, 2), ("3", "c", None, 3)]


# -- text ---------------------------------------------------------------------------------------

def test_text_lines_end_only_at_newlines(tmp_path) -> None:
    """Form feed, vertical tab, \\x1c-\\x1e, NEL, U+2028 and U+2029 inside a line stay in
    its prompt: the prompts after it keep their ids (line numbers)."""
    odd = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
    lines = [f"prompt {k}{sep}continued" for k, sep in enumerate(odd)] + ["last"]
    path = _write(tmp_path / "p.txt", "\n".join(lines) + "\n")
    assert _read(path) == [(str(n), text, None, n) for n, text in enumerate(lines, start=1)]


def test_text_line_numbers_count_crlf_cr_and_blank_lines(tmp_path) -> None:
    path = _write(tmp_path / "p.txt", "one\r\n\r\ntwo\rthree\n\x0c\nfour")
    # line 2 is empty and line 5 holds only a form feed (whitespace): both skipped
    assert _read(path) == [("1", "one", None, 1), ("3", "two", None, 3),
                           ("4", "three", None, 4), ("6", "four", None, 6)]


def test_concept_words_split_only_at_newlines(tmp_path) -> None:
    path = _write(tmp_path / "w.txt", "# comment\r\nice\x0ccream\n\nbanana\r")
    assert read_words(path) == ["ice\x0ccream", "banana"]
