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
