"""The results store of a batch: one SQLite file (the standard library's sqlite3).

A run (one model file, one set of settings: `BatchSettings.identity`) is recorded once in
`runs` with its provenance; each prompt's results go into `prompts` and the per-position,
per-vector and per-layer tables in ONE transaction, so a kill at any moment leaves every
prompt either complete or absent. The schema is documented in docs/batch.md; `SCHEMA` is its
source, and its `prompts` table is made from `batch.PromptResult`'s fields.

The file is in WAL mode: readers see one snapshot while a batch writes, and a kill leaves
nothing a read-only reader must repair. Two batches may write one store at once (they wait
for each other's transactions, `BUSY_TIMEOUT_S`): a run is recorded once (a unique index on
its identity) and a prompt once (the first done result is kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .batch import (BatchSettings, DecodedToken, LensLayer, LocalExecutor, PromptResult,
                    Provenance, ResultColumn, RoutedExpert, TokenLogit, result_columns)
from .errors import GgufjacError
from .outputs import atomic_write

SCHEMA_VERSION = 3  # 2: prompts.attribution_bias; 3: the routing table
# How long a statement waits for another connection's transaction (another batch writing
# one prompt takes well under a second; a long wait means a stuck writer, and then an error).
BUSY_TIMEOUT_S = 60.0

_SQL_TYPES = {str: "TEXT", int: "INTEGER", float: "REAL", bool: "INTEGER"}


def _column_sql(c: ResultColumn) -> str:
    sql = f"{c.name} {_SQL_TYPES[c.kind]}" + ("" if c.nullable else " NOT NULL")
    if c.choices:
        sql += f" CHECK ({c.name} IN ({', '.join(repr(v) for v in c.choices)}))"
    return sql


RESULT_COLUMNS = tuple(c.name for c in result_columns())
# run_id first and finished_at last: the order of the stores written before the table was
# made from PromptResult (their columns are the same, so they read and write alike)
PROMPT_COLUMNS = ("run_id", *RESULT_COLUMNS, "finished_at")
PROMPTS_TABLE = (
    "CREATE TABLE prompts (\n    run_id INTEGER NOT NULL REFERENCES runs(run_id),\n    "
    + ",\n    ".join(_column_sql(c) for c in result_columns())
    + ",\n    finished_at TEXT NOT NULL,\n    PRIMARY KEY (run_id, id));\n")
# a run's identity: two batches started at once on one store record it once (stores made
# before it existed get it when a batch opens them)
RUNS_IDENTITY = ("CREATE UNIQUE INDEX IF NOT EXISTS runs_identity "
                 "ON runs (model_sha256, settings);\n")

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
""" + RUNS_IDENTITY + PROMPTS_TABLE + """CREATE TABLE tokens (
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
CREATE TABLE routing (              -- a mixture of experts' frozen routing (dense: none)
    run_id INTEGER NOT NULL, id TEXT NOT NULL, position INTEGER NOT NULL,
    layer INTEGER NOT NULL,
    rank INTEGER NOT NULL,             -- in llama.cpp's order of the selection
    expert INTEGER NOT NULL, weight REAL NOT NULL,
    PRIMARY KEY (run_id, id, position, layer, rank),
    FOREIGN KEY (run_id, id) REFERENCES prompts(run_id, id) ON DELETE CASCADE);
CREATE INDEX routing_expert ON routing (layer, expert);
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
          "routing", "concepts")
VIEWS = ("summary", "concept_hits")


def normalize_word(text: str) -> str:
    """What a concept and a decoded token are matched on: trimmed, case-folded."""
    return text.strip().casefold()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _differences(stored: dict, wanted: dict) -> list[str]:
    return [f"{k} is {stored.get(k)!r} there and {wanted.get(k)!r} here"
            for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]


# The child tables' INSERTs name their columns after the record dataclasses' fields: a
# field added to one without its column fails on the first write, not silently.
_TOP_LOGIT_FIELDS = tuple(f.name for f in dataclasses.fields(TokenLogit))
_DECODED_FIELDS = tuple(f.name for f in dataclasses.fields(DecodedToken))
_LENS_FIELDS = tuple(f.name for f in dataclasses.fields(LensLayer))
_ROUTING_FIELDS = tuple(f.name for f in dataclasses.fields(RoutedExpert))


def _insert(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def _connect(path: Path) -> sqlite3.Connection:
    """A read-write connection, waiting `BUSY_TIMEOUT_S` for a lock; no implicit
    transactions (each is a `_transaction`)."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    db.execute("PRAGMA foreign_keys = ON")
    return db


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, kind: str = "IMMEDIATE") -> Iterator[None]:
    """One transaction: IMMEDIATE takes the write lock at once (a read then a write in it
    cannot be overtaken by another batch); DEFERRED reads one snapshot."""
    db.execute(f"BEGIN {kind}")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _create_schema(db: sqlite3.Connection) -> None:
    db.executescript("BEGIN;" + SCHEMA + f"INSERT INTO meta VALUES ('schema_version', "
                     f"'{SCHEMA_VERSION}'); COMMIT;")


def _new_store(path: Path) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        _create_schema(db)
    finally:
        db.close()


def _siblings(path: Path) -> list[Path]:
    """SQLite's own files beside a database: its rollback journal, its WAL and index."""
    return [path.with_name(path.name + suffix) for suffix in ("-journal", "-wal", "-shm")]


def _leftovers(path: Path) -> list[Path]:
    """What a creation of `path` killed midway leaves: the temporary store (atomic_write's
    name for it) and its journal."""
    partial = path.with_name(f".{path.name}.partial")
    return [partial, *_siblings(partial)]


@contextlib.contextmanager
def _creation_lock(directory: Path) -> Iterator[None]:
    """Held (an flock on the directory) while a store is created: two batches started at
    once on a new --out create it once, and a creation's leftovers are only ever removed
    once their creator is dead. Without flock (not POSIX), creation is unguarded."""
    try:
        import fcntl
        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_schema(db: sqlite3.Connection, path: Path) -> None:
    """Refuse a file that is not a results store of this schema version (`db` in a read
    transaction or not: one query per check)."""
    names = {r[0] for r in db.execute(
        "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
    if "meta" not in names or "prompts" not in names:
        raise GgufjacError(f"{path}: an SQLite file, but not a ggufjac results store")
    # the version before the tables: a store of another version lacks some of this one's
    version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if version is None or version[0] != str(SCHEMA_VERSION):
        raise GgufjacError(f"{path}: results store schema version "
                           f"{version and version[0]}, this ggufjac reads {SCHEMA_VERSION} "
                           "only (read it with the ggufjac that wrote it, or choose another "
                           "--out)")
    if not set(TABLES) <= names:
        raise GgufjacError(f"{path}: a results store of schema version {SCHEMA_VERSION} "
                           f"without its tables {', '.join(sorted(set(TABLES) - names))}")
    columns = {r[1] for r in db.execute("PRAGMA table_info(prompts)")}
    if columns != set(PROMPT_COLUMNS):
        raise GgufjacError(f"{path}: its prompts table has columns this ggufjac does not "
                           f"write ({', '.join(sorted(columns ^ set(PROMPT_COLUMNS)))}) for "
                           f"schema version {SCHEMA_VERSION}")


class ResultStore:
    """An open results file. `ResultStore(path)` opens or creates it (creation is one
    transaction under a temporary name, then a rename: the file is a complete store or
    none; what a killed creation left is removed by the next)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise GgufjacError(f"{self.path}: is a directory (--out names the results file, "
                               "e.g. results.db)")
        if not self.path.parent.is_dir():
            raise GgufjacError(f"{self.path}: its directory {self.path.parent} does not exist")
        self.created = False  # `discard` removes a file this made
        if not self.path.exists():
            with _creation_lock(self.path.parent):
                if not self.path.exists():  # else another batch made it while this waited
                    for leftover in _leftovers(self.path):
                        leftover.unlink(missing_ok=True)
                    atomic_write(self.path, _new_store)
                    self.created = True
        self.db = _connect(self.path)
        try:
            try:
                empty = self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
            except sqlite3.DatabaseError as e:
                raise GgufjacError(f"{self.path}: not a results store ({e})") from None
            if empty:  # an empty SQLite file
                _create_schema(self.db)
            _check_schema(self.db, self.path)
            try:  # persistent in the file: a no-op once it is WAL
                self.db.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:
                pass  # another process has it open in rollback mode: it stays so, and works
            try:
                self.db.execute(RUNS_IDENTITY)
            except sqlite3.IntegrityError:
                dup = self.db.execute("SELECT group_concat(run_id, ', ') FROM runs GROUP BY "
                                      "model_sha256, settings HAVING count(*) > 1").fetchone()
                raise GgufjacError(f"{self.path}: holds one run more than once (runs "
                                   f"{dup[0]}: the same model file and settings), left by "
                                   "batches run at once on it by an older ggufjac; choose "
                                   "another --out (reading it still works)") from None
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One write transaction; a store another process keeps locked is one clear error."""
        try:
            with _transaction(self.db):
                yield
        except sqlite3.OperationalError as e:
            held = f"; another process held it for more than {BUSY_TIMEOUT_S:.0f} s" \
                if "locked" in str(e) else ""
            raise GgufjacError(f"{self.path}: cannot write ({e}{held})") from None

    def discard(self) -> None:
        """Close; and remove the file if this store created it and it holds no prompt (a
        run refused before its first prompt leaves nothing behind)."""
        empty = self.db.execute("SELECT count(*) FROM prompts").fetchone()[0] == 0
        self.db.close()
        if self.created and empty:
            for leftover in (self.path, *_siblings(self.path)):
                leftover.unlink(missing_ok=True)

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs ------------------------------------------------------------------------------

    def open_run(self, provenance: Provenance, settings: BatchSettings,
                 extend: bool = False) -> tuple[int, dict[str, tuple[str, str]]]:
        """The run these results belong to, and {id: (status, prompt)} of its stored prompts
        (one transaction: another batch cannot record the run in between). The run is the
        stored one of the same model file (by sha256) and settings, or a new one. A store
        holding other runs only is refused, naming the first difference, unless `extend`."""
        identity = settings.identity()
        wanted = json.dumps(identity, sort_keys=True)
        with self._writing():
            rows = self.db.execute("SELECT run_id, model_sha256, model_path, settings "
                                   "FROM runs ORDER BY run_id").fetchall()
            run_id = next((r for r, sha, _, stored in rows
                           if sha == provenance.model_sha256 and stored == wanted), None)
            if run_id is None:
                if rows and not extend:
                    _, sha, path, stored = rows[-1]
                    if sha != provenance.model_sha256:
                        why = (f"another model file ({path}, sha256 {sha[:12]}…; this one is "
                               f"{provenance.model_path}, {provenance.model_sha256[:12]}…)")
                    else:
                        why = "other settings (" + "; ".join(
                            _differences(json.loads(stored), identity)) + ")"
                    raise GgufjacError(f"{self.path} holds results of {why}; --extend adds "
                                       "this run beside them, or choose another --out")
                run_id = int(self.db.execute(
                    "INSERT INTO runs (created_at, model_path, model_sha256, model_bytes, "
                    "architecture, settings, analyses, top_k, dtype, gate_path, anchored, "
                    "llama_cpp, max_tokens, ggufjac_version, llama_cpp_python_version, "
                    "torch_version, python_version) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (_now(), provenance.model_path, provenance.model_sha256,
                     provenance.model_bytes, provenance.architecture, wanted,
                     ",".join(settings.analyses), settings.top_k, settings.dtype,
                     settings.gate_path, int(settings.anchored),
                     None if settings.llama_cpp is None
                     else json.dumps(asdict(settings.llama_cpp)),
                     settings.max_tokens, provenance.ggufjac_version,
                     provenance.llama_cpp_python_version, provenance.torch_version,
                     provenance.python_version)).lastrowid)
            stored = {i: (s, p) for i, s, p in self.db.execute(
                "SELECT id, status, prompt FROM prompts WHERE run_id = ?", (run_id,))}
        return run_id, stored

    def set_concepts(self, words: list[str]) -> None:
        """Replace the concept list (the flags are a view: every stored prompt is matched)."""
        with self._writing():
            self.db.execute("DELETE FROM concepts")
            self.db.executemany("INSERT OR IGNORE INTO concepts VALUES (?, ?)",
                                [(normalize_word(w), w.strip()) for w in words])

    # -- one prompt ------------------------------------------------------------------------

    def write(self, run_id: int, r: PromptResult) -> bool:
        """Store one prompt's results in one transaction, replacing a failed earlier try.
        False (nothing written) when the prompt is stored done already: another batch on
        this store finished it first, and its result is kept."""
        row = (run_id, *(getattr(r, name) for name in RESULT_COLUMNS), _now())
        contributions = r.contributions or [None] * len(r.token_ids)
        with self._writing():
            stored = self.db.execute("SELECT status FROM prompts WHERE run_id = ? AND id = ?",
                                     (run_id, r.id)).fetchone()
            if stored is not None and stored[0] == "done":
                return False
            self.db.execute("DELETE FROM prompts WHERE run_id = ? AND id = ?", (run_id, r.id))
            self.db.execute(_insert("prompts", PROMPT_COLUMNS), row)
            self.db.executemany(
                _insert("tokens", ("run_id", "id", "position", "token_id", "token",
                                   "attribution")),
                [(run_id, r.id, i, t, s, c) for i, (t, s, c) in
                 enumerate(zip(r.token_ids, r.tokens, contributions))])
            self.db.executemany(
                _insert("top_logits", ("run_id", "id", "rank", *_TOP_LOGIT_FIELDS)),
                [(run_id, r.id, i, *(getattr(tl, f) for f in _TOP_LOGIT_FIELDS))
                 for i, tl in enumerate(r.top_logits)])
            self.db.executemany(_insert("singular_values", ("run_id", "id", "k", "value")),
                                [(run_id, r.id, k, v) for k, v in enumerate(r.singular_values)])
            self.db.executemany(
                _insert("decoded", ("run_id", "id", *_DECODED_FIELDS, "word")),
                [(run_id, r.id, *(getattr(d, f) for f in _DECODED_FIELDS),
                  normalize_word(d.token)) for d in r.decoded])
            self.db.executemany(
                _insert("lens", ("run_id", "id", *_LENS_FIELDS)),
                [(run_id, r.id, *(getattr(l, f) for f in _LENS_FIELDS)) for l in r.lens])
            self.db.executemany(
                _insert("routing", ("run_id", "id", *_ROUTING_FIELDS)),
                [(run_id, r.id, *(getattr(e, f) for f in _ROUTING_FIELDS)) for e in r.routing])
        return True


# -- reading -------------------------------------------------------------------------------

def _read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to the store at `path`. A rollback journal left hot by a
    writer killed mid-transaction (a store written before WAL, or where WAL is unavailable)
    is rolled back first, which needs write access once; a WAL store in a directory this
    process cannot write is read as it is on disk when no writer has left a WAL."""
    uri = path.resolve().as_uri()

    def attempt(query: str) -> sqlite3.Connection:
        db = sqlite3.connect(f"{uri}?{query}", uri=True, timeout=BUSY_TIMEOUT_S,
                             isolation_level=None)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    try:
        try:
            return attempt("mode=ro")
        except sqlite3.OperationalError as e:
            if "readonly" not in str(e):
                raise
            journal, wal, _ = _siblings(path)
            if journal.exists():  # hot: only a writer can roll it back
                if not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
                    raise GgufjacError(
                        f"{path}: a process writing it was killed and left {journal.name}, "
                        "an unfinished transaction that must be rolled back before the store "
                        "can be read; that needs write access to the file and its directory "
                        "once (any ggufjac or SQLite read with it does it)") from None
                rolled = _connect(path)  # its first read rolls the journal back
                try:
                    rolled.execute("SELECT count(*) FROM sqlite_master").fetchone()
                finally:
                    rolled.close()
                return attempt("mode=ro")
            if not wal.exists():  # a WAL store whose shared-memory file cannot be made
                return attempt("immutable=1")
            raise
    except sqlite3.DatabaseError as e:
        raise GgufjacError(f"{path}: not a results store ({e})") from None


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[sqlite3.Connection]:
    """The store at `path` read-only, in one read transaction: every query sees the same
    snapshot, whatever a batch commits meanwhile."""
    db = _read_only(path)
    try:
        with _transaction(db, "DEFERRED"):
            _check_schema(db, path)
            yield db
    finally:
        db.close()


def export_store(path: Path, directory: Path) -> list[Path]:
    """Every table and view of the store at `path` as DIR/NAME.parquet (for pandas, DuckDB,
    Polars), read in one snapshot."""
    path = Path(path)
    if not path.is_file():
        raise GgufjacError(f"{path}: no such results store")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise GgufjacError("exporting Parquet needs pyarrow "
                           "(pip install 'ggufjac[parquet]')") from None

    kinds = {"INTEGER": pa.int64(), "REAL": pa.float64(), "TEXT": pa.string()}
    tables = {}
    with _reading(path) as db:
        for name in (*TABLES, *VIEWS):
            info = db.execute(f"PRAGMA table_info({name})").fetchall()
            rows = db.execute(f"SELECT * FROM {name}").fetchall()
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
    """Everything a results page shows, read-only and in one snapshot: the runs with their
    provenance, and per prompt its summary row, tokens with attributions, top logits,
    singular values, the top singular vectors' decoded tokens, the lens rows, the routing
    rows (a mixture of experts) and the concept hits."""
    path = Path(path)
    with _reading(path) as db:
        db.row_factory = sqlite3.Row

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
        routing = grouped("SELECT run_id, id, position, layer, rank, expert, weight "
                          "FROM routing ORDER BY run_id, id, position, layer, rank")
        prompts = []
        for p in rows("SELECT p.*, s.concept_hits FROM prompts p JOIN summary s "
                      "ON s.run_id = p.run_id AND s.id = p.id ORDER BY p.run_id, p.rowid"):
            key = (p["run_id"], p["id"])
            p.update(tokens=tokens.get(key, []), top_logits=top.get(key, []),
                     singular_values=[r["value"] for r in sv.get(key, [])],
                     svd_tokens=svd.get(key, []), lens=lens.get(key, []),
                     routing=routing.get(key, []),
                     concepts=[r["concept"] for r in hits.get(key, [])])
            prompts.append(p)
        return {"path": str(path), "runs": rows("SELECT * FROM runs ORDER BY run_id"),
                "concepts": [r["text"] for r in rows("SELECT text FROM concepts ORDER BY text")],
                "prompts": prompts}


# -- a batch into a store ------------------------------------------------------------------

@dataclass
class BatchOutcome:
    """What `run_batch` did: counts over the prompt set (stored before, or now)."""

    path: Path
    run_id: int
    prompts: int  # in the prompt set
    to_run: int  # run now (the others were stored already)
    done: int = 0
    failed: int = 0
    # run now, but stored done first by another batch on this store (its result was kept)
    kept_from_another_batch: int = 0
    seconds: float = 0.0
    interrupted: bool = False  # Ctrl-C: what was stored so far stays; a rerun goes on

    @property
    def already_stored(self) -> int:
        return self.prompts - self.to_run


def run_batch(model: str, prompts_file: Path, out_path: Path, settings: BatchSettings, *,
              concepts_file: Path | None = None, extend: bool = False,
              retry_failed: bool = False, ray_address: str | None = None,
              workers: int | None = None, device: str = "cpu",
              on_start: Callable[[BatchOutcome], None] | None = None,
              on_result: Callable[[PromptResult, BatchOutcome], None] | None = None,
              ) -> BatchOutcome:
    """Run `settings`' analyses on every prompt of `prompts_file` into the store `out_path`,
    resuming it: the prompts stored for this run (same model file, same settings) are
    skipped, failed ones too unless `retry_failed`; each result is committed as it comes.

    Refused before the model is opened: a bad prompt or concepts file, a model file that
    is not a valid GGUF (locally), a store that is not one or holds other runs only (unless
    `extend`); then, before any prompt runs, a target that is not a token or a prompt id
    stored with another text. `ray_address`: on that Ray cluster, `workers` actors.
    `on_start` is called once the prompts to run are known, `on_result` after each is
    stored. A KeyboardInterrupt ends the run with `interrupted` set (the store keeps what
    was stored)."""
    from .prompt_sets import read_prompt_set, read_words

    items = read_prompt_set(prompts_file)
    concepts = read_words(concepts_file) if concepts_file is not None else None
    out_path = Path(out_path)
    if ray_address is None:  # each Ray worker resolves and reads the model itself
        from .layout import validate_file
        from .resolve import resolve_model

        path = resolve_model(model)
        validate_file(path)[0].close()
        model = str(path)
    if out_path.exists():  # a store from elsewhere is refused before the model is opened
        ResultStore(out_path).close()
    elif not out_path.parent.is_dir():
        raise GgufjacError(f"--out {out_path}: its directory {out_path.parent} does not exist")
    if ray_address is not None:
        from .ray_batch import RayExecutor

        executor = RayExecutor(ray_address, model, settings, workers, device)
    else:
        executor = LocalExecutor(model, settings, device)
    try:
        executor.check_targets(items)
        provenance = executor.provenance()
        store = ResultStore(out_path)
        try:
            run_id, stored = store.open_run(provenance, settings, extend)
            for item in items:
                if item.id in stored and stored[item.id][1] != item.prompt:
                    raise GgufjacError(f"{out_path}: prompt id {item.id!r} (line {item.line}) "
                                       "is stored with another prompt text; give it another "
                                       "id, or choose another --out")
        except BaseException:
            store.discard()
            raise
        try:
            if concepts is not None:
                store.set_concepts(concepts)
            skip = {i for i, (status, _) in stored.items()
                    if status == "done" or not retry_failed}
            todo = [it for it in items if it.id not in skip]
            outcome = BatchOutcome(out_path, run_id, len(items), len(todo))
            for it in items:
                if it.id in skip:
                    if stored[it.id][0] == "done":
                        outcome.done += 1
                    else:
                        outcome.failed += 1
            if on_start is not None:
                on_start(outcome)
            t0 = time.perf_counter()

            def write(result: PromptResult) -> None:
                if store.write(run_id, result):
                    status = result.status
                else:
                    status = "done"
                    outcome.kept_from_another_batch += 1
                if status == "done":
                    outcome.done += 1
                else:
                    outcome.failed += 1
                if on_result is not None:
                    on_result(result, outcome)

            try:
                executor.run(todo, write)
            except KeyboardInterrupt:
                outcome.interrupted = True
            outcome.seconds = time.perf_counter() - t0
        finally:
            store.close()
    finally:
        executor.close()
    return outcome
