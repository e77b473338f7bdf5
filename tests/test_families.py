"""Every supported family, on synthetic GGUFs of several quant types, against llama.cpp."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gguf.constants import GGUFValueType

from ggufjac import families, llamacpp
from ggufjac.api import nmse, open_model
from ggufjac.errors import GGUFError, UnsupportedModelError
from ggufjac.linearize import DETACHED, PLAIN, Linearization
from tools.synthetic import Shape, write_synthetic_gguf

ARCHS = ["llama", "qwen3", "gemma3", "phi3", "olmo2"]
QUANTS = ["F32", "F16", "Q8_0", "Q4_0", "Q4_K_M", "Q6_K"]
# Families whose differences from the others are only rows of data (families.py): Gemma 2's
# soft-caps and alternating windows, Granite's multipliers, SmolLM3's layers without rope.
DATA_FAMILIES = ["gemma2", "granite", "smollm3"]
PROMPT = "the bridge out of Marin"  # 25 tokens with the synthetic vocabulary
# Measured (tools/fidelity_table.py): with F32/F16 weights our float64 model matches
# llama.cpp's last-position logits at nmse 3e-8 ... 4e-7 (llama.cpp keeps K/V in F16).
EXACT_WEIGHTS_BOUND = 1e-5
# With quantized weights llama.cpp also quantizes activations inside its matmuls: measured
# 7e-5 ... 4.2e-4 on these models. The bound is 1e-2.
QUANTIZED_BOUND = 1e-2


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_family_matches_llama_cpp_and_linearizes(synthetic, arch: str, quant: str) -> None:
    path = synthetic(arch, quant)
    m = open_model(path, dtype="float64")
    if quant == "Q4_K_M":
        assert "Q4_K" in {t.type.name for t in m.gguf.tensors.values()}
    tokens = m.tokenize(PROMPT)
    ref = llamacpp.evaluate(path, tokens)
    ours = m.logits(tokens).numpy()
    bound = EXACT_WEIGHTS_BOUND if quant in ("F32", "F16") else QUANTIZED_BOUND
    assert nmse(ours[-1], ref.logits[-1]) < bound
    assert ours[-1].argmax() == ref.logits[-1].argmax()

    x = m.model.embed(tokens)
    with torch.no_grad():
        plain = m.model.forward(x, PLAIN)
        for lin in (DETACHED, Linearization(gate_path="gate")):
            assert torch.equal(m.model.forward(x, lin), plain)
    assert m.jacobian(tokens).reconstruction_rel_error() <= 1e-12
    m32 = open_model(path, dtype="float32")
    assert m32.jacobian(tokens).reconstruction_rel_error() <= 1e-5


def test_per_layer_hidden_states_match(synthetic) -> None:
    for arch in ARCHS + DATA_FAMILIES:
        path = synthetic(arch, "F32")
        m = open_model(path, dtype="float64")
        tokens = m.tokenize(PROMPT)
        ref = llamacpp.evaluate(path, tokens,
                                capture=[f"l_out-{i}" for i in range(m.cfg.n_layer)])
        hidden: list[torch.Tensor] = []
        m.logits(tokens, hidden)
        theirs_all = ref.layer_outputs(m.cfg.n_layer)
        assert m.cfg.n_layer >= 1 and len(hidden) == len(theirs_all) == m.cfg.n_layer, arch
        for h, theirs in zip(hidden, theirs_all):
            assert tuple(h.shape) == theirs.shape == (len(tokens), m.cfg.d_model), arch
            assert nmse(h.numpy(), theirs) < EXACT_WEIGHTS_BOUND, arch


@pytest.mark.parametrize("arch,change,loads", [
    ("llama", {"rope_factors": ()}, True),          # ignore Llama 3.1 rope_freqs
    ("llama", {"rope_neox": True}, True),           # wrong rotary pairing
    ("qwen3", {"qk_norm": "none"}, True),           # drop the QK-norm
    ("olmo2", {"norm_layout": "sandwich"}, False),  # wrong norm placement (refused)
    ("gemma3", {"swa_pattern": 0}, True),           # no sliding window (prompt crosses it)
    ("gemma2", {"swa_pattern": 0}, True),
    ("gemma2", {"attn_logit_softcap": None}, True),  # no cap on the attention scores
    ("gemma2", {"final_logit_softcap": False}, True),  # no cap on the logits
    ("granite", {"multipliers": False}, True),      # no embedding/residual/score/logit scales
    ("smollm3", {"no_rope_layer_step": 0}, True),   # rope in layer 3 too
])
def test_family_details_matter(synthetic, monkeypatch, arch: str, change: dict,
                               loads: bool) -> None:
    """Each family detail is checked by the comparison: changing it breaks the match (or,
    for a wrong layout, the file is refused by name: its tensors are not those expected)."""
    path = synthetic(arch, "F32")
    monkeypatch.setitem(families.FAMILIES, arch,
                        dataclasses.replace(families.FAMILIES[arch], **change))
    if not loads:
        with pytest.raises(GGUFError) as refused:
            open_model(path, dtype="float64")
        e = refused.value
        assert e.what.startswith("tensor 'blk.") and \
            (e.detail == "required tensor is missing" or "expected shape" in e.detail), e
        return
    m = open_model(path, dtype="float64")
    tokens = m.tokenize(PROMPT)
    ref = llamacpp.evaluate(path, tokens)
    assert nmse(m.logits(tokens).numpy()[-1], ref.logits[-1]) > 1e-3


@pytest.mark.parametrize("change", [None, "no_attn_factor", "no_factors", "full_rotary"])
# full_rotary runs on a file without factor tensors (their length is tied to rope_dims)
def test_phi4_mini_longrope_matches_llama_cpp(tmp_path_factory, monkeypatch, change) -> None:
    """A Phi-4-mini-like file: partial rotary (32 of 64 dims), LongRoPE short/long factor
    tensors and rope.scaling.attn_factor 1.19. Matches llama.cpp; dropping any of the three
    breaks the match."""
    path = tmp_path_factory.mktemp("phi4") / "phi4mini.gguf"
    write_synthetic_gguf(path, "phi3", Shape(rope_dims=32), "F32",
                         rope_freqs=change != "full_rotary",
                         extra_floats={"rope.scaling.attn_factor": 1.19})
    original = families.config_from_gguf
    if change == "no_attn_factor":
        monkeypatch.setattr("ggufjac.families.config_from_gguf", lambda g: dataclasses.replace(
            original(g), rope_attn_factor=1.0))
    elif change == "full_rotary":
        monkeypatch.setattr("ggufjac.families.config_from_gguf", lambda g: dataclasses.replace(
            original(g), rope_dims=64))
    elif change == "no_factors":
        monkeypatch.setitem(families.FAMILIES, "phi3",
                            dataclasses.replace(families.FAMILIES["phi3"], rope_factors=()))
    import ggufjac.api
    monkeypatch.setattr(ggufjac.api, "config_from_gguf", families.config_from_gguf)
    m = open_model(path, dtype="float64")
    assert m.cfg.rope_dims == (64 if change == "full_rotary" else 32)
    tokens = m.tokenize(PROMPT)
    ref = llamacpp.evaluate(path, tokens)
    error = nmse(m.logits(tokens).numpy()[-1], ref.logits[-1])
    if change is None:
        assert error < EXACT_WEIGHTS_BOUND
        assert m.jacobian(tokens).reconstruction_rel_error() <= 1e-12
    else:
        assert error > 1e-3, change


def test_unsupported_architecture_is_named(tmp_path) -> None:
    from gguf import GGUFWriter
    import numpy as np

    path = tmp_path / "mamba.gguf"
    w = GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UnsupportedModelError) as e:
        open_model(path)
    assert "mamba" in str(e.value) and "llama" in str(e.value) and "gemma3" in str(e.value)


def test_bias_on_linear_path_is_refused(tmp_path) -> None:
    from gguf import GGUFReader, GGUFWriter
    import numpy as np

    src = write_synthetic_gguf(tmp_path / "src.gguf", "llama", Shape(n_layer=1))
    r = GGUFReader(str(src))
    path = tmp_path / "bias.gguf"
    w = GGUFWriter(str(path), "llama")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        value = f.contents()
        vtype = f.types[0]
        if vtype.name == "ARRAY":
            w.add_key_value(f.name, value, vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, value, vtype)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))))
    w.add_tensor("blk.0.attn_v.bias", np.ones(128, dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UnsupportedModelError) as e:
        open_model(path)
    assert "blk.0.attn_v.bias" in str(e.value)


def test_info_reports_support_and_estimates(synthetic, tmp_path) -> None:
    from click.testing import CliRunner
    from gguf import GGUFWriter
    import numpy as np

    from ggufjac.cli import main

    ok = CliRunner().invoke(main, ["info", str(synthetic("phi3", "Q4_K_M"))])
    assert ok.exit_code == 0, ok.output
    assert "architecture   phi3" in ok.output and "Q4_K x" in ok.output
    assert "one layer" in ok.output and "jacobian" in ok.output and "supported      yes" in ok.output
    path = tmp_path / "rwkv.gguf"
    w = GGUFWriter(str(path), "rwkv6")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    no = CliRunner().invoke(main, ["info", str(path)])
    assert no.exit_code == 0 and "supported      no" in no.output and "rwkv6" in no.output


@pytest.mark.parametrize("arch", sorted(families.FAMILIES))
def test_generators_write_valid_files_from_the_layout_table(tmp_path, arch: str) -> None:
    """Both synthetic generators take a family's tensors from ggufjac's layout table, so what
    they write passes the validation every command runs (the random-Q4_K writer once wrote
    files that failed it for four families)."""
    from ggufjac.layout import dims_of, stored_bias_shapes_of, stored_shapes, validate_file
    from tools.synthetic import write_random_q4_k_gguf

    shape = Shape(n_layer=2, d_model=256, d_ff=512, n_head=2, n_kv_head=1, head_dim=128)
    for path in (write_random_q4_k_gguf(tmp_path / "q4k.gguf", arch, shape),
                 write_synthetic_gguf(tmp_path / "f32.gguf", arch, shape, "F32")):
        g, cfg = validate_file(path)
        with g:
            have = {n.removeprefix("blk.1.") for n in g.tensors if n.startswith("blk.1.")}
            biases = stored_bias_shapes_of(cfg.family, dims_of(cfg))
            assert have == {f"{n}.weight" for n in stored_shapes(cfg)} \
                | {f"{n}.bias" for n in biases}, (arch, path.name)


# Each on the float weights and a quantized type: the float64 model within llama.cpp's
# noise floor, exactly linear on both gate paths.
@pytest.mark.parametrize("quant", ["F32", "Q4_K_M"])
@pytest.mark.parametrize("arch", DATA_FAMILIES)
def test_data_family_matches_llama_cpp_on_both_gate_paths(synthetic, arch: str,
                                                          quant: str) -> None:
    path = synthetic(arch, quant)
    m = open_model(path, dtype="float64")
    tokens = m.tokenize(PROMPT)
    ref = llamacpp.evaluate(path, tokens)
    ours = m.logits(tokens).numpy()
    assert nmse(ours[-1], ref.logits[-1]) < (EXACT_WEIGHTS_BOUND if quant == "F32"
                                             else QUANTIZED_BOUND)
    assert ours[-1].argmax() == ref.logits[-1].argmax()
    for gate_path in ("up", "gate"):
        result = m.jacobian(tokens, Linearization(gate_path=gate_path))
        assert result.reconstruction_rel_error() <= 1e-12, gate_path



_U32, _F32, _F64 = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.FLOAT64
_SMALL = Shape(n_layer=3, d_model=64, d_ff=128, n_head=2, n_kv_head=1, head_dim=32,
               context_length=64)


@pytest.mark.parametrize("arch, metadata, settings", [
    # llama.cpp's caps where the file is silent (src/models/gemma2.cpp, llama-hparams.h)
    ("gemma2", {"attn_logit_softcapping": None, "final_logit_softcapping": None},
     {"attn_logit_softcap": 50.0, "final_logit_softcap": 30.0}),
    # set_swa_pattern(3): the last of every 3 layers global; local layers' own rope base
    ("gemma2", {"attention.sliding_window_pattern": (3, _U32),
                "rope.freq_base_swa": (100.0, _F32)},
     {"swa_layers": (True, True, False), "rope_swa": (100.0, 1.0)}),
    ("gemma2", {"attention.sliding_window_pattern": (0, _U32)},  # 0: every layer slides
     {"swa_layers": (True, True, True)}),
    # Granite's switch: rope.scaling.finetuned false turns rope off in every layer
    ("granite", {"rope.scaling.finetuned": (False, GGUFValueType.BOOL)},
     {"no_rope_layers": frozenset({0, 1, 2})}),
    # a multiplier of 0 is llama.cpp's "none" (the score scale then 1/sqrt(head_dim))
    ("granite", {"embedding_scale": (0.0, _F32), "residual_scale": (0.0, _F32),
                 "attention.scale": (0.0, _F32)},
     {"embed_scale": 1.0, "residual_scale": 1.0, "attn_scale": 1 / 32 ** 0.5}),
])
def test_family_metadata_read_as_llama_cpp_reads_it(tmp_path, arch: str, metadata: dict,
                                                    settings: dict) -> None:
    path = write_synthetic_gguf(tmp_path / f"{arch}.gguf", arch, _SMALL, "F32",
                                metadata=metadata)
    m = open_model(path, dtype="float64")
    assert {k: getattr(m.cfg, k) for k in settings} == settings
    tokens = m.tokenize(PROMPT)
    ref = llamacpp.evaluate(path, tokens)
    assert nmse(m.logits(tokens).numpy()[-1], ref.logits[-1]) < EXACT_WEIGHTS_BOUND


@pytest.mark.parametrize("arch, key, value", [
    ("gemma2", "attn_logit_softcapping", (-50.0, _F32)),
    ("gemma2", "attn_logit_softcapping", (float("nan"), _F32)),
    ("gemma2", "final_logit_softcapping", (0.0, _F32)),  # always applied: tanh(z / 0)
    ("gemma2", "final_logit_softcapping", (30.0, _F64)),  # llama.cpp reads float32 only
    ("gemma2", "attention.sliding_window", (0, _U32)),  # Gemma 2 always slides
    ("gemma2", "attention.sliding_window_pattern", ("2", GGUFValueType.STRING)),
    ("gemma2", "rope.freq_base_swa", (0.5, _F32)),
    ("granite", "logit_scale", None),  # required by llama.cpp
    ("granite", "logit_scale", (0.0, _F32)),  # the logits are divided by it
    ("granite", "residual_scale", (-0.2, _F32)),
    ("granite", "embedding_scale", (float("inf"), _F32)),
    ("granite", "attention.scale", (float("nan"), _F32)),
    ("granite", "rope.scaling.finetuned", (1, _U32)),  # llama.cpp reads a boolean only
])
def test_hostile_family_metadata_is_refused(tmp_path, arch: str, key: str, value) -> None:
    path = write_synthetic_gguf(tmp_path / "m.gguf", arch, _SMALL, "F32", metadata={key: value})
    with pytest.raises(GGUFError) as e:
        open_model(path)
    assert f"{arch}.{key}" in str(e.value) and str(path) in str(e.value)


def test_gemma2_with_an_output_tensor_is_refused_as_llama_cpp_refuses_it(tmp_path,
                                                                         monkeypatch) -> None:
    """Gemma 2 always unembeds with token_embd: llama.cpp fails to load a file that also has
    output.weight, and ggufjac refuses it by name rather than explain another model."""
    import tools.synthetic
    from ggufjac.errors import LlamaCppError

    monkeypatch.setitem(tools.synthetic.TIED, "gemma2", False)
    path = write_synthetic_gguf(tmp_path / "g2.gguf", "gemma2", _SMALL, "F32")
    with pytest.raises(LlamaCppError):
        llamacpp.evaluate(path, [1, 30, 31])
    with pytest.raises(GGUFError) as e:
        open_model(path)
    assert "output.weight" in str(e.value) and str(path) in str(e.value)
