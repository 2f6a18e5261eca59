"""Plain helpers that build the outside world for PatchRelay tests: the Codex binary, a CODEX_HOME
pointed at a fake model, and git repositories (a bare "origin" plus a working clone)."""
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CODEX_VERSION = "0.169.0"

GIT_IDENTITY = {"user.name": "PatchRelay Test", "user.email": "patchrelay-test@example.com"}

CODEX_CONFIG = """\
model = "fake-model"
model_provider = "fake"
approval_policy = "never"
sandbox_mode = "{sandbox}"

[model_providers.fake]
name = "fake"
base_url = "{base_url}"
wire_api = "responses"
env_key = "FAKE_API_KEY"
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = {stream_idle_timeout_ms}

# With these on, codex clones a plugins repository and calls GitHub at start-up.
[features]
plugins = false
remote_plugin = false
apps = false
"""


def codex_bin():
    """Path of the codex executable: $PATCHRELAY_TEST_CODEX, else <repo>/.cache/codex/node_modules/.bin/codex,
    else `codex` on PATH. Raises RuntimeError when none exists (run .ci/run, or npm install @openai/codex)."""
    env = os.environ.get("PATCHRELAY_TEST_CODEX")
    if env:
        if not os.access(env, os.X_OK):
            raise RuntimeError(f"PATCHRELAY_TEST_CODEX={env!r} is not an executable file")
        return env
    local = REPO_ROOT / ".cache" / "codex" / "node_modules" / ".bin" / "codex"
    if os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("codex")
    if found:
        return found
    raise RuntimeError(
        "codex CLI not found: set PATCHRELAY_TEST_CODEX, or run .ci/run, or "
        f"`npm install --prefix .cache/codex @openai/codex@{CODEX_VERSION}` in {REPO_ROOT}")


def write_codex_home(home_dir, model_base_url, stream_idle_timeout_ms=10000, sandbox="workspace-write",
                     extra_toml=""):
    """Write `home_dir`/config.toml for a fake model at `model_base_url` ("http://127.0.0.1:PORT/v1").
    `sandbox` is only the default; thread/start's "sandbox" overrides it. `extra_toml` is appended at the end,
    i.e. after the [features] table, so it should start with its own [table] header.
    Returns the environment additions the codex child needs: {"CODEX_HOME": ..., "FAKE_API_KEY": ...}.
    (Codex itself later appends [projects."<cwd>"] trust entries to this file.)"""
    home = Path(home_dir)
    home.mkdir(parents=True, exist_ok=True)
    text = CODEX_CONFIG.format(base_url=model_base_url, sandbox=sandbox,
                               stream_idle_timeout_ms=int(stream_idle_timeout_ms))
    if extra_toml:
        text += "\n" + extra_toml.rstrip("\n") + "\n"
    (home / "config.toml").write_text(text)
    return {"CODEX_HOME": str(home), "FAKE_API_KEY": "fake-key"}


def git(cwd, *args, check=True, env=None):
    """Run git in `cwd`; return stdout (stripped of the trailing newline). Raises CalledProcessError
    (with stderr) on failure when check is true."""
    proc = subprocess.run(["git", *map(str, args)], cwd=str(cwd), capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc.stdout.rstrip("\n")


def make_origin(tmp_path, branch="main"):
    """Create `tmp_path`/origin.git (bare, HEAD -> `branch`, one commit adding README.md) and a clone at
    `tmp_path`/repo with a local user.name/user.email. Returns (bare_path, clone_path) as Paths."""
    tmp_path = Path(tmp_path)
    bare, clone, seed = tmp_path / "origin.git", tmp_path / "repo", tmp_path / "origin-seed"
    git(tmp_path, "init", "-q", "--bare", f"--initial-branch={branch}", bare)
    git(tmp_path, "init", "-q", f"--initial-branch={branch}", seed)
    for key, value in GIT_IDENTITY.items():
        git(seed, "config", key, value)
    (seed / "README.md").write_text("# app\n")
    git(seed, "add", "README.md")
    git(seed, "commit", "-q", "-m", "Initial commit")
    git(seed, "push", "-q", str(bare), f"HEAD:refs/heads/{branch}")
    shutil.rmtree(seed)
    git(tmp_path, "clone", "-q", str(bare), clone)
    for key, value in GIT_IDENTITY.items():
        git(clone, "config", key, value)
    return bare, clone


def remote_branches(bare):
    """{branch name: commit sha} of the heads in a (bare) repository."""
    out = git(bare, "for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads")
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


def file_at(bare, ref, path):
    """Content of `path` at `ref` in the repository `bare`, or None when it does not exist there."""
    proc = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=str(bare), capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def db_rows(state_dir, sql, args=()):
    """A read of PatchRelay's database under `state_dir` (read-only, one snapshot): rows as dicts; [] while
    the database does not exist yet (reading never creates it)."""
    path = Path(state_dir) / "patchrelay.sqlite"
    if not path.exists():
        return []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, args)]
    finally:
        con.close()


def last_events(state_dir, n=40):
    """The last n events, oldest first, one line each, for failure messages."""
    rows = db_rows(state_dir, "SELECT at, issue_key, run_id, level, kind, message FROM events ORDER BY id DESC "
                              "LIMIT ?", (n,))
    return ["last events:"] + [f"  {r['at'][11:23]} {r['issue_key']} run {r['run_id']} {r['level']} "
                               f"{r['kind']}: {r['message'][:200]}" for r in reversed(rows)]


def db_exec(state_dir, sql, args=()):
    """One write to PatchRelay's database under `state_dir`, committed (a test arranging a state)."""
    con = sqlite3.connect(str(Path(state_dir) / "patchrelay.sqlite"), timeout=10)
    try:
        with con:
            con.execute(sql, args)
    finally:
        con.close()
