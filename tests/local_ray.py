"""A local Ray cluster for the tests (`ray start --head` on 127.0.0.1), and a
`sitecustomize.py` for its workers' PYTHONPATH (never the driver's): the first worker whose
call of a method meets a condition is killed with SIGKILL as it starts it, as the
out-of-memory killer or a lost node would, leaving a marker file saying so; every later call
runs normally, so the retried work must come out whole."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HOOK = """
import importlib.abc, importlib.util, os, signal, sys
from pathlib import Path


class _KillOnce(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != {module!r}:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            owner = getattr(module, {owner!r})
            method = getattr(owner, {method!r})

            def dying(self, *args):
                marker = {marker}
                if marker and ({condition}) and not Path(marker).exists():
                    Path(marker).write_text(str(os.getpid()))
                    os.kill(os.getpid(), signal.SIGKILL)
                return method(self, *args)
            setattr(owner, {method!r}, dying)
        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _KillOnce())
"""


def kill_once_hook(module: str, owner: str, method: str, condition: str, marker: str) -> str:
    """The hook's source: `owner.method` of `module` (positional arguments `args`, after
    self) kills its worker the first time the Python expression `condition` holds; `marker`
    is an expression for the marker file's path (empty or None: never kill)."""
    return _HOOK.format(module=module, owner=owner, method=method, condition=condition,
                        marker=marker)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_cluster(hook_source: str, directory: Path, **env: str) -> Iterator[tuple[str, dict]]:
    """`ray start --head` on 127.0.0.1 (two CPUs, token authentication), its workers loading
    `hook_source` as their sitecustomize (written into `directory`), stopped afterwards;
    gives (its address, the driver's environment: this one's, with `env` added)."""
    pytest.importorskip("ray")
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    assert ray_bin, "the dev extra installs Ray; its `ray` command is missing"
    (directory / "sitecustomize.py").write_text(hook_source)
    port = free_port()
    driver_env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex(),
                      RAY_USAGE_STATS_ENABLED="0", **env)
    cluster_env = dict(driver_env, PYTHONPATH=os.pathsep.join(
        p for p in (str(directory), driver_env.get("PYTHONPATH")) if p))
    start = subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1",
                            f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                            "--disable-usage-stats"], env=cluster_env, capture_output=True,
                           text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"127.0.0.1:{port}", driver_env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=driver_env, capture_output=True,
                       timeout=120)
