"""ggufjac: exact linear maps (detached Jacobians) of GGUF language models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ggufjac")
except PackageNotFoundError:  # a checkout that is not installed
    __version__ = "0.0.0+unknown"
