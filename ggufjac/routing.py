"""A mixture of experts' router as llama.cpp computes it (src/llama-graph.cpp, build_moe_ffn):
which experts each position selects and with what weights.

The selection is llama.cpp's `ggml_argsort_top_k`: the CPU backend sorts the expert indices
by descending score with `std::sort`, which is not stable, and keeps the first k. Where two
scores are equal the order `std::sort` leaves them in decides which expert is selected, so
that order is reproduced here: libstdc++'s introsort (median-of-three quicksort down to runs
of 16, then insertion sort; for 16 experts or fewer that is a plain insertion sort, i.e. the
lower index first among equals). The rest follows build_moe_ffn: probabilities (softmax over
all experts, or the logits themselves when the softmax comes after the selection), the
selected ones gathered, optionally softmaxed over the k, optionally divided by their sum
(clamped below at F16's smallest normal number, as llama.cpp clamps it).
"""

from __future__ import annotations

import torch

# libstdc++'s _S_threshold: introsort leaves runs of at most this many to the insertion sort.
_INSERTION_THRESHOLD = 16
# llama.cpp clamps the sum of the selected weights to F16's smallest normal before dividing.
WEIGHT_SUM_FLOOR = 6.103515625e-5


def _insertion_sort(idx: list[int], first: int, last: int, before) -> None:  # type: ignore[no-untyped-def]
    """libstdc++'s __insertion_sort on idx[first:last] (guarded at `first`)."""
    for i in range(first + 1, last):
        val = idx[i]
        if before(val, idx[first]):
            idx[first + 1:i + 1] = idx[first:i]
            idx[first] = val
        else:
            _unguarded_linear_insert(idx, i, before)


def _unguarded_linear_insert(idx: list[int], last: int, before) -> None:  # type: ignore[no-untyped-def]
    val, j = idx[last], last - 1
    while before(val, idx[j]):
        idx[j + 1] = idx[j]
        j -= 1
    idx[j + 1] = val


def _move_median_to_first(idx: list[int], result: int, a: int, b: int, c: int,
                          before) -> None:  # type: ignore[no-untyped-def]
    if before(idx[a], idx[b]):
        if before(idx[b], idx[c]):
            pick = b
        elif before(idx[a], idx[c]):
            pick = c
        else:
            pick = a
    elif before(idx[a], idx[c]):
        pick = a
    elif before(idx[b], idx[c]):
        pick = c
    else:
        pick = b
    idx[result], idx[pick] = idx[pick], idx[result]


def _unguarded_partition(idx: list[int], first: int, last: int, pivot: int,
                         before) -> int:  # type: ignore[no-untyped-def]
    while True:
        while before(idx[first], idx[pivot]):
            first += 1
        last -= 1
        while before(idx[pivot], idx[last]):
            last -= 1
        if not first < last:
            return first
        idx[first], idx[last] = idx[last], idx[first]
        first += 1


def _sift_down(idx: list[int], first: int, hole: int, length: int, value: int,
               before) -> None:  # type: ignore[no-untyped-def]
    """libstdc++'s __adjust_heap (a max-heap under `before`), then __push_heap."""
    top, child = hole, hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if before(idx[first + child], idx[first + child - 1]):
            child -= 1
        idx[first + hole] = idx[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        idx[first + hole] = idx[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and before(idx[first + parent], value):
        idx[first + hole] = idx[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    idx[first + hole] = value


def _heap_sort(idx: list[int], first: int, last: int, before) -> None:  # type: ignore[no-untyped-def]
    """libstdc++'s __partial_sort(first, last, last): make_heap, then sort_heap."""
    length = last - first
    if length >= 2:
        for parent in range((length - 2) // 2, -1, -1):
            _sift_down(idx, first, parent, length, idx[first + parent], before)
    for end in range(last - 1, first, -1):  # __pop_heap
        value = idx[end]
        idx[end] = idx[first]
        _sift_down(idx, first, 0, end - first, value, before)


def _introsort_loop(idx: list[int], first: int, last: int, depth: int,
                    before) -> None:  # type: ignore[no-untyped-def]
    while last - first > _INSERTION_THRESHOLD:
        if depth == 0:
            _heap_sort(idx, first, last, before)
            return
        depth -= 1
        mid = first + (last - first) // 2
        _move_median_to_first(idx, first, first + 1, mid, last - 1, before)
        cut = _unguarded_partition(idx, first + 1, last, first, before)
        _introsort_loop(idx, cut, last, depth, before)
        last = cut


def std_sort_descending(values: list[float]) -> list[int]:
    """The indices of `values` in the order libstdc++'s std::sort leaves them when sorted
    with `values[a] > values[b]` (ggml's argsort, descending), ties included."""
    n = len(values)
    idx = list(range(n))

    def before(a: int, b: int) -> bool:
        return values[a] > values[b]

    if n > 1:
        _introsort_loop(idx, 0, n, 2 * (n.bit_length() - 1), before)
        if n > _INSERTION_THRESHOLD:
            _insertion_sort(idx, 0, _INSERTION_THRESHOLD, before)
            for i in range(_INSERTION_THRESHOLD, n):
                _unguarded_linear_insert(idx, i, before)
        else:
            _insertion_sort(idx, 0, n, before)
    return idx


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """ggml_argsort_top_k on the CPU: per row of `scores` [N, n], the first k indices of the
    descending std::sort [N, k] (int64). Rows without equal scores are sorted by torch (any
    sort gives the same order); a row with a tie is sorted as std::sort sorts it."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    rows = scores.detach().to("cpu", torch.float64)
    for r in range(rows.shape[0]):
        row = rows[r]
        if row.unique().numel() < row.numel():
            order[r] = torch.tensor(std_sort_descending(row.tolist())[:k], device=order.device)
    return order


def route(logits: torch.Tensor, k: int, gating: str, normalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts each position selects and their weights, from the router's logits
    [N, n_expert]: (experts [N, k] int64 in llama.cpp's order, weights [N, k]).

    "softmax_topk": probabilities = softmax over all experts, the top k of them, their
    probabilities the weights; "topk_softmax": the top k logits, softmax over those k.
    `normalize`: the weights divided by their sum (clamped below, as llama.cpp does)."""
    probs = torch.softmax(logits, dim=-1) if gating == "softmax_topk" else logits
    experts = top_k(probs, k)
    weights = probs.gather(-1, experts)
    if gating == "topk_softmax":
        weights = torch.softmax(weights, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=WEIGHT_SUM_FLOOR)
    return experts, weights
