"""Configuration, discovery, `init`, `doctor`, file permissions and token secrecy.

Ticks, and the checks of what a real process prints (missing/invalid config file, --verbose
output), run the CLI as a subprocess (`world.cli`). The many one-off commands run the same click CLI
in-process (`cli()`, same arguments, environment and exit codes) to keep the suite fast.
"""
import copy
import json
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import patchrelay
from conftest import APP_TOKEN
from helpers import db_dump, git, sqlite_only


# ----------------------------------------------------------------------------- helpers
def cli(world, *args, env=None, config=True, check=None):
    """Like world.cli, but the click CLI runs in this process. Returns a CompletedProcess."""
    argv = (["--config", str(world.config_path)] if config else []) + [str(a) for a in args]
    r = CliRunner().invoke(patchrelay.cli, argv, env=world.env(**(env or {})))
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    p = subprocess.CompletedProcess(argv, r.exit_code, r.stdout, r.stderr)
    if check is not None and p.returncode != check:
        raise AssertionError(f"patchrelay {argv} exited {p.returncode}, wanted {check}\n{p.stdout}\n{p.stderr}")
    return p


def one_error_line(p):
    """The process failed with exactly one line on stderr (and nothing on stdout); returns it."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert p.stdout == ""
    return lines[0]


def xdg_config(world):
    return world.tmp / "xdg-config" / "patchrelay" / "patchrelay.yaml"


def doctor(world, check=None, config=True, **env):
    p = cli(world, "doctor", "--json", env=env, check=check, config=config)
    report = json.loads(p.stdout)
    return p, report, {c["scope"]: (c["level"], c["message"]) for c in report["checks"]}


def doctor_lines(report, scope):
    return [(c["level"], c["message"]) for c in report["checks"] if c["scope"] == scope]


def healthy_doctor_config(world):
    """The world's config (Linear and GitHub are the fakes) and the real Codex CLI with the fake model."""
    world.use_codex([])


def second_project(world, **routing):
    p = copy.deepcopy(world.config["projects"][0])
    p.pop("issue_key_prefixes")
    p.update(id="ops", worktree_root=str(world.tmp / "worktrees-ops"), **routing)
    world.config["projects"].append(p)


# ----------------------------------------------------------------------------- config errors
def _set(path, value):
    def mutate(world):
        node = world.config
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(world):
        node = world.config
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
    return mutate


CONFIG_ERRORS = {
    "bad-github-repo": (_set(["projects", 0, "github_repo"], "foo"),
                        'projects[0].github_repo: expected "owner/name", got'),
    "unknown-key": (_set(["linear", "api_ur"], "https://api.linear.app/graphql"),
                    "linear.api_ur: unknown key (expected one of: api_url,"),
    "unknown-nested-key": (_set(["linear", "retry", "attempt"], 3), "linear.retry.attempt: unknown key"),
    "prefix-claimed-by-two-projects": (lambda w: second_project(w, issue_key_prefixes=["app"]),
                                       "projects[1].issue_key_prefixes[0]: 'APP' is already routed by "
                                       "projects[0].issue_key_prefixes[0]"),
    "team-key-claimed-by-another-projects-prefix": (lambda w: second_project(w, linear_team_keys=["APP"]),
                                                    "projects[1].linear_team_keys[0]: 'APP' is already routed"),
    "wrong-type-number": (_set(["runner", "max_concurrent_runs"], "lots"),
                          "runner.max_concurrent_runs: expected a number, got 'lots'"),
    "wrong-type-bool": (_set(["runner", "paused"], "yes"), "runner.paused: expected true or false, got a string"),
    "wrong-type-list": (_set(["projects", 0, "issue_key_prefixes"], {"APP": 1}),
                        "projects[0].issue_key_prefixes: expected a list of strings, got a mapping"),
    "wrong-type-section": (_set(["projects"], {"id": "app"}), "projects: expected a list, got a mapping"),
    "missing-required-key": (_delete(["projects", 0, "repo_path"]), "projects[0].repo_path: required"),
    "bad-choice": (_set(["linear", "mode"], "robot"), "linear.mode: expected one of auto, app, user, got 'robot'"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_error_exits_2_with_one_line_naming_the_key_path(world, case):
    mutate, expected = CONFIG_ERRORS[case]
    mutate(world)
    world.write_config()

    p = cli(world, "tick", check=2)
    line = one_error_line(p)
    assert line.startswith("patchrelay: ") and expected in line, line
    assert not Path(world.config["database"]["path"]).exists()      # nothing was started


def test_bad_github_repo_message_is_the_documented_one(world):
    """README: `projects[1].github_repo: expected "owner/name", got "foo"` (exit code 2)."""
    world.config["projects"][0]["github_repo"] = "foo"
    world.write_config()
    line = one_error_line(cli(world, "status", check=2))
    assert line == 'patchrelay: projects[0].github_repo: expected "owner/name", got "foo"'


def test_invalid_yaml_exits_2_naming_file_and_line(world):
    world.config_path.write_text("linear:\n  api_url: [unclosed\nprojects: []\n")
    line = one_error_line(world.cli("status", check=2))
    assert line.startswith(f"patchrelay: {world.config_path}:") and "not valid YAML" in line and "line" in line


def test_missing_config_file_exits_2_and_points_at_init(world):
    missing = world.tmp / "nope.yaml"
    p = world.cli("--config", missing, "status", config=False, check=2)
    line = one_error_line(p)
    assert line == f"patchrelay: {missing}: config file not found (run `patchrelay init` to write one)"


# ----------------------------------------------------------------------------- ${VAR} expansion
def test_env_var_expansion_with_and_without_default(world):
    healthy_doctor_config(world)
    world.config["projects"][0]["repo_path"] = "${PR_TEST_REPO}"
    world.config["projects"][0]["base_branch"] = "${PR_TEST_BASE:-main}"
    world.write_config()

    p, report, checks = doctor(world, PR_TEST_REPO=str(world.repo), PR_TEST_BASE=None)
    assert checks["config"][0] == "PASS"
    assert checks["projects[0]"] == ("PASS", f"{world.repo} is a git repo with main")

    p, report, checks = doctor(world, PR_TEST_REPO=str(world.repo), PR_TEST_BASE="release")
    assert checks["projects[0]"] == ("FAIL", f"{world.repo} has no branch release (base_branch): fetch it, or set "
                                     "base_branch")
    assert p.returncode == 1


# ----------------------------------------------------------------------------- discovery
def test_config_found_via_PATCHRELAY_CONFIG_before_xdg(world):
    xdg = xdg_config(world)
    xdg.parent.mkdir(parents=True)
    xdg.write_text("this: [is not a usable config\n")
    p = cli(world, "status", "--json", config=False, env={"PATCHRELAY_CONFIG": str(world.config_path)}, check=0)
    assert json.loads(p.stdout)["issues"] == []
    assert not Path(world.config["database"]["path"]).exists()      # a read never creates the database


def test_config_found_via_xdg_config_home(world):
    xdg = xdg_config(world)
    xdg.parent.mkdir(parents=True)
    xdg.write_text(world.config_path.read_text())
    p = cli(world, "status", "--json", config=False, check=0)
    assert json.loads(p.stdout)["issues"] == []
    assert not Path(world.config["database"]["path"]).exists()      # a read never creates the database


def test_explicit_config_flag_wins_over_environment(world):
    bad = world.tmp / "bad.yaml"
    bad.write_text("linear: {api_ur: x}\n")
    p = cli(world, "status", "--json", env={"PATCHRELAY_CONFIG": str(bad)}, check=0)
    assert json.loads(p.stdout)["issues"] == []
    p = cli(world, "status", config=False, env={"PATCHRELAY_CONFIG": str(bad)}, check=2)
    assert "linear.api_ur: unknown key" in one_error_line(p)


# ----------------------------------------------------------------------------- init
def test_init_writes_a_commented_config_to_the_xdg_path(world):
    target = xdg_config(world)
    p = cli(world, "init", config=False, check=0)
    assert p.stdout.startswith(f"wrote {target}\n")
    text = target.read_text()
    assert sum(1 for ln in text.splitlines() if ln.lstrip().startswith("#")) > 20
    raw = yaml.safe_load(text)
    assert raw["projects"][0]["id"] == "app" and raw["projects"][0]["github_repo"] == "acme/app"


def test_init_refuses_to_overwrite_without_force(world):
    target = xdg_config(world)
    target.parent.mkdir(parents=True)
    target.write_text("# mine\n")
    p = cli(world, "init", config=False, check=2)
    assert one_error_line(p) == f"patchrelay: {target}: already exists (use --force to overwrite)"
    assert target.read_text() == "# mine\n"

    cli(world, "init", "--force", config=False, check=0)
    assert target.read_text() != "# mine\n" and "projects:" in target.read_text()


def test_init_config_is_usable_after_editing_repo_path(world):
    world.use_codex([])                       # the real Codex CLI and a codex home for the fake model
    target = xdg_config(world)
    cli(world, "init", config=False, check=0)
    # as written it already parses: status works (database under $XDG_STATE_HOME)
    p = cli(world, "status", "--json", config=False, check=0)
    assert json.loads(p.stdout) == {"issues": [], "others": 0, "outbox": [], "api": [], "api_use": {"ticks": 0, "interval_seconds": None}, "last_tick": None, "paused": None, "unrouted": [], "tokens": {"today": 0, "day_cap": None, "issue_cap": None, "run_cap": None}, "codex_hold": None, "flaky_checks": {},
                             "worktrees": {"count": 0, "bytes": 0, "kept": []}, "linear_token": {"source": "environment"}, "hosts": []}
    assert not (world.tmp / "xdg-state" / "patchrelay" / "patchrelay.sqlite").exists()   # reads create nothing

    text = target.read_text()
    edits = {"repo_path: ~/src/app": f"repo_path: {world.repo}",
             "  # api_url: https://api.linear.app/graphql": f"  api_url: {world.linear.url}",
             "  # bin: codex": f"  bin: {world.config['codex']['bin']}",
             "  # home: ~/.codex ": f"  home: {world.config['codex']['home']} ",
             "  # use_gh_cli: true": "  use_gh_cli: false",
             "  # api_url: https://api.github.com": f"  api_url: {world.github.api_url}"}
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new, 1)
    target.write_text(text)

    p, report, checks = doctor(world, check=0, config=False)
    assert report["ok"] is True
    for scope in ("config", "database", "linear", "git", "codex", "projects[0]"):
        assert checks[scope][0] == "PASS", (scope, checks[scope])
    assert checks["config"][1].startswith(f"{target} is valid (1 project(s))")


# ----------------------------------------------------------------------------- doctor
def test_doctor_passes_config_database_linear_and_git(world):
    healthy_doctor_config(world)
    p, report, checks = doctor(world, check=0)
    assert report["ok"] is True
    for scope in ("config", "database", "linear", "git", "codex", "projects[0]", "github",
                  "projects[0].github_repo"):
        assert checks[scope][0] == "PASS", (scope, checks[scope])
    assert doctor_lines(report, "linear")[0] == ("PASS", "token accepted: viewer PatchRelay (app mode)")
    assert checks["github"][1] == "token accepted: patchrelay-bot"
    assert checks["projects[0].github_repo"][1] == "acme/app: writable"
    level, message = checks["projects[0].sandbox"]          # the test repository lives under /tmp
    assert level == "WARN" and "lies under /tmp" in message and ".git" in message
    codex = doctor_lines(report, "codex")                    # the real Codex: handshake, account, sandbox
    assert ("PASS", "codex app-server handshake ok (model provider fake, no OpenAI login needed)") in codex, codex
    assert ("PASS", "sandbox workspace-write runs commands") in codex, codex
    assert not [c for c in codex if c[0] == "FAIL"], codex
    assert checks["projects[0].push"][0] == "PASS", checks["projects[0].push"]
    level, message = checks["linear"]                        # the last linear line: what the rule takes
    assert level == "PASS" and "delegated to the app" in message and "takes 0 open issue(s)" in message, message


def test_doctor_says_how_many_issues_the_delegation_rule_would_take(world):
    healthy_doctor_config(world)
    world.delegate()
    world.delegate(title="Another")
    done = world.linear.add_issue(world.team, "Finished", delegate=world.app, state="Done")
    assert done
    p, report, checks = doctor(world, check=0)
    assert "takes 2 open issue(s) right now" in checks["linear"][1], checks["linear"]


def test_doctor_fails_when_codex_cannot_run_and_names_the_fix(world):
    healthy_doctor_config(world)
    p, report, checks = doctor(world, check=1, FAKE_API_KEY=None)     # the model provider's key is missing
    fails = [m for lv, m in doctor_lines(report, "codex") if lv == "FAIL"]
    assert len(fails) == 1 and "$FAKE_API_KEY" in fails[0] and "environment file" in fails[0], fails
    (world.tmp / "codex-home" / "config.toml").unlink()              # OpenAI's provider, and nobody logged in
    p, report, checks = doctor(world, check=1)
    fails = [m for lv, m in doctor_lines(report, "codex") if lv == "FAIL"]
    assert len(fails) == 1 and "not logged in" in fails[0] and "codex login" in fails[0], fails
    world.config["codex"]["bin"] = "codex-nowhere"
    world.write_config()
    p, report, checks = doctor(world, check=1)
    level, message = checks["codex"]
    assert level == "FAIL" and "npm install -g @openai/codex@" in message, message


def test_doctor_checks_that_origin_is_the_github_repo_and_can_be_pushed_to(world):
    healthy_doctor_config(world)
    git(world.repo, "remote", "set-url", "origin", "https://github.com/acme/other.git")
    p, report, checks = doctor(world, check=1)
    level, message = checks["projects[0].repo_path"]
    assert level == "FAIL" and "origin is acme/other, not github_repo acme/app" in message, message
    assert "projects[0].push" not in checks            # pushing to the wrong repository proves nothing
    git(world.repo, "remote", "set-url", "origin", str(world.tmp / "no-such-origin.git"))
    p, report, checks = doctor(world, check=1)
    level, message = checks["projects[0].push"]
    assert level == "FAIL" and "cannot push to origin" in message and "write access" in message, message


def test_doctor_fails_without_a_github_token_or_access_and_names_the_fix(world):
    healthy_doctor_config(world)
    p, report, checks = doctor(world, check=1, GITHUB_TOKEN=None)
    level, message = checks["github"]
    assert level == "FAIL" and "$GITHUB_TOKEN" in message and "gh auth login" in message
    world.github.repos["acme/app"]["viewerPermission"] = "READ"
    p, report, checks = doctor(world, check=1)
    level, message = checks["projects[0].github_repo"]
    assert level == "FAIL" and "write access" in message
    world.config["projects"][0]["github_repo"] = "acme/nope"
    world.write_config()
    p, report, checks = doctor(world, check=1)
    assert checks["projects[0].github_repo"][0] == "FAIL" and "not found" in checks["projects[0].github_repo"][1]


@pytest.mark.parametrize("token, expected", [
    (None, "$LINEAR_API_KEY is not set"),
    ("lin_oauth_rejectedToken0000", "(check the Linear token)"),
], ids=["missing", "rejected"])
def test_doctor_fails_when_linear_token_is_missing_or_rejected(world, token, expected):
    healthy_doctor_config(world)
    p, report, checks = doctor(world, check=1, LINEAR_API_KEY=token)
    assert report["ok"] is False
    level, message = checks["linear"]
    assert level == "FAIL" and expected in message
    assert checks["config"][0] == checks["database"][0] == checks["git"][0] == "PASS"
    if token:
        assert token not in p.stdout + p.stderr


# ----------------------------------------------------------------------------- permissions and secrets
@sqlite_only("the modes of the SQLite file and its -wal/-shm")
def test_database_file_and_directory_are_owner_only(world):
    world.config["runner"]["paused"] = True
    world.write_config()
    world.delegate()
    world.tick_subprocess()
    db = Path(world.config["database"]["path"])
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    for extra in (Path(str(db) + "-wal"), Path(str(db) + "-shm"), Path(str(db) + ".tick.lock")):
        if extra.exists():
            assert stat.S_IMODE(extra.stat().st_mode) & 0o077 == 0, extra


def _state_bytes(world):
    """Every byte PatchRelay stored: the database (with -wal/-shm; on PostgreSQL its rows) and anything else in
    its state dir."""
    root = Path(world.config["database"]["path"]).parent
    rows = db_dump(world.state).encode() if world.database_url else b""
    return rows + b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_linear_token_never_stored_or_printed(world):
    world.config["runner"]["paused"] = True
    world.write_config()
    issue, session = world.delegate()
    world.linear.fail_next(2, status=500, operation="agentActivityCreate")     # an error path, recorded
    p1 = world.cli("--verbose", "tick", check=0)
    world.linear.add_comment(issue, world.alice, "more")
    world.linear.rate_limit_next(style="429", retry_after=3600)                # another one, recorded
    p2 = world.cli("--verbose", "tick", check=1)
    outputs = [p1.stdout, p1.stderr, p2.stdout, p2.stderr,
               cli(world, "--verbose", "status", "--json", check=0).stdout,
               cli(world, "--verbose", "show", "APP-1", "--json", check=0).stdout]
    assert "DEBUG" in p1.stderr or "INFO" in p1.stderr        # --verbose really logs
    for out in outputs:
        assert APP_TOKEN not in out
    assert APP_TOKEN.encode() not in _state_bytes(world)


def test_rejected_linear_token_is_not_echoed(world):
    bad = "lin_oauth_rejectedToken0000"
    world.delegate()
    p = world.cli("--verbose", "tick", env={"LINEAR_API_KEY": bad}, check=1)
    assert "check the Linear token" in p.stderr
    assert bad not in p.stdout + p.stderr
    assert bad.encode() not in _state_bytes(world)


def test_token_pasted_into_token_env_is_rejected_and_never_echoed(world):
    """`linear.token_env` must name a variable; the config check exists to catch a pasted token
    ("tokens are never read from the config file"). A Linear token pasted there must be refused as a
    config error (exit 2) and must never be printed or stored."""
    world.config["linear"]["token_env"] = APP_TOKEN
    world.write_config()
    p = world.cli("tick", check=None)
    assert p.returncode == 2 and "linear.token_env" in p.stderr
    assert APP_TOKEN not in p.stdout + p.stderr
    db = Path(world.config["database"]["path"])
    assert not db.exists() or APP_TOKEN.encode() not in _state_bytes(world)


def test_config_and_verbose_work_after_the_subcommand_and_h_is_help(world):
    p = cli(world, "status", "--json", "--config", str(world.config_path), config=False, check=0)
    assert json.loads(p.stdout)["issues"] == []
    p = cli(world, "doctor", "--json", "-v", check=None)
    assert "HTTP" in p.stderr or "POST" in p.stderr, p.stderr        # -v after the command logs the calls
    for argv in (["-h"], ["status", "-h"], ["list", "-h"]):
        p = cli(world, *argv, config=False, check=0)
        assert p.stdout.startswith("Usage: ") and "Options:" in p.stdout, (argv, p.stdout)
    p = cli(world, "status", "--config", str(world.tmp / "nope.yaml"), config=False, check=2)
    assert "nope.yaml: config file not found" in p.stderr


def test_the_github_token_is_offered_to_github_only_when_pushing(world, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_pushtoken0000000000000000000000000")
    cfg = patchrelay.load_config(str(world.config_path))
    env = patchrelay.git_push_env(cfg, "https://github.com/acme/app.git")
    assert env["GIT_CONFIG_KEY_0"] == "http.https://github.com/.extraheader"
    assert "ghp_pushtoken" not in env["GIT_CONFIG_VALUE_0"]                    # base64, in the environment only
    for url in ("https://gitlab.example.com/acme/app.git", "https://github.com.evil.example/acme/app.git",
                "git@github.com:acme/app.git", "/srv/git/app.git"):
        assert patchrelay.git_push_env(cfg, url) == {}, url
