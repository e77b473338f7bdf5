"""`jacobian --ray` and `svd --ray` on a real local Ray cluster (two workers, 127.0.0.1):
J bit for bit the one-machine J made with the same rows per sweep and threads, a worker
killed mid-request replaced, the SVD equal to the one-machine SVD, bad addresses refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ggufjac.api import open_model
from ggufjac.jacobian import JacobianFile, jacobian_to_file
from ggufjac.linearize import Linearization
from local_ray import free_port, kill_once_hook, local_cluster

PROMPT = "The bridge out of Marin is the"
DIRECTIONS = 12  # rows of J per request (the fixtures' d is no multiple of it)

# The cluster's workers' hook (tests/local_ray.py's kill_once_hook): with GGUFJAC_TEST_KILL_MARKER set
# (the driver passes GGUFJAC_ variables to its workers), the first worker asked for rows
# 24.. is killed as it starts them, leaving the marker file; the request then runs on a
# fresh worker.
KILL_HOOK = kill_once_hook("ggufjac.ray_jacobian", "_Worker", "rows", "args[0] == 24",
                           'os.environ.get("GGUFJAC_TEST_KILL_MARKER")')


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One `ray start --head` on 127.0.0.1 (two CPUs, token authentication) for the module;
    (address, the driver's environment)."""
    with local_cluster(KILL_HOOK, tmp_path_factory.mktemp("ray-hook"),
                       OMP_NUM_THREADS="1") as (address, env):
        yield address, env


def _ggufjac(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ggufjac.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def _one_machine_jacobian(model: Path, dtype: torch.dtype, tokens: list[int], path: Path,
                          directions: int) -> JacobianFile:
    """J made in this process, `directions` rows per reverse sweep, with one torch thread
    (what each Ray worker uses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with open_model(model, dtype=dtype) as m:
            engine = m.engine(Linearization())
            return jacobian_to_file(engine, engine.embed(tokens), path, directions).jacobian
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("arch, quant, dtype, kill", [
    ("llama", "Q8_0", "float32", True),  # a worker killed mid-request
    ("qwen2", "Q8_0", "float64", False),  # biases: the constant term c travels too
])
def test_ray_jacobian_is_the_one_machine_jacobian_bit_for_bit(
        synthetic, tmp_path, cluster, arch, quant, dtype, kill) -> None:
    address, env = cluster
    model = synthetic(arch, quant)
    marker = tmp_path / "killed-worker"
    if kill:
        env = dict(env, GGUFJAC_TEST_KILL_MARKER=str(marker))
    out = tmp_path / "ray"
    run = _ggufjac(["jacobian", str(model), "-p", PROMPT, "--out", str(out), "--dtype", dtype,
                    "--ray", address, "--workers", "2", "--threads", "1",
                    "--directions-per-request", str(DIRECTIONS)], env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert marker.exists() == kill  # the kill happened (and only where asked)
    stored = load_file(str(out / "jacobian.safetensors"))
    with open(out / "jacobian.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    tokens = json.loads(header["__metadata__"]["tokens"])
    torch_dtype = getattr(torch, dtype)
    local = _one_machine_jacobian(model, torch_dtype, tokens, tmp_path / "local.safetensors",
                                  DIRECTIONS)
    mine = load_file(str(local.path))
    assert set(stored) == set(mine) == ({"jacobian", "inputs", "output"}
                                        | ({"constant"} if arch == "qwen2" else set()))
    for name in mine:  # bit for bit: the same bytes
        assert stored[name].dtype == torch_dtype
        assert torch.equal(stored[name], mine[name]), name
    # and an independent reference, to rounding: the in-memory autograd Jacobian
    with open_model(model, dtype=torch.float64) as m:
        reference = m.jacobian(tokens, Linearization(), streaming=False).jacobian
    tol = 1e-4 if dtype == "float32" else 1e-10
    err = (stored["jacobian"].double() - reference).norm() / reference.norm()
    assert float(err) < tol
    report = json.loads((out / "report.json").read_text())
    d = stored["jacobian"].shape[0]
    assert d % DIRECTIONS  # a short last request too
    assert report["ray"]["workers"] == 2 and report["ray"]["requests"] == -(-d // DIRECTIONS)
    assert report["reconstruction_rel_error"] < tol


def test_ray_svd_equals_the_one_machine_svd(synthetic, tmp_path, cluster) -> None:
    """Each block of 2 vectors split between the 2 workers: the same top-4 triplets as the
    one-machine svd with blocks of 2, to rounding (float64)."""
    address, env = cluster
    model = synthetic("llama", "Q8_0")
    args = ["-p", PROMPT, "--top-k", "4", "--block", "2", "--dtype", "float64",
            "--threads", "1"]
    run = _ggufjac(["svd", str(model), *args, "--out", str(tmp_path / "local")], env)
    assert run.returncode == 0, run.stderr
    run = _ggufjac(["svd", str(model), *args, "--out", str(tmp_path / "ray"), "--ray", address,
                    "--workers", "2"], env)
    assert run.returncode == 0, run.stdout + run.stderr
    local = load_file(str(tmp_path / "local" / "svd.safetensors"))
    remote = load_file(str(tmp_path / "ray" / "svd.safetensors"))
    torch.testing.assert_close(remote["singular_values"], local["singular_values"],
                               rtol=1e-9, atol=0)
    # vectors up to rounding (their signs are fixed by u · y > 0 in both)
    torch.testing.assert_close(remote["left"], local["left"], rtol=0, atol=1e-7)
    torch.testing.assert_close(remote["right"], local["right"], rtol=0, atol=1e-7)
    # and σ_1 against the formed J's largest singular value (an independent reference)
    with open_model(model, dtype=torch.float64) as m:
        j = m.jacobian(m.tokenize(PROMPT), Linearization(), streaming=False).jacobian
    s = torch.linalg.svdvals(j.reshape(j.shape[0], -1))
    torch.testing.assert_close(remote["singular_values"], s[:4], rtol=1e-8, atol=0)


def test_ray_workers_run_at_the_drivers_matmul_precision(synthetic, tmp_path, cluster) -> None:
    """--matmul-precision bf16 with --ray: the workers' J is, bit for bit, the one-machine J
    made under bf16 autocast with the same rows per sweep and threads, and not the float32
    one (bf16 rounds the matmul inputs to 8 bits of mantissa)."""
    from ggufjac.device_weights import matmul_precision

    address, env = cluster
    model = synthetic("llama", "Q8_0")
    out = tmp_path / "ray"
    run = _ggufjac(["jacobian", str(model), "-p", PROMPT, "--out", str(out), "--ray", address,
                    "--workers", "2", "--threads", "1", "--matmul-precision", "bf16",
                    "--directions-per-request", str(DIRECTIONS)], env)
    assert run.returncode == 0, run.stdout + run.stderr
    stored = load_file(str(out / "jacobian.safetensors"))
    with open(out / "jacobian.safetensors", "rb") as f:
        tokens = json.loads(json.loads(f.read(int.from_bytes(f.read(8), "little")))
                            ["__metadata__"]["tokens"])
    with matmul_precision("bf16", "cpu"):
        bf16 = _one_machine_jacobian(model, torch.float32, tokens, tmp_path / "bf16.st",
                                     DIRECTIONS)
    float32 = _one_machine_jacobian(model, torch.float32, tokens, tmp_path / "f32.st",
                                    DIRECTIONS)
    mine = load_file(str(bf16.path))
    for name in ("jacobian", "output"):
        assert torch.equal(stored[name], mine[name]), name
    exact = load_file(str(float32.path))["jacobian"]
    assert float((stored["jacobian"] - exact).norm() / exact.norm()) > 1e-5


# The driver's device settings as a command sets them (--max-gpu-memory, --matmul-precision):
# the workers started under them report what they opened the model with.
_SETTINGS_SCRIPT = """
import dataclasses, json, sys
from ggufjac.api import open_model
from ggufjac.device_weights import SETTINGS, matmul_precision
from ggufjac.linearize import Linearization
from ggufjac.ray_cluster import RaySettings
from ggufjac.ray_jacobian import start_workers

SETTINGS.hold_weights, SETTINGS.max_gpu_memory = False, 3 << 30
with open_model(sys.argv[1]) as m, matmul_precision("tf32", "cpu"):
    tokens = m.tokenize(sys.argv[3])
    with start_workers(RaySettings(sys.argv[2], workers=2), m, tokens, Linearization()) as w:
        print(json.dumps([dataclasses.asdict(s) for s in w.opened_with]))
"""


def test_ray_workers_open_the_model_with_the_drivers_device_settings(synthetic,
                                                                     cluster) -> None:
    """Each worker opens the model with the budget and precision the driver runs under
    (on CPU the budget holds no weights: what each worker's model took is compared)."""
    address, env = cluster
    run = subprocess.run([sys.executable, "-c", _SETTINGS_SCRIPT,
                          str(synthetic("llama", "Q8_0")), address, PROMPT],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    opened = json.loads(run.stdout.strip().splitlines()[-1])
    assert opened == [{"hold_weights": False, "max_gpu_memory": 3 << 30,
                       "matmul_precision": "tf32"}] * 2


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "not-an-address"])
def test_a_bad_ray_address_is_one_line_at_once(synthetic, tmp_path, address) -> None:
    pytest.importorskip("ray")
    address = address.format(port=free_port())  # nothing listens there
    t0 = time.monotonic()
    run = _ggufjac(["jacobian", str(synthetic("llama", "Q8_0")), "-p", PROMPT, "--out",
                    str(tmp_path / "out"), "--ray", address], dict(os.environ), timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and address in lines[0] and "Traceback" not in run.stderr, run.stderr
    assert time.monotonic() - t0 < 60  # not Ray's minutes of retries
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_ray_options_refused_where_they_mean_nothing(synthetic, tmp_path) -> None:
    model = str(synthetic("llama", "Q8_0"))
    for args, says in ((["--workers", "2"], "--workers applies to --ray only"),
                       (["--ray", "auto", "--anchor", "llama.cpp"], "--anchor")):
        run = _ggufjac(["jacobian", model, "-p", PROMPT, "--out", str(tmp_path / "o"), *args],
                       dict(os.environ), timeout=120)
        assert run.returncode == 2 and says in run.stderr, run.stderr


def test_more_workers_than_the_cluster_has_cpus_is_refused(synthetic, tmp_path, cluster) -> None:
    """3 workers of 1 thread on a 2-CPU cluster would wait for a CPU forever: refused."""
    address, env = cluster
    run = _ggufjac(["jacobian", str(synthetic("llama", "Q8_0")), "-p", PROMPT, "--out",
                    str(tmp_path / "out"), "--ray", address, "--workers", "3"], env,
                   timeout=300)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "need 3 CPUs; the cluster has 2" in lines[0], run.stderr
    assert not (tmp_path / "out").exists()


def test_ray_missing_is_one_line(synthetic, tmp_path) -> None:
    """Without Ray installed (an import of it fails): one line saying how to install it."""
    blocker = tmp_path / "no-ray"
    blocker.mkdir()
    (blocker / "ray.py").write_text("raise ImportError('No module named ray')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(blocker), os.environ.get("PYTHONPATH")) if p))
    run = _ggufjac(["svd", str(synthetic("llama", "Q8_0")), "-p", PROMPT, "--out",
                    str(tmp_path / "out"), "--ray", "auto"], env, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines == ["ggufjac: error: --ray needs Ray (pip install 'ggufjac[ray]')"], run.stderr
