"""llama.cpp's own forward pass and tokenizer, run in an isolated child process.

Whatever llama.cpp does with a file (it can abort or crash the process), the caller gets
either the arrays or one `LlamaCppError` naming what failed and the settings it ran with.

By default llama.cpp runs as its own tools run it on this machine (`RunSettings()`): weights
repacked into its extra buffer types where the CPU has kernels for them, flash attention as
its "auto" decides, prompts decoded in batches of 2048 split into micro-batches of 512. Each
setting a user can flip in llama.cpp has a field here, so a run made with other flags can be
matched.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import LlamaCppError
# How llama.cpp is run is plain data (run_settings.py), importable from here too.
from .run_settings import DEFAULT_SETTINGS, RunSettings, repack_by_default  # noqa: F401


@dataclass
class LlamaCppRun:
    """What llama.cpp computed for one prompt, and how it ran."""

    tokens: list[int]
    logits: np.ndarray | None = None  # [N, vocab] float32, every position
    # graph tensors by name, shaped as ggml's ne reversed ([ne3, ne2, ne1, ne0]), F32 or F16;
    # a prompt decoded in several micro-batches has its pieces joined along the token axis
    captured: dict[str, np.ndarray] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # every graph node, in order (list_names)
    settings: RunSettings = DEFAULT_SETTINGS
    # what llama.cpp resolved and reported: flash attention used, batch sizes, threads, its
    # version and CPU features (llama_print_system_info), the buffer types weights went to
    resolved: dict[str, object] = field(default_factory=dict)

    @property
    def flash_attn(self) -> bool:
        """Whether flash attention ran (what "auto" decided)."""
        return bool(self.resolved["flash_attn"])

    def rows(self, name: str) -> np.ndarray:
        """A captured per-token tensor as [N, features] (heads flattened into features)."""
        return self.captured[name].reshape(len(self.tokens), -1)

    def layer_outputs(self, n_layer: int) -> list[np.ndarray]:
        """Each layer's output residual stream [N, d] ('l_out-i')."""
        return [self.rows(f"l_out-{i}") for i in range(n_layer)]


# The worker reads ggml_tensor fields at fixed offsets and llama.cpp's graph tensor names,
# which a new llama.cpp may change: the llama-cpp-python releases this code was tested with
# (pyproject.toml pins the same range). Another version runs, with a warning.
TESTED_LLAMA_CPP_PYTHON = ((0, 3, 16), (0, 3, 36))
_warned_versions: set[str] = set()


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("."):
        digits = "".join(c for c in p if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_version(version: str) -> bool:
    """Whether `version` is in the tested range; warns once per process on stderr if not."""
    low, high = TESTED_LLAMA_CPP_PYTHON
    tested = low <= _version_tuple(version) <= high
    if not tested and version not in _warned_versions:
        _warned_versions.add(version)
        print(f"ggufjac: warning: llama-cpp-python {version} is outside the tested range "
              f"{'.'.join(map(str, low))}-{'.'.join(map(str, high))}: llama.cpp's graph "
              "tensors may be named or laid out differently; check `ggufjac check --anchor`",
              file=sys.stderr)
    return tested


# The child process: `python -m ggufjac.llamacpp_worker REQUEST OUT`.
WORKER_COMMAND = (sys.executable, "-m", "ggufjac.llamacpp_worker")


def _crash_message(request: dict, signal_name: str, last_line: str | None) -> str:
    settings = request.get("settings", {})
    why = f"llama.cpp crashed ({signal_name})"
    if last_line:
        why += f"; it said: {last_line}"
    if settings.get("repack", True):
        return (why + ". It ran with weight repacking on (llama.cpp's default extra buffer "
                "types, whose kernels depend on the CPU); --no-repack runs the plain CPU "
                "kernels instead (and says so in the report)")
    return why + f" (settings: {RunSettings(**settings).describe()})"


class PendingCall:
    """A llama.cpp child started and not yet waited for: the command line starts the
    tokenizer before importing torch, so the two run on different cores."""

    def __init__(self, request: dict) -> None:
        self.request = request
        self._tmp = tempfile.TemporaryDirectory(prefix="ggufjac-llamacpp-")
        req_path = Path(self._tmp.name) / "req.json"
        self.out_path = Path(self._tmp.name) / "out.npz"
        req_path.write_text(json.dumps(request))
        self.proc = subprocess.Popen([*WORKER_COMMAND, str(req_path), str(self.out_path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL)

    def result(self, timeout: float) -> dict[str, np.ndarray]:
        """The child's arrays, or one LlamaCppError saying why there are none."""
        try:
            try:
                _, stderr = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise LlamaCppError(f"{self.request['model']}: llama.cpp did not finish within "
                                    f"{timeout:.0f} s") from None
            if self.proc.returncode != 0 or not self.out_path.exists():
                lines = [ln for ln in stderr.splitlines() if ln.strip()]
                own = [ln for ln in lines if ln.startswith("ggufjac-worker-error: ")]
                if own:
                    why = own[-1].removeprefix("ggufjac-worker-error: ")
                elif self.proc.returncode < 0:
                    why = _crash_message(self.request, signal.Signals(-self.proc.returncode).name,
                                         lines[-1].strip() if lines else None)
                else:
                    why = f"exit status {self.proc.returncode}" + \
                        (f": {lines[-1].strip()}" if lines else "")
                raise LlamaCppError(f"{self.request['model']}: llama.cpp failed: {why}")
            with np.load(self.out_path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        finally:
            self.close()

    def close(self) -> None:
        """Stop the child if it still runs and remove its files."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        self._tmp.cleanup()


def _call(request: dict, timeout: float) -> dict[str, np.ndarray]:
    return PendingCall(request).result(timeout)


def start_tokenize(model: str | Path, prompt: str, special: bool = False) -> PendingCall:
    """`tokenize`, started in the background: `.result(timeout)["tokens"]` when needed.
    `special`: `tokenize_special`'s tokenization (its "pieces" and "piece_ends" too)."""
    return PendingCall({"model": str(model), "prompt": prompt, "evaluate": False,
                        "special": special})


def pieces_of(out: dict[str, np.ndarray]) -> list[bytes]:
    """The token pieces of a special tokenization's result (`start_tokenize(special=True)`)."""
    data, ends = out["pieces"].tobytes(), out["piece_ends"].tolist()
    return [data[s:e] for s, e in zip([0, *ends[:-1]], ends)]


def tokenize_special(model: str | Path, prompt: str, timeout: float = 300
                     ) -> tuple[list[int], list[bytes]]:
    """llama.cpp's tokens for a rendered chat prompt as llama-cpp-python tokenizes one
    (special-token texts such as <|im_start|> parsed as special tokens, no BOS added: the
    template writes it), and the bytes each token stands for."""
    out = start_tokenize(model, prompt, special=True).result(timeout)
    return out["tokens"].tolist(), pieces_of(out)


def tokenize(model: str | Path, prompt: str, timeout: float = 300) -> list[int]:
    """llama.cpp's tokens for `prompt`, special tokens (BOS) added as the file says."""
    out = _call({"model": str(model), "prompt": prompt, "evaluate": False}, timeout)
    return out["tokens"].tolist()


def tokenize_many(model: str | Path, prompts: list[str], timeout: float = 600) -> list[list[int]]:
    """`tokenize` of every prompt in one llama.cpp start (a prompt set pays it once)."""
    if not prompts:
        return []
    out = _call({"model": str(model), "prompts": list(prompts), "evaluate": False}, timeout)
    tokens, ends = out["tokens"].tolist(), out["ends"].tolist()
    return [tokens[s:e] for s, e in zip([0, *ends[:-1]], ends)]


def quantize(source: str | Path, target: str | Path, ftype: int, timeout: float = 600,
             allow_requantize: bool = False) -> None:
    """llama.cpp's own quantizer (`llama_model_quantize`): source GGUF -> target GGUF.
    `allow_requantize`: also from a quantized source (its tensors are dequantized first:
    the result is a requantization, not a quantization of the original weights)."""
    _call({"action": "quantize", "model": str(source), "out": str(target), "ftype": ftype,
           "allow_requantize": allow_requantize}, timeout)


def evaluate(model: str | Path, tokens: list[int], settings: RunSettings = DEFAULT_SETTINGS,
             *, capture: list[str] | None = None, list_names: bool = False,
             last_only: bool = False, control_vector: str | Path | None = None,
             timeout: float = 600) -> LlamaCppRun:
    """Run llama.cpp (CPU) on `tokens` with `settings`: logits at every position and the
    named graph tensors (F32 and F16 ones); `list_names` also returns the name of every node
    of the graph. `last_only`: logits of the last position only ([1, vocab]), as llama.cpp's
    tools decode a prompt; captured tensors are then the last micro-batch's.
    `control_vector`: a control vector file (cvector.py) applied to every block."""
    out = _call({"model": str(model), "tokens": list(tokens), "evaluate": True,
                 "settings": dataclasses.asdict(settings), "capture": capture or [],
                 "list_names": list_names, "outputs": "last" if last_only else "all",
                 "control_vector": None if control_vector is None else str(control_vector)},
                timeout)
    captured = {k.removeprefix("capture:"): v for k, v in out.items() if k.startswith("capture:")}
    names = out["names"].tolist() if "names" in out else []
    resolved = json.loads(str(out["resolved"]))
    resolved["tested_version"] = check_version(str(resolved["llama_cpp_python"]))
    return LlamaCppRun(tokens=out["tokens"].tolist(), logits=out["logits"], captured=captured,
                       names=names, settings=settings, resolved=resolved)


def evaluate_many(model: str | Path, token_lists: list[list[int]],
                  settings: RunSettings = DEFAULT_SETTINGS, timeout: float = 600
                  ) -> list[np.ndarray]:
    """llama.cpp's last-position logits [vocab] (float32) of each prompt, from one start:
    `evaluate(..., last_only=True)` of each, each in a fresh context of its own (the same
    decoding as a start per prompt), the model loaded once (a prompt set pays it once)."""
    if not token_lists:
        return []
    out = _call({"model": str(model), "token_lists": [list(t) for t in token_lists],
                 "evaluate": True, "settings": dataclasses.asdict(settings), "capture": [],
                 "list_names": False, "outputs": "last", "control_vector": None},
                timeout * len(token_lists))
    return [row for row in out["logits"]]
