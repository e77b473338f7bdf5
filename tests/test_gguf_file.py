"""Our GGUF reader against gguf-py's GGUFReader, and its refusal of broken headers."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGUFReader

from ggufjac.errors import GGUFError
from ggufjac.gguf_file import GGUFFile, LazyArray
from tools.synthetic import Shape, write_synthetic_gguf


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    return write_synthetic_gguf(path, "qwen3", Shape(n_layer=2), "Q4_K_M")


def test_metadata_and_index_match_gguf_py(small_gguf) -> None:
    ours, ref = GGUFFile(small_gguf), GGUFReader(str(small_gguf))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        theirs = field.contents()
        mine = ours.array(key) if isinstance(ours.metadata[key], (list, LazyArray)) \
            else ours.metadata[key]
        if isinstance(theirs, float):
            assert mine == pytest.approx(theirs, rel=1e-7), key
        else:
            assert mine == theirs, key
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.type == t.tensor_type and list(mine.shape) == t.shape.tolist()
        assert mine.n_bytes == t.n_bytes and mine.offset == t.data_offset
        assert np.array_equal(ours.tensor_data(t.name), np.asarray(t.data).view(np.uint8)
                              .reshape(-1))


def test_real_file_keeps_vocabulary_lazy(gemma32) -> None:
    g = gemma32.gguf
    assert isinstance(g.metadata["tokenizer.ggml.tokens"], LazyArray)
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 262144
    assert g.architecture == "gemma3" and len(g.tensors) == 236


@pytest.mark.parametrize("cut", [3, 10, 30, 1000, 5000])
def test_truncated_header_names_what_is_missing(small_gguf, tmp_path, cut: int) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(small_gguf.read_bytes()[:cut])
    with pytest.raises(GGUFError) as e:
        GGUFFile(bad)
    assert str(bad) in str(e.value)


def test_bad_magic_and_version(small_gguf, tmp_path) -> None:
    data = bytearray(small_gguf.read_bytes())
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    with pytest.raises(GGUFError, match="magic"):
        GGUFFile(bad)
    data[4:8] = (99).to_bytes(4, "little")
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="version"):
        GGUFFile(bad)


# Run in a child process: open a GGUF, truncate it as another process might (its largest
# tensor and all after it gone), then read that tensor one way; a library error is printed
# as one line and exits 2, as the command line does.
_READ_AFTER_TRUNCATION = """
import os, sys
import numpy as np
from ggufjac.errors import GgufjacError
from ggufjac.gguf_file import GGUFFile

path, how = sys.argv[1], sys.argv[2]
if how == "weights":
    from ggufjac.api import open_model
    weights = open_model(path).weights
    g = weights.gguf
else:
    g = GGUFFile(path)
name = max(g.tensors, key=lambda n: g.tensors[n].n_bytes)
info = g.tensors[name]
os.truncate(path, info.offset)
try:
    if how == "unchecked":  # the mapping read as it is, no check first: what is guarded against
        print(int(np.frombuffer(g._mmap, np.uint8, info.n_bytes, info.offset).sum()))
    elif how == "tensor_data":
        print(int(g.tensor_data(name).sum()))
    elif how == "mapped":
        print(int(g.mapped(info.offset, info.n_bytes).sum()))
    elif how == "weights":
        print(float(weights.tensor(name).sum()))
except GgufjacError as e:
    print(f"ggufjac: error: {e}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.parametrize("how", ["tensor_data", "mapped", "weights"])
def test_a_file_truncated_while_open_is_one_error_not_a_bus_error(small_gguf, tmp_path,
                                                                  how: str) -> None:
    """Reading mapped bytes past the end of a file kills the process (SIGBUS) rather than
    raising: the unchecked read does die so; every read of the library first finds the file
    shorter than when opened and says so in one line naming it."""
    import shutil
    import signal
    import subprocess
    import sys

    def run(mode: str) -> subprocess.CompletedProcess:
        path = tmp_path / f"{mode}.gguf"
        shutil.copyfile(small_gguf, path)
        return subprocess.run([sys.executable, "-c", _READ_AFTER_TRUNCATION, str(path), mode],
                              capture_output=True, text=True, timeout=300)

    unchecked = run("unchecked")
    assert unchecked.returncode == -signal.SIGBUS, (unchecked.returncode, unchecked.stderr)
    r = run(how)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(tmp_path / f"{how}.gguf") in lines[0] and "truncated" in lines[0], lines[0]


def _mapped_bytes(g: GGUFFile) -> int:
    """The resident bytes of `g`'s mapping alone (its entry in /proc/self/smaps), not those
    of the libraries and other files this process maps."""
    start = np.frombuffer(g._mmap, dtype=np.uint8, count=1).ctypes.data
    with open("/proc/self/smaps") as f:
        text = f.read()
    at = ("\n" + text).find(f"\n{start:08x}-")  # the line that starts its address range
    assert at >= 0, "the file's mapping is not in /proc/self/smaps"
    rss = text.index("\nRss:", at)
    return int(text[rss:].split()[1]) * 1024


def _mapped_around() -> int:
    """The most bytes the kernel may map around one page that is read, on each side: a
    page-cache folio (at most a PMD, the transparent huge page size, where the kernel has
    them; else 256 pages), or the fault-around window (64 KiB by default) if larger."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            folio = int(f.read())
    except OSError:
        folio = 256 * os.sysconf("SC_PAGE_SIZE")
    return max(folio, 64 << 10)


def test_walking_the_vocabulary_keeps_mapped_pages_flat(gemma_path) -> None:
    """Walking the 262k-row table (170 MB in the file) in chunks maps little of it at once:
    the pages read are handed back after each chunk, including those the kernel maps around
    them (released per chunk range only, 120 MB stayed mapped by the end on one kernel).
    Bound: one chunk's bytes and what the kernel may map on either side of it."""
    from ggufjac.api import open_model
    from ggufjac.weights import ROWS_PER_CHUNK

    weights = open_model(gemma_path).weights  # a fresh mapping: none of its pages mapped yet
    info = weights.gguf.tensor(weights.unembedding_name)
    table, vocab = info.n_bytes, info.shape[1]
    bound = -(-table * ROWS_PER_CHUNK // vocab) + 2 * _mapped_around()
    assert bound < table // 2, "a walk that kept what it read would not exceed the bound"
    before, most = _mapped_bytes(weights.gguf), 0
    for _, _rows in weights.unembedding_chunks():
        most = max(most, _mapped_bytes(weights.gguf) - before)
    print(f"table {table / 2**20:.0f} MiB in the file, most mapped during the walk "
          f"{most / 2**20:.1f} MiB (bound {bound / 2**20:.1f} MiB)")
    assert most <= bound


def test_mapped_ranges_are_the_files_bytes_and_are_handed_back(tmp_path) -> None:
    """`mapped` maps a range in ahead of use (counted as read), with the file's bytes; the
    streamed products read row blocks that way and release each after use, so walking a
    36 MiB matrix in 0.6 MiB blocks keeps about a block mapped (with what the kernel maps on
    either side of it, the page cache's large folios), not the matrix."""
    import torch

    from ggufjac.api import open_model
    from ggufjac.blocked import linear
    from tools.big_model import BigModel, write_big_gguf
    shape = Shape(n_layer=1, d_model=4096, d_ff=16384, n_head=32, n_kv_head=8, head_dim=128,
                  context_length=64)
    path = write_big_gguf(tmp_path / "m.gguf", BigModel("llama", shape, 256, tied=False,
                                                        rope_freqs=False))
    with GGUFFile(path) as g:
        info = g.tensor("blk.0.ffn_up.weight")
        before = g.bytes_read
        view = g.mapped(info.offset + 1000, 5000)
        if view is None:
            pytest.skip("this kernel cannot populate a mapping ahead (Linux < 5.14)")
        assert g.bytes_read - before == 5000
        expected = np.empty(5000, dtype=np.uint8)
        g.read_into(info.offset + 1000, expected)
        assert np.array_equal(view, expected)
        del view
        g.release()
    m = open_model(path, dtype="float32")
    layer = m.weights.layer(0, ["ffn_up"], block_elements=1 << 20)  # 256 rows a block
    up = layer["ffn_up"]
    assert up.quantized_type is not None  # through the kernels, which read mapped blocks
    file_bytes = m.weights.gguf.tensor("blk.0.ffn_up.weight").n_bytes
    block_bytes = file_bytes * up.block_rows // up.shape[0]
    # the block with what the kernel maps on either side of it, and what it may still map
    # on either side of the block before (released by its own range only)
    bound = block_bytes + 4 * _mapped_around()
    assert bound < file_bytes // 2, "keeping the blocks mapped would not exceed the bound"
    rss, most = _mapped_bytes(m.weights.gguf), 0
    for _start, raw in up.raw_blocks():
        most = max(most, _mapped_bytes(m.weights.gguf) - rss)
    print(f"matrix {file_bytes / 2**20:.0f} MiB, most mapped {most / 2**20:.1f} MiB "
          f"(bound {bound / 2**20:.1f} MiB)")
    assert most <= bound, (file_bytes, block_bytes, most, bound)
    x = torch.randn(3, shape.d_model)
    whole = m.weights.tensor("blk.0.ffn_up.weight")
    assert torch.allclose(linear(x, up), x @ whole.T, rtol=1e-4, atol=1e-4)
