"""Token id -> readable text, from the GGUF vocabulary (no llama.cpp needed).

SentencePiece vocabularies ('llama') mark spaces with U+2581 and bytes as <0xNN>;
byte-level BPE vocabularies ('gpt2') map bytes to printable code points. Both are turned
back into the text the token stands for. The vocabulary array is decoded on first use only.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from gguf.constants import Keys

from .gguf_file import GGUFFile

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _gpt2_unicode_to_byte() -> dict[str, int]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


def tokenizer_model(gguf: GGUFFile) -> str | None:
    """The file's tokenizer kind (`tokenizer.ggml.model`: 'llama', 'gpt2', 'none', ...), None
    when the key is absent: the one place ggufjac reads it."""
    return gguf.get(Keys.Tokenizer.MODEL)


def has_tokenizer(gguf: GGUFFile) -> bool:
    """Whether prompts can be tokenized with the file: llama.cpp aborts the process on
    tokenize() when it has no tokenizer (the key absent, or 'none')."""
    return tokenizer_model(gguf) not in (None, "none")


class Vocabulary:
    def __init__(self, gguf: GGUFFile) -> None:
        self.gguf = gguf
        kind = tokenizer_model(gguf)
        self.kind = "llama" if kind is None else kind
        self._pieces: Sequence[str] | None = None
        self._ids: dict[str, int] | None = None

    @property
    def pieces(self) -> Sequence[str]:
        if self._pieces is None:
            self._pieces = self.gguf.string_array(Keys.Tokenizer.LIST)
        return self._pieces

    def __len__(self) -> int:
        return len(self.pieces)

    def text(self, token_id: int) -> str:
        """The text token `token_id` stands for (bytes that are not UTF-8 shown as \\xNN)."""
        if not 0 <= token_id < len(self.pieces):
            return f"<id {token_id}>"
        piece = self.pieces[token_id]
        if self.kind == "gpt2":
            table = _gpt2_unicode_to_byte()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece).decode("utf-8", "backslashreplace")
            return piece
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)]).decode("utf-8", "backslashreplace")
        return piece.replace("\u2581", " ")

    def token_id(self, text: str) -> int | None:
        """The id of the token standing for exactly `text` (the lowest id if several do)."""
        if self._ids is None:
            ids: dict[str, int] = {}
            for i in range(len(self.pieces)):
                ids.setdefault(self.text(i), i)
            self._ids = ids
        return self._ids.get(text)

    def space_prefixed(self, token_id: int) -> int | None:
        """The same word with a leading space, if the vocabulary has it and `token_id` lacks
        it (' Paris' for 'Paris': what follows another word is usually the spaced form)."""
        text = self.text(token_id)
        if not text or text[0].isspace():
            return None
        return self.token_id(" " + text)
