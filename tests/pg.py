"""A real, throwaway PostgreSQL server for the tests of PatchRelay's PostgreSQL store.

`PgServer().start()` runs initdb into a fresh temp directory and starts the server on 127.0.0.1 with a
free TCP port (its unix socket and its log file in the same directory), tuned for tests: fsync,
synchronous_commit and full_page_writes off, max_connections=200. Clients authenticate with a password
(scram-sha-256) as the superuser `patchrelay`; URLs carry no password, which comes from PGPASSWORD, as
PatchRelay reads it in production (`server.env()`).

PostgreSQL refuses to run as root, and CI runs as root: then the cluster belongs to, and the server runs
as, the `postgres` user (Debian's package creates it), else `nobody`.

The binaries come from PATH or /usr/lib/postgresql/*/bin (newest version first); .ci/run installs Debian's
postgresql package when neither has them. `pg_server()` gives each test process (each pytest-xdist worker)
one server, for the session-scoped `pg` fixture in conftest.py.
"""
import atexit
import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote, unquote

BINARIES = ("initdb", "pg_ctl", "postgres")
SEARCH_GLOB = "/usr/lib/postgresql/*/bin"    # Debian's layout: one directory per major version
SUPERUSER = "patchrelay"
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}
HINT = "run .ci/run, which installs Debian's postgresql package"


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise RuntimeError("psycopg is not installed (pip install 'psycopg[binary]>=3.1'): run .ci/run, "
                           "which installs the test extra") from None
    return psycopg


def find_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres: PATH first (symlinks resolved), then
    /usr/lib/postgresql/*/bin, newest version first. RuntimeError (one line) when none has all three."""
    candidates = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
        candidates.append(Path(on_path).parent)

    def version_key(d):
        return [int(n) for n in re.findall(r"\d+", Path(d).parent.name)] or [0]
    candidates += [Path(d) for d in sorted(glob.glob(SEARCH_GLOB), key=version_key, reverse=True)]
    best_missing = list(BINARIES)
    for d in candidates:
        missing = [b for b in BINARIES if not os.access(d / b, os.X_OK)]
        if not missing:
            return d
        if len(missing) < len(best_missing):
            best_missing = missing
    raise RuntimeError(f"PostgreSQL server binaries not found ({', '.join(best_missing)}; looked on PATH and "
                       f"under {SEARCH_GLOB}): {HINT}")


def _unprivileged_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    raise RuntimeError("running as root, and neither a `postgres` nor a `nobody` user exists to run PostgreSQL")


def _temp_base(for_other_user: bool) -> str:
    """Where the cluster's temp directory goes: the usual temp dir, unless another user (the server's,
    when we are root) could not reach it, then /tmp."""
    base = tempfile.gettempdir()
    if for_other_user:
        p = Path(base).resolve()
        for d in (p, *p.parents):
            if not d.stat().st_mode & stat.S_IXOTH:
                return "/tmp"
    return base


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf_value(v) -> str:
    return "'" + str(v).replace("'", "''") + "'"


class PgServer:
    """One throwaway PostgreSQL cluster. `start()` / `stop()`; `url(db)`, `env()`, `create_database()`,
    `drop_database(name)`, `connect(db)`, `psql(db, sql)`. Attributes once started: host, port, user,
    password, version (server_version_num, e.g. 150014), version_string, tmp (its directory), log (its log
    file), data (the data directory), os_user (the account the server runs as, when we are root)."""

    host = "127.0.0.1"
    user = SUPERUSER

    def __init__(self, bindir=None, settings=None):
        self.bindir = Path(bindir) if bindir else None
        self.settings = {**SETTINGS, **(settings or {})}
        self.password = secrets.token_urlsafe(24)
        self.port: int | None = None
        self.tmp: Path | None = None
        self.version: int | None = None
        self.version_string: str | None = None
        self.os_user: str | None = None
        self.start_seconds: float | None = None
        self._account: pwd.struct_passwd | None = None
        self._owner_pid: int | None = None
        self._atexit = False

    def __repr__(self):
        return f"<PgServer {self.host}:{self.port} {self.tmp}>" if self.running else "<PgServer stopped>"

    # ---------------------------------------------------------------- paths
    @property
    def data(self) -> Path:
        assert self.tmp is not None, "PgServer not started"
        return self.tmp / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.tmp is not None, "PgServer not started"
        return self.tmp / "sock"

    @property
    def log(self) -> Path:
        assert self.tmp is not None, "PgServer not started"
        return self.tmp / "postgres.log"

    @property
    def running(self) -> bool:
        return self.tmp is not None and self.port is not None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (from postmaster.pid), or None."""
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (AssertionError, OSError, ValueError):
            return None

    # ---------------------------------------------------------------- running the binaries
    def _argv(self, argv):
        """argv, run as the unprivileged account when we are root."""
        if self._account is None:
            return argv
        name, uid, gid = self._account.pw_name, self._account.pw_uid, self._account.pw_gid
        runuser = shutil.which("runuser") or next((p for p in ("/usr/sbin/runuser", "/sbin/runuser")
                                                   if os.access(p, os.X_OK)), None)
        if runuser:
            return [runuser, "-u", name, "--", *argv]
        if shutil.which("setpriv"):
            return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--", *argv]
        if shutil.which("su"):
            return ["su", "-s", "/bin/sh", "-c", shlex.join(argv), name]
        raise RuntimeError("running as root, and none of runuser, setpriv, su is there to run PostgreSQL as "
                           f"{name}")

    def _run(self, argv, timeout=120):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        return subprocess.run(self._argv(argv), cwd=self.tmp, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def _chown(self, path: Path):
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def log_tail(self, lines=30, start=0) -> str:
        """The last `lines` lines of the server's log (from byte `start` on)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(start)
                text = f.read().decode("utf-8", "replace")
        except (AssertionError, OSError) as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])

    # ---------------------------------------------------------------- start / stop
    def start(self) -> "PgServer":
        if self.running:
            return self
        bindir = self.bindir or find_bindir()
        t0 = time.monotonic()
        self._account = _unprivileged_user() if os.geteuid() == 0 else None
        self.os_user = self._account.pw_name if self._account else None
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.tmp = Path(tempfile.mkdtemp(prefix=f"patchrelay-pg-{worker}-", dir=_temp_base(self._account is not None)))
        self._owner_pid = os.getpid()
        try:
            self._chown(self.tmp)
            self.socket_dir.mkdir()
            self._chown(self.socket_dir)
            pwfile = self.tmp / "pwfile"
            pwfile.write_text(self.password + "\n")
            pwfile.chmod(0o600)
            self._chown(pwfile)
            p = self._run([str(bindir / "initdb"), "-D", str(self.data), "--auth=scram-sha-256",
                           f"--username={self.user}", f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C",
                           "--no-sync"])
            pwfile.unlink()
            if p.returncode != 0:
                raise RuntimeError(f"initdb failed (exit {p.returncode}) in {self.data}:\n"
                                   f"{(p.stdout + p.stderr).strip()[-3000:]}")
            settings = {**self.settings, "unix_socket_directories": str(self.socket_dir)}
            with open(self.data / "postgresql.conf", "a") as f:
                f.write("\n# tests/pg.py\n" + "".join(f"{k} = {_conf_value(v)}\n" for k, v in settings.items()))
            self._start_postmaster(bindir)
            row = self.psql("postgres", "SELECT current_setting('server_version_num')::int, version()")[0]
            self.version, self.version_string = row
        except BaseException:
            self.stop()
            raise
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        self.start_seconds = time.monotonic() - t0
        return self

    def _start_postmaster(self, bindir: Path, attempts=3):
        for attempt in range(1, attempts + 1):
            port = _free_port()
            offset = self.log.stat().st_size if self.log.exists() else 0
            p = self._run([str(bindir / "pg_ctl"), "start", "-D", str(self.data), "-l", str(self.log), "-w",
                           "-t", "60", "-o", f"-p {port}"])
            if p.returncode == 0:
                self.port = port
                return
            tail = self.log_tail(start=offset)
            if attempt < attempts and re.search(r"could not bind|already in use", tail):
                continue    # another process took the free port between our check and the server's bind
            raise RuntimeError(f"PostgreSQL did not start (pg_ctl exit {p.returncode}: "
                               f"{(p.stdout + p.stderr).strip()[-1000:]}); the tail of its log {self.log}:\n{tail}")

    def stop(self):
        """Stop the server (immediate mode) and remove its directory. Idempotent; a no-op in a forked child."""
        if self.tmp is None or self._owner_pid != os.getpid():
            return
        try:
            pid = self.pid
            if pid is not None:
                bindir = self.bindir or find_bindir()
                try:
                    p = self._run([str(bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", "immediate", "-w",
                                   "-t", "30"], timeout=60)
                    stopped = p.returncode == 0
                except subprocess.TimeoutExpired:
                    stopped = False
                if not stopped and self.pid == pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
            self.port = None

    # ---------------------------------------------------------------- clients
    def url(self, dbname="postgres") -> str:
        """The database's URL, without the password (PatchRelay takes it from PGPASSWORD or .pgpass)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def env(self) -> dict:
        """The environment a client (a `patchrelay` subprocess) needs besides the URL."""
        return {"PGPASSWORD": self.password}

    def connect(self, dbname="postgres", autocommit=True, **kwargs):
        """A psycopg connection to the database, as the superuser with the password."""
        psycopg = _psycopg()
        assert self.running, "PgServer not started"
        return psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               dbname=dbname, autocommit=autocommit, connect_timeout=10, **kwargs)

    def psql(self, dbname, sql, params=None) -> list:
        """Run SQL (several statements when there are no params) in the database, autocommit; the rows of
        the last statement that returned any (a list of tuples, [] when none did)."""
        with self.connect(dbname) as conn:
            cur = conn.execute(sql, params)
            rows = []
            while True:
                if cur.description is not None:
                    rows = cur.fetchall()
                if not cur.nextset():
                    return rows

    def create_database(self, name=None) -> str:
        """A new, empty database (a random name when none is given); its URL."""
        psycopg = _psycopg()
        name = name or "test_" + secrets.token_hex(6)
        self.psql("postgres", psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name):
        """Drop the database (a name or a URL from create_database), closing its connections first."""
        psycopg = _psycopg()
        if "://" in name:
            name = unquote(name.rsplit("/", 1)[1])
        force = " WITH (FORCE)" if (self.version or 0) >= 130000 else ""
        self.psql("postgres", psycopg.sql.SQL("DROP DATABASE IF EXISTS {}" + force).format(
            psycopg.sql.Identifier(name)))


_SERVER: PgServer | None = None


def pg_server() -> PgServer:
    """This process's server (one per pytest-xdist worker), started on first use; for the session-scoped
    `pg` fixture, which stops it at the end of the session."""
    global _SERVER
    if _SERVER is None or not _SERVER.running or _SERVER._owner_pid != os.getpid():
        _SERVER = PgServer().start()
    return _SERVER
