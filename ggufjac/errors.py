"""One exception family for the library: the CLI prints these in one line and exits 2."""

from __future__ import annotations


class GgufjacError(Exception):
    """Base class of every error ggufjac raises on purpose (bad file, prompt, setting)."""


class GGUFError(GgufjacError):
    """A GGUF file is malformed, truncated, or lacks something ggufjac needs.

    The message always names the file and the field or tensor at fault.
    """

    def __init__(self, path: object, what: str, detail: str) -> None:
        self.path = str(path)
        self.what = what
        self.detail = detail
        super().__init__(f"{self.path}: {what}: {detail}")


class UnsupportedModelError(GgufjacError):
    """The file is a valid GGUF but ggufjac cannot (yet) linearize this model."""


class PromptError(GgufjacError):
    """The prompt cannot be used (empty, too long, not decodable)."""


class LlamaCppError(GgufjacError):
    """llama.cpp failed on this file or prompt (reported without killing our process)."""
