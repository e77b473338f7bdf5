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
