"""Both dequantization paths (torch's, and llama.cpp's own through native_quants) vs gguf-py's
reference (`gguf.quants.dequantize`), element for element."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from ggufjac import native_quants, quants
from ggufjac.quants import DEQUANTIZERS, dequantize, raw_to_torch

# Byte offsets of the float16 scale fields in each block layout (see ggml-common.h).
F16_FIELDS = {
    Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
    Q.IQ4_NL: [0], Q.IQ4_XS: [0],
    Q.MXFP4: [],  # its E8M0 scale byte is a power of two for every byte value
}


def _random_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes in the block layout of `qtype`, with finite float16 scales."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    if qtype in (Q.F32, Q.F16, Q.BF16):
        vals = rng.standard_normal(n_blocks * block).astype(np.float32)
        if qtype == Q.F32:
            return vals.view(np.uint8)
        if qtype == Q.F16:
            return vals.astype(np.float16).view(np.uint8)
        return gguf_quants.quantize(vals, Q.BF16).view(np.uint8).reshape(-1)
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off:off + 2] = rng.uniform(-2, 2, n_blocks).astype(np.float16).view(np.uint8) \
            .reshape(n_blocks, 2)
    return raw.reshape(-1)


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch) -> str:
    """`dequantize` by llama.cpp's dequantizer (which must load: llama-cpp-python is a
    dependency) or by the torch functions alone."""
    if request.param == "torch":
        monkeypatch.setattr(quants, "native", lambda: None)
    else:
        assert native_quants.native() is not None, "libggml-base from llama_cpp did not load"
    return request.param


def _assert_bitwise_equal(ours: torch.Tensor, ref: np.ndarray) -> None:
    ours_np = ours.numpy().astype(np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    assert ours_np.shape == ref.shape
    mismatch = np.flatnonzero(ours_np.view(np.uint32) != ref.view(np.uint32))
    assert mismatch.size == 0, f"{mismatch.size} elements differ, first at {mismatch[:5]}: " \
        f"{ours_np.reshape(-1)[mismatch[:5]]} vs {ref.reshape(-1)[mismatch[:5]]}"


@pytest.mark.parametrize("qtype", sorted(DEQUANTIZERS, key=lambda q: q.value), ids=lambda q: q.name)
def test_random_blocks_match_gguf_py(qtype: Q, path: str, monkeypatch) -> None:
    rng = np.random.default_rng(1234 + qtype.value)
    block, _ = GGML_QUANT_SIZES[qtype]
    n_blocks = 300
    raw = _random_blocks(qtype, n_blocks, rng)
    ref = gguf_quants.dequantize(raw, qtype).reshape(-1)
    if path == "native" and qtype in native_quants.NATIVE_TYPES:
        assert native_quants.native().supports(qtype, quants.dequantize_torch)
    ours = dequantize(raw_to_torch(raw), qtype, (n_blocks * block,))
    _assert_bitwise_equal(ours, ref)
    # into a reused buffer (holding stale values): the same bits, in that buffer
    buffer = torch.full((n_blocks * block,), float("nan"))
    into = dequantize(raw_to_torch(raw), qtype, (n_blocks * block,), out=buffer)
    assert into.data_ptr() == buffer.data_ptr()
    _assert_bitwise_equal(into, ref)
    # in pieces of 7 blocks (the last one shorter), as large tensors are dequantized
    monkeypatch.setattr(quants, "CHUNK_ELEMENTS", 7 * block)
    buffer.fill_(float("nan"))
    _assert_bitwise_equal(dequantize(raw_to_torch(raw), qtype, (n_blocks * block,), out=buffer),
                          ref)


@pytest.mark.parametrize("qtype", sorted(DEQUANTIZERS, key=lambda q: q.value), ids=lambda q: q.name)
def test_single_block_is_read_not_written(qtype: Q, path: str) -> None:
    """One block (its fields are then contiguous views of the input, not copies) from
    read-only memory, as a memory-mapped file gives it: right values, input untouched."""
    raw = _random_blocks(qtype, 1, np.random.default_rng(7 + qtype.value))
    frozen = np.frombuffer(raw.tobytes(), dtype=np.uint8)  # read-only
    assert not frozen.flags.writeable
    ours = dequantize(raw_to_torch(frozen), qtype, (GGML_QUANT_SIZES[qtype][0],))
    _assert_bitwise_equal(ours, gguf_quants.dequantize(raw, qtype).reshape(-1))
    assert frozen.tobytes() == raw.tobytes()


def test_real_tensors_match_gguf_py(gemma32, path: str) -> None:
    """Every tensor type of the real file, on real tensors (the embedding: its first rows)."""
    g = gemma32.gguf
    seen: dict[Q, int] = {}
    for name, info in g.tensors.items():
        if name == "token_embd.weight":
            continue
        if seen.get(info.type, 0) >= 2:
            continue
        seen[info.type] = seen.get(info.type, 0) + 1
        raw = g.tensor_data(name)
        ref = gguf_quants.dequantize(raw, info.type).reshape(info.torch_shape)
        _assert_bitwise_equal(dequantize(raw_to_torch(raw), info.type, info.torch_shape), ref)
    assert {Q.F32, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K} <= set(seen)
    emb = g.tensor("token_embd.weight")
    rows = 2048
    block, type_size = GGML_QUANT_SIZES[emb.type]
    raw = g.tensor_data(emb.name)[: rows * emb.shape[0] // block * type_size]
    ref = gguf_quants.dequantize(raw, emb.type).reshape(rows, emb.shape[0])
    _assert_bitwise_equal(dequantize(raw_to_torch(raw), emb.type, (rows, emb.shape[0])), ref)


@pytest.mark.parametrize("qtype", native_quants.NATIVE_TYPES, ids=lambda q: q.name)
def test_native_threads_split_blocks_exactly(qtype: Q) -> None:
    """llama.cpp's dequantizer on 3 threads over a block count that 3 does not divide (and
    above the size where threads start): the same bits as one call, every value written."""
    engine = native_quants.native()
    block, _ = GGML_QUANT_SIZES[qtype]
    n_blocks = native_quants.PARALLEL_MIN_VALUES // block + 301
    raw = raw_to_torch(_random_blocks(qtype, n_blocks, np.random.default_rng(qtype.value)))
    one = torch.full((n_blocks * block,), float("nan"))
    three = torch.full((n_blocks * block,), float("nan"))
    engine.dequantize(raw, qtype, one, 1)
    engine.dequantize(raw, qtype, three, 3)
    assert not one.isnan().any()
    assert torch.equal(one.view(torch.int32), three.view(torch.int32))


def test_native_refuses_what_does_not_match() -> None:
    """Sizes that do not match the bytes never reach C: the torch path takes them and
    raises its own error, rather than writing out of bounds."""
    raw = raw_to_torch(_random_blocks(Q.Q4_K, 2, np.random.default_rng(3)))
    with pytest.raises(RuntimeError):
        dequantize(raw, Q.Q4_K, (3 * 256,))
    with pytest.raises(RuntimeError):
        dequantize(raw, Q.Q4_K, (2 * 256,), out=torch.empty(3 * 256))


def test_native_never_asks_an_older_library_for_a_younger_type() -> None:
    """A llama.cpp built before MXFP4 names it "NONE"; asking its type traits for it would
    abort the process, so the type is left to torch without that call."""
    import ctypes

    real = ctypes.CDLL(str(native_quants._library_path()))
    real.ggml_get_type_traits.restype = ctypes.POINTER(native_quants._TypeTraits)
    real.ggml_get_type_traits.argtypes = [ctypes.c_int]
    asked: list[int] = []

    class Function:
        """A C function as ctypes hands it out: callable, restype/argtypes settable."""

        def __init__(self, fn) -> None:
            self.fn = fn

        def __call__(self, *args):
            return self.fn(*args)

    class OlderLibrary:
        ggml_get_type_traits = Function(lambda q: (asked.append(q),
                                                   real.ggml_get_type_traits(q))[1])
        ggml_type_name = Function(lambda q: b"NONE" if q >= int(Q.MXFP4) else b"known")

    engine = native_quants.NativeDequantizer(OlderLibrary())  # type: ignore[arg-type]
    assert int(Q.MXFP4) not in asked and int(Q.Q4_K) in asked
    assert not engine.supports(Q.MXFP4, quants.dequantize_torch)
    assert engine.supports(Q.Q4_K, quants.dequantize_torch)


def test_embedding_rows_match_full_table_rows(gemma32) -> None:
    """Gathering rows straight from the quantized bytes equals slicing the dequantized table."""
    ids = [2, 506, 262143, 1000]
    rows = gemma32.weights.embedding_rows(ids)
    g = gemma32.gguf
    emb = g.tensor("token_embd.weight")
    block, type_size = GGML_QUANT_SIZES[emb.type]
    row_bytes = emb.shape[0] // block * type_size
    for k, t in enumerate(ids):
        raw = g.tensor_data(emb.name)[t * row_bytes:(t + 1) * row_bytes]
        ref = gguf_quants.dequantize(raw, emb.type).reshape(-1)
        _assert_bitwise_equal(rows[k], ref)


def test_unsupported_type_falls_back_to_gguf_py(capsys) -> None:
    qtype = Q.TQ2_0
    block, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=(4, type_size), dtype=np.uint8)
    raw[:, -2:] = np.float16(0.5).reshape(1).view(np.uint8)  # finite scale (last field)
    raw = raw.reshape(-1)
    out = dequantize(raw_to_torch(raw), qtype, (4 * block,))
    # ggml's dequantize_row_tq2_0, written out: 64 bytes of 2-bit codes q (value q - 1), in
    # two 32-byte halves whose four bit pairs fill 32 values each, then the F16 scale d
    expected = np.empty(4 * block, dtype=np.float32)
    for b, blk in enumerate(raw.reshape(4, type_size)):
        d = np.float32(blk[64:66].view(np.float16)[0])
        for j in range(2):
            for shift in range(4):
                for m in range(32):
                    q = (int(blk[j * 32 + m]) >> (2 * shift)) & 3
                    expected[b * block + j * 128 + shift * 32 + m] = np.float32(q - 1) * d
    _assert_bitwise_equal(out, expected)
    assert "TQ2_0" in capsys.readouterr().err
