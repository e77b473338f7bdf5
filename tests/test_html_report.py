"""The HTML report in a real browser: Debian's Chromium driven by Playwright (no browser
download). Results come from the CLI on a small synthetic model; each view's screenshot is
written to tests-artifacts/."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggufjac.cli import main

PROMPT = "the bridge is"
ARTIFACTS = Path(__file__).resolve().parent.parent / "tests-artifacts"


def _browser_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:  # a failure, not a skip: CI must run these tests (.ci/run installs it)
        pytest.fail("no Chromium on PATH (chromium or chromium-browser): install Debian's "
                    "chromium package (apt-get install chromium) to run the HTML report tests")
    return found


@pytest.fixture(scope="module")
def browser():
    path = _browser_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A page opened from a file:// URL, with everything it logged and requested."""

    def __init__(self, browser, html: Path) -> None:
        self.url = html.resolve().as_uri()
        self.page = browser.new_page(viewport={"width": 1100, "height": 900})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                     else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(self.url)
        self.page.wait_for_load_state("load")

    def check_clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.requests == [self.url], self.requests  # the file itself, nothing else

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"report-{name}.png"), full_page=True)


def _run(args: list[str]) -> None:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def results(synthetic, tmp_path_factory) -> dict[str, Path]:
    """Each command's result, its page written by --html (`report` is tested on its own)."""
    model = str(synthetic("llama", "Q4_K_M"))
    root = tmp_path_factory.mktemp("html")
    _run(["attribute", model, "-p", PROMPT, "--json", str(root / "a.json"), "--html"])
    _run(["jacobian", model, "-p", PROMPT, "--out", str(root / "j"), "--dtype", "float64",
          "--html"])
    _run(["svd", model, "-p", PROMPT, "--top-k", "3", "--out", str(root / "v"), "--html"])
    _run(["layers", model, "-p", PROMPT, "--out", str(root / "l"), "--html"])
    return {"attribute": root / "report.html", "jacobian": root / "j" / "report.html",
            "svd": root / "v" / "report.html", "layers": root / "l" / "report.html",
            "a.json": root / "a.json", "l": root / "l", "j": root / "j", "v": root / "v",
            "model": Path(model)}


@pytest.mark.parametrize("kind", ["attribute", "jacobian", "svd", "layers"])
def test_page_loads_offline_without_errors(browser, results, kind):
    html = results[kind]
    text = html.read_text()
    assert "<script src" not in text and "<link" not in text  # nothing fetched at view time
    p = Page(browser, html)
    assert p.page.locator("h1").inner_text().startswith(f"ggufjac {kind}")
    assert p.page.locator(".tok").count() > 0
    if kind in ("jacobian", "svd"):
        assert p.page.locator("svg.chart").count() >= 1  # the spectrum, inline
    p.check_clean()
    p.screenshot(kind)


def test_attribution_tokens_sum_to_the_logit(browser, results):
    report = json.loads(results["a.json"].read_text())
    target = report["targets"][0]
    p = Page(browser, results["attribute"])
    section = p.page.locator("section.target").first
    toks = section.locator(".tok")
    values = [float(v) for v in toks.evaluate_all("els => els.map(e => e.dataset.contribution)")]
    texts = [json.loads(t) for t in toks.evaluate_all("els => els.map(e => e.dataset.text)")]
    assert texts == report["tokens"]
    assert values == pytest.approx(target["contributions"], rel=0, abs=0)  # exact, repr'd
    shown_logit = float(section.locator(".logit").get_attribute("data-value"))
    shown_sum = float(section.locator(".sum").get_attribute("data-value"))
    assert shown_logit == target["logit"]
    # the page's numbers themselves: the tokens' values add up to the logit it shows
    assert math.isclose(math.fsum(values), shown_logit, rel_tol=1e-6)
    assert math.isclose(shown_sum, shown_logit, rel_tol=1e-6)
    assert f"{target['logit']:.6f}" in section.locator(".logit").inner_text()
    # signed values get the two ends of the diverging map: not all tokens look alike
    colours = set(toks.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)"))
    assert len(colours) > 1
    p.check_clean()


def test_hover_shows_the_value(browser, results):
    report = json.loads(results["a.json"].read_text())
    p = Page(browser, results["attribute"])
    tip = p.page.locator("#tooltip")
    assert not tip.is_visible()
    i = max(range(len(report["tokens"])),
            key=lambda k: abs(report["targets"][0]["contributions"][k]))
    p.page.locator("section.target").first.locator(".tok").nth(i).hover()
    assert tip.is_visible()
    assert f"{report['targets'][0]['contributions'][i]:.6f}" in tip.inner_text()
    assert f"position {i}" in tip.inner_text()
    p.page.mouse.move(1, 1)
    assert not tip.is_visible()


def test_clicking_a_layer_shows_its_decoded_tokens(browser, results):
    report = json.loads((results["l"] / "layers.json").read_text())
    p = Page(browser, results["layers"])
    layers = sorted({e["layer"] for e in report["maps"]})
    assert p.page.locator(".layer-row").count() == len(layers)
    assert p.page.locator(".panel:visible").count() == 0
    for layer in (layers[-1], layers[0]):
        p.page.locator(f".layer-row[data-layer='{layer}']").click()
        panel = p.page.locator(f"#layer-panel-{layer}")
        assert panel.is_visible()
        assert p.page.locator(".panel:visible").count() == 1  # the other layers' are hidden
        for e in (e for e in report["maps"] if e["layer"] == layer):
            for v in e["vectors"]:
                cell = panel.locator(f"tr.map-vector[data-kind='{e['kind']}']"
                                     f"[data-index='{v['index']}'] td.left-tokens .dtok")
                shown = [json.loads(t) for t in
                         cell.evaluate_all("els => els.map(e => e.dataset.text)")]
                assert shown == v["left_tokens"], (layer, e["kind"], v["index"])
        # the heat map's cells carry the stable ranks of layers.json
        ranks = {e["kind"]: e["stable_rank"] for e in report["maps"] if e["layer"] == layer}
        for kind, rank in ranks.items():
            cell = p.page.locator(f".layer-row[data-layer='{layer}'] td[data-kind='{kind}']")
            assert float(cell.get_attribute("data-stable-rank")) == rank
    p.check_clean()


def _top_right_vector_position_norms(jacobian_file: Path) -> list[float]:
    """‖v_1[i]‖ per input position i, v_1 the top right singular vector of the saved J
    (d x N x d), by a dense float64 SVD of J as a d x Nd matrix."""
    import torch
    from safetensors.torch import load_file

    j = load_file(jacobian_file)["jacobian"].to(torch.float64)
    d, n, d_in = j.shape
    _, s, vh = torch.linalg.svd(j.reshape(d, n * d_in), full_matrices=False)
    assert s[0] > s[1] * (1 + 1e-6)  # σ_1 is simple: v_1 is defined up to its sign
    return torch.linalg.vector_norm(vh[0].reshape(n, d_in), dim=1).tolist()


def test_jacobian_tokens_coloured_by_the_top_right_vector(browser, results):
    p = Page(browser, results["jacobian"])
    weights = [float(w) for w in
               p.page.locator(".tok").evaluate_all("els => els.map(e => e.dataset.weight)")]
    assert all(w >= 0 for w in weights)
    assert math.isclose(math.fsum(w * w for w in weights), 1.0, rel_tol=1e-9)  # ‖v_1‖ = 1
    expected = _top_right_vector_position_norms(results["j"] / "jacobian.safetensors")
    assert weights == pytest.approx(expected, abs=1e-8)


def _unembedding_row(model: Path, token_id: int) -> "torch.Tensor":
    """Row `token_id` of the file's output.weight, read and dequantized by gguf-py, float64."""
    import gguf
    import numpy as np
    import torch

    tensor = next(t for t in gguf.GGUFReader(model).tensors if t.name == "output.weight")
    rows = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # [vocab, d]
    return torch.from_numpy(np.asarray(rows[token_id], dtype=np.float64))


def test_report_command_rewrites_the_page(browser, results, tmp_path):
    """`report a.json` writes a page whose tokens and contributions are the JSON's, and
    those are (u_tᵀ J_i) · x_i recomputed here in float64 from the `jacobian` command's
    tensors (same prompt and model) and the unembedding row gguf-py reads from the file."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "a.html"
    r = CliRunner().invoke(main, ["report", str(results["a.json"]), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_text() == results["attribute"].read_text()  # the page --html wrote
    report = json.loads(results["a.json"].read_text())
    assert report["token_ids"] == json.loads((results["j"] / "report.json").read_text())[
        "token_ids"]
    saved = load_file(results["j"] / "jacobian.safetensors")
    jac, x, y = (saved[k].to(torch.float64) for k in ("jacobian", "inputs", "output"))
    p = Page(browser, out)
    sections = p.page.locator("section.target")
    assert sections.count() == len(report["targets"]) >= 1
    for k, target in enumerate(report["targets"]):
        section = sections.nth(k)
        toks = section.locator(".tok")
        texts = [json.loads(t) for t in toks.evaluate_all("els => els.map(e => e.dataset.text)")]
        values = [float(v) for v in
                  toks.evaluate_all("els => els.map(e => e.dataset.contribution)")]
        assert texts == report["tokens"]
        assert values == target["contributions"]  # exact: the page repeats the JSON's figures
        u = _unembedding_row(results["model"], target["id"])
        expected = torch.einsum("d,dne,ne->n", u, jac, x)
        # the attribution ran in float32: a few units of its rounding (eps 1.2e-7) of the
        # largest term (measured: 3e-7 of it)
        bound = 1e-5 * float(expected.abs().max())
        assert torch.allclose(torch.tensor(values, dtype=torch.float64), expected, rtol=0,
                              atol=bound), (values, expected.tolist())
        shown_logit = float(section.locator(".logit").get_attribute("data-value"))
        assert math.isclose(shown_logit, float(u @ y), rel_tol=1e-4, abs_tol=bound)
    p.check_clean()


def test_bad_inputs_exit_2_and_leave_no_page(tmp_path):
    cases = []
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((empty, "not a ggufjac result directory"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "layers.json").write_text("{\"tokens\": [")
    cases.append((bad, "not valid JSON"))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"tokens": ["a"], "targets": [{"token": "a"}]}))
    cases.append((wrong, "not a well-formed ggufjac attribute report"))
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    cases.append((other, "not a ggufjac report"))
    import sqlite3

    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE t (x)")
    con.close()
    cases.append((foreign, "not a ggufjac results store"))
    for path, message in cases:
        r = CliRunner().invoke(main, ["report", str(path)])
        assert r.exit_code == 2, (path, r.output)
        assert r.output.count("\n") == 1 and "Traceback" not in r.output
        assert message in r.output and str(path.name) in r.output
        folder = path if path.is_dir() else path.parent
        assert not any(f.name.endswith(("report.html", ".partial")) or f.suffix == ".html"
                       for f in folder.iterdir()), list(folder.iterdir())


def test_attribute_html_needs_json():
    r = CliRunner().invoke(main, ["attribute", "model.gguf", "-p", PROMPT, "--html"])
    assert r.exit_code == 2
    assert "--html needs --json" in r.output


def test_print_view_is_light_and_shows_every_layer(browser, results):
    p = Page(browser, results["layers"])
    p.page.emulate_media(media="print")
    assert p.page.evaluate("getComputedStyle(document.body).backgroundColor") in (
        "rgb(255, 255, 255)", "rgba(0, 0, 0, 0)")
    panels = p.page.locator(".panel")
    assert panels.count() > 0 and all(panels.nth(i).is_visible()
                                      for i in range(panels.count()))
    assert not p.page.locator("#tooltip").is_visible()


def test_notebook_view_and_missing_jinja2(browser, results, monkeypatch):
    import sys

    from ggufjac.errors import GgufjacError
    from ggufjac.html import HTMLReport, render

    report = json.loads(results["a.json"].read_text())
    page = HTMLReport(report, "attribute")._repr_html_()
    assert page.count("data-contribution=") == len(report["tokens"]) * len(report["targets"])
    # what a notebook shows: the JSON's tokens and contributions, read back from the DOM
    view = browser.new_page()
    errors: list[str] = []
    view.on("pageerror", lambda e: errors.append(str(e)))
    view.set_content(page)
    sections = view.locator("section.target")
    assert sections.count() == len(report["targets"])
    for k, target in enumerate(report["targets"]):
        toks = sections.nth(k).locator(".tok")
        assert [json.loads(t) for t in toks.evaluate_all(
            "els => els.map(e => e.dataset.text)")] == report["tokens"]
        assert [float(v) for v in toks.evaluate_all(
            "els => els.map(e => e.dataset.contribution)")] == target["contributions"]
    assert errors == []
    view.close()
    monkeypatch.setitem(sys.modules, "jinja2", None)  # as if it were not installed
    with pytest.raises(GgufjacError, match=r"pip install 'ggufjac\[html\]'"):
        render(report, "attribute")
    r = CliRunner().invoke(main, ["report", str(results["a.json"]), "--out",
                                  str(results["a.json"].with_name("x.html"))])
    assert r.exit_code == 2 and "ggufjac[html]" in r.output
    assert not results["a.json"].with_name("x.html").exists()


@pytest.mark.parametrize("kind", ["attribute", "jacobian", "svd", "layers"])
def test_top_five_and_llama_cpp_run_on_the_page(browser, results, kind):
    """The top-5 next tokens against the in-memory reference model's logits, and llama.cpp's
    top-5 and logits nmse against a llama.cpp run of our own on the same tokens."""
    import numpy as np
    import torch

    from ggufjac import llamacpp
    from ggufjac.api import open_model
    from ggufjac.linearize import PLAIN
    from ggufjac.metrics import nmse

    json_path = {"attribute": results["a.json"], "jacobian": results["j"] / "report.json",
                 "svd": results["v"] / "report.json", "layers": results["l"] / "layers.json"}[kind]
    report = json.loads(json_path.read_text())
    m = open_model(results["model"], dtype=report["dtype"])
    tokens = report["token_ids"]
    with torch.no_grad():
        z = m.model.logits(m.model.forward(m.model.embed(tokens), PLAIN)[-1]).double()
    top = torch.topk(z, 5)
    assert [e["id"] for e in report["top_logits"]] == top.indices.tolist()
    assert [e["logit"] for e in report["top_logits"]] == pytest.approx(top.values.tolist(),
                                                                        rel=1e-4, abs=1e-4)
    theirs = llamacpp.evaluate(m.path, tokens, last_only=True).logits[-1].astype(np.float64)
    ll = report["llama_cpp"]
    assert [e["id"] for e in ll["top_logits"]] == np.argsort(-theirs)[:5].tolist()
    assert ll["logits_nmse"] == pytest.approx(nmse(z.numpy(), theirs), rel=0.05)
    assert ll["top1_agree"] == (int(z.argmax()) == int(theirs.argmax()))
    p = Page(browser, results[kind])
    rows = p.page.locator("#top-logits tbody tr")
    assert rows.count() == 5
    shown = [json.loads(t) for t in p.page.locator("#top-logits tbody tr td:nth-child(2) .dtok")
             .evaluate_all("els => els.map(e => e.dataset.text)")]
    assert shown == [e["token"] for e in report["top_logits"]]
    assert f"{ll['logits_nmse']:.2e}" in p.page.locator("#llama-fidelity").inner_text()
    p.check_clean()


def test_layers_page_colours_tokens_per_position(browser, results):
    """Each map's top right vector's norm per input position: a unit vector's blocks (their
    squares sum to 1), largest at the position layers.json names; for the last layer's
    cumulative map (= the full J), equal to those of J's top right singular vector, from a
    dense SVD of the jacobian command's J here. Clicking a layer shows the rows."""
    report = json.loads((results["l"] / "layers.json").read_text())
    for e in report["maps"]:
        for v in e["vectors"]:
            norms = v["right_position_norms"]
            assert len(norms) == len(report["tokens"])
            assert math.isclose(math.fsum(x * x for x in norms), 1.0, rel_tol=1e-4)
            assert norms.index(max(norms)) == v["right_position"]
    last = max((e for e in report["maps"] if e["kind"] == "cumulative"), key=lambda e: e["layer"])
    from_j = _top_right_vector_position_norms(results["j"] / "jacobian.safetensors")
    assert last["vectors"][0]["right_position_norms"] == pytest.approx(from_j, abs=2e-3)
    p = Page(browser, results["layers"])
    main_row = [float(w) for w in p.page.locator(".tokens").first.locator(".tok")
                .evaluate_all("els => els.map(e => e.dataset.weight)")]
    assert main_row == pytest.approx(last["vectors"][0]["right_position_norms"], abs=1e-12)
    layer = report["maps"][0]["layer"]
    p.page.locator(f".layer-row[data-layer='{layer}']").click()
    panel = p.page.locator(f"#layer-panel-{layer}")
    for e in (e for e in report["maps"] if e["layer"] == layer):
        row = panel.locator(f"table.heat-rows tr[data-kind='{e['kind']}'] .tok")
        assert row.first.is_visible()
        weights = [float(w) for w in row.evaluate_all("els => els.map(e => e.dataset.weight)")]
        assert weights == pytest.approx(e["vectors"][0]["right_position_norms"], abs=1e-12)
    p.check_clean()
    p.screenshot("layers-panel")


@pytest.fixture(scope="module")
def store(synthetic, tmp_path_factory) -> tuple[Path, Path]:
    """A batch store of five prompts (one too long: failed), concepts chosen among the
    words its top singular vectors decode to, and its page."""
    import sqlite3

    from ggufjac.store import ResultStore

    model = str(synthetic("llama", "Q4_K_M"))
    root = tmp_path_factory.mktemp("batch-html")
    prompts = root / "p.jsonl"
    texts = ["the bridge", "the fox", "a dog", "the lazy dog", "dog " * 60]
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": t}) + "\n"
                               for i, t in enumerate(texts)))
    db = root / "r.db"
    r = CliRunner().invoke(main, ["batch", model, str(prompts), "--out", str(db),
                                  "--analyses", "attribute,svd,lens", "--max-tokens", "24"])
    assert r.exit_code == 1, r.output  # the long prompt failed
    with sqlite3.connect(db) as con:
        words = [w for (w,) in con.execute(
            "SELECT word FROM decoded WHERE source = 'svd' AND vector = 0 AND rank = 0 "
            "AND id IN ('q0', 'q1') AND length(word) > 0")]
    with ResultStore(db) as s:
        s.set_concepts(words)
    _run(["report", str(db)])
    return db, db.with_suffix(".html")


def shown(p: Page, prompt_id: str) -> None:
    """Wait (at most 5 s, else fail) until the view of `prompt_id` is the page's visible one."""
    p.page.locator(f".prompt-view[data-id='{prompt_id}']").wait_for(state="visible",
                                                                     timeout=5000)


def test_batch_page_sorts_filters_and_links_each_prompt(browser, store):
    import sqlite3

    db, html = store
    con = sqlite3.connect(db)
    p = Page(browser, html)
    rows = p.page.locator("#prompts tbody tr")
    n = con.execute("SELECT count(*) FROM prompts").fetchone()[0]
    assert rows.count() == n == 5

    def shown_ids() -> list[str]:
        return [t.strip() for t in p.page.locator("#prompts tbody tr:visible td[data-key='id']")
                .all_inner_texts()]
    p.page.locator("#prompts th[data-key='n_tokens']").click()
    assert shown_ids() == [i for (i,) in con.execute(
        "SELECT id FROM prompts ORDER BY n_tokens, rowid")]
    p.page.locator("#prompts th[data-key='n_tokens']").click()  # again: descending
    assert shown_ids() == [i for (i,) in con.execute(
        "SELECT id FROM prompts ORDER BY n_tokens DESC, rowid")]
    p.page.locator("#prompts th[data-key='logit']").click()
    done = [i for (i,) in con.execute(
        "SELECT id FROM prompts WHERE status = 'done' ORDER BY logit")]
    assert shown_ids()[:len(done)] == done  # the failed prompt (no logit) last

    concepts = [c for (c,) in con.execute("SELECT DISTINCT concept FROM concept_hits")]
    assert concepts
    for c in concepts:
        p.page.locator("#concept-filter").select_option(c)
        flagged = {i for (i,) in con.execute(
            "SELECT DISTINCT id FROM concept_hits WHERE concept = ?", (c,))}
        assert set(shown_ids()) == flagged, c
    p.page.locator("#concept-filter").select_option("")
    assert len(shown_ids()) == n

    pid, total, logit = con.execute("SELECT id, attribution_sum, attribution_logit FROM "
                                    "prompts WHERE status = 'done' LIMIT 1").fetchone()
    assert p.page.locator(".prompt-view:visible").count() == 0
    p.page.locator(f"#prompts td[data-key='id'] a:text-is('{pid}')").click()
    # the view follows the URL's fragment: a hashchange event, dispatched after the click
    shown(p, pid)
    view = p.page.locator(".prompt-view:visible")
    assert view.count() == 1 and view.get_attribute("data-id") == pid
    values = [float(v) for v in view.locator(".tok").evaluate_all(
        "els => els.map(e => e.dataset.contribution)")]
    stored = [a for (a,) in con.execute(
        "SELECT attribution FROM tokens WHERE id = ? ORDER BY position", (pid,))]
    assert values == stored
    assert math.isclose(math.fsum(values), logit, rel_tol=1e-5)
    assert float(view.locator(".sum").get_attribute("data-value")) == total
    top = [t for (t,) in con.execute("SELECT token FROM top_logits WHERE id = ? ORDER BY rank",
                                     (pid,))]
    assert [json.loads(t) for t in view.locator(".top-logits .dtok").evaluate_all(
        "els => els.map(e => e.dataset.text)")] == top
    failed = con.execute("SELECT id, error FROM prompts WHERE status = 'failed'").fetchone()
    p.page.locator(f"#prompts td[data-key='id'] a:text-is('{failed[0]}')").click()
    shown(p, failed[0])
    assert failed[1] in p.page.locator(".prompt-view:visible").inner_text()
    p.check_clean()
    p.screenshot("batch")


def test_compare_page_shows_the_summary_and_each_prompt(browser, synthetic, tmp_path):
    """`compare --html` of two quantizations: the summary's medians, the lens rows and each
    prompt's top-5 and figures on the page are comparison.json's."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("the bridge\nthe quick fox\n")
    out = tmp_path / "cmp"
    _run(["compare", str(synthetic("llama", "Q8_0")), str(synthetic("llama", "Q4_K_M")),
          "--prompts", str(prompts), "--out", str(out), "--html"])
    report = json.loads((out / "comparison.json").read_text())
    p = Page(browser, out / "report.html")
    assert int(p.page.locator("#same-prediction").inner_text()) == \
        report["summary"]["same_prediction"]
    for key, d in report["summary"].items():
        if isinstance(d, dict) and d.get("n"):
            cell = p.page.locator(f"#summary tr[data-figure='{key}'] td").first
            assert float(cell.get_attribute("data-value")) == d["median"], key
    assert p.page.locator("#lens tbody tr").count() == len(report["summary"]["lens"])
    sections = p.page.locator("section.compared")
    assert sections.count() == len(report["prompts"])
    for i, e in enumerate(report["prompts"]):
        sec = sections.nth(i)
        texts = [json.loads(t) for t in sec.locator(".tok").evaluate_all(
            "els => els.map(e => e.dataset.text)")]
        assert texts == e["tokens"]
        shown = [json.loads(t) for t in sec.locator(".top5 td:nth-child(2) .dtok").evaluate_all(
            "els => els.map(e => e.dataset.text)")]
        assert shown == [x["token"] for x in e["top5_a"]]
        v = float(sec.locator("tr[data-figure='jacobian_rel_difference'] td")
                  .get_attribute("data-value"))
        assert v == e["jacobian_rel_difference"] and v > 0  # two quantizations differ
    p.check_clean()
    p.screenshot("compare")
    r = CliRunner().invoke(main, ["compare", "a.gguf", "b.gguf", "-p", "x", "--html"])
    assert r.exit_code == 2 and "--html needs --out" in r.output


# Vocabulary entries that would run script or break the page if a token's text reached it
# unescaped: a script element's end, an element with a handler, quotes that end an
# attribute, template syntax, and the line separators that end a JavaScript string.
HOSTILE = ["</script><script>window.pwned=1</script>",
           "<img src=x onerror=window.pwned=2>",
           "\"'><svg onload=window.pwned=3>",
           "{{7*7}}{% if 1 %}x{% endif %}",
           "a\u2028b\u2029c"]
# How the page writes each as text: unprintable characters as escapes, the rest as is.
HOSTILE_SHOWN = {s: s.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
                 for s in HOSTILE}


@pytest.fixture(scope="module")
def hostile_model(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """A small llama GGUF whose vocabulary holds HOSTILE (their ids returned), each with all
    its prefixes, so that the SentencePiece tokenizer merges each, met in a prompt, into
    one token ("▁" stands for a space in a piece)."""
    import tools.synthetic as synthetic

    base_vocab = synthetic._vocab

    def hostile_vocab(size: int | None = None) -> tuple[list[str], list[float], list[int]]:
        tokens, scores, types = base_vocab()
        for s in HOSTILE:
            piece = s.replace(" ", "\u2581")
            for end in range(2, len(piece) + 1):
                if piece[:end] not in tokens:
                    tokens.append(piece[:end])
                    scores.append(0.0)
                    types.append(1)  # a normal token
        return tokens, scores, types

    path = tmp_path_factory.mktemp("hostile") / "hostile.gguf"
    mp = pytest.MonkeyPatch()
    mp.setattr(synthetic, "_vocab", hostile_vocab)
    try:
        synthetic.write_synthetic_gguf(path, "llama", synthetic.Shape(n_layer=1), "F32")
        tokens = hostile_vocab()[0]
    finally:
        mp.undo()
    return path, {s: tokens.index(s.replace(" ", "\u2581")) for s in HOSTILE}


def _check_nothing_ran(p: Page) -> None:
    """No script from the vocabulary ran, no element came from it, nothing was fetched."""
    p.check_clean()  # no page error, no console error, no request but the file itself
    assert p.page.evaluate("typeof window.pwned") == "undefined"
    assert p.page.evaluate("document.querySelectorAll('img').length") == 0
    handlers = p.page.evaluate("[...document.querySelectorAll('*')].flatMap(e => "
                               "[...e.attributes].map(a => a.name))"
                               ".filter(n => n.startsWith('on'))")
    assert handlers == []
    scripts = p.page.evaluate("[...document.scripts].map(s => s.textContent)")
    assert len(scripts) == 1 and "pwned" not in scripts[0]  # the page's own script alone


def test_hostile_vocabulary_is_shown_as_text(browser, hostile_model, tmp_path):
    """Tokens whose text is markup, quotes, template syntax or line separators appear on the
    attribute and jacobian pages (prompt tokens, targets, tooltips) as exactly that text,
    and none of it runs in the browser."""
    model, ids = hostile_model
    prompt = "the " + " ".join(HOSTILE) + " dog"
    _run(["attribute", str(model), "-p", prompt, "--json", str(tmp_path / "a.json"),
          "--html", *[a for s in HOSTILE for a in ("--token-id", str(ids[s]))]])
    _run(["jacobian", str(model), "-p", prompt, "--out", str(tmp_path / "j"), "--html"])
    report = json.loads((tmp_path / "a.json").read_text())
    for s in HOSTILE:  # each one token of the prompt (else the test would show nothing)
        assert ids[s] in report["token_ids"] and s in report["tokens"], s
    assert [t["id"] for t in report["targets"]] == [ids[s] for s in HOSTILE]

    for html in (tmp_path / "report.html", tmp_path / "j" / "report.html"):
        p = Page(browser, html)
        row = p.page.locator(".tokens").first.locator(".tok")
        texts = [json.loads(t) for t in row.evaluate_all("els => els.map(e => e.dataset.text)")]
        assert texts == report["tokens"], html
        shown = row.evaluate_all("els => els.map(e => e.textContent)")
        for s in HOSTILE:
            i = report["tokens"].index(s)
            assert shown[i] == HOSTILE_SHOWN[s], (html, s, shown[i])
            row.nth(i).hover()  # the tooltip writes the token as JSON
            tip = p.page.evaluate("document.getElementById('tooltip').textContent")
            assert f"position {i}  {json.dumps(s, ensure_ascii=False)}" in tip, (s, tip)
        _check_nothing_ran(p)
        p.page.close()

    p = Page(browser, tmp_path / "report.html")
    heads = p.page.locator("section.target h3").evaluate_all(
        "els => els.map(e => e.textContent)")
    assert heads == [f"Target {HOSTILE_SHOWN[s]} (id {ids[s]})" for s in HOSTILE]
    _check_nothing_ran(p)
