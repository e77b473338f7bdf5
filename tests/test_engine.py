"""The streaming engine: same Jacobian as the in-memory path, chunking, memory, attribution."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ggufjac.api import open_model
from ggufjac.families import FAMILIES
from ggufjac.units import parse_size
from ggufjac.errors import GgufjacError
from ggufjac.linearize import PLAIN, Linearization
from ggufjac.model import mlp_branch, mlp_branch_matrix
from tools.synthetic import Shape, write_synthetic_gguf

PROMPT = "the bridge out of Marin"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("arch,gate_path", [("llama", "up"), ("phi3", "gate"), ("gemma3", "up")])
def test_streaming_equals_in_memory_synthetic(synthetic, arch: str, gate_path: str) -> None:
    m = open_model(synthetic(arch, "Q4_K_M"), dtype="float64")
    tokens = m.tokenize(PROMPT)
    lin = Linearization(gate_path=gate_path)
    streamed = m.jacobian(tokens, lin)
    reference = m.jacobian(tokens, lin, streaming=False)
    assert _rel(streamed.jacobian, reference.jacobian) <= 1e-12
    assert torch.equal(streamed.output, reference.output)
    assert streamed.reconstruction_rel_error() <= 1e-12


def test_streaming_equals_in_memory_real(gemma64, bridge_tokens) -> None:
    streamed = gemma64.jacobian(bridge_tokens)
    reference = gemma64.jacobian(bridge_tokens, streaming=False)
    assert _rel(streamed.jacobian, reference.jacobian) <= 1e-12
    assert streamed.reconstruction_rel_error() <= 1e-12


def test_chunked_cotangents_equal_unchunked(synthetic) -> None:
    m = open_model(synthetic("qwen3", "Q8_0"), dtype="float64")
    engine = m.engine()
    x = engine.embed(m.tokenize(PROMPT))
    record = engine.forward(x)
    cot = engine.output_cotangents(record.residuals[-1], torch.eye(m.cfg.d_model, dtype=x.dtype))
    whole = engine.pull_back(record, {m.cfg.n_layer: cot.clone()}, chunk=m.cfg.d_model)
    for chunk in (1, 7, 100):
        part = engine.pull_back(record, {m.cfg.n_layer: cot.clone()}, chunk=chunk)
        assert _rel(part, whole) <= 1e-13


def test_projected_directions_are_rows_of_the_full_jacobian(synthetic) -> None:
    m = open_model(synthetic("olmo2", "F16"), dtype="float64")
    tokens = m.tokenize(PROMPT)
    full = m.jacobian(tokens)
    directions = torch.randn(3, m.cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    projected = m.jacobian(tokens, directions=directions)
    expect = torch.einsum("md,dnk->mnk", directions, full.jacobian)
    assert _rel(projected.jacobian, expect) <= 1e-12
    assert projected.reconstruction_rel_error() <= 1e-12


def test_attribution_sums_to_the_logit(gemma64) -> None:
    """Contributions (u_tᵀ J_i)·x_i sum to the logit of the plain forward pass (the in-memory
    model without detaching), for the predicted token and a named one."""
    tokens = gemma64.tokenize("The capital of France is")
    paris = gemma64.token_for_text(" Paris")
    report = gemma64.attribute(tokens, None)
    report_paris = gemma64.attribute(tokens, [paris])
    model = gemma64.model
    with torch.no_grad():
        logits = model.logits(model.forward(model.embed(tokens), PLAIN)[-1])
    predicted = report["targets"][0]
    assert predicted["id"] == int(logits.argmax())
    for row in (predicted, report_paris["targets"][0]):
        expect = float(logits[row["id"]])
        assert abs(sum(row["contributions"]) - expect) <= 1e-12 * abs(expect)
        assert len(row["contributions"]) == len(tokens)
    # Against the full Jacobian of the in-memory path: u_tᵀ J_i x_i, position by position.
    full = gemma64.jacobian(tokens, streaming=False)
    u = gemma64.weights.unembedding_rows([paris])[0]
    expect = torch.einsum("d,dnk,nk->n", u, full.jacobian, full.inputs)
    got = torch.tensor(report_paris["targets"][0]["contributions"], dtype=torch.float64)
    assert _rel(got, expect) <= 1e-12


def test_unknown_target_token_is_named(gemma32) -> None:
    with pytest.raises(GgufjacError, match="'Parisxyz' is not a single token"):
        gemma32.token_for_text("Parisxyz")


@pytest.mark.parametrize("text,expected", [("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20),
                                           ("2GB", 2 * 10**9), ("1000", 1000), ("1.5 GiB", 3 * 2**29)])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "8 GiBs", "-1GB"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(GgufjacError, match="--max-memory"):
        parse_size(text)


def _peak_rss_of(tmp_path, module: str, *args: str) -> tuple[int, int, str]:
    """Run `python -m module args` in a child; its exit status, peak RSS (bytes), stderr."""
    report = tmp_path / "peak.txt"
    r = subprocess.run([sys.executable, "-m", "tools.peak_rss", str(report), module, *args],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return r.returncode, int(report.read_text()), r.stderr


def test_jacobian_fits_a_budget_the_whole_model_would_not(tmp_path) -> None:
    """A 40-layer model whose float32 weights (~600 MB) would not fit the budget if loaded
    whole runs within it: one layer (~15 MB) is in memory at a time."""
    shape = Shape(n_layer=40, d_model=512, d_ff=2048, n_head=8, n_kv_head=2, head_dim=64)
    path = write_synthetic_gguf(tmp_path / "deep.gguf", "llama", shape, "Q8_0")
    m = open_model(path)
    whole_model = m.cfg.n_layer * m.weights.layer_bytes()
    _, baseline, _ = _peak_rss_of(tmp_path, "ggufjac.api")  # imports torch
    budget = baseline + 250 * 2**20
    assert baseline + whole_model > budget + 300 * 2**20  # loaded whole it would not fit
    rc, peak, err = _peak_rss_of(tmp_path, "ggufjac.cli", "jacobian", str(path),
                                 "-p", "the bridge out", "--max-memory", str(budget),
                                 "--out", str(tmp_path / "out"))
    assert rc == 0, err
    assert (tmp_path / "out" / "jacobian.safetensors").exists()
    print(f"budget {budget / 2**20:.0f} MiB (process baseline {baseline / 2**20:.0f} MiB), "
          f"whole model {whole_model / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB")
    assert peak <= budget


def test_budget_that_cannot_be_met_is_refused_up_front(tmp_path, gemma_path) -> None:
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "ggufjac.cli", "jacobian", str(gemma_path),
                        "-p", "The bridge", "--max-memory", "64MiB", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "--max-memory 64.0 MiB cannot be met" in r.stderr
    assert "one row of weights" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "phi3", "olmo2", "granite"])
@pytest.mark.parametrize("gate_path", ["up", "gate"])
def test_mlp_branch_matrix_is_the_branch_jacobian(synthetic, arch: str, gate_path: str) -> None:
    """The MLP's per-position matrix (the reverse sweep's shortcut for many directions) equals
    autograd's Jacobian of the replayed MLP branch, rounding ratios included (random ones
    stand in for an anchored run's)."""
    m = open_model(synthetic(arch, "Q4_K_M"), dtype="float64")
    engine = m.engine(Linearization(gate_path=gate_path))
    record = engine.forward(engine.embed(m.tokenize(PROMPT)))
    w = m.weights.layer(1)
    gen = torch.Generator().manual_seed(1)
    store = dict(record.coefficients[1])
    linear = "ffn_up" if gate_path == "up" else "ffn_gate"
    n, d = record.inputs.shape
    store["in:" + linear] = 1 + 0.1 * torch.randn(n, d, dtype=torch.float64, generator=gen)
    store["in:ffn_down"] = 1 + 0.1 * torch.randn(n, m.cfg.d_ff, dtype=torch.float64, generator=gen)
    mid = record.residuals[1] + 0.5 * torch.randn(n, d, dtype=torch.float64, generator=gen)
    lin = engine.lin.replaying(store)
    for p in (0, n - 1):
        def branch_at(row: torch.Tensor) -> torch.Tensor:
            return mlp_branch(m.cfg, w, torch.cat((mid[:p], row[None], mid[p + 1:])), lin)[p]
        expect = torch.autograd.functional.jacobian(branch_at, mid[p])
        got = mlp_branch_matrix(m.cfg, w, store, gate_path, p, ffn_chunk=100)
        assert _rel(got, expect) <= 1e-13
        assert torch.allclose(got @ mid[p], mlp_branch(m.cfg, w, mid, lin)[p], rtol=0, atol=1e-12)


def test_split_layer_pullback_equals_autograd(synthetic, monkeypatch) -> None:
    """A layer's pull-back through the MLP matrices equals the all-autograd one; the engine
    takes the matrices only when they are cheaper (many directions)."""
    m = open_model(synthetic("gemma3", "Q6_K"), dtype="float64")
    engine = m.engine()
    d = m.cfg.d_model
    assert engine.mlp_as_matrix(d) and not engine.mlp_as_matrix(8)
    record = engine.forward(engine.embed(m.tokenize(PROMPT)))
    w = m.weights.layer(0, engine.linear_path)
    cot = torch.randn(d, record.inputs.shape[0], d, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(2))
    split = engine.layer_vjp(0, w, record, cot.clone(), chunk=50)
    monkeypatch.setattr(engine, "mlp_as_matrix", lambda n: False)
    whole = engine.layer_vjp(0, w, record, cot.clone(), chunk=50)
    assert _rel(split, whole) <= 1e-13


def test_prefetching_the_next_layer_gives_the_same_jacobian(synthetic) -> None:
    """Prefetching (a second buffer set filled by a worker thread while the current layer
    computes; on by default on CUDA, where it also uses a side stream) changes nothing."""
    from ggufjac.jacobian import streamed_jacobian

    m = open_model(synthetic("llama", "Q4_K_M"), dtype="float64")
    x = m.engine().embed(m.tokenize(PROMPT))
    plain = streamed_jacobian(m.engine(prefetch=False), x)
    prefetched = streamed_jacobian(m.engine(prefetch=True), x)
    assert torch.equal(plain.jacobian, prefetched.jacobian)


def test_progress_bar_per_sweep_counts_bytes_read_and_time_left(synthetic, tmp_path) -> None:
    """`jacobian` shows one bar per sweep (forward, reverse) counting the bytes of the file
    its layers read, with the time left; TQDM_MININTERVAL=0 makes tqdm draw every update,
    so each step (one per layer) is in stderr."""
    import os
    import re

    import gguf
    from tqdm import tqdm

    path = synthetic("llama", "Q8_0")
    r = subprocess.run([sys.executable, "-m", "ggufjac.cli", "jacobian", str(path), "-p", PROMPT,
                        "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       env={**os.environ, "TQDM_MININTERVAL": "0"})
    assert r.returncode == 0, r.stderr
    n_layer = open_model(path).cfg.n_layer
    reader = gguf.GGUFReader(path)
    layer_bytes = {t.name: int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.")}
    read_back = {"attn_norm", "attn_v", "attn_output", "ffn_norm", "ffn_up", "ffn_down"}
    totals = {"forward": sum(layer_bytes.values()),
              "reverse": sum(n for name, n in layer_bytes.items()
                             if name.split(".")[2] in read_back)}
    for sweep in ("forward", "reverse"):
        steps = re.findall(rf"{sweep}:\s+\d+%\|[^|]*\| ([\d.]+\w?)/([\d.]+\w?) "
                           rf"\[(\d\d:\d\d)<(\d\d:\d\d|\?)", r.stderr)
        assert len(steps) == n_layer + 1, (sweep, steps)
        assert {n for _, n, _, _ in steps} == {tqdm.format_sizeof(totals[sweep])}
        assert steps[-1][0] == steps[-1][1]
        assert all(left != "?" for *_, left in steps[1:])  # an estimate once a layer is done


@pytest.mark.parametrize("prefetch", [True, False])
def test_prefetch_reads_the_next_layer_while_the_current_one_computes(tmp_path, monkeypatch,
                                                                    prefetch) -> None:
    """With prefetching, layer k+1 is read and dequantized (into the other buffer set) while
    the caller still computes with layer k, whose weights stay intact, and layer k+2 only once
    the caller is done with k; without it, layer k+1 is read only after. (On CUDA the read
    runs on a side stream as well: no GPU here.)"""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import ggufjac.engine

    shape = Shape(n_layer=5, d_model=128, d_ff=256, n_head=2, n_kv_head=1)
    m = open_model(write_synthetic_gguf(tmp_path / "m.gguf", "llama", shape, "Q4_K_M"),
                   dtype="float64")
    engine = m.engine(prefetch=prefetch)
    events: list[tuple[str, int]] = []
    read_done = [threading.Event() for _ in range(m.cfg.n_layer)]
    load = engine._load

    def logged_load(layer, names, pool, after=None):
        try:
            events.append(("read", layer))
            loaded = load(layer, names, pool, after)
            events.append(("read done", layer))
            return loaded
        finally:  # set even when the read fails, so that no wait below can hang
            read_done[layer].set()
    engine._load = logged_load

    class LoggedPool(ThreadPoolExecutor):  # records which layer reads are handed to it
        def submit(self, fn, *args, **kwargs):
            if fn is logged_load:
                events.append(("submitted", args[0]))
            return super().submit(fn, *args, **kwargs)
    monkeypatch.setattr(ggufjac.engine, "ThreadPoolExecutor", LoggedPool)
    for layer, w in engine.layers(range(m.cfg.n_layer), None, "test"):
        events.append(("compute", layer))
        if prefetch and layer + 1 < m.cfg.n_layer:
            # the next read was handed to the pool before this layer was given out, so it
            # runs: "compute" until it is done (an event, no clock)
            assert ("submitted", layer + 1) in events, events
            read_done[layer + 1].wait()
            assert ("read done", layer + 1) in events, events  # the read itself succeeded
        fresh = m.weights.layer(layer)
        assert all(torch.equal(w[n], fresh[n]) for n in fresh)  # not overwritten by k+1
        events.append(("computed", layer))
    for k in range(m.cfg.n_layer - 1):
        computed = events.index(("computed", k))
        if prefetch:  # k+1 is read while k is in use (it may be done before k's use begins) ...
            assert events.index(("read", k + 1)) < events.index(("read done", k + 1)) < computed
            if k + 2 < m.cfg.n_layer:  # ... and k+2 not before k is done with: two buffer sets
                assert computed < events.index(("read", k + 2))
        else:
            assert computed < events.index(("read", k + 1))
    if not prefetch:  # every read on the caller's thread, none handed to a pool
        assert not any(kind == "submitted" for kind, _ in events), events


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision_jacobians_stay_in_their_dtype(synthetic, dtype) -> None:
    """--dtype float32|bfloat16|float16: the sweep runs in that type (the result is of it) and
    agrees with the float64 in-memory Jacobian to a few units of its rounding."""
    path = synthetic("llama", "Q4_K_M")
    reference = open_model(path, dtype="float64")
    tokens = reference.tokenize(PROMPT)
    expect = reference.jacobian(tokens, streaming=False).jacobian
    result = open_model(path, dtype=dtype).jacobian(tokens)
    eps = torch.finfo(dtype).eps
    assert result.jacobian.dtype == dtype
    assert _rel(result.jacobian.double(), expect) <= 8 * eps
    assert result.reconstruction_rel_error() <= 8 * eps


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_top_layer_on_the_last_row_alone_every_family(synthetic, arch: str) -> None:
    """J's output is the last position's, so the sweeps run the top layer's MLP on that row
    alone (forward: the last row's output; reverse: the only row with cotangents). Both
    against the full Jacobian by plain autograd on the whole graph, per family (each norm
    layout), with the matrices whole and read in row blocks."""
    m = open_model(synthetic(arch, "Q4_K_M"), dtype="float64")
    tokens = m.tokenize(PROMPT)
    reference = m.jacobian(tokens, streaming=False).jacobian  # [d, N, d]
    gen = torch.Generator().manual_seed(11)
    directions = torch.randn(3, m.cfg.d_model, dtype=torch.float64, generator=gen)
    probes = torch.randn(3, len(tokens), m.cfg.d_model, dtype=torch.float64, generator=gen)
    for engine in (m.engine(), m.engine(streaming=True,
                                        block_elements=3 * m.weights.widest_row() + 5)):
        record = engine.forward(engine.embed(tokens))
        pulled = engine.pull_back_output(record, directions.clone())
        assert _rel(pulled, torch.einsum("md,dnk->mnk", directions, reference)) <= 1e-12
        pushed = engine.push_forward(record, probes)
        assert _rel(pushed, torch.einsum("onk,mnk->mo", reference, probes)) <= 1e-12
