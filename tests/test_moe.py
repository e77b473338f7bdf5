"""Mixtures of experts: the qwen3moe family (Qwen3-30B-A3B's architecture) on small synthetic
files, against llama.cpp (its logits and its own routing: the graph's 'ffn_moe_topk' and
'ffn_moe_weights_norm') and against an independent float64 forward of the detached model
written here in numpy from gguf-py's tensors (routing: softmax over all experts, top k,
renormalised)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from gguf.constants import GGUFValueType

import numpy_reference
from numpy_reference import gguf_py_tensors, neox_rope

from ggufjac import llamacpp
from ggufjac.api import nmse, open_model
from ggufjac.errors import GGUFError
from ggufjac.linearize import PLAIN, Linearization
from ggufjac.routing import std_sort_descending
from tools.synthetic import Shape, _vocab, _write_f32_or_typed, model_tensors, \
    write_synthetic_gguf

PROMPT = "the quick brown fox jumps over the lazy dog"
SMALL = Shape(n_layer=2, d_model=64, d_ff=128, n_head=4, n_kv_head=2, head_dim=16,
              n_expert=8, n_expert_used=2, d_ff_expert=32)
VOCAB = len(_vocab()[0])
# With F32 weights llama.cpp and our float64 model differ by llama.cpp's F16 K/V cache and
# float32 arithmetic (tests/test_families.py's bound for exact weights).
EXACT_WEIGHTS_BOUND = 1e-5
QUANTIZED_BOUND = 1e-2  # the check command's bound for quantized weights


@pytest.fixture(scope="module")
def moe_f32(tmp_path_factory):
    return write_synthetic_gguf(tmp_path_factory.mktemp("moe") / "qwen3moe-F32.gguf",
                                "qwen3moe", SMALL)




def _reference(path, tokens: list[int], gate_path: str, probe: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(y, J·probe, experts per layer) at the last position: the detached qwen3moe network
    in float64, its coefficients (norm scales, attention probabilities, routing, each
    expert's gate) computed on the prompt, the same frozen network applied to `probe` [N, d]."""
    w = gguf_py_tensors(path)
    s, eps, base = SMALL, 1e-6, 10000.0
    n, hd, k = len(tokens), s.head_dim, s.n_expert_used
    rope = neox_rope(n, hd, base)

    def inv_rms(v):
        return numpy_reference.inv_rms(v, eps)

    x = w["token_embd.weight"][tokens]
    z = probe.copy()
    rep = s.n_head // s.n_kv_head
    routing = []
    for i in range(s.n_layer):
        p = lambda name: w[f"blk.{i}.{name}.weight"]  # noqa: E731
        r = inv_rms(x)
        h, hz = x * r * p("attn_norm"), z * r * p("attn_norm")
        q = (h @ p("attn_q").T).reshape(n, s.n_head, hd)
        kk = (h @ p("attn_k").T).reshape(n, s.n_kv_head, hd)
        q, kk = q * inv_rms(q) * p("attn_q_norm"), kk * inv_rms(kk) * p("attn_k_norm")
        scores = np.einsum("qhd,khd->hqk", rope(q), np.repeat(rope(kk), rep, axis=1)) \
            / np.sqrt(hd)
        scores = np.where(np.tril(np.ones((n, n), bool))[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)

        def attend(hh):
            v = (hh @ p("attn_v").T).reshape(n, s.n_kv_head, hd)
            o = np.einsum("hqk,khd->qhd", probs, np.repeat(v, rep, axis=1)).reshape(n, -1)
            return o @ p("attn_output").T
        x, z = x + attend(h), z + attend(hz)
        r = inv_rms(x)
        h, hz = x * r * p("ffn_norm"), z * r * p("ffn_norm")
        logits = h @ p("ffn_gate_inp").T
        pr = np.exp(logits - logits.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        chosen = np.argsort(-pr, axis=-1, kind="stable")[:, :k]
        routing.append(chosen)
        m, mz = np.zeros_like(x), np.zeros_like(x)
        for t in range(n):
            weights = pr[t, chosen[t]] / pr[t, chosen[t]].sum()
            for e, we in zip(chosen[t], weights):
                gate, up, down = (p(name)[e] for name in
                                  ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
                g, u = gate @ h[t], up @ h[t]
                sig = 1.0 / (1.0 + np.exp(-g))
                m[t] += we * (down @ (g * sig * u))
                if gate_path == "up":  # act(g) frozen, up linear
                    mz[t] += we * (down @ (g * sig * (up @ hz[t])))
                else:  # s(g) and u frozen, g linear
                    mz[t] += we * (down @ ((gate @ hz[t]) * sig * u))
        x, z = x + m, z + mz
    r = inv_rms(x[-1])
    return x[-1] * r * w["output_norm.weight"], z[-1] * r * w["output_norm.weight"], routing


def _routing(m, tokens: list[int], anchor=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Our frozen routing per layer: (experts [N, k], weights [N, k])."""
    engine = m.engine(anchor=anchor)
    record = engine.forward(engine.embed(tokens))
    return [(c["moe_experts"], c["moe_weights"]) for c in
            (record.coefficients[i] for i in range(m.cfg.n_layer))]


@pytest.mark.parametrize("gate_path", ["up", "gate"])
def test_detached_moe_is_exactly_linear_and_matches_an_independent_reference(
        moe_f32, gate_path: str) -> None:
    m = open_model(moe_f32, dtype="float64")
    tokens = m.tokenize(PROMPT)
    lin = Linearization(gate_path=gate_path)
    probe = np.random.default_rng(1).standard_normal((len(tokens), SMALL.d_model))
    y_ref, jv_ref, routing = _reference(moe_f32, tokens, gate_path, probe)
    for (experts, _), chosen in zip(_routing(m, tokens), routing):
        assert np.array_equal(experts.numpy(), chosen)
    jacobians = []
    for streaming in (True, False):
        r = m.jacobian(tokens, lin, streaming=streaming)
        assert np.linalg.norm(r.output.numpy() - y_ref) <= 1e-12 * np.linalg.norm(y_ref)
        assert r.reconstruction_rel_error() <= 1e-12
        jv = torch.einsum("onk,nk->o", r.jacobian, torch.from_numpy(probe)).numpy()
        assert np.linalg.norm(jv - jv_ref) <= 1e-12 * np.linalg.norm(jv_ref)
        jacobians.append(r.jacobian)
    assert torch.allclose(jacobians[0], jacobians[1], rtol=0, atol=1e-13)
    # the forward pass is the plain model's, bit for bit
    x = m.model.embed(tokens)
    with torch.no_grad():
        assert torch.equal(m.model.forward(x, lin), m.model.forward(x, PLAIN))


def test_row_block_streaming_reads_only_selected_experts(moe_f32) -> None:
    """Experts read in blocks of a few rows give the Jacobian of whole experts, and only the
    experts some token selected are ever read."""
    m = open_model(moe_f32, dtype="float64")
    tokens = m.tokenize(PROMPT)
    whole = m.engine(streaming=False)
    tiny = m.engine(streaming=True, block_elements=4 * SMALL.d_model)  # 4 rows a block
    directions = torch.eye(SMALL.d_model, dtype=torch.float64)[:8]
    results = []
    for engine in (whole, tiny):
        m.weights.experts_read.clear()
        record = engine.forward(engine.embed(tokens))
        results.append(engine.pull_back_output(record, directions))
        selected = {(f"blk.{i}.{name}.weight", e) for i in range(SMALL.n_layer)
                    for e in record.coefficients[i]["moe_experts"].unique().tolist()
                    for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
        assert m.weights.experts_read == selected
        assert len({e for _, e in selected}) < SMALL.n_expert or len(tokens) > 4
    assert torch.allclose(results[0], results[1], rtol=0, atol=1e-13)


def test_a_selected_expert_is_read_without_its_unselected_neighbours(tmp_path,
                                                                    monkeypatch) -> None:
    """The quantized experts a token selected are asked of the file by exactly their bytes
    (page-aligned): every byte of each selected expert, none of another expert's pages
    (a page fault alone would read the device's read-ahead window around it). Ranges from
    gguf-py's reader and the routing."""
    import mmap
    import os

    from gguf import GGUFReader

    from tools.synthetic import write_random_q4_k_gguf

    shape = Shape(n_layer=1, d_model=256, d_ff=512, n_head=2, n_kv_head=1, head_dim=128,
                  n_expert=16, n_expert_used=2, d_ff_expert=256)
    path = write_random_q4_k_gguf(tmp_path / "moe-q4k.gguf", "qwen3moe", shape)
    asked: list[tuple[int, int]] = []
    advise = os.posix_fadvise

    def recording(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            asked.append((offset, offset + length))
        advise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", recording)
    m = open_model(path, dtype="float32")
    engine = m.engine(streaming=True)
    record = engine.forward(engine.embed([1, 261, 262]))
    selected = set(record.coefficients[0]["moe_experts"].unique().tolist())
    assert 0 < len(selected) < shape.n_expert
    page = mmap.PAGESIZE
    for t in GGUFReader(path).tensors:
        if not t.name.endswith("_exps.weight"):
            continue
        per_expert = int(t.n_bytes) // shape.n_expert
        for e in range(shape.n_expert):
            lo = int(t.data_offset) + e * per_expert
            hi = lo + per_expert
            touching = [(a, b) for a, b in asked if a < hi and b > lo]
            if e in selected:  # covered, byte for byte
                covered = sorted(touching)
                assert covered and covered[0][0] <= lo and covered[-1][1] >= hi, (t.name, e)
                assert all(b >= c for (_, b), (c, _) in zip(covered, covered[1:]))
            else:  # at most the page it shares with a selected neighbour
                inner_lo, inner_hi = -(-lo // page) * page + page, hi // page * page - page
                assert not [r for r in touching if r[0] < inner_hi and r[1] > inner_lo], \
                    (t.name, e, touching)


def test_qwen3moe_matches_llama_cpp_and_its_routing(moe_f32, synthetic) -> None:
    m = open_model(moe_f32, dtype="float64")
    tokens = m.tokenize(PROMPT)
    names = [f"{t}-{i}" for i in range(SMALL.n_layer)
             for t in ("ffn_moe_topk", "ffn_moe_weights_norm")]
    ref = llamacpp.evaluate(moe_f32, tokens, capture=names)
    assert nmse(m.logits(tokens)[-1].numpy(), ref.logits[-1]) < EXACT_WEIGHTS_BOUND
    for i, (experts, weights) in enumerate(_routing(m, tokens)):
        theirs = ref.captured[f"ffn_moe_topk-{i}"].reshape(len(tokens), -1)
        assert np.array_equal(experts.numpy(), theirs)
        their_w = ref.captured[f"ffn_moe_weights_norm-{i}"].reshape(len(tokens), -1)
        # the router's input differs from llama.cpp's by its F16 K/V cache (measured:
        # weights 1e-4 apart); anchoring takes its values themselves
        assert np.allclose(weights.numpy(), their_w, rtol=0, atol=2e-3)
    # a quantized file (llama.cpp's Q4_K_M mix) within check's bound, the same top-1
    path = synthetic("qwen3moe", "Q4_K_M")
    mq = open_model(path, dtype="float64")
    assert "Q4_K" in {t.type.name for n, t in mq.gguf.tensors.items() if "_exps" in n}
    ours, theirs = mq.logits(tokens)[-1].numpy(), llamacpp.evaluate(path, tokens).logits[-1]
    assert nmse(ours, theirs) < QUANTIZED_BOUND and ours.argmax() == theirs.argmax()


@pytest.mark.parametrize("n_expert", [8, 32])
def test_router_ties_are_broken_as_llama_cpp_breaks_them(tmp_path, n_expert: int) -> None:
    """Every router row zero but three equal ones: each position's scores tie at the top-k
    boundary (three equal maxima, or n_expert - 3 equal zeros), so which experts are
    selected is decided by llama.cpp's sort alone (an insertion sort up to 16 experts,
    libstdc++'s introsort above)."""
    shape = Shape(**{**SMALL.__dict__, "n_expert": n_expert})
    tensors = model_tensors("qwen3moe", shape, VOCAB, seed=3)
    rng = np.random.default_rng(0)
    for i in range(shape.n_layer):
        router = np.zeros((n_expert, shape.d_model), np.float32)
        router[[2, 3, n_expert - 3]] = rng.standard_normal(shape.d_model)
        tensors[f"blk.{i}.ffn_gate_inp.weight"] = router
    path = tmp_path / "ties.gguf"
    _write_f32_or_typed(path, "qwen3moe", shape, tensors, None)
    m = open_model(path, dtype="float32")
    tokens = m.tokenize(PROMPT)
    ref = llamacpp.evaluate(path, tokens, capture=[f"ffn_moe_topk-{i}"
                                                   for i in range(shape.n_layer)])
    for i, (experts, _) in enumerate(_routing(m, tokens)):
        theirs = ref.captured[f"ffn_moe_topk-{i}"].reshape(len(tokens), -1)
        assert np.array_equal(experts.numpy(), theirs), i
    assert nmse(m.logits(tokens)[-1].numpy(), ref.logits[-1]) < EXACT_WEIGHTS_BOUND


def test_std_sort_order_is_libstdcxx_std_sort(tmp_path) -> None:
    """The tie order against a compiled std::sort with ggml's comparator, on rows of many
    equal values (the introsort's partitions, its insertion sort, its heap sort fallback)."""
    src = tmp_path / "sort.cpp"
    src.write_text("""
#include <algorithm>
#include <cstdio>
#include <vector>
int main() {
    int n;
    while (std::scanf("%d", &n) == 1) {
        std::vector<float> v(n); std::vector<int> idx(n);
        for (int i = 0; i < n; i++) { std::scanf("%f", &v[i]); idx[i] = i; }
        std::sort(idx.begin(), idx.end(), [&](int a, int b) { return v[a] > v[b]; });
        for (int i = 0; i < n; i++) std::printf("%d ", idx[i]);
        std::printf("\\n");
    }
}
""")
    exe = tmp_path / "sort"
    subprocess.run(["g++", "-O1", "-o", str(exe), str(src)], check=True)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, levels, size=n).astype(float).tolist()
            for n in (5, 16, 17, 32, 128, 300) for levels in (1, 2, 3, 7)]
    # an organ-pipe row, which drives median-of-three quicksort to its depth limit
    rows.append([float(min(i, 199 - i) // 2) for i in range(200)])
    text = "".join(f"{len(r)} {' '.join(map(str, r))}\n" for r in rows)
    out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True)
    for row, line in zip(rows, out.stdout.splitlines()):
        assert std_sort_descending(row) == [int(t) for t in line.split()]


@pytest.mark.parametrize("change, named", [
    ({"expert_count": (0, GGUFValueType.UINT32)}, "qwen3moe.expert_count"),
    ({"expert_used_count": (9, GGUFValueType.UINT32)}, "qwen3moe.expert_used_count"),
    ({"expert_used_count": (0, GGUFValueType.UINT32)}, "qwen3moe.expert_used_count"),
])
def test_hostile_moe_metadata_is_refused_naming_the_key(tmp_path, change, named) -> None:
    path = write_synthetic_gguf(tmp_path / "hostile.gguf", "qwen3moe", SMALL, metadata=change)
    with pytest.raises(GGUFError) as e:
        open_model(path)
    assert named in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("tensor", ["blk.1.ffn_up_exps.weight", "blk.0.ffn_gate_inp.weight",
                                    "blk.0.ffn_down_exps.weight"])
def test_expert_shapes_that_disagree_are_refused_naming_the_tensor(tmp_path, tensor) -> None:
    tensors = model_tensors("qwen3moe", SMALL, VOCAB, seed=0)
    tensors[tensor] = tensors[tensor][:-1]  # one expert fewer than expert_count
    path = tmp_path / "hostile.gguf"
    _write_f32_or_typed(path, "qwen3moe", SMALL, tensors, None)
    with pytest.raises(GGUFError) as e:
        open_model(path)
    assert repr(tensor) in str(e.value) and "\n" not in str(e.value)


def test_svd_matches_the_dense_svd(moe_f32) -> None:
    m = open_model(moe_f32, dtype="float64")
    tokens = m.tokenize("the quick brown fox")
    j = m.jacobian(tokens).jacobian.reshape(SMALL.d_model, -1)
    dense = torch.linalg.svdvals(j)[:4]
    result = m.svd(tokens, 4)
    assert torch.allclose(torch.as_tensor(result.singular_values[:4]), dense, rtol=1e-8)


@pytest.mark.parametrize("quant", ["F32", "Q4_K_M"])
def test_anchored_moe_reproduces_llama_cpp(moe_f32, synthetic, quant: str) -> None:
    """llama.cpp's own routing (ffn_moe_topk, ffn_moe_weights_norm), its experts' GLU outputs
    and its roundings frozen: its logits reproduced, flash attention off (gate path) and on
    (up path), against the anchored run and an independent one."""
    from ggufjac.run_settings import RunSettings

    m = open_model(moe_f32 if quant == "F32" else synthetic("qwen3moe", quant),
                   dtype="float64")
    tokens = m.tokenize(PROMPT)
    for gate_path, flash in (("gate", False), ("up", True)):
        lin = Linearization(gate_path=gate_path)
        anchor = m.anchor(tokens, lin, RunSettings(flash_attn="on" if flash else "off"))
        names = [f"ffn_moe_topk-{i}" for i in range(SMALL.n_layer)]
        theirs = llamacpp.evaluate(m.path, tokens, anchor.settings, capture=names)
        for i, layer in enumerate(anchor.layers):  # the routing given is llama.cpp's
            assert np.array_equal(layer["moe_experts"].numpy(),
                                  theirs.captured[names[i]].reshape(len(tokens), -1))
        result = m.jacobian(tokens, lin, anchor=anchor)
        summary = m.anchor_summary(anchor, result.output, result)
        assert result.reconstruction_rel_error() <= 1e-12
        assert summary["anchor_logits_nmse"] <= 1e-10, (gate_path, flash)
        assert summary["independent_run"]["logits_nmse"] <= 1e-10
        assert summary["anchor_output_rel_error"] < 1e-6
        assert summary["flash_attn"] is flash and not summary["approximations"]


def test_reports_state_the_routing_and_the_share_of_the_file_read(moe_f32, tmp_path) -> None:
    """report.json of `jacobian` and `attribute`: per layer and token the experts selected
    (those of llama.cpp's graph) and their weights, and the bytes of the experts read: one
    expert's bytes of each expert tensor per distinct expert selected in a layer."""
    import json

    from click.testing import CliRunner

    from ggufjac.cli import main

    m = open_model(moe_f32, dtype="float32")
    tokens = m.tokenize("the quick brown fox")
    ref = llamacpp.evaluate(moe_f32, tokens, capture=[f"ffn_moe_topk-{i}"
                                                      for i in range(SMALL.n_layer)])
    res = CliRunner().invoke(main, ["jacobian", str(moe_f32), "-p", "the quick brown fox",
                                    "--out", str(tmp_path / "j")])
    assert res.exit_code == 0, res.output
    reports = [json.loads((tmp_path / "j" / "report.json").read_text())["routing"],
               m.attribute(tokens)["routing"]]
    per_expert = SMALL.d_model * SMALL.d_ff_expert * 4  # F32, any of the three tensors
    for routing in reports:
        distinct = 0
        for i, layer in enumerate(routing["layers"]):
            theirs = ref.captured[f"ffn_moe_topk-{i}"].reshape(len(tokens), -1)
            assert layer["experts"] == theirs.tolist()
            assert np.allclose(np.sum(layer["weights"], axis=1), 1.0, atol=1e-6)
            distinct += len({e for row in layer["experts"] for e in row})
        assert routing["expert_bytes_read"] == 3 * distinct * per_expert
        assert routing["expert_bytes_in_file"] == 3 * SMALL.n_layer * SMALL.n_expert * per_expert
        assert routing["share_of_experts_read"] == distinct / (SMALL.n_layer * SMALL.n_expert)


def test_html_report_shows_the_routing_token_by_layer(moe_f32, tmp_path) -> None:
    import json
    import re

    from click.testing import CliRunner

    from ggufjac.cli import main

    res = CliRunner().invoke(main, ["jacobian", str(moe_f32), "-p", "the quick brown fox",
                                    "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert CliRunner().invoke(main, ["report", str(tmp_path)]).exit_code == 0
    routing = json.loads((tmp_path / "report.json").read_text())["routing"]
    page = (tmp_path / "report.html").read_text()
    table = page[page.index('<table id="routing">'):]
    table = table[:table.index("</table>")]
    rows = re.findall(r'<tr data-position="(\d+)">(.*?)</tr>', table, re.S)
    assert len(rows) == len(routing["tokens"])
    for position, row in rows:
        cells = re.findall(r'<td class="routing-cell"[^>]*>(.*?)</td>', row, re.S)
        assert len(cells) == SMALL.n_layer
        for layer, cell in zip(routing["layers"], cells):
            shown = [int(e) for e in re.findall(r'data-expert="(\d+)"', cell)]
            assert shown == layer["experts"][int(position)]
