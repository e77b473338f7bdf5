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


@dataclass(frozen=True)
class ChatRequest:
    """What the command line asks for a chat prompt: the prompt as one user message (after
    `system` when given), or the whole conversation of the messages file `messages_path`."""

    system: str | None = None
    messages_path: Path | None = None

    def conversation(self, prompt: str | None) -> list[Message]:
        """The conversation to render: from the messages file, or `prompt` as a user message."""
        if self.messages_path is not None:
            if prompt is not None or self.system is not None:
                raise ChatError("--messages is the whole conversation: drop --prompt, "
                                "--prompt-file and --system")
            return read_messages(self.messages_path)
        if prompt is None:
            raise ChatError("give --prompt, --prompt-file or --messages")
        return chat_messages(prompt, self.system)


def chat_request(chat: bool, system: str | None, messages_path: Path | None
                 ) -> ChatRequest | None:
    """The chat prompt --chat, --system and --messages ask for (None: the raw prompt).
    --messages implies --chat; --system needs --chat."""
    if system is not None and not chat and messages_path is None:
        raise ChatError("--system applies to --chat (the prompt as a user message)")
    if not chat and messages_path is None:
        return None
    return ChatRequest(system, None if messages_path is None else Path(messages_path))


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
    return messages_from_json(data, str(p))


def messages_from_json(data: Any, where: str) -> list[Message]:
    """A conversation from decoded JSON (a list of {"role": ..., "content": ...} objects);
    every bad entry is named (with its index) in one ChatError starting with `where`."""
    if not isinstance(data, list):
        raise ChatError(f"{where}: expected a JSON list of messages, found {_json_kind(data)}")
    if not data:
        raise ChatError(f"{where}: the list of messages is empty")
    problems: list[str] = []
    messages: list[Message] = []
    for i, entry in enumerate(data):
        why = _entry_problem(entry)
        if why:
            problems.append(f"message {i}: {why}")
        else:
            messages.append(Message(entry["role"], entry["content"]))
    if problems:
        raise ChatError(f"{where}: " + "; ".join(problems))
    return messages


def messages_json(messages: list[Message] | tuple[Message, ...]) -> str:
    """A conversation as one line of JSON (what a results store keeps as its prompt)."""
    return json.dumps([{"role": m.role, "content": m.content} for m in messages],
                      ensure_ascii=False)


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


# -- where each message's words are in the rendered text, and so in the tokens -------------

# The role segments of a chat prompt: a token is the words of a system, user or assistant
# message, or the template's own text (role markers, turn separators, BOS, a default system
# prompt the template writes itself, the generation prompt).
TEMPLATE = "template"
SEGMENTS = ("system", TEMPLATE, "user", "assistant")


@dataclass(frozen=True)
class ContentSpan:
    """Where message `message` (its role `role`) stands in the rendered text: characters
    [start, end)."""

    start: int
    end: int
    message: int
    role: str


@dataclass(frozen=True)
class RenderedChat:
    """A conversation rendered through a template, and where each message's words are."""

    text: str
    messages: tuple[Message, ...]
    spans: tuple[ContentSpan, ...]


# A marker no template writes and no tokenizer sees: private-use characters around the
# message's index, rendered in place of its content to find where the template puts it.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


def _marker(i: int) -> str:
    return f"{_MARK_OPEN}{i}{_MARK_CLOSE}"


def _spans_from_markers(marked: str, text: str, messages: list[Message]
                        ) -> list[ContentSpan] | None:
    """The spans of `text`, read from the same template's rendering `marked` with each
    content replaced by its marker: `text` must be that rendering with each marker replaced
    by the content (or the content stripped, for a template that trims it). None when it is
    not (a template that looks inside the content, or writes one twice)."""
    import re

    parts = re.split(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}", marked)
    pieces, indices = parts[0::2], [int(i) for i in parts[1::2]]
    if len(set(indices)) != len(indices) or any(i >= len(messages) for i in indices):
        return None
    spans, pos = [], 0
    for k, piece in enumerate(pieces):
        if not text.startswith(piece, pos):
            return None
        pos += len(piece)
        if k == len(indices):
            break
        i = indices[k]
        following = pieces[k + 1]
        for content in dict.fromkeys((messages[i].content, messages[i].content.strip())):
            if text.startswith(content + following, pos):
                break
        else:
            return None
        if content:
            spans.append(ContentSpan(pos, pos + len(content), i, messages[i].role))
        pos += len(content)
    return spans if pos == len(text) else None


def _spans_by_search(text: str, messages: list[Message]) -> list[ContentSpan]:
    """Each message's content (or its stripped content) found in `text` after the previous
    one: for a template whose rendering the markers cannot explain."""
    spans, pos = [], 0
    for i, m in enumerate(messages):
        for content in dict.fromkeys((m.content, m.content.strip())):
            at = text.find(content, pos) if content else -1
            if at >= 0:
                spans.append(ContentSpan(at, at + len(content), i, m.role))
                pos = at + len(content)
                break
    return spans


def render_with_spans(template: str, messages: list[Message],
                      add_generation_prompt: bool = True, bos_token: str = "",
                      eos_token: str = "", *, source: str = "chat template") -> RenderedChat:
    """`render_chat`, and where each message's content is in the rendered text.

    The template is rendered a second time with each content replaced by a marker; where
    the real rendering is the marked one with the contents put back, the spans are exact.
    A template that inspects or rewrites the contents beyond trimming is matched by
    searching each content in turn after the previous one."""
    text = render_chat(template, messages, add_generation_prompt, bos_token, eos_token,
                       source=source)
    marked_messages = [Message(m.role, _marker(i)) for i, m in enumerate(messages)]
    try:
        marked = render_chat(template, marked_messages, add_generation_prompt, bos_token,
                             eos_token, source=source)
    except ChatTemplateError:
        marked = None
    spans = None if marked is None else _spans_from_markers(marked, text, messages)
    if spans is None:
        spans = _spans_by_search(text, messages)
    return RenderedChat(text, tuple(messages), tuple(spans))


def render_file_chat_spans(g: GGUFFile, messages: list[Message],
                           add_generation_prompt: bool = True) -> RenderedChat:
    """`render_file_chat`, with where each message's content is (`render_with_spans`)."""
    bos, eos = special_token_texts(g)
    return render_with_spans(require_chat_template(g), messages, add_generation_prompt, bos,
                             eos, source=f"{g.path}: {Keys.Tokenizer.CHAT_TEMPLATE}")


@dataclass(frozen=True)
class TokenSegment:
    """Which segment a token belongs to: a role of SEGMENTS, and the message it came from
    (None for the template's own tokens)."""

    segment: str
    message: int | None


def token_segments(rendered: RenderedChat, pieces: list[bytes]) -> list[TokenSegment]:
    """The segment of each token, from the tokens' pieces (the bytes each stands for, as
    llama.cpp writes them, special tokens as their text).

    The pieces are laid end to end over the rendered text's UTF-8 bytes (a piece may begin
    with a space the tokenizer inserted, as SentencePiece does after a special token: that
    space stands for no byte of the text). A token belongs to the message whose content
    holds most of its bytes, or to the template when the template's text holds more (a tie
    goes to a message, the first one of the tie)."""
    data = rendered.text.encode("utf-8")
    # each byte's owner: the message index, or -1 for the template's text
    owner = [-1] * len(data)
    for s in rendered.spans:
        start = len(rendered.text[:s.start].encode("utf-8"))
        end = start + len(rendered.text[s.start:s.end].encode("utf-8"))
        owner[start:end] = [s.message] * (end - start)
    segments, pos = [], 0
    for k, piece in enumerate(pieces):
        if data.startswith(piece, pos):
            width = len(piece)
        elif piece.startswith(b" ") and data.startswith(piece[1:], pos):
            width = len(piece) - 1
        else:
            raise ChatError(f"token {k} ({piece!r}) is not the text at byte {pos} of the "
                            f"rendered prompt ({data[pos:pos + 16]!r}): the token pieces do "
                            "not spell the prompt, so their segments are unknown")
        counts: dict[int, int] = {}
        for o in owner[pos:pos + width]:
            counts[o] = counts.get(o, 0) + 1
        pos += width
        # the largest share; on a tie a message's words before the template's text (a
        # word with the template's space before it is the word), then the first message
        ranked = sorted(counts, key=lambda o: (-counts[o], o < 0, o))
        best = ranked[0] if ranked else -1
        segments.append(TokenSegment(TEMPLATE, None) if best < 0 else
                        TokenSegment(rendered.messages[best].role, best))
    if pos != len(data):
        raise ChatError(f"the tokens spell {pos} of the rendered prompt's {len(data)} bytes: "
                        "their segments are unknown")
    return segments


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation as the model reads it: rendered, tokenized with special tokens
    parsed, and each token's segment."""

    rendered: RenderedChat
    tokens: list[int]
    segments: list[TokenSegment]

    def segment_sums(self, values: list[float]) -> dict[str, float]:
        """Per-token `values` (e.g. contributions to a logit) summed by segment, every
        segment of SEGMENTS present (0.0 where no token has it)."""
        if len(values) != len(self.segments):
            raise ChatError(f"{len(values)} values for {len(self.segments)} tokens")
        sums = dict.fromkeys(SEGMENTS, 0.0)
        for s, v in zip(self.segments, values):
            sums[s.segment] += float(v)
        return sums

    def describe(self) -> dict:
        """The conversation, its rendered text and each token's segment (for report.json)."""
        return {"messages": [{"role": m.role, "content": m.content}
                             for m in self.rendered.messages],
                "rendered": self.rendered.text,
                "token_segments": [s.segment for s in self.segments],
                "token_messages": [s.message for s in self.segments]}
