"""Hostile input: each kind of broken file, prompt or setting gets one error naming the culprit.

The header mutations are written over real fields of a small synthetic file, located with
the fuzzer's field finder; the fuzz run itself is over the real Gemma 3 270M header.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ggufjac.errors import GGUFError, GgufjacError, PromptError, UnsupportedModelError
from ggufjac.gguf_file import GGUFFile
from ggufjac.layout import validate_file
from tools.fuzz_gguf import field_offsets
from tools.synthetic import Shape, write_synthetic_gguf


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, bytes, dict[str, list[int]], GGUFFile]:
    path = write_synthetic_gguf(tmp_path_factory.mktemp("v") / "base.gguf", "llama",
                                Shape(n_layer=2), "Q8_0")
    data = path.read_bytes()
    g = GGUFFile(path)
    return path, data, field_offsets(data[:g.data_start], g), g


def _mutated(tmp_path: Path, data: bytes, edits: list[tuple[str, int, int]]) -> Path:
    b = bytearray(data)
    for fmt, at, value in edits:
        struct.pack_into(fmt, b, at, value)
    out = tmp_path / "bad.gguf"
    out.write_bytes(bytes(b))
    return out


def _after_name(data: bytes, name: str) -> int:
    """Offset just past the GGUF string `name`: the n_dims field of a tensor's index entry,
    or the value-type field of a metadata key."""
    key = struct.pack("<Q", len(name)) + name.encode()
    return data.index(key) + len(key)


def _type_field(data: bytes, tensor: str) -> int:
    """Offset of the type field (uint32) of tensor `tensor`'s index entry."""
    p = _after_name(data, tensor)
    return p + 4 + 8 * struct.unpack_from("<I", data, p)[0]


def _offset_field(data: bytes, tensor: str) -> int:
    """Offset of the data-offset field (uint64) of tensor `tensor`'s index entry."""
    return _type_field(data, tensor) + 4


def test_huge_tensor_count(base, tmp_path) -> None:
    _, data, _, _ = base
    bad = _mutated(tmp_path, data, [("<Q", 8, 2**62)])
    with pytest.raises(GGUFError, match=r"bad\.gguf: tensor_count: .*cannot fit"):
        validate_file(bad)


def test_huge_string_length(base, tmp_path) -> None:
    _, data, _, _ = base
    at = data.index(struct.pack("<Q", len("general.architecture")) + b"general.architecture")
    bad = _mutated(tmp_path, data, [("<Q", at, 2**40)])
    with pytest.raises(GGUFError, match=r"bad\.gguf: .*needs 1099511627776 bytes"):
        validate_file(bad)


def test_huge_array_length(base, tmp_path) -> None:
    _, data, _, _ = base
    at = _after_name(data, "tokenizer.ggml.tokens") + 8  # after value type and item type
    bad = _mutated(tmp_path, data, [("<Q", at, 2**50)])
    with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.tokens"):
        validate_file(bad)


def test_tensor_data_beyond_end_of_file(base, tmp_path) -> None:
    _, data, _, _ = base
    bad = _mutated(tmp_path, data, [("<Q", _offset_field(data, "blk.1.ffn_down.weight"), 2**36)])
    with pytest.raises(GGUFError, match=r"tensor 'blk\.1\.ffn_down\.weight'.*beyond the end"):
        validate_file(bad)


def test_type_inconsistent_with_shape_and_size(base, tmp_path) -> None:
    """F32 instead of Q8_0: the same shape now needs ~4x the bytes, past the file's end."""
    _, data, _, _ = base
    bad = _mutated(tmp_path, data, [("<I", _type_field(data, "blk.1.ffn_down.weight"), 0)])
    with pytest.raises(GGUFError, match=r"tensor 'blk\.1\.ffn_down\.weight'.*beyond the end"):
        validate_file(bad)


def test_misaligned_tensor_offset(base, tmp_path) -> None:
    _, data, _, g = base
    at = _offset_field(data, "blk.0.attn_q.weight")
    bad = _mutated(tmp_path, data, [("<Q", at, struct.unpack_from("<Q", data, at)[0] + 3)])
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.attn_q\.weight'.*not aligned"):
        validate_file(bad)


def test_dimension_product_overflow(base, tmp_path) -> None:
    _, data, _, _ = base
    p = _after_name(data, "blk.0.attn_q.weight")
    bad = _mutated(tmp_path, data, [("<Q", p + 4, 2**40), ("<Q", p + 12, 2**40)])
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.attn_q\.weight'.*overflows"):
        validate_file(bad)


def test_unknown_tensor_type(base, tmp_path) -> None:
    _, data, _, _ = base
    bad = _mutated(tmp_path, data, [("<I", _type_field(data, "blk.0.attn_k.weight"), 99)])
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.attn_k\.weight'.*unknown tensor type 99"):
        validate_file(bad)


def _renamed(tmp_path: Path, data: bytes, old: bytes, new: bytes, at: int | None = None) -> Path:
    """The file with the bytes `old` (first occurrence, or at offset `at`) replaced by `new`
    of the same length: a key, name or value spelled differently."""
    b = bytearray(data)
    at = data.index(old) if at is None else at
    b[at:at + len(new)] = new
    out = tmp_path / "bad.gguf"
    out.write_bytes(bytes(b))
    return out


def test_unknown_architecture(base, tmp_path) -> None:
    _, data, _, _ = base
    at = _after_name(data, "general.architecture") + 4 + 8  # the string's bytes
    with pytest.raises(UnsupportedModelError, match=r"'llamb'.*gemma3.*llama"):
        validate_file(_renamed(tmp_path, data, b"llama", b"llamb", at))


def test_missing_architecture_and_required_key(base, tmp_path) -> None:
    _, data, _, _ = base
    with pytest.raises(GGUFError, match=r"general\.architecture: required metadata key is missing"):
        validate_file(_renamed(tmp_path, data, b"general.architecture", b"generaX"))
    with pytest.raises(GGUFError, match=r"llama\.block_count: required metadata key is missing"):
        validate_file(_renamed(tmp_path, data, b"llama.block_count", b"llamX"))


def test_missing_tensor(base, tmp_path) -> None:
    _, data, _, _ = base
    with pytest.raises(GGUFError, match=r"tensor 'blk\.1\.ffn_up\.weight': required tensor is missing"):
        validate_file(_renamed(tmp_path, data, b"blk.1.ffn_up.weight", b"blk.7"))


def test_cli_prints_one_line_and_exits_2(base, tmp_path) -> None:
    _, data, _, _ = base
    bad = _mutated(tmp_path, data, [("<Q", 8, 2**62)])
    r = subprocess.run([sys.executable, "-m", "ggufjac.cli", "jacobian", str(bad), "-p", "x",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "tensor_count" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_fuzz_real_header(tmp_path) -> None:
    """600 mutations of the real Gemma 3 270M header and tensor index (fixed seed), each
    validated under a time bound and an address-space bound, in a child process."""
    counts = tmp_path / "fuzz.json"
    out = subprocess.run([sys.executable, "-m", "tools.fuzz_gguf", "gemma3-270m", "--cases",
                          "600", "--seed", "0", "--json", str(counts)],
                         capture_output=True, text=True, timeout=900)
    print(out.stdout[-3000:])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(counts.read_text())
    assert result["cases"] >= 500 and not result["failures"]
    assert result["outcomes"].get("ok", 0) > 0 and result["outcomes"]["library error"] > 300


# -- weights, prompts, settings, outputs -----------------------------------------------------

def test_nonfinite_weights_are_named(tmp_path) -> None:
    from ggufjac.api import open_model

    path = write_synthetic_gguf(tmp_path / "nan.gguf", "qwen3", Shape(n_layer=2), "F32")
    data = bytearray(path.read_bytes())
    g = GGUFFile(path)
    info = g.tensor("blk.1.ffn_down.weight")
    struct.pack_into("<f", data, info.offset + 40, float("nan"))
    info2 = g.tensor("blk.0.attn_v.weight")
    struct.pack_into("<f", data, info2.offset, float("inf"))
    g.close()
    path.write_bytes(bytes(data))
    m = open_model(path)
    assert m.nonfinite_weights() == {"blk.0.attn_v.weight": 1, "blk.1.ffn_down.weight": 1}
    r = subprocess.run([sys.executable, "-m", "ggufjac.cli", "info", str(path)],
                       capture_output=True, text=True)
    assert "blk.1.ffn_down.weight" in r.stdout and "blk.0.attn_v.weight" in r.stdout
    r = subprocess.run([sys.executable, "-m", "ggufjac.cli", "check", str(path), "-p", "the bridge",
                        "--no-noise-floor"], capture_output=True, text=True)
    assert r.returncode == 1 and "non-finite" in r.stdout and "blk.1.ffn_down.weight" in r.stdout


@pytest.mark.parametrize("prompt,message", [("", "empty"), ("   \n\t", "only whitespace")])
def test_empty_prompts(gemma32, prompt: str, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        gemma32.tokenize(prompt)


def test_prompt_longer_than_max_tokens(gemma32) -> None:
    with pytest.raises(PromptError, match=r"is 7 tokens, more than --max-tokens \(4\)"):
        gemma32.tokenize("The bridge out of Marin is", max_tokens=4)


def test_prompt_longer_than_context(tmp_path) -> None:
    from ggufjac.api import open_model

    path = write_synthetic_gguf(tmp_path / "short.gguf", "llama",
                                Shape(n_layer=1, context_length=8), "F32")
    with pytest.raises(PromptError, match=r"more than the model's context length \(8\)"):
        open_model(path).tokenize("the bridge out of Marin")


def test_llama_cpp_abort_is_isolated_and_validated_first(tmp_path) -> None:
    """tokenizer 'none': llama.cpp aborts its process on tokenize(). Called directly, the
    abort stays in the child and becomes one LlamaCppError; through the API the file is
    refused before llama.cpp is asked."""
    from ggufjac import llamacpp
    from ggufjac.api import open_model
    from ggufjac.errors import LlamaCppError

    path = write_synthetic_gguf(tmp_path / "notok.gguf", "llama", Shape(n_layer=1), "F32",
                                tokenizer="none")
    with pytest.raises(LlamaCppError, match=r"notok\.gguf"):
        llamacpp.tokenize(path, "the bridge")
    with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.model: the file has no tokenizer"):
        open_model(path).tokenize("the bridge")


def test_invalid_utf8_prompt_file(tmp_path, gemma_path) -> None:
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"The bridge \xff\xfe out")
    r = subprocess.run([sys.executable, "-m", "ggufjac.cli", "check", str(gemma_path),
                        "--prompt-file", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "prompt.txt: prompt file is not valid UTF-8 (byte 11)" in r.stderr


# The CLI in a child whose first step of the reverse sweep says so on stderr, then waits for
# a signal: the test's SIGINT lands inside the sweep on every run, however fast the machine.
_IN_REVERSE_SWEEP = b"-- in the reverse sweep --"
_STOP_IN_REVERSE_SWEEP = f"""
import sys, time
from ggufjac.engine import StreamingEngine
from ggufjac.cli import main

def first_step_waits(self, *args, **kwargs):
    sys.stderr.write("\\n{_IN_REVERSE_SWEEP.decode()}\\n")
    sys.stderr.flush()
    while True:  # a signal that came before the first sleep is handled at the loop's jump
        time.sleep(0.1)

StreamingEngine.layer_vjp = first_step_waits
main(prog_name="ggufjac")
"""


def test_interrupted_jacobian_leaves_no_results(tmp_path, gemma_path) -> None:
    """SIGINT in the middle of the reverse sweep: exit 130, one line, no result files."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _STOP_IN_REVERSE_SWEEP, "jacobian",
                             str(gemma_path), "-p", "The bridge out of Marin is the", "--dtype",
                             "float64", "--out", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            # a test run started in the background inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = b""
    while _IN_REVERSE_SWEEP not in seen:
        chunk = proc.stderr.read1(256)  # type: ignore[union-attr]
        if not chunk:  # the child ended without reaching the sweep
            break
        seen += chunk
    if _IN_REVERSE_SWEEP not in seen:
        proc.kill()
        proc.wait()
    assert _IN_REVERSE_SWEEP in seen, seen
    assert b"reverse" in seen  # the sweep's progress bar had started
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"interrupted" in err and b"Traceback" not in err
    assert out.is_dir() and list(out.iterdir()) == []


def test_no_pickle_anywhere() -> None:
    """Loading never executes code from a file: no pickle, no torch.load in the package."""
    root = Path(__file__).resolve().parents[1] / "ggufjac"
    for src in root.glob("*.py"):
        text = src.read_text()
        for unsafe in ("import pickle", "pickle.load", "allow_pickle=True", "torch.load(",
                       "import dill", "import joblib"):
            assert unsafe not in text, (src, unsafe)


def test_unsupported_dtype_and_device_named() -> None:
    from ggufjac.api import check_device, parse_dtype

    with pytest.raises(GgufjacError, match="'int8' is not one of"):
        parse_dtype("int8")
    with pytest.raises(GgufjacError, match="'tpu'"):
        check_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(GgufjacError, match="no CUDA GPU"):
            check_device("cuda")
