"""Products with quantized weights (ggufjac/_quantized_products.c): against gguf-py's
dequantization multiplied in float64, and, through the streaming engine, against the
dequantize-then-multiply path and float64 runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType as Q

from ggufjac import quantized_products as qp
from ggufjac import weights as weights_module
from ggufjac.api import open_model
from ggufjac.engine import _vjp_rows
from tools.big_model import BigModel, random_q4_k, random_q6_k, write_big_gguf
from tools.synthetic import Shape

needs_kernels = pytest.mark.skipif(not qp.available(), reason="the extension was not compiled")


@pytest.fixture(params=qp.VARIANTS if qp.available() else [])
def variant(request):
    """Each instruction set's copy of the kernels that this CPU can run, then its best again."""
    got = qp.use_variant(request.param)
    try:
        if got != request.param:
            pytest.skip(f"this CPU cannot run the {request.param} kernels")
        yield got
    finally:
        qp.use_variant(qp.VARIANTS[-1])


def _random_rows(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if qtype == Q.Q4_K:
        return np.ascontiguousarray(random_q4_k(rng, rows, cols)).reshape(rows, -1)
    if qtype == Q.Q6_K:
        return np.ascontiguousarray(random_q6_k(rng, rows, cols)).reshape(rows, -1)
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    return gguf_quants.quantize(values, qtype).reshape(rows, -1)


@needs_kernels
@pytest.mark.parametrize("qtype", qp.TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tok", [1, 3, 16, 21])
def test_products_equal_float64_products_of_gguf_py_weights(variant, qtype: Q, n_tok: int
                                                           ) -> None:
    rows, cols = 37, 768  # rows: no multiple of any tile; cols: three kernel steps
    raw = _random_rows(qtype, rows, cols)
    w = torch.from_numpy(gguf_quants.dequantize(raw, qtype).reshape(rows, cols)).double()
    gen = torch.Generator().manual_seed(n_tok)
    x = torch.randn(n_tok, cols, generator=gen)
    g = torch.randn(n_tok, rows, generator=gen)
    raw_t = torch.from_numpy(raw)
    forward = qp.product(x, raw_t, qtype, cols)
    transposed = qp.transposed_product(g, raw_t, qtype, cols)
    for ours, ref in ((forward, x.double() @ w.T), (transposed, g.double() @ w)):
        # float32 sums of a few hundred products: within a few units of float32 rounding
        # of the terms' magnitudes
        scale = (x.abs().double() @ w.abs().T) if ours is forward else (g.abs().double() @ w.abs())
        assert ours.dtype == torch.float32
        assert float(((ours.double() - ref).abs() / scale).max()) < 1e-6


@needs_kernels
@pytest.mark.parametrize("qtype", qp.TYPES, ids=lambda t: t.name)
def test_the_kernels_weights_are_gguf_pys_exactly(variant, qtype: Q) -> None:
    """x = I makes each product a single weight times 1."""
    assert qp.supports(qtype, 512, torch.float32, torch.device("cpu"))  # checked again
    rows, cols = 9, 512
    raw = _random_rows(qtype, rows, cols, seed=3)
    w = torch.from_numpy(gguf_quants.dequantize(raw, qtype).reshape(rows, cols))
    assert torch.equal(qp.product(torch.eye(cols), torch.from_numpy(raw), qtype, cols).T, w)
    assert torch.equal(qp.transposed_product(torch.eye(rows), torch.from_numpy(raw), qtype,
                                             cols), w)


@needs_kernels
def test_shapes_the_kernels_would_read_past_are_refused() -> None:
    raw = torch.from_numpy(_random_rows(Q.Q4_K, 4, 512))
    with pytest.raises(ValueError, match="no quantized product"):
        qp.product(torch.zeros(2, 768), raw, Q.Q4_K, 768)  # more columns than the bytes hold
    with pytest.raises(ValueError, match="no quantized product"):
        qp.product(torch.zeros(2, 512, dtype=torch.float64), raw, Q.Q4_K, 512)
    with pytest.raises(ValueError, match="no quantized product"):
        qp.transposed_product(torch.zeros(2, 5), raw, Q.Q4_K, 512)  # 5 rows for 4


def _call_forward(qtype: int, w, cols: int, n_rows: int, r0: int, r1: int, x, n_tok: int,
                  ldx: int, out, ldo: int) -> int:
    return qp._kernels().forward_fn(qtype, w, cols, n_rows, r0, r1, x, n_tok, ldx, out, ldo)


def _call_transposed(qtype: int, w, cols: int, n_rows: int, c0: int, c1: int, g, n_tok: int,
                     ldg: int, out, ldo: int) -> int:
    return qp._kernels().transposed_fn(qtype, w, cols, n_rows, c0, c1, g, n_tok, ldg, out,
                                       ldo, 0)


# The C entry points' error codes (_quantized_products.c), and a word each message must have
_BAD_TYPE, _BAD_COLS, _BAD_RANGE, _BAD_STRIDE, _NULL, _BAD_SIZE = -2, -3, -4, -5, -6, -7
_WORDS = {_BAD_TYPE: "type", _BAD_COLS: "columns", _BAD_RANGE: "range",
          _BAD_STRIDE: "stride", _NULL: "null", _BAD_SIZE: "overflow"}


@needs_kernels
def test_the_c_entry_points_refuse_what_they_would_read_or_write_past(variant) -> None:
    """Called directly (past the Python checks), each kernel checks its arguments and
    returns an error code without writing anything; valid calls return 0 and write."""
    rows, cols, n_tok = 5, 512, 3
    raw = torch.from_numpy(_random_rows(Q.Q4_K, rows, cols))
    x, g = torch.randn(n_tok, cols), torch.randn(n_tok, rows)
    w, q4k = raw.data_ptr(), int(Q.Q4_K)
    out_f = torch.full((n_tok, rows), 7.0)
    out_t = torch.full((n_tok, cols), 7.0)
    xp, gp, of, ot = x.data_ptr(), g.data_ptr(), out_f.data_ptr(), out_t.data_ptr()
    forward_cases = [
        (_BAD_TYPE, (99, w, cols, rows, 0, rows, xp, n_tok, cols, of, rows)),
        (_BAD_TYPE, (int(Q.Q4_0), w, cols, rows, 0, rows, xp, n_tok, cols, of, rows)),
        (_BAD_COLS, (q4k, w, 300, rows, 0, rows, xp, n_tok, cols, of, rows)),
        (_BAD_COLS, (q4k, w, 0, rows, 0, rows, xp, n_tok, cols, of, rows)),
        (_BAD_COLS, (q4k, w, -256, rows, 0, rows, xp, n_tok, cols, of, rows)),
        (_BAD_RANGE, (q4k, w, cols, rows, 0, rows + 1, xp, n_tok, cols, of, rows + 1)),
        (_BAD_RANGE, (q4k, w, cols, rows, -1, rows, xp, n_tok, cols, of, rows)),
        (_BAD_RANGE, (q4k, w, cols, rows, 3, 2, xp, n_tok, cols, of, rows)),
        (_BAD_STRIDE, (q4k, w, cols, rows, 0, rows, xp, n_tok, cols - 1, of, rows)),
        (_BAD_STRIDE, (q4k, w, cols, rows, 0, rows, xp, n_tok, cols, of, rows - 1)),
        (_NULL, (q4k, None, cols, rows, 0, rows, xp, n_tok, cols, of, rows)),
        (_NULL, (q4k, w, cols, rows, 0, rows, None, n_tok, cols, of, rows)),
        (_NULL, (q4k, w, cols, rows, 0, rows, xp, n_tok, cols, None, rows)),
        (_BAD_SIZE, (q4k, w, cols, rows, 0, rows, xp, -1, cols, of, rows)),
        (_BAD_SIZE, (q4k, w, cols, -1, 0, 0, xp, n_tok, cols, of, rows)),
        (_BAD_SIZE, (q4k, w, 1 << 62, rows, 0, rows, xp, n_tok, 1 << 62, of, rows)),
        (_BAD_SIZE, (q4k, w, cols, rows, 0, rows, xp, n_tok, 1 << 62, of, rows)),
    ]
    transposed_cases = [
        (_BAD_TYPE, (99, w, cols, rows, 0, cols, gp, n_tok, rows, ot, cols)),
        (_BAD_COLS, (q4k, w, 300, rows, 0, 256, gp, n_tok, rows, ot, cols)),
        (_BAD_RANGE, (q4k, w, cols, rows, 0, cols + 256, gp, n_tok, rows, ot, cols + 256)),
        (_BAD_RANGE, (q4k, w, cols, rows, 0, 300, gp, n_tok, rows, ot, cols)),
        (_BAD_RANGE, (q4k, w, cols, rows, 100, 256, gp, n_tok, rows, ot, cols)),
        (_BAD_RANGE, (q4k, w, cols, rows, 512, 256, gp, n_tok, rows, ot, cols)),
        (_BAD_STRIDE, (q4k, w, cols, rows, 0, cols, gp, n_tok, rows - 1, ot, cols)),
        (_BAD_STRIDE, (q4k, w, cols, rows, 0, cols, gp, n_tok, rows, ot, cols - 256)),
        (_NULL, (q4k, w, cols, rows, 0, cols, gp, n_tok, rows, None, cols)),
        (_NULL, (q4k, w, cols, rows, 0, cols, None, n_tok, rows, ot, cols)),
        (_BAD_SIZE, (q4k, w, cols, rows, 0, cols, gp, -2, rows, ot, cols)),
    ]
    for call, cases, out in ((_call_forward, forward_cases, out_f),
                             (_call_transposed, transposed_cases, out_t)):
        for code, args in cases:
            assert call(*args) == code, (call.__name__, args)
            assert bool((out == 7.0).all()), (call.__name__, args)  # nothing written
            message = qp._kernels().error_fn(code).decode()
            assert _WORDS[code] in message, message
    dense = torch.from_numpy(gguf_quants.dequantize(raw.numpy(), Q.Q4_K).reshape(rows, cols))
    assert _call_forward(q4k, w, cols, rows, 1, 4, xp, n_tok, cols, of, rows) == 0
    assert torch.allclose(out_f[:, 1:4], x @ dense[1:4].T, rtol=1e-5, atol=1e-5)
    assert bool((out_f[:, [0, 4]] == 7.0).all())  # rows outside the range left alone
    assert _call_transposed(q4k, w, cols, rows, 256, 512, gp, n_tok, rows, ot, cols) == 0
    assert torch.allclose(out_t[:, 256:], g @ dense[:, 256:], rtol=1e-5, atol=1e-5)
    assert bool((out_t[:, :256] == 7.0).all())


@needs_kernels
def test_a_call_the_c_code_refuses_is_one_value_error(monkeypatch) -> None:
    """Past the Python checks (turned off here), the kernels' own refusal comes back as one
    ValueError naming the problem, not as values read from past the bytes."""
    monkeypatch.setattr(qp, "_check", lambda *args: None)
    raw = torch.from_numpy(_random_rows(Q.Q4_K, 4, 512))
    with pytest.raises(ValueError, match="forward .*Q4_K.*columns not a positive multiple"):
        qp.product(torch.zeros(2, 640), raw, Q.Q4_K, 640)
    with pytest.raises(ValueError, match="transposed .*Q4_K.*columns not a positive multiple"):
        qp.transposed_product(torch.zeros(2, 4), raw, Q.Q4_K, 640)
    with pytest.raises(ValueError, match="unknown quantized type"):
        qp.product(torch.zeros(2, 512), raw, Q.Q4_0, 512)


@needs_kernels
@pytest.mark.parametrize("kernel", ["product", "transposed_product"])
def test_agrees_checks_both_kernels(monkeypatch, kernel: str) -> None:
    """A kernel whose weights are off by one unit in the last place fails the first-use
    check, whichever of the two it is."""
    right = getattr(qp, kernel)

    def off_by_one_ulp(*args):
        out = right(*args)
        return torch.nextafter(out, torch.full_like(out, float("inf")))

    assert qp.agrees(Q.Q4_K)
    monkeypatch.setattr(qp, kernel, off_by_one_ulp)
    assert not qp.agrees(Q.Q4_K)


@needs_kernels
def test_unsupported_cases_are_left_to_torch() -> None:
    cpu = torch.device("cpu")
    assert qp.supports(Q.Q4_K, 512, torch.float32, cpu)
    assert not qp.supports(Q.Q4_K, 512, torch.float64, cpu)  # float64 runs stay float64
    assert not qp.supports(Q.Q8_0, 640, torch.float32, cpu)  # not whole kernel steps
    assert not qp.supports(Q.Q5_K, 512, torch.float32, cpu)
    assert not qp.supports(Q.Q4_K, 512, torch.float32, torch.device("meta"))


class _RawRows:
    """A RowBlockMatrix over raw rows in memory, in blocks of `block` rows."""

    def __init__(self, raw: np.ndarray, qtype: Q, cols: int, block: int) -> None:
        self.raw, self.quantized_type, self.block = torch.from_numpy(raw), qtype, block
        self.shape, self.dtype, self.device = (raw.shape[0], cols), torch.float32, \
            torch.device("cpu")

    def raw_blocks(self):
        for s in range(0, self.shape[0], self.block):
            yield s, self.raw[s:s + self.block]


@needs_kernels
def test_batched_backward_through_the_kernels_equals_autograd_on_dense_weights() -> None:
    """The engine's batched backward (legacy vmap) hands the operator one batch entry at a
    time: each direction's cotangent must come back as a dense product's gradient would."""
    from ggufjac.blocked import linear

    rows, cols, n_tok = 45, 512, 5
    raw = _random_rows(Q.Q4_K, rows, cols, seed=5)
    w = torch.from_numpy(gguf_quants.dequantize(raw, Q.Q4_K).reshape(rows, cols)).double()
    x = torch.randn(n_tok, cols, generator=torch.Generator().manual_seed(0))
    directions = torch.randn(3, n_tok, rows, generator=torch.Generator().manual_seed(1))
    xg = x.clone().requires_grad_(True)
    out = linear(xg, _RawRows(raw, Q.Q4_K, cols, block=16))
    assert float((out.detach().double() - x.double() @ w.T).abs().max()) < 1e-4
    got = _vjp_rows(out, xg, directions)
    want = directions.double() @ w
    assert got.shape == want.shape
    assert float(((got.double() - want).abs().max() / want.abs().max())) < 1e-6


TINY = Shape(n_layer=4, d_model=512, d_ff=1024, n_head=4, n_kv_head=2, head_dim=128,
             context_length=512)


@needs_kernels
def test_streamed_attribution_with_the_kernels_equals_float64_and_torch_products(
        tmp_path, monkeypatch) -> None:
    """A Q4_K_M model whose rows are whole kernel steps: the float32 run takes the kernels
    (counted), and its contributions equal a float64 run's and the dequantize-then-multiply
    float32 run's to float32 precision; they still sum to the logit."""
    path = write_big_gguf(tmp_path / "llama.gguf",
                          BigModel("llama", TINY, 512, tied=False, rope_freqs=True))
    calls = {"forward": 0, "transposed": 0}
    product, transposed = qp.product, qp.transposed_product

    def counted_product(*args):
        calls["forward"] += 1
        return product(*args)

    def counted_transposed(*args):
        calls["transposed"] += 1
        return transposed(*args)

    monkeypatch.setattr(qp, "product", counted_product)
    monkeypatch.setattr(qp, "transposed_product", counted_transposed)
    tokens = [1, 40, 41, 42, 43, 44, 45, 46, 47]
    target = [7]

    def contributions(dtype: str) -> tuple[torch.Tensor, float]:
        m = open_model(path, dtype=dtype)
        report = m.attribute(tokens, target)
        t = report["targets"][0]
        assert all(s["streamed"] for s in report["sweeps"])
        return torch.tensor(t["contributions"], dtype=torch.float64), t["logit"]

    fused, logit = contributions("float32")
    assert calls["forward"] > 0 and calls["transposed"] > 0
    exact, _ = contributions("float64")
    monkeypatch.setattr(weights_module, "supports", lambda *args: False)
    before = dict(calls)
    plain, _ = contributions("float32")
    assert calls == before  # this run took the torch products
    scale = float(exact.abs().sum())
    assert float((fused - exact).abs().max()) / scale < 1e-5
    assert float((fused - plain).abs().max()) / scale < 1e-5
    assert abs(float(fused.sum()) - logit) / scale < 1e-5


def test_the_extension_is_built_where_a_compiler_is() -> None:
    """`pip install` builds the kernels wherever there is a C compiler (the build is optional
    only for machines without one): a silent build failure would leave every streamed float32
    run on the slower path."""
    import os
    import shutil

    if os.environ.get("GGUFJAC_FUSED_PRODUCTS") == "0":
        pytest.skip("turned off by GGUFJAC_FUSED_PRODUCTS=0")
    assert shutil.which("cc") or shutil.which("gcc"), "no C compiler on this machine"
    assert qp.available()
