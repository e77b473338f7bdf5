"""Write small random-weight GGUF models that llama.cpp loads, for any supported family.

    python tools/synthetic.py llama out.gguf --layers 2 --quant Q4_K_M
    python tools/synthetic.py --fixtures DIR [QUANT ...]     # the test suite's small models

Tensors carry the real GGUF names, shapes and metadata of the family (tokenizer included: a
SentencePiece vocabulary of <unk>, <s>, </s>, the 256 byte tokens and a few words), so
llama.cpp and ggufjac both load them. Quantization: `quant` is a whole-file llama.cpp file
type (F32, F16, Q8_0, Q4_0, Q4_K_M, Q6_K, ...), produced by llama.cpp's own quantizer from
an F32 file; `tensor_types` instead sets a type per tensor (name substring -> type) for the
types gguf-py can quantize (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType as Q
from gguf.constants import GGUFValueType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ggufjac import llamacpp  # noqa: E402
from ggufjac.families import FAMILIES  # noqa: E402
from ggufjac.layout import (Dims, layer_tensor_name, stored_bias_shapes_of,  # noqa: E402
                            stored_shapes_of)

WORDS = ["the", "a", "of", "is", "and", "bridge", "out", "Marin", "capital", "France",
         "Paris", "city", "water", "fox", "dog", "quick", "brown", "over", "lazy", "jumps"]
LLAMA_FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
                "Q2_K": 10, "Q3_K_M": 12, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_M": 17,
                "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "BF16": 32}
GGUF_PY_TYPES = {"F16": Q.F16, "BF16": Q.BF16, "Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0,
                 "Q4_1": Q.Q4_1, "Q5_0": Q.Q5_0, "Q5_1": Q.Q5_1, "MXFP4": Q.MXFP4}


@dataclass(frozen=True)
class Shape:
    n_layer: int = 2
    d_model: int = 256
    d_ff: int = 512
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 64
    rope_dims: int | None = None  # partial rotary (phi3); None: the whole head
    context_length: int = 512
    # a mixture of experts (families with Family.moe_gating; 0: MOE_SHAPE's)
    n_expert: int = 0
    n_expert_used: int = 0
    d_ff_expert: int = 0


# The experts of a synthetic mixture of experts where the Shape gives none: few and small,
# each expert's FFN a multiple of 256 (the K-quants' block) so llama.cpp quantizes them.
MOE_SHAPE = {"n_expert": 8, "n_expert_used": 2, "d_ff_expert": 256}


def with_experts(arch: str, shape: Shape) -> Shape:
    """`shape` with MOE_SHAPE's expert sizes where a mixture-of-experts family's are 0."""
    if FAMILIES[arch].moe_gating is None:
        return shape
    return Shape(**{**shape.__dict__, **{k: v for k, v in MOE_SHAPE.items()
                                         if not getattr(shape, k)}})


# Which families' synthetic models tie the unembedding to the token embedding (a choice of
# the generator: files of every family may do either). Which tensors a layer has and their
# shapes come from ggufjac's layout table.
TIED = {"llama": False, "qwen3": True, "gemma3": True, "phi3": False, "olmo2": False,
        "qwen2": True, "gemma2": True, "granite": False, "smollm3": True, "qwen3moe": True,
        "gpt-oss": False}
_U32, _F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
# Family settings the generator writes (keys without the 'ARCH.' prefix): sliding windows
# and soft-caps small enough that the test prompts cross and reach them, and Granite's
# multipliers (logit_scale is required), none of them 1.
FAMILY_METADATA: dict[str, dict[str, tuple[object, GGUFValueType]]] = {
    "gemma3": {"attention.sliding_window": (4, _U32)},
    "gemma2": {"attention.sliding_window": (4, _U32), "attn_logit_softcapping": (2.0, _F32),
               "final_logit_softcapping": (5.0, _F32)},
    "granite": {"embedding_scale": (12.0, _F32), "residual_scale": (0.22, _F32),
                "attention.scale": (0.5, _F32), "logit_scale": (8.0, _F32)},
    # gpt-oss: a window the test prompts cross, and YaRN rope (gpt-oss-20b's factor 32 over
    # an original context of 4096; here 4 over 64, so the ramp falls inside the head)
    "gpt-oss": {"attention.sliding_window": (4, _U32),
                "rope.scaling.type": ("yarn", GGUFValueType.STRING),
                "rope.scaling.factor": (4.0, _F32),
                "rope.scaling.original_context_length": (64, _U32)},
}


def dims(shape: Shape) -> Dims:
    return Dims(shape.d_model, shape.d_ff, shape.n_head, shape.n_kv_head, shape.head_dim,
                shape.head_dim, shape.n_expert, shape.d_ff_expert)


def _vocab(size: int | None = None) -> tuple[list[str], list[float], list[int]]:
    # llama.cpp's Phi-3 vocabulary loader looks up "<|endoftext|>" and "<|end|>" by text.
    tokens = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|end|>"] + \
        [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    pieces = ["\u2581" + w for w in WORDS] + [chr(c) for c in range(ord("a"), ord("z") + 1)] \
        + ["\u2581"]
    for i, p in enumerate(pieces):
        tokens.append(p)
        types.append(1)
        scores.append(-float(i))
    if size is not None:  # unused filler tokens up to a real model's vocabulary size
        n = size - len(tokens)
        tokens += [f"<unused{i}>" for i in range(n)]
        types += [5] * n
        scores += [-1e9] * n
    return tokens, scores, types


def _byte_level_chars() -> list[str]:
    """GPT-2's byte-level BPE alphabet: byte b's printable stand-in, for b = 0 ... 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


# A small byte-level BPE vocabulary ('gpt2' with gpt-oss's 'gpt-4o' pre-tokenizer): the 256
# bytes, a few words, and digit merges whose ranks make the pre-tokenizer's split of numbers
# into runs of at most three digits visible ("12345" -> "123" "45"; unsplit, BPE alone gives
# "12" "34" "5").
BPE_MERGES = ["3 4", "1 2", "4 5", "12 3", "t h", "th e", "\u0120 the", "b r", "br i",
              "bri d", "brid g", "bridg e", "\u0120 bridge", "o u", "ou t", "\u0120 out"]
BPE_SPECIAL = ["<|endoftext|>", "<|start|>", "<|end|>"]


def bpe_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the small byte-level BPE vocabulary."""
    tokens = _byte_level_chars()
    for merge in BPE_MERGES:
        tokens.append(merge.replace(" ", ""))
    types = [1] * len(tokens) + [3] * len(BPE_SPECIAL)
    return tokens + BPE_SPECIAL, types, list(BPE_MERGES)


def _matrix(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """[rows, cols], or a stack of experts [n_expert, rows, cols]."""
    return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)


def _norm_weight(rng: np.random.Generator, n: int) -> np.ndarray:
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)


def model_tensors(arch: str, shape: Shape, vocab_size: int, seed: int,
                  rope_freqs: bool = False) -> dict[str, np.ndarray]:
    """Random float32 tensors with the family's names, as row-major [out, in] arrays: every
    tensor of ggufjac's layout table the family has, stored as the family stores it."""
    fam = FAMILIES[arch]
    rng = np.random.default_rng(seed)
    shape = with_experts(arch, shape)
    d = shape.d_model
    t: dict[str, np.ndarray] = {
        "token_embd.weight": rng.standard_normal((vocab_size, d)).astype(np.float32)
        * (0.05 if fam.embed_scale_sqrt_d else 1.0),
        "output_norm.weight": _norm_weight(rng, d),
    }
    if not TIED[arch]:
        t["output.weight"] = _matrix(rng, vocab_size, d)
    for i in range(shape.n_layer):
        for name, stored in stored_shapes_of(fam, dims(shape)).items():
            t[layer_tensor_name(i, name)] = _norm_weight(rng, stored[0]) if len(stored) == 1 \
                else _matrix(rng, *stored)
        for name, rows in stored_bias_shapes_of(fam, dims(shape)).items():
            # as large as a projection's output, so the constant term is not negligible
            t[layer_tensor_name(i, name, "bias")] = rng.standard_normal(rows).astype(np.float32)
    if rope_freqs:  # per-frequency divisors: Llama 3.1 rope_freqs, Phi 3 LongRoPE factors
        half = (shape.rope_dims or shape.head_dim) // 2
        if arch == "phi3":
            t["rope_factors_short.weight"] = np.linspace(1.0, 4.0, half).astype(np.float32)
            t["rope_factors_long.weight"] = np.linspace(1.0, 16.0, half).astype(np.float32)
        else:
            t["rope_freqs.weight"] = np.linspace(1.0, 8.0, half).astype(np.float32)
    return t


def random_q4_k(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Random but valid Q4_K blocks for a [rows, cols] matrix (or a stack of experts
    [n_expert, rows, cols]), as the bytes GGUF stores.

    Made directly (no float32 model, no quantizer), so benchmark models of 8B/70B layer
    shapes are written in seconds. d and dmin are chosen so the values have mean ~0 and
    standard deviation ~1/sqrt(cols); scales and 4-bit quants are uniform random bytes.
    """
    *lead, cols = shape
    rows = int(np.prod(lead))
    n_blocks, type_size = rows * cols // 256, 144
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    d = np.float16(1.0 / (np.sqrt(cols) * 190.0))
    raw[:, 0:2] = np.full(n_blocks, d, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
    raw[:, 2:4] = np.full(n_blocks, np.float16(d * 7.5), dtype=np.float16).view(np.uint8) \
        .reshape(n_blocks, 2)
    return raw.reshape(*lead, cols // 256 * type_size)


def write_random_q4_k_gguf(path: str | os.PathLike[str], arch: str, shape: Shape,
                           seed: int = 0) -> Path:
    """A benchmark model: every layer matrix random Q4_K (see `random_q4_k`), the small
    embedding and norms float32. Not for comparing with llama.cpp (never quantized from
    float weights), only for measuring the engine's time and memory."""
    shape = with_experts(arch, shape)
    if any(n % 256 for n in (shape.d_model, shape.d_ff, shape.n_head * shape.head_dim,
                             shape.d_ff_expert)):
        raise ValueError("Q4_K rows must be multiples of 256")
    rng = np.random.default_rng(seed)
    small = Shape(**{**shape.__dict__, "n_layer": 0})
    tensors: dict[str, np.ndarray | tuple[np.ndarray, Q]] = dict(
        model_tensors(arch, small, len(_vocab()[0]), seed))
    fam = FAMILIES[arch]
    for i in range(shape.n_layer):
        for name, stored in stored_shapes_of(fam, dims(shape)).items():
            # a matrix, or a stack of experts [n_expert, rows, cols] (rows of every expert)
            tensors[layer_tensor_name(i, name)] = _norm_weight(rng, stored[0]) \
                if len(stored) == 1 else (random_q4_k(rng, math.prod(stored[:-1]), stored[-1])
                                          .reshape(*stored[:-1], -1), Q.Q4_K)
        for name, rows in stored_bias_shapes_of(fam, dims(shape)).items():
            tensors[layer_tensor_name(i, name, "bias")] = \
                rng.standard_normal(rows).astype(np.float32)
    path = Path(path)
    _write_f32_or_typed(path, arch, shape, tensors, None)
    return path


def add_model_metadata(w: GGUFWriter, arch: str, shape: Shape, tokenizer: str = "llama",
                       extra_floats: dict[str, float] | None = None,
                       metadata: dict[str, tuple[object, GGUFValueType] | None] | None = None,
                       vocab_size: int | None = None) -> None:
    """The family's metadata and a small SentencePiece vocabulary (padded with unused
    tokens to `vocab_size`, for big-model shapes) into a writer."""
    tokens, scores, types = _vocab(vocab_size)
    shape = with_experts(arch, shape)
    w.add_name(f"synthetic {arch}")
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    kv: dict[str, tuple[object, GGUFValueType]] = {
        "context_length": (shape.context_length, u32),
        "embedding_length": (shape.d_model, u32),
        "block_count": (shape.n_layer, u32),
        "feed_forward_length": (shape.d_ff, u32),
        "attention.head_count": (shape.n_head, u32),
        "attention.head_count_kv": (shape.n_kv_head, u32),
        "attention.key_length": (shape.head_dim, u32),
        "attention.value_length": (shape.head_dim, u32),
        "attention.layer_norm_rms_epsilon": (1e-6, f32),
        "rope.freq_base": (10000.0, f32),
        "rope.dimension_count": (shape.rope_dims or shape.head_dim, u32),
    }
    if FAMILIES[arch].moe_gating is not None:
        kv.update({"expert_count": (shape.n_expert, u32),
                   "expert_used_count": (shape.n_expert_used, u32),
                   "expert_feed_forward_length": (shape.d_ff_expert, u32)})
    kv.update(FAMILY_METADATA.get(arch, {}))
    kv.update({key: (value, f32) for key, value in (extra_floats or {}).items()})
    # Overrides (tests of hostile metadata): (value, type) replaces or adds, None removes.
    for key, override in (metadata or {}).items():
        if override is None:
            kv.pop(key, None)
        else:
            kv[key] = override
    for key, (value, vtype) in kv.items():
        sub = None
        if vtype == GGUFValueType.ARRAY:
            sub = GGUFValueType.INT32 if all(isinstance(v, int) for v in value) \
                else GGUFValueType.FLOAT32  # type: ignore[union-attr]
        w.add_key_value(f"{arch}.{key}", value, vtype, sub)
    if tokenizer == "gpt2":  # byte-level BPE, gpt-oss's pre-tokenizer
        tokens, types, merges = bpe_vocab()
        if vocab_size is not None:  # unused filler tokens up to a real model's vocabulary
            n = vocab_size - len(tokens)
            tokens, types = tokens + [f"<|unused{i}|>" for i in range(n)], types + [5] * n
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", "gpt-4o")
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.token_type", types)
        w.add_array("tokenizer.ggml.merges", merges)
        special = tokens.index(BPE_SPECIAL[0])
        w.add_uint32("tokenizer.ggml.bos_token_id", special)
        w.add_uint32("tokenizer.ggml.eos_token_id", special)
        w.add_bool("tokenizer.ggml.add_bos_token", False)
        return
    w.add_string("tokenizer.ggml.model", tokenizer)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", scores)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_eos_token", False)


def _write_f32_or_typed(path: Path, arch: str, shape: Shape,
                        tensors: dict[str, np.ndarray | tuple[np.ndarray, Q]],
                        tensor_types: dict[str, str] | None, tokenizer: str = "llama",
                        extra_floats: dict[str, float] | None = None,
                        metadata: dict[str, tuple[object, GGUFValueType] | None] | None = None
                        ) -> None:
    w = GGUFWriter(str(path), arch)
    add_model_metadata(w, arch, shape, tokenizer, extra_floats, metadata)
    for name, arr in tensors.items():
        if isinstance(arr, tuple):  # already quantized bytes
            w.add_tensor(name, arr[0], raw_dtype=arr[1])
            continue
        qname = next((v for k, v in (tensor_types or {}).items() if k in name), None)
        if qname and arr.ndim >= 2 and qname != "F32":  # matrices and expert stacks
            qtype = GGUF_PY_TYPES[qname]
            w.add_tensor(name, gguf_quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_synthetic_gguf(path: str | os.PathLike[str], arch: str, shape: Shape = Shape(),
                         quant: str = "F32", tensor_types: dict[str, str] | None = None,
                         seed: int = 0, rope_freqs: bool = False, tokenizer: str = "llama",
                         extra_floats: dict[str, float] | None = None,
                         metadata: dict[str, tuple[object, GGUFValueType] | None] | None = None
                         ) -> Path:
    """Write a random-weight `arch` model to `path`; returns the path. `tokenizer` 'gpt2'
    writes a small byte-level BPE vocabulary with gpt-oss's 'gpt-4o' pre-tokenizer
    (`bpe_vocab`); other values than 'llama' and `metadata` overrides ({key without the
    'ARCH.' prefix: (value, type) or None to leave it out}) only for testing bad files
    ('none' makes llama.cpp abort on tokenize)."""
    if arch not in FAMILIES:
        raise ValueError(f"unknown family {arch!r}; known: {', '.join(FAMILIES)}")
    path = Path(path)
    vocab_size = len(bpe_vocab()[0] if tokenizer == "gpt2" else _vocab()[0])
    tensors = model_tensors(arch, shape, vocab_size, seed, rope_freqs)
    if quant == "F32" or tensor_types:
        _write_f32_or_typed(path, arch, shape, tensors, tensor_types, tokenizer, extra_floats,
                            metadata)
        return path
    if quant not in LLAMA_FTYPES:
        raise ValueError(f"unknown quant {quant!r}; known: {', '.join(LLAMA_FTYPES)}")
    with tempfile.TemporaryDirectory(prefix="ggufjac-synth-") as tmp:
        f32 = Path(tmp) / "f32.gguf"
        _write_f32_or_typed(f32, arch, shape, tensors, None, tokenizer, extra_floats, metadata)
        llamacpp.quantize(f32, path, LLAMA_FTYPES[quant])
    return path


def fixture_name(arch: str, quant: str) -> str:
    return f"{arch}-{quant}.gguf"


def write_fixture(directory: str | os.PathLike[str], arch: str, quant: str) -> Path:
    """The test suite's small model of `arch` in `quant` (tests/conftest.py's `synthetic`),
    with enough layers to hold a layer without rope where the family has them."""
    shape = Shape(n_layer=max(2, FAMILIES[arch].no_rope_layer_step))
    return write_synthetic_gguf(Path(directory) / fixture_name(arch, quant), arch, shape,
                                quant, rope_freqs=arch == "llama")


def main() -> None:
    if sys.argv[1:2] == ["--fixtures"]:  # the test fixtures, for a machine without llama.cpp
        for arch in sorted(FAMILIES):
            for quant in sys.argv[3:] or ["Q4_K_M", "Q8_0"]:
                print(write_fixture(sys.argv[2], arch, quant))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arch", choices=sorted(FAMILIES))
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--quant", default="F32", choices=sorted(LLAMA_FTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rope-freqs", action="store_true")
    args = ap.parse_args()
    shape = Shape(n_layer=args.layers, d_model=args.d_model, d_ff=args.d_ff, n_head=args.heads,
                  n_kv_head=args.kv_heads, head_dim=args.head_dim)
    print(write_synthetic_gguf(args.out, args.arch, shape, args.quant, seed=args.seed,
                               rope_freqs=args.rope_freqs))


if __name__ == "__main__":
    main()
