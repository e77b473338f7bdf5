"""Joining a Ray cluster, for the front ends that run on one (`batch --ray`, `jacobian
--ray`, `svd --ray`): Ray imported only here and in those front ends, never by the engine.

An address that nothing answers makes `ray.init` retry for minutes, printing warnings, so
the cluster's address is first reached with a plain TCP connection under a timeout: no
cluster there is one line, at once. The --ray options' settings are read here too, with
nothing heavy imported, so that their misuse is refused before torch is loaded.
"""

from __future__ import annotations

import dataclasses
import os
import socket

from .errors import GgufjacError

# Seconds to wait for the cluster's address to accept a connection.
CONNECT_TIMEOUT_S = 10.0


def ray_module():
    """Ray, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise GgufjacError("--ray needs Ray (pip install 'ggufjac[ray]')") from None
    return ray


def _host_port(address: str) -> tuple[str, int]:
    """Where the cluster at `address` listens ("auto": the one this machine belongs to;
    a Ray Client address, ray://HOST:PORT, is probed the same)."""
    text = address.removeprefix("ray://")
    if text == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address
            text = canonicalize_bootstrap_address("auto") or ""
        except Exception as e:  # no cluster started on this machine, or a Ray without it
            raise GgufjacError(f"--ray auto: no Ray cluster found on this machine "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                               ) from None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise GgufjacError(f"--ray {address}: not a Ray address (HOST:PORT, ray://HOST:PORT "
                           "or auto)")
    return host.strip("[]") or "127.0.0.1", int(port)


def connect(address: str, env_vars: dict[str, str] | None = None,
            timeout: float = CONNECT_TIMEOUT_S):
    """Join the Ray cluster at `address` (workers get `env_vars` and every GGUFJAC_
    environment variable of this process); Ray, connected. One line if Ray is missing,
    the address is malformed or nothing answers there within `timeout` seconds."""
    ray = ray_module()
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise GgufjacError(f"--ray {address}: cannot connect to a Ray cluster at "
                           f"{host}:{port} ({reason})") from None
    env = {k: v for k, v in os.environ.items() if k.startswith("GGUFJAC_")}
    env.update(env_vars or {})
    try:
        ray.init(address=address, runtime_env={"env_vars": env} if env else None,
                 logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise GgufjacError(f"--ray {address}: cannot connect to a Ray cluster "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                           ) from None
    return ray


def alive_nodes(ray) -> int:
    """The cluster's nodes that are up (at least one)."""
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive")))


def worker_error(ray, e: BaseException) -> GgufjacError:
    """A Ray task's failure as one line: a GgufjacError raised in the worker as itself."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, GgufjacError):
        return cause
    if isinstance(e, ray.exceptions.RayActorError):
        return GgufjacError(f"a Ray worker died ({str(e).splitlines()[0] if str(e) else e!r})")
    return GgufjacError(f"a Ray worker failed: {cause if isinstance(cause, Exception) else e}")


@dataclasses.dataclass(frozen=True)
class RaySettings:
    """Where and how: the cluster's address ("auto": the one this machine belongs to),
    `workers` actors (default: one per node), `threads` torch threads in each (and the CPUs
    Ray reserves for it), `directions` rows of J per request (default: d split in two
    requests per worker, fewer rows if the memory budget says so)."""

    address: str
    workers: int | None = None
    threads: int = 1
    directions: int | None = None


def ray_settings(address: str | None, workers: int | None = None, threads: int | None = None,
                 directions: int | None = None, anchor: str = "none", device: str = "cpu",
                 per_token: bool = False) -> RaySettings | None:
    """The command line's --ray options as settings (None without --ray), or one line
    naming what --ray cannot be combined with."""
    if address is None:
        for given, flag in ((workers, "--workers"), (directions, "--directions-per-request")):
            if given is not None:
                raise GgufjacError(f"{flag} applies to --ray only")
        return None
    if anchor != "none":
        raise GgufjacError("--ray computes unanchored Jacobians: --anchor runs on one machine")
    if device != "cpu":
        raise GgufjacError(f"--ray runs its workers on CPU, not --device {device}")
    if per_token:
        raise GgufjacError("--per-token forms J: use `ggufjac jacobian --ray` for it")
    return RaySettings(address, workers, threads or 1, directions)
