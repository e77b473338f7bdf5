"""llama.cpp run as its own tools run it: default buffer types (repacked weights), flash
attention as "auto" decides, prompts in micro-batches; the anchored map explains that run,
checked against llama-cpp-python's `Llama()` started separately."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from ggufjac import llamacpp
from ggufjac.api import nmse, open_model
from ggufjac.errors import LlamaCppError
from ggufjac.linearize import Linearization
from ggufjac.llamacpp import RunSettings
from ggufjac.runner import unembed

from conftest import AMX, BRIDGE

REPACK = not AMX  # llama.cpp's default here (conftest: repacking off on AMX CPUs)

GEMMA_PROMPTS = [BRIDGE, "The capital of France is", "The quick brown fox jumps over the lazy"]
PROMPT = "the bridge out of Marin"
# The bounds for the anchored map against an independent default run (float64).
OUTPUT_BOUND, LOGITS_BOUND = 1e-6, 1e-10


def _llama_logits(path, tokens: list[int], flash_attn: bool, repack: bool = REPACK
                  ) -> np.ndarray | int:
    """The last position's logits of llama-cpp-python's high-level `Llama()` (the prompt
    decoded with the last logits only), in a process of its own: with its defaults (weights
    repacked), or with llama.cpp's model defaults patched to no extra buffer types. A
    process killed by a signal returns the (negative) return code instead."""
    patch = ("" if repack else
             "import llama_cpp.llama_cpp as low\n"
             "d = low.llama_model_default_params\n"
             "def nd():\n    p = d(); p.use_extra_bufts = False; return p\n"
             "low.llama_model_default_params = nd\n")
    code = ("import sys, json, numpy as np, llama_cpp\n" + patch +
            "path, tokens, fa, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == '1', sys.argv[4]\n"
            "llm = llama_cpp.Llama(model_path=path, flash_attn=fa, verbose=False)\n"
            "llm.eval(tokens)\n"
            "np.save(out, np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)))\n")
    out = f"{path}.{len(tokens)}.{int(flash_attn)}.{int(repack)}.npy"
    p = subprocess.run([sys.executable, "-c", code, str(path), json.dumps(tokens),
                        "1" if flash_attn else "0", out], capture_output=True, timeout=300)
    if p.returncode < 0:
        return p.returncode
    assert p.returncode == 0, p.stderr[-2000:]
    return np.load(out)


@pytest.mark.parametrize("prompt", GEMMA_PROMPTS)
def test_anchored_map_explains_the_default_llama_cpp_run(gemma64, prompt: str, tmp_path) -> None:
    tokens = gemma64.tokenize(prompt)
    for flash in (True, False):
        reference = _llama_logits(gemma64.path, tokens, flash)
        anchor = gemma64.anchor(tokens, Linearization(),
                                RunSettings(flash_attn="on" if flash else "off"))
        assert anchor.flash_attn is flash and anchor.resolved["repack"] is REPACK
        engine = gemma64.engine(anchor=anchor)
        y = engine.forward(engine.embed(tokens)).output[-1]
        summary = gemma64.anchor_summary(anchor, y)
        ours = unembed(gemma64.weights, gemma64.logit_input(y, anchor)[None])[0].numpy()
        assert nmse(ours, reference) <= LOGITS_BOUND, (prompt, flash)
        assert summary["anchor_logits_nmse"] <= LOGITS_BOUND
        assert summary["anchor_output_rel_error"] <= OUTPUT_BOUND
        default = summary["independent_run"]
        assert default["logits_nmse"] <= LOGITS_BOUND
        assert default["output_rel_error"] <= OUTPUT_BOUND
        assert default["llama_cpp_resolved"]["repack"] is REPACK


def test_our_default_run_is_the_one_llama_cpp_python_makes(gemma32, bridge_tokens) -> None:
    """Weights repacked by default: llama.cpp's logits equal `Llama()`'s; without
    repacking they are another run (on a CPU with repacking kernels)."""
    for flash in (True, False):
        reference = _llama_logits(gemma32.path, bridge_tokens, flash, repack=True)
        fa = "on" if flash else "off"
        try:
            ours = llamacpp.evaluate(gemma32.path, bridge_tokens,
                                     RunSettings(flash_attn=fa, repack=True))
        except LlamaCppError as e:  # the repacked path crashes on this CPU (AMX on a VM):
            assert AMX and isinstance(reference, int)  # so does llama-cpp-python's own
            assert "crashed" in str(e) and "--no-repack" in str(e)
            continue
        assert nmse(ours.logits[-1], reference) <= 1e-12
        plain = llamacpp.evaluate(gemma32.path, bridge_tokens,
                                  RunSettings(flash_attn=fa, repack=False))
        assert "CPU_REPACK" not in plain.resolved["weight_buffers_mib"]
        if "CPU_REPACK" in ours.resolved["weight_buffers_mib"]:
            assert nmse(plain.logits[-1], reference) > 1e-8


def test_run_records_its_settings(gemma32, bridge_tokens) -> None:
    run = llamacpp.evaluate(gemma32.path, bridge_tokens)
    r = run.resolved
    assert r["n_ubatch"] == 512 and r["n_batch"] == 2048 and r["repack"] is REPACK
    assert "AVX" in r["system_info"] or "NEON" in r["system_info"]
    assert r["llama_cpp_python"] and r["threads"] >= 1
    # "auto" resolves to what the graph shows: with flash attention there are no
    # kq_soft_max nodes
    listed = llamacpp.evaluate(gemma32.path, bridge_tokens, list_names=True)
    assert listed.flash_attn is (not any(n.startswith("kq_soft_max") for n in listed.names))
    off = llamacpp.evaluate(gemma32.path, bridge_tokens, RunSettings(flash_attn="off"),
                            list_names=True)
    assert not off.flash_attn and any(n.startswith("kq_soft_max") for n in off.names)


@pytest.mark.parametrize("flash", ["on", "off"])
def test_prompt_longer_than_one_ubatch_anchors(gemma64, bridge_tokens, flash: str) -> None:
    """Micro-batches of 3 tokens: the 8-token prompt is evaluated in three graphs, whose
    captured tensors are joined (probabilities padded over the keys of later ones)."""
    settings = RunSettings(flash_attn=flash, n_ubatch=3)
    whole = llamacpp.evaluate(gemma64.path, bridge_tokens, RunSettings(flash_attn=flash))
    anchor = gemma64.anchor(bridge_tokens, Linearization(), settings)
    assert anchor.resolved["n_ubatch"] == 3
    engine = gemma64.engine(anchor=anchor)
    y = engine.forward(engine.embed(bridge_tokens)).output[-1]
    summary = gemma64.anchor_summary(anchor, y)
    assert summary["anchor_logits_nmse"] <= 1e-12
    assert summary["independent_run"]["logits_nmse"] <= LOGITS_BOUND
    # micro-batching is another run of llama.cpp, close to the one-graph run
    assert 0 <= nmse(anchor.logits[-1], whole.logits[-1]) < 1e-2


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
def test_synthetic_prompt_in_micro_batches_anchors(synthetic, arch: str) -> None:
    m = open_model(synthetic(arch, "Q4_0"), dtype="float64")
    tokens = m.tokenize(PROMPT + " is the bridge")
    assert len(tokens) > 4
    for flash in ("on", "off"):
        anchor = m.anchor(tokens, Linearization(), RunSettings(flash_attn=flash, n_ubatch=4))
        engine = m.engine(anchor=anchor)
        summary = m.anchor_summary(anchor, engine.forward(engine.embed(tokens)).output[-1])
        assert summary["anchor_logits_nmse"] <= 1e-12, (arch, flash)


def test_check_noise_floor_over_the_settings_users_flip(gemma32) -> None:
    report = gemma32.check(BRIDGE)
    assert report["llama_cpp_resolved"]["repack"] is REPACK
    flips = {v["llama_cpp_settings"] for v in report["noise_floor"]}
    assert len(flips) == 3  # flash attention and repacking flipped, alone and together
    for v in report["noise_floor"]:  # a run that cannot be made here is recorded, not fatal
        if "failed" in v:
            assert AMX and "repacking on" in v["llama_cpp_settings"] and "crashed" in v["failed"]
    assert report["noise_floor_nmse"] == max(v["nmse"] for v in report["noise_floor"]
                                             if "nmse" in v)
    assert report["noise_floor_nmse"] > 0
    assert report["verdict"].startswith("PASS" if report["passed"] else "FAIL")


def test_crash_names_the_setting_and_the_flag(monkeypatch, synthetic) -> None:
    """A llama.cpp code path that kills its process (the AMX repack path once did) becomes
    one error naming repacking and --no-repack; no silent switch to another run."""
    path = synthetic("llama", "Q4_0")  # made (by llama.cpp's quantizer) before the patch
    crash = ("import os, signal, sys; print('ggml_backend_amx_mul_mat', file=sys.stderr); "
             "os.kill(os.getpid(), signal.SIGSEGV)")
    monkeypatch.setattr(llamacpp, "WORKER_COMMAND", (sys.executable, "-c", crash))
    with pytest.raises(LlamaCppError, match="SIGSEGV") as e:
        llamacpp.evaluate(path, [1, 2, 3], RunSettings(repack=True))
    assert "repacking on" in str(e.value) and "--no-repack" in str(e.value)
    with pytest.raises(LlamaCppError, match="SIGSEGV") as e:
        llamacpp.evaluate(path, [1, 2, 3], RunSettings(repack=False))
    assert "repacking off" in str(e.value) and "--no-repack runs" not in str(e.value)


def test_tokenize_grows_its_buffer(synthetic, tmp_path) -> None:
    """An SPM vocabulary without the space marker '▁' spells each space in three byte
    tokens: more tokens than the prompt has bytes (+16), which llama_tokenize reports by
    asking for a larger buffer."""
    data = bytearray(synthetic("llama", "F32").read_bytes())
    marker = struct.pack("<Q", 3) + "\u2581".encode()
    at = data.find(marker)
    assert at > 0
    data[at + 8:at + 11] = b"~~~"
    path = tmp_path / "no-space-marker.gguf"
    path.write_bytes(bytes(data))
    prompt = "a" + " 7" * 60  # neither "▁7" nor "7" is a piece: four byte tokens each
    tokens = llamacpp.tokenize(path, prompt)
    assert len(tokens) > len(prompt.encode()) + 16


def test_cli_llama_cpp_flags(synthetic, tmp_path) -> None:
    path = str(synthetic("llama", "Q4_0"))
    out = tmp_path / "a.json"
    p = subprocess.run([sys.executable, "-m", "ggufjac.cli", "attribute", path, "-p", PROMPT,
                        "--dtype", "float64", "--anchor", "llama.cpp", "--no-repack",
                        "--flash-attn", "off", "--ubatch-size", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    anchor = json.loads(out.read_text())["anchor"]
    assert anchor["llama_cpp_settings"] == {"repack": False, "flash_attn": "off", "n_batch": None,
                                            "n_ubatch": 2, "threads": None}
    assert anchor["llama_cpp_resolved"]["n_ubatch"] == 2 and not anchor["flash_attn"]
    assert "independent llama.cpp" in p.stdout
    p = subprocess.run([sys.executable, "-m", "ggufjac.cli", "attribute", path, "-p", PROMPT,
                        "--no-repack"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "--no-repack applies to --anchor llama.cpp only" in p.stderr
