"""How ggml's CPU backend rounds a quantized matmul's input for each weight type, and what
that means for anchoring a file (torch-free, so `ggufjac info` answers without torch)."""

from __future__ import annotations

from collections.abc import Iterable

from gguf.constants import GGMLQuantizationType as Q

# How ggml's CPU backend rounds a matmul's float32 input for each weight type (its
# vec_dot_type): the weight types it pairs with 8-bit blocks, F16, BF16, or none.
ACTIVATION_FORMAT = {
    Q.F32: None, Q.F16: "f16", Q.BF16: "bf16",
    Q.Q4_0: "q8_0", Q.Q5_0: "q8_0", Q.Q8_0: "q8_0", Q.IQ4_NL: "q8_0", Q.MXFP4: "q8_0",
    Q.Q4_1: "q8_1", Q.Q5_1: "q8_1",
    Q.Q2_K: "q8_k", Q.Q3_K: "q8_k", Q.Q4_K: "q8_k", Q.Q5_K: "q8_k", Q.Q6_K: "q8_k",
    Q.IQ4_XS: "q8_k",
}


def anchoring_support(types: Iterable[int], unembedding: int | None = None) -> str:
    """Whether a file whose linear-path matmul weights have these GGUF types, and whose
    unembedding has type `unembedding`, can be anchored to llama.cpp: one line for
    `ggufjac info`."""
    kinds = {Q(t) for t in types} | ({Q(unembedding)} if unembedding is not None else set())
    unknown = sorted(t.name for t in kinds if t != Q.F32 and t not in ACTIVATION_FORMAT)
    if unknown:
        return f"no: llama.cpp's activation rounding for {', '.join(unknown)} is not modelled"
    if unembedding is not None and ACTIVATION_FORMAT.get(Q(unembedding)) == "q8_1":
        # the layers' Q8_1 block sums are frozen (anchor.py); the unembedding's are not
        return (f"approximate ({Q(unembedding).name} unembedding: its Q8_1 block sums are not "
                "reproduced, logits nmse ~1e-6)")
    return "yes (--anchor llama.cpp: llama.cpp's logits reproduced to float32 rounding)"
