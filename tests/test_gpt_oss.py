"""The pieces gpt-oss needs: MXFP4 weights, attention sinks, its clamped SwiGLU, YaRN rope,
each against an independent reference (gguf-py, llama.cpp, a float64 formula, autograd)."""

from __future__ import annotations

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
