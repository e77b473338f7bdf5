"""llama.cpp's own forward pass and tokenizer, run in an isolated child process.

Whatever llama.cpp does with a file (it can abort the process), the caller gets either the
arrays or one `LlamaCppError` naming what failed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import LlamaCppError


@dataclass
class LlamaCppRun:
    """What llama.cpp computed for one prompt."""

    tokens: list[int]
    logits: np.ndarray | None = None  # [N, vocab] float32, every position
    # graph tensors by name, shaped as ggml's ne reversed ([ne3, ne2, ne1, ne0]), F32 or F16
    captured: dict[str, np.ndarray] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # every graph node, in order (list_names)

    def rows(self, name: str) -> np.ndarray:
        """A captured per-token tensor as [N, features] (heads flattened into features)."""
        return self.captured[name].reshape(len(self.tokens), -1)

    def layer_outputs(self, n_layer: int) -> list[np.ndarray]:
        """Each layer's output residual stream [N, d] ('l_out-i')."""
        return [self.rows(f"l_out-{i}") for i in range(n_layer)]


def _call(request: dict, timeout: float) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="ggufjac-llamacpp-") as tmp:
        req_path, out_path = Path(tmp) / "req.json", Path(tmp) / "out.npz"
        req_path.write_text(json.dumps(request))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "ggufjac.llamacpp_worker", str(req_path), str(out_path)],
                capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise LlamaCppError(f"{request['model']}: llama.cpp did not finish within "
                                f"{timeout:.0f} s") from None
        if proc.returncode != 0 or not out_path.exists():
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            own = [ln for ln in lines if ln.startswith("ggufjac-worker-error: ")]
            if own:
                why = own[-1].removeprefix("ggufjac-worker-error: ")
            elif proc.returncode < 0:
                why = f"llama.cpp killed its process ({signal.Signals(-proc.returncode).name})"
                if lines:
                    why += f"; it said: {lines[-1].strip()}"
            else:
                why = f"exit status {proc.returncode}" + (f": {lines[-1].strip()}" if lines else "")
            raise LlamaCppError(f"{request['model']}: llama.cpp failed: {why}")
        with np.load(out_path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def tokenize(model: str | Path, prompt: str, timeout: float = 300) -> list[int]:
    """llama.cpp's tokens for `prompt`, special tokens (BOS) added as the file says."""
    out = _call({"model": str(model), "prompt": prompt, "evaluate": False}, timeout)
    return out["tokens"].tolist()


def quantize(source: str | Path, target: str | Path, ftype: int, timeout: float = 600) -> None:
    """llama.cpp's own quantizer (`llama_model_quantize`): source GGUF -> target GGUF."""
    _call({"action": "quantize", "model": str(source), "out": str(target), "ftype": ftype},
          timeout)


def evaluate(model: str | Path, tokens: list[int], *, flash_attn: bool = False,
             capture: list[str] | None = None, list_names: bool = False,
             timeout: float = 600) -> LlamaCppRun:
    """Run llama.cpp (CPU) on `tokens`: logits at every position and the named graph tensors
    (F32 and F16 ones); `list_names` also returns the name of every node of the graph."""
    out = _call({"model": str(model), "tokens": list(tokens), "evaluate": True,
                 "flash_attn": flash_attn, "capture": capture or [],
                 "list_names": list_names}, timeout)
    captured = {k.removeprefix("capture:"): v for k, v in out.items() if k.startswith("capture:")}
    names = out["names"].tolist() if "names" in out else []
    return LlamaCppRun(tokens=out["tokens"].tolist(), logits=out["logits"], captured=captured,
                       names=names)
