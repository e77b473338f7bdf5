"""`steer` and `cvector`: steering with a source prompt's detached maps, and llama.cpp
control vectors.

References: a prefix-recomputing generation loop written here (for the KV cache), the
paper's operator written from its formula with the source's Jacobian taken by autograd on
the detached blocks (not by the streaming engine `steer` uses), gguf-py for the file, and
llama.cpp itself (through llama-cpp-python) for what a control vector does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ggufjac import llamacpp
from ggufjac.api import open_model
from ggufjac.cli import main
from ggufjac.cvector import ControlVector, read_control_vector
from ggufjac.errors import GgufjacError
from ggufjac.linearize import DETACHED, PLAIN
from ggufjac.model import block, final_norm
from ggufjac.metrics import CHECK_NMSE_BOUND, nmse
from ggufjac.steer import (DirectionSteering, JacobianSteering, generate, source_maps)

ARCHS = ["llama", "qwen3", "gemma3", "phi3", "olmo2"]
SOURCE = "The bridge out of Marin is the Golden"
NEUTRAL = ["Here is a painting of the", "My favourite place is the",
           "Yesterday I walked to the", "The photo shows the"]


def _cli(*args: str) -> object:
    return CliRunner().invoke(main, list(args))


def _recomputed(model, prompt: list[int], n_new: int, edit=None) -> tuple[list[int], list]:
    """Greedy generation that runs the whole sequence again at every step."""
    seq, logits = list(prompt), []
    for _ in range(n_new):
        with torch.no_grad():
            z = model.logits(model.forward(model.embed(seq), PLAIN, edit=edit)[-1])
        logits.append(z)
        seq.append(int(z.argmax()))
    return seq[len(prompt):], logits


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_generation_equals_recomputing_the_prefix(synthetic, arch: str) -> None:
    """Token for token, and every step's logits to float64 rounding, past the synthetic
    Gemma's 4-token sliding window; steered by a direction too."""
    m = open_model(synthetic(arch, "Q8_0"), dtype="float64")
    model = m.model
    prompt = m.tokenize("the quick brown fox jumps")
    n_new = 7
    cached = generate(model, prompt, n_new, concepts=[5])
    tokens, logits = _recomputed(model, prompt, n_new)
    assert cached.tokens == tokens
    # the per-step concept probability comes from the cached step's logits
    assert len(cached.concept_probability) == len(logits) == n_new
    for p, z in zip(cached.concept_probability, logits):
        assert p == pytest.approx(float(torch.softmax(z, -1)[5]), rel=1e-9)

    v = torch.randn(m.cfg.d_model, dtype=torch.float64)
    steering = DirectionSteering({1: v / v.norm() * 0.5}, relative=True)
    steered = generate(model, prompt, n_new, steering, concepts=[5])

    def edit(layer: int, h: torch.Tensor, start: int) -> torch.Tensor:
        return h + 0.5 * h.norm(dim=-1, keepdim=True) * v / v.norm() if layer == 1 else h
    tokens, logits = _recomputed(model, prompt, n_new, edit)
    assert steered.tokens == tokens
    assert len(steered.concept_probability) == len(logits) == n_new
    for p, z in zip(steered.concept_probability, logits):
        assert p == pytest.approx(float(torch.softmax(z, -1)[5]), rel=1e-9)


def test_jacobian_operator_follows_the_papers_definition(synthetic) -> None:
    """The paper's operator from its formula: J by autograd through the detached blocks
    (inputs -> final norm of the residual after block L, last position); for the new
    sequence s_k = J[:, k mod n_src, :] e_k, a_i = Σ_{k≤i} s_k, h_i += λ a_i ‖h_i‖/(2‖a_i‖)
    after block L, the whole prefix recomputed each step. `steer`'s cached generation with
    the engine's maps gives the same tokens and logits."""
    m = open_model(synthetic("gemma3", "Q8_0"), dtype="float64")
    model, cfg = m.model, m.cfg
    layer, lam = 1, 3.0
    src = m.tokenize("the bridge out of Marin")
    x_src = model.embed(src)

    def lens(x: torch.Tensor) -> torch.Tensor:
        for i in range(layer + 1):
            x = block(cfg, i, model.layer_weights(i), x, DETACHED).out
        return final_norm(cfg, model.output_norm, x, DETACHED)[-1]
    J = torch.autograd.functional.jacobian(lens, x_src)  # [d, n_src, d]
    maps = source_maps(m, src, [layer], "jacobian")
    torch.testing.assert_close(maps[layer].cumulative, J, rtol=1e-10, atol=1e-12)

    prompt = m.tokenize("the quick brown fox")
    n_new = 6

    def paper_edit_for(seq: list[int]):
        e = model.embed(seq)

        def edit(l: int, h: torch.Tensor, start: int) -> torch.Tensor:
            if l != layer:
                return h
            s = torch.stack([J[:, k % len(src), :] @ e[k] for k in range(len(seq))])
            a = torch.cumsum(s, dim=0)
            return h + lam * a * h.norm(dim=-1, keepdim=True) / (2 * a.norm(dim=-1, keepdim=True))
        return edit

    seq, paper_logits = list(prompt), []
    for _ in range(n_new):
        with torch.no_grad():
            z = model.logits(model.forward(model.embed(seq), PLAIN, edit=paper_edit_for(seq))[-1])
        paper_logits.append(z)
        seq.append(int(z.argmax()))
    ours = generate(model, prompt, n_new, JacobianSteering(layer, maps[layer].cumulative, lam),
                    concepts=list(range(cfg.vocab_size)))
    assert ours.tokens == seq[len(prompt):]
    plain = generate(model, prompt, n_new)
    assert plain.tokens != ours.tokens  # the operator does change what is generated here


def test_control_vector_file_as_llama_cpp_and_gguf_py_read_it(tmp_path, synthetic) -> None:
    from gguf import GGUFReader

    d = 256
    v1, v3 = torch.randn(d), torch.randn(d)
    path = tmp_path / "cv.gguf"
    ControlVector({3: v3, 1: v1}, "llama").write(path)
    r = GGUFReader(str(path))
    fields = {k: r.fields[k] for k in r.fields}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "controlvector"
    assert bytes(fields["controlvector.model_hint"].parts[-1]).decode() == "llama"
    assert int(fields["controlvector.layer_count"].parts[-1][0]) == 2
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == {"direction.1", "direction.3"}
    assert all(int(t.tensor_type) == 0 and t.data.shape == (d,) for t in tensors.values())
    np.testing.assert_array_equal(tensors["direction.3"].data, v3.numpy())
    back = read_control_vector(path)
    assert torch.equal(back.directions[1], v1) and torch.equal(back.directions[3], v3)


def test_llama_cpp_adds_direction_n_to_the_output_of_block_n(tmp_path, gemma_path, gemma32,
                                                            bridge_tokens) -> None:
    """llama.cpp's captured l_out-N with the file applied, minus the unsteered l_out-N, is
    direction.N (float32 rounding); blocks before N are untouched. Our model with the same
    vector added after block N matches llama.cpp's steered logits within `check`'s bound,
    as it matches the unsteered ones."""
    n_layer, block_n = gemma32.cfg.n_layer, 9
    g = torch.Generator().manual_seed(3)
    v = torch.randn(gemma32.cfg.d_model, generator=g) * 40.0
    path = tmp_path / "one.gguf"
    ControlVector({block_n: v}, "gemma3").write(path)
    names = [f"l_out-{i}" for i in range(n_layer)]
    plain = llamacpp.evaluate(gemma_path, bridge_tokens, capture=names)
    steered = llamacpp.evaluate(gemma_path, bridge_tokens, capture=names, control_vector=path)
    for i in range(block_n):
        np.testing.assert_array_equal(steered.rows(f"l_out-{i}"), plain.rows(f"l_out-{i}"))
    a, b = plain.rows(f"l_out-{block_n}"), steered.rows(f"l_out-{block_n}")
    tol = 4 * np.finfo(np.float32).eps * (np.abs(a) + np.abs(v.numpy()))
    assert np.all(np.abs((b - a) - v.numpy()) <= tol)
    assert not np.allclose(steered.rows(f"l_out-{block_n + 1}"), plain.rows(f"l_out-{block_n + 1}"))

    model = gemma32.model
    edit = DirectionSteering({block_n: v}, relative=False)

    def ours(steering) -> np.ndarray:
        with torch.no_grad():
            e = None if steering is None else \
                (lambda l, h, s: h + steering.delta(l, h, s, None) if l in steering.layers else h)
            return model.logits(model.forward(model.embed(bridge_tokens), PLAIN, edit=e)).numpy()
    unsteered_nmse = nmse(ours(None), plain.logits)
    steered_nmse = nmse(ours(edit), steered.logits)
    assert unsteered_nmse <= CHECK_NMSE_BOUND and steered_nmse <= CHECK_NMSE_BOUND
    assert nmse(steered.logits, plain.logits) > 100 * steered_nmse  # the vector mattered
    assert ours(edit)[-1].argmax() == steered.logits[-1].argmax()


def test_exported_concept_vector_raises_the_concept_logit_in_llama_cpp(tmp_path, gemma_path,
                                                                       gemma32) -> None:
    """`ggufjac cvector` (concept-direction, default concept: the source's prediction
    ' Gate') at block 9, applied by llama.cpp to neutral prompts: the concept's logit rises
    on every prompt, and more than with a random direction of the same norm."""
    out = tmp_path / "golden.gguf"
    r = _cli("cvector", str(gemma_path), "--source", SOURCE, "--layers", "9", "--out", str(out))
    assert r.exit_code == 0, r.output
    cv = read_control_vector(out)
    assert set(cv.directions) == {9}
    v = cv.directions[9]
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(v.shape, generator=g)
    ControlVector({9: rnd / rnd.norm() * v.norm()}, "gemma3").write(tmp_path / "random.gguf")
    concept = gemma32.token_for_text(" Gate")
    rises, random_rises = [], []
    for p in NEUTRAL:
        toks = gemma32.tokenize(p)
        base = llamacpp.evaluate(gemma_path, toks, last_only=True).logits[-1, concept]
        rises.append(llamacpp.evaluate(gemma_path, toks, last_only=True,
                                       control_vector=out).logits[-1, concept] - base)
        random_rises.append(llamacpp.evaluate(gemma_path, toks, last_only=True,
                                              control_vector=tmp_path / "random.gguf"
                                              ).logits[-1, concept] - base)
    assert min(rises) > 1.0, rises
    assert np.mean(rises) > np.mean(random_rises) + 1.0, (rises, random_rises)


def test_steer_eval_reports_each_scale_against_its_random_control(tmp_path, synthetic) -> None:
    path = synthetic("llama", "Q8_0")
    prompts = tmp_path / "neutral.txt"
    prompts.write_text("the dog\nthe quick fox\nover the lazy\n")
    js = tmp_path / "steer.json"
    r = _cli("steer", str(path), "--source", "the bridge out of Marin", "--eval", str(prompts),
             "--scales", "0,1.5", "--tokens", "4", "--seed", "7", "--json", str(js),
             "--dtype", "float64")
    assert r.exit_code == 0, r.output
    report = json.loads(js.read_text())
    assert report["settings"]["seed"] == 7 and report["n_prompts"] == 3
    zero, big = report["evaluation"]
    # λ = 0 steers nothing: no rise, and the perplexities of the unsteered text
    assert zero["concept_logprob_rise"] == 0.0 and zero["control_logprob_rise"] == 0.0
    assert zero["perplexity"] == pytest.approx(zero["unsteered_perplexity"], rel=1e-12)
    assert big["scale"] == 1.5 and big["concept_logprob_rise"] != 0.0


def test_steer_prompt_prints_both_continuations(synthetic) -> None:
    path = synthetic("gemma3", "Q8_0")
    r = _cli("steer", str(path), "--source", "the bridge out of Marin", "-p", "the quick",
             "--tokens", "3", "--operator", "concept-direction", "--layer", "1")
    assert r.exit_code == 0, r.output
    assert "unsteered: the quick" in r.output and "steered:   the quick" in r.output
    steps = [ln for ln in r.output.splitlines() if ln.startswith("P(concepts) by step, steered")]
    assert len(steps) == 1 and len(steps[0].split(":")[1].split("(mean")[0].split()) == 3


def test_bad_input_gets_one_clear_error(tmp_path, synthetic, gemma_path) -> None:
    small = synthetic("llama", "Q8_0")  # d 256, 2 blocks
    other = tmp_path / "wide.gguf"
    ControlVector({1: torch.ones(640)}, "gemma3").write(other)
    too_deep = tmp_path / "deep.gguf"
    ControlVector({5: torch.ones(256)}, "llama").write(too_deep)
    cases = [
        (["steer", str(small), "--source", "the dog", "-p", "the", "--control-vector", str(other)],
         "640 values; the model's n_embd is 256"),
        (["steer", str(small), "--source", "the dog", "-p", "the", "--control-vector",
          str(too_deep)], "direction.5 is for block 5"),
        (["steer", str(small), "--source", "the dog", "-p", "the", "--control-vector",
          str(small)], "not a control vector file"),
        (["cvector", str(small), "--source", "the dog", "--layers", "1-4", "--out",
          str(tmp_path / "x.gguf")], "llama.cpp steers blocks 1..1"),
        (["cvector", str(small), "--source", "the dog", "--layers", "0", "--out",
          str(tmp_path / "x.gguf")], "block 0 has no control-vector slot"),
        (["cvector", str(small), "--source", "the dog", "--layers", "1", "--operator",
          "jacobian", "--out", str(tmp_path / "x.gguf")], "no control vector can express it"),
        (["steer", str(small), "--source", "the dog", "-p", "the", "--scale", "inf"],
         "must be a finite number"),
        (["steer", str(small), "--source", "the dog", "-p", "the", "--control-vector",
          str(too_deep), "--layer", "1"], "drop --operator and --layer"),
        (["steer", str(small), "--source", "the dog", "--eval", str(tmp_path / "none.txt"),
          "--scales", "0.5,nan"], "must be a finite number"),
        (["steer", str(small), "--source", "the dog", "-p", "the", "--layer", "2"],
         "the model has blocks 0..1"),
        (["steer", str(small), "--source", " ".join(["dog"] * 600), "-p", "the"],
         "--source: the prompt is"),
        (["steer", str(small), "--source", "the dog", "-p", "the dog", "--tokens", "600"],
         "and --tokens 600 make"),
        (["cvector", str(small), "--source", " ".join(["dog"] * 600), "--layers", "1",
          "--out", str(tmp_path / "x.gguf")], "--source: the prompt is"),
    ]
    for args, message in cases:
        r = _cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output and "Traceback" not in r.output, (args, r.output)
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob("*.partial"))
    with pytest.raises(GgufjacError, match="at least one direction"):
        ControlVector({}, "llama").write(tmp_path / "empty.gguf")


def test_both_names_of_llama_cpp_pythons_control_vector_function() -> None:
    from types import SimpleNamespace

    from ggufjac.llamacpp_worker import control_vector_setter

    def new(*a): return 0
    def old(*a): return 0
    assert control_vector_setter(SimpleNamespace(llama_set_adapter_cvec=new)) is new
    assert control_vector_setter(SimpleNamespace(llama_apply_adapter_cvec=old)) is old  # < 0.3.17
    assert control_vector_setter(SimpleNamespace(llama_set_adapter_cvec=new,
                                                 llama_apply_adapter_cvec=old)) is new
    with pytest.raises(RuntimeError, match="neither"):
        control_vector_setter(SimpleNamespace())


def test_steer_refuses_a_model_larger_than_memory(synthetic, monkeypatch) -> None:
    """Generation holds every layer: with less memory available than the model's float32
    weights (the file's element count × 4 bytes), one clear error before loading them."""
    import ggufjac.engine

    path = synthetic("llama", "Q8_0")
    m = open_model(path)
    need = 4 * sum(t.n_elements for t in m.gguf.tensors.values())
    monkeypatch.setattr(ggufjac.engine, "available_bytes", lambda device: need // 2)
    r = _cli("steer", str(path), "--source", "the dog", "-p", "the", "--tokens", "2")
    assert r.exit_code == 2 and "steering holds the whole model in memory" in r.output, r.output
    monkeypatch.setattr(ggufjac.engine, "available_bytes", lambda device: 64 << 30)
    assert _cli("steer", str(path), "--source", "the dog", "-p", "the", "--tokens", "2"
                ).exit_code == 0
