"""Row-block streaming: a layer's matrices read a few rows at a time give the results of
whole-layer dequantization, and a layer larger than the memory budget runs within it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ggufjac.api import open_model
from ggufjac.families import FAMILIES
from ggufjac.linearize import Linearization
from ggufjac.jacobian import streamed_jacobian
PROMPT = "the bridge out of Marin"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _odd_block(m, rows: int = 3) -> int:
    """`rows` (odd) rows of the widest matrix per block, plus a remainder: the blocks divide
    no row count of these models (their row counts are multiples of 16)."""
    return rows * m.weights.widest_row() + 5


def _jacobian_and_attribution(m, streaming: bool, gate_path: str = "up", anchor=None,
                              block_elements: int | None = None, tokens=None,
                              n_directions: int | None = None):
    """The Jacobian (all d output directions, or `n_directions` random ones, 4 per batched
    backward: several passes per layer) and two logits' rows of it (one pass per layer)."""
    lin = Linearization(gate_path=gate_path)
    engine = m.engine(lin, anchor=anchor, streaming=streaming, block_elements=block_elements)
    x = engine.embed(tokens or m.tokenize(PROMPT))
    if n_directions is None:
        full = streamed_jacobian(engine, x).jacobian
        record = engine.forward(x)
    else:
        dirs = torch.randn(n_directions, m.cfg.d_model, dtype=x.dtype,
                           generator=torch.Generator().manual_seed(1))
        record = engine.forward(x)
        full = engine.pull_back_output(record, dirs, chunk=4)
        record = engine.forward(x)
    u = m.weights.unembedding_rows([3, 11])
    one = engine.pull_back_output(record, u)  # two directions: a single pass per layer
    assert [s.streamed for s in engine.sweeps] == [streaming] * 4
    return full, one, record


@pytest.mark.parametrize("arch,gate_path", [(a, "up") for a in sorted(FAMILIES)]
                         + [("phi3", "gate"), ("gemma3", "gate")])
def test_row_blocks_equal_whole_layers_every_family(synthetic, arch: str, gate_path: str) -> None:
    m = open_model(synthetic(arch, "Q4_K_M"), dtype="float64")
    whole, whole_one, whole_rec = _jacobian_and_attribution(m, False, gate_path)
    blocks, blocks_one, blocks_rec = _jacobian_and_attribution(
        m, True, gate_path, block_elements=_odd_block(m))
    assert _rel(blocks, whole) <= 1e-12
    assert _rel(blocks_one, whole_one) <= 1e-12
    assert _rel(blocks_rec.output, whole_rec.output) <= 1e-12
    # and both are the in-memory autograd reference's Jacobian
    reference = m.jacobian(m.tokenize(PROMPT), Linearization(gate_path=gate_path),
                           streaming=False)
    assert _rel(blocks, reference.jacobian) <= 1e-12


def test_row_blocks_equal_whole_layers_real_model_plain_and_anchored(gemma64, bridge_tokens) -> None:
    kw = {"tokens": bridge_tokens, "n_directions": 8}
    whole, whole_one, _ = _jacobian_and_attribution(gemma64, False, **kw)
    blocks, blocks_one, _ = _jacobian_and_attribution(gemma64, True,
                                                      block_elements=_odd_block(gemma64, 37), **kw)
    assert _rel(blocks, whole) <= 1e-12
    assert _rel(blocks_one, whole_one) <= 1e-12
    anchor = gemma64.anchor(bridge_tokens, reference=False)
    whole, whole_one, whole_rec = _jacobian_and_attribution(gemma64, False, anchor=anchor, **kw)
    blocks, blocks_one, blocks_rec = _jacobian_and_attribution(
        gemma64, True, anchor=anchor, block_elements=_odd_block(gemma64, 37), **kw)
    assert _rel(blocks, whole) <= 1e-12
    assert _rel(blocks_one, whole_one) <= 1e-12
    # the anchored model still reproduces llama.cpp's logits when streamed
    logits = gemma64.logit_input(blocks_rec.output[-1], anchor) @ \
        gemma64.weights.unembedding_rows(list(range(64))).T
    theirs = torch.as_tensor(anchor.logits[-1][:64], dtype=torch.float64)
    assert _rel(logits, theirs) <= 1e-6


def test_streamed_mlp_matrices_equal_whole(synthetic, monkeypatch) -> None:
    """The MLP as per-position matrices (the full Jacobian's order) built from streamed
    row and column blocks equals the whole-tensor one."""
    m = open_model(synthetic("llama", "Q4_K_M"), dtype="float64")
    engine_whole = m.engine(streaming=False)
    engine_blocks = m.engine(streaming=True, block_elements=_odd_block(m))
    monkeypatch.setattr(type(engine_whole), "mlp_as_matrix", lambda self, n: True)
    x = engine_whole.embed(m.tokenize(PROMPT))
    a = streamed_jacobian(engine_whole, x).jacobian
    b = streamed_jacobian(engine_blocks, x).jacobian
    assert _rel(b, a) <= 1e-12


def _peak_run(args: list[str]) -> tuple[int, dict, str]:
    from tools.peak_rss import measure_module

    try:
        out = measure_module("ggufjac.cli", *args)
    except RuntimeError as e:
        pytest.fail(str(e))
    return out["peak"], out, ""


def test_a_layer_larger_than_the_budget_completes_within_it(tmp_path) -> None:
    """A model whose one layer, dequantized, is larger than what --max-memory leaves above
    the process itself: attribute streams it in row blocks and the process's peak resident
    set (VmHWM) stays within the budget; the contributions still sum to the logit.

    The process itself is measured, not assumed (it differs between machines and torch
    builds): the peak of the same command on a model of the same family whose layers are
    tiny. The budget leaves half a layer above that."""
    from tools.big_model import BigModel, write_big_gguf
    from tools.synthetic import Shape

    def peak_of_attribute(path, *extra: str) -> tuple[int, dict]:
        out, peak = tmp_path / f"{path.stem}.json", tmp_path / f"{path.stem}-peak.txt"
        r = subprocess.run([sys.executable, "-m", "tools.peak_rss", str(peak), "ggufjac.cli",
                            "attribute", str(path), "-p", "the bridge", "--dtype", "float64",
                            "--json", str(out), *extra], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return int(peak.read_text().split()[0]), json.loads(out.read_text())

    small = Shape(n_layer=2, d_model=256, d_ff=512, n_head=2, n_kv_head=1, head_dim=128,
                  context_length=512)
    wide = Shape(n_layer=2, d_model=2048, d_ff=12288, n_head=16, n_kv_head=4, head_dim=128,
                 context_length=512)
    small_path = write_big_gguf(tmp_path / "small.gguf", BigModel("llama", small, 512,
                                                                  tied=False, rope_freqs=False))
    path = write_big_gguf(tmp_path / "wide.gguf", BigModel("llama", wide, 512, tied=False,
                                                            rope_freqs=False))
    layer = open_model(path, dtype="float64").weights.layer_bytes()
    assert layer >= 2048 * (2 * 2048 + 2 * 512 + 3 * 12288) * 8  # float64: 688 MB
    process, _ = peak_of_attribute(small_path)  # the process, with layers of a few MB
    budget = process + layer // 2  # no room for a whole layer above the process
    peak, report = peak_of_attribute(path, "--max-memory", str(budget))
    print(f"process {process / 2**20:.0f} MiB, layer {layer / 2**20:.0f} MiB, budget "
          f"{budget / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB")
    assert peak <= budget, (f"peak {peak / 2**20:.0f} MiB over the {budget / 2**20:.0f} MiB "
                            f"budget (the process alone {process / 2**20:.0f} MiB)")
    row = report["targets"][0]
    assert abs(row["sum_of_contributions"] - row["logit"]) <= 1e-9 * max(1.0, abs(row["logit"]))


def test_a_streamed_forward_spills_its_record_to_a_file(synthetic) -> None:
    """The MLP coefficients of every layer are the part of a record that grows with the
    model: a streamed forward keeps them in a temporary file, one layer's in memory at a
    time, and gives back exactly what a whole-layer forward holds in memory."""
    from ggufjac.engine import SpilledTensors

    m = open_model(synthetic("llama", "Q8_0"), dtype="float64")
    x = m.engine().embed(m.tokenize(PROMPT))
    spilled = m.engine(streaming=True).forward(x)
    held = m.engine(streaming=False).forward(x)
    assert isinstance(spilled.coefficients, SpilledTensors)
    assert len(spilled.coefficients) == len(held.coefficients) == m.cfg.n_layer
    for a, b in zip(spilled.coefficients, held.coefficients):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    def size(c) -> int:  # noqa: ANN001
        return sum(t.numel() * t.element_size() for t in c.values())
    in_memory = held.nbytes() - sum(size(c) for c in held.coefficients)
    assert spilled.nbytes() == in_memory + max(size(c) for c in held.coefficients)
    assert spilled.nbytes() < held.nbytes()


def test_sweep_timing_counts_the_bytes_each_sweep_reads(synthetic) -> None:
    """A streamed forward reads every layer matrix's bytes once, the reverse sweep the linear
    path's (sizes from gguf-py's reader); the time split adds up to the sweep's time."""
    import gguf

    path = synthetic("qwen3", "Q4_K_M")
    m = open_model(path, dtype="float32")
    engine = m.engine(streaming=True)
    x = engine.embed(m.tokenize(PROMPT))
    engine.pull_back_output(engine.forward(x), m.weights.unembedding_rows([5]))
    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors
             if t.name.startswith("blk.") and len(t.shape) == 2}
    linear = {"attn_v", "attn_output", "ffn_up", "ffn_down"}
    forward, reverse = engine.sweeps
    assert forward.bytes_read == sum(sizes.values())
    assert reverse.bytes_read == sum(n for k, n in sizes.items() if k.split(".")[2] in linear)
    for s in engine.sweeps:
        assert 0 < s.read_s + s.dequantize_s <= s.wall_s
        assert abs(s.read_s + s.dequantize_s + s.compute_s - s.wall_s) < 1e-9


@pytest.mark.parametrize("n,start,window,block,group", [
    (300, 0, None, 64, 1), (300, 0, 100, 64, 1), (37, 5, 16, 8, 1), (10, 0, 3, 128, 1),
    (50, 0, 1, 7, 1), (40, 30, 8, 16, 1), (37, 5, 16, 8, 3), (300, 0, 100, 64, 2),
    (8, 0, None, 64, 4)])
def test_banded_attention_product_is_the_dense_masked_product(n, start, window, block,
                                                              group) -> None:
    """banded_mix skips the masked attention weights: its product, v's cotangent (plain and
    batched, as the engine's sweeps take it) and, for a p with a gradient, p's cotangent
    are those of the dense einsum over softmax weights masked by the formula here; with
    `group` query heads to a key-value head, head h reads v's head h // group."""
    from ggufjac.blocked import Band, banded_mix
    from ggufjac.engine import _vjp_rows

    gen = torch.Generator().manual_seed(n + start)
    i = torch.arange(start, start + n)[:, None]
    j = torch.arange(start + n)[None, :]
    mask = (j <= i) & ((i - j < window) if window else True)
    n_kv = 2 if group > 1 else 3
    scores = torch.randn(n_kv * group, n, start + n, dtype=torch.float64, generator=gen)
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    v = torch.randn(2, start + n, n_kv, 5, dtype=torch.float64, generator=gen,
                    requires_grad=True)
    band = Band(n, start, window, block)
    assert torch.equal(band.mask(torch.device("cpu")), mask)
    kv_of_head = torch.arange(n_kv * group) // group

    dense = torch.einsum("hqk,...khd->...qhd", p, v[..., kv_of_head, :])
    ours = banded_mix(p, v, band, group=group)
    assert _rel(ours, dense) <= 1e-14
    g = torch.randn(dense.shape, dtype=torch.float64, generator=gen)
    (g_dense,) = torch.autograd.grad(dense, v, g)
    (g_ours,) = torch.autograd.grad(ours, v, g)
    assert _rel(g_ours, g_dense) <= 1e-14

    # a p with a gradient (the plain model): the same values bit for bit, and p's cotangent
    p_grad = p.clone().requires_grad_(True)
    plain = banded_mix(p_grad, v, band, group=group)
    assert torch.equal(plain, ours)
    (gp_ours,) = torch.autograd.grad(plain, p_grad, g)
    (gp_dense,) = torch.autograd.grad(
        torch.einsum("hqk,...khd->...qhd", p_grad, v[..., kv_of_head, :]), p_grad, g)
    assert _rel(gp_ours * mask, gp_dense * mask) <= 1e-14

    # the replay: no forward product, and batched backwards of one graph
    v1 = v[0].detach().requires_grad_(True)
    with torch.enable_grad():
        replay = banded_mix(p, v1, band, values=False, group=group)
    assert not torch.any(replay)
    rows = torch.randn(4, *replay.shape, dtype=torch.float64, generator=gen)
    per_head = torch.einsum("hqk,bqhd->bkhd", p, rows)  # summed over each group below
    expected = per_head.reshape(4, start + n, n_kv, group, 5).sum(dim=3)
    assert _rel(_vjp_rows(replay, v1, rows), expected) <= 1e-14


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_attention_in_small_blocks_equals_one_block_every_family(synthetic, monkeypatch,
                                                                 arch: str) -> None:
    """The model's attention products a few queries or keys at a time (blocks of 3, across
    the synthetic files' sliding window of 4) give the forward record, the reverse sweep
    (rows of J) and the forward sweep (J·v) of one block over all keys (the dense product)."""
    import ggufjac.model

    m = open_model(synthetic(arch, "Q4_K_M"), dtype="float64")
    tokens = m.tokenize(PROMPT)
    assert len(tokens) > 6
    gen = torch.Generator().manual_seed(2)
    dirs = torch.randn(3, m.cfg.d_model, dtype=torch.float64, generator=gen)
    probes = torch.randn(2, len(tokens), m.cfg.d_model, dtype=torch.float64, generator=gen)

    def run():
        engine = m.engine(streaming=False)
        record = engine.forward(engine.embed(tokens))
        return (record.output, engine.pull_back_output(record, dirs),
                engine.push_forward(record, probes))

    monkeypatch.setattr(ggufjac.model, "BAND_BLOCK", len(tokens))
    one = run()
    monkeypatch.setattr(ggufjac.model, "BAND_BLOCK", 3)
    small = run()
    for a, b in zip(small, one):
        assert _rel(a, b) <= 1e-12
