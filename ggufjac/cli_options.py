"""The command-line options several commands share, each defined here once with one meaning:
the same name takes the same values, the same default and the same refusal in every command
that has it (torch-free: `ggufjac --help` stays fast).

A value these options refuse is named in one line (`ggufjac: error: ...`, exit status 2)
while the command line is read, before any model is opened.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import GgufjacError
from .units import layer_ranges

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

# Every floating-point type the streaming engine computes in; the commands whose results
# need exact arithmetic (check's comparison, the SVD's convergence test, steering) offer
# the first two only.
DTYPES = ("float32", "float64", "bfloat16", "float16")
EXACT_DTYPES = ("float32", "float64")
ANCHORS = ("none", "llama.cpp")
TOP_K_DEFAULT = 8


def refuse(ctx: click.Context, message: str) -> None:
    """One line naming the problem, exit status 2 (as every other refusal of the CLI)."""
    click.echo(f"ggufjac: error: {message}", err=True)
    ctx.exit(2)


def _checked(check: Callable[[Any], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback: `check(value)`, its GgufjacError refused in one line."""
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(value)
        except GgufjacError as e:
            refuse(ctx, str(e))
    return callback


def _at_least_one(value: int) -> int:
    if value < 1:
        raise GgufjacError(f"--top-k must be at least 1, not {value}")
    return value


def _layer_list(text: str) -> str:
    layer_ranges(text)  # the syntax; the layers a model has are checked once it is open
    return text


def dtype_option(choices: tuple[str, ...] = DTYPES) -> Decorator:
    """--dtype: the floating-point type of the computation (the weights are dequantized to
    it); `choices`: the subset a command supports, in DTYPES' order."""
    assert choices and set(choices) <= set(DTYPES), choices
    return click.option("--dtype", type=click.Choice(list(choices)), default="float32",
                        show_default=True,
                        help="Floating-point type of the computation (the weights are "
                             "dequantized to it).")


def anchor_option(effect: str = "") -> Decorator:
    """--anchor none|llama.cpp, and `--anchor` alone for llama.cpp: freeze the coefficients
    at llama.cpp's own run on the prompt. `effect`: what it adds to this command's output."""
    return click.option(
        "--anchor", type=click.Choice(list(ANCHORS)), default="none", show_default=True,
        is_flag=False, flag_value="llama.cpp",
        help="llama.cpp: explain llama.cpp's own prediction exactly (frozen coefficients "
             "taken from its run on the prompt; float64/float32). `--anchor` alone means "
             "llama.cpp." + (f" {effect}" if effect else ""))


def top_k_option(purpose: str) -> Decorator:
    """--top-k K: how many of the largest singular values (and their vectors) are kept;
    at least 1. `purpose`: what the command does with them."""
    return click.option("--top-k", "top_k", type=int, default=TOP_K_DEFAULT, show_default=True,
                        metavar="K", callback=_checked(_at_least_one),
                        help=f"{purpose} At least 1.")


def layers_option(purpose: str, name: str = "layer_list", required: bool = False) -> Decorator:
    """--layers LIST: layers (blocks, 0-based) by number and range, e.g. 0,5,10-17 (units.
    layer_ranges); its syntax is checked here, the layers a model has once it is open
    (units.parse_layer_list). `name`: the command function's parameter."""
    return click.option("--layers", name, default=None, required=required, metavar="LIST",
                        callback=_checked(_layer_list), help=purpose)


def chat_options(fn: Callable[..., Any] | None = None, *, messages: bool = True) -> Any:
    """--chat, --system TEXT and (with `messages`) --messages FILE, given to the command as
    one parameter `chat`: a chat.ChatRequest (the prompt rendered through the file's own chat
    template), or None for the raw prompt. A combination that makes no sense is refused
    here. `@chat_options(messages=False)`: a command of several prompts, each one a user
    message."""
    if fn is None:
        return functools.partial(chat_options, messages=messages)

    @functools.wraps(fn)
    def wrapper(*args: Any, chat: bool, system: str | None, messages_path: Path | None = None,
                **kwargs: Any) -> Any:
        from .chat import chat_request

        try:
            request = chat_request(chat, system, messages_path)
        except GgufjacError as e:
            refuse(click.get_current_context(), str(e))
        return fn(*args, chat=request, **kwargs)
    if messages:
        wrapper = click.option(
            "--messages", "messages_path", type=click.Path(path_type=Path), default=None,
            metavar="FILE",
            help="A whole conversation (a JSON list of {\"role\": system|user|assistant, "
                 "\"content\": ...}) rendered as --chat renders the prompt (implies --chat; "
                 "instead of --prompt).")(wrapper)
    wrapper = click.option(
        "--system", default=None, metavar="TEXT",
        help="With --chat: a system message before the prompt.")(wrapper)
    wrapper = click.option(
        "--chat", is_flag=True,
        help="Render the prompt as one user message through the file's own chat template "
             "(tokenizer.chat_template) with a generation prompt, special tokens parsed, as "
             "llama.cpp's --jinja and llama-cpp-python's chat completion do; reports show "
             "each token's role segment (docs/chat.md).")(wrapper)
    return wrapper
