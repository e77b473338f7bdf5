"""`ggufjac batch`: the results store against the single-prompt paths, kill -9 and resume,
failures stored, bad input refused, and a real local Ray cluster."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ggufjac.cli import main
from ggufjac.errors import PromptError
from ggufjac.prompt_sets import read_prompt_set
from ggufjac.runner import unembed

PROMPTS = ["The capital of France is", "The bridge out of Marin is the",
           "one two three four", "Water boils at", "In the beginning", "Cats and dogs are",
           "The sun rises in the", "Once upon a time"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(db: Path, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute(sql, args).fetchall()


def _same(a: list[tuple], b: list[tuple], rel: float = 1e-9) -> bool:
    """Row by row: strings and integers equal, floats to `rel`."""
    if len(a) != len(b):
        return False
    for ra, rb in zip(a, b):
        for va, vb in zip(ra, rb):
            if isinstance(va, float) or isinstance(vb, float):
                if va is None or vb is None or abs(va - vb) > rel * max(abs(va), abs(vb), 1e-30):
                    return False
            elif va != vb:
                return False
    return True


def _batch(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["batch", *args])
    return r.exit_code, r.output


# -- the store against the single-prompt paths ------------------------------------------------

def test_store_matches_single_prompt_paths(gemma32, tmp_path) -> None:
    """Attribution per position equals `attribute`'s and sums to the attributed logit;
    the prediction is the top token of `jacobian`'s y; the singular values are J's."""
    m = gemma32
    prompts = _jsonl(tmp_path / "p.jsonl", [
        {"id": "fr", "prompt": "The capital of France is", "target": " Paris"},
        {"prompt": "The bridge out of Marin is the"}])
    db = tmp_path / "r.db"
    code, out = _batch("gemma3-270m", str(prompts), "--out", str(db), "--top-k", "4")
    assert code == 0, out
    stored = {r[0]: r for r in _rows(db, "SELECT id, predicted_token_id, attribution_token_id, "
                                         "attribution_logit, attribution_sum FROM prompts")}
    assert set(stored) == {"fr", "2"}
    for ident, text, target in (("fr", PROMPTS[0], " Paris"), ("2", PROMPTS[1], None)):
        tokens = m.tokenize(text)
        j = m.jacobian(tokens)
        logits = unembed(m.weights, j.output[None])[0]
        predicted = int(torch.argmax(logits))
        _, pred_id, att_id, att_logit, att_sum = stored[ident]
        assert pred_id == predicted
        want = m.token_for_text(target) if target else predicted
        assert att_id == want
        ref = m.attribute(tokens, [want])["targets"][0]
        got = [r[0] for r in _rows(db, "SELECT attribution FROM tokens WHERE id = ? "
                                       "ORDER BY position", ident)]
        assert got == pytest.approx(ref["contributions"], rel=1e-5, abs=1e-5)
        assert att_sum == pytest.approx(att_logit, rel=1e-5)
        assert att_logit == pytest.approx(float(logits[want]), rel=1e-5)
        sv = torch.linalg.svdvals(j.jacobian.reshape(m.cfg.d_model, -1).double())[:4]
        got_sv = [r[0] for r in _rows(db, "SELECT value FROM singular_values WHERE id = ? "
                                          "ORDER BY k", ident)]
        assert got_sv == pytest.approx(sv.tolist(), rel=1e-4)
        (n_tok,) = _rows(db, "SELECT n_tokens FROM summary WHERE id = ?", ident)[0]
        assert n_tok == len(tokens)


# -- kill -9, resume, failures ---------------------------------------------------------------

def _command(model: Path, prompts: Path, db: Path) -> list[str]:
    return [sys.executable, "-m", "ggufjac.cli", "batch", str(model), str(prompts),
            "--out", str(db), "--analyses", "attribute,svd", "--max-tokens", "12"]


def test_kill_minus_9_then_resume_stores_every_prompt_once(synthetic, tmp_path) -> None:
    model = synthetic("llama", "Q8_0")
    rows = [{"id": f"p{i}", "prompt": f"{p} {i}"} for i, p in enumerate(PROMPTS * 5)]
    rows.insert(7, {"id": "too-long", "prompt": " ".join(["word"] * 40)})
    prompts = _jsonl(tmp_path / "p.jsonl", rows)
    clean = tmp_path / "clean.db"
    t0 = time.perf_counter()
    done = subprocess.run(_command(model, prompts, clean), capture_output=True, text=True)
    whole = time.perf_counter() - t0
    assert done.returncode == 1, done.stderr  # one failed prompt: exit status 1
    db = tmp_path / "killed.db"
    rng = random.Random(17)
    kills = 0
    for _ in range(4):  # killed at random points of what a whole run takes
        proc = subprocess.Popen(_command(model, prompts, db), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.9) * whole)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        if db.exists():  # never a half-written prompt: every stored one is complete
            for ident, n in _rows(db, "SELECT id, n_tokens FROM prompts WHERE status = 'done'"):
                assert _rows(db, "SELECT count(*) FROM tokens WHERE id = ?", ident)[0][0] == n
                assert _rows(db, "SELECT count(*) FROM singular_values WHERE id = ?",
                             ident)[0][0] == 8
    assert kills >= 1
    final = subprocess.run(_command(model, prompts, db), capture_output=True, text=True)
    assert final.returncode == 1, final.stderr
    ids = [r[0] for r in _rows(db, "SELECT id FROM prompts")]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # each once
    assert _rows(db, "SELECT status, error FROM prompts WHERE id = 'too-long'")[0][0] == "failed"
    assert "more than --max-tokens (12)" in _rows(db, "SELECT error FROM prompts "
                                                      "WHERE id = 'too-long'")[0][0]
    query = ("SELECT id, position, token_id, attribution FROM tokens ORDER BY id, position")
    assert _same(_rows(db, query), _rows(clean, query))
    query = "SELECT id, k, value FROM singular_values ORDER BY id, k"
    assert _same(_rows(db, query), _rows(clean, query))
    # a rerun skips everything, the failed prompt too; --retry-failed runs it again
    again = subprocess.run(_command(model, prompts, db), capture_output=True, text=True)
    assert "0 run now" in again.stdout
    retried = subprocess.run(_command(model, prompts, db) + ["--retry-failed"],
                             capture_output=True, text=True)
    assert "1 run now" in retried.stdout
    assert _rows(db, "SELECT count(*) FROM prompts")[0][0] == len(rows)


# -- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"prompt": \n', "line 2: not JSON"),
    ('{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n', "id 'x' is used twice"),
    ('{"prompt": "a"}\n{"prompt": "  "}\n', "line 2: the prompt is empty"),
    ('{"prompt": "a"}\n["b"]\n', "line 2: expected a \"prompt\" string"),
    ('{"prompt": "a", "target": 3}\n', "line 1: \"target\" must be a string"),
])
def test_bad_prompt_files_are_refused_by_line(tmp_path, content, message, synthetic) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    db = tmp_path / "r.db"
    code, out = _batch(str(synthetic("llama", "Q8_0")), str(prompts), "--out", str(db))
    assert code == 2 and message in out and "Traceback" not in out, out
    assert not db.exists()


def test_prompt_set_formats(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("first\n\nsecond\n")
    assert [(i.id, i.prompt) for i in read_prompt_set(tmp_path / "a.txt")] == \
        [("1", "first"), ("3", "second")]
    (tmp_path / "a.csv").write_text('id,prompt,target\nq1,"Hello, world", Paris\nq2,Bye,\n')
    items = read_prompt_set(tmp_path / "a.csv")
    assert [(i.id, i.prompt, i.target) for i in items] == \
        [("q1", "Hello, world", " Paris"), ("q2", "Bye", None)]
    (tmp_path / "b.csv").write_text("text\nHello\n")
    with pytest.raises(PromptError, match=r"b\.csv: a CSV file needs a \"prompt\" column "
                                          r"\(its header has text\)$"):
        read_prompt_set(tmp_path / "b.csv")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["x", "y"], "id": ["a", "b"]}), tmp_path / "a.parquet")
    assert [(i.id, i.prompt) for i in read_prompt_set(tmp_path / "a.parquet")] == \
        [("a", "x"), ("b", "y")]


def test_a_store_of_another_model_or_settings_is_refused(synthetic, tmp_path) -> None:
    a, b = synthetic("llama", "Q8_0"), synthetic("llama", "Q4_K_M")
    prompts = _jsonl(tmp_path / "p.jsonl", [{"id": "1", "prompt": "Hello there"}])
    db = tmp_path / "r.db"
    assert _batch(str(a), str(prompts), "--out", str(db), "--analyses", "attribute")[0] == 0
    before = db.read_bytes()
    code, out = _batch(str(b), str(prompts), "--out", str(db), "--analyses", "attribute")
    assert code == 2 and "another model file" in out and "--extend" in out, out
    code, out = _batch(str(a), str(prompts), "--out", str(db), "--analyses", "attribute",
                       "--top-k", "3")
    assert code == 2 and "top_k is 8 there and 3 here" in out, out
    assert db.read_bytes() == before
    code, out = _batch(str(b), str(prompts), "--out", str(db), "--analyses", "attribute",
                       "--extend")
    assert code == 0, out
    assert _rows(db, "SELECT run_id, count(*) FROM prompts GROUP BY run_id") == [(1, 1), (2, 1)]
    other = _jsonl(tmp_path / "q.jsonl", [{"id": "1", "prompt": "Another text"}])
    code, out = _batch(str(a), str(other), "--out", str(db), "--analyses", "attribute")
    assert code == 2 and "stored with another prompt text" in out, out
    (tmp_path / "x.db").write_text("not a database at all, just text " * 20)
    code, out = _batch(str(a), str(prompts), "--out", str(tmp_path / "x.db"))
    assert code == 2 and "not a results store" in out, out
    code, out = _batch(str(a), str(prompts), "--out", str(tmp_path / "nodir" / "r.db"))
    assert code == 2 and "does not exist" in out, out
    code, out = _batch(str(a), str(prompts), "--out", str(tmp_path / "t.db"), "--analyses",
                       "attribute,bogus")
    assert code == 2 and "bogus" in out and not (tmp_path / "t.db").exists(), out


def test_concepts_flag_prompts_and_export(synthetic, tmp_path) -> None:
    """A concept listed is matched against every stored decoded token (trimmed,
    case-folded); export writes every table as Parquet with the same rows."""
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    model = synthetic("llama", "Q8_0")
    prompts = _jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hello there"},
                                            {"id": "b", "prompt": "One two"}])
    db = tmp_path / "r.db"
    assert _batch(str(model), str(prompts), "--out", str(db), "--analyses", "svd,lens")[0] == 0
    token, ident = _rows(db, "SELECT token, id FROM decoded WHERE source = 'lens' "
                             "AND rank = 0 LIMIT 1")[0]
    words = tmp_path / "w.txt"
    words.write_text(f"# a comment\n{token.strip().upper()}\n")
    assert _batch(str(model), str(prompts), "--out", str(db), "--analyses", "svd,lens",
                  "--concepts", str(words))[0] == 0
    hits = _rows(db, "SELECT DISTINCT id FROM concept_hits")
    assert (ident,) in hits
    flagged = dict(_rows(db, "SELECT id, concept_hits FROM summary"))
    from ggufjac.store import normalize_word

    want = {i: sum(normalize_word(t) == normalize_word(token) for (t,) in
                   _rows(db, "SELECT token FROM decoded WHERE id = ?", i)) for i in ("a", "b")}
    assert flagged == want
    r = CliRunner().invoke(main, ["export", str(db), "--parquet", str(tmp_path / "pq")])
    assert r.exit_code == 0, r.output
    for name in ("prompts", "tokens", "lens", "summary", "concept_hits"):
        table = pq.read_table(tmp_path / "pq" / f"{name}.parquet")
        assert table.num_rows == _rows(db, f"SELECT count(*) FROM {name}")[0][0]
    assert pq.read_table(tmp_path / "pq" / "lens.parquet").num_rows == 2 * 2  # 2 layers


# -- Ray: a real local cluster ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_cluster(tmp_path):
    """`ray start --head` on 127.0.0.1 with token authentication; stopped after the test."""
    pytest.importorskip("ray")
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    assert ray_bin, "the dev extra installs Ray; its `ray` command is missing"
    port = _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex(),
               RAY_USAGE_STATS_ENABLED="0")
    start = subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1",
                            f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                            "--disable-usage-stats"], env=env, capture_output=True, text=True,
                           timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_cluster_results_equal_a_local_run(synthetic, tmp_path, ray_cluster) -> None:
    """Two actors; one of them dies on its first prompt 'p2' (the fault hook): the prompt is
    sent again, and every prompt's results equal a local run's."""
    address, env = ray_cluster
    model = synthetic("llama", "Q8_0")
    prompts = _jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": p}
                                            for i, p in enumerate(PROMPTS[:6])])
    local, remote = tmp_path / "local.db", tmp_path / "ray.db"
    args = ["--analyses", "attribute,svd"]
    run = subprocess.run([sys.executable, "-m", "ggufjac.cli", "batch", str(model),
                          str(prompts), "--out", str(local), *args], capture_output=True,
                         text=True, env=env)
    assert run.returncode == 0, run.stderr
    env = dict(env, GGUFJAC_FAULT_EXIT_ON=f"p2:{tmp_path / 'died'}")
    run = subprocess.run([sys.executable, "-m", "ggufjac.cli", "batch", str(model),
                          str(prompts), "--out", str(remote), *args, "--ray", address,
                          "--workers", "2"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "died").exists()  # a worker did die mid-run
    for query in ("SELECT id, status, n_tokens, predicted_token_id, attribution_sum "
                  "FROM prompts ORDER BY id",
                  "SELECT id, position, token_id, attribution FROM tokens ORDER BY id, position",
                  "SELECT id, k, value FROM singular_values ORDER BY id, k"):
        assert _same(_rows(remote, query), _rows(local, query), rel=1e-6), query
    assert _rows(remote, "SELECT model_sha256 FROM runs") == _rows(local, "SELECT model_sha256 "
                                                                         "FROM runs")


def test_a_store_killed_while_it_is_created_leaves_no_file(tmp_path) -> None:
    """kill -9 in the middle of writing a new store's schema: no file at its path (a later
    run would find an empty SQLite file there), and a later creation completes."""
    db = tmp_path / "r.db"
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "import ggufjac.store as store\n"
        "def killed(db):\n"
        "    db.execute('CREATE TABLE half (x)')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "store._create_schema = killed\n"
        "store.ResultStore(Path(sys.argv[1]))\n")
    r = subprocess.run([sys.executable, "-c", script, str(db)], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not db.exists()
    from ggufjac.store import TABLES, ResultStore

    ResultStore(db).close()
    names = {n for (n,) in _rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert set(TABLES) <= names and "half" not in names
