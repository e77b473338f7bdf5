"""Weights held in a device's memory (device_weights.py), on the CPU: the staged reader's
bytes against the file's own for every chunk geometry, a truncated file refused naming the
tensor, which tensors a budget holds against the formula written here, the held and staged
paths' Jacobians against the mapped path's, and the option parsing. The same code runs on a
GPU with page-locked buffers and a copy stream (tests/test_cuda.py)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ggufjac.api import open_model
from ggufjac.device_weights import (MAX_HOLE_BYTES, WORKING_SHARE, Span, StagedReader,
                                    check_matmul_precision, matmul_precision, parse_gpu_memory,
                                    plan_residency, working_reserve)
from ggufjac.errors import GGUFError, GgufjacError
from ggufjac.gguf_file import GGUFFile, TensorInfo
from ggufjac.jacobian import streamed_jacobian

TOKENS = [1] + [5 + b for b in "the bridge out of Marin".encode()]


def _file_bytes(path, info: TensorInfo) -> bytes:
    """The tensor's bytes read with plain file reads (independent of the mapping and of the
    staged reader)."""
    with open(path, "rb") as f:
        f.seek(info.offset)
        return f.read(info.n_bytes)


@pytest.fixture(scope="module")
def llama_file(synthetic):
    return synthetic("llama", "Q4_K_M")


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4093, 65536 + 3, 1 << 20, 1 << 26])
def test_staged_reader_bytes_equal_the_file(llama_file, chunk_bytes: int) -> None:
    """Every tensor's bytes, read in one staged pass, equal the file's and the mapping's,
    with chunks smaller than a block, unaligned, about a tensor, larger than many tensors
    and larger than the file."""
    gguf = GGUFFile(llama_file)
    try:
        infos = list(gguf.tensors.values())
        if chunk_bytes < 4096:  # byte-sized chunks: a few tensors, not the whole file
            infos = sorted(infos, key=lambda t: t.n_bytes)[:6]
        dests = {t.name: torch.full((t.n_bytes,), 0xAB, dtype=torch.uint8) for t in infos}
        reader = StagedReader(gguf, "cpu", chunk_bytes)
        reader.read([Span(t.name, t.offset, dests[t.name]) for t in reversed(infos)])
        for t in infos:
            got = dests[t.name].numpy().tobytes()
            assert got == _file_bytes(llama_file, t), t.name
            assert got == gguf.tensor_data(t.name).tobytes(), t.name
        assert reader.stats.bytes_read >= sum(t.n_bytes for t in infos)
    finally:
        gguf.close()


@pytest.mark.parametrize("chunk_bytes", [5, 1000, 1 << 16])
def test_staged_reader_partial_ranges(llama_file, chunk_bytes: int) -> None:
    """A piece of a tensor (odd start and length), and pieces far apart in the file (more
    than a hole apart, so separate runs), each equal to the file's bytes."""
    gguf = GGUFFile(llama_file)
    try:
        big = max(gguf.tensors.values(), key=lambda t: t.n_bytes)
        reader = StagedReader(gguf, "cpu", chunk_bytes)
        got = reader.read_tensor(big, first_byte=12345, n_bytes=54321)
        assert got.numpy().tobytes() == _file_bytes(llama_file, big)[12345:12345 + 54321]
        first = min(gguf.tensors.values(), key=lambda t: t.offset)
        last = max(gguf.tensors.values(), key=lambda t: t.offset)
        assert last.offset - first.offset > MAX_HOLE_BYTES
        a = torch.empty(min(first.n_bytes, 999), dtype=torch.uint8)
        b = torch.empty(min(last.n_bytes, 999), dtype=torch.uint8)
        reader.read([Span(last.name, last.offset, b), Span(first.name, first.offset, a)])
        assert a.numpy().tobytes() == _file_bytes(llama_file, first)[:a.numel()]
        assert b.numpy().tobytes() == _file_bytes(llama_file, last)[:b.numel()]
    finally:
        gguf.close()


def test_staged_reader_truncated_file_names_the_tensor(llama_file, tmp_path) -> None:
    """A file that ends inside a tensor's bytes (opened whole, cut afterwards by another
    process: the reads see the new end) is refused naming the file and that tensor."""
    path = tmp_path / "cut.gguf"
    shutil.copy(llama_file, path)
    gguf = GGUFFile(path)
    try:
        last = max(gguf.tensors.values(), key=lambda t: t.offset)
        cut = last.offset + last.n_bytes // 2
        with open(path, "r+b") as f:
            f.truncate(cut)
        reader = StagedReader(gguf, "cpu", 4096)
        dest = torch.empty(last.n_bytes, dtype=torch.uint8)
        with pytest.raises(GGUFError) as e:
            reader.read([Span(last.name, last.offset, dest)])
        message = str(e.value)
        assert str(path) in message and last.name in message
    finally:
        gguf.close()


def test_staged_reader_short_read_names_the_tensor(llama_file, tmp_path) -> None:
    """A read that comes back short (the file shorter than its index says) names the tensor
    whose bytes are missing, not the first of the run."""
    path = tmp_path / "short.gguf"
    shutil.copy(llama_file, path)
    gguf = GGUFFile(path)
    try:
        infos = sorted(gguf.tensors.values(), key=lambda t: t.offset)
        victim = infos[-1]
        with open(path, "r+b") as f:
            f.truncate(victim.offset + 10)
        gguf.file_size = os.path.getsize(path)  # as if opened so: check_intact passes
        reader = StagedReader(gguf, "cpu", 1 << 20)
        spans = [Span(t.name, t.offset, torch.empty(t.n_bytes, dtype=torch.uint8))
                 for t in infos[-3:]]
        with pytest.raises(GGUFError, match=victim.name.replace(".", r"\.")) as e:
            reader.read(spans)
        assert "ends at byte" in str(e.value) and str(path) in str(e.value)
    finally:
        gguf.close()


def _uniform_tensors(n_layer: int, layer_sizes: list[int], small: list[int],
                     vocab: dict[str, int]) -> dict[str, TensorInfo]:
    from gguf.constants import GGMLQuantizationType as Q

    out, offset = {}, 0

    def add(name: str, n: int) -> None:
        nonlocal offset
        out[name] = TensorInfo(name, (n,), Q.I8, offset, n)
        offset += n

    for name, n in vocab.items():
        add(name, n)
    for i, n in enumerate(small):
        add(f"norm{i}.weight", n)
    for layer in range(n_layer):
        for j, n in enumerate(layer_sizes):
            add(f"blk.{layer}.t{j}.weight", n)
    return out


@pytest.mark.parametrize("budget", [0, 999, 1000 + 3 * 700, 10**6, 1000 + 80 * 700 + 300,
                                    1000 + 80 * 700 + 300 + 900, 10**9])
def test_residency_plan_against_formula(budget: int) -> None:
    """80 layers of 700 bytes (three tensors), small tensors of 400 and 600 bytes, vocabulary
    tables of 900 and 5000 bytes; reserve 200. In room = budget − reserve: each small
    tensor that fits what is left, in order; then the first floor(left / 700) layers; then
    each table that fits what is left, the smaller first."""
    tensors = _uniform_tensors(80, [100, 250, 350], [400, 600],
                               {"token_embd.weight": 5000, "output.weight": 900})
    reserve = 200
    plan = plan_residency(tensors, budget, reserve)
    room = max(budget - reserve, 0)
    left, expected = room, set()
    for name, size in (("norm0.weight", 400), ("norm1.weight", 600)):  # in order, each
        if size <= left:
            expected.add(name)
            left -= size
    n_layers = min(80, left // 700)  # whole layers, a prefix
    left -= 700 * n_layers
    for name, size in (("output.weight", 900), ("token_embd.weight", 5000)):  # smaller first
        if size <= left:
            expected.add(name)
            left -= size
    assert plan.resident_layers == list(range(n_layers))
    expected |= {f"blk.{i}.t{j}.weight" for i in range(n_layers) for j in range(3)}
    assert set(plan.resident) == expected
    assert set(plan.streamed) == set(tensors) - expected
    assert len(plan.streamed) + len(plan.resident) == len(tensors)
    assert plan.resident_bytes == sum(tensors[n].n_bytes for n in expected) <= room
    assert plan.everything == (expected == set(tensors))


def test_working_reserve_formula() -> None:
    assert working_reserve(10**9, 3 * 10**7) == 2 * 3 * 10**7 + int(WORKING_SHARE * 10**9)
    assert working_reserve(10**9, 3 * 10**7, layer_sets=1) == 3 * 10**7 + int(WORKING_SHARE * 10**9)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("share", ["all", "some", "none"])
def test_held_weights_jacobian_equals_mapped(synthetic, arch: str, share: str) -> None:
    """The Jacobian with the weights held in (CPU) memory, all, the first layers only (the
    rest staged at each use), or none (all staged), equals the mapped path's in float64,
    whole layers and row blocks both; the held bytes equal the file's."""
    path = synthetic(arch, "Q4_K_M")
    reference = open_model(path, dtype="float64")
    expect = streamed_jacobian(e := reference.engine(streaming=False), e.embed(TOKENS))
    m = open_model(path, dtype="float64")
    layer_file_bytes = sum(t.n_bytes for n, t in m.gguf.tensors.items() if n.startswith("blk.0."))
    globals_bytes = sum(t.n_bytes for n, t in m.gguf.tensors.items()
                        if not n.startswith("blk.") and n not in ("token_embd.weight",
                                                                  "output.weight"))
    room = {"all": 10**12, "some": globals_bytes + layer_file_bytes + 7, "none": 0}[share]
    plan = m.weights.hold_on_device(room, chunk_bytes=12345, reserve=0)
    assert len(plan.resident_layers) == {"all": m.cfg.n_layer, "some": 1, "none": 0}[share]
    for name in plan.resident:
        assert m.weights.resident[name].numpy().tobytes() == \
            _file_bytes(path, m.gguf.tensor(name))
    assert m.weights.resident_load.bytes_read >= plan.resident_bytes
    for streaming in (False, True):
        engine = m.engine(streaming=streaming, block_elements=3 * m.weights.widest_row() + 5)
        got = streamed_jacobian(engine, engine.embed(TOKENS))
        assert _relative(got.jacobian, expect.jacobian) <= 1e-12
        assert got.reconstruction_rel_error() <= 1e-12
    if share != "all":
        assert m.weights.staged.stats.bytes_read > 0  # the others came by staged reads
    m.close()


def test_held_weights_attribution_and_logits(synthetic) -> None:
    """Attribution (unembedding rows from held bytes) and logits equal the mapped path's."""
    path = synthetic("qwen3", "Q8_0")
    ref = open_model(path, dtype="float64")
    m = open_model(path, dtype="float64", hold_weights=True, max_gpu_memory=10**12)
    m.held_weights()  # on the CPU a budget must be given: it is
    assert m.weights.residency.everything
    a, b = ref.attribute(TOKENS)["targets"][0], m.attribute(TOKENS)["targets"][0]
    assert a["id"] == b["id"]
    assert np.allclose(a["contributions"], b["contributions"], rtol=1e-12, atol=1e-12)
    assert torch.allclose(ref.logits(TOKENS), m.logits(TOKENS), rtol=1e-12, atol=1e-12)


def test_bf16_matmuls_error_measured(synthetic) -> None:
    """--matmul-precision bf16 (autocast) changes the result, within bfloat16's reach: the
    reconstruction error is measured, above float32's and below 5e-2; tf32 on a CPU is
    float32 (no TF32 there)."""
    path = synthetic("llama", "Q4_K_M")
    m = open_model(path, dtype="float32")
    exact = m.jacobian(TOKENS)
    with matmul_precision("bf16", "cpu"):
        low = m.jacobian(TOKENS)
    with matmul_precision("tf32", "cpu"):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == "highest"
    err = low.reconstruction_rel_error()
    assert exact.reconstruction_rel_error() < err < 5e-2
    assert 0 < _relative(low.jacobian, exact.jacobian) < 5e-2


@pytest.mark.parametrize("text,message", [
    ("lots", "expected a size such as 24GB"), ("0GB", "more than 0 bytes"),
    ("-3GB", "expected a size"), ("12XB", "expected a size")])
def test_gpu_memory_parsing_refusals(text: str, message: str) -> None:
    with pytest.raises(GgufjacError, match=message) as e:
        parse_gpu_memory(text)
    assert "--max-gpu-memory" in str(e.value)


def test_gpu_memory_parsing_values() -> None:
    assert parse_gpu_memory("24GB") == 24 * 10**9
    assert parse_gpu_memory("80GiB") == 80 * 2**30
    assert parse_gpu_memory("512MiB") == 512 * 2**20


def test_matmul_precision_refusals() -> None:
    with pytest.raises(GgufjacError, match="choose from float32, tf32, bf16"):
        check_matmul_precision("fp8", torch.float32)
    with pytest.raises(GgufjacError, match="needs --dtype float32, not float64"):
        check_matmul_precision("tf32", torch.float64)
    check_matmul_precision("bf16", torch.float32)


@pytest.mark.parametrize("args,message", [
    (["--max-gpu-memory", "huge"], "--max-gpu-memory 'huge': expected a size"),
    (["--max-gpu-memory", "24GB"], "--max-gpu-memory applies to --device cuda"),
    (["--matmul-precision", "tf32", "--dtype", "float64"], "needs --dtype float32"),
    (["--device", "cuda"], "cuda"),
])
def test_cli_refusals(synthetic, tmp_path, args: list[str], message: str) -> None:
    """One clear error line, no traceback, before any work (cuda where there is none: the
    device check's own error)."""
    from ggufjac.cli import main

    if args[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")  # the refusal needs a machine without one
    path = synthetic("llama", "Q4_K_M")
    r = CliRunner().invoke(main, ["jacobian", str(path), "-p", "x", "--out",
                                  str(tmp_path / "out"), *args])
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_seventy_b_plan_sizes() -> None:
    """Llama 3.3 70B in Q4_K_M, by its sizes (80 layers of about 0.51 GB of quantized bytes,
    3.4 GB each dequantized to float32, vocabulary tables of 0.59 and 0.86 GB): a 60 GB
    budget holds every layer and both tables; a 24 GB budget (a 24 GB card) holds the first
    floor((24e9 − 2 · 3.4e9 − WORKING_SHARE · 24e9) / 0.51e9) layers and streams the rest."""
    layer, f32_layer = 510_000_000, 3_400_000_000
    tensors = _uniform_tensors(80, [layer // 2, layer - layer // 2], [65_536],
                               {"token_embd.weight": 590_000_000, "output.weight": 860_000_000})
    full = plan_residency(tensors, 60 * 10**9, working_reserve(60 * 10**9, f32_layer))
    assert full.everything and len(full.resident_layers) == 80
    budget = 24 * 10**9
    small = plan_residency(tensors, budget, working_reserve(budget, f32_layer))
    expected = (budget - 2 * f32_layer - int(WORKING_SHARE * budget) - 65_536) // layer
    assert small.resident_layers == list(range(expected)) and 10 < expected < 80
    assert not small.everything


def test_gpu_batches_of_directions() -> None:
    """On a GPU the directions per batched backward are GPU_MAX_BATCH_ROWS / tokens (the
    memory plan then caps them); on a CPU at most MAX_CHUNK, and MAX_BATCH_ROWS rows."""
    from ggufjac.engine import GPU_MAX_BATCH_ROWS, MAX_BATCH_ROWS, MAX_CHUNK, max_chunk

    for n in (1, 16, 100, 1 << 17):
        assert max_chunk(n, torch.device("cuda")) == max(1, GPU_MAX_BATCH_ROWS // n)
        assert max_chunk(n) == max_chunk(n, torch.device("cpu")) == \
            max(1, min(MAX_CHUNK, MAX_BATCH_ROWS // n))
    assert max_chunk(16, torch.device("cuda")) == 4096  # a 70B's 8192 directions: 2 batches


def test_cli_matmul_precision_prints_its_error(synthetic, tmp_path) -> None:
    """`jacobian --matmul-precision bf16` says so and prints the reconstruction error
    measured with it: larger than float32's, below bfloat16's reach (5e-2)."""
    import re

    from ggufjac.cli import main

    path = synthetic("llama", "Q4_K_M")
    errors = {}
    for precision in ("float32", "bf16"):
        r = CliRunner().invoke(main, ["jacobian", str(path), "-p", "the bridge out of Marin",
                                      "--out", str(tmp_path / precision),
                                      "--matmul-precision", precision])
        assert r.exit_code == 0, r.output
        errors[precision] = float(re.search(r"reconstruction rel error (\S+)", r.output)[1])
        assert ("float32 matmuls at bf16 precision" in r.output) == (precision == "bf16")
    assert errors["float32"] < errors["bf16"] < 5e-2
