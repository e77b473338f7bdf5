"""Bugs found by an outside review, each with the test that failed before its fix."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType as Q

from ggufjac import resolve
from ggufjac.api import open_model
from ggufjac.cli import main
from ggufjac.errors import GgufjacError, UnsupportedModelError
from ggufjac.linearize import Linearization
from tools.synthetic import Shape, write_synthetic_gguf

PROMPT = "the bridge out of Marin"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ggufjac.cli", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_jacobian_through_the_cli(synthetic, tmp_path, dtype: str) -> None:
    out = tmp_path / dtype
    p = _cli("jacobian", str(synthetic("qwen3", "Q8_0")), "-p", PROMPT, "--dtype", dtype,
             "--out", str(out))
    assert p.returncode == 0, p.stderr
    r = json.loads((out / "report.json").read_text())
    assert r["dtype"] == dtype
    assert all(abs(v["cos_with_output"]) <= 1.01 for v in r["top_singular_tokens"])
    assert r["reconstruction_rel_error"] < 0.05  # half precision rounding, not an error


@pytest.mark.parametrize("layers", ["5-3", "", "1,,2", "0-999"])
def test_bad_layer_lists_are_refused_before_any_work(synthetic, tmp_path, layers: str) -> None:
    out = tmp_path / "l"
    p = _cli("layers", str(synthetic("llama", "F32")), "-p", PROMPT, "--out", str(out),
             "--layers", layers)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--layers" in p.stderr and not out.exists()


def test_info_validates_the_tensor_index_without_the_scan(tmp_path) -> None:
    """A file with the metadata of a model but no layer tensors is not 'supported'."""
    path = tmp_path / "no-layers.gguf"
    w = GGUFWriter(str(path), "llama")
    for key, value in (("embedding_length", 64), ("block_count", 2), ("feed_forward_length", 128),
                       ("attention.head_count", 2), ("context_length", 64)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tensor("token_embd.weight", np.zeros((300, 64), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.add_tensor("output.weight", np.zeros((300, 64), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    for args in (["--no-scan"], []):
        r = CliRunner().invoke(main, ["info", str(path), *args])
        assert r.exit_code == 1, r.output
        assert "supported      no: tensor 'blk.0." in r.stdout and "supported      yes" not in r.stdout
        assert "anchoring" not in r.stdout


def test_an_anchor_is_refused_with_the_other_gate_path(synthetic) -> None:
    m = open_model(synthetic("llama", "Q8_0"), dtype="float64")
    tokens = m.tokenize(PROMPT)
    anchor = m.anchor(tokens, Linearization(gate_path="up"), reference=False)
    assert anchor.gate_path == "up"
    with pytest.raises(GgufjacError, match="gate path 'up', not 'gate'"):
        m.jacobian(tokens, Linearization(gate_path="gate"), anchor=anchor)


def _with_tensor_type(tmp_path, name: str, qtype: Q):
    """A synthetic model whose tensor `name` is re-written as raw blocks of `qtype`."""
    src = write_synthetic_gguf(tmp_path / "src.gguf", "llama", Shape(n_layer=1), "F32")
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES

    r = GGUFReader(str(src))
    dst = tmp_path / f"{qtype.name}.gguf"
    w = GGUFWriter(str(dst), "llama")
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        sub = field.types[-1] if len(field.types) > 1 else None
        w.add_key_value(field.name, field.contents(), field.types[0], sub)
    for t in r.tensors:
        data = np.array(t.data)
        if t.name == name:
            block, size = GGML_QUANT_SIZES[qtype]
            rows, cols = data.shape
            data = np.zeros((rows, cols // block * size), dtype=np.uint8)
            w.add_tensor(t.name, data, raw_dtype=qtype)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return dst


def test_undequantizable_types_are_refused_by_name(tmp_path) -> None:
    """Q8_K is an activation format that no dequantizer reads: a weight of that type is
    refused when the file is opened (before: NotImplementedError from the NaN scan)."""
    path = _with_tensor_type(tmp_path, "blk.0.ffn_down.weight", Q.Q8_K)
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.ffn_down\.weight.*Q8_K"):
        open_model(path)
    r = CliRunner().invoke(main, ["info", str(path)])
    assert r.exit_code == 1 and "Q8_K" in r.stdout, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception


class _FailingModule:
    """A demo-model package whose assembly writes part of the file, then fails."""

    def __init__(self, error: type[BaseException]) -> None:
        self.error = error

    def assemble(self, target, overwrite: bool = False) -> None:  # noqa: ANN001
        with open(target, "wb") as f:
            f.write(b"GGUF partial")
        raise self.error("interrupted")


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_interrupted_demo_assembly_leaves_nothing(tmp_path, error) -> None:
    target = tmp_path / "models" / "demo.gguf"
    with pytest.raises(error):
        resolve._assemble(_FailingModule(error), target)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_demo_assembly_writes_through_its_own_temporary(tmp_path) -> None:
    """Two processes assembling at once each write their own temporary file (before: both
    wrote MODEL.gguf.partial), and the result is readable by everyone."""
    seen = []

    class Recording:
        def assemble(self, target, overwrite: bool = False) -> None:  # noqa: ANN001
            seen.append(target)
            target.write_bytes(b"GGUF")

    target = tmp_path / "demo.gguf"
    resolve._assemble(Recording(), target)
    resolve._assemble(Recording(), target)
    assert seen[0] != seen[1] and all(p.name.endswith(".partial") for p in seen)
    assert target.read_bytes() == b"GGUF" and list(tmp_path.iterdir()) == [target]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_attribute_releases_the_engine_buffers(synthetic, monkeypatch) -> None:
    from ggufjac import engine as engine_module

    released = []
    original = engine_module.StreamingEngine.release
    monkeypatch.setattr(engine_module.StreamingEngine, "release",
                        lambda self, keep=(): (released.append(keep), original(self, keep))[1])
    m = open_model(synthetic("llama", "F32"))
    m.attribute(m.tokenize(PROMPT))
    assert () in released  # everything freed once the sweep is done


def test_loaded_model_closes(synthetic) -> None:
    with open_model(synthetic("llama", "F32")) as m:
        tokens = m.tokenize(PROMPT)
        assert m.jacobian(tokens).jacobian.shape[1] == len(tokens)
    assert m.gguf._mmap is None or m.gguf._mmap.closed


@pytest.mark.parametrize("gate_path", ["up", "gate"])
def test_memory_plan_counts_what_the_record_holds(synthetic, gate_path: str) -> None:
    """The record's estimate covers the coefficients the run really freezes (the gate path
    holds two [N, d_ff] ones), and an anchored run's ratios when anchoring is still ahead."""
    m = open_model(synthetic("llama", "Q8_0"), dtype="float64")
    tokens = m.tokenize(PROMPT)
    lin = Linearization(gate_path=gate_path)

    def held(record) -> int:  # noqa: ANN001
        seen, total = set(), 0
        for t in [*record.residuals, *(v for c in record.coefficients for v in c.values())]:
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    engine = m.engine(lin)
    plain = held(engine.forward(engine.embed(tokens)))
    assert engine.record_bytes(len(tokens)) >= plain
    anchor = m.anchor(tokens, lin, reference=False)
    anchored_engine = m.engine(lin, anchor=anchor)
    anchored = held(anchored_engine.forward(anchored_engine.embed(tokens)))
    assert engine.record_bytes(len(tokens), anchored=True) >= anchored > plain


def test_result_files_are_readable_by_others(synthetic, tmp_path) -> None:
    out = tmp_path / "j"
    p = _cli("jacobian", str(synthetic("llama", "F32")), "-p", PROMPT, "--out", str(out))
    assert p.returncode == 0, p.stderr
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_token_without_its_space_says_so(gemma64) -> None:
    tokens = gemma64.tokenize("The capital of France is")
    report = gemma64.attribute(tokens, [gemma64.token_for_text("Paris")])
    alt = report["targets"][0]["space_prefixed_alternative"]
    assert alt["token"] == " Paris" and alt["logit"] > report["targets"][0]["logit"]
    report = gemma64.attribute(tokens, [gemma64.token_for_text(" Paris")])
    assert "space_prefixed_alternative" not in report["targets"][0]


def test_mistakes_without_a_model_are_refused_before_the_imports(tmp_path) -> None:
    """Refused in a fraction of the time torch's import takes (no model is opened)."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [["jacobian", "nonexistent.gguf", "--out", str(tmp_path / "o")],  # no --prompt
             ["jacobian", "nonexistent.gguf", "-p", "x", "--out", str(tmp_path / "full")],
             ["attribute", "nonexistent.gguf", "-p", "x", "--device", "cuda:0"]
             if not os.path.exists("/proc/driver/nvidia") else
             ["attribute", "nonexistent.gguf", "-p", "x", "--device", "tpu"]]
    code = ("import sys, runpy; sys.argv = ['ggufjac'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('ggufjac.cli', run_name='__main__')\n"
            "finally:\n    print('torch imported' if 'torch' in sys.modules else 'no torch',"
            " file=sys.stderr)")
    for args in cases:
        p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.strip().splitlines()[-1] == "no torch", (args, p.stderr)
