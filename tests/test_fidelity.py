"""Our torch Gemma 3 against llama.cpp's own forward pass on the real model."""

from __future__ import annotations

import pytest
import torch

from ggufjac import llamacpp
from ggufjac.api import nmse

PROMPTS = [
    "The bridge out of Marin is the",
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "In 1492, Columbus sailed across the",
    "The quick brown fox jumps over the lazy",
    "1, 2, 3, 4, 5,",
    "Photosynthesis converts sunlight into",
]
# Measured on this model (float32, `python tools/fidelity_table.py --real`): last-position logits
# nmse 2.6e-4 ... 2.9e-3 over ten prompts, while llama.cpp itself moves by 2.4e-4 ... 8e-3
# between its flash-attention on and off runs. The gap comes from llama.cpp quantizing
# activations to Q8 inside quantized matmuls and holding K/V in F16. 5e-3 leaves ~1.7x headroom
# over the worst measured prompt and is still 20x tighter than a wrong port (a missing
# Gemma sqrt(d) scale or a wrong rope base gives nmse > 0.1).
LOGITS_NMSE_BOUND = 5e-3
# Per-layer residual streams (all positions): measured 5e-6 ... 1.7e-3.
LAYER_NMSE_BOUND = 5e-3


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_llama_cpp(gemma32, prompt: str) -> None:
    report = gemma32.check(prompt, layers=True, noise_floor=False)
    assert report["nmse"] < LOGITS_NMSE_BOUND, report["nmse"]
    if report["llama_cpp_margin"] > 0.1:
        assert report["top1_agree"], (report["ours_top1"], report["llama_cpp_top1"])
    assert max(report["layer_nmse"]) < LAYER_NMSE_BOUND, report["layer_nmse"]
    assert report["passed"]


def test_bridge_near_tie_is_reported_not_failed(gemma32) -> None:
    report = gemma32.check("The bridge out of Marin is the", noise_floor=True)
    assert report["llama_cpp_top1"] == " first"
    assert report["llama_cpp_margin"] < 0.1
    assert report["passed"]  # a flip inside a near-tie does not fail the check
    assert 0 < report["noise_floor_nmse"] < 1e-2


def test_wrong_model_is_caught(gemma32, bridge_tokens) -> None:
    """The check has teeth: dropping Gemma's sqrt(d) input scale breaks the match."""
    m = gemma32.model
    ref = llamacpp.evaluate(gemma32.path, bridge_tokens)
    from ggufjac.linearize import PLAIN

    with torch.no_grad():
        y = m.forward(m.weights.embedding_rows(bridge_tokens), PLAIN)
        z = m.logits(y[-1]).numpy()
    assert nmse(z, ref.logits[-1]) > 10 * LOGITS_NMSE_BOUND


def test_tokens_match_llama_cpp_bos(gemma32, bridge_tokens) -> None:
    assert bridge_tokens[0] == gemma32.gguf.get("tokenizer.ggml.bos_token_id")
    assert [gemma32.token_text(t) for t in bridge_tokens[1:]] == \
        ["The", " bridge", " out", " of", " Marin", " is", " the"]
