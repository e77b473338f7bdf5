"""Figures and the Markdown summary written next to the numbers (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_spectrum(path: Path, singular_values: list[float], title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(range(1, len(singular_values) + 1), singular_values, marker=".", lw=1)
    ax.set_xlabel("index k")
    ax.set_ylabel("singular value $\\sigma_k$")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def _grid(entries: list[dict], kinds: tuple[str, ...], key: str) -> tuple[list[int], list[list[float]]]:
    layers = sorted({e["layer"] for e in entries})
    value = {(e["layer"], e["kind"]): e[key] for e in entries}
    return layers, [[value.get((l, k), float("nan")) for l in layers] for k in kinds]


def plot_stable_rank_heatmap(path: Path, entries: list[dict], kinds: tuple[str, ...],
                             title: str) -> None:
    layers, grid = _grid(entries, kinds, "stable_rank")
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(layers) + 2), 3.2))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel("layer")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, label="stable rank $\\|J\\|_F^2/\\sigma_1^2$")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def _save_by_layer(fig: plt.Figure, ax: plt.Axes, path: Path, ylabel: str, title: str) -> None:
    """Label a plot over layers (integer ticks, legend, grid, title) and save it as PNG."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def plot_top_singular_value(path: Path, entries: list[dict], kinds: tuple[str, ...],
                            title: str) -> None:
    layers, grid = _grid(entries, kinds, "top_singular_value")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    # Lines can coincide (a layer's map and the same without the residual, when the residual
    # is small against the update): each kind gets its own marker and dash, drawn hollow.
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", (0, (5, 1, 1, 1)))]
    for (kind, row), (marker, dash) in zip(zip(kinds, grid), styles * len(kinds)):
        ax.semilogy(layers, row, marker=marker, ls=dash, lw=1.2, ms=5, mfc="none", label=kind)
    _save_by_layer(fig, ax, path, "top singular value $\\sigma_1$", title)


def plot_lens_differences(path: Path, entries: list[dict], title: str) -> None:
    """Per layer, the two files' lens maps' relative difference: one thin line per prompt,
    the median bold (where in depth the explanations part)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows = [[r["lens_rel_difference"] for r in e["lens"]] for e in entries]
    layers = [r["layer"] for r in entries[0]["lens"]]
    for row in rows:
        ax.plot(layers, row, color="0.6", lw=0.7, alpha=0.6)
    median = np.median(np.asarray(rows), axis=0)
    ax.plot(layers, median, color="C0", lw=2, marker=".", label="median over prompts")
    if any(v > 0 for row in rows for v in row):
        ax.set_yscale("log")
    _save_by_layer(fig, ax, path, "lens map $\\|L_B - L_A\\|_F / \\|L_A\\|_F$", title)


def plot_comparison_distributions(path: Path, entries: list[dict], keys: tuple[str, ...],
                                  title: str) -> None:
    """One histogram per figure over the prompt set."""
    keys = tuple(k for k in keys if any(e.get(k) is not None for e in entries))
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.2 * max(1, len(keys)), 3),
                             squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.hist([e[key] for e in entries if e.get(key) is not None], bins=20, color="C0")
        ax.set_xlabel(key, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("prompts")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
