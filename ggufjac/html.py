"""One self-contained HTML page per result (`ggufjac report`, the commands' --html).

`render(report, kind)` is the one place the page is built: a Jinja2 template (ggufjac/
templates/report.html.j2) with the charts as inline SVG from matplotlib and a little inline
JavaScript, so the page opens from disk with no network access. Only the figures a reader
looks at are embedded (spectra, decoded tokens, per-position weights), never J itself.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

from .errors import GgufjacError

KINDS = ("attribute", "jacobian", "svd", "layers", "batch", "compare")
# The layer maps in `layers.json`, in the order of layers.KINDS (repeated here so that
# rendering a page needs no torch import).
LAYER_KINDS = ("cumulative", "layer", "layer_no_residual", "attention", "mlp")
# Per-position weights of a jacobian result are computed from jacobian.safetensors only up
# to this size: beyond, J J^T takes a long read of the file for a colouring of the tokens.
POSITION_WEIGHTS_MAX_BYTES = 2 * 2**30
# Colour-blind-safe maps: PuOr (purple-orange) diverges for signed contributions; Oranges
# for non-negative weights. Both stay readable in greyscale print.
DIVERGING, SEQUENTIAL = "PuOr", "Oranges"


def _jinja() -> Any:
    try:
        import jinja2
    except ImportError:
        raise GgufjacError("HTML reports need Jinja2: pip install 'ggufjac[html]'") from None
    return jinja2


def require_html() -> None:
    """Refuse --html before a long run when Jinja2 is missing."""
    _jinja()


# -- what a result is -----------------------------------------------------------------------

_REQUIRED = {
    "attribute": ("tokens", "targets"),
    "jacobian": ("tokens", "singular_values", "top_singular_tokens", "predicted_token"),
    "svd": ("tokens", "singular_values", "vectors", "predicted_token"),
    "layers": ("tokens", "maps", "layers", "predicted_token"),
    "compare": ("a", "b", "prompts", "summary", "settings"),
}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise GgufjacError(f"{path}: cannot read: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GgufjacError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise GgufjacError(f"{path}: not a ggufjac report (a JSON object is expected)")
    return data


def detect(path: Path) -> tuple[Path, str]:
    """The JSON file of a result and its kind: a `jacobian`, `svd` or `layers` directory,
    the file written by `attribute --json`, or a `batch` results store (SQLite)."""
    if path.is_dir():
        if (path / "layers.json").is_file():
            return path / "layers.json", "layers"
        if (path / "comparison.json").is_file():
            return path / "comparison.json", "compare"
        if (path / "report.json").is_file():
            if (path / "svd.safetensors").is_file():
                return path / "report.json", "svd"
            if (path / "jacobian.safetensors").is_file():
                return path / "report.json", "jacobian"
        raise GgufjacError(f"{path}: not a ggufjac result directory (no layers.json, or "
                           "report.json with jacobian.safetensors or svd.safetensors)")
    if path.is_file():
        with open(path, "rb") as f:
            is_sqlite = f.read(16) == b"SQLite format 3\x00"
        return path, "batch" if is_sqlite else "attribute"
    raise GgufjacError(f"{path}: no such file or directory")


def _check(report: dict, kind: str, source: Path) -> None:
    missing = [k for k in _REQUIRED[kind] if k not in report]
    if missing:
        raise GgufjacError(f"{source}: not a ggufjac {kind} report (no {missing[0]!r})")


def load(path: Path) -> tuple[dict, str, list[float] | None]:
    """The report at `path` (a result directory or an attribution JSON), its kind, and
    per-position weights of the top right singular vector where they can be had."""
    source, kind = detect(path)
    if kind == "batch":
        from .store import read_store

        return read_store(source), kind, None
    report = _read_json(source)
    _check(report, kind, source)
    weights = None
    if kind == "jacobian":
        weights = jacobian_position_weights(source.parent / "jacobian.safetensors")
    return report, kind, weights


def jacobian_position_weights(path: Path) -> list[float] | None:
    """‖v_1[i]‖ per input position i, v_1 the top right singular vector of J (d x N x d),
    from the eigenvector u_1 of J Jᵀ (d x d, float64) and v_1 = Jᵀ u_1 / σ_1; None when the
    file is too large to read for a colouring or lacks the tensor."""
    if not path.is_file() or path.stat().st_size > POSITION_WEIGHTS_MAX_BYTES:
        return None
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if "jacobian" not in f.keys():
                return None
            j = f.get_tensor("jacobian").to(torch.float64)
    except Exception:  # a file we cannot read colours nothing; the report says why
        return None
    if j.dim() != 3:
        return None
    d, n, d_in = j.shape
    flat = j.reshape(d, n * d_in)
    _, vecs = torch.linalg.eigh(flat @ flat.T)
    u1 = vecs[:, -1]
    v1 = (u1 @ flat).reshape(n, d_in)
    norms = torch.linalg.vector_norm(v1, dim=1)
    total = torch.linalg.vector_norm(norms)
    return (norms / total).tolist() if total > 0 else norms.tolist()


# -- the pieces the template shows -------------------------------------------------------------

def show_token(text: str) -> str:
    """A token as it is read on the page: control and other unprintable characters as
    escapes (they would vanish or break the layout), everything else as is."""
    return "".join(c if c.isprintable() or c == " " else
                   (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}") for c in text)


def _rgb_hex(rgba: tuple[float, ...]) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgba[:3])


def _ink(rgba: tuple[float, ...]) -> str:
    """Black or white text, whichever reads on this background (relative luminance)."""
    r, g, b = rgba[:3]
    return "#000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "#fff"


def _colours(values: list[float], diverging: bool) -> list[dict]:
    import matplotlib

    cmap = matplotlib.colormaps[DIVERGING if diverging else SEQUENTIAL]
    scale = max((abs(v) for v in values if math.isfinite(v)), default=0.0) or 1.0
    out = []
    for v in values:
        # diverging: 0 at the map's centre, ±scale at its ends; sequential: 0..scale
        t = 0.5 + 0.5 * v / scale if diverging else 0.85 * max(v, 0.0) / scale
        rgba = cmap(min(max(t, 0.0), 1.0))
        out.append({"bg": _rgb_hex(rgba), "fg": _ink(rgba)})
    return out


def _legend(diverging: bool, label: str) -> str:
    """A small colour bar as inline SVG (a linear gradient)."""
    import matplotlib

    cmap = matplotlib.colormaps[DIVERGING if diverging else SEQUENTIAL]
    top = 1.0 if diverging else 0.85
    stops = "".join(f'<stop offset="{i / 10:.1f}" stop-color="{_rgb_hex(cmap(top * i / 10))}"/>'
                    for i in range(11))
    ends = ("−max", "0", "+max") if diverging else ("0", "", "max")
    gid = "gd" if diverging else "gs"
    return (f'<svg class="legend" width="240" height="34" role="img" aria-label="{label}">'
            f'<defs><linearGradient id="{gid}">{stops}</linearGradient></defs>'
            f'<rect x="0" y="0" width="240" height="14" fill="url(#{gid})" stroke="#888"/>'
            f'<text x="0" y="28" font-size="11">{ends[0]}</text>'
            f'<text x="120" y="28" font-size="11" text-anchor="middle">{ends[1]}</text>'
            f'<text x="240" y="28" font-size="11" text-anchor="end">{ends[2]}</text></svg>')


def token_row(tokens: list[str], values: list[float] | None, diverging: bool,
              attribute: str, segments: list[str] | None = None) -> list[dict]:
    """Per input token: its text, its value (or None), its colours and, for a chat prompt,
    its role segment (chat.SEGMENTS; None otherwise)."""
    colours = _colours(values, diverging) if values is not None else None
    if segments is not None and len(segments) != len(tokens):
        segments = None
    return [{"text": t, "shown": show_token(t), "json": json.dumps(t), "position": i,
             "value": None if values is None else values[i],
             "bg": colours[i]["bg"] if colours else "#f4f4f4",
             "fg": colours[i]["fg"] if colours else "#000", "attribute": attribute,
             "marked": False, "segment": None if segments is None else segments[i]}
            for i, t in enumerate(tokens)]


def _segments(report: dict) -> list[str] | None:
    """A chat prompt's token segments (report["chat"], model_reports.add_chat), or None."""
    chat = report.get("chat")
    return chat.get("token_segments") if isinstance(chat, dict) else None


def _svg(fig: Any) -> str:
    """A matplotlib figure as an inline <svg> element (text kept as text: smaller, and
    selectable)."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "ggufjac"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: inline in HTML
    # The page sets the size; matplotlib's fixed pt sizes would overflow narrow windows.
    return re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 class="chart"',
                  text, count=1)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spectrum_svg(singular_values: list[float], title: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    s = [v for v in singular_values if v > 0]
    ax.semilogy(range(1, len(s) + 1), s, marker="." if len(s) < 80 else None, lw=1.2,
                color="#5e3c99")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # k is a whole number
    ax.set_xlabel("index k")
    ax.set_ylabel("singular value σ_k")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    return _svg(fig)


def layer_values_svg(maps: list[dict], key: str, ylabel: str, log: bool) -> str:
    """One line per map kind over the layers (σ_1 or stable rank)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    markers = dict(zip(LAYER_KINDS, "osD^v"))
    for kind in LAYER_KINDS:
        rows = sorted((e["layer"], e[key]) for e in maps if e["kind"] == kind)
        if rows:
            ax.plot([r[0] for r in rows], [r[1] for r in rows], marker=markers[kind], ms=3,
                    lw=1, label=kind)
    if log:
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _svg(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.3e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def _settings(report: dict) -> list[tuple[str, str]]:
    """Run settings and provenance: every scalar the report carries about how it was made."""
    keys = ("model", "architecture", "dtype", "gate_path", "detach", "device", "method",
            "spectrum_method", "logit_definition", "top_k", "converged", "iterations",
            "tolerance", "seconds", "jacobian_seconds", "jacobian_in_memory", "layers")
    return [(k, _fmt(report[k])) for k in keys if k in report]


def _anchor(report: dict) -> list[tuple[str, str]] | None:
    a = report.get("anchor")
    if not isinstance(a, dict):
        return None
    keys = ("runtime", "flash_attn", "anchor_logits_nmse", "anchor_output_rel_error",
            "reconstruction_rel_error_vs_llama_cpp", "llama_cpp_top1", "anchored_top1",
            "top1_agree", "llama_cpp_settings", "llama_cpp_resolved", "approximations")
    rows = [(k, _fmt(a[k])) for k in keys if k in a]
    if isinstance(a.get("independent_run"), dict):
        ind = a["independent_run"]
        rows += [(f"independent run: {k}", _fmt(ind[k])) for k in
                 ("logits_nmse", "output_rel_error", "llama_cpp_top1") if k in ind]
    return rows


def _constant(report: dict) -> list[tuple[str, str]] | None:
    """What the report says of the constant term c (a family with biases), if anything."""
    c = report.get("constant")
    return [(k, _fmt(v)) for k, v in c.items()] if isinstance(c, dict) else None


def _right_norms(entry: dict | None) -> list[float] | None:
    """The top right vector's norm per input position (layers.json from ggufjac with
    per-position norms; older files keep only the largest position)."""
    if entry is None or not entry["vectors"]:
        return None
    return entry["vectors"][0].get("right_position_norms")


def _last_cumulative(report: dict) -> dict | None:
    """The deepest layer's cumulative map (= the full J) that has decoded vectors."""
    return max((e for e in report["maps"] if e["kind"] == "cumulative" and e["vectors"]),
               key=lambda e: e["layer"], default=None)


def _layers_view(report: dict) -> dict:
    maps = report["maps"]
    tokens = report["tokens"]
    by = {(e["layer"], e["kind"]): e for e in maps}
    layers = sorted({e["layer"] for e in maps})
    ranks = [e["stable_rank"] for e in maps if math.isfinite(e["stable_rank"])]
    lo, hi = (min(ranks), max(ranks)) if ranks else (0.0, 1.0)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    rows = []
    for layer in layers:
        cells = []
        for kind in LAYER_KINDS:
            e = by.get((layer, kind))
            if e is None:
                cells.append(None)
                continue
            # log scale: stable ranks span orders of magnitude across the maps
            t = (math.log(e["stable_rank"]) - math.log(lo)) / (math.log(hi) - math.log(lo)) \
                if hi > lo > 0 and e["stable_rank"] > 0 else 0.5
            rgba = cmap(min(max(t, 0.0), 1.0))
            norms = _right_norms(e)
            heat = token_row(tokens, norms, False, "weight") \
                if norms is not None and len(norms) == len(tokens) else None
            cells.append({"kind": kind, "stable_rank": e["stable_rank"], "bg": _rgb_hex(rgba),
                          "fg": _ink(rgba), "entry": e, "heat": heat})
        cum = by.get((layer, "cumulative"))
        top = cum["vectors"][0]["left_tokens"] if cum and cum["vectors"] else []
        rows.append({"layer": layer, "cells": cells, "top_tokens": top})
    return {"rows": rows, "kinds": LAYER_KINDS,
            "first": _first_layer(maps, report["predicted_token"]),
            "sigma_svg": layer_values_svg(maps, "top_singular_value", "top singular value σ_1",
                                          log=True),
            "rank_range": (lo, hi)}


def _first_layer(maps: list[dict], token: str) -> int | None:
    for e in sorted(maps, key=lambda e: e["layer"]):
        if e["kind"] == "cumulative" and e["vectors"] and token in e["vectors"][0]["left_tokens"]:
            return e["layer"]
    return None


def _components_view(components: dict | None) -> dict | None:
    """`attribute --components`' table for the page: per layer, the report's totals, the
    sum, and every head and MLP part as a cell coloured by its contribution (one scale for
    the whole table)."""
    if not components:
        return None
    layers = components["layers"]
    parts = [[c for c in r["components"] if c["kind"] not in ("stream", "bias_above")]
             for r in layers]
    colours = iter(_colours([c["value"] for row in parts for c in row], True))
    rows = [{"layer": r["layer"], "sum": r["sum"], "rel_error": r["rel_error"],
             "totals": r["totals"],
             "parts": [{**c, **next(colours)} for c in row]}
            for r, row in zip(layers, parts)]
    kinds = {c["kind"] for r in layers for c in r["components"]}
    return {"rows": rows, "columns": list(layers[0]["totals"]) if layers else [],
            "biased": "bias_above" in kinds,
            "attention_bias": "attention_bias" in kinds,
            "max_rel_error": components["max_rel_error"]}


def _routing_view(routing: dict | None) -> dict | None:
    """A mixture of experts' routing for the page: a token × layer table, each cell the
    experts the token selected in that layer with their weights, shaded by the largest."""
    if not routing:
        return None
    layers = routing["layers"]
    rows = []
    for t, token in enumerate(routing["tokens"]):
        cells = []
        for layer in layers:
            pairs = list(zip(layer["experts"][t], layer["weights"][t]))
            shade = _colours([max(w for _, w in pairs), 1.0], False)[0]  # weights in [0, 1]
            cells.append({"pairs": pairs, "bg": shade["bg"], "fg": shade["fg"]})
        rows.append({"position": t, "token": show_token(token), "cells": cells})
    return {"layers": [layer["layer"] for layer in layers], "rows": rows,
            "definition": routing["definition"],
            "read": (routing["expert_bytes_read"], routing["expert_bytes_in_file"],
                     routing["file_bytes"], routing["share_of_file_read"])}


def _context(report: dict, kind: str, position_weights: list[float] | None) -> dict:
    tokens = report["tokens"]
    ctx: dict[str, Any] = {"kind": kind, "report": report, "settings": _settings(report),
                           "anchor": _anchor(report), "constant": _constant(report),
                           "title": f"ggufjac {kind}: "
                           f"{Path(str(report.get('model', '?'))).name}",
                           "show": show_token, "fmt": _fmt, "json": json.dumps,
                           "routing": _routing_view(report.get("routing"))}
    segments = _segments(report)
    ctx["segments"] = segments is not None
    if kind == "attribute":
        ctx["targets"] = [{"row": row, "tokens": token_row(tokens, row["contributions"], True,
                                                            "contribution", segments),
                           "components": _components_view(row.get("components"))}
                          for row in report["targets"]]
        ctx["legend"] = _legend(True, "contribution to the logit")
        return ctx
    if kind == "svd":
        vectors = report["vectors"]
        if vectors and "input_position_norms" in vectors[0]:
            position_weights = vectors[0]["input_position_norms"]
        ctx["vectors"] = [{"v": v, "tokens": token_row(tokens, v.get("input_position_norms"),
                                                        False, "weight", segments)}
                          for v in vectors]
        ctx["spectrum_svg"] = spectrum_svg(report["singular_values"],
                                           f"top {len(report['singular_values'])} singular "
                                           "values of J")
    elif kind == "jacobian":
        ctx["vectors"] = [{"v": {**v, "scores": v.get("scores", [])}, "tokens": None}
                          for v in report["top_singular_tokens"]]
        ctx["spectrum_svg"] = spectrum_svg(report["singular_values"],
                                           "singular values of J")
    elif kind == "layers":
        ctx["layers_view"] = _layers_view(report)
        if position_weights is None:
            position_weights = _right_norms(_last_cumulative(report))
    if position_weights is not None and len(position_weights) != len(tokens):
        position_weights = None
    ctx["position_weights"] = position_weights is not None
    ctx["tokens"] = token_row(tokens, position_weights, False, "weight", segments)
    if kind == "layers" and position_weights is None:
        last = _last_cumulative(report)
        if last is not None and 0 <= last["vectors"][0]["right_position"] < len(tokens):
            ctx["tokens"][last["vectors"][0]["right_position"]]["marked"] = True
    ctx["legend"] = _legend(False, "share of the top right singular vector at each position")
    return ctx


def _batch_columns() -> tuple[tuple[str, str, bool], ...]:
    from .batch import result_columns

    return (*((c.name, c.heading, c.kind in (int, float)) for c in result_columns()
              if c.heading is not None), ("concepts", "concepts", False))


# The batch page's table: (store column, heading, numeric), the columns of the batch's
# result marked to be shown, in its order, then the concept hits (a view of the store)
BATCH_COLUMNS = _batch_columns()


def _batch_context(store: dict) -> dict:
    prompts, counts = [], {}
    for i, p in enumerate(store["prompts"]):
        for c in p["concepts"]:
            counts[c] = counts.get(c, 0) + 1
        texts = [t["token"] for t in p["tokens"]]
        values = [t["attribution"] for t in p["tokens"]]
        attributed = bool(values) and all(v is not None for v in values)
        vectors: dict[int, list[str]] = {}
        for d in p["svd_tokens"]:
            vectors.setdefault(d["vector"], []).append(d["token"])
        sort = {k: ("" if p.get(k) is None else p[k]) for k, _, _ in BATCH_COLUMNS if k != "concepts"}
        sort["concepts"] = len(p["concepts"])
        prompts.append({**p, "view": f"p-{p['run_id']}-{i}", "sort": sort,
                        "shown": {k: _fmt(p[k]) if p.get(k) is not None else ""
                                  for k, _, _ in BATCH_COLUMNS if k in p},
                        "attribution_tokens": token_row(texts, values, True, "contribution")
                        if attributed else None,
                        "plain_tokens": token_row(texts, None, False, "weight"),
                        "svd_vectors": sorted(vectors.items())})
    runs = [[(k, _fmt(v)) for k, v in r.items()] for r in store["runs"]]
    model = Path(str(store["runs"][0]["model_path"])).name if store["runs"] else "?"
    return {"title": f"ggufjac batch: {model}", "store": store, "prompts": prompts,
            "runs": runs, "columns": BATCH_COLUMNS,
            "concept_counts": sorted(counts.items()),
            "n_done": sum(p["status"] == "done" for p in prompts),
            "n_failed": sum(p["status"] == "failed" for p in prompts),
            "legend": _legend(True, "contribution to the logit"),
            "show": show_token, "fmt": _fmt, "json": json.dumps}


def _compare_context(report: dict) -> dict:
    s = report["summary"]
    # the summary holds each figure's distribution, in reports.COMPARISON_FIGURES's order
    figures = [(k, d) for k, d in s.items() if isinstance(d, dict) and d.get("n")]
    return {"title": f"ggufjac compare: {Path(str(report['a']['path'])).name} (A) vs "
                     f"{Path(str(report['b']['path'])).name} (B)",
            "report": report, "s": s, "figures": figures,
            "figure_keys": [k for k, _ in figures],
            "token_rows": [token_row(e["tokens"], None, False, "weight")
                           for e in report["prompts"]],
            "settings": [(k, _fmt(v)) for k, v in report["settings"].items()],
            "show": show_token, "fmt": _fmt, "json": json.dumps}


def render(report: dict, kind: str, position_weights: list[float] | None = None) -> str:
    """The HTML page of one result. `kind`: attribute, jacobian, svd, layers, or batch
    (`report`: what store.read_store gives);
    `position_weights`: per input position, the top right singular vector's norm (the
    colouring of the tokens when the report carries none)."""
    if kind not in KINDS:
        raise GgufjacError(f"unknown report kind {kind!r} (one of {', '.join(KINDS)})")
    jinja2 = _jinja()
    env = jinja2.Environment(loader=jinja2.PackageLoader("ggufjac", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    if kind == "batch":
        return env.get_template("batch.html.j2").render(**_batch_context(report))
    if kind == "compare":
        return env.get_template("compare.html.j2").render(**_compare_context(report))
    ctx = _context(report, kind, position_weights)
    return env.get_template("report.html.j2").render(**ctx)


def write_report(path: Path, out: Path | None = None) -> Path:
    """Render the result at `path` to `out` (default: report.html in the result directory,
    or next to an attribution JSON), written atomically: a failure leaves no page."""
    from .outputs import atomic_write

    report, kind, weights = load(path)
    source = detect(path)[0]
    try:
        page = render(report, kind, weights)
    except GgufjacError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise GgufjacError(f"{source}: not a well-formed ggufjac {kind} report "
                           f"({type(e).__name__}: {e})") from None
    if out is None:
        out = path.with_suffix(".html") if kind == "batch" else \
            (path if path.is_dir() else path.parent) / "report.html"
    atomic_write(out, lambda p: p.write_text(page, encoding="utf-8"))
    return out


class HTMLReport:
    """A report dict with its page: shown as the page in notebooks (`_repr_html_`)."""

    def __init__(self, report: dict, kind: str) -> None:
        self.report, self.kind = report, kind

    def _repr_html_(self) -> str:
        return render(self.report, self.kind)
