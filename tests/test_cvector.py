"""Control vector files: what is read and written, how a range of blocks is scaled, and
`cvector`'s own measurement of its file, checked against llama.cpp itself (through
llama-cpp-python: `llama_set_adapter_cvec` on blocks 1 ... n_layer - 1) on Gemma 3 270M."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ggufjac import llamacpp
from ggufjac.cli import main
from ggufjac.cvector import ControlVector, read_control_vector
from ggufjac.errors import GgufjacError

FRUIT = "My favourite fruit is a ripe yellow banana"
# prompts that do not ask for a fruit: the first four are the ones `cvector` measures on
NEUTRAL = ["I went to the market and bought a", "Here is a painting of the",
           "My favourite place is the", "Yesterday I walked to the",
           "On the table there was a", "She opened the box and found a"]


def _cli(*args: str) -> object:
    return CliRunner().invoke(main, list(args))


def _write_raw(path, tensors: dict[str, np.ndarray]) -> None:
    """A control vector file written by gguf-py directly, names as given."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_int32("controlvector.layer_count", len(tensors))
    for name, values in tensors.items():
        w.add_tensor(name, values.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_zero_padded_block_number_is_refused(tmp_path) -> None:
    """direction.1 and direction.01 would both be block 1, the later one silently winning."""
    path = tmp_path / "padded.gguf"
    _write_raw(path, {"direction.1": np.ones(8), "direction.01": np.full(8, 2.0)})
    with pytest.raises(GgufjacError, match=r"'direction\.01'.*leading zero"):
        read_control_vector(path)
    alone = tmp_path / "alone.gguf"
    _write_raw(alone, {"direction.02": np.ones(8)})
    with pytest.raises(GgufjacError, match=r"'direction\.02'.*leading zero"):
        read_control_vector(alone)
    twice = tmp_path / "twice.gguf"
    _write_raw(twice, {"direction.1": np.ones(8), "direction.2": np.full(8, 2.0)})
    data = twice.read_bytes()  # gguf-py refuses a name twice: rename in the header
    assert data.count(b"direction.2") == 1
    twice.write_bytes(data.replace(b"direction.2", b"direction.1"))
    with pytest.raises(GgufjacError, match=r"'direction\.1'.*appears twice"):
        read_control_vector(twice)
    plain = tmp_path / "plain.gguf"
    _write_raw(plain, {"direction.10": np.arange(8.0), "direction.1": np.ones(8)})
    back = read_control_vector(plain)
    assert sorted(back.directions) == [1, 10]
    assert back.directions[10].tolist() == list(range(8))


def test_writing_validates_the_vectors(tmp_path) -> None:
    cfg = SimpleNamespace(d_model=8, n_layer=4)  # the two fields check_fits reads
    out = tmp_path / "cv.gguf"
    cases = [
        (ControlVector({1: torch.tensor([1.0, float("nan")] + [0.0] * 6)}, "llama"), None,
         "direction.1 holds NaN or Inf"),
        (ControlVector({2: torch.full((8,), float("inf"))}, "llama"), None, "NaN or Inf"),
        (ControlVector({0: torch.ones(8)}, "llama"), None, "no control-vector slot for block 0"),
        (ControlVector({1: torch.ones(8), 2: torch.ones(9)}, "llama"), None,
         "different lengths [8, 9]"),
        (ControlVector({1: torch.ones(2, 4)}, "llama"), None, "shape [2, 4]"),
        (ControlVector({}, "llama"), None, "at least one direction"),
        (ControlVector({1: torch.ones(6)}, "llama"), cfg, "6 values; the model's n_embd is 8"),
        (ControlVector({4: torch.ones(8)}, "llama"), cfg, "direction.4 is for block 4"),
    ]
    for cv, against, message in cases:
        with pytest.raises(GgufjacError) as e:
            cv.write(out, against)
        assert message in str(e.value), (message, str(e.value))
        assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left
    ControlVector({3: torch.ones(8)}, "llama").write(out, cfg)
    assert list(tmp_path.iterdir()) == [out]


def _concept_and_own_logprobs(model_path, tokens: list[int], concept: int,
                              cv_path=None) -> tuple[float, list[float]]:
    """llama.cpp's log P(concept) at the last position and the log-probabilities of the
    prompt's own tokens after the first, in float64 from its float32 logits."""
    logits = llamacpp.evaluate(model_path, tokens, control_vector=cv_path).logits
    lp = torch.log_softmax(torch.from_numpy(logits).to(torch.float64), dim=-1)
    own = [float(lp[i, tokens[i + 1]]) for i in range(len(tokens) - 1)]
    return float(lp[-1, concept]), own


def test_a_range_steers_in_llama_cpp_and_stays_fluent(tmp_path, gemma_path, gemma32) -> None:
    """`cvector --layers 6-12` on the real model: each block's vector is λ/7 of the source's
    residual norm there (llama.cpp's own l_out-N), and applied by llama.cpp to neutral
    prompts, the concept's log-probability rises on every prompt, by more than a random
    vector with the same per-block norms; the prompts' own tokens lose less than 1 nat
    each. The figures `cvector` prints are the ones recomputed here."""
    out = tmp_path / "banana.gguf"
    r = _cli("cvector", str(gemma_path), "--source", FRUIT, "--concept", " banana",
             "--layers", "6-12", "--out", str(out))
    assert r.exit_code == 0, r.output
    cv = read_control_vector(out)
    blocks = list(range(6, 13))
    assert sorted(cv.directions) == blocks

    source = gemma32.tokenize(FRUIT)
    ref = llamacpp.evaluate(gemma_path, source, capture=[f"l_out-{n}" for n in blocks])
    for n in blocks:
        h_norm = float(np.linalg.norm(ref.rows(f"l_out-{n}")[-1].astype(np.float64)))
        assert float(cv.directions[n].norm()) == pytest.approx(0.02 / 7 * h_norm, rel=1e-2)

    g = torch.Generator().manual_seed(12345)
    random_vectors = {}
    for n, v in cv.directions.items():
        x = torch.randn(v.numel(), generator=g)
        random_vectors[n] = x / x.norm() * v.norm()
    random_path = tmp_path / "random.gguf"
    ControlVector(random_vectors, "gemma3").write(random_path)

    banana = gemma32.token_for_text(" banana")
    rises, random_rises, own_base, own_cv, own_random = [], [], [], [], []
    for prompt in NEUTRAL:
        tokens = gemma32.tokenize(prompt)
        base, base_own = _concept_and_own_logprobs(gemma_path, tokens, banana)
        steered, steered_own = _concept_and_own_logprobs(gemma_path, tokens, banana, out)
        rnd, rnd_own = _concept_and_own_logprobs(gemma_path, tokens, banana, random_path)
        rises.append(steered - base)
        random_rises.append(rnd - base)
        own_base.append(base_own)
        own_cv.append(steered_own)
        own_random.append(rnd_own)
    assert len(rises) == len(NEUTRAL)
    assert min(rises) > 1.0, rises
    assert np.mean(rises) > np.mean(random_rises) + 2.0, (rises, random_rises)

    def per_token(lists: list[list[float]]) -> float:
        flat = [x for xs in lists for x in xs]
        return sum(flat) / len(flat)
    fluency = per_token(own_cv) - per_token(own_base)
    assert fluency > -1.0, fluency
    assert per_token(own_random) - per_token(own_base) > -1.0

    # what `cvector` printed: its measurement on the first four prompts
    printed_rise = float(re.search(r"Δ log P\(concept\), last position\s+([-+][\d.]+)",
                                   r.output).group(1))
    printed_fluency = float(re.search(r"Δ log P\(own tokens\) per token\s+([-+][\d.]+)",
                                      r.output).group(1))
    assert printed_rise == pytest.approx(np.mean(rises[:4]), abs=0.006)
    assert printed_fluency == pytest.approx(per_token(own_cv[:4]) - per_token(own_base[:4]),
                                            abs=0.006)
    assert "warning" not in r.output


def test_a_vector_that_breaks_the_model_is_refused(tmp_path, gemma_path, gemma32) -> None:
    """Seven times the scale (each block as strong as one block alone, the additions
    compounding): llama.cpp's fluency on the neutral prompts collapses, and `cvector`
    refuses to leave a file (no temporary either); --force writes it with a warning."""
    out = tmp_path / "broken.gguf"
    args = ["cvector", str(gemma_path), "--source", FRUIT, "--concept", " banana",
            "--layers", "6-12", "--scale", "0.14", "--out", str(out)]
    r = _cli(*args)
    assert r.exit_code == 2, r.output
    assert "not written" in r.output and "nats per token" in r.output
    assert "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []

    r = _cli(*args, "--force")
    assert r.exit_code == 0, r.output
    assert "degrades the model" in r.output
    # the refusal was right: in llama.cpp the file costs the prompts' own tokens > 1 nat
    banana = gemma32.token_for_text(" banana")
    base, broken = [], []
    for prompt in NEUTRAL[:4]:
        tokens = gemma32.tokenize(prompt)
        base += _concept_and_own_logprobs(gemma_path, tokens, banana)[1]
        broken += _concept_and_own_logprobs(gemma_path, tokens, banana, out)[1]
    assert len(base) == len(broken) > 0
    assert sum(broken) / len(broken) - sum(base) / len(base) < -1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


def test_no_check_writes_without_llama_cpp(tmp_path, synthetic, monkeypatch) -> None:
    """--no-check never starts llama.cpp; the block scale is λ/k all the same."""
    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("llama.cpp was started")
    monkeypatch.setattr(llamacpp, "evaluate", refuse)
    path = synthetic("llama", "Q8_0")  # 2 blocks: block 1 is the only slot
    out = tmp_path / "cv.gguf"
    r = _cli("cvector", str(path), "--source", "the dog", "--layers", "1", "--scale", "0.5",
             "--no-check", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "not measured in llama.cpp" in r.output
    assert sorted(read_control_vector(out).directions) == [1]
