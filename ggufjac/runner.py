"""Running the shared block over one GGUF file's weights: the input embeddings, the
in-memory reference model (every layer held, one autograd graph), and the unembedding. The
streaming engine (engine.py) is the other runner, one layer at a time."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .layout import has_constant
from .linearize import PLAIN, Coefficients, Linearization
from .model import KVCache, LayerWeights, block, final_norm
from .weights import ROWS_PER_CHUNK, GGUFWeights


def input_embeddings(weights: GGUFWeights, token_ids: list[int]) -> torch.Tensor:
    """The input embeddings x_1..x_N fed into layer 0 (the family's scale included)."""
    x = weights.embedding_rows(token_ids)
    scale = weights.cfg.embed_scale
    return x * scale if scale != 1.0 else x


# (layer, its output residual rows [m, d], position of the first row) -> the rows to go on
# with: how steering changes the residual stream after a layer (llama.cpp's l_out-N).
ResidualEdit = Callable[[int, torch.Tensor, int], torch.Tensor]


class Transformer:
    """The model of one GGUF file. Holds all layer weights (`keep_weights`) or reloads them."""

    def __init__(self, weights: GGUFWeights, keep_weights: bool = True) -> None:
        self.weights, self.cfg = weights, weights.cfg
        self.dtype, self.device = weights.dtype, weights.device
        self._layers = [weights.layer(i) for i in range(self.cfg.n_layer)] if keep_weights else None
        self.output_norm = weights.output_norm()
        self._unembedding: torch.Tensor | None = None

    def layer_weights(self, i: int) -> LayerWeights:
        return self._layers[i] if self._layers is not None else self.weights.layer(i)

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        return input_embeddings(self.weights, token_ids)

    def forward(self, x: torch.Tensor, lin: Linearization,
                hidden: list[torch.Tensor] | None = None, edit: ResidualEdit | None = None,
                caches: list[KVCache] | None = None) -> torch.Tensor:
        """Input embeddings [N, d] -> final-norm hidden states [N, d] (all positions).

        If `hidden` is a list, every layer's output residual stream is appended to it (after
        `edit`, which may change each layer's output). With `caches` (one per layer, plain
        model only), x holds the positions after the cached ones, which the caches gain.
        """
        start = 0 if caches is None else caches[0].length
        for i in range(self.cfg.n_layer):
            x = block(self.cfg, i, self.layer_weights(i), x, lin,
                      None if caches is None else caches[i]).out
            if edit is not None:
                x = edit(i, x, start)
            if hidden is not None:
                hidden.append(x)
        return final_norm(self.cfg, self.output_norm, x, lin)

    @torch.no_grad()
    def constant(self, x: torch.Tensor, lin: Linearization) -> torch.Tensor | None:
        """c [d] of the detached network y = Σ_i J_i x_i + c at the last position (None for
        a family without biases): each layer's coefficients recorded on x, then replayed on
        a zero input with the biases on, as the streaming engine's forward pass does."""
        if not has_constant(self.cfg.family):
            return None
        h, z = x.detach(), torch.zeros_like(x)
        for i in range(self.cfg.n_layer):
            store: Coefficients = {}
            h = block(self.cfg, i, self.layer_weights(i), h, lin.recording(store)).out
            z = block(self.cfg, i, self.layer_weights(i), z,
                      lin.replaying(store, constants=True)).out
        store = {}
        final_norm(self.cfg, self.output_norm, h, lin.recording(store))
        return final_norm(self.cfg, self.output_norm, z, lin.replaying(store, constants=True))[-1]

    def new_caches(self) -> list[KVCache]:
        return [KVCache() for _ in range(self.cfg.n_layer)]

    @torch.no_grad()
    def next_logits(self, token_ids: list[int], caches: list[KVCache],
                    edit: ResidualEdit | None = None) -> torch.Tensor:
        """The plain model on the positions after the cached ones: the last one's logits."""
        y = self.forward(self.embed(token_ids), PLAIN, edit=edit, caches=caches)
        return self.logits(y[-1])

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        if self._unembedding is not None:
            with torch.no_grad():
                return softcapped(self.cfg.final_logit_softcap, y @ self._unembedding.T)
        return unembed(self.weights, y)

    def hold_unembedding(self) -> None:
        """Keep the unembedding table dequantized (vocab × d) for many `logits` calls, as
        generation makes: dequantizing it per call costs more than the step itself."""
        if self._unembedding is None:
            table = None
            for start, w in self.weights.unembedding_chunks(ROWS_PER_CHUNK):
                if table is None:
                    table = w.new_empty((self.cfg.vocab_size, w.shape[1]))
                table[start:start + w.shape[0]] = w  # a chunk's buffer is reused: copied
            self._unembedding = table


@torch.no_grad()
def unembed(weights: GGUFWeights, y: torch.Tensor, rows_per_chunk: int = ROWS_PER_CHUNK
            ) -> torch.Tensor:
    """Unembedding of hidden states y [..., d] -> logits [..., vocab], in row chunks (the
    table is never held whole), then the family's final soft-cap if it has one."""
    z = torch.cat([y @ w.T for _, w in weights.unembedding_chunks(rows_per_chunk)], dim=-1)
    return softcapped(weights.cfg.final_logit_softcap, z)


def softcapped(cap: float | None, z: torch.Tensor) -> torch.Tensor:
    """The family's final logit soft-cap, cap · tanh(z / cap), if it has one."""
    return z if cap is None else torch.tanh(z / cap) * cap
