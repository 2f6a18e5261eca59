"""The PostgreSQL test harness itself (tests/pg.py, the `pg` and `pg_url` fixtures): a real server that
demands the password, one fresh database per test, never run as root, and errors that say what to do."""
import os
import pwd
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

import pg as pglib


def _dbname(url):
    return urlsplit(url).path.lstrip("/")


def test_fresh_databases_are_independent(pg):
    a, b = pg.create_database(), pg.create_database()
    try:
        assert a != b and urlsplit(a).port == urlsplit(b).port == pg.port
        pg.psql(_dbname(a), "CREATE TABLE items (x int); INSERT INTO items VALUES (1), (2)")
        assert pg.psql(_dbname(a), "SELECT x FROM items ORDER BY x") == [(1,), (2,)]
        assert pg.psql(_dbname(b), "SELECT to_regclass('public.items')") == [(None,)]
        with pytest.raises(psycopg.errors.UndefinedTable):
            pg.psql(_dbname(b), "SELECT x FROM items")
    finally:
        pg.drop_database(a)
        pg.drop_database(b)
    names = {r[0] for r in pg.psql("postgres", "SELECT datname FROM pg_database")}
    assert not names & {_dbname(a), _dbname(b)}


def test_pg_url_needs_the_password_from_the_environment(pg, pg_url, monkeypatch, tmp_path):
    parts = urlsplit(pg_url)
    assert (parts.scheme, parts.username, parts.password, parts.hostname, parts.port) == \
        ("postgresql", "patchrelay", None, "127.0.0.1", pg.port)
    assert pg.password not in pg_url
    assert os.environ["PGPASSWORD"] == pg.password == pg.env()["PGPASSWORD"]

    # the fixture's PGPASSWORD is what lets a client in
    with psycopg.connect(pg_url, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == \
            ("patchrelay", _dbname(pg_url))
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)

    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))     # no ~/.pgpass to fall back on
    monkeypatch.delenv("PGPASSWORD")
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(pg_url, connect_timeout=10)
    monkeypatch.setenv("PGPASSWORD", pg.password + "-wrong")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg_url, connect_timeout=10)


def _proc_uid(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])    # the real uid
    raise AssertionError(f"no Uid line for pid {pid}")


def test_server_does_not_run_as_root(pg):
    with pg.connect() as conn:
        data_dir, backend = conn.execute("SELECT current_setting('data_directory'), pg_backend_pid()").fetchone()
        backend_uid = _proc_uid(backend)
    want = pwd.getpwnam(pg.os_user).pw_uid if os.geteuid() == 0 else os.geteuid()
    assert Path(data_dir) == pg.data
    assert os.stat(data_dir).st_uid == backend_uid == _proc_uid(pg.pid) == want
    if os.geteuid() == 0:
        assert want != 0 and pg.os_user in ("postgres", "nobody")


def test_missing_binaries_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(pglib, "SEARCH_GLOB", str(tmp_path / "postgresql" / "*" / "bin"))
    with pytest.raises(RuntimeError) as e:
        pglib.PgServer().start()
    msg = str(e.value)
    assert "\n" not in msg and "initdb" in msg
    assert "run .ci/run, which installs Debian's postgresql package" in msg


def test_a_server_that_does_not_start_shows_its_log_and_leaves_nothing(monkeypatch):
    broken = pglib.PgServer(settings={"shared_buffers": "lots"})
    made = []
    real_mkdtemp = pglib.tempfile.mkdtemp

    def mkdtemp(**kw):
        made.append(real_mkdtemp(**kw))
        return made[-1]
    monkeypatch.setattr(pglib.tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(RuntimeError) as e:
        broken.start()
    msg = str(e.value)
    assert "did not start" in msg and 'invalid value for parameter "shared_buffers"' in msg
    assert len(made) == 1 and not os.path.exists(made[0]) and not broken.running
