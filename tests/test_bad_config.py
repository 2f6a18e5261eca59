"""Broken configs and damaged databases: one line naming the key path or the file, the right exit code,
no traceback, and nothing written where the owner said no.

Every case runs the real CLI as a subprocess (`world.cli`), as cron would.
"""
import os
import sqlite3
import stat
from pathlib import Path

import pytest
import yaml

from helpers import pause, sqlite_only


def one_line_error(p, code=2):
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    return lines[0]


def write_raw(world, text):
    world.config_path.write_bytes(text if isinstance(text, bytes) else text.encode())


# ----------------------------------------------------------------------------- hand-picked cases
def _set_key(world, dotted, raw_value):
    """The world's config with one key replaced by raw YAML text (so .nan and .inf stay YAML)."""
    node = world.config
    parts = dotted.split(".")
    for k in parts[:-1]:
        node = node.setdefault(k, {})
    node[parts[-1]] = "@@VALUE@@"
    return yaml.safe_dump(world.config, sort_keys=False).replace("'@@VALUE@@'", raw_value)


FILE_CASES = [  # whole-file problems: the line names the file
    ("", "empty config"),
    ("# only a comment\n", "empty config"),
    (b"linear: {api_url: \xff\xfe}\n", "not UTF-8"),
    ("linear:\n  timeout: 5\n  timeout: 6\n", "line 3: duplicate key 'timeout'"),
    ("a: &x [1, 2]\nb: *x\n", "YAML aliases (*name) are not allowed"),
]
KEY_CASES = [   # one bad key: the line names its key path
    ("linear.timeout", ".nan", "linear.timeout: expected a finite number, got nan"),
    ("linear.timeout", ".inf", "linear.timeout: expected a finite number, got inf"),
    ("linear.retry.attempts", "1.0e+30", "linear.retry.attempts: must be at most 1000"),
    ("codex.turn_timeout", "99999999999", "codex.turn_timeout: must be at most 604800"),
    ("projects", "[]", "projects: at least one project is required"),
]


@pytest.mark.parametrize("text, expected", FILE_CASES,
                         ids=["empty", "comment-only", "not-utf8", "duplicate-key", "alias"])
def test_a_broken_config_file_is_one_line_exit_2_naming_the_file(world, text, expected):
    write_raw(world, text)
    for cmd in ("tick", "status", "retry APP-1"):
        line = one_line_error(world.cli(*cmd.split()))
        assert expected in line and str(world.config_path) in line, line


@pytest.mark.parametrize("key, raw, expected", KEY_CASES, ids=["nan", "inf", "huge-attempts", "huge-timeout",
                                                              "no-projects"])
def test_a_bad_value_is_one_line_exit_2_naming_the_key(world, key, raw, expected):
    write_raw(world, _set_key(world, key, raw))
    for cmd in ("tick", "status"):
        line = one_line_error(world.cli(cmd))
        assert line.startswith(f"patchrelay: {expected}"), line


def test_an_alias_bomb_is_refused_before_it_expands(world):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    write_raw(world, bomb)
    line = one_line_error(world.cli("status", timeout=10))
    assert "YAML aliases" in line


@pytest.mark.parametrize("key, value, expected", [
    (("projects", 0, "worktree_root"), 5, "projects[0].worktree_root: expected a path, got a number"),
    (("projects", 0, "repo_path"), ["x"], "projects[0].repo_path: expected a path, got a list"),
    (("database", "path"), 7, "database.path: expected a path, got a number"),
])
def test_a_path_key_must_be_a_path(world, key, value, expected):
    node = world.config
    for k in key[:-1]:
        node = node.setdefault(k, {}) if isinstance(k, str) else node[k]
    node[key[-1]] = value
    world.write_config()
    assert one_line_error(world.cli("tick")) == f"patchrelay: {expected}"


# ----------------------------------------------------------------------------- generated wrong types
NUMERIC_KEYS = [("linear", "poll_overlap"), ("linear", "timeout"), ("github", "timeout"), ("github", "poll_interval"),
                ("github", "ci_repair_budget"), ("codex", "request_timeout"), ("codex", "stall_timeout"),
                ("runner", "max_concurrent_runs"), ("runner", "retry_budget"), ("runner", "hook_timeout")]
BOOL_KEYS = [("runner", "paused"), ("github", "auto_merge"), ("github", "draft_prs"), ("github", "use_gh_cli")]
WRONG = {"a list": [1], "a mapping": {"x": 1}, "a word": "soon", "a boolean": True}


@pytest.mark.parametrize("section, key", NUMERIC_KEYS + BOOL_KEYS)
@pytest.mark.parametrize("kind", list(WRONG))
def test_every_key_rejects_a_value_of_the_wrong_type_by_its_path(world, section, key, kind):
    value = WRONG[kind]
    is_bool = (section, key) in BOOL_KEYS
    if is_bool and kind == "a boolean":
        value = 3
    world.config.setdefault(section, {})[key] = value
    world.write_config()
    line = one_line_error(world.cli("tick"))
    assert line.startswith(f"patchrelay: {section}.{key}: "), line


# ----------------------------------------------------------------------------- the database
@sqlite_only("database.path names the SQLite file; on PostgreSQL reads never open it")
def test_database_path_at_a_directory_or_under_a_file_is_a_config_error(world):
    d = world.tmp / "dbdir"
    d.mkdir()
    world.config["database"]["path"] = str(d)
    world.write_config()
    line = one_line_error(world.cli("tick"))
    assert "database.path" in line and "is a directory" in line
    f = world.tmp / "afile"
    f.write_text("x")
    world.config["database"]["path"] = str(f / "db.sqlite")
    world.write_config()
    for cmd in (["tick"], ["status"], ["list"]):           # reads name the bad path too, not "no database yet"
        line = one_line_error(world.cli(*cmd))
        assert "database.path" in line and "which is a file" in line, (cmd, line)


@sqlite_only("the SQLite file cannot be created under /proc; on PostgreSQL the database exists")
def test_a_database_where_nothing_can_be_created_is_one_line(world):
    # /proc refuses new files even to root: the tick's lock file cannot be made next to the database
    world.config["database"]["path"] = "/proc/patchrelay.sqlite"
    world.write_config()
    for cmd in (["tick"], ["retry", "APP-1"]):
        line = one_line_error(world.cli(*cmd), 1)
        assert "/proc/patchrelay" in line, (cmd, line)


@sqlite_only("a read-only SQLite file")
def test_a_read_only_database_is_respected_and_never_made_writable(world):
    pause(world)
    world.delegate()
    world.tick_subprocess()
    db = Path(world.config["database"]["path"])
    os.chmod(db, 0o444)
    try:
        for cmd in (["tick"], ["retry", "APP-1"]):       # as root too: the owner's choice is respected
            p = world.cli(*cmd)
            line = one_line_error(p, 1)
            assert "read-only" in line and str(db) in line
        assert stat.S_IMODE(db.stat().st_mode) == 0o444        # nothing made it writable again
        assert world.cli("status", "--json").returncode == 0    # reading is fine
        import json                                             # doctor says so, and still checks the file
        checks = {c["scope"]: c for c in json.loads(world.cli("doctor", "--json").stdout)["checks"]}
        assert checks["database"]["level"] == "FAIL"
        assert "read-only" in checks["database"]["message"] and "quick_check ok" in checks["database"]["message"]
    finally:
        os.chmod(db, 0o600)


def _tracked_database(world, n, title_len):
    """A paused world tracking `n` delegated issues; the database checkpointed into its main file, and an
    open connection to it."""
    pause(world)
    for i in range(n):
        world.linear.add_issue(world.team, f"Issue {i} " + "x" * title_len, delegate=world.app, creator=world.alice)
    world.tick_subprocess()
    db = Path(world.config["database"]["path"])
    con = sqlite3.connect(str(db))
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db, con


@sqlite_only("corrupts the SQLite file's pages")
def test_a_database_with_corrupt_pages_is_one_line_everywhere_and_doctor_says_so(world):
    db, con = _tracked_database(world, 30, 300)
    con.close()
    data = bytearray(db.read_bytes())
    page = 4096
    for i in range(2 * page, len(data), page):       # every page after the first two: garbage
        data[i + 8:i + 200] = os.urandom(192)
    db.write_bytes(bytes(data))
    for cmd in (["tick"], ["status"], ["show", "APP-1"], ["retry", "APP-1"], ["doctor"]):
        p = world.cli(*cmd)
        assert "Traceback" not in p.stdout + p.stderr, (cmd, p.stderr)
        assert p.returncode == 1, (cmd, p.returncode, p.stdout, p.stderr)
        if cmd != ["doctor"]:
            assert len([ln for ln in p.stderr.splitlines() if ln.strip()]) >= 1
            assert str(db) in p.stderr, (cmd, p.stderr)
    p = world.cli("doctor", "--json")
    import json
    checks = {c["scope"]: c for c in json.loads(p.stdout)["checks"]}
    assert checks["database"]["level"] == "FAIL"


@sqlite_only("damages an index page of the SQLite file (PRAGMA quick_check)")
def test_an_operator_write_to_a_database_damaged_off_to_the_side_is_refused(world):
    """Only an index is damaged: APP-1's row still reads, but pause and retry write nothing into the file."""
    db, con = _tracked_database(world, 40, 200)
    pages = [r[0] for r in con.execute("SELECT rootpage FROM sqlite_master WHERE type = 'index' AND rootpage > 0 "
                                       "AND name IN ('events_at', 'seen_at')")]
    page = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    assert pages
    data = bytearray(db.read_bytes())
    for root in pages:
        at = (root - 1) * page
        data[at + 8:at + page] = os.urandom(page - 8)
    db.write_bytes(bytes(data))
    before = db.read_bytes()
    assert world.cli("show", "APP-1").returncode == 0            # the damage is off to the side
    for cmd in (["retry", "APP-1"], ["pause", "APP-2", "--reason", "x"], ["stop", "APP-1"]):
        line = one_line_error(world.cli(*cmd), 1)
        assert "damaged" in line and str(db) in line, (cmd, line)
    assert db.read_bytes() == before                              # nothing was written
    assert not Path(str(db) + "-wal").exists() or Path(str(db) + "-wal").stat().st_size == 0


@sqlite_only("a read-only SQLite file of an older schema (PRAGMA user_version)")
def test_a_read_only_database_of_an_older_schema_is_read_without_migrating_it(world):
    pause(world)
    world.delegate()
    world.tick_subprocess()
    db = Path(world.config["database"]["path"])
    con = sqlite3.connect(str(db))
    with con:                                   # as a database from before token spend was recorded
        con.execute("DROP INDEX runs_claimed_at")
        con.execute("ALTER TABLE runs DROP COLUMN tokens_spent")
        con.execute("PRAGMA user_version = 7")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    os.chmod(db, 0o444)
    try:
        import json
        st = json.loads(world.cli("status", "--json", check=0).stdout)
        assert [i["key"] for i in st["issues"]] == ["APP-1"] and st["tokens"]["today"] == 0
        assert world.cli("why", "APP-1", "--json").returncode == 0
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        assert con.execute("PRAGMA user_version").fetchone()[0] == 7       # not migrated behind the owner's back
        con.close()
        assert stat.S_IMODE(db.stat().st_mode) == 0o444
    finally:
        os.chmod(db, 0o600)


def test_a_config_error_naming_a_token_key_is_not_redacted(world):
    world.config["linear"]["token"] = "x"
    world.write_config()
    line = one_line_error(world.cli("status"))
    assert line.startswith("patchrelay: linear.token: ") and "[redacted]" not in line, line
