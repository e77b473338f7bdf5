"""The results store of a batch: one SQLite file (the standard library's sqlite3).

A run (one model file, one set of settings: `BatchSettings.identity`) is recorded once in
`runs` with its provenance; each prompt's results go into `prompts` and the per-position,
per-vector and per-layer tables in ONE transaction, so a kill at any moment leaves every
prompt either complete or absent. Only one process writes (the batch's driver). The schema
is documented in docs/batch.md; `SCHEMA` is its source.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path

from .batch import BatchSettings, PromptResult, Provenance
from .errors import GgufjacError
from .outputs import atomic_write

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    run_id INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    model_path TEXT NOT NULL, model_sha256 TEXT NOT NULL, model_bytes INTEGER NOT NULL,
    architecture TEXT NOT NULL,
    settings TEXT NOT NULL,            -- BatchSettings.identity(), JSON: what a rerun matches
    analyses TEXT NOT NULL, top_k INTEGER NOT NULL, dtype TEXT NOT NULL,
    gate_path TEXT NOT NULL, anchored INTEGER NOT NULL,
    llama_cpp TEXT,                    -- llama.cpp's run settings, JSON (NULL: not run)
    max_tokens INTEGER,
    ggufjac_version TEXT NOT NULL, llama_cpp_python_version TEXT NOT NULL,
    torch_version TEXT NOT NULL, python_version TEXT NOT NULL);
CREATE TABLE prompts (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    id TEXT NOT NULL, prompt TEXT NOT NULL, target TEXT,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')), error TEXT,
    n_tokens INTEGER,
    predicted_token_id INTEGER, predicted_token TEXT, logit REAL,
    llama_cpp_token_id INTEGER, llama_cpp_token TEXT, llama_cpp_logit REAL,
    llama_cpp_logits_nmse REAL,
    attribution_token_id INTEGER, attribution_token TEXT, attribution_logit REAL,
    attribution_sum REAL,
    reconstruction_rel_error REAL, reconstruction_of TEXT,
    top_singular_value REAL, stable_rank REAL, jacobian_formed INTEGER,
    seconds REAL, finished_at TEXT NOT NULL,
    PRIMARY KEY (run_id, id));
CREATE TABLE tokens (
    run_id INTEGER NOT NULL, id TEXT NOT NULL, position INTEGER NOT NULL,
    token_id INTEGER NOT NULL, token TEXT NOT NULL,
    attribution REAL,                  -- (u_t J_i) x_i: the position's share of the logit
    PRIMARY KEY (run_id, id, position),
    FOREIGN KEY (run_id, id) REFERENCES prompts(run_id, id) ON DELETE CASCADE);
CREATE TABLE top_logits (
    run_id INTEGER NOT NULL, id TEXT NOT NULL, rank INTEGER NOT NULL,
    token_id INTEGER NOT NULL, token TEXT NOT NULL, logit REAL NOT NULL,
    PRIMARY KEY (run_id, id, rank),
    FOREIGN KEY (run_id, id) REFERENCES prompts(run_id, id) ON DELETE CASCADE);
CREATE TABLE singular_values (
    run_id INTEGER NOT NULL, id TEXT NOT NULL, k INTEGER NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (run_id, id, k),
    FOREIGN KEY (run_id, id) REFERENCES prompts(run_id, id) ON DELETE CASCADE);
CREATE TABLE decoded (
    run_id INTEGER NOT NULL, id TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('svd', 'lens')),
    layer INTEGER, vector INTEGER, rank INTEGER NOT NULL,
    token_id INTEGER NOT NULL, token TEXT NOT NULL,
    word TEXT NOT NULL,                -- the token trimmed and case-folded (concepts match it)
    score REAL NOT NULL,
    FOREIGN KEY (run_id, id) REFERENCES prompts(run_id, id) ON DELETE CASCADE);
CREATE INDEX decoded_word ON decoded (word);
CREATE TABLE lens (
    run_id INTEGER NOT NULL, id TEXT NOT NULL, layer INTEGER NOT NULL,
    stable_rank REAL NOT NULL, top_singular_value REAL NOT NULL,
    top_token_id INTEGER NOT NULL, top_token TEXT NOT NULL,
    PRIMARY KEY (run_id, id, layer),
    FOREIGN KEY (run_id, id) REFERENCES prompts(run_id, id) ON DELETE CASCADE);
CREATE TABLE concepts (word TEXT PRIMARY KEY, text TEXT NOT NULL);
CREATE VIEW concept_hits AS
    SELECT d.run_id, d.id, c.text AS concept, d.source, d.layer, d.vector, d.rank,
           d.token_id, d.token, d.score
    FROM decoded d JOIN concepts c ON d.word = c.word;
CREATE VIEW summary AS
    SELECT p.run_id, p.id, p.prompt, p.status, p.error, p.n_tokens,
           p.predicted_token, p.logit, p.attribution_token, p.attribution_sum,
           p.reconstruction_rel_error, p.top_singular_value, p.stable_rank,
           p.llama_cpp_token,
           (SELECT count(*) FROM concept_hits h WHERE h.run_id = p.run_id AND h.id = p.id)
               AS concept_hits
    FROM prompts p;
"""

TABLES = ("runs", "prompts", "tokens", "top_logits", "singular_values", "decoded", "lens",
          "concepts")
VIEWS = ("summary", "concept_hits")


def normalize_word(text: str) -> str:
    """What a concept and a decoded token are matched on: trimmed, case-folded."""
    return text.strip().casefold()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _differences(stored: dict, wanted: dict) -> list[str]:
    return [f"{k} is {stored.get(k)!r} there and {wanted.get(k)!r} here"
            for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]


def _create_schema(db: sqlite3.Connection) -> None:
    with db:
        db.executescript("BEGIN;" + SCHEMA + f"INSERT INTO meta VALUES ('schema_version', "
                         f"'{SCHEMA_VERSION}'); COMMIT;")


def _new_store(path: Path) -> None:
    path.unlink(missing_ok=True)  # left by a creation that was killed
    db = sqlite3.connect(path)
    try:
        _create_schema(db)
    finally:
        db.close()


class ResultStore:
    """An open results file. `ResultStore(path)` opens or creates it (creation is one
    transaction: the file is a complete store or none)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise GgufjacError(f"{self.path}: is a directory (--out names the results file, "
                               "e.g. results.db)")
        if not self.path.parent.is_dir():
            raise GgufjacError(f"{self.path}: its directory {self.path.parent} does not exist")
        self.created = not self.path.exists()  # `discard` removes a file this made
        if self.created:  # made whole under another name, then renamed: a kill leaves none
            atomic_write(self.path, _new_store)
        try:
            self.db = sqlite3.connect(self.path, timeout=30)
            self.db.execute("PRAGMA foreign_keys = ON")
            names = {r[0] for r in self.db.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
        except sqlite3.DatabaseError as e:
            raise GgufjacError(f"{self.path}: not a results store ({e})") from None
        if not names:  # an empty SQLite file
            _create_schema(self.db)
        elif "meta" not in names or not set(TABLES) <= names:
            self.db.close()
            raise GgufjacError(f"{self.path}: an SQLite file, but not a ggufjac results store")
        else:
            version = self.db.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if version is None or int(version[0]) != SCHEMA_VERSION:
                self.db.close()
                raise GgufjacError(f"{self.path}: results store schema version "
                                   f"{version and version[0]}, this ggufjac reads "
                                   f"{SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def discard(self) -> None:
        """Close; and remove the file if this store created it and it holds no prompt (a
        run refused before its first prompt leaves nothing behind)."""
        empty = self.db.execute("SELECT count(*) FROM prompts").fetchone()[0] == 0
        self.db.close()
        if self.created and empty:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs ------------------------------------------------------------------------------

    def run_for(self, provenance: Provenance, settings: BatchSettings,
                extend: bool = False) -> int:
        """The run these results belong to: the stored run of the same model file (by
        sha256) and settings, or a new one. A store holding other runs only is refused,
        naming the first difference, unless `extend`."""
        identity = settings.identity()
        wanted = json.dumps(identity, sort_keys=True)
        rows = self.db.execute("SELECT run_id, model_sha256, model_path, settings FROM runs "
                               "ORDER BY run_id").fetchall()
        for run_id, sha, _, stored in rows:
            if sha == provenance.model_sha256 and stored == wanted:
                return run_id
        if rows and not extend:
            run_id, sha, path, stored = rows[-1]
            if sha != provenance.model_sha256:
                why = (f"another model file ({path}, sha256 {sha[:12]}…; this one is "
                       f"{provenance.model_path}, {provenance.model_sha256[:12]}…)")
            else:
                why = "other settings (" + "; ".join(
                    _differences(json.loads(stored), identity)) + ")"
            raise GgufjacError(f"{self.path} holds results of {why}; --extend adds this run "
                               "beside them, or choose another --out")
        with self.db:
            cur = self.db.execute(
                "INSERT INTO runs (created_at, model_path, model_sha256, model_bytes, "
                "architecture, settings, analyses, top_k, dtype, gate_path, anchored, "
                "llama_cpp, max_tokens, ggufjac_version, llama_cpp_python_version, "
                "torch_version, python_version) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (_now(), provenance.model_path, provenance.model_sha256,
                 provenance.model_bytes, provenance.architecture, wanted,
                 ",".join(settings.analyses), settings.top_k, settings.dtype,
                 settings.gate_path, int(settings.anchored),
                 None if settings.llama_cpp is None else json.dumps(asdict(settings.llama_cpp)),
                 settings.max_tokens, provenance.ggufjac_version,
                 provenance.llama_cpp_python_version, provenance.torch_version,
                 provenance.python_version))
        return int(cur.lastrowid)

    def stored(self, run_id: int) -> dict[str, tuple[str, str]]:
        """{id: (status, prompt)} of the run's stored prompts."""
        return {i: (s, p) for i, s, p in self.db.execute(
            "SELECT id, status, prompt FROM prompts WHERE run_id = ?", (run_id,))}

    def set_concepts(self, words: list[str]) -> None:
        """Replace the concept list (the flags are a view: every stored prompt is matched)."""
        with self.db:
            self.db.execute("DELETE FROM concepts")
            self.db.executemany("INSERT OR IGNORE INTO concepts VALUES (?, ?)",
                                [(normalize_word(w), w.strip()) for w in words])

    # -- one prompt ------------------------------------------------------------------------

    def write(self, run_id: int, r: PromptResult) -> None:
        """Store one prompt's results in one transaction, replacing a failed earlier try."""
        pred = r.predicted
        ll, at = r.llama_cpp_top, r.attribution_target
        row = (run_id, r.id, r.prompt, r.target, r.status, r.error,
               len(r.token_ids) if r.token_ids else None,
               pred and pred.token_id, pred and pred.token, pred and pred.logit,
               ll and ll.token_id, ll and ll.token, ll and ll.logit, r.llama_cpp_logits_nmse,
               at and at.token_id, at and at.token, at and at.logit,
               None if r.contributions is None else sum(r.contributions),
               r.reconstruction_rel_error, r.reconstruction_of,
               r.singular_values[0] if r.singular_values else None, r.stable_rank,
               None if r.jacobian_formed is None else int(r.jacobian_formed),
               r.seconds, _now())
        contributions = r.contributions or [None] * len(r.token_ids)
        with self.db:
            self.db.execute("DELETE FROM prompts WHERE run_id = ? AND id = ?", (run_id, r.id))
            self.db.execute(f"INSERT INTO prompts VALUES ({','.join('?' * len(row))})", row)
            self.db.executemany(
                "INSERT INTO tokens VALUES (?,?,?,?,?,?)",
                [(run_id, r.id, i, t, s, c) for i, (t, s, c) in
                 enumerate(zip(r.token_ids, r.tokens, contributions))])
            self.db.executemany(
                "INSERT INTO top_logits VALUES (?,?,?,?,?,?)",
                [(run_id, r.id, i, tl.token_id, tl.token, tl.logit)
                 for i, tl in enumerate(r.top_logits)])
            self.db.executemany("INSERT INTO singular_values VALUES (?,?,?,?)",
                                [(run_id, r.id, k, v) for k, v in enumerate(r.singular_values)])
            self.db.executemany(
                "INSERT INTO decoded VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(run_id, r.id, d.source, d.layer, d.vector, d.rank, d.token_id, d.token,
                  normalize_word(d.token), d.score) for d in r.decoded])
            self.db.executemany(
                "INSERT INTO lens VALUES (?,?,?,?,?,?,?)",
                [(run_id, r.id, l.layer, l.stable_rank, l.top_singular_value, l.top_token_id,
                  l.top_token) for l in r.lens])

    # -- export ----------------------------------------------------------------------------

    def export_parquet(self, directory: Path) -> list[Path]:
        """Every table and view as DIR/NAME.parquet (for pandas, DuckDB, Polars)."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise GgufjacError("exporting Parquet needs pyarrow "
                               "(pip install 'ggufjac[parquet]')") from None
        from .outputs import atomic_write

        kinds = {"INTEGER": pa.int64(), "REAL": pa.float64(), "TEXT": pa.string()}
        tables = {}
        for name in (*TABLES, *VIEWS):
            info = self.db.execute(f"PRAGMA table_info({name})").fetchall()
            rows = self.db.execute(f"SELECT * FROM {name}").fetchall()
            columns = list(zip(*rows)) if rows else [()] * len(info)
            fields = []
            for (_, col, declared, *_), values in zip(info, columns):
                kind = kinds.get(declared.upper()) if declared else None
                if kind is None:  # a view's computed column: its values say
                    kind = pa.int64() if all(isinstance(v, int) or v is None
                                             for v in values) else pa.string()
                fields.append((col, pa.array(list(values), type=kind)))
            tables[name] = pa.table(dict(fields))
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name, table in tables.items():
            written.append(atomic_write(directory / f"{name}.parquet",
                                        lambda p, t=table: pq.write_table(t, p)))
        return written


def read_store(path: Path) -> dict:
    """Everything a results page shows, read-only: the runs with their provenance, and per
    prompt its summary row, tokens with attributions, top logits, singular values, the top
    singular vectors' decoded tokens, the lens rows and the concept hits."""
    path = Path(path)
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as e:
        raise GgufjacError(f"{path}: not a results store ({e})") from None
    try:
        if "meta" not in names or not set(TABLES) <= names:
            raise GgufjacError(f"{path}: an SQLite file, but not a ggufjac results store")

        def rows(sql: str, *args: object) -> list[dict]:
            return [dict(r) for r in db.execute(sql, args)]

        def grouped(sql: str) -> dict[tuple, list[dict]]:
            out: dict[tuple, list[dict]] = {}
            for r in rows(sql):
                out.setdefault((r.pop("run_id"), r.pop("id")), []).append(r)
            return out
        tokens = grouped("SELECT run_id, id, position, token, attribution FROM tokens "
                         "ORDER BY run_id, id, position")
        top = grouped("SELECT run_id, id, rank, token, logit FROM top_logits "
                      "ORDER BY run_id, id, rank")
        sv = grouped("SELECT run_id, id, k, value FROM singular_values ORDER BY run_id, id, k")
        svd = grouped("SELECT run_id, id, vector, rank, token, score FROM decoded "
                      "WHERE source = 'svd' ORDER BY run_id, id, vector, rank")
        lens = grouped("SELECT run_id, id, layer, stable_rank, top_singular_value, top_token "
                       "FROM lens ORDER BY run_id, id, layer")
        hits = grouped("SELECT DISTINCT run_id, id, concept FROM concept_hits "
                       "ORDER BY run_id, id, concept")
        prompts = []
        for p in rows("SELECT p.*, s.concept_hits FROM prompts p JOIN summary s "
                      "ON s.run_id = p.run_id AND s.id = p.id ORDER BY p.run_id, p.rowid"):
            key = (p["run_id"], p["id"])
            p.update(tokens=tokens.get(key, []), top_logits=top.get(key, []),
                     singular_values=[r["value"] for r in sv.get(key, [])],
                     svd_tokens=svd.get(key, []), lens=lens.get(key, []),
                     concepts=[r["concept"] for r in hits.get(key, [])])
            prompts.append(p)
        return {"path": str(path), "runs": rows("SELECT * FROM runs ORDER BY run_id"),
                "concepts": [r["text"] for r in rows("SELECT text FROM concepts ORDER BY text")],
                "prompts": prompts}
    finally:
        db.close()
