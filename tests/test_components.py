"""Exact per-component attribution (`attribute --components`): at every layer the logit split
between the stream entering the layer, each attention head, the MLP and the biases.

The components of each layer must sum to the logit (float64). Each kind of component is
checked against an independent recomputation: the frozen network is affine, so removing one
component's output from the layer's sum (everything else frozen) changes the logit by
exactly that component's contribution (a head's output is removed from the layer's output
sum, the layer's own MLP still reading it: its effect through that MLP is the MLP's part).
On a llama and a qwen2 file (biases) the frozen network is written here in numpy from
gguf-py's tensors; on the real Gemma 3 270M and a qwen3moe file (an expert's routing weights
zeroed) the removal runs through the replayed layers of the recorded forward pass, a forward
computation apart from the reverse sweep that makes the components.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from numpy_reference import gguf_py_tensors

from ggufjac import model
from ggufjac.api import open_model
from ggufjac.linearize import Linearization
from tools.synthetic import Shape, write_synthetic_gguf

PROMPT = "the quick brown fox jumps"
SMALL = Shape(n_layer=3, d_model=64, d_ff=128, n_head=4, n_kv_head=2, head_dim=16)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("components")
    return {arch: write_synthetic_gguf(d / f"{arch}.gguf", arch, SMALL, "F32")
            for arch in ("llama", "qwen2")}




def _frozen_logit(path, arch: str, tokens: list[int], target: int, gate_path: str,
                  cut: tuple[int, str, int | None] | None = None) -> float:
    """The target's logit from a float64 numpy forward of a llama or qwen2 file: the
    coefficients (norm scales, attention probabilities, GLU coefficient) computed on the
    prompt, and with `cut` = (layer, kind, index) the same frozen network with that
    component removed from the layer's output sum x_l + attention + MLP (the MLP's input
    unchanged): 'stream' (x_l), 'head' (head index's output), 'mlp', or 'bias_above' (every
    bias of the layers above left out)."""
    w = gguf_py_tensors(path)
    s, eps, base = SMALL, 1e-6, 10000.0
    n, hd, half = len(tokens), s.head_dim, s.head_dim // 2
    theta = np.arange(n)[:, None] * base ** (-np.arange(half) * 2 / hd)[None, :]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]

    def rope(v):
        if arch == "qwen2":  # NEOX pairs (i, i + hd/2)
            a, b = v[..., :half], v[..., half:]
            return np.concatenate((a * cos - b * sin, b * cos + a * sin), axis=-1)
        a, b = v[..., 0::2], v[..., 1::2]  # pairs (2i, 2i + 1)
        return np.stack((a * cos - b * sin, b * cos + a * sin), axis=-1).reshape(v.shape)

    def inv_rms(v):
        return 1.0 / np.sqrt((v ** 2).mean(-1, keepdims=True) + eps)

    def frozen(cut_here: tuple | None) -> float:
        x = w["token_embd.weight"][tokens]
        rep = s.n_head // s.n_kv_head
        for i in range(s.n_layer):
            p = lambda name: w[f"blk.{i}.{name}"]  # noqa: E731
            biased = not (cut_here and cut_here[1] == "bias_above" and i > cut_here[0])
            bias = lambda name: w.get(f"blk.{i}.{name}.bias", 0.0) if biased else 0.0  # noqa
            live = coefficients is None
            if live:
                record.append({})
            c = record[i]
            if live:
                c["r1"] = inv_rms(x)
            h = x * c["r1"] * p("attn_norm.weight")
            if live:
                hh = x * c["r1"] * p("attn_norm.weight")
                q = (hh @ p("attn_q.weight").T + bias("attn_q")).reshape(n, s.n_head, hd)
                k = (hh @ p("attn_k.weight").T + bias("attn_k")).reshape(n, s.n_kv_head, hd)
                k = np.repeat(rope(k), rep, axis=1)
                scores = np.einsum("qhd,khd->hqk", rope(q), k) / np.sqrt(hd)
                scores = np.where(np.tril(np.ones((n, n), bool))[None], scores, -np.inf)
                probs = np.exp(scores - scores.max(-1, keepdims=True))
                c["probs"] = probs / probs.sum(-1, keepdims=True)
            v = (h @ p("attn_v.weight").T + bias("attn_v")).reshape(n, s.n_kv_head, hd)
            o = np.einsum("hqk,khd->qhd", c["probs"], np.repeat(v, rep, axis=1))
            a = o.reshape(n, -1) @ p("attn_output.weight").T
            mid = x + a  # the MLP's input: a removed head leaves the layer's own MLP as is
            if cut_here and cut_here[:2] == (i, "head"):
                o[:, cut_here[2]] = 0.0
                a = o.reshape(n, -1) @ p("attn_output.weight").T
            if live:
                c["r2"] = inv_rms(mid)
            h2 = mid * c["r2"] * p("ffn_norm.weight")
            g, u = h2 @ p("ffn_gate.weight").T, h2 @ p("ffn_up.weight").T
            if live:
                sig = 1.0 / (1.0 + np.exp(-g))
                c["coef"] = g * sig if gate_path == "up" else sig * u
            m = (c["coef"] * u if gate_path == "up" else g * c["coef"]) @ p("ffn_down.weight").T
            parts = {"stream": x, "attn": a, "mlp": m}
            if cut_here and cut_here[0] == i and cut_here[1] in ("stream", "mlp"):
                parts[cut_here[1]] = np.zeros_like(x)
            x = parts["stream"] + parts["attn"] + parts["mlp"]
        if coefficients is None:
            record.append({"r": inv_rms(x[-1])})
        y = x[-1] * record[-1]["r"] * w["output_norm.weight"]
        return float(w.get("output.weight", w["token_embd.weight"])[target] @ y)

    record: list[dict] = []
    coefficients = None
    logit = frozen(None)  # records the coefficients
    coefficients = record
    return logit if cut is None else frozen(cut)


def _by_name(layer_row: dict) -> dict[str, float]:
    return {c["name"]: c["value"] for c in layer_row["components"]}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_components_sum_to_the_logit_and_each_is_its_removal_from_a_numpy_forward(
        small_files, arch: str) -> None:
    path = small_files[arch]
    m = open_model(path, dtype="float64")
    tokens = m.tokenize(PROMPT)
    for gate_path in ("up", "gate"):
        report = m.attribute(tokens, lin=Linearization(gate_path=gate_path), components=True)
        row = report["targets"][0]
        logit = _frozen_logit(path, arch, tokens, row["id"], gate_path)
        assert row["logit"] == pytest.approx(logit, rel=1e-12)
        layers = row["components"]["layers"]
        assert [r["layer"] for r in layers] == list(range(SMALL.n_layer))
        for r in layers:
            names = [c["name"] for c in r["components"]]
            expected = ["stream", *(f"head {h}" for h in range(SMALL.n_head)), "mlp"]
            assert names == expected + (["bias_above"] if arch == "qwen2" else [])
            total = sum(c["value"] for c in r["components"])
            assert abs(total - logit) <= 1e-10 * abs(logit)
            assert r["rel_error"] <= 1e-10
        # the token attribution of the same sweep still sums to the logit
        assert row["sum_of_contributions"] == pytest.approx(logit, rel=1e-12)
        cuts = [(0, "head", 1), (1, "head", 3), (2, "head", 0), (1, "mlp", None),
                (0, "stream", None)]
        if arch == "qwen2":
            cuts += [(0, "bias_above", None), (1, "bias_above", None)]
        for layer, kind, index in cuts:
            value = _by_name(layers[layer])[kind if index is None else f"{kind} {index}"]
            removed = _frozen_logit(path, arch, tokens, row["id"], gate_path,
                                    (layer, kind, index))
            # the contributions are not small next to the logit: the check can fail
            assert abs(logit - removed - value) <= 1e-10 * max(abs(logit), abs(value))
    if arch == "qwen2":  # the biases of the layers above the first matter here
        assert abs(_by_name(layers[0])["bias_above"]) > 1e-3 * abs(logit)


def test_components_on_the_real_gemma3(gemma64) -> None:
    """Gemma 3 270M (post-norms, QK-norm, sliding windows) in float64: every layer's
    components sum to the logit, and a head's and the MLP's contributions equal the logit
    change when the frozen forward pass (the recorded coefficients replayed layer by layer)
    runs with that output removed from its layer's sum."""
    m = gemma64
    tokens = m.tokenize("The capital of France is")
    report = m.attribute(tokens, components=True)
    row = report["targets"][0]
    logit = row["logit"]
    layers = row["components"]["layers"]
    assert len(layers) == m.cfg.n_layer
    for r in layers:
        assert len(r["components"]) == 1 + m.cfg.n_head + 1  # stream, heads, mlp
        assert abs(sum(c["value"] for c in r["components"]) - logit) <= 1e-10 * abs(logit)

    engine = m.engine(Linearization())
    record = engine.forward(engine.embed(tokens))
    u = m.logit_rows([row["id"]], None)[0]
    hd = m.cfg.head_dim_v

    cuts = [(3, "head", 1), (m.cfg.n_layer - 2, "head", 2), (9, "mlp", None)]
    # one frozen forward pass of every variant at once (rows: none removed, then each cut)
    x = record.residuals[0].expand(1 + len(cuts), *record.residuals[0].shape).clone()
    with torch.no_grad():
        for i in range(m.cfg.n_layer):
            w = m.weights.layer(i)
            lin = Linearization().replaying(record.coefficients[i], constants=True)
            o = model.attention_branch_heads(m.cfg, i, w, x, lin)
            a = model.attention_branch_output(m.cfg, w, o, lin)
            mlp = model.mlp_branch(m.cfg, w, x + a, lin)
            for k, (layer, kind, index) in enumerate(cuts, start=1):
                if (i, kind) == (layer, "head"):  # out of the layer's sum, not the MLP's input
                    o[k, :, index * hd:(index + 1) * hd] = 0
                    a[k] = model.attention_branch_output(m.cfg, w, o[k], lin)
                if (i, kind) == (layer, "mlp"):
                    mlp[k] = 0
            x = x + a + mlp
        y = model.final_norm(m.cfg, engine.output_norm, x,
                             Linearization().replaying(record.output_coefficients))[:, -1]
    logits = (y @ u).tolist()
    assert logits[0] == pytest.approx(logit, rel=1e-12)
    for (layer, kind, index), removed in zip(cuts, logits[1:]):
        value = _by_name(layers[layer])[kind if index is None else f"{kind} {index}"]
        assert abs(value) > 1e-6 * abs(logit)
        assert abs(logit - removed - value) <= 1e-10 * abs(logit)


def test_attribute_components_command_prints_writes_and_shows_them(small_files, tmp_path) -> None:
    """`attribute --components`: the table on stdout, every value in the JSON, and the HTML
    page's table, whose cells add up to each layer's sum (the logit)."""
    import json
    import re

    from click.testing import CliRunner

    from ggufjac.cli import main

    out = tmp_path / "a.json"
    r = CliRunner().invoke(main, ["attribute", str(small_files["qwen2"]), "-p", PROMPT,
                                  "--dtype", "float64", "--components", "--json", str(out),
                                  "--html"])
    assert r.exit_code == 0, r.output
    assert "bias above" in r.output and "head" in r.output
    report = json.loads(out.read_text())
    row = report["targets"][0]
    assert "definition" in report["components_definition"]
    layers = row["components"]["layers"]
    for layer_row in layers:  # the printed table's rows: layer, then the four totals
        row_start = rf"\s+{layer_row['layer']}\s+-?\d+\.\d{{4}}\s"
        line = next(s for s in r.output.splitlines() if re.match(row_start, s))
        stream, attention, mlp, above = (float(v) for v in line.split()[1:5])
        parts = _by_name(layer_row)
        heads = sum(v for k, v in parts.items() if k.startswith("head"))
        assert (stream, attention, mlp, above) == pytest.approx(
            (parts["stream"], heads, parts["mlp"], parts["bias_above"]), abs=1e-4)
    page = (tmp_path / "report.html").read_text()
    table = page[page.index('<table class="components">'):]
    table = table[:table.index("</table>")]
    for layer_row, html_row in zip(layers, table.split("<tr data-layer=")[1:]):
        cells = [float(v) for v in re.findall(r'<span class="part"[^>]*data-value="([^"]+)"',
                                              html_row)]
        stream, _, _, above, total = (float(v) for v in re.findall(
            r'<td class="num[^"]*" data-value="([^"]+)"', html_row))
        assert stream + sum(cells) + above == pytest.approx(row["logit"], rel=1e-10)
        assert total == pytest.approx(row["logit"], rel=1e-10)


def test_mixture_of_experts_components_are_its_routed_experts(tmp_path) -> None:
    """qwen3moe: the MLP's parts are its routed experts. Each layer's components sum to the
    logit, and an expert's contribution is the logit change when the frozen forward pass
    runs with that expert's routing weights zeroed at that layer (its output out of the
    layer's sum, everything else frozen)."""
    shape = Shape(n_layer=2, d_model=64, d_ff=128, n_head=4, n_kv_head=2, head_dim=16,
                  n_expert=8, n_expert_used=2, d_ff_expert=32)
    m = open_model(write_synthetic_gguf(tmp_path / "moe.gguf", "qwen3moe", shape, "F32"),
                   dtype="float64")
    tokens = m.tokenize(PROMPT)
    row = m.attribute(tokens, components=True)["targets"][0]
    logit, layers = row["logit"], row["components"]["layers"]
    engine = m.engine(Linearization())
    record = engine.forward(engine.embed(tokens))
    for r in layers:
        names = [c["name"] for c in r["components"]]
        selected = sorted(set(record.coefficients[r["layer"]]["moe_experts"].reshape(-1).tolist()))
        assert names == ["stream", *(f"head {h}" for h in range(4)),
                         *(f"expert {e}" for e in selected)]
        assert abs(sum(c["value"] for c in r["components"]) - logit) <= 1e-10 * abs(logit)
    u = m.logit_rows([row["id"]], None)[0]
    for layer in range(shape.n_layer):
        experts = {c["index"]: c["value"] for c in layers[layer]["components"]
                   if c["kind"] == "expert"}
        e = max(experts, key=lambda k: abs(experts[k]))
        x = record.residuals[0]
        with torch.no_grad():
            for i in range(shape.n_layer):
                w = m.weights.layer(i)
                store = record.coefficients[i]
                lin = Linearization().replaying(store, constants=True)
                a = model.attention_branch(m.cfg, i, w, x, lin)
                if i == layer:
                    cut = {**store, "moe_weights": store["moe_weights"]
                           * (store["moe_experts"] != e).to(torch.float64)}
                    lin = Linearization().replaying(cut, constants=True)
                x = x + a + model.mlp_branch(m.cfg, w, x + a, lin)
            y = model.final_norm(m.cfg, engine.output_norm, x,
                                 Linearization().replaying(record.output_coefficients))[-1]
        assert abs(experts[e]) > 1e-3 * abs(logit)
        assert abs(logit - float(u @ y) - experts[e]) <= 1e-10 * abs(logit)


def test_anchored_components_sum_to_llama_cpps_logits(tmp_path) -> None:
    """Anchored to llama.cpp (a Q8_0 qwen2 file: its rounding of every matmul's input frozen
    too), with two targets in one sweep: each layer's components sum to each target's
    anchored logit, which is llama.cpp's own."""
    path = write_synthetic_gguf(tmp_path / "q8.gguf", "qwen2", SMALL, "Q8_0")
    m = open_model(path, dtype="float64")
    tokens = m.tokenize(PROMPT)
    anchor = m.anchor(tokens, Linearization(), reference=False)
    report = m.attribute(tokens, [5, 17], anchor=anchor, components=True)
    for row in report["targets"]:
        assert row["logit"] == pytest.approx(row["llama_cpp_logit"], rel=1e-6, abs=1e-6)
        for r in row["components"]["layers"]:
            total = sum(c["value"] for c in r["components"])
            assert abs(total - row["logit"]) <= 1e-10 * abs(row["logit"])
    a, b = (row["components"]["layers"][0]["components"] for row in report["targets"])
    assert [c["value"] for c in a] != pytest.approx([c["value"] for c in b])
