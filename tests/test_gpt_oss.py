"""The pieces gpt-oss needs: MXFP4 weights, attention sinks, its clamped SwiGLU, YaRN rope,
each against an independent reference (gguf-py, llama.cpp, a float64 formula, autograd)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf import quants as gguf_quants

from ggufjac.api import open_model
from ggufjac.llamacpp import RunSettings

PROMPT = "the bridge out of Marin"


@pytest.fixture(scope="module")
def mxfp4_llama(tmp_path_factory):
    """A llama file whose layer matrices are MXFP4 (gguf-py's quantizer), which llama.cpp
    runs like any other weight type."""
    from tools.synthetic import Shape, write_synthetic_gguf

    path = tmp_path_factory.mktemp("mxfp4") / "llama-mxfp4.gguf"
    return write_synthetic_gguf(path, "llama", Shape(), tensor_types={"blk.": "MXFP4"})


def test_mxfp4_file_weights_match_gguf_py(mxfp4_llama) -> None:
    """Every MXFP4 matrix of a file, as the engine reads it, equals gguf-py's dequantization
    of the file's bytes element for element."""
    m = open_model(mxfp4_llama, dtype="float32")
    reader = {t.name: t for t in GGUFReader(mxfp4_llama).tensors}
    weights = m.weights.layer(1)
    checked = 0
    for name in ("attn_q", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        t = reader[f"blk.1.{name}.weight"]
        assert t.tensor_type.name == "MXFP4"
        ref = gguf_quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        ours = weights[name]
        ours = ours if isinstance(ours, torch.Tensor) else ours.rows(0, ours.shape[0])
        assert np.array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32)), name
        checked += 1
    assert checked == 6


@pytest.mark.parametrize("repack", [True, False], ids=["repack", "no-repack"])
def test_mxfp4_anchored_reproduces_llama_cpp(mxfp4_llama, repack: bool) -> None:
    """MXFP4 weights pair with Q8_0 activations in ggml's CPU backend: anchored with that
    rounding, llama.cpp's logits are reproduced as for the other 8-bit-activation types."""
    m = open_model(mxfp4_llama, dtype="float64")
    tokens = m.tokenize(PROMPT)
    for flash in ("off", "on"):
        anchor = m.anchor(tokens, settings=RunSettings(flash_attn=flash, repack=repack),
                          reference=False)
        engine = m.engine(anchor=anchor)
        summary = m.anchor_summary(anchor, engine.forward(engine.embed(tokens)).output[-1])
        assert summary["anchor_logits_nmse"] <= 1e-12, (flash, summary["anchor_logits_nmse"])
        assert summary["anchor_output_rel_error"] < 1e-6
        assert summary["top1_agree"] and not summary["approximations"]


# -- the clamped SwiGLU ----------------------------------------------------------------------

ALPHA, LIMIT = 1.702, 7.0  # llama.cpp's build_moe_ffn (LLM_FFN_SWIGLU_OAI_MOE), as float32


def _oai_formula(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """ggml's swiglu_oai, written out in float64: x = min(g, limit), y = clamp(u),
    x / (1 + exp(-alpha x)) * (y + 1)."""
    alpha = float(np.float32(ALPHA))
    x, y = np.minimum(g, LIMIT), np.clip(u, -LIMIT, LIMIT)
    return x / (1.0 + np.exp(-alpha * x)) * (y + 1.0)


@pytest.mark.parametrize("gate_path", ["up", "gate"])
def test_swiglu_oai_detached_is_exactly_affine(gate_path: str) -> None:
    """Both gate paths: the detached product has the plain values bit for bit; its linear
    part (autograd through the frozen replay) is the clamp's slope times the frozen factor,
    its constant the clamped entries' values and, on the up path, the "+1"; linear part
    plus constant reconstruct the output to float64 rounding."""
    from ggufjac.linearize import PLAIN, Linearization, swiglu_oai_product

    rng = np.random.default_rng(5)
    g_np, u_np = rng.standard_normal((3, 40)) * 6, rng.standard_normal((3, 40)) * 6
    assert (g_np > LIMIT).any() and (np.abs(u_np) > LIMIT).any()  # both clamps active
    g, u = torch.from_numpy(g_np), torch.from_numpy(u_np)
    plain = swiglu_oai_product(lambda: g, lambda: u, PLAIN)
    np.testing.assert_allclose(plain.numpy(), _oai_formula(g_np, u_np), rtol=1e-14, atol=1e-14)

    store: dict = {}
    lin = Linearization(gate_path=gate_path)
    detached = swiglu_oai_product(lambda: g, lambda: u, lin.recording(store))
    assert torch.equal(detached, plain)
    # the linear branch's input, probed through the replay with the constants left out
    branch = (u if gate_path == "up" else g).clone().requires_grad_(True)
    other = g if gate_path == "up" else u
    calls = (lambda: other, lambda: branch) if gate_path == "up" else \
        (lambda: branch, lambda: other)
    linear = swiglu_oai_product(*calls, lin.replaying(store))
    slope, = torch.autograd.grad(linear.sum(), branch)  # elementwise: the diagonal of J
    zero = torch.zeros_like(branch)
    calls0 = (lambda: other, lambda: zero) if gate_path == "up" else (lambda: zero, lambda: other)
    constant = swiglu_oai_product(*calls0, lin.replaying(store, constants=True))

    alpha = float(np.float32(ALPHA))
    x = np.minimum(g_np, LIMIT)
    act = x / (1 + np.exp(-alpha * x))
    sig = 1 / (1 + np.exp(-alpha * x))
    y1 = np.clip(u_np, -LIMIT, LIMIT) + 1
    if gate_path == "up":
        inside = np.abs(u_np) <= LIMIT
        want_slope = act * inside
        want_constant = act * np.where(inside, 1.0, y1)  # the "+1", or the clamped value
    else:
        inside = g_np <= LIMIT
        want_slope = sig * y1 * inside
        want_constant = np.where(inside, 0.0, LIMIT * sig * y1)
    np.testing.assert_allclose(slope.numpy(), want_slope, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(constant.numpy(), want_constant, rtol=1e-13, atol=1e-15)
    rebuilt = slope.numpy() * branch.detach().numpy() + constant.numpy()
    assert np.abs(rebuilt - plain.numpy()).max() <= 1e-12 * np.abs(plain.numpy()).max()
    # the MLP's per-position matrix form takes the same linear coefficient
    from ggufjac.linearize import glu_linear_branch

    name, c = glu_linear_branch(store, gate_path)
    assert name == ("ffn_up" if gate_path == "up" else "ffn_gate")
    np.testing.assert_allclose(c.numpy(), want_slope, rtol=1e-13, atol=1e-15)


# -- YaRN rope -------------------------------------------------------------------------------

YARN = {"rope.scaling.type": ("yarn", "string"), "rope.scaling.factor": (8.0, "f32"),
        "rope.scaling.original_context_length": (64, "u32")}


def _yarn_metadata() -> dict:
    from gguf.constants import GGUFValueType as V

    types = {"string": V.STRING, "f32": V.FLOAT32, "u32": V.UINT32}
    return {k: (v, types[t]) for k, (v, t) in YARN.items()}


def _ggml_rope_yarn(n_dims: int, base: float, freq_scale: float, n_ctx_orig: int,
                    n_pos: int, attn_factor: float) -> tuple[np.ndarray, np.ndarray]:
    """ggml's CPU rope cache with YaRN, written out from ggml-cpu/ops.cpp in float32:
    ggml_rope_yarn_corr_dims, then rope_yarn per dimension pair, llama.cpp's context
    defaults (ext_factor 1, beta_fast 32, beta_slow 1) and its yarn_attn_factor."""
    f = np.float32
    factor = f(1) / f(freq_scale)
    mscale_ctx = (f(0.1) * np.log(factor) + f(1)) * (f(1) / (f(1) + f(0.1) * np.log(factor)))
    mscale_ctx *= f(attn_factor)

    def corr_dim(beta: float) -> np.float32:
        return f(n_dims) * np.log(f(n_ctx_orig) / (f(beta) * f(2) * f(np.pi))) \
            / (f(2) * np.log(f(base)))
    low = max(f(0), np.floor(corr_dim(32.0)))
    high = min(f(n_dims - 1), np.ceil(corr_dim(1.0)))
    theta_scale = f(base) ** (f(-2.0) / f(n_dims))
    cos = np.empty((n_pos, n_dims // 2), np.float32)
    sin = np.empty_like(cos)
    for p in range(n_pos):
        theta_extrap = f(p)
        for i in range(n_dims // 2):
            interp = f(freq_scale) * theta_extrap
            y = (f(i) - low) / max(f(0.001), high - low)
            ramp = f(1) - min(f(1), max(f(0), y))
            theta = interp * (f(1) - ramp) + theta_extrap * ramp
            m = mscale_ctx * (f(1) + f(0.1) * np.log(f(1) / f(freq_scale)))
            cos[p, i], sin[p, i] = np.cos(theta) * m, np.sin(theta) * m
            theta_extrap = theta_extrap * theta_scale
    return cos, sin


@pytest.fixture(scope="module")
def yarn_llama(tmp_path_factory):
    from tools.synthetic import Shape, write_synthetic_gguf

    path = tmp_path_factory.mktemp("yarn") / "llama-yarn.gguf"
    return write_synthetic_gguf(path, "llama", Shape(), metadata=_yarn_metadata())


def test_yarn_config_and_tables_are_ggml_s(yarn_llama) -> None:
    """The file's YaRN keys read as llama.cpp reads them, and the rope tables equal ggml's
    rope_yarn written out in the test (float32) to its rounding."""
    m = open_model(yarn_llama, dtype="float64")
    cfg = m.cfg
    assert cfg.rope_yarn is not None and cfg.rope_yarn.orig_ctx == 64
    assert cfg.rope_scale == 1 / 8
    from ggufjac.model import rope_tables

    cos, sin = rope_tables(cfg, 0, 40, torch.float64, torch.device("cpu"))
    want_cos, want_sin = _ggml_rope_yarn(cfg.rope_dims, cfg.rope_base, cfg.rope_scale, 64, 40,
                                         cfg.rope_attn_factor)
    np.testing.assert_allclose(cos.numpy(), want_cos, atol=2e-5)
    np.testing.assert_allclose(sin.numpy(), want_sin, atol=2e-5)
    # YaRN is not linear scaling: the high-frequency pairs keep their unscaled angles
    plain = rope_tables(dataclasses.replace(cfg, rope_yarn=None), 0, 40, torch.float64,
                        torch.device("cpu"))[0]
    assert np.abs(plain.numpy() - want_cos).max() > 0.1


def test_yarn_model_matches_llama_cpp(yarn_llama, tmp_path) -> None:
    """An F32 llama file with YaRN rope: our forward pass is llama.cpp's within its noise floor,
    while llama.cpp's own logits for the same weights with linear scaling are far from them
    (so the bound tells the two apart)."""
    from ggufjac.api import nmse
    from tools.synthetic import Shape, write_synthetic_gguf

    m = open_model(yarn_llama, dtype="float64")
    prompt = "the bridge out of Marin is the city of the water and the dog over the fox"
    report = m.check(prompt)
    # measured 2.1e-8 against llama.cpp's own spread of 1.9e-8 (F16 K/V, flash on and off)
    assert report["nmse"] < max(1e-7, 2 * report["noise_floor_nmse"]), report["nmse"]
    metadata = _yarn_metadata()
    metadata["rope.scaling.type"] = ("linear", metadata["rope.scaling.type"][1])
    linear = open_model(write_synthetic_gguf(tmp_path / "linear.gguf", "llama", Shape(),
                                             metadata=metadata), dtype="float64")
    tokens = m.tokenize(prompt)
    assert linear.cfg.rope_yarn is None
    assert nmse(linear.llama_cpp_logits(tokens)[-1],
                m.llama_cpp_logits(tokens)[-1]) > 1e-4


# -- attention sinks -------------------------------------------------------------------------

def test_attention_sinks_join_the_softmax() -> None:
    """Each head's sink logit is one more key without a value: the probabilities are
    exp(s) / (Σ exp(s) + exp(sink)) over the unmasked keys, summing to less than 1, and the
    detached run freezes exactly those values."""
    from ggufjac.linearize import DETACHED, PLAIN, attention_probs

    rng = np.random.default_rng(3)
    heads, n = 3, 5
    scores = rng.standard_normal((heads, n, n)) * 3
    scores[:, ~np.tril(np.ones((n, n), bool))] = -np.inf
    sinks = np.array([-2.0, 0.5, 4.0])
    e = np.exp(scores)
    want = e / (e.sum(-1, keepdims=True) + np.exp(sinks)[:, None, None])
    got = attention_probs(lambda: torch.from_numpy(scores), PLAIN, torch.from_numpy(sinks))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-14, atol=0)
    assert (got.sum(-1) < 1).all() and (got.sum(-1)[2] < got.sum(-1)[0]).all()
    store: dict = {}
    frozen = attention_probs(lambda: torch.from_numpy(scores), DETACHED.recording(store),
                             torch.from_numpy(sinks))
    assert torch.equal(frozen, got) and torch.equal(store["attn_probs"], got)


# -- the gpt-oss family ----------------------------------------------------------------------

GPT_OSS_PROMPT = "the bridge out of Marin is the city of the water"
# small, with MXFP4 experts (rows of 32-value blocks): the window (4) is crossed by the prompt
GPT_OSS_SHAPE_ARGS = dict(n_layer=2, d_model=64, d_ff=128, n_head=4, n_kv_head=2, head_dim=16,
                          n_expert=8, n_expert_used=2, d_ff_expert=32)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """The generator's gpt-oss file, its experts' gate and up biases scaled up so that a
    fair share of the projections pass the SwiGLU's limit of 7 (both clamps active)."""
    from tools.synthetic import Shape, _vocab, _write_f32_or_typed, model_tensors

    shape = Shape(**GPT_OSS_SHAPE_ARGS)
    tensors = model_tensors("gpt-oss", shape, len(_vocab()[0]), seed=0)
    for name in tensors:
        if name.endswith(("ffn_gate_exps.bias", "ffn_up_exps.bias")):
            tensors[name] = tensors[name] * 6
    path = tmp_path_factory.mktemp("gpt-oss") / "gpt-oss-mxfp4.gguf"
    _write_f32_or_typed(path, "gpt-oss", shape, tensors, {"_exps.weight": "MXFP4"})
    return path


def _clamped(store) -> int:
    """How many of the experts' GLU entries a run's coefficients have clamped."""
    return int((1 - store["glu_clamp"]).sum())


def test_gpt_oss_config_is_llama_cpp_s(gpt_oss) -> None:
    m = open_model(gpt_oss)
    cfg = m.cfg
    assert cfg.swa_layers == (True, False) and cfg.sliding_window == 4  # pattern 2
    assert cfg.rope_yarn is not None and cfg.rope_scale == 0.25
    assert (cfg.n_expert, cfg.n_expert_used, cfg.d_ff_expert) == (8, 2, 32)
    types = {t.name: t.tensor_type.name for t in GGUFReader(gpt_oss).tensors}
    assert types["blk.0.ffn_up_exps.weight"] == "MXFP4"
    assert types["blk.0.ffn_up_exps.bias"] == "F32" and "blk.0.attn_sinks.weight" in types
    assert "blk.0.post_attention_norm.weight" in types and "blk.0.ffn_norm.weight" not in types


def test_gpt_oss_matches_llama_cpp(gpt_oss) -> None:
    """Our forward pass against llama.cpp's on the same MXFP4 file: within the check bound
    (measured 3.6e-5 against llama.cpp's own spread of 1.2e-6: llama.cpp also rounds every
    MXFP4 matmul's input to Q8_0, which its own settings do not change, and the anchored run
    below reproduces it to 1e-14); leaving out the sinks alone gives 5e-2."""
    report = open_model(gpt_oss, dtype="float64").check(GPT_OSS_PROMPT)
    assert report["nmse"] < max(1e-3, 4 * report["noise_floor_nmse"]), report["nmse"]
    assert report["top1_agree"] and report["passed"]


@pytest.mark.parametrize("gate_path", ["up", "gate"])
def test_gpt_oss_detached_is_exactly_affine(gpt_oss, gate_path: str) -> None:
    """Float64: J x + c reconstructs the output to 1e-12 on both gate paths, the constant
    (biases, the up path's +1) a sizeable part of it; the forward pass is the plain model's
    bit for bit."""
    from ggufjac.linearize import PLAIN, Linearization

    m = open_model(gpt_oss, dtype="float64")
    tokens = m.tokenize(GPT_OSS_PROMPT)
    lin = Linearization(gate_path=gate_path)
    r = m.jacobian(tokens, lin)
    engine = m.engine(lin)
    record = engine.forward(engine.embed(tokens))
    assert sum(_clamped(record.coefficients[i]) for i in range(m.cfg.n_layer)) > 0
    assert r.reconstruction_rel_error() <= 1e-12
    assert r.constant is not None
    assert r.constant.norm() > 0.01 * r.output.norm()
    x = m.model.embed(tokens)
    with torch.no_grad():
        assert torch.equal(m.model.forward(x, lin), m.model.forward(x, PLAIN))


@pytest.mark.parametrize("change, named", [
    ({"attention.sliding_window": None}, "gpt-oss.attention.sliding_window"),
    ({"rope.scaling.original_context_length": (0, "u32")},
     "gpt-oss.rope.scaling.original_context_length"),
    ({"expert_count": (0, "u32")}, "gpt-oss.expert_count"),
    ({"expert_used_count": (9, "u32")}, "gpt-oss.expert_used_count"),
])
def test_hostile_gpt_oss_metadata_is_refused_naming_the_key(tmp_path, change, named) -> None:
    from gguf.constants import GGUFValueType as V

    from ggufjac.errors import GGUFError
    from tools.synthetic import Shape, write_synthetic_gguf

    metadata = {k: None if v is None else (v[0], {"u32": V.UINT32}[v[1]])
                for k, v in change.items()}
    path = write_synthetic_gguf(tmp_path / "hostile.gguf", "gpt-oss",
                                Shape(**GPT_OSS_SHAPE_ARGS), metadata=metadata)
    with pytest.raises(GGUFError) as e:
        open_model(path)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_gpt_oss_anchored_reproduces_llama_cpp(gpt_oss) -> None:
    """llama.cpp's routing, its experts' swiglu_oai outputs (the clamp masks from its own
    projections), its attention probabilities with the sinks (kq_soft_max; with flash
    attention derived with the sinks added) and its roundings frozen: its logits reproduced
    and the map still affine to 1e-12, on both gate paths."""
    from ggufjac.linearize import Linearization

    m = open_model(gpt_oss, dtype="float64")
    tokens = m.tokenize(GPT_OSS_PROMPT)
    for gate_path, flash in (("gate", False), ("up", True)):
        lin = Linearization(gate_path=gate_path)
        anchor = m.anchor(tokens, lin, RunSettings(flash_attn="on" if flash else "off"))
        assert sum(_clamped(layer) for layer in anchor.layers) > 0  # llama.cpp's clamps
        result = m.jacobian(tokens, lin, anchor=anchor)
        summary = m.anchor_summary(anchor, result.output, result)
        assert result.reconstruction_rel_error() <= 1e-12
        assert summary["anchor_logits_nmse"] <= 1e-10, (gate_path, flash,
                                                         summary["anchor_logits_nmse"])
        assert summary["independent_run"]["logits_nmse"] <= 1e-10
        assert summary["anchor_output_rel_error"] < 1e-6
        assert summary["flash_attn"] is flash and not summary["approximations"]


def test_gpt_4o_byte_level_bpe_vocabulary(tmp_path) -> None:
    """gpt-oss's tokenizer kind (byte-level BPE, pre-tokenizer 'gpt-4o') on a small
    vocabulary: llama.cpp splits numbers into runs of at most three digits before the merges
    ("12345" -> "123" "45", where the merges alone give "12" "34" "5"), words and their
    leading spaces merge as the merges say, and ggufjac turns every token back into its
    bytes: the pieces join to the prompt."""
    from tools.synthetic import Shape, bpe_vocab, write_synthetic_gguf

    path = write_synthetic_gguf(tmp_path / "gpt-oss-bpe.gguf", "gpt-oss",
                                Shape(**GPT_OSS_SHAPE_ARGS), tokenizer="gpt2")
    m = open_model(path)
    tokens, _, _ = bpe_vocab()
    prompt = "the bridge out 12345"
    ids = m.tokenize(prompt)
    pieces = [tokens[i] for i in ids]
    assert pieces == ["the", "\u0120bridge", "\u0120out", "\u0120", "123", "45"], pieces
    assert "".join(m.token_text(i) for i in ids) == prompt


@pytest.mark.parametrize("n_expert", [8, 32])
def test_gpt_oss_router_ties_selected_as_llama_cpp_selects(tmp_path, n_expert: int) -> None:
    """gpt-oss selects on the biased router logits themselves: with every router row zero
    but three equal ones and one bias for all, the logits tie at the top-k boundary and
    llama.cpp's sort alone decides; our selection is its ffn_moe_topk."""
    from ggufjac import llamacpp
    from tools.synthetic import Shape, _vocab, _write_f32_or_typed, model_tensors

    shape = Shape(**{**GPT_OSS_SHAPE_ARGS, "n_expert": n_expert})
    tensors = model_tensors("gpt-oss", shape, len(_vocab()[0]), seed=3)
    rng = np.random.default_rng(0)
    for i in range(shape.n_layer):
        router = np.zeros((n_expert, shape.d_model), np.float32)
        router[[2, 3, n_expert - 3]] = rng.standard_normal(shape.d_model)
        tensors[f"blk.{i}.ffn_gate_inp.weight"] = router
        tensors[f"blk.{i}.ffn_gate_inp.bias"] = np.full(n_expert, 0.5, np.float32)
    path = tmp_path / "ties.gguf"
    _write_f32_or_typed(path, "gpt-oss", shape, tensors, None)
    m = open_model(path, dtype="float32")
    tokens = m.tokenize(GPT_OSS_PROMPT)
    names = [f"ffn_moe_topk-{i}" for i in range(shape.n_layer)]
    ref = llamacpp.evaluate(path, tokens, capture=names)
    engine = m.engine()
    record = engine.forward(engine.embed(tokens))
    for i, name in enumerate(names):
        theirs = ref.captured[name].reshape(len(tokens), -1)
        assert np.array_equal(record.coefficients[i]["moe_experts"].numpy(), theirs), i


@pytest.mark.parametrize("tensor", ["blk.1.ffn_down_exps.bias", "blk.0.ffn_gate_inp.bias",
                                    "blk.0.attn_sinks.weight"])
def test_gpt_oss_without_a_required_tensor_is_refused_naming_it(tmp_path, tensor) -> None:
    """llama.cpp requires gpt-oss's sinks and its output, router and expert biases: a file
    without one is refused, naming it, not read as if it were 0."""
    from ggufjac.errors import GGUFError
    from tools.synthetic import Shape, _vocab, _write_f32_or_typed, model_tensors

    shape = Shape(**GPT_OSS_SHAPE_ARGS)
    tensors = model_tensors("gpt-oss", shape, len(_vocab()[0]), seed=0)
    del tensors[tensor]
    path = tmp_path / "missing.gguf"
    _write_f32_or_typed(path, "gpt-oss", shape, tensors, None)
    with pytest.raises(GGUFError) as e:
        open_model(path)
    assert repr(tensor) in str(e.value) and "\n" not in str(e.value)
