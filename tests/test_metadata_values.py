"""Hostile metadata values through `info`, `check` and `jacobian`: every case runs or fails
with one line naming the file and the key (or the tensor the value contradicts) — no
traceback, no hang (tools/fuzz_metadata.py makes the cases)."""

from __future__ import annotations

import json
import re
import signal
from contextlib import contextmanager

import pytest
from click.testing import CliRunner

from gguf.constants import GGUFValueType as V

from ggufjac.cli import main
from ggufjac.errors import GGUFError
from ggufjac.families import config_from_gguf
from ggufjac.gguf_file import GGUFFile
from tools.fuzz_metadata import TINY, cases, write_case
from tools.synthetic import write_synthetic_gguf

CASE_SECONDS = 60  # far above what any case takes; a hang fails the case


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("metadata")
    return [(name, key, write_case(d, i, key, override))
            for i, (name, key, override) in enumerate(cases())]


@contextmanager
def _time_bound(name: str):
    def expire(signum, frame):  # noqa: ANN001
        raise TimeoutError(f"case {name} ran over {CASE_SECONDS} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(CASE_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _run_all(case_files, command: list[str], tmp_path) -> dict[int, int]:
    """Run `command` on every case; return {exit code: count}. Fails on a traceback, a
    hang, or an error message that names neither the file and key nor the tensor."""
    codes: dict[int, int] = {}
    for i, (name, key, path) in enumerate(case_files):
        args = [a.replace("{out}", str(tmp_path / f"out{i}")) for a in command]
        with _time_bound(name):
            r = CliRunner().invoke(main, [args[0], str(path), *args[1:]])
        assert r.exception is None or isinstance(r.exception, SystemExit), \
            (name, "".join(__import__("traceback").format_exception(r.exception)))
        codes[r.exit_code] = codes.get(r.exit_code, 0) + 1
        if r.exit_code == 2:
            lines = [ln for ln in r.stderr.strip().splitlines()
                     if not ln.endswith(" ...")]  # progress lines before the error
            assert len(lines) == 1 and lines[0].startswith("ggufjac: error: "), (name, r.stderr)
            if "the prompt is" in lines[0]:  # a valid file whose context is too short
                continue
            assert str(path) in lines[0], (name, lines[0])
            # the key changed, or the key or tensor its value contradicts
            assert re.search(r"llama\.[a-z_.]+|tensor '|rope scaling", lines[0]), (name, lines[0])
        elif r.exit_code == 1 and command[0] == "info":
            assert "supported      no: " in r.stdout and (key in r.stdout or "tensor" in r.stdout)
    return codes


def test_info_on_hostile_metadata(case_files, tmp_path) -> None:
    codes = _run_all(case_files, ["info", "--no-scan"], tmp_path)
    assert len(case_files) >= 300 and codes.get(1, 0) > 100 and codes.get(0, 0) > 30


def test_jacobian_on_hostile_metadata(case_files, tmp_path) -> None:
    codes = _run_all(case_files, ["jacobian", "-p", "the bridge", "--dtype", "float64",
                                  "--out", "{out}"], tmp_path)
    assert codes.get(2, 0) > 200 and codes.get(0, 0) > 30


def test_check_on_hostile_metadata(case_files, tmp_path) -> None:
    codes = _run_all(case_files, ["check", "-p", "the bridge", "--no-noise-floor"], tmp_path)
    # refused (2), or run and agreeing with llama.cpp (0): a file that runs and disagrees (1)
    # would be read as another model than llama.cpp's
    assert set(codes) <= {0, 2}, codes
    assert codes.get(2, 0) > 200 and codes.get(0, 0) > 30, codes


# Keys whose meaning llama.cpp decides: each file below runs in llama.cpp, and ggufjac must
# read it as llama.cpp does (its logits the reference), or refuse it.
@pytest.mark.parametrize("arch, metadata, rope_scale, softcap", [
    # the scaling type defaults to linear in llama.cpp: a lone factor divides positions
    ("llama", {"rope.scaling.factor": (4.0, V.FLOAT32)}, 0.25, None),
    # type none: the factor is ignored
    ("llama", {"rope.scaling.type": ("none", V.STRING),
               "rope.scaling.factor": (4.0, V.FLOAT32)}, 1.0, None),
    # llama.cpp reads final_logit_softcapping for Gemma 3, not for Llama
    ("llama", {"final_logit_softcapping": (3.0, V.FLOAT32)}, 1.0, None),
    ("gemma3", {"final_logit_softcapping": (3.0, V.FLOAT32)}, 1.0, 3.0),
])
def test_metadata_read_as_llama_cpp_reads_it(tmp_path, arch, metadata, rope_scale,
                                             softcap) -> None:
    path = write_synthetic_gguf(tmp_path / f"{arch}.gguf", arch, TINY, "F32", metadata=metadata)
    with GGUFFile(path) as g:
        cfg = config_from_gguf(g)
    assert cfg.rope_scale == rope_scale and cfg.final_logit_softcap == softcap
    out = tmp_path / "check.json"
    r = CliRunner().invoke(main, ["check", str(path), "-p", "the bridge out of the city",
                                  "--no-noise-floor", "--json", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["nmse"] < 1e-6, report["nmse"]  # float32 rounding, not another model


@pytest.mark.parametrize("key, value", [
    ("rope.freq_base", (0.5, V.FLOAT32)),  # frequencies rising with the dimension
    ("rope.scaling.factor", (1e-3, V.FLOAT32)),  # positions multiplied by 1000
    ("rope.scaling.factor", (4.0, V.FLOAT64)),  # llama.cpp refuses a non-float32 float key
    ("attention.layer_norm_rms_epsilon", (1, V.UINT32)),
])
def test_metadata_llama_cpp_would_misread_is_refused(tmp_path, key, value) -> None:
    path = write_synthetic_gguf(tmp_path / "m.gguf", "llama", TINY, "F32", metadata={key: value})
    with GGUFFile(path) as g, pytest.raises(GGUFError) as e:
        config_from_gguf(g)
    assert f"llama.{key}" in str(e.value) and str(path) in str(e.value)
