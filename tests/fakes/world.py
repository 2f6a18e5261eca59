"""Plain helpers that build the outside world for PatchRelay tests: the Codex binary, a CODEX_HOME
pointed at a fake model, and git repositories (a bare "origin" plus a working clone)."""
import os
import shutil
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
