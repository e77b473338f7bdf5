"""Fuzz ggufjac's GGUF validation with mutations of a real file's header and tensor index.

    python -m tools.fuzz_gguf [MODEL] [--cases 600] [--seed 0] [--json counts.json]

Each case copies the header (metadata and tensor index) of MODEL, mutates it, and keeps the
tensor data as a sparse hole of the original size (so a case costs a few MB of writing, not
the whole file): bit flips, truncation at many offsets, oversized lengths and counts written
over real length/count fields, tensor types swapped for other (or unknown) type ids, tensor
dimensions and offsets changed. Every case must either validate (`layout.validate_file`) or
raise the library's own error (`GgufjacError`); anything else, a case over the time bound, or
memory over the bound (RLIMIT_AS: what this process had mapped + the file + 1 GiB) counts as
a failure. Exit status 1 if any case failed.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from ggufjac.errors import GgufjacError
from ggufjac.gguf_file import GGUFFile
from ggufjac.layout import validate_file

TIME_BOUND_S = 10
MEMORY_BOUND = 2**30
HUGE = [2**64 - 1, 2**63, 2**62 + 5, 2**32, 2**32 - 1, 2**31, 10**12]


class CaseTimeout(Exception):
    pass


def field_offsets(header: bytes, g: GGUFFile) -> dict[str, list[int]]:
    """Offsets of the u64 count/length fields and of each tensor entry's parts."""
    offsets: dict[str, list[int]] = {"counts": [8, 16], "lengths": [], "dims": [], "types": [],
                                     "tensor_offsets": [], "array_counts": []}
    for name, info in g.tensors.items():
        key = struct.pack("<Q", len(name)) + name.encode()
        at = header.find(key)
        if at < 0:
            continue
        p = at + len(key)
        offsets["lengths"].append(at)
        n_dims = struct.unpack_from("<I", header, p)[0]
        offsets["dims"] += [p + 4 + 8 * k for k in range(n_dims)]
        offsets["types"].append(p + 4 + 8 * n_dims)
        offsets["tensor_offsets"].append(p + 8 + 8 * n_dims)
    for key_name in g.metadata:
        key = struct.pack("<Q", len(key_name)) + key_name.encode()
        at = header.find(key)
        if at < 0:
            continue
        offsets["lengths"].append(at)
        vtype_at = at + len(key)
        if struct.unpack_from("<I", header, vtype_at)[0] == 9:  # array: item type, count
            offsets["array_counts"].append(vtype_at + 8)
    return offsets


def mutations(header: bytes, offsets: dict[str, list[int]], n: int, seed: int
              ) -> Iterator[tuple[str, bytes, bool]]:
    """(kind, mutated header, keep data hole) for n cases, deterministic in `seed`."""
    rng = random.Random(seed)
    kinds = ["bit_flip", "bit_flip_index", "truncate", "huge_length", "huge_count",
             "swap_type", "bad_dim", "bad_offset"]
    index_start = min(offsets["tensor_offsets"] + offsets["types"]) - 4096
    for i in range(n):
        kind = kinds[i % len(kinds)]
        b = bytearray(header)
        keep_data = True
        if kind == "bit_flip":
            for _ in range(rng.randint(1, 8)):
                at = rng.randrange(0, min(len(b), 65536)) if rng.random() < 0.6 \
                    else rng.randrange(len(b))
                b[at] ^= 1 << rng.randrange(8)
        elif kind == "bit_flip_index":
            for _ in range(rng.randint(1, 8)):
                at = rng.randrange(max(0, index_start), len(b))
                b[at] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            cut = rng.randrange(0, len(b)) if rng.random() < 0.7 else rng.randrange(0, 4096)
            b = b[:cut]
            keep_data = False
        elif kind == "huge_length":
            struct.pack_into("<Q", b, rng.choice(offsets["lengths"]), rng.choice(HUGE))
        elif kind == "huge_count":
            at = rng.choice(offsets["counts"] + offsets["array_counts"])
            struct.pack_into("<Q", b, at, rng.choice(HUGE + [rng.randrange(0, 10**6)]))
        elif kind == "swap_type":
            struct.pack_into("<I", b, rng.choice(offsets["types"]),
                             rng.choice([0, 1, 2, 8, 12, 14, 30, 39, 40, 99, 2**31]))
        elif kind == "bad_dim":
            struct.pack_into("<Q", b, rng.choice(offsets["dims"]),
                             rng.choice([0, 1, 3, 255, 257, 2**40] + HUGE))
        else:
            struct.pack_into("<Q", b, rng.choice(offsets["tensor_offsets"]),
                             rng.choice([1, 31, 2**31, 2**40] + HUGE))
        yield kind, bytes(b), keep_data


def run_case(path: Path) -> str:
    """'ok', or 'error: <first words>' for the library's error; raises anything else."""
    def on_alarm(signum: int, frame: object) -> None:
        raise CaseTimeout()
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TIME_BOUND_S)
    try:
        g, _ = validate_file(path)
        g.close()
        return "ok"
    except GgufjacError as e:
        detail = str(e).replace(str(path), "FILE")
        return "error: " + " ".join(detail.split(":")[1:2]).strip()[:40]
    finally:
        signal.alarm(0)


def fuzz(model: Path, cases: int, seed: int) -> dict:
    with GGUFFile(model) as g:
        header_len, size = g.data_start, g.file_size
        with open(model, "rb") as f:
            header = f.read(header_len)
        offsets = field_offsets(header, g)
    vm = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (mapped + size + MEMORY_BOUND, vm[1]))
    outcomes: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    failures: list[str] = []
    slowest = 0.0
    with tempfile.TemporaryDirectory(prefix="ggufjac-fuzz-") as tmp:
        path = Path(tmp) / "case.gguf"
        for i, (kind, data, keep) in enumerate(mutations(header, offsets, cases, seed)):
            with open(path, "wb") as f:
                f.write(data)
                if keep:
                    f.truncate(size)  # the tensor data as a sparse hole
            t0 = time.perf_counter()
            try:
                outcome = run_case(path)
            except CaseTimeout:
                outcome = "FAIL timeout"
                failures.append(f"case {i} ({kind}): over {TIME_BOUND_S} s")
            except BaseException as e:  # noqa: BLE001 - anything else is the finding
                outcome = f"FAIL {type(e).__name__}"
                failures.append(f"case {i} ({kind}): " + "".join(
                    traceback.format_exception_only(type(e), e)).strip())
            slowest = max(slowest, time.perf_counter() - t0)
            outcomes["ok" if outcome == "ok" else "FAIL" if outcome.startswith("FAIL")
                     else "library error"] += 1
            by_kind.setdefault(kind, Counter())[outcome.split(":")[0]] += 1
    return {"cases": cases, "seed": seed, "outcomes": dict(outcomes),
            "by_kind": {k: dict(v) for k, v in by_kind.items()},
            "slowest_case_s": round(slowest, 3), "failures": failures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="gemma3-270m")
    ap.add_argument("--cases", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="Write the counts to this file.")
    args = ap.parse_args()
    from ggufjac.resolve import resolve_model

    result = fuzz(resolve_model(args.model), args.cases, args.seed)
    print(f"{result['cases']} cases (seed {result['seed']}): {result['outcomes']}; "
          f"slowest case {result['slowest_case_s']} s")
    for kind, counts in result["by_kind"].items():
        print(f"  {kind:<16}{counts}")
    for line in result["failures"][:20]:
        print("  " + line)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
