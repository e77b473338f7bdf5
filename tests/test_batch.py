"""`ggufjac batch`: the results store against the single-prompt paths, kill -9 and resume,
failures stored, bad input refused, and a real local Ray cluster."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ggufjac.cli import main
from ggufjac.errors import PromptError
from ggufjac.prompt_sets import read_prompt_set
from ggufjac.runner import unembed
from local_ray import kill_once_hook, local_cluster

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


# Runs `ggufjac batch` (argv after the script) in a child that, on its Nth prompt write,
# stops inside the write transaction (the prompt's row inserted, its other rows not yet)
# and says so on stdout with the prompt's id: the parent's kill -9 then lands mid-write.
STOP_INSIDE_WRITE = """
import sys, time
from ggufjac import store
from ggufjac.cli import main

stop_at, state = int(sys.argv[1]), {"writes": 0, "inserted": False}
open_store, write = store.ResultStore.__init__, store.ResultStore.write

def trace(sql):
    if state["inserted"]:
        print("inside", state["id"], flush=True)
        time.sleep(600)
    if state["writes"] == stop_at and sql.lstrip().upper().startswith("INSERT INTO PROMPTS"):
        state["inserted"] = True

def traced_init(self, path):
    open_store(self, path)
    self.db.set_trace_callback(trace)

def counted_write(self, run_id, result):
    state["writes"] += 1
    state["id"] = result.id
    return write(self, run_id, result)

store.ResultStore.__init__ = traced_init
store.ResultStore.write = counted_write
main(sys.argv[2:], prog_name="ggufjac")
"""


def test_kill_minus_9_then_resume_stores_every_prompt_once(synthetic, tmp_path) -> None:
    model = synthetic("llama", "Q8_0")
    rows = [{"id": f"p{i}", "prompt": f"{p} {i}"} for i, p in enumerate(PROMPTS * 5)]
    rows.insert(7, {"id": "too-long", "prompt": " ".join(["word"] * 40)})
    prompts = _jsonl(tmp_path / "p.jsonl", rows)
    clean = tmp_path / "clean.db"
    done = subprocess.run(_command(model, prompts, clean), capture_output=True, text=True)
    assert done.returncode == 1, done.stderr  # one failed prompt: exit status 1
    db = tmp_path / "killed.db"
    from ggufjac.store import read_store

    committed: list[str] = []
    for stop_at in (3, 5, 2, 4):  # the Nth write of each run is killed inside its transaction
        proc = subprocess.Popen([sys.executable, "-c", STOP_INSIDE_WRITE, str(stop_at),
                                 *_command(model, prompts, db)[3:]],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = proc.stdout.readline()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert line.startswith("inside "), line
        pending = [r["id"] for r in rows if r["id"] not in committed]  # in the file's order
        assert line.split()[1] == pending[stop_at - 1]
        committed += pending[:stop_at - 1]
        # the killed write left nothing; every earlier one is whole, and a read-only reader
        # sees exactly that
        stored = read_store(db)
        assert sorted(p["id"] for p in stored["prompts"]) == sorted(committed)
        for p in stored["prompts"]:
            if p["status"] == "done":
                assert len(p["tokens"]) == p["n_tokens"] and len(p["singular_values"]) == 8
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

# The cluster's workers' hook (tests/worker_hooks.py): the first one given prompt 'p2' is
# killed as it starts it, leaving the file `marker`; later workers run 'p2' normally.
def kill_worker_on_p2(marker: Path) -> str:
    return kill_once_hook("ggufjac.batch", "PromptRunner", "run", "args[0].id == 'p2'",
                          repr(str(marker)))



@pytest.fixture()
def ray_cluster(tmp_path):
    """`ray start --head` on 127.0.0.1 with token authentication, its workers killed as
    kill_worker_on_p2 says; stopped after the test. Gives (address, the driver's env,
    the marker file)."""
    marker = tmp_path / "killed-worker"
    hook = tmp_path / "worker-hook"
    hook.mkdir()
    with local_cluster(kill_worker_on_p2(marker), hook) as (address, env):
        yield address, env, marker


def test_ray_cluster_results_equal_a_local_run(synthetic, tmp_path, ray_cluster) -> None:
    """Two actors; the one given 'p2' first is killed (SIGKILL) as it starts it: the prompt
    is sent again, and every prompt's results equal a local run's."""
    address, env, marker = ray_cluster
    model = synthetic("llama", "Q8_0")
    prompts = _jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": p}
                                            for i, p in enumerate(PROMPTS[:6])])
    local, remote = tmp_path / "local.db", tmp_path / "ray.db"
    args = ["--analyses", "attribute,svd"]
    run = subprocess.run([sys.executable, "-m", "ggufjac.cli", "batch", str(model),
                          str(prompts), "--out", str(local), *args], capture_output=True,
                         text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert not marker.exists()  # the hook is the cluster's alone
    run = subprocess.run([sys.executable, "-m", "ggufjac.cli", "batch", str(model),
                          str(prompts), "--out", str(remote), *args, "--ray", address,
                          "--workers", "2"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert marker.exists()  # a worker was killed mid-run
    for query in ("SELECT id, status, n_tokens, predicted_token_id, attribution_sum "
                  "FROM prompts ORDER BY id",
                  "SELECT id, position, token_id, attribution FROM tokens ORDER BY id, position",
                  "SELECT id, k, value FROM singular_values ORDER BY id, k"):
        assert _same(_rows(remote, query), _rows(local, query), rel=1e-6), query
    assert _rows(remote, "SELECT model_sha256 FROM runs") == _rows(local, "SELECT model_sha256 "
                                                                         "FROM runs")


def test_a_store_killed_while_it_is_created_leaves_no_file(tmp_path) -> None:
    """kill -9 in the middle of writing a new store's schema: no file at its path (a later
    run would find an empty SQLite file there); the temporary store and its journal left
    beside it are removed by the next creation, which completes."""
    db = tmp_path / "r.db"
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "import ggufjac.store as store\n"
        "def killed(db):\n"
        "    db.execute('BEGIN')\n"
        "    db.execute('CREATE TABLE half (x)')\n"
        "    db.execute('INSERT INTO half VALUES (1)')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "store._create_schema = killed\n"
        "store.ResultStore(Path(sys.argv[1]))\n")
    r = subprocess.run([sys.executable, "-c", script, str(db)], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not db.exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".r.db.partial", ".r.db.partial-journal"], left
    from ggufjac.store import TABLES, ResultStore

    ResultStore(db).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.db"]
    names = {n for (n,) in _rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert set(TABLES) <= names and "half" not in names


# -- the store alone: hot journals, concurrent batches, snapshots, the schema ---------------

def _run_identity():
    """(provenance, settings) of a run made up here: open_run's arguments."""
    from ggufjac.batch import BatchSettings, Provenance

    return (Provenance("m.gguf", "ab" * 32, 1, "llama", "0", "0", "0", "3"),
            BatchSettings(("attribute",)))


def _result(ident: str, n: int = 3, logit: float = 1.5):
    """A done prompt's result with `n` tokens (made here, no model)."""
    from ggufjac.batch import PromptResult, TokenLogit

    return PromptResult(ident, f"prompt {ident}", None, n_tokens=n, predicted_token_id=7,
                        predicted_token=" x", logit=logit, attribution_sum=logit,
                        token_ids=list(range(n)), tokens=[f"t{i}" for i in range(n)],
                        contributions=[logit / n] * n,
                        top_logits=[TokenLogit(7, " x", logit)], singular_values=[2.0, 1.0])


def _store_with(db: Path, ids: list[str]) -> int:
    from ggufjac.store import ResultStore

    with ResultStore(db) as s:
        run_id, _ = s.open_run(*_run_identity())
        for i in ids:
            assert s.write(run_id, _result(i))
    return run_id


# A writer of a store made before WAL (rollback journal), killed with SIGKILL inside a
# transaction that has already written changed pages into the file: its journal is hot.
HOT_JOURNAL_WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode = DELETE")
db.execute("PRAGMA cache_size = 1")  # changed pages spill into the file before the commit
db.execute("BEGIN IMMEDIATE")
db.execute("DELETE FROM prompts")
db.executemany("INSERT INTO tokens VALUES (1, 'a', ?, 0, ?, 0.0)",
               [(100 + i, "y" * 500) for i in range(3000)])
print("inside", flush=True)
time.sleep(600)
"""


def test_a_hot_journal_is_rolled_back_and_the_store_read(tmp_path) -> None:
    from ggufjac.store import read_store

    db = tmp_path / "r.db"
    _store_with(db, ["a", "b"])
    proc = subprocess.Popen([sys.executable, "-c", HOT_JOURNAL_WRITER, str(db)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "inside\n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    journal = tmp_path / "r.db-journal"
    assert journal.exists()
    # what failed before: SQLite itself cannot read it read-only while the journal is hot
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True).execute(
            "SELECT count(*) FROM prompts").fetchone()
    stored = read_store(db)
    assert [(p["id"], len(p["tokens"])) for p in stored["prompts"]] == [("a", 3), ("b", 3)]
    assert not journal.exists()


def test_two_batches_at_once_store_one_run_and_each_prompt_once(tmp_path) -> None:
    """Two processes create the same new store, record the same run and write the same
    prompts at the same moment: one run, each prompt once with its rows once. Then the
    rules that make it so, one at a time."""
    from ggufjac.store import ResultStore

    writer = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from ggufjac.batch import BatchSettings, PromptResult, Provenance\n"
        "from ggufjac.store import ResultStore\n"
        "settings = BatchSettings(('attribute',))\n"
        "provenance = Provenance('m.gguf', 'ab' * 32, 1, 'llama', '0', '0', '0', '3')\n"
        "go = Path(sys.argv[2])\n"
        "while not go.exists():\n"
        "    time.sleep(0.001)\n"
        "s = ResultStore(Path(sys.argv[1]))\n"
        "run_id, _ = s.open_run(provenance, settings)\n"
        "print(sum(s.write(run_id, PromptResult(i, f'prompt {i}', None, n_tokens=3, logit=1.5,\n"
        "                                       token_ids=[0, 1, 2], tokens=['a', 'b', 'c']))\n"
        "          for i in 'abc'))\n")
    for round_ in range(3):
        db, go = tmp_path / f"r{round_}.db", tmp_path / f"go{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", writer, str(db), str(go)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        go.touch()
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        assert sum(int(o) for o, _ in outs) == 3  # each prompt written by one of them
        assert _rows(db, "SELECT count(*) FROM runs") == [(1,)]
        assert _rows(db, "SELECT id, count(*) FROM prompts GROUP BY id") == \
            [("a", 1), ("b", 1), ("c", 1)]
        assert _rows(db, "SELECT count(*) FROM tokens") == [(9,)]
    assert sorted(p.name for p in tmp_path.iterdir()
                  if p.name.startswith(".")) == []  # no temporary store left
    # a run's identity is unique in the file itself (any writer, any version)
    with sqlite3.connect(db) as c, pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        c.execute("INSERT INTO runs SELECT NULL, created_at, model_path, model_sha256, "
                  "model_bytes, architecture, settings, analyses, top_k, dtype, gate_path, "
                  "anchored, llama_cpp, max_tokens, ggufjac_version, "
                  "llama_cpp_python_version, torch_version, python_version FROM runs")
    # a prompt stored done is kept: a second result for it is not written
    with ResultStore(db) as s:
        run_id, stored = s.open_run(*_run_identity())
        assert s.write(run_id, _result("a", logit=99.0)) is False
    assert _rows(db, "SELECT logit FROM prompts WHERE id = 'a'") == [(1.5,)]


def test_a_reader_sees_one_snapshot_while_a_batch_commits(tmp_path, monkeypatch) -> None:
    """Before each query of `read_store`, another connection commits one more whole prompt:
    the page's data is the store at one moment (every prompt with all its tokens), not a
    mix of moments."""
    from ggufjac.store import ResultStore, read_store

    db = tmp_path / "r.db"
    _store_with(db, ["a", "b"])
    writer = ResultStore(db)
    run_id, _ = writer.open_run(*_run_identity())
    committed: list[str] = []

    def commit_one(sql: str) -> None:
        if sql.lstrip().upper().startswith("SELECT"):
            ident = f"new{len(committed)}"
            writer.write(run_id, _result(ident, n=4))
            committed.append(ident)

    connect = sqlite3.connect

    def traced(*args: object, **kwargs: object) -> sqlite3.Connection:
        con = connect(*args, **kwargs)
        con.set_trace_callback(commit_one)
        return con

    monkeypatch.setattr(sqlite3, "connect", traced)
    stored = read_store(db)
    monkeypatch.undo()
    writer.close()
    ids = [p["id"] for p in stored["prompts"]]
    seen = len(ids) - 2
    assert len(committed) >= 5 and 0 <= seen < len(committed)
    assert ids == ["a", "b", *committed[:seen]]  # the store as it was at one commit
    for p in stored["prompts"]:
        assert len(p["tokens"]) == p["n_tokens"] and len(p["top_logits"]) == 1, p["id"]


def test_the_prompts_table_is_the_documented_one(tmp_path) -> None:
    """The columns made from PromptResult are docs/batch.md's, in its order (stores
    written before they were made from it read and write alike); a store made before the
    unique run identity gets it when a batch opens it."""
    import re

    from ggufjac.store import read_store

    doc = (Path(__file__).parent.parent / "docs" / "batch.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `prompts` |"))
    documented = re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", row.split("|")[3]))
    db = tmp_path / "r.db"
    _store_with(db, ["a"])
    assert [r[1] for r in _rows(db, "PRAGMA table_info(prompts)")] == documented
    with sqlite3.connect(db) as c:
        c.execute("DROP INDEX runs_identity")
    assert not _rows(db, "SELECT name FROM sqlite_master WHERE name = 'runs_identity'")
    _store_with(db, ["b"])
    assert _rows(db, "SELECT name FROM sqlite_master WHERE name = 'runs_identity'")
    assert [p["id"] for p in read_store(db)["prompts"]] == ["a", "b"]


# -- a mixture of experts' routing in the store -----------------------------------------------

MOE_SHAPE = dict(n_layer=2, d_model=64, d_ff=128, n_head=4, n_kv_head=2, head_dim=16,
                 n_expert=8, n_expert_used=2, d_ff_expert=32)


def test_store_holds_the_routing_of_a_mixture_of_experts_and_none_of_a_dense_model(
        tmp_path) -> None:
    """Per prompt, position, layer and rank the expert selected and its weight: those
    `attribute` reports for the same prompt, the experts of llama.cpp's own graph
    (ffn_moe_topk), and weights recomputed here from its router logits (softmax over all
    experts, the top k, renormalised); a dense model's prompts have no routing rows."""
    import numpy as np

    from ggufjac import llamacpp
    from ggufjac.api import open_model
    from tools.synthetic import Shape, write_synthetic_gguf

    shape = Shape(**MOE_SHAPE)
    moe = write_synthetic_gguf(tmp_path / "moe.gguf", "qwen3moe", shape)
    dense = write_synthetic_gguf(tmp_path / "dense.gguf", "qwen3", Shape(n_layer=2))
    texts = {"fox": "the quick brown fox jumps", "dog": "over the lazy dog"}
    prompts = _jsonl(tmp_path / "p.jsonl", [{"id": k, "prompt": v} for k, v in texts.items()])
    db, dense_db = tmp_path / "moe.db", tmp_path / "dense.db"
    for model, out in ((moe, db), (dense, dense_db)):
        code, out_text = _batch(str(model), str(prompts), "--out", str(out),
                                "--analyses", "attribute")
        assert code == 0, out_text
    assert _rows(dense_db, "SELECT count(*) FROM routing") == [(0,)]
    assert _rows(dense_db, "SELECT count(*) FROM prompts WHERE status = 'done'") == [(2,)]

    m = open_model(moe, dtype="float32")
    k, n_layer = shape.n_expert_used, shape.n_layer
    for ident, text in texts.items():
        tokens = m.tokenize(text)
        stored = _rows(db, "SELECT position, layer, rank, expert, weight FROM routing "
                           "WHERE id = ? ORDER BY layer, position, rank", ident)
        assert len(stored) == n_layer * len(tokens) * k
        experts = np.array([r[3] for r in stored]).reshape(n_layer, len(tokens), k)
        weights = np.array([r[4] for r in stored]).reshape(n_layer, len(tokens), k)
        assert [r[:3] for r in stored] == [(p, i, r) for i in range(n_layer)
                                           for p in range(len(tokens)) for r in range(k)]
        report = m.attribute(tokens)["routing"]
        for i, layer in enumerate(report["layers"]):
            assert experts[i].tolist() == layer["experts"]
            assert np.allclose(weights[i], layer["weights"], rtol=0, atol=1e-7)
        names = [f"{t}-{i}" for i in range(n_layer) for t in ("ffn_moe_topk", "ffn_moe_logits")]
        ref = llamacpp.evaluate(moe, tokens, capture=names)
        for i in range(n_layer):
            theirs = ref.captured[f"ffn_moe_topk-{i}"].reshape(len(tokens), -1)
            assert np.array_equal(experts[i], theirs), i
            logits = ref.captured[f"ffn_moe_logits-{i}"].reshape(len(tokens), -1) \
                .astype(np.float64)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            chosen = np.take_along_axis(probs, experts[i], axis=-1)
            # llama.cpp's router input differs from ours by its F16 K/V cache (1e-4 apart)
            assert np.allclose(weights[i], chosen / chosen.sum(-1, keepdims=True),
                               rtol=0, atol=2e-3), i
            assert np.all(np.diff(np.take_along_axis(logits, experts[i], -1), axis=-1) <= 1e-4)


def test_a_store_of_another_schema_version_is_refused(tmp_path) -> None:
    """A store written before the routing table (schema 2) is refused in one line naming
    both versions, when a batch opens it and when it is read."""
    from ggufjac.errors import GgufjacError
    from ggufjac.store import ResultStore, read_store

    db = tmp_path / "old.db"
    _store_with(db, ["a"])
    with sqlite3.connect(db) as c:
        c.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        c.execute("DROP TABLE routing")
    for opening in (lambda: ResultStore(db), lambda: read_store(db)):
        with pytest.raises(GgufjacError, match="schema version 2, this ggufjac reads 3 only"):
            opening()
