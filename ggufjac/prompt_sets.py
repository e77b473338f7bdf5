"""Prompt sets read from files: JSONL, CSV, Parquet, or plain text with one prompt per line.

Every prompt gets an id (the file's own, or its line or row number) so that a results store
can tell which prompts it already holds. A bad entry is named by its line (row) number and
nothing is run.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .chat import ChatError, ChatRequest, Message, messages_from_json, messages_json
from .errors import PromptError


@dataclass(frozen=True)
class PromptItem:
    id: str
    # the prompt text; for a conversation, its messages as one line of JSON (messages_json)
    prompt: str
    target: str | None  # the token whose logit is attributed (None: the predicted one)
    line: int  # where it is in the file (1-based line, or row for CSV / Parquet)
    # a conversation (a JSONL line's "messages"), rendered through the model's chat template
    messages: tuple[Message, ...] | None = None


def _conversation(path: Path, line: int, row: dict, where: str) -> tuple[Message, ...]:
    if "prompt" in row:
        raise PromptError(f"{path}, {where} {line}: give \"prompt\" or \"messages\", not both")
    try:
        return tuple(messages_from_json(row["messages"], f"{path}, {where} {line}"))
    except ChatError as e:
        raise PromptError(str(e)) from None


def _item(path: Path, line: int, row: object, where: str) -> PromptItem:
    messages = None
    if where == "line" and isinstance(row, dict) and "messages" in row:  # JSONL only
        messages = _conversation(path, line, row, where)
        prompt = messages_json(messages)
    elif not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise PromptError(f"{path}, {where} {line}: expected a \"prompt\" string"
                          + (" (or a \"messages\" list)" if where == "line" else ""))
    else:
        prompt = row["prompt"]
    if not prompt.strip():
        raise PromptError(f"{path}, {where} {line}: the prompt is empty")
    ident = row.get("id")
    if ident is None or ident == "":
        ident = str(line)
    elif isinstance(ident, bool) or not isinstance(ident, (str, int)):
        raise PromptError(f"{path}, {where} {line}: \"id\" must be a string or an integer, "
                          f"not {ident!r}")
    target = row.get("target")
    if target == "":
        target = None
    if target is not None and not isinstance(target, str):
        raise PromptError(f"{path}, {where} {line}: \"target\" must be a string (a token "
                          f"such as \" Paris\"), not {target!r}")
    return PromptItem(str(ident), prompt, target, line, messages)


def _read_text(path: Path) -> str:
    """The file's text as written: no newline translation (CSV needs a quoted field's own
    line ends, and the line splitting is `_lines_of`'s)."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise PromptError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise PromptError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


# A line ends at \n, \r\n or \r only. str.splitlines() also breaks at \x0b, \x0c, \x1c-\x1e,
# \x85, U+2028 and U+2029: inside a prompt (or a JSON string, where U+2028 is legal) that
# would split it and shift every later line's number, which is the prompt's id.
_LINE_END = re.compile(r"\r\n|\r|\n")


def _lines_of(text: str) -> list[str]:
    return _LINE_END.split(text)


def _jsonl(path: Path) -> list[PromptItem]:
    items = []
    for number, line in enumerate(_lines_of(_read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}, line {number}: not JSON ({e.msg})") from None
        except RecursionError:
            raise PromptError(f"{path}, line {number}: JSON nested too deeply to read"
                              ) from None
        except ValueError as e:  # an integer longer than Python converts (4,300 digits)
            raise PromptError(f"{path}, line {number}: not readable JSON "
                              f"({str(e).split(';')[0]})") from None
        items.append(_item(path, number, row, "line"))
    return items


def _csv(path: Path) -> list[PromptItem]:
    # newline="": the csv module itself finds the rows, so a quoted field keeps its line
    # breaks (a multi-line prompt stays one prompt, its text unchanged)
    rows = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    items: list[PromptItem] = []
    try:
        header = rows.fieldnames
        if header is None or "prompt" not in header:
            raise PromptError(f"{path}: a CSV file needs a \"prompt\" column (its header "
                              f"has {', '.join(header or []) or 'no columns'})")
        # a quoted prompt may span lines, so rows (not lines) are numbered; the header is
        # not a row
        for number, row in enumerate(rows, start=1):
            items.append(_item(path, number, row, "row"))
    except csv.Error as e:
        raise PromptError(f"{path}, row {len(items) + 1}: not valid CSV ({e})") from None
    return items


def _parquet(path: Path) -> list[PromptItem]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PromptError(f"{path}: reading Parquet needs pyarrow "
                          "(pip install 'ggufjac[parquet]')") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own types for a damaged file
        raise PromptError(f"{path}: not a readable Parquet file ({e})") from None
    if "prompt" not in table.column_names:
        raise PromptError(f"{path}: a Parquet file needs a \"prompt\" column (it has "
                          f"{', '.join(table.column_names)})")
    return [_item(path, number, row, "row")
            for number, row in enumerate(table.to_pylist(), start=1)]


def _lines(path: Path) -> list[PromptItem]:
    return [PromptItem(str(number), line, None, number)
            for number, line in enumerate(_lines_of(_read_text(path)), start=1)
            if line.strip()]


def read_prompt_set(path: Path) -> list[PromptItem]:
    """The prompts of `path` by its suffix: .jsonl (objects with "prompt", or "messages" (a
    conversation: a list of role/content objects), optional "id" and "target"), .csv and .parquet (a "prompt" column, optional "id" and "target" columns),
    anything else one prompt per line (blank lines skipped; the id is the line number).
    Refuses an unreadable file, a bad entry, a duplicate id or a file without prompts."""
    path = Path(path)
    suffix = path.suffix.lower()
    reader = {".jsonl": _jsonl, ".csv": _csv, ".parquet": _parquet}.get(suffix, _lines)
    items = reader(path)
    if not items:
        raise PromptError(f"{path}: no prompts in the file")
    where = "row" if suffix in (".csv", ".parquet") else "line"
    seen: dict[str, int] = {}
    for item in items:
        if item.id in seen:
            raise PromptError(f"{path}: id {item.id!r} is used twice ({where}s "
                              f"{seen[item.id]} and {item.line})")
        seen[item.id] = item.line
    return items


def read_words(path: Path) -> list[str]:
    """Concept words, one per line (blank lines and lines starting with # skipped)."""
    words = [line.strip() for line in _lines_of(_read_text(Path(path)))]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise PromptError(f"{path}: no words in the file")
    return words


def prompt_set_inputs(items: list[PromptItem], chat: ChatRequest | None = None
                      ) -> list[str | list[Message]]:
    """What each item asks the model to read: its conversation, or its prompt (as one user
    message when `chat` asks for the chat template: `ChatRequest.conversation`)."""
    return [list(it.messages) if it.messages is not None
            else it.prompt if chat is None else chat.conversation(it.prompt) for it in items]
