"""Chat templates: a conversation turned into the prompt text an instruct model expects.

The template is the file's own `tokenizer.chat_template` (a Jinja2 template, as Hugging Face
ships it). It is rendered exactly as llama-cpp-python's `Jinja2ChatFormatter` renders it, so
that the prompt (and so its token ids) equals llama-cpp-python's chat formatting: a sandboxed
immutable environment with trim_blocks and lstrip_blocks (the settings transformers'
apply_chat_template uses too), the loop-control extension, Hugging Face's `{% generation %}`
tag passed through, `tojson` as transformers writes it (no ASCII escaping), and the same
variables (messages, bos_token, eos_token, add_generation_prompt, raise_exception,
strftime_now, and tools/functions set to None).

A template is data from the file: one that fails to compile or render, or that reaches for
what the sandbox forbids, is one ChatTemplateError naming the template and Jinja's message.
jinja2 is imported only when a template is rendered (the `chat` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gguf.constants import Keys

from .errors import GgufjacError
from .gguf_file import GGUFFile

ROLES = ("system", "user", "assistant")


class ChatError(GgufjacError):
    """A conversation cannot be used (a malformed messages file, an unknown role)."""


class ChatTemplateError(ChatError):
    """A chat template is missing, does not compile, or fails while rendering."""


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str  # one of ROLES
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ChatError(f"message role {self.role!r}: expected one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise ChatError(f"message content: expected a string, found "
                            f"{type(self.content).__name__}")


def chat_messages(prompt: str, system: str | None = None) -> list[Message]:
    """The conversation of one user prompt, after a system message when one is given."""
    messages = [] if system is None else [Message("system", system)]
    return [*messages, Message("user", prompt)]


def read_messages(path: str | Path) -> list[Message]:
    """A conversation from a JSON file: a list of {"role": ..., "content": ...} objects.

    Every bad entry is named (with its index) in one ChatError naming the file.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ChatError(f"{p}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ChatError(f"{p}: not UTF-8 text (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatError(f"{p}: not JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise ChatError(f"{p}: expected a JSON list of messages, found {_json_kind(data)}")
    if not data:
        raise ChatError(f"{p}: the list of messages is empty")
    problems: list[str] = []
    messages: list[Message] = []
    for i, entry in enumerate(data):
        why = _entry_problem(entry)
        if why:
            problems.append(f"message {i}: {why}")
        else:
            messages.append(Message(entry["role"], entry["content"]))
    if problems:
        raise ChatError(f"{p}: " + "; ".join(problems))
    return messages


def _json_kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _entry_problem(entry: Any) -> str | None:
    """Why one entry of a messages file is not a message (None when it is one)."""
    if not isinstance(entry, dict):
        return f"expected an object with role and content, found {_json_kind(entry)}"
    missing = [k for k in ("role", "content") if k not in entry]
    if missing:
        return "missing " + " and ".join(missing)
    # keys a template would never see would be dropped silently: refuse them
    extra = sorted(set(entry) - {"role", "content"})
    if extra:
        return "unknown key(s) " + ", ".join(map(repr, extra))
    if entry["role"] not in ROLES:
        return f"role {entry['role']!r}: expected one of {', '.join(ROLES)}"
    if not isinstance(entry["content"], str):
        return f"content: expected a string, found {_json_kind(entry['content'])}"
    return None


def chat_template(g: GGUFFile) -> str | None:
    """The file's chat template (`tokenizer.chat_template`), None when it has none."""
    template = g.get(Keys.Tokenizer.CHAT_TEMPLATE)
    if template is not None and not isinstance(template, str):
        raise ChatTemplateError(f"{g.path}: {Keys.Tokenizer.CHAT_TEMPLATE}: expected a "
                                f"string, found {type(template).__name__}")
    return template


def require_chat_template(g: GGUFFile) -> str:
    """The file's chat template, or one ChatTemplateError saying the file has none."""
    template = chat_template(g)
    if template is None:
        raise ChatTemplateError(f"{g.path}: no chat template ({Keys.Tokenizer.CHAT_TEMPLATE} "
                                "is absent): the model is not set up for chat")
    return template


def special_token_texts(g: GGUFFile) -> tuple[str, str]:
    """The texts of the file's BOS and EOS tokens as a template sees them (the raw vocabulary
    pieces, "" for one the file does not declare), as llama-cpp-python passes them."""
    texts = []
    for key in (Keys.Tokenizer.BOS_ID, Keys.Tokenizer.EOS_ID):
        token_id = g.get(key)
        if token_id is None:
            texts.append("")
            continue
        pieces = g.string_array(Keys.Tokenizer.LIST)
        if not isinstance(token_id, int) or not 0 <= token_id < len(pieces):
            raise ChatTemplateError(f"{g.path}: {key} = {token_id!r} is not a token id of the "
                                    f"vocabulary ({len(pieces)} tokens)")
        texts.append(pieces[token_id])
    return texts[0], texts[1]


def render_file_chat(g: GGUFFile, messages: list[Message],
                     add_generation_prompt: bool = True) -> str:
    """The prompt text of a conversation through the file's own template and BOS/EOS texts."""
    bos, eos = special_token_texts(g)
    return render_chat(require_chat_template(g), messages, add_generation_prompt, bos, eos,
                       source=f"{g.path}: {Keys.Tokenizer.CHAT_TEMPLATE}")


class _TemplateRaised(Exception):
    """What a template's raise_exception() raises, told apart from Jinja's own errors."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' (and llama-cpp-python's) tojson: non-ASCII text kept as it is
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _jinja2() -> Any:
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise ChatTemplateError("chat templates need the package jinja2: "
                                "pip install 'ggufjac[chat]'") from None
    return jinja2


def _environment() -> Any:
    jinja2 = _jinja2()

    class IgnoreGenerationTags(jinja2.ext.Extension):  # type: ignore[misc,name-defined]
        """Hugging Face's `{% generation %}...{% endgeneration %}`: its body, as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
        extensions=[IgnoreGenerationTags, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    return environment


def render_chat(template: str, messages: list[Message], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", *,
                source: str = "chat template") -> str:
    """The prompt text of `messages` through the chat template `template`.

    `source` names the template in errors (the file and key it came from). Any failure of
    the template (syntax, a raise_exception() call, an operation the sandbox refuses, an
    error while rendering) is one ChatTemplateError with Jinja's message.
    """
    jinja2 = _jinja2()
    try:
        compiled = _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{source}: does not compile: {e.message} "
                                f"(line {e.lineno})") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"{source}: does not compile: {e}") from None
    try:
        return compiled.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            bos_token=bos_token, eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            raise_exception=_raise_exception, strftime_now=_strftime_now,
            functions=None, function_call=None, tools=None, tool_choice=None)
    except _TemplateRaised as e:
        raise ChatTemplateError(f"{source}: the template refused the conversation: "
                                f"{e}") from None
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"{source}: refused by the sandbox: {e}") from None
    except RecursionError:
        raise ChatTemplateError(f"{source}: fails while rendering: recursion too deep") from None
    except Exception as e:  # a template is data: any failure of it is the template's
        raise ChatTemplateError(f"{source}: fails while rendering: "
                                f"{type(e).__name__}: {e}") from None
