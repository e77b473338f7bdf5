"""On a CUDA device: dequantization and the streaming engine (side-stream prefetch included)
give what the CPU gives. These run only where torch sees a GPU; the CPU suite does not depend
on them (the same code paths run there on CPU tensors). They need no llama.cpp: a GPU machine
may have only a CPU build of it, or none, and the token ids below are the synthetic
vocabulary's own (tools/synthetic.py), so nothing here tokenizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from ggufjac.api import open_model
from ggufjac.jacobian import streamed_jacobian
from ggufjac.quants import DEQUANTIZERS, dequantize, raw_to_torch
from tests.test_quants import _random_blocks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# <s> and the byte tokens of "the bridge out of Marin" (ids 5 + byte) in the synthetic vocabulary
TOKENS = [1] + [5 + b for b in "the bridge out of Marin".encode()]


@pytest.mark.parametrize("qtype", sorted(DEQUANTIZERS, key=lambda q: q.value), ids=lambda q: q.name)
def test_dequantization_on_cuda_matches_gguf_py(qtype) -> None:
    rng = np.random.default_rng(99 + qtype.value)
    block, _ = GGML_QUANT_SIZES[qtype]
    raw = _random_blocks(qtype, 1000, rng)
    ref = np.asarray(gguf_quants.dequantize(raw, qtype), dtype=np.float32).reshape(-1)
    ours = dequantize(raw_to_torch(raw, "cuda"), qtype, (1000 * block,))
    assert ours.device.type == "cuda"
    assert np.array_equal(ours.cpu().numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_dequantization_on_cuda_across_pieces(qtype) -> None:
    """A tensor of more values than one GPU piece (quants.GPU_CHUNK_ELEMENTS), into a given
    buffer as the engine dequantizes: every piece's values equal gguf-py's."""
    from ggufjac.quants import GPU_CHUNK_ELEMENTS

    rng = np.random.default_rng(7)
    block, _ = GGML_QUANT_SIZES[qtype]
    n_blocks = GPU_CHUNK_ELEMENTS // block + 1000
    raw = _random_blocks(qtype, n_blocks, rng)
    ref = np.asarray(gguf_quants.dequantize(raw, qtype), dtype=np.float32).reshape(-1)
    out = torch.empty(n_blocks * block, dtype=torch.float32, device="cuda")
    ours = dequantize(raw_to_torch(raw, "cuda"), qtype, (n_blocks * block,), out)
    assert ours.data_ptr() == out.data_ptr()
    assert np.array_equal(ours.cpu().numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_streamed_jacobian_on_cuda_equals_cpu(synthetic, arch: str, prefetch: bool) -> None:
    path = synthetic(arch, "Q4_K_M")
    cpu = open_model(path, dtype="float64")
    gpu = open_model(path, dtype="float64", device="cuda")
    tokens = TOKENS
    reference = cpu.jacobian(tokens, streaming=False)
    engine = gpu.engine(prefetch=prefetch)
    result = streamed_jacobian(engine, engine.embed(tokens))
    assert result.jacobian.device.type == "cuda"
    got = result.jacobian.cpu()
    assert float(torch.linalg.vector_norm(got - reference.jacobian)
                 / torch.linalg.vector_norm(reference.jacobian)) <= 1e-12
    assert result.reconstruction_rel_error() <= 1e-12


def test_attribution_on_cuda_equals_cpu(synthetic) -> None:
    path = synthetic("qwen3", "Q8_0")
    cpu, gpu = open_model(path, dtype="float64"), open_model(path, dtype="float64", device="cuda")
    tokens = TOKENS
    expect, got = cpu.attribute(tokens)["targets"][0], gpu.attribute(tokens)["targets"][0]
    assert got["id"] == expect["id"]
    assert np.allclose(got["contributions"], expect["contributions"], rtol=1e-12, atol=1e-12)
    assert abs(got["sum_of_contributions"] - expect["logit"]) <= 1e-12 * abs(expect["logit"])


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_row_block_streaming_on_cuda_equals_cpu(synthetic, arch: str) -> None:
    """The matrices read in row blocks (bytes copied to the GPU block by block), as a model
    whose layer does not fit the GPU's budget runs: the CPU's whole-layer Jacobian."""
    path = synthetic(arch, "Q4_K_M")
    cpu = open_model(path, dtype="float64")
    gpu = open_model(path, dtype="float64", device="cuda")
    tokens = TOKENS
    reference = cpu.jacobian(tokens, streaming=False)
    engine = gpu.engine(streaming=True, block_elements=3 * gpu.weights.widest_row() + 5)
    result = streamed_jacobian(engine, engine.embed(tokens))
    assert [s.streamed for s in engine.sweeps] == [True, True]
    got = result.jacobian.cpu()
    assert float(torch.linalg.vector_norm(got - reference.jacobian)
                 / torch.linalg.vector_norm(reference.jacobian)) <= 1e-12


def test_svd_on_cuda_equals_cpu(synthetic) -> None:
    """The matrix-free top-K SVD (Lanczos on J Jᵀ by sweeps) on the GPU: the CPU's σ and
    subspaces, and the triplet identity u_kᵀ y = σ_k (v_k · x)."""
    path = synthetic("gemma3", "Q4_K_M")
    cpu, gpu = open_model(path, dtype="float64"), open_model(path, dtype="float64", device="cuda")
    expect, got = cpu.svd(TOKENS, 4), gpu.svd(TOKENS, 4)
    assert got.converged and got.left.device.type == "cuda"
    assert torch.allclose(got.singular_values.cpu(), expect.singular_values, rtol=1e-10, atol=0)
    overlap = torch.linalg.svdvals(got.left.cpu().T @ expect.left)  # cosines of the angles
    assert float(overlap.min()) >= 1 - 1e-12
    coords = torch.einsum("knd,nd->k", got.right, got.inputs)
    assert torch.allclose(got.left.T @ got.output, got.singular_values * coords, rtol=1e-10,
                          atol=1e-10 * float(got.singular_values[0]))


# -- weights held in GPU memory (device_weights.py) ----------------------------------------


@pytest.mark.parametrize("chunk_bytes", [4093, 1 << 20, 1 << 26])
def test_staged_reads_into_gpu_memory_equal_the_file(synthetic, chunk_bytes: int) -> None:
    """Page-locked staging and the copy stream: every tensor's bytes on the GPU equal the
    file's (plain reads), with chunks unaligned, smaller and larger than the tensors."""
    from ggufjac.device_weights import Span, StagedReader
    from ggufjac.gguf_file import GGUFFile

    path = synthetic("llama", "Q4_K_M")
    gguf = GGUFFile(path)
    try:
        infos = list(gguf.tensors.values())
        dests = {t.name: torch.zeros(t.n_bytes, dtype=torch.uint8, device="cuda") for t in infos}
        reader = StagedReader(gguf, "cuda", chunk_bytes)
        assert reader._setup()[0].is_pinned()
        reader.read([Span(t.name, t.offset, dests[t.name]) for t in infos])
        with open(path, "rb") as f:
            for t in infos:
                f.seek(t.offset)
                assert dests[t.name].cpu().numpy().tobytes() == f.read(t.n_bytes), t.name
    finally:
        gguf.close()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.cpu() - b.cpu()) / torch.linalg.vector_norm(b.cpu()))


@pytest.mark.parametrize("share", ["all", "some", "none"])
def test_held_and_streamed_jacobians_on_cuda_equal_cpu(synthetic, share: str) -> None:
    """The weights all held in GPU memory, the first layer only (the rest staged at each
    use), or none: the CPU's Jacobian in float64, whole layers and row blocks both."""
    path = synthetic("llama", "Q4_K_M")
    reference = open_model(path, dtype="float64").jacobian(TOKENS, streaming=False)
    gpu = open_model(path, dtype="float64", device="cuda", hold_weights=False)
    tensors = gpu.gguf.tensors
    layer0 = sum(t.n_bytes for n, t in tensors.items() if n.startswith("blk.0."))
    small = sum(t.n_bytes for n, t in tensors.items()
                if not n.startswith("blk.") and n not in ("token_embd.weight", "output.weight"))
    room = {"all": 1 << 40, "some": small + layer0 + 1, "none": 0}[share]
    plan = gpu.weights.hold_on_device(room, chunk_bytes=1 << 16, reserve=0)
    assert len(plan.resident_layers) == {"all": gpu.cfg.n_layer, "some": 1, "none": 0}[share]
    assert all(gpu.weights.resident[n].device.type == "cuda" for n in plan.resident)
    for streaming in (False, True):
        engine = gpu.engine(streaming=streaming, block_elements=3 * gpu.weights.widest_row() + 5)
        result = streamed_jacobian(engine, engine.embed(TOKENS))
        assert _relative(result.jacobian, reference.jacobian) <= 1e-12
        assert result.reconstruction_rel_error() <= 1e-12


def test_gpu_budget_holds_what_fits(synthetic) -> None:
    """--max-gpu-memory as open_model's budget: the plan holds what the budget less the
    working reserve fits, and the Jacobian is the CPU's."""
    from ggufjac.device_weights import working_reserve

    path = synthetic("gemma3", "Q4_K_M")
    reference = open_model(path, dtype="float64").jacobian(TOKENS, streaming=False)
    probe = open_model(path, dtype="float64", device="cuda", hold_weights=False)
    # room for about one layer's bytes beside the reserve, above what the process holds
    budget = torch.cuda.memory_allocated() + 6 * probe.weights.layer_bytes() + (64 << 20)
    gpu = open_model(path, dtype="float64", device="cuda", hold_weights=True,
                     max_gpu_memory=budget)
    result = gpu.jacobian(TOKENS)
    plan = gpu.weights.residency
    assert plan.budget == budget
    assert plan.reserve == working_reserve(budget, gpu.weights.layer_bytes())
    assert plan.resident_bytes <= plan.budget - plan.reserve
    assert _relative(result.jacobian, reference.jacobian) <= 1e-12


@pytest.mark.parametrize("precision,bound", [("tf32", 2e-2), ("bf16", 5e-2)])
def test_lower_matmul_precision_error_is_measured(synthetic, precision: str, bound: float
                                                  ) -> None:
    """tf32 / bf16 on request only: float32 J's reconstruction error and its distance from
    the exact J, printed, within the stated bound (TF32 keeps 10 mantissa bits, bfloat16 7:
    errors of 1e-3 to 1e-2 on these few layers); the default is float32's own."""
    from ggufjac.device_weights import matmul_precision

    path = synthetic("llama", "Q4_K_M")
    gpu = open_model(path, dtype="float32", device="cuda")
    exact = gpu.jacobian(TOKENS)
    with matmul_precision(precision, "cuda"):
        low = gpu.jacobian(TOKENS)
    err, dist = low.reconstruction_rel_error(), _relative(low.jacobian, exact.jacobian)
    print(f"{precision}: reconstruction rel error {err:.2e} (float32 "
          f"{exact.reconstruction_rel_error():.2e}), distance from float32's J {dist:.2e}")
    assert exact.reconstruction_rel_error() <= 1e-5
    assert err <= bound and dist <= bound


def test_weights_stay_held_across_prompts(synthetic) -> None:
    """A batch's model (one LoadedModel, as batch.PromptRunner holds) reads the file once:
    the second prompt's attribution reads nothing (same device bytes, no staged reads, no
    file reads) and equals the CPU's."""
    from ggufjac.batch import BatchSettings, PromptRunner

    path = synthetic("qwen3", "Q8_0")
    runner = PromptRunner(path, BatchSettings(dtype="float64"), device="cuda")
    assert runner.m.hold_weights
    gpu, cpu = runner.m, open_model(path, dtype="float64")
    first = gpu.attribute(TOKENS)
    held = {n: t.data_ptr() for n, t in gpu.weights.resident.items()}
    assert gpu.weights.residency.everything
    file_reads, staged = gpu.gguf.bytes_read, gpu.weights.staged.stats.bytes_read
    second_tokens = TOKENS[:-3] + [5 + ord("x")]
    second = gpu.attribute(second_tokens)
    assert {n: t.data_ptr() for n, t in gpu.weights.resident.items()} == held
    assert gpu.weights.staged.stats.bytes_read == staged and gpu.gguf.bytes_read == file_reads
    for got, tokens in ((first, TOKENS), (second, second_tokens)):
        expect = cpu.attribute(tokens)["targets"][0]
        assert got["targets"][0]["id"] == expect["id"]
        assert np.allclose(got["targets"][0]["contributions"], expect["contributions"],
                           rtol=1e-12, atol=1e-12)
    runner.close()
