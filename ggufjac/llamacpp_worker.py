"""The llama.cpp side, run in a child process (`python -m ggufjac.llamacpp_worker REQ OUT`).

llama.cpp can abort the whole process on some inputs, so ggufjac never calls it in its own
process: `ggufjac.llamacpp` starts this module, passes a JSON request and reads back an .npz
file (plain arrays, no pickle). Tensors inside the graph are captured with llama.cpp's eval
callback (`cb_eval`), named as llama.cpp's model code names them ("l_out-3", "result_norm").
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

import numpy as np

# ggml_tensor begins {enum ggml_type type; ggml_backend_buffer * buffer; int64_t ne[4];
# size_t nb[4]; ...}: stable since GGUF v2. Names are read through ggml_get_name.
_GGML_TYPE_F32, _GGML_TYPE_F16 = 0, 1
_NUMPY_TYPES = {_GGML_TYPE_F32: np.float32, _GGML_TYPE_F16: np.float16}
_NE_OFFSET, _NB_OFFSET = 16, 48


def _load_ggml_base(llama_cpp_module: object) -> ctypes.CDLL:
    libdir = Path(llama_cpp_module.__file__).parent / "lib"  # type: ignore[attr-defined]
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (libdir / name).exists():
            lib = ctypes.CDLL(str(libdir / name))
            break
    else:
        raise RuntimeError(f"libggml-base not found in {libdir}")
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                            ctypes.c_size_t]
    return lib


def _tokenize(llama_cpp: object, vocab: object, text: str) -> list[int]:
    data = text.encode("utf-8")
    cap = len(data) + 16
    buf = (llama_cpp.llama_token * cap)()  # type: ignore[attr-defined]
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, cap, True, False)  # type: ignore
    if n < 0:
        raise RuntimeError(f"tokenize needs {-n} tokens, more than {cap}")
    return list(buf[:n])


def quantize(llama_cpp: object, req: dict) -> dict[str, np.ndarray]:
    params = llama_cpp.llama_model_quantize_default_params()  # type: ignore[attr-defined]
    params.ftype = int(req["ftype"])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(req["model"].encode(), req["out"].encode(),  # type: ignore
                                        ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return {}


def run(req: dict) -> dict[str, np.ndarray]:
    import llama_cpp

    silent = llama_cpp.llama_log_callback(lambda level, text, user: None)
    if not req.get("verbose"):
        llama_cpp.llama_log_set(silent, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    if req.get("action") == "quantize":
        return quantize(llama_cpp, req)
    mparams = llama_cpp.llama_model_default_params()
    mparams.vocab_only = not req["evaluate"]
    mparams.n_gpu_layers = 0
    # Extra buffer types repack weights for special kernels (AMX, ...); the AMX path
    # segfaults on some CPUs that advertise AMX, and repacking changes nothing we compare.
    mparams.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(req["model"].encode(), mparams)
    if not model:
        raise RuntimeError("llama.cpp could not load the model")
    vocab = llama_cpp.llama_model_get_vocab(model)
    tokens = req.get("tokens") or _tokenize(llama_cpp, vocab, req["prompt"])
    out: dict[str, np.ndarray] = {"tokens": np.asarray(tokens, dtype=np.int64)}
    if not req["evaluate"]:
        return out

    n = len(tokens)
    wanted = set(req.get("capture", []))
    captured: dict[str, np.ndarray] = {}
    ggml = _load_ggml_base(llama_cpp)

    listed: list[str] = []

    def on_eval(t: int, ask: bool, user: object) -> bool:
        name = ggml.ggml_get_name(t).decode("utf-8", "replace")
        if ask:
            if req.get("list_names"):
                listed.append(name)
            return name in wanted
        ttype = ctypes.c_int32.from_address(t).value
        if ttype in _NUMPY_TYPES:
            ne = list((ctypes.c_int64 * 4).from_address(t + _NE_OFFSET))
            nb = list((ctypes.c_size_t * 4).from_address(t + _NB_OFFSET))
            nbytes = ggml.ggml_nbytes(t)  # the extent of a strided view, not only its elements
            raw = np.empty(nbytes, dtype=np.uint8)
            ggml.ggml_backend_tensor_get(t, raw.ctypes.data, 0, nbytes)
            # numpy order is ggml's reversed: [ne3, ne2, ne1, ne0]; views keep their strides.
            arr = np.lib.stride_tricks.as_strided(raw.view(_NUMPY_TYPES[ttype]),
                                                  shape=ne[::-1], strides=nb[::-1])
            captured[name] = np.ascontiguousarray(arr)
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(on_eval)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = max(n, 8)
    cparams.n_batch = cparams.n_ubatch = max(n, 8)
    cparams.n_seq_max = 1
    cparams.n_threads = cparams.n_threads_batch = os.cpu_count() or 1
    cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if req["flash_attn"]
                               else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    if wanted or req.get("list_names"):
        cparams.cb_eval = callback
        cparams.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    for i, tok in enumerate(tokens):
        batch.token[i] = tok
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1  # all positions produce logits
    batch.n_tokens = n
    rc = llama_cpp.llama_decode(ctx, batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    logits = np.empty((n, n_vocab), dtype=np.float32)
    for i in range(n):
        ptr = llama_cpp.llama_get_logits_ith(ctx, i)
        logits[i] = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
    out["logits"] = logits
    for name, arr in captured.items():
        out["capture:" + name] = arr
    if req.get("list_names"):
        out["names"] = np.asarray(listed)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return out


def main() -> None:
    req_path, out_path = sys.argv[1], sys.argv[2]
    req = json.loads(Path(req_path).read_text())
    try:
        arrays = run(req)
    except Exception as e:  # reported to the parent as one line
        print(f"ggufjac-worker-error: {e}", file=sys.stderr)
        sys.exit(3)
    tmp = out_path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main()
