"""Helpers shared by the test modules: drive the real `patchrelay` CLI against the `world` fixture
(conftest.py), script the fake model, read PatchRelay's database and wait for its runs, and look at what
reached the origin repository and the fake Linear.

Test modules import their shared helpers from here (never from another test module). Building the
outside world itself (the Codex binary, CODEX_HOME, the git repositories) stays in fakes/world.py.
"""
import json
import os
import random
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from graphql import OperationDefinitionNode, parse, print_ast

import patchrelay
from fakes.world import git

# PATCHRELAY_TEST_SUBPROCESS=1 runs every tick_inproc/tick_result as a subprocess, exactly as cron does
SUBPROCESS_TICKS = os.environ.get("PATCHRELAY_TEST_SUBPROCESS") == "1"
BRANCH = "app/APP-1-add-a-greeting"     # the branch of APP-1 delegated with world.delegate()'s default title
# PATCHRELAY_TEST_DATABASE=postgres runs every `world` on PostgreSQL (conftest.py); tests of SQLite's file itself
# (its permissions, a damaged or read-only file, "no database yet") are skipped there with `sqlite_only(why)`
ON_POSTGRES = os.environ.get("PATCHRELAY_TEST_DATABASE") == "postgres"


def sqlite_only(why):
    """Mark a test of the SQLite file itself: skipped when the worlds run on PostgreSQL."""
    return pytest.mark.skipif(ON_POSTGRES, reason=f"SQLite only: {why}")


# ----------------------------------------------------------------------------- the CLI, in this process
def cli_inproc(world, *args, env=None):
    """A patchrelay command: the same click CLI, run in this process (a click Result)."""
    return CliRunner().invoke(patchrelay.cli, ["--config", str(world.config_path), *map(str, args)],
                              env=world.env(**(env or {})))


def tick_inproc(world, *args, env=None, check=0):
    """`patchrelay tick ARGS` run by the click CLI in this process (a subprocess when
    PATCHRELAY_TEST_SUBPROCESS=1) -> CompletedProcess; fails unless it exits `check`.
    `world.tick_subprocess` always runs a real process."""
    if SUBPROCESS_TICKS:
        return world.cli("tick", *args, env=env, check=check)
    r = cli_inproc(world, "tick", *args, env=env)
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert check is None or r.exit_code == check, f"tick exited {r.exit_code}, wanted {check}\n{r.output}"
    return subprocess.CompletedProcess(["tick", *args], r.exit_code, r.stdout, r.stderr)


def tick_result(world):
    """One tick, however it ends: (exit code, stdout, stderr, exception raised in this process or None)."""
    if SUBPROCESS_TICKS:
        p = world.cli("tick")
        return p.returncode, p.stdout, p.stderr, None
    r = cli_inproc(world, "tick")
    exc = r.exception if r.exception and not isinstance(r.exception, SystemExit) else None
    return r.exit_code, r.stdout, r.stderr, exc


def status(world):
    r = cli_inproc(world, "status", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def tracked(world):
    """{key: status entry} of `patchrelay status --json`."""
    return {i["key"]: i for i in status(world)["issues"]}


def show(world, key):
    r = cli_inproc(world, "show", key, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def show_untracked(world, key):
    """`show KEY` for an issue PatchRelay saw but does not track: exit 0, "not tracked", and what it saw."""
    r = cli_inproc(world, "show", key)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"{key}: not tracked by PatchRelay"), r.stdout
    return r.stdout


# ----------------------------------------------------------------------------- set-ups
def pause(world):
    """Track and acknowledge, launch nothing (the config as edited so far is written)."""
    world.config["runner"]["paused"] = True
    world.write_config()


def user_mode(world):
    """User mode with a personal API key of Uma's and a `PatchRelay` label: (uma, label, env for the CLI)."""
    token = "lin_api_umaPersonalKey0123456789"
    uma = world.linear.add_user("Uma User", email="uma@acme.test", token=token)
    label = world.linear.add_label("PatchRelay", team=world.team)
    world.config["linear"]["mode"] = "user"
    world.write_config()
    return uma, label, {"LINEAR_API_KEY": token}


def finished_issue(world):
    """A paused world with APP-1 delegated, tracked, then moved to Done in Linear: (issue, session)."""
    pause(world)
    issue, session = world.delegate()
    tick_inproc(world)
    world.linear.update_issue(issue, state="Done")
    tick_inproc(world)
    assert tracked(world)["APP-1"]["factory_state"] == "done"
    return issue, session


# ----------------------------------------------------------------------------- fake model script steps
def tool(cmd):
    return {"kind": "tool_call", "cmd": cmd}


def say(text):
    return {"kind": "message", "text": text}


def held(gate, then):
    """Hold the model request at `gate`; once opened, answer with `then` (never takes a script step)."""
    return {"kind": "wait", "event": gate, "then": then}


# ----------------------------------------------------------------------------- PatchRelay's database
# SQLite's file under the state directory, or the PostgreSQL database whose URL the `world` fixture wrote to
# `state / "pg-url"` (PATCHRELAY_TEST_DATABASE=postgres); the SQL is PatchRelay's shared dialect (`?` params).
def pg_url(state_dir):
    """The URL of the world's PostgreSQL database, or None when it runs on SQLite."""
    p = Path(state_dir) / "pg-url"
    return p.read_text().strip() if p.exists() else None


def pg_connect(url):
    """A psycopg connection (rows as dicts, in a transaction) to the world's database; the password comes from
    PGPASSWORD, which the `world` fixture set in os.environ."""
    import psycopg
    from psycopg.rows import dict_row
    return psycopg.connect(url, row_factory=dict_row, connect_timeout=10, application_name="patchrelay-tests")


def _db_errors():
    try:
        import psycopg
    except ImportError:
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)


DB_ERRORS = _db_errors()     # what reading the database (db_rows) may raise: sqlite3's errors and psycopg's


def _pg_args(args):
    return tuple(int(a) if isinstance(a, bool) else a for a in args)     # as PatchRelay's PgConnection does


def db_rows(state_dir, sql, args=()):
    """A read of PatchRelay's database under `state_dir` (read-only, one snapshot): rows as dicts; [] while
    the database does not exist yet (reading never creates it)."""
    url = pg_url(state_dir)
    if url:
        with pg_connect(url) as con:
            con.read_only = True
            try:
                if con.execute("SELECT to_regclass('patchrelay_schema') AS t").fetchone()["t"] is None:
                    return []       # no PatchRelay has opened the database yet
                return con.execute(patchrelay.pg_sql(sql), _pg_args(args)).fetchall()
            finally:
                con.rollback()
    path = Path(state_dir) / "patchrelay.sqlite"
    if not path.exists():
        return []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, args)]
    finally:
        con.close()


def db_snapshot(state_dir, queries):
    """Several reads of PatchRelay's database under `state_dir` in one read-only transaction (one snapshot):
    {name: rows as dicts} for {name: sql}; every list empty while the database does not exist yet."""
    url = pg_url(state_dir)
    if url:
        import psycopg
        with pg_connect(url) as con:
            con.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ       # one snapshot for all reads
            con.read_only = True
            try:
                if con.execute("SELECT to_regclass('patchrelay_schema') AS t").fetchone()["t"] is None:
                    return {name: [] for name in queries}
                return {name: con.execute(patchrelay.pg_sql(sql)).fetchall() for name, sql in queries.items()}
            finally:
                con.rollback()
    path = Path(state_dir) / "patchrelay.sqlite"
    if not path.exists():
        return {name: [] for name in queries}
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, isolation_level=None)
    con.row_factory = sqlite3.Row
    try:
        con.execute("BEGIN")
        out = {name: [dict(r) for r in con.execute(sql)] for name, sql in queries.items()}
        con.execute("COMMIT")
        return out
    finally:
        con.close()


def last_events(state_dir, n=40):
    """The last n events, oldest first, one line each, for failure messages."""
    rows = db_rows(state_dir, "SELECT at, issue_key, run_id, level, kind, message FROM events ORDER BY id DESC "
                              "LIMIT ?", (n,))
    return ["last events:"] + [f"  {r['at'][11:23]} {r['issue_key']} run {r['run_id']} {r['level']} "
                               f"{r['kind']}: {r['message'][:200]}" for r in reversed(rows)]


def db_exec(state_dir, sql, args=()):
    """One write to PatchRelay's database under `state_dir`, committed (a test arranging a state). On
    PostgreSQL under PatchRelay's write lock, as its own write transactions are (SQLite has one writer)."""
    url = pg_url(state_dir)
    if url:
        with pg_connect(url) as con:        # commits on leaving the block, rolls back on an exception
            con.execute("SELECT pg_advisory_xact_lock(%s)", (patchrelay.PG_WRITE_LOCK,))
            con.execute(patchrelay.pg_sql(sql), _pg_args(args))
        return
    con = sqlite3.connect(str(Path(state_dir) / "patchrelay.sqlite"), timeout=10)
    try:
        with con:
            con.execute(sql, args)
    finally:
        con.close()


def db_dump(state_dir):
    """Everything in PatchRelay's database under `state_dir` as text (SQLite's dump; on PostgreSQL every row of
    every table, one line each), to look for what must never be stored."""
    url = pg_url(state_dir)
    if url:
        with pg_connect(url) as con:
            con.read_only = True
            lines = []
            for t in con.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                                 "ORDER BY tablename").fetchall():
                name = t["tablename"]
                lines += [f"{name}: " + " | ".join(str(v) for v in r.values())
                          for r in con.execute(f'SELECT * FROM "{name}"').fetchall()]
            con.rollback()
            return "\n".join(lines)
    path = Path(state_dir) / "patchrelay.sqlite"
    if not path.exists():
        return ""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return "\n".join(con.iterdump())
    finally:
        con.close()


def db(world, sql, args=()):
    return db_rows(world.state, sql, args)


def runs(world):
    return db(world, "SELECT * FROM runs ORDER BY id")


def issue_row(world, key="APP-1"):
    rows = db(world, "SELECT * FROM issues WHERE key = ?", (key,))
    return rows[0] if rows else None


# ----------------------------------------------------------------------------- runs
def logs(world):
    """Every worker and app-server log, for failure messages."""
    d = world.state / "logs"
    if not d.is_dir():
        return "(no logs)"
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(d.iterdir()))


def wait_done(world, key="APP-1", timeout=45):
    """Until the issue has neither an active nor a pending run and every worker of it has exited (a worker
    publishes to Linear after recording the run's end). SQLite only; no tick. Returns show --json."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = issue_row(world, key)
        if r and not r["active_run_id"] and not r["pending_run_type"] and not any(
                patchrelay.process_alive(x["worker_pid"], x["worker_started"])
                for x in db(world, "SELECT worker_pid, worker_started FROM runs WHERE issue_id = ?", (r["id"],))):
            # a key no person could type (from a hostile Linear team key): `show` refuses it; read the row
            return world.show(key) if patchrelay.ISSUE_KEY_RE.fullmatch(key) else {"issue": r}
        time.sleep(0.2)
    raise AssertionError(f"{key}: run not finished within {timeout}s\nruns: {runs(world)}\n{logs(world)}")


# ----------------------------------------------------------------------------- the fake Linear
def acts(world, session):
    """(type, body) of every activity of the session."""
    return [(a["content"]["type"], a["content"].get("body") or "") for a in world.linear.activities(session)]


def bodies(world, session, kind):
    return [b for t, b in acts(world, session) if t == kind]


# ----------------------------------------------------------------------------- git (the origin repository)
# git itself (fakes.world.git) is imported above; tests take it from here with the rest.
def remote_branches(bare):
    """{branch name: commit sha} of the heads in a (bare) repository."""
    out = git(bare, "for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads")
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


def file_at(bare, ref, path):
    """Content of `path` at `ref` in the repository `bare`, or None when it does not exist there."""
    proc = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=str(bare), capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


# ----------------------------------------------------------------------------- GraphQL example files
def ops_in(path):
    """{operation name: document text} for every operation in an example file."""
    doc = parse(path.read_text())
    return {d.name.value: print_ast(d) for d in doc.definitions if isinstance(d, OperationDefinitionNode)}


# ----------------------------------------------------------------------------- the GitHub loop
def drive(world, predicate, what, ticks=40, timeout=150):
    """Tick (waiting for workers between ticks) until predicate(show) holds; returns show --json."""
    deadline = time.time() + timeout
    for _ in range(ticks):
        out = world.tick_subprocess()
        s = wait_done(world, timeout=max(5, deadline - time.time()))
        if predicate(s):
            return s
        assert time.time() < deadline, f"timed out waiting for {what}"
    raise AssertionError(f"{what} never happened; last state {s['issue']['factory_state']}\n"
                         f"last tick: {out.stdout}{out.stderr}\nruns: {runs(world)}\n{logs(world)}")


def bobs_clone(world, name="other-clone"):
    """Bob's own clone of origin (made once), for the pushes people make."""
    clone = world.tmp / name
    if not clone.exists():
        git(world.tmp, "clone", "-q", str(world.bare), clone)
        git(clone, "config", "user.email", "bob@acme.test")
        git(clone, "config", "user.name", "Bob")
    return clone


def push_to_main(world, name, content):
    """Someone merges another change into main."""
    other = bobs_clone(world)
    git(other, "pull", "-q", "origin", "main")
    (other / name).write_text(content)
    git(other, "add", name)
    git(other, "commit", "-q", "-m", f"Add {name}")
    git(other, "push", "-q", "origin", "HEAD:main")


# ----------------------------------------------------------------------------- property tests
def drawn_seed():
    """The random seed of a property test: PATCHRELAY_PROPERTY_SEED, else one per test run (every pytest-xdist
    worker of the run draws the same)."""
    if os.environ.get("PATCHRELAY_PROPERTY_SEED"):
        return int(os.environ["PATCHRELAY_PROPERTY_SEED"])
    # Every pytest-xdist worker collects the tests and must see the same ids: derive the seed from the
    # test run's uid, which all workers of one run share.
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if uid:
        return int(uuid.UUID(hex=uid)) % 1_000_000
    return random.SystemRandom().randrange(1_000_000)
