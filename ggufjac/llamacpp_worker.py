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
import re
import sys
from pathlib import Path

import numpy as np

from .threads import available_cores

# ggml_tensor begins {enum ggml_type type; ggml_backend_buffer * buffer; int64_t ne[4];
# size_t nb[4]; ...}: stable since GGUF v2. Names are read through ggml_get_name.
_GGML_TYPE_F32, _GGML_TYPE_F16, _GGML_TYPE_I32 = 0, 1, 26
# I32: index tensors (a mixture of experts' selected experts, 'ffn_moe_topk')
_NUMPY_TYPES = {_GGML_TYPE_F32: np.float32, _GGML_TYPE_F16: np.float16,
                _GGML_TYPE_I32: np.int32}
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


def _tokenize(llama_cpp: object, vocab: object, text: str, special: bool = False) -> list[int]:
    """llama.cpp's tokens for `text`; the buffer grows to what llama_tokenize asks for (an
    SPM vocabulary that spells the space marker in byte tokens can need more tokens than the
    text has bytes). `special`: a rendered chat prompt, tokenized as llama-cpp-python
    tokenizes one (special-token texts parsed as special tokens, no BOS added: the template
    writes it where it wants it)."""
    data = text.encode("utf-8")
    cap = len(data) + 16
    for _ in range(2):
        buf = (llama_cpp.llama_token * cap)()  # type: ignore[attr-defined]
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, cap,  # type: ignore
                                     not special, special)
        if n >= 0:
            return list(buf[:n])
        cap = -n
    raise RuntimeError(f"tokenize asked for {cap} tokens twice")


def _pieces(llama_cpp: object, vocab: object, tokens: list[int]) -> dict[str, np.ndarray]:
    """The bytes each token stands for (special tokens as their text), end to end, and
    where each one ends."""
    pieces = []
    for t in tokens:
        cap = 64
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = llama_cpp.llama_token_to_piece(vocab, t, buf, cap, 0, True)  # type: ignore
            if n >= 0:
                pieces.append(buf.raw[:n])
                break
            cap = -n
        else:
            raise RuntimeError(f"token_to_piece asked for {cap} bytes twice")
    return {"pieces": np.frombuffer(b"".join(pieces), dtype=np.uint8).copy(),
            "piece_ends": np.cumsum([len(p) for p in pieces], dtype=np.int64)}


def quantize(llama_cpp: object, req: dict) -> dict[str, np.ndarray]:
    params = llama_cpp.llama_model_quantize_default_params()  # type: ignore[attr-defined]
    params.ftype = int(req["ftype"])
    params.nthread = os.cpu_count() or 1
    params.allow_requantize = bool(req.get("allow_requantize", False))
    rc = llama_cpp.llama_model_quantize(req["model"].encode(), req["out"].encode(),  # type: ignore
                                        ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return {}


# "load_tensors:   CPU_REPACK model buffer size =   123.45 MiB"
_BUFFER_LINE = re.compile(r"(\S+) model buffer size\s*=\s*([0-9.]+) MiB")


def _token_axis(name: str, shape: tuple[int, ...], n_tokens: int) -> int:
    """Which numpy axis of a captured tensor runs over a micro-batch's `n_tokens` tokens:
    ggml's ne1 for attention scores and probabilities ([ne3, heads, tokens, n_kv]), else the
    outermost axis of that length ([.., tokens, heads, head_dim] or [.., tokens, features]).
    For one token, axis 0: the leading axes are then all 1, and rows stay in order."""
    if name.startswith("kq"):
        return len(shape) - 2
    if n_tokens == 1:
        return 0
    return next(a for a in range(len(shape) - 1) if shape[a] == n_tokens)


def _join(name: str, pieces: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """One array from a tensor captured once per micro-batch (with its token count): pieces
    joined along the token axis of the largest; attention probabilities padded with zeros
    on the key axis (a later micro-batch also sees the keys of the earlier ones)."""
    if len(pieces) == 1:
        return pieces[0][0]
    largest, n = max(pieces, key=lambda p: p[1])
    axis = _token_axis(name, largest.shape, n)
    arrays = [a for a, _ in pieces]
    if name.startswith("kq"):
        width = max(a.shape[-1] for a in arrays)
        arrays = [np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])]) for a in arrays]
    return np.concatenate(arrays, axis=axis)


def control_vector_setter(llama_cpp: object) -> object:
    """llama-cpp-python's function that applies a control vector to a context: named
    llama_set_adapter_cvec from 0.3.17, llama_apply_adapter_cvec before (same arguments)."""
    for name in ("llama_set_adapter_cvec", "llama_apply_adapter_cvec"):
        if hasattr(llama_cpp, name):
            return getattr(llama_cpp, name)
    raise RuntimeError("this llama-cpp-python has neither llama_set_adapter_cvec nor "
                       "llama_apply_adapter_cvec: control vectors cannot be applied")


def _apply_control_vector(llama_cpp: object, model: object, ctx: object, path: str) -> None:
    """Load a control vector file as llama.cpp's common loader does (direction.N, N >= 1,
    F32 [n_embd]; layer N's row at offset n_embd * (N - 1)) and apply it to every block."""
    from gguf import GGUFReader

    n_embd = llama_cpp.llama_model_n_embd(model)  # type: ignore[attr-defined]
    n_layer = llama_cpp.llama_model_n_layer(model)  # type: ignore[attr-defined]
    rows: dict[int, np.ndarray] = {}
    for t in GGUFReader(path).tensors:
        m = re.fullmatch(r"direction\.(\d+)", t.name)
        if m is None or int(m.group(1)) == 0:
            raise RuntimeError(f"{path}: tensor {t.name!r} is not a direction.N (N >= 1)")
        if int(t.tensor_type) != _GGML_TYPE_F32 or t.data.size != n_embd:
            raise RuntimeError(f"{path}: {t.name} is not F32 with n_embd = {n_embd} values")
        rows[int(m.group(1))] = np.asarray(t.data, dtype=np.float32)
    data = np.zeros((max(rows), n_embd), dtype=np.float32)
    for n, row in rows.items():
        data[n - 1] = row
    apply = control_vector_setter(llama_cpp)
    pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if apply(ctx, pointer, data.size, n_embd, 1, n_layer) != 0:
        raise RuntimeError(f"llama.cpp refused the control vector {path}")


def run(req: dict) -> dict[str, np.ndarray]:
    import llama_cpp

    log: list[str] = []

    def keep_log(level: int, text: bytes, user: object) -> None:
        log.append(text.decode("utf-8", "replace"))

    on_log = llama_cpp.llama_log_callback(keep_log)
    if not req.get("verbose"):
        llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    if req.get("action") == "quantize":
        return quantize(llama_cpp, req)
    settings = req.get("settings", {})
    mparams = llama_cpp.llama_model_default_params()
    mparams.vocab_only = not req["evaluate"]
    mparams.n_gpu_layers = 0
    # llama.cpp's default (true) repacks weights into extra buffer types (interleaved layouts
    # with their own GEMM kernels, chosen by CPU features): the run its own tools make.
    mparams.use_extra_bufts = bool(settings.get("repack", True))
    model = llama_cpp.llama_model_load_from_file(req["model"].encode(), mparams)
    if not model:
        said = [ln.strip() for ln in log if "fail" in ln.lower() or "error" in ln.lower()]
        why = "llama.cpp could not load the model" + (f" ({said[-1]})" if said else "")
        if mparams.use_extra_bufts:
            why += ("; with weight repacking on, llama.cpp copies the repacked tensors into "
                    "memory instead of mapping them from the file, so a file near or above "
                    "the machine's RAM can fail to load: --no-repack maps it")
        raise RuntimeError(why)
    vocab = llama_cpp.llama_model_get_vocab(model)
    if "prompts" in req:  # many prompts in one start: all tokens, and where each one's end
        lists = [_tokenize(llama_cpp, vocab, text) for text in req["prompts"]]
        return {"tokens": np.asarray([t for ts in lists for t in ts], dtype=np.int64),
                "ends": np.cumsum([len(ts) for ts in lists], dtype=np.int64)}
    if "token_lists" in req:  # many prompts' logits from one start: a fresh context each
        runs = [_evaluate(llama_cpp, model, vocab, mparams, req, settings, list(ts), log,
                          {"tokens": np.asarray(ts, dtype=np.int64)})
                for ts in req["token_lists"]]
        llama_cpp.llama_model_free(model)
        return {"tokens": np.asarray([t for ts in req["token_lists"] for t in ts], dtype=np.int64),
                "ends": np.cumsum([len(ts) for ts in req["token_lists"]], dtype=np.int64),
                "logits": np.concatenate([r["logits"] for r in runs]),
                "resolved": runs[-1]["resolved"]}
    tokens = req.get("tokens") or _tokenize(llama_cpp, vocab, req["prompt"],
                                            bool(req.get("special")))
    out: dict[str, np.ndarray] = {"tokens": np.asarray(tokens, dtype=np.int64)}
    if req.get("special"):
        out.update(_pieces(llama_cpp, vocab, tokens))
    if not req["evaluate"]:
        return out
    out = _evaluate(llama_cpp, model, vocab, mparams, req, settings, tokens, log, out)
    llama_cpp.llama_model_free(model)
    return out


def _evaluate(llama_cpp: object, model: object, vocab: object, mparams: object, req: dict,
              settings: dict, tokens: list[int], log: list[str],
              out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One prompt decoded in a context of its own (freed after): its logits, the captured
    graph tensors and how llama.cpp ran, added to `out`."""
    n = len(tokens)
    wanted = set(req.get("capture", []))
    pieces: dict[str, list[np.ndarray]] = {}  # one per micro-batch
    ggml = _load_ggml_base(llama_cpp)
    listed: list[str] = []
    seen = {"kq_soft_max": False}
    ubatch_sizes: list[int] = []  # tokens of each micro-batch, in the order evaluated

    def on_eval(t: int, ask: bool, user: object) -> bool:
        name = ggml.ggml_get_name(t).decode("utf-8", "replace")
        if ask:
            if req.get("list_names"):
                listed.append(name)
            if name.startswith("kq_soft_max"):
                seen["kq_soft_max"] = True
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
            pieces.setdefault(name, []).append(np.ascontiguousarray(arr))
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(on_eval)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = max(n, 8)
    if settings.get("n_batch"):
        cparams.n_batch = int(settings["n_batch"])
    if settings.get("n_ubatch"):
        cparams.n_ubatch = int(settings["n_ubatch"])
    cparams.n_ubatch = min(cparams.n_ubatch, cparams.n_batch)  # as llama.cpp clamps it
    cparams.n_seq_max = 1
    threads = int(settings.get("threads") or available_cores())
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.flash_attn_type = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
                               "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                               "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}[
        settings.get("flash_attn", "auto")]
    # The callback is always set, so the graph's node names tell whether flash attention ran;
    # tensors not asked for are computed in one go, as without it.
    cparams.cb_eval = callback
    cparams.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    if req.get("control_vector"):
        _apply_control_vector(llama_cpp, model, ctx, req["control_vector"])
    n_batch, n_ubatch = int(cparams.n_batch), int(cparams.n_ubatch)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    # Every position's logits (what anchoring needs), or the last one's only, as llama.cpp's
    # tools decode a prompt (its last layer then computes the other rows only up to attention)
    all_outputs = req.get("outputs", "all") == "all"
    logits = np.empty((n if all_outputs else 1, n_vocab), dtype=np.float32)
    batch = llama_cpp.llama_batch_init(min(n, n_batch), 0, 1)
    # Decoded as llama.cpp's tools decode a prompt: batches of n_batch tokens, which llama.cpp
    # splits into micro-batches of n_ubatch (each one graph evaluation; captured tensors come
    # once per micro-batch).
    for start in range(0, n, n_batch):
        chunk = tokens[start:start + n_batch]
        for i, tok in enumerate(chunk):
            batch.token[i] = tok
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if all_outputs else int(start + i == n - 1)
        batch.n_tokens = len(chunk)
        ubatch_sizes += [min(n_ubatch, len(chunk) - u) for u in range(0, len(chunk), n_ubatch)]
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        for i in range(len(chunk)) if all_outputs else [len(chunk) - 1] * (start + len(chunk) == n):
            ptr = llama_cpp.llama_get_logits_ith(ctx, i)
            logits[start + i if all_outputs else 0] = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
    out["logits"] = logits
    for name, parts in pieces.items():
        # A name can label several nodes of one graph (Qcur before and after RoPE): each
        # micro-batch's graph has the same nodes, and the last one so named is kept.
        if not all_outputs:  # only the last micro-batch has outputs
            out["capture:" + name] = parts[-1]
            continue
        per, rest = divmod(len(parts), len(ubatch_sizes))
        if rest or not per:
            raise RuntimeError(f"graph tensor {name!r} was captured {len(parts)} times in "
                               f"{len(ubatch_sizes)} micro-batches")
        out["capture:" + name] = _join(name, list(zip(parts[per - 1::per], ubatch_sizes)))
    if req.get("list_names"):
        out["names"] = np.asarray(listed)
    buffers: dict[str, float] = {}
    for line in log:
        if m := _BUFFER_LINE.search(line):
            buffers[m.group(1)] = buffers.get(m.group(1), 0.0) + float(m.group(2))
    resolved = {
        "flash_attn": not seen["kq_soft_max"], "n_batch": n_batch, "n_ubatch": n_ubatch,
        "threads": threads, "repack": bool(mparams.use_extra_bufts),
        "weight_buffers_mib": buffers,
        "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
    }
    out["resolved"] = np.asarray(json.dumps(resolved))
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
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
