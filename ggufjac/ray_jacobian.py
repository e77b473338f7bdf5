"""Full Jacobians and the matrix-free SVD on a Ray cluster (`jacobian --ray`, `svd --ray`).

Each worker (a Ray actor) opens the model itself, by the path or hub reference given (so
every node needs the file at that path, or hub access: resolve.py), runs the forward pass
once and then answers the driver's requests from that record:
- `jacobian`: the output directions (rows of J) are split in blocks of `directions` rows;
  each block is one reverse sweep on some worker, its rows sent back and written at their
  place in jacobian.safetensors as they arrive (jacobian.JacobianWriter: the driver holds
  one block at a time, and J may be larger than any machine's memory);
- `svd`: each Lanczos block's vectors are split between the workers, each computing its
  columns' J Jᵀ q (a reverse and a forward sweep); the iteration itself runs on the driver.

Bit-identical results. A float result depends on the arithmetic's order, and here that is
fixed by: the directions that share a reverse sweep (a block) and a batched backward (the
chunk), the layers' row blocks (the memory plan), the dtype, torch's thread count and the
CPU's instruction set (torch's and the compiled products' kernels). The driver fixes the
blocks and the chunk and sends them, every worker sets torch's threads to `threads`
(default 1) and Ray gives it as many CPUs, and every worker's output y is compared bit for
bit with the first one's (another file, or other kernels, is refused). So J equals, bit for
bit, `jacobian.jacobian_to_file` on one machine with the same `directions`, chunk and
thread count (`jacobian --threads N` without --ray), where memory is not so tight that
the plan picks smaller row blocks. The SVD's vectors are split across workers, so each
reverse sweep carries fewer of them than on one machine: equal to rounding, not bit for bit.

A worker that dies (killed, out of memory, its node lost) takes its request with it: the
request goes to a fresh worker (wherever Ray places it), `MAX_ATTEMPTS` times at most.

Every worker opens the model with the driver's device settings (device_weights.SETTINGS as
the driver started them: --max-gpu-memory, and --matmul-precision, under which it runs
every forward pass and request), so its rows are the ones the driver would make itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .device_weights import SETTINGS, DeviceSettings, matmul_precision
from .errors import GgufjacError
from .jacobian import JacobianResult, JacobianWriter, directions_per_sweep, jacobian_rows
from .layout import has_constant
from .linearize import Linearization
from .ray_cluster import RaySettings, alive_nodes, connect, worker_error
from .svd import JacobianProducts, TopSingularTriplets, triplets_of_products

MAX_ATTEMPTS = 3  # workers one request may take down before the run is refused


class _Worker:
    """What runs in each actor: the model, its engine and the prompt's forward record."""

    def __init__(self, model: str, dtype: str, gate_path: str, tokens: list[int],
                 threads: int, max_memory: int | None, device: DeviceSettings) -> None:
        torch.set_num_threads(threads)
        self.tokens, self.record, self.error = tokens, None, None
        self.device = device
        # this process's defaults for the models it opens: the driver's
        SETTINGS.hold_weights, SETTINGS.max_gpu_memory = device.hold_weights, device.max_gpu_memory
        try:
            from .api import open_model

            self.m = open_model(model, dtype=dtype)
            self.engine = self.m.engine(Linearization(detach=True, gate_path=gate_path),
                                        max_memory=max_memory)
        except GgufjacError as e:  # raised by every request, as one line on the driver
            self.error = GgufjacError(f"{socket.gethostname()}: {e}")
        except Exception as e:  # a node without the file, or without ggufjac's needs
            self.error = GgufjacError(f"{socket.gethostname()}: {type(e).__name__}: {e}")

    def _precision(self):
        """The driver's float32 matmul precision, for one request (torch's autocast holds
        per thread, and Ray may run an actor's requests on a thread of its own)."""
        return matmul_precision(self.device.matmul_precision, self.m.weights.device)

    def _recorded(self):
        if self.error is not None:
            raise self.error
        if self.record is None:
            with self._precision():
                self.record = self.engine.forward(self.engine.embed(self.tokens))
        return self.record

    def opened(self) -> DeviceSettings:
        """The settings the model was opened with here (its weights' budget as the model
        took it), once it is open; else why not."""
        if self.error is not None:
            raise self.error
        return DeviceSettings(SETTINGS.hold_weights, self.m.max_gpu_memory,
                              self.device.matmul_precision)

    @staticmethod
    def _output(record) -> tuple[torch.Tensor, torch.Tensor | None]:
        """y and the constant c of the forward pass (c: None without biases), sent with
        every answer: the driver checks that every worker's are the same bits."""
        c = None if record.constant is None else record.constant.cpu()
        return record.output[-1].cpu().clone(), c

    def output(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(y, c), the forward pass run if it has not been."""
        return self._output(self._recorded())

    def rows(self, first: int, stop: int, chunk: int) -> tuple[torch.Tensor, tuple]:
        """(rows first..stop of J, (y, c))."""
        record = self._recorded()
        with self._precision():
            rows = jacobian_rows(self.engine, record, first, stop, chunk).cpu()
        return rows, self._output(record)

    def gram(self, q: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple]:
        """((Qᵀ J, J Jᵀ Q), (y, c)) for columns q [d, m]."""
        record = self._recorded()
        with self._precision():
            rows, image = JacobianProducts(self.engine, record).gram(q)
        return (rows.cpu(), image.cpu()), self._output(record)

    def transposed(self, u: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """(Uᵀ J, (y, c)) for columns u [d, m]."""
        record = self._recorded()
        with self._precision():
            rows = JacobianProducts(self.engine, record).transposed(u).cpu()
        return rows, self._output(record)


class RayWorkers:
    """Actors on the cluster, each with the model open and the prompt's forward record; the
    driver's requests run on them, each retried on a fresh actor if its actor dies. `device`:
    the settings every actor opens the model with (default: this process's SETTINGS, as
    they are now); `opened_with`: each actor's report of them."""

    def __init__(self, settings: RaySettings, model: str, dtype: str, gate_path: str,
                 tokens: list[int], max_memory: int | None = None,
                 device: DeviceSettings | None = None) -> None:
        if settings.threads < 1:
            raise GgufjacError(f"--threads must be at least 1, not {settings.threads}")
        self.ray = ray = connect(settings.address)
        try:
            n = settings.workers or alive_nodes(ray)
            cpus = float(ray.cluster_resources().get("CPU", 0))
            if n * settings.threads > cpus:  # the actors would wait for CPUs forever
                raise GgufjacError(
                    f"--ray {settings.address}: {n} workers of {settings.threads} thread(s) "
                    f"need {n * settings.threads} CPUs; the cluster has {cpus:g}")
            self.settings = settings
            self.actor_class = ray.remote(_Worker)
            self.options = {"num_cpus": settings.threads, "max_restarts": 0}
            self.device = device or dataclasses.replace(SETTINGS)
            self.args = (model, dtype, gate_path, tokens, settings.threads, max_memory,
                         self.device)
            self.actors = [self._new_actor() for _ in range(n)]
            # y and c of the forward pass, from the first answer (every later one must match)
            self.output: torch.Tensor | None = None
            self.constant: torch.Tensor | None = None
            # each opened the model
            self.opened_with: list[DeviceSettings] = self._get(
                [a.opened.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise

    def _new_actor(self):
        return self.actor_class.options(**self.options).remote(*self.args)

    def _get(self, ref):
        try:
            return self.ray.get(ref)
        except (self.ray.exceptions.RayTaskError, self.ray.exceptions.RayActorError) as e:
            raise worker_error(self.ray, e) from None

    def _check_output(self, output: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """Every worker's forward pass must give this run's y (and c) bit for bit."""
        y, c = output
        if self.output is None:
            self.output, self.constant = y, c
        elif not torch.equal(y, self.output) or (c is None) != (self.constant is None) \
                or (c is not None and not torch.equal(c, self.constant)):
            raise GgufjacError(
                "the Ray workers' forward passes differ (another model file at the path on "
                "some node, or a CPU with other kernels): their J would not be one matrix")

    def forward(self) -> None:
        """Every worker's forward pass, at once; `output` and `constant` are then set (and
        the same bits on every worker, or refused)."""
        refs = [a.output.remote() for a in self.actors]
        for slot, ref in enumerate(refs):
            try:
                output = self.ray.get(ref)
            except self.ray.exceptions.RayActorError:  # a fresh one runs it when first asked
                self.actors[slot] = self._new_actor()
                continue
            except self.ray.exceptions.RayTaskError as e:
                raise worker_error(self.ray, e) from None
            self._check_output(output)
        if self.output is None:
            raise GgufjacError(f"every Ray worker ({len(refs)}) died in the forward pass")

    def run(self, method: str, requests: list[tuple], done: Callable[[int, Any], None],
            progress: bool = False) -> None:
        """Each request (the arguments of `_Worker.<method>`) on some actor, one at a time
        per actor; `done(index, result)` as each result comes, in completion order."""
        ray = self.ray
        queue = deque(range(len(requests)))
        attempts = [0] * len(requests)
        flying: dict[Any, tuple[int, int]] = {}  # object ref -> (actor slot, request)
        bar = tqdm(total=len(requests), desc=method, unit="part",
                   disable=not progress or len(requests) < 2, leave=False)

        def feed(slot: int) -> None:
            if queue:
                i = queue.popleft()
                flying[getattr(self.actors[slot], method).remote(*requests[i])] = (slot, i)

        try:
            for slot in range(len(self.actors)):
                feed(slot)
            while flying:
                (ref,), _ = ray.wait(list(flying), num_returns=1)
                slot, i = flying.pop(ref)
                try:
                    result, output = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    attempts[i] += 1
                    if attempts[i] >= MAX_ATTEMPTS:
                        raise GgufjacError(f"request {i + 1} of {len(requests)} ({method}) "
                                           f"took down {attempts[i]} Ray workers; the last: "
                                           f"{str(e).splitlines()[0] if str(e) else e!r}"
                                           ) from None
                    queue.appendleft(i)
                    self.actors[slot] = self._new_actor()
                except ray.exceptions.RayTaskError as e:
                    raise worker_error(ray, e) from None
                else:
                    self._check_output(output)
                    done(i, result)
                    bar.update(1)
                feed(slot)
        finally:
            bar.close()

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            self.ray.kill(a)
        self.ray.shutdown()

    def __enter__(self) -> RayWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split_columns(x: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return [p.contiguous() for p in torch.tensor_split(x, min(parts, x.shape[1]), dim=1)]


class RayProducts(JacobianProducts):
    """J's products for the Lanczos iteration (svd.triplets_of_products), the columns of
    each request split between the workers."""

    def __init__(self, workers: RayWorkers, inputs: torch.Tensor) -> None:
        self.workers = workers
        self.d = inputs.shape[1]
        self.inputs, self.output, self.constant = inputs, workers.output, workers.constant

    def _split(self, method: str, x: torch.Tensor) -> list:
        parts = _split_columns(x.cpu(), len(self.workers.actors))
        results: list = [None] * len(parts)

        def done(i: int, result: Any) -> None:
            results[i] = result
        self.workers.run(method, [(p,) for p in parts], done)
        return results

    def transposed(self, u: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._split("transposed", u)).to(self.inputs.device)

    def gram(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self._split("gram", q)
        return (torch.cat([r for r, _ in parts]).to(self.inputs.device),
                torch.cat([i for _, i in parts], dim=1).to(self.inputs.device))


def _inputs(m, tokens: list[int], lin: Linearization) -> torch.Tensor:
    return m.engine(lin).embed(tokens)


def start_workers(settings: RaySettings, m, tokens: list[int], lin: Linearization,
                  model: str | None = None, max_memory: int | None = None,
                  device: DeviceSettings | None = None) -> RayWorkers:
    """Workers for `tokens` of the model `m` (a LoadedModel opened here), each opening it by
    `model` as the user gave it (a path every node can read, or a hub reference each node
    resolves; default: `m`'s path here) with the device settings `device` (default: this
    process's, `RayWorkers`)."""
    name = model or str(m.path)
    if Path(name).is_file():  # a worker's working directory is not this one
        name = os.path.abspath(name)
    return RayWorkers(settings, name, str(m.weights.dtype).removeprefix("torch."),
                      lin.gate_path, tokens, max_memory, device)


def jacobian_on_ray(workers: RayWorkers, m, tokens: list[int], lin: Linearization,
                    path: Path, max_memory: int | None = None, progress: bool = False
                    ) -> tuple[JacobianResult, dict]:
    """The detached Jacobian of `tokens` made by `workers` (`start_workers`) and written to
    the safetensors file `path` as its rows arrive (the file `jacobian_to_file` writes, bit
    for bit: see the module docstring), and how the work was split (for the report)."""
    d, n = m.cfg.d_model, len(tokens)
    engine = m.engine(lin, max_memory=max_memory)
    workers.forward()
    settings, n_workers = workers.settings, len(workers.actors)
    directions = settings.directions or min(directions_per_sweep(engine, n),
                                            math.ceil(d / (2 * n_workers)))
    directions = max(1, min(directions, d))
    chunk = engine.plan(directions, n).chunk
    blocks = [(s, min(s + directions, d), chunk) for s in range(0, d, directions)]
    writer = JacobianWriter(path, d, n, m.weights.dtype, has_constant(m.cfg.family),
                            {"tokens": json.dumps(tokens)})
    try:
        workers.run("rows", blocks, lambda i, rows: writer.write_rows(blocks[i][0], rows),
                    progress)
        inputs = _inputs(m, tokens, lin)
        jac = writer.finish(inputs, workers.output, workers.constant)
    finally:
        writer.close()
    how = {"address": settings.address, "workers": n_workers, "threads_per_worker":
           settings.threads, "directions_per_request": directions, "requests": len(blocks),
           "chunk": chunk}
    return JacobianResult(jac, inputs, workers.output, constant=workers.constant), how


def svd_on_ray(workers: RayWorkers, m, tokens: list[int], lin: Linearization, k: int,
               tol: float | None = None, max_iterations: int = 100, block: int | None = None,
               seed: int = 0, on_iteration: Callable[[int, float, float], None] | None = None
               ) -> tuple[TopSingularTriplets, dict]:
    """The top `k` singular triplets of the detached Jacobian (svd.top_singular_triplets),
    each Lanczos block's vectors split between `workers` (default block: the number of
    workers, at least the one-machine default), and how the work was split."""
    from .svd import check_top_k, default_block

    check_top_k(k, m.cfg.d_model, len(tokens))
    n_workers = len(workers.actors)
    b = min(block or max(default_block(k, len(tokens)), n_workers), m.cfg.d_model)
    workers.forward()
    products = RayProducts(workers, _inputs(m, tokens, lin))
    result = triplets_of_products(products, k, tol, max_iterations, b, seed, on_iteration)
    how = {"address": workers.settings.address, "workers": n_workers,
           "threads_per_worker": workers.settings.threads, "block": b}
    return result, how


def jacobian_to_dir_on_ray(settings: RaySettings, m, tokens: list[int], lin: Linearization,
                           out_dir: Path, overwrite: bool = False,
                           max_memory: int | None = None, progress: bool = False,
                           model: str | None = None, **options: Any):
    """reports.jacobian_to_dir with J made on the cluster (`jacobian_on_ray`; the workers
    are started, and the address refused, before anything is written); the report says how
    the work was split ("ray")."""
    from .reports import jacobian_to_dir

    how: dict = {}
    with start_workers(settings, m, tokens, lin, model, max_memory) as workers:
        def make(path: Path) -> JacobianResult:
            result, split = jacobian_on_ray(workers, m, tokens, lin, path, max_memory,
                                            progress)
            how.update(split)
            return result
        return jacobian_to_dir(m, tokens, lin, out_dir, overwrite, max_memory,
                               progress=progress, make_file=make, extra_report={"ray": how},
                               **options)


def svd_to_dir_on_ray(settings: RaySettings, m, tokens: list[int], lin: Linearization,
                      out_dir: Path, k: int, tolerance: float | None = None,
                      max_iterations: int = 100, block: int | None = None,
                      overwrite: bool = False, max_memory: int | None = None,
                      on_iteration: Callable[[int, float, float], None] | None = None,
                      model: str | None = None, **options: Any):
    """reports.svd_to_dir with the triplets computed on the cluster (`svd_on_ray`)."""
    from .reports import svd_to_dir
    from .svd import check_top_k

    check_top_k(k, m.cfg.d_model, len(tokens))  # before any worker starts
    how: dict = {}
    with start_workers(settings, m, tokens, lin, model, max_memory) as workers:
        def make() -> TopSingularTriplets:
            result, split = svd_on_ray(workers, m, tokens, lin, k, tolerance, max_iterations,
                                       block, on_iteration=on_iteration)
            how.update(split)
            return result
        return svd_to_dir(m, tokens, lin, out_dir, k, tolerance, max_iterations, block,
                          overwrite=overwrite, max_memory=max_memory, make_triplets=make,
                          extra_report={"ray": how}, **options)
