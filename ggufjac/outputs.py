"""Writing results so that an interrupted run never leaves a partial or misleading file.

Each file is written under a temporary name in the same directory and renamed into place
when complete; rename is atomic on POSIX file systems.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import GgufjacError


def prepare_output_dir(path: Path, overwrite: bool) -> Path:
    """Create `path`; refuse an existing non-empty one unless `overwrite`."""
    if path.exists():
        if not path.is_dir():
            raise GgufjacError(f"{path}: exists and is not a directory")
        if any(path.iterdir()) and not overwrite:
            raise GgufjacError(f"{path}: output directory exists and is not empty "
                               "(pass --overwrite to replace its results)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_path), then rename tmp_path to `path`. On failure nothing remains."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: Path, data: Any) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))
