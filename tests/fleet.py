"""A fleet of PatchRelay hosts around one world (tests/conftest.py `World`): a harness, no tests.

Each host `hN` is what README "Running a fleet" asks of a member: its own clone of the world's bare origin
(projects[].repo_path), its own worktree_root, CODEX_HOME, HOME and XDG directories, its own state directory
(database.path: logs and lock files), and a config with the world's linear/github/projects sections plus
`runner.host: hN` and `database.url` (the shared PostgreSQL; the password comes from PGPASSWORD).

    fleet = Fleet(world, 3, max_runs=2)        # world on PostgreSQL (world.database_url), world.model set
    fleet.start()                              # `patchrelay watch --interval 0.5` per host, own session each
    fleet.kill9("h2")                          # SIGKILL h2's watch and every worker / app-server it started
    fleet.host("h2").start()                   # the same config again: it rejoins
    fleet.shutdown()                           # SIGKILL everything every host started

`make_world(tmp, server)` builds a standalone world on a fresh database of a tests/pg.py server (for the
benches; tests use the `world` fixture marked `postgres`). `query(sql, args)` reads the shared database
(psycopg, `%s` placeholders, rows as dicts).
"""
import copy
import datetime as dt
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

import patchrelay
from fakes import world as worldlib

MARKER = "PATCHRELAY_FLEET_MEMBER"     # in every process a host starts (inherited): kill9 finds them by it


def _pids_with_marker(value):
    """Pids of this user's processes whose environment has MARKER=value (workers, app-servers, their shells)."""
    want = f"{MARKER}={value}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if want in env.split(b"\0"):
            found.append(int(d.name))
    return found


def _kill_group_or_pid(pid, started=None):
    """SIGKILL pid's process group (workers and app-servers lead their own) and pid; only while pid is still
    the process that started at `started` (kernel start time), when given. True when a signal was sent."""
    if not pid or (started is not None and not patchrelay.process_alive(pid, started)):
        return False
    sent = False
    for fn, target in ((os.killpg, pid), (os.kill, pid)):
        try:
            fn(target, signal.SIGKILL)
            sent = True
        except (ProcessLookupError, PermissionError):
            pass
    return sent


class Host:
    """One member of the fleet: its directories, config, environment and `watch` process."""

    def __init__(self, fleet, index):
        self.fleet = fleet
        self.name = f"h{index}"
        self.dir = fleet.root / self.name
        self.repo = self.dir / "repo"
        self.state = self.dir / "state"
        self.codex_home = self.dir / "codex-home"
        self.config_path = self.dir / "patchrelay.yaml"
        self.proc = None
        self.starts = 0          # how many times start() ran; each start appends to watch-N.log
        self.killed_at = None    # time.time() of the last kill9
        self.pids = []           # the pid of every watch process started

    # ---- set-up
    def build(self):
        world, fleet = self.fleet.world, self.fleet
        self.dir.mkdir(parents=True, exist_ok=True)
        worldlib.git(self.dir, "clone", "-q", str(world.bare), self.repo)
        for key, value in worldlib.GIT_IDENTITY.items():
            worldlib.git(self.repo, "config", key, value)
        worldlib.write_codex_home(self.codex_home, fleet.model.base_url)
        cfg = copy.deepcopy(world.config)
        cfg["database"] = {"path": str(self.state / "patchrelay.sqlite"), "url": fleet.database_url}
        cfg["codex"] = {**cfg.get("codex", {}), "bin": worldlib.codex_bin(), "home": str(self.codex_home)}
        cfg["runner"] = {**cfg.get("runner", {}), "host": self.name, "max_concurrent_runs": fleet.max_runs,
                         "host_timeout": fleet.host_timeout, "retry_backoff": 0}
        project = dict(cfg["projects"][0])
        project.update(repo_path=str(self.repo), worktree_root=str(self.dir / "worktrees"))
        cfg["projects"] = [project]
        self.config = cfg
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return self

    def env(self):
        d = self.dir
        return self.fleet.world.env(
            HOME=str(d / "home"), XDG_CONFIG_HOME=str(d / "xdg-config"), XDG_STATE_HOME=str(d / "xdg-state"),
            XDG_DATA_HOME=str(d / "xdg-data"), XDG_CACHE_HOME=str(d / "xdg-cache"),
            PATCHRELAY_DATABASE_URL=None, **self.fleet.db_env, **{MARKER: str(d)})

    def argv(self, *args):
        return [*self.fleet.world.cli_argv(config=False), "--config", str(self.config_path), *map(str, args)]

    def cli(self, *args, timeout=120):
        """One `patchrelay` command of this host (its config and environment), as a subprocess."""
        return subprocess.run(self.argv(*args), capture_output=True, text=True, env=self.env(), timeout=timeout)

    # ---- the watch process
    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def log(self):
        return self.dir / f"watch-{self.starts}.log"

    def start(self):
        assert not self.running, f"{self.name} is already running"
        (self.dir / "home").mkdir(exist_ok=True)
        self.starts += 1
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv("watch", "--interval", self.fleet.interval), env=self.env(),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=str(self.dir))
        self.pids.append(self.proc.pid)
        return self

    def stop(self, timeout=30):
        """SIGTERM `watch` (it stops between ticks; workers it launched run on, detached, as in production)."""
        if not self.running:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group_or_pid(self.proc.pid)
            self.proc.wait(10)

    def kill9(self):
        """SIGKILL the watch's process group, then every worker and app-server of this host's runs (the runs
        table: worker_pid, appserver_pid; each leads its own session) and anything else carrying this host's
        marker in its environment (shells the agent started). Twice, a moment apart: a worker spawned just
        before the kill records its pid only when it starts. Returns the pids signalled."""
        self.killed_at = time.time()
        killed = set()
        if self.proc is not None:
            if _kill_group_or_pid(self.proc.pid):
                killed.add(self.proc.pid)
        for _ in range(2):
            for r in self.fleet.query("SELECT worker_pid, worker_started, appserver_pid, appserver_started FROM runs "
                                      "WHERE host = %s", (self.name,)):
                for pid, started in ((r["worker_pid"], r["worker_started"]),
                                     (r["appserver_pid"], r["appserver_started"])):
                    if _kill_group_or_pid(pid, started):
                        killed.add(pid)
            for pid in _pids_with_marker(str(self.dir)):
                if _kill_group_or_pid(pid):
                    killed.add(pid)
            time.sleep(0.5)
        if self.proc is not None:
            self.proc.wait(10)
        return sorted(killed)

    def shutdown(self):
        """Kill everything of this host (teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            _kill_group_or_pid(self.proc.pid)
            self.proc.wait(10)
        for pid in _pids_with_marker(str(self.dir)):
            _kill_group_or_pid(pid)

    def output(self, tail=4000):
        """The watch logs of every start and the last lines of each run log, for failure messages."""
        parts = []
        for p in sorted(self.dir.glob("watch-*.log")):
            parts.append(f"--- {self.name} {p.name}\n{p.read_text(errors='replace')[-tail:]}")
        logs = self.state / "logs"
        for p in sorted(logs.glob("run-*.log")) if logs.is_dir() else ():
            parts.append(f"--- {self.name} {p.name}\n{p.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)


class Fleet:
    """N hosts on one world and one PostgreSQL database."""

    def __init__(self, world, n, database_url=None, db_env=None, max_runs=2, host_timeout=10, interval=0.5,
                 model=None, root=None):
        self.world = world
        self.database_url = database_url or world.database_url
        assert self.database_url, "a fleet needs the world on PostgreSQL (database_url)"
        self.db_env = dict(db_env if db_env is not None else world.db_env)
        self.model = model or world.model
        assert self.model is not None, "a fleet needs the world's fake model (world.use_codex())"
        self.max_runs, self.host_timeout, self.interval = max_runs, host_timeout, interval
        self.root = Path(root or world.tmp / "fleet")
        self.hosts = [Host(self, i).build() for i in range(1, n + 1)]

    def host(self, name):
        return next(h for h in self.hosts if h.name == name)

    def start(self, *names):
        for h in self.hosts:
            if not names or h.name in names:
                h.start()
        return self

    def stop(self, *names):
        for h in self.hosts:
            if not names or h.name in names:
                h.stop()

    def kill9(self, name):
        return self.host(name).kill9()

    def shutdown(self):
        for h in self.hosts:
            h.shutdown()

    def output(self):
        return "\n".join(h.output() for h in self.hosts)

    # ---- the shared database
    def query(self, sql, args=()):
        """Rows (dicts) of one read of the shared database; `%s` placeholders."""
        import psycopg
        from psycopg.rows import dict_row
        env_pw = self.db_env.get("PGPASSWORD")
        with psycopg.connect(self.database_url, row_factory=dict_row, connect_timeout=10, autocommit=True,
                             application_name="patchrelay-fleet-harness",
                             **({"password": env_pw} if env_pw else {})) as con:
            try:
                return con.execute(sql, args).fetchall()
            except psycopg.errors.UndefinedTable:
                return []       # no host has created the schema yet

    def runs(self):
        return self.query("SELECT r.*, i.key FROM runs r JOIN issues i ON i.id = r.issue_id ORDER BY r.id")

    def issues(self):
        return self.query("SELECT * FROM issues ORDER BY id")

    def active_runs(self):
        return self.query("SELECT r.*, i.key FROM runs r JOIN issues i ON i.id = r.issue_id "
                          "WHERE r.status IN ('claimed', 'running') ORDER BY r.id")

    def members(self):
        """The hosts table with each heartbeat's age by the database's clock (seconds)."""
        return self.query("SELECT name, pid, seen_at, EXTRACT(EPOCH FROM clock_timestamp()) - seen_at AS silent "
                          "FROM hosts ORDER BY name")

    def tick_steps(self, t0, t1):
        """Per host, over the ticks started between t0 and t1 (epoch seconds): {host: {"ticks": n, "intake": ticks
        that polled Linear (not skipped for another holder's lease), "observe": the same for GitHub, "linear" and
        "github": the API requests of its ticks}}. Hosts are told apart by the ticking process's pid."""
        pids = {}
        for h in self.hosts:
            for pid in h.pids:
                pids[pid] = h.name
        out = {}
        for t in self.query("SELECT pid, started_at, summary FROM ticks WHERE summary IS NOT NULL"):
            at = dt.datetime.fromisoformat(t["started_at"].replace("Z", "+00:00")).timestamp()
            if not t0 <= at < t1:
                continue
            summary = json.loads(t["summary"])
            c = out.setdefault(pids.get(t["pid"], f"pid {t['pid']}"),
                               {"ticks": 0, "intake": 0, "observe": 0, "linear": 0, "github": 0})
            c["ticks"] += 1
            for name in ("intake", "observe"):
                step = (summary.get("steps") or {}).get(name) or {}
                c[name] += "skipped" not in step and "error" not in step
            for api in ("linear", "github"):
                c[api] += (summary.get("api_cost") or {}).get(f"{api}_requests") or 0
        return dict(sorted(out.items()))

    def leases(self):
        """{lease name: holder} of the leases still running (by the database's clock)."""
        return {r["name"]: r["holder"] for r in self.query(
            "SELECT name, holder FROM leases WHERE until >= EXTRACT(EPOCH FROM clock_timestamp())")}


def make_world(tmp, server, github=True):
    """A standalone World (conftest.World) with its own FakeLinear (and FakeGitHub), on a fresh database of the
    tests/pg.py `server`, as the `world` fixture builds one for a test marked `postgres`. Returns the world;
    `close_world(world, server)` stops its fakes and drops its database."""
    from conftest import GH_LOGIN, GH_TOKEN, World
    from fakes.github import FakeGitHub
    from fakes.linear import FakeLinear
    Path(tmp).mkdir(parents=True, exist_ok=True)
    linear = FakeLinear().start()
    gh = FakeGitHub(tokens={GH_TOKEN: GH_LOGIN}).start() if github else None
    w = World(Path(tmp), linear, gh)
    url = server.create_database()
    w.database_url, w.db_env = url, server.env()
    w.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    (w.state / "pg-url").write_text(url + "\n")
    w.config["database"]["url"] = url
    w.write_config()
    return w


def close_world(world, server=None):
    if world.model is not None:
        world.model.stop()
    world.linear.stop()
    if world.github is not None:
        world.github.stop()
    if server is not None and world.database_url:
        server.drop_database(world.database_url)
