"""The package's entry points as a user starts them, in a fresh interpreter: every command
through `python -m ggufjac`, and `python -m ggufjac.cli` (whose `main()` must run only once
every command is defined)."""

from __future__ import annotations

import re
import subprocess
import sys

import click
import pytest

from ggufjac.cli import main

# The commands the README and docs describe; the group may have more, never fewer.
KNOWN = {"info", "check", "jacobian", "svd", "attribute", "layers", "report", "compare",
         "batch", "export", "steer", "cvector"}
COMMANDS = sorted(main.commands)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_the_group_has_every_known_command() -> None:
    assert KNOWN <= set(COMMANDS), KNOWN - set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_helps_through_python_m_ggufjac(command: str) -> None:
    r = _run("-m", "ggufjac", command, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Usage: ggufjac {command} "), r.stdout[:200]
    # the help names each of the command's own options
    for param in main.commands[command].params:
        if isinstance(param, click.Option) and not param.hidden:
            assert any(opt in r.stdout for opt in param.opts), (command, param.opts)


def test_python_m_ggufjac_lists_the_commands() -> None:
    r = _run("-m", "ggufjac", "--help")
    assert r.returncode == 0, r.stderr
    block = r.stdout.split("Commands:", 1)[1].split("\n\n", 1)[0]  # the epilog follows
    listed = set(re.findall(r"^  ([a-z][a-z-]*)\s", block, re.M))
    assert listed == set(COMMANDS), r.stdout


@pytest.mark.parametrize("command", ["steer", "cvector", "info"])
def test_python_m_ggufjac_cli_knows_the_last_defined_commands(command: str) -> None:
    r = _run("-m", "ggufjac.cli", command, "--help")
    assert r.returncode == 0, r.stderr
    assert f"{command} [OPTIONS]" in r.stdout and "No such command" not in r.stderr


def test_python_m_ggufjac_info_describes_a_file(synthetic) -> None:
    """A real run, not only help: the architecture and tensor types gguf-py reads from the
    same file appear in the output."""
    import gguf

    path = synthetic("llama", "Q8_0")
    r = _run("-m", "ggufjac", "info", str(path))
    assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    n_layer = reader.fields[f"{arch}.block_count"].contents()
    assert re.search(rf"^architecture\s+{arch}$", r.stdout, re.M), r.stdout
    assert "supported      yes" in r.stdout
    for qtype in {t.tensor_type.name for t in reader.tensors}:
        assert qtype in r.stdout, (qtype, r.stdout)
    assert str(n_layer) in r.stdout


def test_python_m_ggufjac_unknown_command_is_one_error() -> None:
    r = _run("-m", "ggufjac", "no-such-command")
    assert r.returncode == 2 and "No such command 'no-such-command'" in r.stderr
    assert "Traceback" not in r.stderr
