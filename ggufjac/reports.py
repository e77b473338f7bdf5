"""What the commands write, built on the Python API: `jacobian`, `svd` and `layers` run on
an opened model and written to a directory (report.json or layers.json, the tensors, the
plots, a README.md), and the reports of `compare` (two files of one model) and `steer`.

The reports of one model's analyses themselves (JSON dicts from computed results) are built
in model_reports.py; nothing here formats a figure those already state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .api import LoadedModel, prediction_figures
from .compare import DEFINITIONS, distribution
from .jacobian import JacobianResult
from .layers import KINDS
from .linearize import Linearization
from .llamacpp import RunSettings
from .layout import has_constant
from .model_reports import add_chat, constant_statement, jacobian_report, layers_report, \
    svd_report

if TYPE_CHECKING:
    from .chat import ChatPrompt
    from .steer import Continuation, ScaleResult
    from .svd import PerTokenTriplets, TopSingularTriplets


def first_layer_predicting(entries: list[dict], token: str) -> int | None:
    """The first layer whose cumulative map's top singular vector decodes to `token`."""
    for e in entries:
        if e["kind"] == "cumulative" and e["vectors"] and token in e["vectors"][0]["left_tokens"]:
            return e["layer"]
    return None


def layers_markdown(report: dict) -> str:
    """DIR/README.md: the table a reader scans for where the prediction's concept appears."""
    entries, predicted = report["maps"], report["predicted_token"]
    first = first_layer_predicting(entries, predicted)
    by = {(e["layer"], e["kind"]): e for e in entries}
    layers = sorted({e["layer"] for e in entries})
    lines = [
        f"# ggufjac layers: {Path(report['model']).name}", "",
        f"Prompt tokens: {' '.join(repr(t) for t in report['tokens'])}  ",
        f"Predicted token: {predicted!r}; dtype {report['dtype']}; gate path "
        f"`{report['gate_path']}`; largest reconstruction error of any map "
        f"{max(e['reconstruction_rel_error'] for e in entries):.1e}.", "",
        *([f"Anchored to llama.cpp (flash attention {'on' if report['anchor']['flash_attn'] else 'off'}): "
           f"the coefficients are llama.cpp's own; logits nmse vs llama.cpp "
           f"{report['anchor']['anchor_logits_nmse']:.1e}.", ""] if "anchor" in report else []),
        "Each cell: the top 3 tokens of the top left singular vector (through the "
        "unembedding), then the stable rank. `cumulative` is the exact linear logit lens "
        "(inputs -> final norm of the residual after that layer); the others are the layer's "
        "own input -> its output at the last position.", "",
        (f"The predicted token first appears in a cumulative top vector at layer {first}."
         if first is not None else "The predicted token does not appear in any cumulative "
                                  "top vector (top 5 tokens)."), "",
        "Only the cumulative maps end in the final norm, where the unembedding reads; the "
        "per-layer maps end in one layer's update to the residual stream, whose top vectors "
        "decode to tokens mostly near the top layers (elsewhere the tokens look random).", "",
        "| layer no. | " + " | ".join(f"`{k}`" for k in KINDS) + " |",
        "|---|" + "---|" * len(KINDS)]
    for l in layers:
        cells = []
        for k in KINDS:
            e = by.get((l, k))
            if e is None or not e["vectors"]:
                cells.append("")
                continue
            toks = ", ".join(repr(t) for t in e["vectors"][0]["left_tokens"][:3])
            cells.append(f"{toks} ({e['stable_rank']:.1f})".replace("|", "\\|"))
        lines.append(f"| {l} | " + " | ".join(cells) + " |")
    lines += ["", "Files: `layers.json` (every figure and decoded token), `layers.safetensors` "
              "(singular values; the matrices with --save-matrices), `stable_rank.png`, "
              "`top_singular_value.png`.", ""]
    if "constant" in report:
        lines[-1:-1] = ["", f"Constant term: {report['constant']['handling']}."]
    return "\n".join(lines)


# -- compare: two files of one model ------------------------------------------------------

# The per-prompt figures summarized over a prompt set (compare.DEFINITIONS defines them);
# for angle lists, the largest angle stands for the prompt.
COMPARISON_FIGURES = ("logits_nmse", "llama_cpp_logits_nmse", "a_vs_own_llama_cpp_nmse",
                      "b_vs_own_llama_cpp_nmse", "jacobian_rel_difference",
                      "largest_left_angle", "largest_right_angle", "top_left_cosine",
                      "top_right_cosine", "delta_stable_rank", "constant_rel_difference",
                      "attribution_spearman",
                      "attribution_top3_overlap")


def file_summary(m: LoadedModel) -> dict:
    """What a compared file is: its path, size, file type and tensor types."""
    from gguf.constants import GGMLQuantizationType, Keys, LlamaFileType

    counts: dict[str, int] = {}
    for info in m.gguf.tensors.values():
        name = GGMLQuantizationType(info.type).name
        counts[name] = counts.get(name, 0) + 1
    ftype = m.gguf.get(Keys.General.FILE_TYPE)
    try:
        ftype_name = LlamaFileType(ftype).name.removeprefix("MOSTLY_") if ftype is not None \
            else None
    except ValueError:
        ftype_name = str(ftype)
    return {"path": str(m.path), "bytes": m.gguf.file_size, "file_type": ftype_name,
            "tensor_types": dict(sorted(counts.items()))}


def comparison_summary(entries: list[dict]) -> dict:
    """The distributions of the figures over the prompt set, and per layer the lens's."""
    summary: dict = {"prompts": len(entries),
                     "same_prediction": sum(e["same_prediction"] for e in entries)}
    for key in COMPARISON_FIGURES:
        if any(key in e for e in entries):
            summary[key] = distribution([e.get(key) for e in entries])
    lens = [e["lens"] for e in entries if "lens" in e]
    if lens:
        summary["lens"] = [{"layer": rows[0]["layer"],
                            "lens_rel_difference": distribution(
                                [r["lens_rel_difference"] for r in rows]),
                            "lens_tokens_agree": sum(r["lens_tokens_agree"] for r in rows),
                            "lens_top_left_cosine": distribution(
                                [r["lens_top_left_cosine"] for r in rows])}
                           for rows in zip(*lens)]
    return summary


def comparison_report(a: LoadedModel, b: LoadedModel, settings: dict, entries: list[dict]
                      ) -> dict:
    """`compare`'s report: both files, the settings, every prompt's figures, the summary
    (and, for a family with biases, what the comparison does with the constant term)."""
    report = {"a": file_summary(a), "b": file_summary(b), "architecture": a.cfg.arch,
              "settings": settings, "definitions": DEFINITIONS, "prompts": entries,
              "summary": comparison_summary(entries)}
    if has_constant(a.cfg.family):
        report["constant"] = constant_statement("compare")
    return report


def comparison_markdown(report: dict) -> str:
    """DIR/README.md and the command's output: the summary table, per figure and per layer."""
    a, b, s = report["a"], report["b"], report["summary"]
    n = s["prompts"]
    lines = [f"# ggufjac compare: {Path(a['path']).name} (A) vs {Path(b['path']).name} (B)", "",
             f"A: {a['file_type']}, {a['bytes'] / 2**20:.1f} MiB; B: {b['file_type']}, "
             f"{b['bytes'] / 2**20:.1f} MiB; {report['architecture']}, dtype "
             f"{report['settings']['dtype']}"
             + (", each anchored to its own llama.cpp run" if report["settings"]["anchored"]
                else "") + ".", "",
             f"{n} prompt{'s' * (n != 1)}; the same top-1 prediction in {s['same_prediction']}.",
             "", "| figure | median | p90 | max |", "|---|---|---|---|"]
    for key in COMPARISON_FIGURES:
        if key in s and s[key]["n"]:
            d = s[key]
            lines.append(f"| {key} | {d['median']:.3g} | {d['p90']:.3g} | {d['max']:.3g} |")
    if "lens" in s:
        ran = sorted({e[k] for e in report["prompts"] for k in ("lens_sweep_a", "lens_sweep_b")
                      if k in e})
        how = f"; lens maps by one {' or '.join(ran)} sweep per file and prompt" if ran else ""
        lines += ["", f"Per layer, the exact logit lens (median over prompts{how}):", "",
                  "| layer no. | lens rel difference | top tokens agree | top left cosine |",
                  "|---|---|---|---|"]
        for row in s["lens"]:
            lines.append(f"| {row['layer']} | {row['lens_rel_difference']['median']:.3g} | "
                         f"{row['lens_tokens_agree']}/{n} | "
                         f"{row['lens_top_left_cosine']['median']:.4f} |")
    if n == 1:
        e = report["prompts"][0]
        lines += ["", f"Prompt tokens: {' '.join(repr(t) for t in e['tokens'])}  ",
                  f"A predicts {e['top5_a'][0]['token']!r}, B predicts "
                  f"{e['top5_b'][0]['token']!r}."]
    if "constant" in report:
        lines += ["", f"Constant term: {report['constant']['handling']}."]
    lines += ["", "Definitions of the figures: `comparison.json` (`definitions`).", ""]
    return "\n".join(lines)


def _continuation(m: LoadedModel, c: Continuation) -> dict:
    probs = c.concept_probability
    return {"tokens": [m.token_text(t) for t in c.tokens], "token_ids": list(c.tokens),
            "text": "".join(m.token_text(t) for t in c.tokens),
            "concept_probability": probs,
            "mean_concept_probability": sum(probs) / len(probs) if probs else float("nan")}


def steer_report(m: LoadedModel, settings: dict, prompt: str | None = None,
                 unsteered: Continuation | None = None, steered: Continuation | None = None,
                 evaluation: list[ScaleResult] | None = None,
                 eval_prompts: list[str] | None = None) -> dict:
    """`ggufjac steer`: the settings, and either one prompt's two continuations or the
    measured effect per scale over a prompt set (steer.ScaleResult rows)."""
    report: dict = {"model": file_summary(m), "settings": settings}
    if has_constant(m.cfg.family):
        report["constant"] = constant_statement("steer")
    if prompt is not None and unsteered is not None and steered is not None:
        report.update(prompt=prompt, unsteered=_continuation(m, unsteered),
                      steered=_continuation(m, steered))
    if evaluation is not None:
        report["n_prompts"] = len(eval_prompts or [])
        report["eval_prompts"] = eval_prompts
        report["evaluation"] = [dataclasses.asdict(r) for r in evaluation]
    return report


# --- Results written to an output directory: what `jacobian`, `svd`, `layers` and `compare`
# compute and write, for the command line or any other front end. Each refuses a memory
# budget and an output directory before any work and writes its files together (outputs.
# write_all), so a failed or interrupted run leaves no result file.


@dataclasses.dataclass
class JacobianRun:
    """`jacobian_to_dir`'s result: J (in memory, or read from the written file), its report
    (report.json), the seconds it took (the anchor's llama.cpp run included) and whether J
    fitted in memory (else it was written to disk as it was made)."""

    result: JacobianResult
    report: dict
    seconds: float
    in_memory: bool
    files: tuple[str, ...] = ("jacobian.safetensors", "report.json", "singular_values.png")


def jacobian_to_dir(m: LoadedModel, tokens: list[int], lin: Linearization, out_dir: Path,
                    overwrite: bool = False, max_memory: int | None = None,
                    anchor_settings: RunSettings | None = None, device: str = "cpu",
                    llama_cpp_figures: bool = False, progress: bool = False,
                    on_spill: Callable[[str], None] | None = None,
                    chat: ChatPrompt | None = None,
                    make_file: Callable[[Path], JacobianResult] | None = None,
                    extra_report: dict | None = None) -> JacobianRun:
    """The detached Jacobian of `tokens` and its report, written to `out_dir`:
    jacobian.safetensors (J [d, N, d], the inputs, the output; the token ids in its
    metadata), report.json and singular_values.png. A J larger than the memory budget is
    written to disk as it is made, a few output rows per reverse sweep (`on_spill` is told
    how). With `anchor_settings`, anchored to llama.cpp's run with them; with
    `llama_cpp_figures` (unanchored), llama.cpp's own prediction is in the report too;
    with `chat` (the chat prompt of `tokens`), its conversation and token segments.
    `make_file(path)`: J made elsewhere (a cluster, unanchored), written to that
    safetensors file; `extra_report`: entries added to report.json (how it was made)."""
    import time

    from safetensors.torch import save_file

    from .jacobian import directions_per_sweep
    from .outputs import json_to, prepare_output_dir, temporary_path, write_all
    from .plots import plot_spectrum
    from .units import format_size

    d = m.cfg.d_model
    # refuse before writing; a J larger than the budget is made a few rows at a time, on disk
    directions = directions_per_sweep(m.engine(lin, max_memory=max_memory), len(tokens),
                                      anchored=anchor_settings is not None)
    prepare_output_dir(out_dir, overwrite)
    scratch = temporary_path(out_dir, "jacobian-scratch.safetensors") \
        if directions < d or make_file is not None else None
    try:
        if scratch is not None and on_spill is not None and make_file is None:
            size = d * len(tokens) * d * m.weights.dtype.itemsize
            on_spill(f"J ({format_size(size)}) is larger than the memory budget: writing it to "
                     f"{out_dir}/jacobian.safetensors as it is made, in {-(-d // directions)} "
                     f"reverse sweeps of {directions} directions")
        t0 = time.perf_counter()
        anchored = None if anchor_settings is None else m.anchor(tokens, lin, anchor_settings)
        if make_file is not None:
            result = make_file(scratch)
        elif scratch is None:
            result = m.jacobian(tokens, lin, progress=progress, max_memory=max_memory,
                                anchor=anchored)
        else:
            result = m.jacobian_to_file(tokens, scratch, directions, lin, progress=progress,
                                        max_memory=max_memory, anchor=anchored)
        seconds = time.perf_counter() - t0
        report = jacobian_report(m, tokens, result, lin, anchor=anchored)
        report.update(prediction_figures(m, tokens, result.output, anchored,
                                         llama_cpp_figures and anchored is None))
        report["jacobian_seconds"] = seconds
        report["device"] = device
        report["jacobian_in_memory"] = scratch is None
        report.update(extra_report or {})
        if chat is not None:
            add_chat(report, chat)
        title = (f"{m.cfg.arch}: J of {len(tokens)} tokens ({report['dtype']}), predicted "
                 f"{report['predicted_token']!r}"
                 + (", anchored to llama.cpp" if anchored is not None else ""))
        if scratch is None:
            tensors = {"jacobian": result.jacobian.contiguous().cpu(),
                       "inputs": result.inputs.contiguous().cpu(),
                       "output": result.output.contiguous().cpu()}
            if result.constant is not None:  # y = Σ_i J_i x_i + c (a family with biases)
                tensors["constant"] = result.constant.contiguous().cpu()

            def write_jacobian(p: Path) -> None:
                save_file(tensors, str(p), metadata={"tokens": json.dumps(tokens)})
        else:
            def write_jacobian(p: Path) -> None:
                os.replace(scratch, p)
        write_all(out_dir, {
            "jacobian.safetensors": write_jacobian,
            "singular_values.png": lambda p: plot_spectrum(p, report["singular_values"], title),
            "report.json": lambda p: json_to(p, report)})
    finally:
        if scratch is not None and scratch.exists():
            scratch.unlink()
    return JacobianRun(result, report, seconds, scratch is None)


@dataclasses.dataclass
class SvdRun:
    """`svd_to_dir`'s result: the top-k triplets of J, with per_token those of every J_i,
    the report (report.json) and the seconds they took (the anchor's run included)."""

    result: TopSingularTriplets
    per_token: PerTokenTriplets | None
    report: dict
    seconds: float
    files: tuple[str, ...] = ("svd.safetensors", "report.json", "singular_values.png")


def svd_to_dir(m: LoadedModel, tokens: list[int], lin: Linearization, out_dir: Path, k: int,
               tolerance: float | None = None, max_iterations: int = 100,
               block: int | None = None, per_token: bool = False, overwrite: bool = False,
               max_memory: int | None = None, anchor_settings: RunSettings | None = None,
               device: str = "cpu", llama_cpp_figures: bool = False, progress: bool = False,
               on_iteration: Callable[[int, float, float], None] | None = None,
               on_spill: Callable[[str], None] | None = None,
               chat: ChatPrompt | None = None,
               make_triplets: Callable[[], TopSingularTriplets] | None = None,
               extra_report: dict | None = None) -> SvdRun:
    """The top `k` singular triplets of the detached Jacobian of `tokens` (matrix free,
    LoadedModel.svd), or with `per_token` those of J and of every J_i from the formed J
    (in a scratch file when it exceeds the memory budget; `on_spill` is told), written to
    `out_dir`: svd.safetensors, report.json, singular_values.png. `k` and the budget are
    refused before any work; anchoring, `llama_cpp_figures` and `chat` as in
    `jacobian_to_dir` (with `chat`, each vector's share of reading from each segment).
    `make_triplets()`: the matrix-free triplets computed elsewhere (a cluster, unanchored,
    without `per_token`); `extra_report`: entries added to report.json."""
    import time

    from safetensors.torch import save_file

    from .jacobian import directions_per_sweep
    from .outputs import json_to, prepare_output_dir, temporary_path, write_all
    from .plots import plot_spectrum
    from .svd import check_top_k

    check_top_k(k, m.cfg.d_model, len(tokens))
    anchoring = anchor_settings is not None
    engine = m.engine(lin, max_memory=max_memory)  # refuse a budget before writing anything
    directions = m.cfg.d_model
    if per_token:  # a J larger than the budget is made a few rows at a time, in a file
        directions = directions_per_sweep(engine, len(tokens), anchored=anchoring)
    else:
        m.plan_svd(engine, k, len(tokens), block, anchored=anchoring)
    prepare_output_dir(out_dir, overwrite)
    t0 = time.perf_counter()
    anchored = None if anchor_settings is None else m.anchor(tokens, lin, anchor_settings)
    per = None
    if per_token:
        scratch = temporary_path(out_dir, "jacobian-scratch.safetensors") \
            if directions < m.cfg.d_model else None
        if scratch is not None and on_spill is not None:
            on_spill(f"J is larger than the memory budget: making it in a scratch file, "
                     f"{directions} directions per reverse sweep")
        try:
            result, per, _ = m.per_token_svd(tokens, k, lin, progress=progress,
                                             max_memory=max_memory, anchor=anchored,
                                             scratch=scratch, directions=directions)
        finally:
            if scratch is not None and scratch.exists():
                scratch.unlink()
    elif make_triplets is not None:
        result = make_triplets()
    else:
        result = m.svd(tokens, k, lin, tolerance, max_iterations, block, progress=progress,
                       max_memory=max_memory, anchor=anchored, on_iteration=on_iteration)
    seconds = time.perf_counter() - t0
    report = svd_report(m, tokens, result, lin, anchored, per)
    report.update(prediction_figures(m, tokens, result.output, anchored,
                                     llama_cpp_figures and anchored is None))
    report["seconds"] = seconds
    report["device"] = device
    report.update(extra_report or {})
    if chat is not None:
        add_chat(report, chat)
    tensors = {"singular_values": result.singular_values, "left": result.left,
               "right": result.right, "inputs": result.inputs, "output": result.output}
    if result.constant is not None:  # y = J x + c (a family with biases)
        tensors["constant"] = result.constant
    if per is not None:
        tensors.update({"per_token_singular_values": per.singular_values,
                        "per_token_left": per.left, "per_token_right": per.right})
    tensors = {name: v.contiguous().cpu() for name, v in tensors.items()}
    dtype = str(m.weights.dtype).removeprefix("torch.")
    title = (f"{m.cfg.arch}: top {k} of J, {len(tokens)} tokens ({dtype}), predicted "
             f"{report['predicted_token']!r}"
             + (", anchored to llama.cpp" if anchored is not None else ""))
    write_all(out_dir, {
        "svd.safetensors": lambda p: save_file(tensors, str(p),
                                               metadata={"tokens": json.dumps(tokens)}),
        "singular_values.png": lambda p: plot_spectrum(p, report["singular_values"], title),
        "report.json": lambda p: json_to(p, report)})
    return SvdRun(result, per, report, seconds)


@dataclasses.dataclass
class LayersRun:
    """`layers_to_dir`'s result: the report (layers.json), its Markdown summary (README.md)
    and the seconds the maps took (the anchor's run included)."""

    report: dict
    markdown: str
    seconds: float
    files: tuple[str, ...] = ("layers.json", "layers.safetensors", "stable_rank.png",
                              "top_singular_value.png", "README.md")


def layers_to_dir(m: LoadedModel, tokens: list[int], layers: list[int], lin: Linearization,
                  out_dir: Path, overwrite: bool = False, max_memory: int | None = None,
                  anchor_settings: RunSettings | None = None, device: str = "cpu",
                  save_matrices: bool = False, llama_cpp_figures: bool = False,
                  progress: bool = False, chat: ChatPrompt | None = None,
                  sweep: str = "auto") -> LayersRun:
    """Every map of `layers` (layers.KINDS: cumulative, layer, layer without residual,
    attention, MLP) with its SVD and decoded vectors, written to `out_dir`: layers.json,
    layers.safetensors (every spectrum; with `save_matrices` every map), two plots and
    README.md. The budget is refused before any work; anchoring, `llama_cpp_figures` and
    `chat` as in `jacobian_to_dir`; `sweep`: how the cumulative maps are made
    (layers.SWEEPS; the one used and both counted costs are in the report)."""
    import time

    from safetensors.torch import save_file

    from .analysis import top_tokens_by_unembedding
    from .costs import lens_forward_flop, lens_reverse_flop
    from .layers import describe_maps, layer_maps, layers_tensors
    from .layout import dims_of
    from .outputs import json_to, prepare_output_dir, write_all
    from .plots import plot_stable_rank_heatmap, plot_top_singular_value

    m.engine(lin, max_memory=max_memory).plan(m.cfg.d_model * len(layers), len(tokens),
                                              anchored=anchor_settings is not None)
    prepare_output_dir(out_dir, overwrite)
    t0 = time.perf_counter()
    anchored = None if anchor_settings is None else m.anchor(tokens, lin, anchor_settings)
    engine = m.engine(lin, progress=progress, max_memory=max_memory, anchor=anchored)
    used: list[str] = []
    maps, y = layer_maps(engine, engine.embed(tokens), layers, sweep=sweep, chosen_sweep=used)
    entries = describe_maps(maps, m.weights, m.token_text)
    seconds = time.perf_counter() - t0
    predicted = top_tokens_by_unembedding(m.weights, m.logit_input(y, anchored)[:, None],
                                          1)[0][0][0]
    report = layers_report(m, tokens, layers, lin, device, seconds, predicted, entries,
                           anchored, y, affine=any(mp.constant is not None for mp in maps))
    dims = dims_of(m.cfg)
    report["sweep"] = used[0]  # the cumulative maps': one reverse sweep or one forward pass
    report["sweep_flop"] = {"reverse": lens_reverse_flop(dims, len(tokens), layers),
                            "forward": lens_forward_flop(dims, len(tokens), layers,
                                                         causal=anchored is None)}
    report.update(prediction_figures(m, tokens, y, anchored,
                                     llama_cpp_figures and anchored is None))
    if chat is not None:
        add_chat(report, chat)
    tensors = layers_tensors(maps, entries, save_matrices)
    title = (f"{m.cfg.arch}: {len(tokens)} tokens, gate path {lin.gate_path}"
             + (", anchored to llama.cpp" if anchored is not None else ""))
    markdown = layers_markdown(report)
    write_all(out_dir, {
        "layers.json": lambda p: json_to(p, report),
        "layers.safetensors": lambda p: save_file(tensors, str(p)),
        "stable_rank.png": lambda p: plot_stable_rank_heatmap(p, entries, KINDS, title),
        "top_singular_value.png": lambda p: plot_top_singular_value(p, entries, KINDS, title),
        "README.md": lambda p: p.write_text(markdown)})
    return LayersRun(report, markdown, seconds)


def comparison_to_dir(out_dir: Path, report: dict, entries: list[dict],
                      overwrite: bool = False) -> list[str]:
    """`compare`'s files in `out_dir`: comparison.json, README.md (comparison_markdown),
    lens.png with the lens analysis, distributions.png over several prompts. The directory
    is made only now, so a comparison that failed leaves nothing. Returns the file names."""
    from .outputs import json_to, prepare_output_dir, write_all
    from .plots import plot_comparison_distributions, plot_lens_differences

    text = comparison_markdown(report)
    title = f"{Path(report['a']['path']).name} vs {Path(report['b']['path']).name}"
    writers = {"comparison.json": lambda p: json_to(p, report),
               "README.md": lambda p: p.write_text(text)}
    if "lens" in report["settings"]["analyses"]:
        writers["lens.png"] = lambda p: plot_lens_differences(p, entries, title)
    if len(entries) > 1:
        writers["distributions.png"] = lambda p: plot_comparison_distributions(
            p, entries, ("jacobian_rel_difference", "largest_left_angle",
                         "attribution_spearman", "logits_nmse"), title)
    prepare_output_dir(out_dir, overwrite)
    write_all(out_dir, writers)
    return list(writers)
