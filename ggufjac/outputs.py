"""Writing results so that an interrupted run never leaves a partial or misleading file.

Each file is written under a temporary name in the same directory and renamed into place
when complete; rename is atomic on POSIX file systems. A set of files that belong together
(a Jacobian and its report) is renamed only once all of them are written.

One naming scheme for every temporary file: `.NAME.partial` beside the result NAME (with a
random part, `.NAME.XXXXXXXX.partial`, where two processes may write NAME at once), removed on
any failure or interruption.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import GgufjacError


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty `path` unless `overwrite` (nothing is created)."""
    if path.exists():
        if not path.is_dir():
            raise GgufjacError(f"{path}: exists and is not a directory")
        if any(path.iterdir()) and not overwrite:
            raise GgufjacError(f"{path}: output directory exists and is not empty "
                               "(pass --overwrite to replace its results)")


def prepare_output_dir(path: Path, overwrite: bool) -> Path:
    """Create `path`; refuse an existing non-empty one unless `overwrite`."""
    check_output_dir(path, overwrite)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _file_mode() -> int:
    """The mode a new file gets from open() under this process's umask (0644 usually):
    writers that create private temporary files (safetensors) would leave 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temporary_path(directory: Path, name: str, unique: bool = False) -> Path:
    """The temporary name of result `name` in `directory`: `.NAME.partial`, or with
    `unique` a fresh file `.NAME.XXXXXXXX.partial` of this process's own (created empty, so
    two processes writing NAME at once never share one)."""
    if not unique:
        return directory / f".{name}.partial"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".partial")
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def scratch_file(directory: Path, name: str) -> Iterator[Path]:
    """A working file under the temporary name of `name` (not created here), removed when
    the block ends however it ends, unless the block renamed it away."""
    tmp = temporary_path(directory, name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], None], unique: bool = False) -> Path:
    """Call write(tmp_path), then rename tmp_path to `path`. On failure nothing remains.
    `unique`: a temporary of this process's own (two processes may write `path` at once)."""
    tmp = temporary_path(path.parent, path.name, unique)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def json_to(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_json(path: Path, data: Any) -> Path:
    return atomic_write(path, lambda p: json_to(p, data))


def write_all(directory: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write a set of result files that belong together: all under temporary names first,
    then renamed into place one after the other (microseconds), so an interruption while
    writing leaves none of them; on failure every temporary file is removed."""
    temps = {name: temporary_path(directory, name) for name in writers}
    try:
        for name, write in writers.items():
            write(temps[name])
            os.chmod(temps[name], _file_mode())
        for name, tmp in temps.items():
            os.replace(tmp, directory / name)
    finally:
        for tmp in temps.values():
            if tmp.exists():
                tmp.unlink()
