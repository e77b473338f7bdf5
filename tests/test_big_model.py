"""The big-model generator (tools/big_model.py) at tiny shapes: valid, llama.cpp-loadable,
and in the type mix llama.cpp's own Q4_K_M quantizer chooses."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from ggufjac import llamacpp
from ggufjac.api import open_model
from ggufjac.gguf_file import GGUFFile
from ggufjac.layout import validate_file
from tools.big_model import PRESETS, BigModel, smaller, write_big_gguf
from tools.synthetic import LLAMA_FTYPES, Shape, write_synthetic_gguf

TINY = Shape(n_layer=8, d_model=256, d_ff=512, n_head=2, n_kv_head=1, head_dim=128,
             context_length=512)
MODELS = {"llama": BigModel("llama", TINY, 2048, tied=False, rope_freqs=True),
          "qwen3": BigModel("qwen3", TINY, 2048, tied=False, rope_freqs=False)}


# The mixture-of-experts presets at tiny shapes: their type mixes, tokenizers and metadata
# (windows, YaRN) as written at full size, only the sizes smaller
TINY_MOE = {
    "qwen3-30b-a3b": replace(smaller(PRESETS["qwen3-30b-a3b"], layers=8, experts=4),
                             vocab_size=2048),
    "gpt-oss-20b": replace(smaller(PRESETS["gpt-oss-20b"], layers=4, experts=4),
                           vocab_size=2048),
}
TINY_MOE = {name: replace(m, shape=replace(m.shape, d_model=256, d_ff=256, n_head=4,
                                           n_kv_head=2, head_dim=64, d_ff_expert=256,
                                           n_expert_used=2))
            for name, m in TINY_MOE.items()}


@pytest.mark.parametrize("preset", sorted(TINY_MOE))
def test_moe_presets_load_in_llama_cpp_and_ggufjac_and_agree(tmp_path, preset: str) -> None:
    model = TINY_MOE[preset]
    path = write_big_gguf(tmp_path / f"{preset}.gguf", model)
    g, cfg = validate_file(path)
    types = {name: t.type.name for name, t in g.tensors.items()}
    g.close()
    assert (cfg.n_layer, cfg.n_expert, cfg.n_expert_used, cfg.vocab_size) == \
        (model.shape.n_layer, 4, 2, 2048)
    # the stacks and the router stored as the preset's mix says, read back by gguf-py's
    # reader (an independent parser of the header)
    from gguf import GGUFReader
    reader = GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    assert [int(n) for n in by_name["blk.0.ffn_gate_exps.weight"].shape][::-1] == [4, 256, 256]
    assert by_name["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    expert_type = {"qwen3-30b-a3b": "Q4_K", "gpt-oss-20b": "MXFP4"}[preset]
    assert by_name["blk.1.ffn_up_exps.weight"].tensor_type.name == expert_type
    assert types["blk.1.ffn_up_exps.weight"] == expert_type
    if preset == "gpt-oss-20b":
        assert by_name["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
        assert "blk.0.ffn_down_exps.bias" in by_name and "blk.0.attn_sinks.weight" in by_name
    m = open_model(path)
    report = m.check("the bridge out of Marin is the", noise_floor=False)
    assert report["passed"], report["verdict"]  # the same weights, read by both
    assert report["nmse"] < 1e-2


@pytest.mark.parametrize("preset", ["qwen3-30b-a3b"])
def test_moe_type_mix_is_llama_cpps_q4_k_m(tmp_path, preset: str) -> None:
    """The expert stacks and router against llama.cpp's quantizer on a float model of the
    same shape."""
    model = TINY_MOE[preset]
    f32 = write_synthetic_gguf(tmp_path / "f32.gguf", model.arch, model.shape, "F32")
    types = _types_against_llama_cpps_q4_k_m(tmp_path, model, f32)
    assert any(t == "Q6_K" for n, t in types.items() if "ffn_down_exps" in n)


def _types_against_llama_cpps_q4_k_m(tmp_path, model, f32) -> dict[str, str]:
    """The types `write_big_gguf` gives `model`'s layer matrices and output, asserted equal
    to those llama.cpp's Q4_K_M quantizer gives the float model `f32` of the same shape."""
    big = write_big_gguf(tmp_path / "big.gguf", model)
    ref_path = tmp_path / "q4km.gguf"
    llamacpp.quantize(f32, ref_path, LLAMA_FTYPES["Q4_K_M"])
    with GGUFFile(big) as ours, GGUFFile(ref_path) as ref:
        names = [n for n in ref.tensors if n.startswith("blk.") or n == "output.weight"]
        assert names and set(names) <= set(ours.tensors)
        differ = {n: (ours.tensors[n].type.name, ref.tensors[n].type.name) for n in names
                  if ours.tensors[n].type != ref.tensors[n].type}
        assert not differ, differ
        return {n: ours.tensors[n].type.name for n in names}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_big_model_is_valid_and_llama_cpp_runs_it(tmp_path, arch: str) -> None:
    path = write_big_gguf(tmp_path / f"{arch}.gguf", MODELS[arch])
    g, cfg = validate_file(path)
    g.close()
    assert cfg.n_layer == 8 and cfg.vocab_size == 2048 and not cfg.tied_embeddings
    m = open_model(path)
    report = m.check("the bridge out of Marin is the", noise_floor=False)
    assert report["passed"], report["verdict"]  # the same weights, read by both
    assert report["nmse"] < 1e-2


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_type_mix_is_llama_cpps_q4_k_m(tmp_path, arch: str) -> None:
    """Against llama.cpp's quantizer on a float model of the same shape."""
    f32 = write_synthetic_gguf(tmp_path / "f32.gguf", arch, TINY, "F32",
                               rope_freqs=MODELS[arch].rope_freqs)
    types = _types_against_llama_cpps_q4_k_m(tmp_path, MODELS[arch], f32)
    assert any(t == "Q6_K" for n, t in types.items() if ".attn_v." in n)


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch) -> None:
    """The benchmarks reuse an existing file: a half-written one must not exist to be reused."""
    import tools.big_model as big_model

    write = big_model.GGUFWriter.write_tensor_data
    calls = []

    def interrupted(self, *args, **kwargs):  # Ctrl-C while the third tensor is written
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return write(self, *args, **kwargs)
    monkeypatch.setattr(big_model.GGUFWriter, "write_tensor_data", interrupted)
    with pytest.raises(KeyboardInterrupt) as caught:
        write_big_gguf(tmp_path / "big.gguf", MODELS["llama"])
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []
    # nor is the removed file still open while the error is being reported (its traceback,
    # alive here in `caught`, holds the writer): it would keep its blocks, and on a full
    # disk with them the room the error message needs
    assert caught.traceback and not [f for f in _open_files() if str(tmp_path) in f]


def _open_files() -> list[str]:
    """What this process's file descriptors point to (Linux)."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor of the listing itself, closed by now
            pass
    return paths
