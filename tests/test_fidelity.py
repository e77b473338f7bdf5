"""Our torch Gemma 3 against llama.cpp's own forward pass on the real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ggufjac import llamacpp
from ggufjac.llamacpp import RunSettings
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
    """Against llama.cpp's default run (weights repacked, flash attention on), within the
    bound above or twice llama.cpp's own spread over the settings users flip, whichever is
    larger: measured 9.3e-3 for the fox prompt against a noise floor of 7.3e-3 (AVX-512
    machine); a wrong port is above 0.1."""
    report = gemma32.check(prompt, layers=True, noise_floor=True)
    bound = max(LOGITS_NMSE_BOUND, 2 * report["noise_floor_nmse"])
    assert report["nmse"] < bound, (report["nmse"], report["noise_floor"])
    if report["llama_cpp_margin"] > 0.1:
        assert report["top1_agree"], (report["ours_top1"], report["llama_cpp_top1"])
    assert max(report["layer_nmse"]) < LAYER_NMSE_BOUND, report["layer_nmse"]
    assert report["passed"]


def test_bridge_prompt_passes_whichever_run(gemma32) -> None:
    """llama.cpp's top two on the bridge prompt (' first', ' only') are close: which wins,
    and by how much, depends on the run (flash attention, the CPU's kernels). Every run
    passes; a top-1 that differs does so only inside llama.cpp's own near-tie."""
    for flash in ("on", "off"):
        report = gemma32.check("The bridge out of Marin is the",
                               settings=RunSettings(flash_attn=flash), noise_floor=flash == "on")
        assert {report["llama_cpp_top1"], report["ours_top1"]} <= {" first", " only"}
        assert report["passed"], report["verdict"]
        if not report["top1_agree"]:
            assert report["llama_cpp_margin"] <= 0.1 and "near-tie" in report["verdict"]
        if flash == "on":
            assert 0 < report["noise_floor_nmse"] < 1e-2


@pytest.mark.parametrize("margin,passes", [(0.05, True), (0.5, False)])
def test_near_tie_rule(gemma32, monkeypatch, margin: float, passes: bool) -> None:
    """A llama.cpp whose top two are our top two swapped, `margin` apart: inside a near-tie
    (<= 0.1) the flip is reported and passes; outside it fails, saying why."""
    tokens = gemma32.tokenize("The capital of France is")
    ours = gemma32.logits(tokens).numpy()
    theirs = ours.copy()
    first, second = np.argsort(-ours[-1])[:2]
    theirs[-1, second] = ours[-1, first] + margin
    real = llamacpp.evaluate

    def swapped(path, toks, settings=RunSettings(), **kw):  # noqa: ANN001
        run = real(path, toks, settings, **kw)
        run.logits = theirs
        return run
    monkeypatch.setattr(llamacpp, "evaluate", swapped)
    report = gemma32.check("The capital of France is", noise_floor=False)
    assert not report["top1_agree"] and abs(report["llama_cpp_margin"] - margin) < 1e-4
    assert report["passed"] is passes
    assert ("near-tie" in report["verdict"]) is passes
    assert passes or "top-1 differs" in report["verdict"]


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
