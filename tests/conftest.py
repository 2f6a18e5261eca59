"""Shared fixtures: a world of real parts around the real `patchrelay` CLI.

`world` gives a temp directory with a fake Linear (schema-validating GraphQL), a git
repository whose `origin` is a bare repo, a fake model provider for the real Codex CLI,
a config file, and `world.cli(...)` which runs `patchrelay.py` as a subprocess exactly
as cron would.

`pg` is a real PostgreSQL server (tests/pg.py), one per test process (pytest-xdist worker), and `pg_url`
a fresh empty database on it for one test, with PGPASSWORD set for the test (the URL has no password).

The `world` runs on SQLite unless PATCHRELAY_TEST_DATABASE=postgres is set or the test is marked
`@pytest.mark.postgres`: then it gets a fresh database on the `pg` server (started on first use), as
`database.url` in its config (database.path stays: logs and lock files go beside it), PGPASSWORD in
`world.env()` and in this process's environment, and its URL in `world.state / "pg-url"`, where
helpers.db_rows / db_exec find it.
"""
import json
import os
import py_compile
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fakes.github import FakeGitHub
from fakes.linear import FakeLinear
from fakes.model import FakeModel
from fakes import world as worldlib
from pg import pg_server

ROOT = Path(__file__).resolve().parent.parent
PATCHRELAY = ROOT / "patchrelay.py"
APP_TOKEN = "lin_oauth_apptoken123"
GH_TOKEN = "ghp_testtoken0000000000000000000000"
GH_LOGIN = "patchrelay-bot"

# Workers import patchrelay as a module: its bytecode, cached once here, is read even where
# PYTHONDONTWRITEBYTECODE keeps Python from writing it (as an installed patchrelay's is), so no worker
# spends half a second of CPU compiling the file again.
py_compile.compile(str(PATCHRELAY), doraise=True)


class World:
    def __init__(self, tmp_path: Path, linear: FakeLinear, github: FakeGitHub | None = None):
        self.tmp = tmp_path
        self.linear = linear
        self.github = github
        self.model = None
        self.app = linear.add_user("PatchRelay", app=True, token=APP_TOKEN)
        self.alice = linear.add_user("Alice Smith", email="alice@acme.test")
        self.mallory = linear.add_user("Mallory", email="mallory@evil.test")
        self.team = linear.add_team("APP")
        self.bare, self.repo = worldlib.make_origin(tmp_path)
        if github is not None:
            github.add_repo("acme/app", self.bare)
        self.state = tmp_path / "state"
        self.database_url = None        # the PostgreSQL database's URL, when the world runs on one
        self.db_env = {}                # what a client needs besides the URL (PGPASSWORD)
        self.config_path = tmp_path / "patchrelay.yaml"
        self.config = {
            "linear": {"api_url": linear.url, "retry": {"attempts": 2, "max_wait": 0.2}, "poll_overlap": 5},
            "github": {**({"api_url": github.api_url, "graphql_url": github.graphql_url} if github else {}),
                       "use_gh_cli": False, "poll_interval": 0, "review_quiet_seconds": 0,
                       "retry": {"attempts": 2, "max_wait": 0.2}},
            "database": {"path": str(self.state / "patchrelay.sqlite")},
            "codex": {"bin": "codex-not-configured", "home": str(tmp_path / "codex-home")},
            "runner": {"max_concurrent_runs": 2, "retry_backoff": 0, "inbox_poll_interval": 0.2},
            "projects": [{
                "id": "app", "repo_path": str(self.repo), "github_repo": "acme/app", "base_branch": "main",
                "worktree_root": str(tmp_path / "worktrees"), "issue_key_prefixes": ["APP"],
            }],
        }
        self.write_config()

    # ---- config
    def write_config(self, **sections):
        for k, v in sections.items():
            self.config[k] = v
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def use_codex(self, script=(), **codex_overrides):
        """Point PatchRelay at the real Codex CLI and a fake model with this script."""
        if self.model is None:
            self.model = FakeModel(list(script)).start()
        else:
            self.model.push(*script)
        home = self.tmp / "codex-home"
        self.codex_env = worldlib.write_codex_home(home, self.model.base_url)
        self.config["codex"] = {"bin": worldlib.codex_bin(), "home": str(home), **codex_overrides}
        self.write_config()
        return self.model

    # ---- running the CLI
    def env(self, **extra):
        env = dict(os.environ)
        env.update({"LINEAR_API_KEY": APP_TOKEN, "XDG_CONFIG_HOME": str(self.tmp / "xdg-config"),
                    "XDG_STATE_HOME": str(self.tmp / "xdg-state"), "XDG_DATA_HOME": str(self.tmp / "xdg-data"),
                    "FAKE_API_KEY": "fake-key", "GITHUB_TOKEN": GH_TOKEN})
        env.pop("PATCHRELAY_CONFIG", None)
        env.update(self.db_env)
        env.update(extra)
        return {k: v for k, v in env.items() if v is not None}

    def cli_argv(self, *args, config=True):
        return [sys.executable, str(PATCHRELAY)] + (["--config", str(self.config_path)] if config else []) \
            + [str(a) for a in args]

    def cli(self, *args, env=None, timeout=120, check=None, config=True):
        argv = self.cli_argv(*args, config=config)
        p = subprocess.run(argv, capture_output=True, text=True, env=self.env(**(env or {})), timeout=timeout)
        if check is not None and p.returncode != check:
            raise AssertionError(f"patchrelay {' '.join(map(str, args))} exited {p.returncode}, wanted {check}\n"
                                 f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
        return p

    def tick_subprocess(self, *args, check=0):
        """`patchrelay tick ARGS` as a real process, exactly as cron runs it; fails unless it exits `check`.
        (helpers.tick_inproc runs the same CLI in the test process.)"""
        return self.cli("tick", *args, check=check)

    def status(self):
        return json.loads(self.cli("status", "--json", check=0).stdout)

    def show(self, key):
        return json.loads(self.cli("show", key, "--json", check=0).stdout)

    def issue_state(self, key):
        return self.show(key)["issue"]["factory_state"]

    def wait_for(self, predicate, timeout=60, interval=0.3, what="condition"):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value {last!r}")

    def wait_run_done(self, key, timeout=90):
        """Tick until the issue has no active or pending run (workers are detached)."""
        def done():
            s = self.show(key)
            return s if not s["issue"]["active_run"] and not s["issue"]["pending_run"] else None
        return self.wait_for(done, timeout=timeout, what=f"{key} run to finish")

    # ---- Linear helpers
    def delegate(self, title="Add a greeting", description="Please add hello.txt", body="please do it",
                 creator=None):
        """Delegate an issue to the app the way Linear does: delegate set + a new agent session."""
        creator = creator or self.alice
        issue = self.linear.add_issue(self.team, title, description=description, delegate=self.app,
                                      creator=creator)
        session = self.linear.add_session(issue, creator, self.app, body=body)
        return issue, session

    def activity_types(self, session):
        return [a["content"]["type"] for a in self.linear.activities(session)]


@pytest.fixture
def linear():
    fake = FakeLinear().start()
    yield fake
    assert fake.validation_errors == [], f"GraphQL documents the real Linear API would reject: " \
                                         f"{fake.validation_errors}"
    fake.stop()


@pytest.fixture
def github():
    fake = FakeGitHub(tokens={GH_TOKEN: GH_LOGIN}).start()
    yield fake
    assert fake.validation_errors == [], f"GitHub requests the real API would reject: {fake.validation_errors}"
    fake.stop()


def on_postgres(request) -> bool:
    """Whether this test's world runs on PostgreSQL: PATCHRELAY_TEST_DATABASE=postgres, or the test is marked
    `@pytest.mark.postgres`."""
    return os.environ.get("PATCHRELAY_TEST_DATABASE") == "postgres" or \
        request.node.get_closest_marker("postgres") is not None


def _use_postgres(w: World, request, monkeypatch):
    """Point the world at a fresh database on the `pg` server (started only now: SQLite tests never start
    one); its URL (the database to drop)."""
    server = request.getfixturevalue("pg")
    url = server.create_database()
    monkeypatch.setenv("PGPASSWORD", server.password)       # helpers.db_rows and in-process CLIs connect too
    monkeypatch.delenv("PATCHRELAY_DATABASE_URL", raising=False)
    w.database_url, w.db_env = url, server.env()
    w.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    (w.state / "pg-url").write_text(url + "\n")
    w.config["database"]["url"] = url
    w.write_config()
    return server, url


@pytest.fixture
def world(tmp_path, linear, github, request, monkeypatch):
    w = World(tmp_path, linear, github)
    server, url = _use_postgres(w, request, monkeypatch) if on_postgres(request) else (None, None)
    yield w
    # Never leave detached workers or app-servers behind.
    subprocess.run(["pkill", "-f", str(tmp_path)], capture_output=True)
    if w.model is not None:
        w.model.stop()
    if server is not None:
        server.drop_database(url)       # WITH (FORCE): a worker still dying loses its connection


@pytest.fixture(scope="session")
def pg():
    """A real PostgreSQL server for the session (one per pytest-xdist worker): tests/pg.py's PgServer."""
    server = pg_server()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg, monkeypatch):
    """A fresh, empty database on the `pg` server for this test: its URL (no password in it); PGPASSWORD is
    set in os.environ for the test, so `patchrelay` subprocesses started with it inherit the password."""
    url = pg.create_database()
    monkeypatch.setenv("PGPASSWORD", pg.password)
    yield url
    pg.drop_database(url)
