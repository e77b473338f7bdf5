"""The options several commands share mean one thing in each (cli_options.py), and the
library functions the commands call return what an independent recomputation gives."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader
from safetensors.torch import load_file

from ggufjac.cli import main
from ggufjac.cli_options import DTYPES, EXACT_DTYPES
from ggufjac.errors import GgufjacError

PROMPT = "the quick brown fox"


def _commands_with(param: str) -> dict[str, click.Option]:
    """Every command's option whose function parameter is `param`."""
    found = {}
    for name, cmd in main.commands.items():
        for p in cmd.params:
            if p.name == param and isinstance(p, click.Option):
                found[name] = p
    return found


def _parsed(command: str, *args: str) -> dict:
    """The parameters `command` gets from `args` (parsed and checked, not run)."""
    cmd = main.commands[command]
    with cmd.make_context(command, list(args)) as ctx:
        return ctx.params


@pytest.fixture(scope="module")
def eight_layers(tmp_path_factory) -> Path:
    """A small random llama-family model with 8 layers (enough for '3,5-7')."""
    from tools.synthetic import Shape, write_synthetic_gguf

    path = tmp_path_factory.mktemp("eight") / "llama8.gguf"
    return write_synthetic_gguf(path, "llama", Shape(n_layer=8, d_model=64, d_ff=128,
                                                     n_head=4, n_kv_head=2, head_dim=16))


def test_top_k_is_refused_alike_by_every_command(tmp_path) -> None:
    options = _commands_with("top_k")
    assert set(options) == {"svd", "compare", "batch"}
    assert {(o.default, o.type.name) for o in options.values()} == {(8, "integer")}
    (tmp_path / "prompts.txt").write_text(PROMPT + "\n")
    invocations = {
        "svd": ["svd", "m.gguf", "-p", PROMPT, "--out", str(tmp_path / "o")],
        "compare": ["compare", "a.gguf", "b.gguf", "-p", PROMPT, "--out", str(tmp_path / "o")],
        "batch": ["batch", "m.gguf", str(tmp_path / "prompts.txt"), "--out",
                  str(tmp_path / "o")]}
    for value in ("0", "-3"):
        messages = set()
        for command, args in invocations.items():
            r = CliRunner().invoke(main, [*args, "--top-k", value])
            assert r.exit_code == 2, (command, r.output)
            assert len(r.stderr.strip().splitlines()) == 1, (command, r.stderr)
            messages.add(r.stderr.strip())
            assert not (tmp_path / "o").exists()
        assert messages == {f"ggufjac: error: --top-k must be at least 1, not {value}"}
    assert {_parsed(c, *a[1:], "--top-k", "3")["top_k"] for c, a in invocations.items()} == {3}


def test_dtype_is_one_choice_set() -> None:
    options = _commands_with("dtype")
    assert {"check", "jacobian", "svd", "attribute", "layers", "compare", "batch"} <= set(options)
    for name, o in options.items():
        choices = tuple(o.type.choices)
        assert o.default == "float32", name
        # every command offers a subset of one list, in its order
        assert choices == tuple(t for t in DTYPES if t in choices), (name, choices)
    assert tuple(options["svd"].type.choices) == EXACT_DTYPES == ("float32", "float64")
    for name in ("check", "steer", "cvector"):
        assert tuple(options[name].type.choices) == EXACT_DTYPES, name
    for name in ("jacobian", "attribute", "layers", "compare", "batch"):
        assert tuple(options[name].type.choices) == DTYPES, name
    # svd refuses a half type while reading the command line, as a choice it does not offer
    r = CliRunner().invoke(main, ["svd", "m.gguf", "-p", PROMPT, "--out", "o", "--dtype",
                                  "float16"])
    assert r.exit_code == 2 and "'float16' is not one of 'float32', 'float64'" in r.output


def test_anchor_is_one_choice_and_alone_means_llama_cpp() -> None:
    options = _commands_with("anchor")
    assert {"check", "jacobian", "svd", "attribute", "layers", "compare",
            "batch"} <= set(options)
    for name, o in options.items():
        assert (tuple(o.type.choices), o.default) == (("none", "llama.cpp"), "none"), name
    base = {"check": ["m.gguf", "-p", PROMPT], "jacobian": ["m.gguf", "-p", PROMPT, "--out", "o"],
            "attribute": ["m.gguf", "-p", PROMPT], "layers": ["m.gguf", "-p", PROMPT, "--out", "o"]}
    for command, args in base.items():
        assert _parsed(command, *args)["anchor"] == "none"
        assert _parsed(command, *args, "--anchor", "llama.cpp")["anchor"] == "llama.cpp"
        assert _parsed(command, *args, "--anchor")["anchor"] == "llama.cpp"  # at the end
        assert _parsed(command, args[0], "--anchor", *args[1:])["anchor"] == "llama.cpp"
    r = CliRunner().invoke(main, ["check", "m.gguf", "-p", PROMPT, "--anchor", "yes"])
    assert r.exit_code == 2 and "'yes' is not one of 'none', 'llama.cpp'" in r.output


def test_check_compares_every_layer_with_per_layer() -> None:
    assert _parsed("check", "m.gguf", "-p", PROMPT)["per_layer"] is False
    assert _parsed("check", "m.gguf", "-p", PROMPT, "--per-layer")["per_layer"] is True
    # the old flag is named with its new spelling, not taken for a layer list
    for args in (["--layers"], ["--layers", "0,5"]):
        r = CliRunner().invoke(main, ["check", "m.gguf", "-p", PROMPT, *args])
        assert r.exit_code == 2 and "--per-layer" in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1


def test_layer_lists_have_one_syntax(tmp_path) -> None:
    from ggufjac.cvector import parse_layer_range
    from ggufjac.units import layer_ranges, parse_layer_list

    # the syntax, checked against a list written out by hand
    assert layer_ranges("3,5-7") == [(3, 3), (5, 7)]
    assert parse_layer_list("3,5-7", 8) == [3, 5, 6, 7] == parse_layer_range("3,5-7", 8)
    assert parse_layer_list(" 7 , 0-2,1", 8) == [0, 1, 2, 7]
    for bad, message in [("5-3", "reversed"), ("", "expected numbers"), ("1,,2", "expected"),
                         ("a-b", "expected"), ("-1", "start at 0")]:
        for parse in (lambda t: parse_layer_list(t, 8), lambda t: parse_layer_range(t, 8)):
            with pytest.raises(GgufjacError, match=message):
                parse(bad)
    with pytest.raises(GgufjacError, match="layer 8 does not exist"):
        parse_layer_list("3,5-8", 8)
    with pytest.raises(GgufjacError, match="block 0 has no control-vector slot"):
        parse_layer_range("0,3", 8)
    # layers and cvector check the syntax while reading the command line: the same line,
    # nothing made
    for args in (["layers", "m.gguf", "-p", PROMPT, "--out", str(tmp_path / "o")],
                 ["cvector", "m.gguf", "--source", PROMPT, "--out", str(tmp_path / "o")]):
        r = CliRunner().invoke(main, [*args, "--layers", "5-3"])
        assert r.exit_code == 2 and not (tmp_path / "o").exists()
        assert r.stderr.strip() == "ggufjac: error: --layers '5-3': range '5-3' is reversed " \
                                   "(write 3-5)"
    shown = {name: next(o for o in cmd.params if "--layers" in o.opts)
             for name, cmd in main.commands.items()
             if any("--layers" in o.opts and not o.hidden for o in cmd.params)}
    assert set(shown) == {"layers", "cvector"}
    assert {o.metavar for o in shown.values()} == {"LIST"}


def test_layers_and_cvector_take_the_same_layers(eight_layers, tmp_path) -> None:
    out = tmp_path / "l"
    r = CliRunner().invoke(main, ["layers", str(eight_layers), "-p", PROMPT, "--out", str(out),
                                  "--layers", "3,5-7", "--dtype", "float64"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "layers.json").read_text())
    assert report["layers"] == [3, 5, 6, 7]
    assert sorted({e["layer"] for e in report["maps"]}) == [3, 5, 6, 7]
    cv = tmp_path / "cv.gguf"
    r = CliRunner().invoke(main, ["cvector", str(eight_layers), "--source", PROMPT,
                                  "--layers", "3,5-7", "--out", str(cv), "--no-check"])
    assert r.exit_code == 0, r.output
    names = sorted(t.name for t in GGUFReader(cv).tensors)
    assert names == ["direction.3", "direction.5", "direction.6", "direction.7"]


def _gguf_value(reader: GGUFReader, key: str) -> int:
    field = reader.fields[key]
    return int(field.parts[field.data[0]][0])


def test_info_summary_equals_gguf_py_counts(gemma_path) -> None:
    from ggufjac.summary import summarize

    reader = GGUFReader(gemma_path)
    arch = "gemma3"
    d = _gguf_value(reader, f"{arch}.embedding_length")
    f = _gguf_value(reader, f"{arch}.feed_forward_length")
    n_layer = _gguf_value(reader, f"{arch}.block_count")
    n_head = _gguf_value(reader, f"{arch}.attention.head_count")
    n_kv = _gguf_value(reader, f"{arch}.attention.head_count_kv")
    head_v = _gguf_value(reader, f"{arch}.attention.value_length")
    # one layer's matrices: gguf-py's element counts of the 2-D blk.0 tensors
    layer_weights = sum(int(t.n_elements) for t in reader.tensors
                        if t.name.startswith("blk.0.") and len(t.shape) == 2)
    s = summarize(gemma_path)
    assert s.supported and s.architecture == arch
    assert s.layer_weights == layer_weights
    assert s.file_size == gemma_path.stat().st_size
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    assert dict(s.tensor_types) == counts
    # J of 8 tokens: d x 8 x d float32 values
    n = 8
    assert s.jacobian is not None and s.jacobian.float32_bytes == d * n * d * 4
    # One reverse sweep of all d directions, 2 flop per multiply-add: the attention's v and
    # o projections for every direction at every position of every layer; the MLP's two
    # projections per direction and position, or, when cheaper, its d x d matrix per
    # position (d·d·f to make, d·d per direction to apply), made at every position of every
    # layer but the last, where only the last position has a cotangent.
    attention = n_layer * 2 * d * n * (d * n_kv * head_v + n_head * head_v * d)
    by_vjp = n_layer * n * d * 2 * d * f * 2
    by_matrix = 2 * (d * d * f + d * d * d) * ((n_layer - 1) * n + 1)
    assert math.isclose(s.jacobian.flop, attention + min(by_vjp, by_matrix), rel_tol=1e-12)
    # and `info` prints these figures
    r = CliRunner().invoke(main, ["info", str(gemma_path), "--no-scan"])
    assert r.exit_code == 0, r.output
    assert f"one layer      {layer_weights / 1e6:.1f} M weights" in r.output
    assert (f"jacobian       8 tokens: J is {d * n * d * 4 / 2**20:.0f} MiB float32; "
            f"~{(attention + min(by_vjp, by_matrix)) / 1e12:.2f} TFLOP") in r.output


def test_jacobian_to_dir_equals_autograd_in_memory_and_on_disk(synthetic, tmp_path,
                                                                monkeypatch) -> None:
    from ggufjac.api import open_model
    from ggufjac.linearize import Linearization
    from ggufjac.reports import jacobian_to_dir

    m = open_model(synthetic("llama", "F32"), dtype="float64")
    tokens = m.tokenize(PROMPT)
    lin = Linearization(detach=True)
    reference = m.jacobian(tokens, lin, streaming=False).jacobian  # one autograd graph
    run = jacobian_to_dir(m, tokens, lin, tmp_path / "mem")
    assert run.in_memory and torch.allclose(run.result.jacobian, reference, rtol=1e-10,
                                            atol=1e-12)
    saved = load_file(str(tmp_path / "mem" / "jacobian.safetensors"))
    assert torch.equal(saved["jacobian"], run.result.jacobian)
    assert sorted(p.name for p in (tmp_path / "mem").iterdir()) == sorted(run.files)
    report = json.loads((tmp_path / "mem" / "report.json").read_text())
    assert report["jacobian_in_memory"] is True and report["device"] == "cpu"
    # J over the memory budget (made so here: 40 directions per sweep): J is written to
    # disk as it is made, through a scratch file that does not remain
    import ggufjac.jacobian

    monkeypatch.setattr(ggufjac.jacobian, "directions_per_sweep", lambda *a, **k: 40)
    told: list[str] = []
    disk = tmp_path / "disk"
    run = jacobian_to_dir(m, tokens, lin, disk, on_spill=told.append)
    assert not run.in_memory and len(told) == 1 and "7 reverse sweeps of 40" in told[0]
    on_disk = load_file(str(disk / "jacobian.safetensors"))["jacobian"]
    assert torch.allclose(on_disk, reference, rtol=1e-10, atol=1e-12)
    assert sorted(p.name for p in disk.iterdir()) == sorted(run.files)


def test_svd_to_dir_equals_the_dense_svd(synthetic, tmp_path, monkeypatch) -> None:
    from ggufjac.api import open_model
    from ggufjac.linearize import Linearization
    from ggufjac.reports import svd_to_dir

    m = open_model(synthetic("llama", "F32"), dtype="float64")
    tokens = m.tokenize(PROMPT)
    lin = Linearization(detach=True)
    j = m.jacobian(tokens, lin, streaming=False).jacobian
    d, n = j.shape[0], j.shape[1]
    dense = torch.linalg.svdvals(j.reshape(d, -1))
    run = svd_to_dir(m, tokens, lin, tmp_path / "v", 4)
    assert run.result.converged
    assert torch.allclose(run.result.singular_values, dense[:4], rtol=1e-8)
    saved = load_file(str(tmp_path / "v" / "svd.safetensors"))
    assert torch.equal(saved["singular_values"], run.result.singular_values)
    # every J_i's top 2, with J made in a scratch file (as when it exceeds the budget)
    import ggufjac.jacobian

    monkeypatch.setattr(ggufjac.jacobian, "directions_per_sweep", lambda *a, **k: 40)
    told: list[str] = []
    run = svd_to_dir(m, tokens, lin, tmp_path / "p", 2, per_token=True, on_spill=told.append)
    assert run.per_token is not None and len(told) == 1
    for i in range(n):
        assert torch.allclose(run.per_token.singular_values[i],
                              torch.linalg.svdvals(j[:, i, :])[:2], rtol=1e-8, atol=1e-12)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == sorted(run.files)
    with pytest.raises(GgufjacError, match="rank at most"):
        svd_to_dir(m, tokens, lin, tmp_path / "k", d + 1)
    assert not (tmp_path / "k").exists()


def test_gpu_out_of_memory_is_one_line_naming_the_budget(eight_layers, tmp_path,
                                                          monkeypatch) -> None:
    """A device that runs out of memory mid-run (torch's OutOfMemoryError, raised here where
    the Jacobian is computed) ends in one line naming the option that helps, not a
    traceback, and leaves no output directory."""
    import ggufjac.reports

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ggufjac.reports, "jacobian_to_dir", out_of_memory)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["jacobian", str(eight_layers), "-p", PROMPT, "--out", str(out)])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "ran out of memory" in lines[0] and "--max-gpu-memory" in lines[0]
    assert "Traceback" not in r.output and not out.exists()
